"""napari-sam in another environment than the kit's: ``--python`` on patch, status and unpatch.

The second environment is a real venv with napari-sam 0.4.13 from PyPI (``--no-deps``: the kit only
reads and rewrites its files) and, as dist-info metadata, the napari version the compat decision
must read from that interpreter rather than from the kit's own napari.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medico_adapters import pyenv
from medico_adapters.adapters.napari_sam import needs_layers_compat
from medico_adapters.cli import main
from tests.helpers import snapshot

BIN = "Scripts" if os.name == "nt" else "bin"
EXE = "python.exe" if os.name == "nt" else "python"


def fake_dist(site: Path, name: str, version: str) -> None:
    """Just the metadata ``importlib.metadata.version`` reads."""
    info = site / f"{name}-{version.replace('-', '_')}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.fixture(scope="session")
def napari_sam_wheel(tmp_path_factory):
    """napari-sam 0.4.13 from PyPI, downloaded once per test session."""
    dest = tmp_path_factory.mktemp("wheels")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest), "napari-sam==0.4.13"],
        capture_output=True, text=True,
    )
    wheels = sorted(dest.glob("napari_sam-*.whl"))
    if proc.returncode != 0 or not wheels:
        reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        pytest.skip(f"cannot download napari-sam 0.4.13 from PyPI: {reason}")
    return wheels[0]


@pytest.fixture(scope="module")
def other_env(tmp_path_factory, napari_sam_wheel):
    """A second venv with napari-sam 0.4.13 and (metadata of) napari 0.6.2rc1; (python, package)."""
    root = tmp_path_factory.mktemp("user-env") / "napari-env"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True)
    python = str(root / BIN / EXE)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(napari_sam_wheel)], check=True, capture_output=True)
    fake_dist(Path(pyenv.site_packages(python)), "napari", "0.6.2rc1")
    package = pyenv.package_dir(python, ("napari_sam",))
    assert package is not None and package.is_relative_to(root)
    return python, package


def cli(*args, home: Path, path_prefix: Path | None = None, cwd: Path | None = None):
    env = {**os.environ, "HOME": str(home), "USERPROFILE": str(home), "MEDICO_ADAPTERS_CACHE": str(home / "cache")}
    if path_prefix is not None:
        env["PATH"] = str(path_prefix) + os.pathsep + env["PATH"]
    return subprocess.run([sys.executable, "-m", "medico_adapters", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


#: these compare against the napari-sam installed beside the kit (the README's [demo] extra).
needs_kit_napari_sam = pytest.mark.skipif(
    importlib.util.find_spec("napari_sam") is None, reason="napari-sam is not installed for the kit's Python ([demo] extra)"
)


def kit_copy() -> Path:
    """The napari-sam installed for the kit's Python (asked in a fresh process: this one may
    hold a temporary copy another test imported)."""
    return pyenv.package_dir(sys.executable, ("napari_sam",))


@needs_kit_napari_sam
def test_patch_status_unpatch_the_copy_another_python_runs(other_env, checkpoints, tmp_path):
    python, package = other_env
    home = tmp_path / "home"
    kit_before, other_before = snapshot(kit_copy()), snapshot(package)

    done = cli("patch", "napari-sam", "--python", python, "--checkpoint", checkpoints["training"], "--json", home=home)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["path"] == str(package) and report["layout"] == "N3" and report["changed"] == ["_widget.py"]
    widget = (package / "_widget.py").read_text()
    # napari 0.6.2rc1 there (the kit's own is 0.5.6): the compat patch is applied
    assert '"MedicoSAM"' in widget and ".layers.events.inserted" in widget
    placed = home / ".cache/napari-segment-anything/vit_b_medicosam.pt"
    assert report["placed"] == [str(placed)] and placed.is_file()
    assert snapshot(kit_copy()) == kit_before

    env_root = Path(python).parents[1]  # as a user types it: relative, from the folder holding the env
    relative = os.path.relpath(python, env_root.parent)
    st = cli("status", "napari-sam", "--python", relative, "--json", home=home, cwd=env_root.parent)
    data = json.loads(st.stdout)
    assert data["path"] == str(package) and data["patched"] and data["checkpoints"][0]["matching"]
    assert data["features"] == ["napari>=0.6.2 compat (layers_change, add_points border_color)"]

    undo = cli("unpatch", "napari-sam", "--python", python, home=home)
    assert undo.returncode == 0, undo.stderr
    assert snapshot(package) == other_before and not placed.exists()
    assert snapshot(kit_copy()) == kit_before


@needs_kit_napari_sam
@pytest.mark.skipif(os.name == "nt", reason="a napari launcher on Windows is an .exe, not a #! script")
def test_napari_on_path_from_another_env_is_pointed_out(other_env, tmp_path):
    python, _ = other_env
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    napari = bin_dir / "napari"
    napari.write_text(f"#!{python}\nimport sys\nfrom napari.__main__ import main\nsys.exit(main())\n")
    napari.chmod(0o755)

    st = cli("status", "napari-sam", home=tmp_path / "home", path_prefix=bin_dir)
    assert st.returncode == 0, st.stderr
    assert st.stdout.startswith(f"{kit_copy()}: napari-sam")
    assert st.stderr.count("\n") == 1 and f"runs {python}, not this kit's Python" in st.stderr
    assert f"pass --python {python}" in st.stderr
    as_json = cli("status", "napari-sam", "--json", home=tmp_path / "home", path_prefix=bin_dir)
    assert as_json.stderr == "" and f"--python {python}" in json.loads(as_json.stdout)["notes"][0]

    napari.write_text(f"#!{sys.executable}\n")  # napari from the kit's own environment: nothing to say
    quiet = cli("status", "napari-sam", home=tmp_path / "home", path_prefix=bin_dir)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_python_without_napari_sam_is_refused(tmp_path, capsys):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    python = str(bare / BIN / EXE)
    assert main(["status", "napari-sam", "--python", python]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{python}: has no napari-sam installed" in err
    assert main(["status", "micro-sam", "--python", python]) == 1
    assert "only napari-sam" in capsys.readouterr().err
    assert main(["status", "napari-sam", "--python", str(tmp_path / "no-python")]) == 1
    assert "no-python: not found" in capsys.readouterr().err


@pytest.mark.parametrize(("version", "compat"), [
    ("0.5.6", False), ("0.6.1", False), ("0.6.2.dev14+g1a2b3c4", True), ("0.6.2a0", True),
    ("0.6.2rc1", True), ("0.6.2", True), ("0.10.0", True), ("not.a.version", False),
])
def test_compat_decision_reads_the_target_pythons_napari(version, compat, other_env, tmp_path, monkeypatch):
    python, _ = other_env
    fake_dist(tmp_path, "napari", version)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # found before the venv's own napari metadata
    assert needs_layers_compat(python) is compat
    assert needs_layers_compat(None) is False  # the kit's own napari is 0.5.6


def test_script_python_reads_each_launcher_form(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("#!/opt/envs/x/bin/python3.11\nprint()\n")
    spaced = tmp_path / "spaced"
    spaced.write_text("#!/bin/sh\n'''exec' \"/Users/a b/env/bin/python\" \"$0\" \"$@\"\n' '''\nimport sys\n")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\x7fELF\x02\x01")
    scripts = tmp_path / "env/Scripts"
    scripts.mkdir(parents=True)
    (scripts / "napari.exe").write_bytes(b"MZ")
    (scripts / "python.exe").write_bytes(b"MZ")
    conda = tmp_path / "conda"
    (conda / "Scripts").mkdir(parents=True)
    (conda / "Scripts/napari.exe").write_bytes(b"MZ")
    (conda / "python.exe").write_bytes(b"MZ")
    assert pyenv.script_python(plain) == "/opt/envs/x/bin/python3.11"
    assert pyenv.script_python(spaced) == "/Users/a b/env/bin/python"
    assert pyenv.script_python(binary) is None
    assert pyenv.script_python(scripts / "napari.exe") == str(scripts / "python.exe")
    assert pyenv.script_python(conda / "Scripts/napari.exe") == str(conda / "python.exe")
    assert pyenv.script_python(tmp_path / "missing") is None
