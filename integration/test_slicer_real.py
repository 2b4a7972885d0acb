"""The SlicerSegmentWithSAM adapter on a real checkout: ``MEDICO_SLICER_SWS_SRC=/path pytest integration``.

The checkout is copied to tmp, patched, re-patched and unpatched byte for byte; the patched module is
parsed and its MedicoSAM branch (W2) or hard-wired model (W1) checked.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from medico_adapters.adapters import slicer_sws
from medico_adapters.patching import patch, status, unpatch

SRC = os.environ.get("MEDICO_SLICER_SWS_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="set MEDICO_SLICER_SWS_SRC to a SlicerSegmentWithSAM checkout to run")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.py"))}


def test_real_checkout(tmp_path):
    from segment_anything import build_sam_vit_b

    root = tmp_path / "sws"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns(".git"))
    ckpt = tmp_path / "medicosam.pt"
    torch.save(build_sam_vit_b().state_dict(), ckpt)
    before = _snapshot(root)
    result = patch(slicer_sws.ADAPTER, root, checkpoint=ckpt)
    text = (root / slicer_sws.SOURCE_MODULE).read_text()
    if result.layout == "W2":
        assert 'addItem("MedicoSAM (ViT-B)")' in text and 'modelName == "MedicoSAM (ViT-B)"' in text
        assert Path(result.placed[0]) == root / "model_checkpoints" / "vit_b_medicosam.pt"
    else:
        assert 'self.modelName = "vit_b_medicosam.pt"' in text
        assert Path(result.placed[0]) == root / "vit_b_medicosam.pt"
    assert patch(slicer_sws.ADAPTER, root).changed == []
    assert status(slicer_sws.ADAPTER, root)["patched"]
    unpatch(slicer_sws.ADAPTER, root)
    assert _snapshot(root) == before
