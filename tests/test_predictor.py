"""Predictor agreement with SamPredictor, the embedding store, propagation and segment().

A random ViT-B (fixed seed, random relative-position tables so the bias path matters) stands in
for MedicoSAM: it checks that the faster code computes the same thing, not segmentation accuracy.
Full-size embeddings cost seconds, so the models and embeddings are module-scoped.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medico_adapters.accel import medico_sam_accel as accel
from medico_adapters.embeddings.store import EmbeddingStore
from medico_adapters.errors import CheckpointError, ImageError
from medico_adapters.predictor import Embedding, Predictor
from medico_adapters.segment import VolumePredictor, propagate, segment

IMAGE = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
POINTS = np.array([[40.0, 30.0], [90.0, 60.0]])
LABELS = np.array([1, 0])
BOX = np.array([20.0, 10.0, 100.0, 80.0])


@pytest.fixture(scope="module")
def sam_and_path(tmp_path_factory):
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    sam = build_sam_vit_b().eval()
    with torch.no_grad():
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(std=0.05)
            block.attn.rel_pos_w.normal_(std=0.05)
    path = tmp_path_factory.mktemp("ckpt") / "random_vit_b.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


@pytest.fixture(scope="module")
def reference(sam_and_path):
    from segment_anything import SamPredictor

    ref = SamPredictor(sam_and_path[0])
    ref.set_image(IMAGE)
    return ref


@pytest.fixture(scope="module")
def encoder_cache(tmp_path_factory):
    """A kit cache shared by this module's predictors, so a second start can find the first's encoder."""
    return tmp_path_factory.mktemp("kit-cache")


@pytest.fixture(scope="module")
def exact(sam_and_path, encoder_cache):
    """The default predictor: OpenVINO f32 where it is installed, torch with SDPA otherwise."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDICO_ADAPTERS_CACHE", str(encoder_cache))
        predictor = Predictor(sam_and_path[1], device="cpu")
    predictor.set_image(IMAGE)
    return predictor


@pytest.mark.slow
def test_exact_embedding_matches_sam_predictor(reference, exact):
    assert (exact.backend, exact.precision) == ("openvino" if accel.openvino_version() else "torch", "f32")
    ref = reference.get_image_embedding()
    mine = exact.get_image_embedding()
    assert mine.shape == ref.shape == (1, 256, 64, 64)
    assert (mine - ref).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_torch_backend_embedding_matches_sam_predictor(reference, decoder_pair):
    _, torch_predictor = decoder_pair
    assert torch_predictor.backend == "torch"
    mine = torch_predictor.embed(IMAGE).features
    assert (mine - reference.get_image_embedding()).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.skipif(accel.openvino_version() is None, reason="OpenVINO is not installed")
def test_second_start_loads_the_compiled_encoder(sam_and_path, exact, encoder_cache, monkeypatch):
    assert exact.describe()["encoder_cache"].startswith("wrote ")
    monkeypatch.setenv("MEDICO_ADAPTERS_CACHE", str(encoder_cache))
    monkeypatch.setattr(accel, "_convert", lambda *_: pytest.fail("converted again instead of loading"))
    again = Predictor(sam_and_path[1], device="cpu")
    assert again.describe()["encoder_cache"] == exact.describe()["encoder_cache"].replace("wrote ", "loaded ", 1)
    assert torch.equal(again.embed(IMAGE).features, exact.get_image_embedding())


@pytest.mark.slow
@pytest.mark.parametrize(
    "prompt",
    [
        {"point_coords": POINTS, "point_labels": LABELS},
        {"box": BOX},
        {"point_coords": POINTS[:1], "point_labels": LABELS[:1], "box": BOX, "multimask_output": False},
    ],
)
def test_masks_identical_to_sam_predictor(reference, exact, prompt):
    ref_masks, ref_scores, ref_logits = reference.predict(**prompt)
    masks, scores, logits = exact.predict(**prompt)
    assert masks.shape == ref_masks.shape == (len(ref_scores), 96, 128)
    np.testing.assert_array_equal(masks, ref_masks)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-3)

    mask_prompt = {"mask_input": ref_logits[:1], "box": BOX, "multimask_output": False}
    np.testing.assert_array_equal(exact.predict(**mask_prompt)[0], reference.predict(**mask_prompt)[0])


