"""The SlicerSegmentWithSAM adapter on a real checkout: ``MEDICO_SLICER_SWS_SRC=/path pytest integration``.

The checkout is copied to tmp, patched, re-patched and unpatched byte for byte. For W2 the real
patched module runs outside Slicer (light stand-ins for its GUI modules, the real segment_anything
and torch) and its own ``changeModel("MedicoSAM (ViT-B)")`` builds the predictor; for W1 the
hard-wired model attributes are checked.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from medico_adapters.adapters import slicer_sws
from medico_adapters.patching import patch, status, unpatch
from tests.helpers import slicer_stand_ins

SRC = os.environ.get("MEDICO_SLICER_SWS_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="set MEDICO_SLICER_SWS_SRC to a SlicerSegmentWithSAM checkout to run")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.py"))}


def test_real_checkout(tmp_path, monkeypatch):
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
        _run_change_model(root, text, ckpt, monkeypatch)
    else:
        assert 'self.modelName = "vit_b_medicosam.pt"' in text
        assert Path(result.placed[0]) == root / "vit_b_medicosam.pt"
    assert patch(slicer_sws.ADAPTER, root).changed == []
    assert status(slicer_sws.ADAPTER, root)["patched"]
    unpatch(slicer_sws.ADAPTER, root)
    assert _snapshot(root) == before


def _run_change_model(root: Path, text: str, ckpt: Path, monkeypatch) -> None:
    """Execute the real patched module and its own changeModel, as Slicer would on selection."""
    from segment_anything import SamPredictor, sam_model_registry

    module_dir = root / "SegmentWithSAM"
    with monkeypatch.context() as patched:
        slicer_stand_ins(patched, module_dir)
        namespace: dict = {"__name__": "SegmentWithSAM"}
        exec(compile(text, str(module_dir / "SegmentWithSAM.py"), "exec"), namespace)
    # what the widget's __init__ puts in place before any model is chosen
    namespace.update(sam_model_registry=sam_model_registry, SamPredictor=SamPredictor, torch=torch)
    widget = object.__new__(namespace["SegmentWithSAMWidget"])
    widget.device = torch.device("cpu")
    widget.checkpointFolder = widget.resourcePath("UI") + "/../../../model_checkpoints/"
    widget.changeModel("MedicoSAM (ViT-B)")
    expected = torch.load(ckpt, weights_only=True)
    loaded = widget.sam.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert Path(widget.modelCheckpoint).resolve() == root / "model_checkpoints" / "vit_b_medicosam.pt"
