"""Which backend and precision the predictor picks, and what it does when OpenVINO is missing or fails.

Selection is checked with fake CPU flag sets and a fake (absent or present) OpenVINO; the
fallbacks build a real random ViT-B predictor (no embedding: construction alone decides).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from medico_adapters.accel import medico_sam_accel as accel
from medico_adapters.errors import BackendError
from medico_adapters.predictor import BackendWarning, Predictor, choose_backend

AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})  # e.g. AMD Zen 4
AVX2_ONLY = frozenset({"avx", "avx2", "fma"})
APPLE = frozenset({"bf16", "fp16"})  # arm: bf16 exists but OpenVINO/torch gain nothing measured from it


def _picked(plan):
    return plan.backend, plan.precision


@pytest.mark.parametrize(
    ("flags", "openvino", "exact", "expected"),
    [
        (AMX, True, True, ("openvino", "f32")),
        (AMX, True, False, ("openvino", "bf16")),
        (AVX512_BF16, True, False, ("openvino", "bf16")),
        (AVX2_ONLY, True, False, ("openvino", "f32")),
        (AVX2_ONLY, True, True, ("openvino", "f32")),
        (APPLE, True, False, ("openvino", "f32")),
        (frozenset(), True, False, ("openvino", "f32")),  # flags unknown (Windows fallback): f32
        (AMX, False, True, ("torch", "f32")),
        (AMX, False, False, ("torch", "bf16")),
        (AVX2_ONLY, False, False, ("torch", "f32")),
    ],
)
def test_auto_on_a_cpu(flags, openvino, exact, expected):
    plan = choose_backend("auto", "cpu", exact, flags=flags, openvino=openvino)
    assert (plan.backend, plan.precision) == expected
    assert plan.missing_openvino is (not openvino)


def test_explicit_backends_on_a_cpu():
    assert _picked(choose_backend("torch", "cpu", False, flags=AMX, openvino=True)) == ("torch", "bf16")
    assert _picked(choose_backend("openvino", "cpu", True, flags=AVX2_ONLY, openvino=True)) == ("openvino", "f32")
    with pytest.raises(BackendError, match=r"OpenVINO is not installed; pip install 'medico-adapters\[fast\]'"):
        choose_backend("openvino", "cpu", True, flags=AMX, openvino=False)
    with pytest.raises(BackendError, match="backend 'tensorrt': use one of auto, torch, openvino"):
        choose_backend("tensorrt", "cpu")


def test_gpus_use_torch_at_their_fastest_native_dtype():
    assert _picked(choose_backend("auto", "cuda:0", True, openvino=True)) == ("torch", "f32")
    assert _picked(choose_backend("auto", "cuda", False, cuda_bf16=True)) == ("torch", "bf16")
    assert _picked(choose_backend("auto", "cuda", False, cuda_bf16=False)) == ("torch", "f16")
    assert _picked(choose_backend("auto", "mps", False)) == ("torch", "f16")
    assert _picked(choose_backend("auto", "mps", True)) == ("torch", "f32")
    with pytest.raises(BackendError, match="runs on the CPU only, not on cuda"):
        choose_backend("openvino", "cuda", True)


def test_auto_reads_this_machine(monkeypatch):
    monkeypatch.setattr(accel, "cpu_flags", lambda: AMX)
    monkeypatch.setattr(accel, "openvino_version", lambda: None)
    assert _picked(choose_backend("auto", "cpu", False)) == ("torch", "bf16")
    monkeypatch.setattr(accel, "openvino_version", lambda: "2026.4.1")
    assert _picked(choose_backend("auto", "cpu", False)) == ("openvino", "bf16")


# -- fallbacks, with a real predictor ---------------------------------------------------------------
def _sdpa_bound(predictor) -> bool:
    return all("forward" in vars(block.attn) for block in predictor.model.image_encoder.blocks)


def test_without_openvino_auto_uses_torch_and_says_so_once(checkpoints, no_openvino):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = Predictor(checkpoints["plain"], device="cpu")
    said = [w for w in caught if issubclass(w.category, BackendWarning)]
    assert len(said) == 1 and "pip install 'medico-adapters[fast]'" in str(said[0].message)
    assert (predictor.backend, predictor.precision) == ("torch", "f32") and _sdpa_bound(predictor)
    assert predictor.describe()["encoder_cache"] is None
    with pytest.raises(BackendError, match="OpenVINO is not installed"):
        Predictor(checkpoints["plain"], device="cpu", backend="openvino")


def test_torch_backend_asked_for_gives_no_warning(checkpoints, no_openvino):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendWarning)
        predictor = Predictor(checkpoints["plain"], device="cpu", backend="torch")
    assert predictor.backend == "torch" and _sdpa_bound(predictor)


@pytest.mark.skipif(accel.openvino_version() is None, reason="OpenVINO is not installed")
def test_failed_conversion_falls_back_to_torch_with_one_warning(checkpoints, monkeypatch):
    def broken(*_):
        raise RuntimeError("Exception from src/frontends/pytorch: aten::weird is not supported")

    monkeypatch.setattr(accel, "_convert", broken)
    with pytest.warns(BackendWarning) as said:
        predictor = Predictor(checkpoints["plain"], device="cpu", exact=False)
    assert len(said) == 1 and "aten::weird is not supported" in str(said[0].message)
    assert predictor.backend == "torch" and _sdpa_bound(predictor)
    assert "OpenVINO failed (RuntimeError" in predictor.describe()["reason"]


@pytest.fixture
def slice_png(tmp_path):
    import SimpleITK as sitk

    grey = np.zeros((48, 64), np.uint8)
    grey[12:36, 16:40] = 200
    path = tmp_path / "slice.png"
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(path))
    return path


def _segment_cli(tmp_path, *args, block_openvino=False):
    env = dict(os.environ, HOME=str(tmp_path), MEDICO_ADAPTERS_CACHE=str(tmp_path / "cache"))
    if block_openvino:  # a package named openvino that fails to import shadows the real one
        fake = tmp_path / "no-openvino" / "openvino"
        fake.mkdir(parents=True, exist_ok=True)
        (fake / "__init__.py").write_text("raise ImportError('openvino is not installed here')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(fake.parent), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "medico_adapters", "segment", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)


@pytest.mark.slow
def test_segment_cli_reports_the_backend_and_warns_once_without_openvino(tmp_path, checkpoints, slice_png):
    proc = _segment_cli(tmp_path, slice_png.name, "-o", "mask.png", "--point", "24,28", "--checkpoint",
                        checkpoints["plain"], "--json", block_openvino=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["backend"], report["precision"], report["exact"]) == ("torch", "f32", True)
    assert report["warnings"] == [line.removeprefix("medico-adapters: warning: ") for line in proc.stderr.splitlines()]
    assert len(report["warnings"]) == 1 and "medico-adapters[fast]" in report["warnings"][0]
    assert (tmp_path / "mask.png").is_file()

    refused = _segment_cli(tmp_path, slice_png.name, "-o", "mask2.png", "--point", "24,28", "--checkpoint",
                           checkpoints["plain"], "--backend", "openvino", block_openvino=True)
    assert refused.returncode == 1 and not (tmp_path / "mask2.png").exists()
    assert refused.stderr.splitlines() == [
        "medico-adapters: error: backend 'openvino': OpenVINO is not installed; "
        "pip install 'medico-adapters[fast]' or use --backend torch"
    ]


def test_torch_bf16_autocast_only_where_planned(checkpoints, no_openvino, monkeypatch):
    monkeypatch.setattr(accel, "cpu_flags", lambda: AMX)
    fast = Predictor(checkpoints["plain"], device="cpu", exact=False, backend="torch")
    assert fast.precision == "bf16" and fast.identity.endswith("-fast-torch-bf16")
    with fast._autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    exact = Predictor(checkpoints["plain"], device="cpu", backend="torch")
    assert exact.identity.endswith("-exact")
    with exact._autocast():
        assert not torch.is_autocast_enabled("cpu")
