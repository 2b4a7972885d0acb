"""The CLI as a user runs it: a real subprocess, exact exit codes, stdout and stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import copy_fixture, snapshot


def cli(*args, home=None):
    env = dict(os.environ)
    if home is not None:
        env.update(HOME=str(home), MEDICO_ADAPTERS_CACHE=str(home / "cache"))
    return subprocess.run([sys.executable, "-m", "medico_adapters", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("command", ["models", "fetch", "check", "export", "patch", "unpatch", "status", "install", "segment", "demo"])
def test_every_command_has_help_with_an_example(command):
    proc = cli(command, "--help")
    assert proc.returncode == 0 and "example:" in proc.stdout and "medico-adapters " + command in proc.stdout


def test_models_json_lists_registry(tmp_path):
    proc = cli("models", "--json", home=tmp_path)
    data = json.loads(proc.stdout)
    names = {m["name"] for m in data["models"]}
    assert {"vit_b_medical_imaging", "vit_b_medical_imaging_decoder", "vit_b", "vit_l", "vit_h", "medsam_vit_b"} == names
    assert all(not m["cached"] for m in data["models"])


def test_export_then_check_roundtrip(tmp_path, checkpoints):
    out = tmp_path / "plain.pt"
    proc = cli("export", checkpoints["module_prefixed"], "-o", out)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "plain vit_b state dict" in proc.stdout
    check = json.loads(cli("check", out, "--json").stdout)
    assert check["format"] == "plain" and check["loadable"] and check["arch"] == "vit_b"


def test_patch_status_unpatch_napari_sam(tmp_path, checkpoints):
    home = tmp_path / "home"
    root = copy_fixture("napari_sam/N3", tmp_path)
    before = snapshot(root)

    dry = cli("patch", "napari-sam", "--path", root, "--dry-run", "--diff", home=home)
    assert dry.returncode == 0 and dry.stdout.startswith("--- a/src/napari_sam/_widget.py")
    assert snapshot(root) == before

    first = cli("patch", "napari-sam", "--path", root, "--checkpoint", checkpoints["training"], "--json", home=home)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["layout"] == "N3" and data["changed"] == ["src/napari_sam/_widget.py"]
    placed = home / ".cache/napari-segment-anything/vit_b_medicosam.pt"
    assert data["placed"] == [str(placed)]
    assert set(torch.load(placed, weights_only=True)) == set(torch.load(checkpoints["plain"], weights_only=True))

    again = cli("patch", "napari-sam", "--path", root, home=home)
    assert again.returncode == 0 and "already patched" in again.stdout

    status = json.loads(cli("status", "napari-sam", "--path", root, "--json", home=home).stdout)
    assert status["patched"] and status["layout"] == "N3" and status["checkpoints"][0]["matching"]

    undo = cli("unpatch", "napari-sam", "--path", root, home=home)
    assert undo.returncode == 0, undo.stderr
    assert snapshot(root) == before and not placed.exists()


def test_micro_sam_cache_placement_needs_the_published_file(tmp_path, checkpoints):
    proc = cli("patch", "micro-sam", "--checkpoint", checkpoints["training"], "--json", home=tmp_path)
    assert proc.returncode == 0
    data = json.loads(proc.stdout)
    assert data["mode"] == "custom-weights" and "checkpoint_path=" in data["message"]
    st = json.loads(cli("status", "micro-sam", "--json", home=tmp_path).stdout)
    assert st["ready"] is False


def test_patch_without_checkpoint_offline_says_how(tmp_path):
    root = copy_fixture("napari_sam/N2", tmp_path)
    env_home = tmp_path / "home"
    proc = subprocess.run(
        [sys.executable, "-m", "medico_adapters", "patch", "napari-sam", "--path", str(root)],
        capture_output=True, text=True,
        env={**os.environ, "HOME": str(env_home), "MEDICO_ADAPTERS_CACHE": str(env_home / "c"),
             "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"},
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "--from-file" in proc.stderr
    assert not (root / ".medico-adapters").exists()


def test_install_git_tool_patches_an_existing_checkout(tmp_path, checkpoints, capsys):
    from medico_adapters.cli import main

    root = copy_fixture("samm/S4", tmp_path)
    assert main(["install", "samm", "--path", str(root), "--checkpoint", str(checkpoints["plain"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "S4" and (root / "samm-python-terminal/samm-workspace/vit_b_medicosam.pt").is_file()


def test_install_git_tool_refuses_pypi_version(capsys):
    from medico_adapters.cli import main

    assert main(["install", "slicer-segment-with-sam", "--version", "1.0"]) == 1
    assert "use --ref COMMIT" in capsys.readouterr().err