@pytest.mark.slow
def test_set_embedding_reuses_features(exact, reference):
    emb = exact.current_embedding()
    other = Predictor.__new__(Predictor)
    other.__dict__.update(exact.__dict__)
    other.reset_image()
    with pytest.raises(RuntimeError):
        other.predict(box=BOX)
    other.set_embedding(emb.features.numpy(), original_size=(96, 128))
    np.testing.assert_array_equal(other.predict(box=BOX)[0], reference.predict(box=BOX)[0])


# -- predict() on a cached embedding agrees with SamPredictor.predict ---------------------------
# Both get the same (random) embedding, so only the prompt path is compared; no ViT run needed.
MANY_POINTS = np.random.default_rng(5).uniform(0, 96, size=(12, 2))
PREDICT_PROMPTS = {
    "point": {"point_coords": POINTS[:1], "point_labels": LABELS[:1]},
    "point_single": {"point_coords": POINTS[:1], "point_labels": LABELS[:1], "multimask_output": False},
    "two_points_negative": {"point_coords": POINTS, "point_labels": LABELS},
    "box": {"box": BOX},
    "box_single": {"box": BOX, "multimask_output": False},
    "box_and_point": {"point_coords": POINTS[:1], "point_labels": LABELS[:1], "box": BOX, "multimask_output": False},
    "box_and_points_multi": {"point_coords": POINTS, "point_labels": LABELS, "box": BOX},
    "many_points": {"point_coords": MANY_POINTS, "point_labels": np.arange(12) % 2},  # >= 16 tokens: unfolded path
}


def _decoder_pair(sam_and_path, size):
    """(SamPredictor, Predictor) holding one random embedding for an image of ``size``."""
    from segment_anything import SamPredictor

    features = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(7)) * 0.5
    ref = SamPredictor(sam_and_path[0])
    ref.features = features
    ref.original_size = size
    ref.input_size = tuple(ref.transform.get_preprocess_shape(*size, ref.transform.target_length))
    ref.is_image_set = True
    ours = Predictor(sam_and_path[1], device="cpu", backend="torch")  # the decoder is the same on every backend
    ours.set_embedding(features.clone(), original_size=size)
    return ref, ours


@pytest.fixture(scope="module")
def decoder_pair(sam_and_path):
    return _decoder_pair(sam_and_path, IMAGE.shape[:2])


def _assert_same_prediction(ref_out, ours_out, ref_logits_full=None, ours_logits_full=None):
    ref_masks, ref_scores, ref_low = ref_out
    masks, scores, low = ours_out
    assert masks.shape == ref_masks.shape and masks.dtype == ref_masks.dtype
    assert int((masks != ref_masks).sum()) <= 4  # rounding-level differences only flip |logit| ~ 1e-6 pixels
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4, rtol=0)
    np.testing.assert_allclose(low, ref_low, atol=1e-4, rtol=0)
    if ref_logits_full is not None:
        np.testing.assert_allclose(ours_logits_full, ref_logits_full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(PREDICT_PROMPTS))
def test_predict_on_cached_embedding_matches_sam_predictor(decoder_pair, name):
    ref, ours = decoder_pair
    prompt = PREDICT_PROMPTS[name]
    ref_out, ours_out = ref.predict(**prompt), ours.predict(**prompt)
    assert ours_out[0].shape == (len(ref_out[1]), *IMAGE.shape[:2])
    _assert_same_prediction(ref_out, ours_out)

    # refine with the best low-res logits of the previous call as mask_input (uncached decoder path)
    refine = dict(prompt, mask_input=ref_out[2][np.argmax(ref_out[1])][None])
    _assert_same_prediction(ref.predict(**refine), ours.predict(**refine))


