"""A corpus of bad inputs across the commands: each one exits non-zero with one line on stderr
that names the file (or argument) and the reason, prints no traceback, and changes nothing."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from medico_adapters.cli import main
from tests.helpers import copy_fixture


class _RunsCommand:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _ckpt_cases(tmp: Path, good: dict, vit_b_state: dict) -> dict:
    """name -> (argv, text the error line must contain)."""
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "random.pt").write_bytes(os.urandom(4096))
    with zipfile.ZipFile(tmp / "notorch.pt", "w") as z:
        z.writestr("hello.txt", "hi")
    data = good["plain"].read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 3])
    torch.save({"payload": _RunsCommand()}, tmp / "evil.pt")
    torch.save({"lr": 0.1, "name": "model"}, tmp / "nontensor.pt")
    torch.save({"backbone.weight": torch.zeros(2)}, tmp / "notsam.pt")
    torch.save([torch.zeros(1)], tmp / "list.pt")
    torch.save({k: v for k, v in vit_b_state.items() if "mask_decoder" not in k}, tmp / "partial.pt")
    (tmp / "adir").mkdir()
    plain = str(good["plain"])
    return {
        "missing": (["check", str(tmp / "nope.pt")], "no such file"),
        "directory": (["check", str(tmp / "adir")], "is a directory"),
        "empty": (["check", str(tmp / "empty.pt")], "empty"),
        "random-bytes": (["check", str(tmp / "random.pt")], "not a"),
        "zip-not-torch": (["check", str(tmp / "notorch.pt")], "not a PyTorch file"),
        "truncated": (["export", str(tmp / "truncated.pt"), "-o", str(tmp / "out.pt")], "truncated"),
        "code-executing-pickle": (["check", str(tmp / "evil.pt")], "--trust-checkpoint"),
        "dict-of-non-tensors": (["check", str(tmp / "nontensor.pt")], "not a SAM checkpoint"),
        "non-sam-tensors": (["check", str(tmp / "notsam.pt")], "not a SAM checkpoint"),
        "pickled-list": (["check", str(tmp / "list.pt")], "holds a list"),
        "incomplete-state-dict": (["export", str(tmp / "partial.pt"), "-o", str(tmp / "out.pt")], "missing"),
        "wrong-arch": (["export", plain, "-o", str(tmp / "out.pt"), "--model-type", "vit_l"], "vit_l was asked for"),
        "check-wrong-arch": (["check", plain, "--model-type", "vit_h"], "model type vit_h given"),
        "export-into-directory": (["export", plain, "-o", str(tmp / "adir")], "is a directory"),
        "decoder-missing": (["export", plain, "-o", str(tmp / "out.pt"), "--decoder-out", str(tmp / "d.pt")], "no decoder_state"),
        "fetch-unknown-model": (["fetch", "sam3_vit_x"], "unknown model"),
        "fetch-from-missing-file": (["fetch", "vit_b_medical_imaging", "--from-file", str(tmp / "nope.pt")], "no such file"),
        "fetch-hash-mismatch": (["fetch", "vit_b_medical_imaging", "--from-file", plain], "does not match"),
    }


def _tree_cases(tmp: Path, good: dict) -> dict:
    plain = str(good["plain"])
    (tmp / "emptydir").mkdir()
    (tmp / "afile").write_text("x")
    unknown = tmp / "unknown" / "napari_sam"
    unknown.mkdir(parents=True)
    (unknown / "_widget.py").write_text("MODELS = {}\n")
    computed = tmp / "computed" / "napari_sam"
    computed.mkdir(parents=True)
    (computed / "_widget.py").write_text("SAM_MODELS = load()\n")
    broken = tmp / "broken" / "napari_sam"
    broken.mkdir(parents=True)
    (broken / "_widget.py").write_text("SAM_MODELS = {\n")
    n3 = copy_fixture("napari_sam/N3", tmp / "n3")
    damaged = copy_fixture("napari_sam/N2", tmp / "damaged")
    (damaged / ".medico-adapters").mkdir()
    (damaged / ".medico-adapters" / "manifest.json").write_text("{not json")
    escaping = copy_fixture("napari_sam/N2", tmp / "escaping")
    outside = tmp / "outside_widget.py"
    outside.write_bytes((escaping / "napari_sam" / "_widget.py").read_bytes())
    (escaping / "napari_sam" / "_widget.py").unlink()
    try:
        (escaping / "napari_sam" / "_widget.py").symlink_to(outside)
    except OSError:  # Windows without the symlink privilege: the case is skipped below
        escaping = None
    slicer = copy_fixture("slicer_sws/W2", tmp / "w2")
    samm = copy_fixture("samm/S4", tmp / "s4")
    return {
        "unknown-tool": (["patch", "gimp", "--path", str(n3)], "unknown tool 'gimp'"),
        "missing-tree": (["patch", "napari-sam", "--path", str(tmp / "nowhere")], "no such folder"),
        "tree-is-a-file": (["patch", "napari-sam", "--path", str(tmp / "afile")], "is not a folder"),
        "empty-tree-napari": (["patch", "napari-sam", "--path", str(tmp / "emptydir")], "no napari_sam/_widget.py"),
        "empty-tree-samm": (["patch", "samm", "--path", str(tmp / "emptydir")], str(tmp / "emptydir")),
        "empty-tree-slicer": (["patch", "slicer-segment-with-sam", "--path", str(tmp / "emptydir")], str(tmp / "emptydir")),
        "unknown-layout": (["patch", "napari-sam", "--path", str(unknown.parent), "--checkpoint", plain], "neither SAM_MODELS nor SAM_WEIGHTS_URL"),
        "computed-sam-models": (["patch", "napari-sam", "--path", str(computed.parent), "--checkpoint", plain], "computed"),
        "syntax-error": (["patch", "napari-sam", "--path", str(broken.parent), "--checkpoint", plain], "cannot parse"),
        "unpatch-unpatched": (["unpatch", "napari-sam", "--path", str(n3)], "not patched"),
        "damaged-manifest": (["patch", "napari-sam", "--path", str(damaged), "--checkpoint", plain], "damaged manifest"),
        "name-without-checkpoint": (["patch", "napari-sam", "--path", str(n3), "--name", "Mine"], "--name needs --checkpoint"),
        "duplicate-name": (["patch", "napari-sam", "--path", str(n3), "--checkpoint", plain, "--name", "vit_b"], "already has an entry"),
        "empty-name": (["patch", "napari-sam", "--path", str(n3), "--checkpoint", plain, "--name", " "], "empty"),
        "sam2-name-slicer": (["patch", "slicer-segment-with-sam", "--path", str(slicer), "--checkpoint", plain, "--name", "My SAM-2"], "SAM-2"),
        "prefix-name-samm": (["patch", "samm", "--path", str(samm), "--checkpoint", plain, "--name", "vit_custom"], "prefix"),
        "symlink-leaving-tree": (["patch", "napari-sam", "--path", str(escaping), "--checkpoint", plain], "outside the tool's tree")
        if escaping else None,
        "checkpoint-not-sam": (["patch", "napari-sam", "--path", str(n3), "--checkpoint", str(tmp / "afile")], "afile"),
        # samm ships no samm-workspace/: the folder made for the checkpoint must go with it
        "checkpoint-not-sam-samm": (["patch", "samm", "--path", str(samm), "--checkpoint", str(tmp / "afile")], "afile"),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, checkpoints, vit_b_state):
    tmp = tmp_path_factory.mktemp("bad")
    cases = {**_ckpt_cases(tmp, checkpoints, vit_b_state), **_tree_cases(tmp, checkpoints)}
    return tmp, cases


CASE_NAMES = [
    "missing", "directory", "empty", "random-bytes", "zip-not-torch", "truncated", "code-executing-pickle",
    "dict-of-non-tensors", "non-sam-tensors", "pickled-list", "incomplete-state-dict", "wrong-arch",
    "check-wrong-arch", "export-into-directory", "decoder-missing", "fetch-unknown-model",
    "fetch-from-missing-file", "fetch-hash-mismatch", "unknown-tool", "missing-tree", "tree-is-a-file",
    "empty-tree-napari", "empty-tree-samm", "empty-tree-slicer", "unknown-layout", "computed-sam-models",
    "syntax-error", "unpatch-unpatched", "damaged-manifest", "name-without-checkpoint", "duplicate-name",
    "empty-name", "sam2-name-slicer", "prefix-name-samm", "symlink-leaving-tree", "checkpoint-not-sam",
    "checkpoint-not-sam-samm",
]


def _disk(root: Path) -> dict:
    """Every file under ``root`` but the kit's own cache of derived data (MEDICO_ADAPTERS_CACHE)."""
    cache = os.environ.get("MEDICO_ADAPTERS_CACHE", "\0")
    return {
        str(p): p.read_bytes() if p.is_file() and not p.is_symlink() else None
        for p in sorted(root.rglob("*"))
        if not str(p).startswith(cache)
    }


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input(case, corpus, capsys, _isolated_home):
    tmp, cases = corpus
    if cases[case] is None:
        pytest.skip("this machine cannot create symlinks (Windows without the privilege)")
    argv, needle = cases[case]
    before, home_before = _disk(tmp), _disk(_isolated_home)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("medico-adapters: error: "), err
    assert "Traceback" not in err
    assert needle in err, err
    assert _disk(tmp) == before
    assert _disk(_isolated_home) == home_before


def test_corpus_is_large_enough(corpus):
    assert len(set(CASE_NAMES)) == len(corpus[1]) >= 30


def test_json_output_is_one_object(checkpoints, capsys):
    assert main(["check", str(checkpoints["training"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "training" and data["arch"] == "vit_b" and data["decoder"] is True
