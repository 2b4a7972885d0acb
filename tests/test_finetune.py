"""Issue 20 end to end: ``medico-adapters finetune`` as a user runs it, resumed after kill -9 and
Ctrl-C to the same weights, refused on bad data with nothing written, and the trained model loaded
by a patched tool's own code.

Weights are the random ViT-B stand-in: this proves the plumbing and the loop, not accuracy. Every
test shares one embedding store (the slices are embedded once for the module).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medico_adapters import phantom
from medico_adapters.training.finetune import FinetuneSettings, finetune
from tests.helpers import FakeViewer, copy_fixture, import_fresh

SHAPE = (8, 48, 48)
#: fast settings: one slice per case, few cheap steps
FAST = ["--objects", "liver,bone", "--slices-per-case", "1", "--val-fraction", "0.25", "--backend", "torch",
        "--objects-per-step", "1", "--rounds", "2", "--val-every", "4"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    phantom.write_cohort(root / "data", 4, SHAPE)
    return root


@pytest.fixture(scope="module")
def store(cohort):
    return cohort / "store"


def cli(*args, cwd=None, env=None, **kwargs):
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "medico_adapters", *map(str, args)], cwd=cwd, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finished(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_finetune_cli_writes_a_checkpoint_every_tool_loads(tmp_path, cohort, store, checkpoints, vit_b_state):
    from segment_anything import build_sam_vit_b

    work = tmp_path / "here"
    work.mkdir()
    rc, out, err = finished(cli("finetune", os.path.relpath(cohort / "data", work), "-o", "runs/liver.pt",
                                "--checkpoint", checkpoints["training"], "--store", store, "--iterations", "6", *FAST,
                                "--json", cwd=work))
    assert rc == 0, err
    report = json.loads(out)
    assert report["steps"] == 6 and report["stopped"] == "iterations" and report["mode"] == "decoder"
    assert report["split"]["val"] and not set(report["split"]["val"]) & set(report["split"]["train"])
    before, after = report["evaluation"]["before"], report["evaluation"]["after"]
    assert set(before["point"]["per_object"]) == {"liver", "bone"} and len(after["iterative"]["by_clicks"]) == 9
    runs = work / "runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted([
        "liver.pt", "liver.json", "liver-report.md", "liver-report.json", "liver-curves.png", "liver-slices.png",
        "liver-train"])
    # the output is a plain state dict: segment_anything's own builder loads it (weights_only)
    sam = build_sam_vit_b(checkpoint=str(runs / "liver.pt"))
    trained = sam.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in vit_b_state.items() if k.startswith("image_encoder."))
    assert any(not torch.equal(trained[k], v) for k, v in vit_b_state.items() if k.startswith("mask_decoder."))
    record = json.loads((runs / "liver.json").read_text(encoding="utf-8"))
    assert record["base_checkpoint"]["path"] == str(checkpoints["training"]) and record["seed"] == 0
    assert record["history"]["val"][-1][0] == 6 and len(record["history"]["loss"]) == 6
    assert record["data"]["root"] == str(cohort / "data")
    md = (runs / "liver-report.md").read_text(encoding="utf-8")
    assert "![curves](liver-curves.png)" in md and "| **mean** |" in md
    for png in ("liver-curves.png", "liver-slices.png"):
        assert (runs / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check = subprocess.run([sys.executable, "-m", "medico_adapters", "check", runs / "liver.pt"], capture_output=True, text=True)
    assert check.returncode == 0 and "loadable: yes" in check.stdout
    assert "trained:  medico-adapters finetune (decoder, 6 steps" in check.stdout

    # a second run into the same place must be asked for explicitly
    rc, _, err = finished(cli("finetune", cohort / "data", "-o", runs / "liver.pt", "--checkpoint", checkpoints["plain"],
                              "--store", store, "--iterations", "6", *FAST))
    assert rc == 1 and "holds a training run; pass --resume" in err and err.count("\n") == 1


def _settings(**kw) -> FinetuneSettings:
    base = dict(objects=("liver", "bone"), slices_per_case=1, val_fraction=0.25, objects_per_step=1, rounds=2,
                val_every=4, iterations=24, checkpoint_every=2)
    return FinetuneSettings(**{**base, **kw})


def _wait_for_step(folder: Path, proc, at_least: int) -> int:
    from medico_adapters.training.loop import load_state

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted: {proc.stderr.read()[-800:]}")
        try:
            state = load_state(folder)
        except Exception:
            state = None
        if state is not None and state["step"] >= at_least:
            return state["step"]
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared")


@pytest.mark.skipif(os.name == "nt", reason="kill -9 and SIGINT are POSIX signals")
def test_resume_after_kill_and_ctrl_c_ends_with_the_same_weights(tmp_path, cohort, store, checkpoints):
    reference = finetune(cohort / "data", tmp_path / "straight" / "m.pt", checkpoint=checkpoints["plain"],
                         settings=_settings(), store_root=store, backend="torch", progress=False)
    assert reference["steps"] == 24
    args = ["finetune", cohort / "data", "-o", tmp_path / "broken" / "m.pt", "--checkpoint", checkpoints["plain"],
            "--store", store, "--iterations", "24", "--checkpoint-every", "2", *FAST]

    proc = cli(*args)
    killed_at = _wait_for_step(tmp_path / "broken" / "m-train", proc, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_at < 24 and not (tmp_path / "broken" / "m.pt").exists()

    proc = cli(*args, "--resume")
    _wait_for_step(tmp_path / "broken" / "m-train", proc, killed_at + 4)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: saved, and the user is told how to go on
    rc, _, err = finished(proc)
    assert rc == 130 and "run the same command with --resume" in err

    rc, out, err = finished(cli(*args, "--resume", "--json"))
    assert rc == 0, err
    resumed = torch.load(tmp_path / "broken" / "m.pt", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "m.pt", weights_only=True)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight), "resumed weights differ"
    record = json.loads((tmp_path / "broken" / "m.json").read_text(encoding="utf-8"))
    assert record["resumed_from"] >= killed_at + 4 and record["history"]["loss"] == json.loads(
        (tmp_path / "straight" / "m.json").read_text(encoding="utf-8"))["history"]["loss"]


@pytest.mark.parametrize("problem", ["shape", "resume-nothing"])
def test_a_failed_start_writes_nothing(tmp_path, cohort, store, checkpoints, problem):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cohort / "data", data)
    if problem == "shape":
        bad = data / "labelsTr" / "phantom_002.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 40, 48), np.uint8)), str(bad))
    extra = ["--resume"] if problem == "resume-nothing" else []
    rc, out, err = finished(cli("finetune", data, "-o", tmp_path / "out" / "m.pt", "--checkpoint", checkpoints["plain"],
                                "--store", tmp_path / "store", *FAST, *extra))
    assert rc == 1 and out == "" and err.count("\n") == 1
    expected = f"{bad}: shape (8, 40, 48) differs" if problem == "shape" else "nothing to resume"
    assert expected in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


def test_finetuned_model_patched_into_napari_sam_segments_like_the_kit(tmp_path, cohort, store, checkpoints, _isolated_home):
    from medico_adapters.predictor import Predictor

    root = copy_fixture("napari_sam/N3", tmp_path)
    out = tmp_path / "phantom.pt"
    rc, stdout, err = finished(cli("finetune", cohort / "data", "-o", out, "--checkpoint", checkpoints["plain"],
                                   "--store", store, "--iterations", "4", *FAST,
                                   "--patch", "napari-sam", "--path", root, "--name", "Phantom organs",
                                   env={"HOME": str(_isolated_home)}))
    assert rc == 0, err
    assert "entries: MedicoSAM, Phantom organs" in stdout or "entries: Phantom organs" in stdout

    widget_module = import_fresh(root / "src", "napari_sam._widget")
    widget = widget_module.SamWidget(FakeViewer())
    names = widget.model_names()
    assert names[-1] == "Phantom organs"
    widget._load_model(names.index("Phantom organs"))  # the tool's own loader
    trained = torch.load(out, weights_only=True)
    assert all(torch.equal(v, trained[k]) for k, v in widget.sam_model.state_dict().items())

    ph = phantom.make_phantom(SHAPE, seed=3, anatomy=phantom.vary(3))
    image = np.repeat(phantom.window(ph.volume[4])[:, :, None], 3, axis=2)
    click = np.array([[20.0, 24.0]]), np.array([1])
    widget.sam_predictor.set_image(image)
    tool_masks, tool_scores, _ = widget.sam_predictor.predict(point_coords=click[0], point_labels=click[1])
    kit = Predictor(out, backend="torch")
    kit.set_image(image)
    kit_masks, kit_scores, _ = kit.predict(point_coords=click[0], point_labels=click[1])
    assert np.allclose(tool_scores, kit_scores, atol=1e-4)
    assert (tool_masks != kit_masks).mean() < 1e-3  # the same masks, but for ties at the threshold


def test_lora_training_merges_into_a_plain_state_dict(tmp_path, cohort, store, checkpoints, vit_b_state):
    out = tmp_path / "lora.pt"
    said = []
    result = finetune(cohort / "data", out, checkpoint=checkpoints["plain"], store_root=store, backend="torch",
                      settings=_settings(mode="lora", iterations=1, lora_rank=2, checkpoint_every=None), progress=False,
                      say=said.append)
    assert any("runs the image encoder in every step" in line for line in said)  # the CPU warning, first
    assert any(line.startswith("the first step took ") for line in said)  # and the time it measured
    assert result["steps"] == 1 and result["evaluation"]["after"]["point"]["mean"] is not None
    state = torch.load(out, weights_only=True)
    assert state.keys() == vit_b_state.keys()  # no adapter tensors left: merged
    changed = [k for k in vit_b_state if not torch.equal(state[k], vit_b_state[k])]
    assert any(k.endswith("attn.qkv.weight") for k in changed) and any(k.startswith("mask_decoder.") for k in changed)
    frozen = [k for k in changed if k.startswith("image_encoder.") and not k.endswith(("attn.qkv.weight", "attn.proj.weight"))]
    assert frozen == []  # only the adapted projections moved in the encoder