def test_predict_logits_portrait_image(sam_and_path):
    """Full-resolution logits (return_logits) agree too, on a taller-than-wide image."""
    ref, ours = _decoder_pair(sam_and_path, (150, 100))
    prompt = {"point_coords": POINTS * 0.8, "point_labels": LABELS, "box": BOX * 0.8}
    _assert_same_prediction(
        ref.predict(**prompt), ours.predict(**prompt),
        ref.predict(**prompt, return_logits=True)[0], ours.predict(**prompt, return_logits=True)[0],
    )


def test_predict_cache_follows_the_embedding(decoder_pair):
    ref, ours = decoder_pair
    prompt = {"point_coords": POINTS[:1], "point_labels": LABELS[:1]}
    before = ours.predict(**prompt)
    other = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(8))
    ours.set_embedding(other, original_size=ref.original_size)
    saved = ref.features
    try:
        ref.features = other
        _assert_same_prediction(ref.predict(**prompt), ours.predict(**prompt))
        assert not np.allclose(before[2], ours.predict(**prompt)[2])
    finally:
        ref.features = saved
        ours.set_embedding(saved.clone(), original_size=ref.original_size)
    _assert_same_prediction(ref.predict(**prompt), ours.predict(**prompt))


def test_decoder_uses_matrix_upscaling(decoder_pair):
    from medico_adapters import predictor as module

    _, ours = decoder_pair
    assert module._upscaling_weights(ours.model.mask_decoder.output_upscaling) is not None


def test_segment_anything_itself_is_not_patched(decoder_pair):
    from segment_anything.modeling.image_encoder import Attention

    _, torch_predictor = decoder_pair
    assert "forward" in vars(torch_predictor.model.image_encoder.blocks[0].attn)
    assert Attention.forward.__module__ == "segment_anything.modeling.image_encoder"


@pytest.mark.slow
def test_fast_mode_is_close(sam_and_path, reference):
    fast = Predictor(sam_and_path[1], device="cpu", exact=False)
    assert fast.precision == ("bf16" if accel.native_bf16(accel.cpu_flags()) else "f32")
    fast.set_image(IMAGE)
    a = fast.get_image_embedding().flatten()
    b = reference.get_image_embedding().flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() >= 0.9999
    assert fast.identity.endswith(f"-fast-{fast.backend}-{fast.precision}")


def test_bad_image_inputs(exact):
    with pytest.raises(ImageError, match="uint8"):
        exact.embed(IMAGE.astype(np.float32))
    with pytest.raises(ImageError, match="shape"):
        exact.embed(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="zero size"):
        exact.embed(np.zeros((0, 4), np.uint8))


def test_bad_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        Predictor(tmp_path / "missing.pth")


# -- embedding store and propagation with a stub model -----------------------------------------
class _StubTransform:
    target_length = 1024

    @staticmethod
    def get_preprocess_shape(h, w, long):
        scale = long / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)


class StubPredictor:
    """Counts embeddings; a 'mask' is the slice's pixels above 128. Reads and writes the store
    through the real ``Predictor.embed_stored``."""

    transform = _StubTransform()
    device = torch.device("cpu")
    embed_stored = Predictor.embed_stored

    def __init__(self, store_model="stub-1"):
        self.store_model = store_model
        self.embedded = []
        self._emb = None

    def embed(self, image):
        self.embedded.append(image.copy())
        return Embedding(torch.full((1, 2, 2, 2), float(image.mean())), image.shape[:2], (1024, 1024))

    def set_embedding(self, emb):
        self._emb = emb

    def predict(self, **_):
        mean = float(self._emb.features[0, 0, 0, 0])
        return np.ones((1, 4, 4), bool) * (mean > 0), np.array([0.9]), np.zeros((1, 256, 256), np.float32)


