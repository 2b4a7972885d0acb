"""The write path as Windows and macOS users meet it, proven on Linux.

No Windows machine runs these tests, so they take away what only POSIX has (``fcntl``,
``os.O_DIRECTORY``, i.e. opening a folder) and check that ``patch``/``status``/``unpatch`` still
work end to end through the real CLI; that every write is binary (a static check of the source);
that mode bits survive; that a file another program holds is reported and completed by a re-run;
and that relative paths, another working folder and a moved tree all work.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medico_adapters import engine, fsio, patching
from medico_adapters.adapters.samm import ADAPTER
from medico_adapters.engine import KILL_AT_ENV, STATE_DIR
from medico_adapters.errors import FileBusyError
from tests.helpers import copy_fixture, snapshot

PACKAGE = Path(__file__).resolve().parent.parent / "medico_adapters"

#: runs the CLI as on Windows: no fcntl, no O_DIRECTORY, and opening a folder is an error.
WINDOWS_LIKE = textwrap.dedent(
    """
    import os, sys
    sys.modules["fcntl"] = None  # import fcntl -> ImportError, as on Windows
    if hasattr(os, "O_DIRECTORY"):
        del os.O_DIRECTORY
    _open = os.open
    def _no_folders(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(13, "Windows cannot open a folder", str(path))
        return _open(path, flags, *args, **kwargs)
    os.open = _no_folders
    from medico_adapters.cli import main
    raise SystemExit(main(sys.argv[1:]))
    """
)


def _cli(*args, cwd=None, windows_like=False, env=None):
    cmd = [sys.executable, "-c", WINDOWS_LIKE] if windows_like else [sys.executable, "-m", "medico_adapters"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


def _source(tree: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(tree).items() if not k.startswith(STATE_DIR) and "samm-workspace" not in k}


# --- Windows: no fcntl, no folder handles --------------------------------------------------------


def test_patch_status_unpatch_without_fcntl_or_folder_handles(tmp_path, checkpoints):
    tree = copy_fixture("samm/S4", tmp_path)
    before = snapshot(tree)
    patched = _cli("patch", "samm", "--path", tree, "--checkpoint", checkpoints["training"], windows_like=True)
    assert patched.returncode == 0, patched.stderr
    assert "Traceback" not in patched.stderr
    status = _cli("status", "samm", "--path", tree, "--json", windows_like=True)
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert st["patched"] and st["checkpoints"][0]["matching"]
    again = _cli("patch", "samm", "--path", tree, "--checkpoint", checkpoints["training"], windows_like=True)
    assert again.returncode == 0 and "already patched" in again.stdout
    restored = _cli("unpatch", "samm", "--path", tree, windows_like=True)
    assert restored.returncode == 0, restored.stderr
    assert snapshot(tree) == before


def test_blocker_really_takes_fcntl_away(tmp_path):
    probe = WINDOWS_LIKE.split("from medico_adapters.cli")[0] + textwrap.dedent(
        """
        try:
            import fcntl
        except ImportError:
            print("no fcntl")
        try:
            os.open(sys.argv[1], os.O_RDONLY)
        except PermissionError:
            print("no folders")
        """
    )
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True).stdout
    assert out.split() == ["no", "fcntl", "no", "folders"]


# --- every write is binary, and goes through fsio ------------------------------------------------


def _module_flags(tree: ast.Module) -> dict[str, str]:
    return {
        t.id: ast.unparse(node.value)
        for node in tree.body if isinstance(node, ast.Assign)
        for t in node.targets if isinstance(t, ast.Name)
    }


def test_the_standalone_accelerator_writes_binary_only():
    """It is copied into tools' trees, so it has its own small atomic writer: binary mode only."""
    for path in (PACKAGE / "accel").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "open" and len(node.args) > 1:
                mode = node.args[1].value
                assert "b" in mode or not set(mode) & set("wax+"), f"{path.name}:{node.lineno}: open(..., {mode!r})"


def _os_open_calls(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "os.open":
            yield node


def test_every_os_open_for_writing_is_binary():
    checked = 0
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text("utf-8"))
        names = _module_flags(tree)
        for call in _os_open_calls(tree):
            flags = ast.unparse(call.args[1])
            flags = names.get(flags, flags)
            if any(w in flags for w in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND")):
                assert "O_BINARY" in flags, f"{path.name}:{call.lineno}: os.open for writing without O_BINARY"
                checked += 1
    assert checked >= 1  # fsio.write_file


_WRITERS = {"write_text", "write_bytes"}


def test_nothing_writes_around_fsio():
    """Text or binary writes outside fsio would skip the binary mode, the atomic rename and UTF-8."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "fsio.py" or path.parent.name == "accel":  # accel: placed in tools, cannot import the kit
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            if isinstance(node.func, ast.Attribute) and node.func.attr in _WRITERS and not func.startswith("fsio."):
                offenders.append(f"{path.name}:{node.lineno}: {func}")
            if func == "open" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and set(str(node.args[1].value)) & set("wax+"):
                offenders.append(f"{path.name}:{node.lineno}: open(..., {node.args[1].value!r})")
    assert offenders == []


# --- the helper ---------------------------------------------------------------------------------


#: Windows keeps only a read-only bit of a file's mode.
POSIX_MODES = pytest.mark.skipif(os.name == "nt", reason="Windows has no POSIX mode bits")


@POSIX_MODES
def test_atomic_write_keeps_the_replaced_files_mode(tmp_path):
    target = tmp_path / "run.sh"
    target.write_bytes(b"old")
    target.chmod(0o750)
    fsio.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


def test_atomic_write_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        fsio.atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_output_keeps_the_name_ending_for_format_sniffing_writers(tmp_path):
    target = tmp_path / "mask.nii.gz"
    with fsio.atomic_output(target) as tmp:
        assert tmp.name.endswith(".mask.nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x"
    with pytest.raises(ValueError), fsio.atomic_output(target) as tmp:
        tmp.write_bytes(b"y")
        raise ValueError
    assert target.read_bytes() == b"x" and len(list(tmp_path.iterdir())) == 1


def test_busy_file_on_windows_is_retried_then_named(tmp_path, monkeypatch):
    monkeypatch.setattr(fsio, "_WINDOWS", True)
    monkeypatch.setattr(fsio, "_BUSY_RETRIES", (0, 0))
    calls = []

    def held(src, dst):
        calls.append(dst)
        raise PermissionError(13, "The process cannot access the file", str(dst))

    monkeypatch.setattr(os, "replace", held)
    (tmp_path / "a").write_bytes(b"1")
    with pytest.raises(FileBusyError, match=r"b: cannot replace it, another program holds it open.*run the same command again"):
        fsio.replace(tmp_path / "a", tmp_path / "b")
    assert len(calls) == 3


def test_busy_file_mid_commit_is_completed_by_a_rerun(tmp_path, monkeypatch, checkpoints):
    """A virus scanner holds one file while the journal is applied; the next run finishes."""
    reference = copy_fixture("samm/S4", tmp_path / "ref")
    patching.patch(ADAPTER, reference, checkpoint=checkpoints["plain"])
    tree = copy_fixture("samm/S4", tmp_path / "t")
    monkeypatch.setattr(fsio, "_WINDOWS", True)
    monkeypatch.setattr(fsio, "_BUSY_RETRIES", ())
    real_replace = os.replace

    def scanner(src, dst):
        if Path(dst).name == "utl_sam_server.py":
            raise PermissionError(13, "sharing violation", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", scanner)
    with pytest.raises(FileBusyError, match="utl_sam_server.py"):
        patching.patch(ADAPTER, tree, checkpoint=checkpoints["plain"])
    assert patching.status(ADAPTER, tree)["interrupted"]
    monkeypatch.setattr(os, "replace", real_replace)
    result = patching.patch(ADAPTER, tree, checkpoint=checkpoints["plain"])
    assert result.recovered == "patch"
    assert _source(tree) == _source(reference)
    st = patching.status(ADAPTER, tree)
    assert st["patched"] and not st["interrupted"] and st["checkpoints"][0]["matching"]


@POSIX_MODES
def test_unpatch_restores_permissions(tmp_path, checkpoints):
    tree = copy_fixture("samm/S4", tmp_path)
    script = tree / "samm-python-terminal" / "sam_server.py"
    script.chmod(0o755)
    patching.patch(ADAPTER, tree, checkpoint=checkpoints["plain"])
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    patching.unpatch(ADAPTER, tree)
    assert stat.S_IMODE(script.stat().st_mode) == 0o755


def test_the_lock_lives_outside_the_tree_and_serialises(tmp_path):
    tree = tmp_path / "t"
    tree.mkdir()
    lock = engine.lock_path(tree)
    assert tree not in lock.parents
    assert engine.lock_path(tmp_path / "x" / ".." / "t") == lock
    with engine.locked(tree):
        assert lock.exists()
        os.environ[engine.LOCK_TIMEOUT_ENV] = "0.2"
        try:
            probe = _cli("unpatch", "samm", "--path", tree)
        finally:
            del os.environ[engine.LOCK_TIMEOUT_ENV]
    assert probe.returncode == 1
    assert probe.stderr.strip().endswith("another medico-adapters run is patching this tree")
    assert not (tree / STATE_DIR).exists()


# --- relative paths, another working folder, a moved tree ---------------------------------------


def test_relative_path_from_another_folder_leaves_nothing_behind(tmp_path, checkpoints):
    work = tmp_path / "work"
    tree = copy_fixture("samm/S4", work)
    before = snapshot(tree)
    (work / "sub").mkdir()
    ckpt = shutil.copy(checkpoints["training"], work / "medicosam.pt")
    patched = _cli("patch", "samm", "--path", "./S4", "--checkpoint", "medicosam.pt", cwd=work)
    assert patched.returncode == 0, patched.stderr
    placed = tree / "samm-python-terminal" / "samm-workspace" / "vit_b_medicosam.pt"
    assert placed.is_file()
    manifest = json.loads((tree / STATE_DIR / "manifest.json").read_text("utf-8"))
    assert list(manifest["checkpoints"]) == ["samm-python-terminal/samm-workspace/vit_b_medicosam.pt"]
    status = json.loads(_cli("status", "samm", "--path", "../S4", "--json", cwd=work / "sub").stdout)
    assert status["patched"] and status["checkpoints"] == [
        {"path": str(placed), "entry": "medicosam_vit_b", "present": True, "matching": True}
    ]
    restored = _cli("unpatch", "samm", "--path", "../S4", cwd=work / "sub")
    assert restored.returncode == 0, restored.stderr
    assert snapshot(tree) == before  # byte-identical, the 375 MB checkpoint gone too
    assert Path(ckpt).is_file()


def test_a_moved_tree_is_still_known(tmp_path, checkpoints):
    tree = copy_fixture("samm/S4", tmp_path / "a")
    before = snapshot(tree)
    patching.patch(ADAPTER, tree, checkpoint=checkpoints["plain"])
    moved = Path(shutil.move(str(tree), str(tmp_path / "elsewhere")))
    st = patching.status(ADAPTER, moved)
    assert st["patched"] and st["checkpoints"][0]["matching"]
    patching.unpatch(ADAPTER, moved)
    assert snapshot(moved) == before


def test_recovery_from_another_folder_finishes_the_whole_commit(tmp_path, monkeypatch, checkpoints):
    """Killed after the journal was written, with a relative --path; finished from elsewhere."""
    reference = copy_fixture("samm/S4", tmp_path / "ref")
    first_with_journal = []

    class Probe(engine._Steps):
        def __call__(self) -> None:
            super().__call__()
            if not first_with_journal and (reference / STATE_DIR / engine.JOURNAL).exists():
                first_with_journal.append(self.n)

    monkeypatch.setattr(engine, "_Steps", Probe)
    patching.patch(ADAPTER, reference, checkpoint=checkpoints["plain"])
    work = tmp_path / "work"
    tree = copy_fixture("samm/S4", work)
    (work / "deeper" / "still").mkdir(parents=True)
    killed = _cli("patch", "samm", "--path", "S4", "--checkpoint", checkpoints["plain"], cwd=work,
                  env={KILL_AT_ENV: str(first_with_journal[0] + 1)})  # one file already replaced
    assert killed.returncode != 0 and (tree / STATE_DIR / engine.JOURNAL).exists()
    assert _source(tree) not in (_source(reference), _source(copy_fixture("samm/S4", tmp_path / "orig")))
    done = _cli("patch", "samm", "--path", "../../S4", "--checkpoint", checkpoints["plain"], cwd=work / "deeper" / "still")
    assert done.returncode == 0, done.stderr
    assert "completed an interrupted patch" in done.stdout
    assert _source(tree) == _source(reference)
    assert not list(tree.rglob("*" + fsio.TMP_SUFFIX))
