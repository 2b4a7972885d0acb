"""micro-sam's own code with the kit: its loader takes MedicoSAM (the exported and the training-format
file), and its precompute_image_embeddings and annotators open embeddings the kit precomputed."""

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


# -- embeddings the kit precomputed, opened by micro-sam's own code --------------------------------
@pytest.fixture
def ct_file(tmp_path):
    """A few slices of the CT phantom, saved as a user's NIfTI; its raw voxels are what micro-sam gets."""
    import dataclasses

    from medico_adapters import phantom

    ph = phantom.make_phantom((8, 64, 64), seed=4)
    path = tmp_path / "ct.nii.gz"
    phantom.write(dataclasses.replace(ph, volume=ph.volume[3:6], labels=ph.labels[3:6]), path)
    return path, (1, *ph.landmarks["liver"][1:])


def _refuse(*args, **kwargs):
    raise AssertionError("the image encoder was called")


def test_micro_sam_opens_the_kits_embeddings_without_its_encoder(ct_file, checkpoints, tmp_path, monkeypatch):
    """The kit writes micro-sam's embedding file for the raw volume; micro-sam's
    precompute_image_embeddings and its annotators' AnnotatorState open it with the encoder made
    to raise, and its mask from a point equals the kit's segment (which reads the same entries)."""
    import warnings

    import numpy as np
    import SimpleITK as sitk
    from micro_sam import prompt_based_segmentation
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    from medico_adapters.embeddings import microsam
    from medico_adapters.embeddings.store import EmbeddingStore
    from medico_adapters.io import read_image
    from medico_adapters.predictor import Predictor
    from medico_adapters.segment import segment

    path, (z, y, x) = ct_file
    raw = read_image(path).array
    for k in range(raw.shape[0]):  # the kit's pixels are micro-sam's own
        np.testing.assert_array_equal(microsam.to_image(raw[k]), util._to_image(raw[k]))
    store = EmbeddingStore(tmp_path / "store")
    kit = Predictor(checkpoints["plain"], device="cpu", backend="torch")
    written = microsam.write_embeddings(raw, tmp_path / "ct.zarr", kit, store=store)
    assert written["computed"] == raw.shape[0]
    microsam.write_embeddings(raw[z], tmp_path / "slice.zarr", kit, store=store)  # 2D: from the store

    predictor = util.get_sam_model(model_type="vit_b", checkpoint_path=str(checkpoints["plain"]), device="cpu")
    own = util.precompute_image_embeddings(predictor, raw[z], ndim=2, verbose=False)  # micro-sam computing itself
    entry = store.get(store.key(kit.store_model, microsam.to_image(raw[z])))
    assert np.abs(np.asarray(own["features"]) - entry).max() <= 1e-4

    monkeypatch.setattr(ImageEncoderViT, "forward", _refuse)
    with pytest.raises(AssertionError, match="image encoder was called"):  # the trap works on micro-sam's path
        util.precompute_image_embeddings(predictor, raw[z] + 1, ndim=2, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = util.precompute_image_embeddings(predictor, raw, save_path=str(tmp_path / "ct.zarr"), ndim=3, verbose=False)
        image = util.precompute_image_embeddings(predictor, raw[z], save_path=str(tmp_path / "slice.zarr"), ndim=2, verbose=False)
    assert not [w for w in caught if "signature" in str(w.message)]  # model name, hash and version match
    np.testing.assert_array_equal(np.asarray(image["features"]), entry)

    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    from micro_sam.sam_annotator._state import AnnotatorState

    state = AnnotatorState()
    state.initialize_predictor(raw, model_type="vit_b", ndim=3, save_path=str(tmp_path / "ct.zarr"), predictor=predictor)
    assert state.data_signature == microsam.data_signature(raw)

    mask = prompt_based_segmentation.segment_from_points(predictor, np.array([[y, x]]), np.array([1]), volume, i=z)
    report = segment(path, tmp_path / "mask.nii.gz", points=[(z, y, x)], window="microsam", checkpoint=checkpoints["plain"],
                     backend="torch", store=tmp_path / "store", propagate_masks=False, progress=False)
    assert report["embeddings"] == {"computed": 0, "from_cache": 1, "store": str(tmp_path / "store")}
    kit_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.nii.gz")))[z].astype(bool)
    assert mask.shape == (1, *raw.shape[1:]) and mask[0].any()
    np.testing.assert_array_equal(mask[0], kit_mask)