def test_store_hit_miss_and_invalidation(tmp_path):
    from medico_adapters.io import normalise

    raw = np.random.default_rng(3).integers(-1000, 1000, size=(4, 6, 6)).astype(np.int16)
    volume, _ = normalise(raw, "lung")
    store = EmbeddingStore(tmp_path)
    first = StubPredictor()
    vp = VolumePredictor(first, volume, store=store)
    vp.embed_slices([1, 2], progress=False)
    assert vp.stats == {"computed": 2, "from_cache": 0}
    assert len(first.embedded) == 2  # lazy: slices 0 and 3 were never embedded

    again = VolumePredictor(StubPredictor(), volume, store=EmbeddingStore(tmp_path))
    again.embed_slices([1, 2, 3], progress=False)
    assert again.stats == {"computed": 1, "from_cache": 2}
    torch.testing.assert_close(again.embedding(1).features, vp.embedding(1).features)
    assert again.embedding(1).input_size == (1024, 1024)

    # other weights, another window (other pixels) or no store: computed, never served stale
    other_weights = VolumePredictor(StubPredictor("stub-2"), volume, store=store)
    other_window = VolumePredictor(StubPredictor(), normalise(raw, "bone")[0], store=store)
    no_store = VolumePredictor(StubPredictor(), volume, store=None)
    for vp2 in (other_weights, other_window, no_store):
        vp2.embedding(1)
        assert vp2.stats == {"computed": 1, "from_cache": 0}
    # the same slice in another volume (a shifted stack) is the same entry
    shifted = VolumePredictor(StubPredictor(), volume[1:].copy(), store=store)
    shifted.embedding(0)
    assert shifted.stats == {"computed": 0, "from_cache": 1}


def _disk(n, centre, r):
    yy, xx = np.mgrid[:n, :n]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r


def test_propagation_stops_on_iou_rule():
    slices = {k: _disk(32, (16, 16), 8) for k in range(10)}
    slices[7] = _disk(32, (16, 16 + 12), 8)  # shifted: IoU with slice 6 is small
    slices[2] = np.zeros((32, 32), bool)  # vanished
    calls = []

    def step(k, prev, prev_logits):
        calls.append(k)
        assert prev.any()
        return slices[k], None

    mask, report = propagate(step, 10, 4, slices[4], progress=False)
    assert report["slices"] == [3, 6]
    assert "IoU" in report["up"] and "slice 7" in report["up"]
    assert report["down"] == "mask vanished at slice 2"
    assert [k for k in range(10) if mask[k].any()] == [3, 4, 5, 6]
    assert sorted(calls) == [2, 3, 5, 6, 7]

    _, loose = propagate(step, 10, 4, slices[4], iou_threshold=0.0, progress=False)
    assert loose["up"] == "end of volume"
    _, empty = propagate(step, 10, 4, np.zeros((32, 32), bool), progress=False)
    assert empty["slices"] == [4, 4]


