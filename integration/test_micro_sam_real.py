"""micro-sam's own loader takes MedicoSAM: the exported file and the training-format file."""

from __future__ import annotations

import pytest
import torch

from medico_adapters import checkpoint, registry
from medico_adapters.adapters import micro_sam as adapter

util = pytest.importorskip("micro_sam.util", reason="micro-sam is not installed (nox -t micro-sam)")


@pytest.mark.parametrize("kind", ["training", "exported"])
def test_get_sam_model_loads_medicosam(kind, checkpoints, vit_b_state, tmp_path):
    path = checkpoints["training"]
    if kind == "exported":
        path = tmp_path / "vit_b_medicosam.pt"
        checkpoint.export_checkpoint(checkpoints["training"], path)
    predictor, sam = util.get_sam_model(model_type="vit_b", checkpoint_path=str(path), device="cpu", return_sam=True)
    for key, value in sam.state_dict().items():
        assert torch.equal(value, vit_b_state[key]), key


def test_patch_explains_custom_weights_for_unpublished_files(checkpoints):
    result = adapter.patch(checkpoints["training"])
    assert result["mode"] == "custom-weights" and result["placed"] == []
    assert "checkpoint_path=" in result["message"]
    assert adapter.status()["ready"] is False


def test_registry_names_match_micro_sam(monkeypatch):
    models = util.models()
    for name in adapter.NAMES:
        assert models.registry[name] == registry.HASHES[name]
        assert models.urls[name] == registry.URLS[name]
