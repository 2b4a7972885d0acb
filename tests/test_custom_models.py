"""Issue 9: any SAM-1 checkpoint under a user-chosen name, built with the right builder."""

from __future__ import annotations

import pytest
import torch

from medico_adapters import patching
from medico_adapters.adapters.napari_sam import ADAPTER
from tests.helpers import FakeViewer, copy_fixture, import_fresh, snapshot


@pytest.fixture(scope="module")
def vit_l_training_ckpt(tmp_path_factory):
    from segment_anything import build_sam_vit_l

    torch.manual_seed(1)
    state = build_sam_vit_l().state_dict()
    path = tmp_path_factory.mktemp("vitl") / "lung_vit_l_training.pt"
    torch.save({"model_state": {f"module.sam.{k}": v for k, v in state.items()}, "epoch": 7}, path)
    return path, state


def test_vit_l_entry_beside_medicosam_loads_through_widget_code(tmp_path, checkpoints, vit_b_state, vit_l_training_ckpt, _isolated_home):
    path, vit_l_state = vit_l_training_ckpt
    root = copy_fixture("napari_sam/N3", tmp_path)
    original = snapshot(root)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    result = patching.patch(ADAPTER, root, checkpoint=path, name="Lung ViT-L")
    assert [e.name for e in result.entries] == ["MedicoSAM", "Lung ViT-L"]
    assert result.entries[1].arch == "vit_l" and result.entries[1].filename == "vit_l_lung_vit_l.pt"

    widget_module = import_fresh(root / "src", "napari_sam._widget")
    widget = widget_module.SamWidget(FakeViewer())
    names = widget.model_names()
    assert names[-2:] == ["MedicoSAM", "Lung ViT-L"]
    widget._load_model(names.index("Lung ViT-L"))
    loaded = widget.sam_model.state_dict()
    assert loaded["image_encoder.patch_embed.proj.weight"].shape[0] == 1024
    assert all(torch.equal(v, vit_l_state[k]) for k, v in loaded.items())
    widget._load_model(names.index("MedicoSAM"))
    assert all(torch.equal(v, vit_b_state[k]) for k, v in widget.sam_model.state_dict().items())

    listed = patching.status(ADAPTER, root)
    assert [e["name"] for e in listed["entries"]] == ["MedicoSAM", "Lung ViT-L"]
    assert all(c["matching"] for c in listed["checkpoints"])

    patching.unpatch(ADAPTER, root)
    assert snapshot(root) == original
    assert not any((_isolated_home / ".cache/napari-segment-anything").iterdir())