# -- segment(): argument errors (cheap) and one real end-to-end run ----------------------------
@pytest.fixture
def ct_volume(tmp_path):
    data = np.full((2, 48, 40), -800, np.int16)
    data[:, 12:36, 10:30] = 60
    image = sitk.GetImageFromArray(data)
    image.SetSpacing((0.8, 0.8, 3.0))
    image.SetOrigin((5.0, -4.0, 12.0))
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def test_segment_argument_errors(ct_volume, tmp_path):
    out = tmp_path / "m.nii.gz"
    with pytest.raises(ImageError, match=r"--point \(0, 99, 5\): outside"):
        segment(ct_volume, out, points=[(0, 99, 5)], checkpoint=tmp_path / "x")
    with pytest.raises(ImageError, match=r"--point \(5, 1, 1\): outside"):
        segment(ct_volume, out, points=[(5, 1, 1, 1)], checkpoint=tmp_path / "x")
    with pytest.raises(ImageError, match="--box"):
        segment(ct_volume, out, boxes=[(0, 1, 1, 60, 5)], checkpoint=tmp_path / "x")
    with pytest.raises(ImageError, match="one slice"):
        segment(ct_volume, out, points=[(0, 1, 1), (1, 2, 2)], checkpoint=tmp_path / "x")
    with pytest.raises(ImageError, match="Z,Y,X"):
        segment(ct_volume, out, points=[(1, 2)])
    with pytest.raises(ImageError, match="--window"):
        segment(ct_volume, out, points=[(0, 1, 2)], window="liver", checkpoint=tmp_path / "x")
    with pytest.raises(CheckpointError, match="medico-adapters fetch vit_b_medical_imaging"):
        segment(ct_volume, out, points=[(0, 20, 20)])
    with pytest.raises(ImageError, match="no such file"):
        segment(tmp_path / "absent.nii.gz", out, points=[(0, 1, 1)])


@pytest.mark.slow
def test_segment_end_to_end_with_the_store(ct_volume, tmp_path, exact):
    out = tmp_path / "mask.nii.gz"
    png = tmp_path / "overlay.png"
    kwargs = {"points": [(0, 24, 20, 1)], "window": "soft_tissue", "overlay": png, "predictor": exact, "progress": False}
    first = segment(ct_volume, out, **kwargs)
    assert first["normalisation"]["name"] == "soft_tissue"
    assert first["slice"] == 0 and first["embeddings"]["computed"] >= 1
    assert "propagation" in first and png.is_file()
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == (40, 48, 2)
    np.testing.assert_allclose(written.GetSpacing(), (0.8, 0.8, 3.0))
    np.testing.assert_allclose(written.GetOrigin(), (5.0, -4.0, 12.0))
    assert int(sitk.GetArrayFromImage(written).sum()) == first["voxels"]

    # the phantom's two slices are equal: one entry serves both (the store is keyed by pixels)
    assert (first["embeddings"]["computed"], first["embeddings"]["from_cache"]) == (1, 1)
    second = segment(ct_volume, out, **kwargs)
    assert (second["embeddings"]["computed"], second["embeddings"]["from_cache"]) == (0, 2)
    assert second["voxels"] == first["voxels"]
    from medico_adapters.embeddings.store import default_root

    assert first["embeddings"]["store"] == str(default_root())
    elsewhere = segment(ct_volume, out, **kwargs, store=tmp_path / "store")  # another store: computed again
    assert elsewhere["embeddings"]["computed"] == first["embeddings"]["computed"]
    assert elsewhere["embeddings"]["store"] == str(tmp_path / "store") and (tmp_path / "store" / "v1").is_dir()

    # --no-propagate on a volume: only the prompted slice is written, in the volume's geometry
    only = segment(ct_volume, out, **{**kwargs, "points": [(1, 24, 20, 1)]}, propagate_masks=False)
    assert "propagation" not in only and only["slice"] == 1
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert written.shape == (2, 48, 40) and not written[0].any()
    assert int(written[1].sum()) == only["voxels"]


@pytest.mark.slow
def test_segment_auto_2d_writes_labels(tmp_path, exact):
    grey = np.zeros((64, 64), np.uint8)
    grey[16:48, 20:44] = 200
    src = tmp_path / "img.png"
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(src))
    out, png = tmp_path / "labels.png", tmp_path / "auto_overlay.png"
    report = segment(src, out, auto=True, overlay=png, predictor=exact, points_per_side=4, progress=False)
    assert report["mode"] == "auto" and report["slice"] == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert labels.shape == (64, 64) and int(labels.max()) == report["objects"]
    assert png.is_file()
    with pytest.raises(ImageError, match="--auto"):
        segment(src, out, auto=True, points=[(1, 1)], predictor=exact)
