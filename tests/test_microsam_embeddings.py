"""micro-sam's embedding file as the kit writes it: pixels, layout, signature, resume after a kill.

The stub predictor below runs the real ``Predictor.embed_stored`` (store keys and reads) with a
cheap deterministic "encoder", so these tests check the file, not a ViT; micro-sam itself opening
a file the kit wrote, with a real ViT-B, is ``integration/test_micro_sam_real.py`` (nox -t micro-sam).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medico_adapters.embeddings import microsam
from medico_adapters.embeddings.store import EmbeddingStore, input_size
from medico_adapters.errors import ImageError, MedicoError
from medico_adapters.predictor import Embedding, Predictor

ROOT = Path(__file__).resolve().parent.parent


class StubPredictor:
    """Exact, vit_b, with features that depend on every pixel (their mean and first row)."""

    exact = True
    arch = "vit_b"
    device = torch.device("cpu")
    embed_stored = Predictor.embed_stored

    def __init__(self, checkpoint: Path, store_model: str = "stub-weights"):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.checkpoint_path = str(checkpoint)
        self.store_model = store_model
        self.transform = ResizeLongestSide(1024)
        self.calls = 0

    def embed(self, image):
        self.calls += 1
        features = torch.zeros(1, 256, 64, 64)
        features[0, :, 0, : min(64, image.shape[1])] = torch.from_numpy(image[0, :64, 0].astype(np.float32))[None]
        features += float(image.mean())
        return Embedding(features, image.shape[:2], input_size(*image.shape[:2]))


@pytest.fixture
def stub(tmp_path):
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"stand-in checkpoint bytes")
    return StubPredictor(checkpoint)


def _raw(shape, seed=0):
    return np.random.default_rng(seed).integers(-1024, 2000, size=shape).astype(np.int16)


# -- pixels: micro-sam's _to_image ------------------------------------------------------------------
def test_to_image_truncates_after_a_min_max_stretch():
    raw = np.array([[-1000, -998], [-2, 0]], np.int16)
    # (x - min) / (max - min + 1e-7) * 255, truncated: 0, 0.51, 254.49, 255 -> 0, 0, 254, 255
    expected = np.array([[0, 0], [254, 255]], np.uint8)
    image = microsam.to_image(raw)
    assert image.shape == (2, 2, 3) and image.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(image[:, :, c], expected)


def test_to_image_channels_as_micro_sam_maps_them():
    two = np.stack([np.array([[0, 10], [20, 30]]), np.array([[5, 5], [5, 6]])], axis=2)
    image = microsam.to_image(two)
    np.testing.assert_array_equal(image[:, :, 0], [[0, 85], [170, 255]])
    # a channel whose range is 1: 1 / (1 + 1e-7) * 255 = 254.99997 in float32, truncated to 254
    np.testing.assert_array_equal(image[:, :, 1], [[0, 0], [0, 254]])
    assert not image[:, :, 2].any()  # the zero channel added beside two
    four = np.concatenate([two, two[:, :, :1], two[:, :, 1:]], axis=2)
    np.testing.assert_array_equal(microsam.to_image(four), microsam.to_image(four[:, :, :3]))
    with pytest.raises(ImageError, match="2D images"):
        microsam.to_image(np.zeros((2, 2, 2, 2)))


def test_window_microsam_normalises_each_slice_alone():
    from medico_adapters.io import normalise

    volume = _raw((3, 10, 12))
    volume[1] *= 3  # another range on one slice: its pixels must not change the others'
    pixels, description = normalise(volume, "microsam")
    assert pixels.shape == volume.shape and description["method"] == "microsam"
    for z in range(3):
        np.testing.assert_array_equal(pixels[z], microsam.to_image(volume[z])[:, :, 0])
    np.testing.assert_array_equal(normalise(volume[0], "microsam")[0], pixels[0])


# -- the file ---------------------------------------------------------------------------------------
def _xxh128(path: Path) -> str:
    import xxhash

    return "xxh128:" + xxhash.xxh128(path.read_bytes()).hexdigest()


def test_volume_file_layout_and_signature(tmp_path, stub):
    zarr = pytest.importorskip("zarr", minversion="3.1.3", reason="needs the [precompute] extra (zarr >= 3.1.3)")
    raw = _raw((3, 20, 24))
    store = EmbeddingStore(tmp_path / "store")
    path = tmp_path / "ct.zarr"
    report = microsam.write_embeddings(raw, path, stub, store=store)
    assert (report["computed"], report["from_store"], report["up_to_date"]) == (3, 0, False)

    group = zarr.open_group(str(path), mode="r")
    assert (path / "zarr.json").is_file()  # zarr v3, as micro-sam writes with zarr 3
    assert dict(group.attrs) == {
        "data_signature": hashlib.sha1(raw.tobytes()).hexdigest(), "tile_shape": None, "halo": None,
        "model_type": "vit_b", "model_name": "vit_b", "model_hash": _xxh128(Path(stub.checkpoint_path)),
        "micro_sam_version": microsam._micro_sam_version(), "input_size": [853, 1024], "original_size": [20, 24],
    }
    features = group["features"]
    assert (features.shape, features.chunks, features.dtype) == ((3, 1, 256, 64, 64), (1, 1, 256, 64, 64), np.float32)
    for z in range(3):
        entry = store.get(store.key(stub.store_model, microsam.to_image(raw[z])))
        np.testing.assert_array_equal(features[z], entry)

    again = microsam.write_embeddings(raw, path, stub, store=store)
    assert (again["computed"], again["from_store"], again["up_to_date"]) == (0, 0, True)
    elsewhere = microsam.write_embeddings(raw, tmp_path / "copy.zarr", stub, store=store)
    assert (elsewhere["computed"], elsewhere["from_store"]) == (0, 3)  # the store is shared
    assert stub.calls == 3
    with pytest.raises(ImageError, match="another image .data_signature"):
        microsam.write_embeddings(_raw((3, 20, 24), seed=1), path, stub, store=store)
    with pytest.raises(ImageError, match="another model .model_hash"):
        other = tmp_path / "other.pt"
        other.write_bytes(b"other weights")
        microsam.write_embeddings(raw, path, StubPredictor(other), store=store)


@pytest.mark.parametrize("shape", [(20, 24), (20, 24, 3)])
def test_2d_file_layout(tmp_path, stub, shape):
    zarr = pytest.importorskip("zarr", minversion="3.1.3", reason="needs the [precompute] extra (zarr >= 3.1.3)")
    raw = _raw(shape)
    report = microsam.write_embeddings(raw, tmp_path / "img.zarr", stub, store=EmbeddingStore(tmp_path), ndim=2)
    assert report["ndim"] == 2 and report["slices"] == 1
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="r")
    features = group["features"]
    assert (features.shape, features.chunks) == ((1, 256, 64, 64), (1, 256, 64, 64))
    assert group.attrs["original_size"] == [20, 24] and group.attrs["data_signature"] == hashlib.sha1(raw.tobytes()).hexdigest()


def test_fast_predictors_are_refused(tmp_path, stub):
    stub.exact = False
    with pytest.raises(MedicoError, match="exact f32"):
        microsam.write_embeddings(_raw((2, 8, 8)), tmp_path / "x.zarr", stub)


def test_a_killed_writer_leaves_a_partial_file_that_completes(tmp_path, stub):
    """Killed while writing chunks: the file has no input_size (micro-sam would not take it as
    complete), every chunk there decodes, and the next call completes it from the store."""
    zarr = pytest.importorskip("zarr", minversion="3.1.3", reason="needs the [precompute] extra (zarr >= 3.1.3)")
    raw = _raw((12, 16, 16))
    store = EmbeddingStore(tmp_path / "store")
    for z in range(12):  # entries in the store first: the kill lands while the file is assembled
        stub.embed_stored(microsam.to_image(raw[z]), store)
    np.save(tmp_path / "raw.npy", raw)
    script = textwrap.dedent(f"""
        import time, numpy as np
        from medico_adapters.embeddings import microsam
        from medico_adapters.embeddings.store import EmbeddingStore
        from tests.test_microsam_embeddings import StubPredictor

        class SlowStore(EmbeddingStore):
            def get(self, key):
                time.sleep(0.15)
                return super().get(key)

        raw = np.load({str(tmp_path / 'raw.npy')!r})
        microsam.write_embeddings(raw, {str(tmp_path / 'ct.zarr')!r}, StubPredictor({stub.checkpoint_path!r}),
                                  store=SlowStore({str(tmp_path / 'store')!r}))
    """)
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    chunks = tmp_path / "ct.zarr" / "features" / "c"

    def written():
        return [p for p in chunks.rglob("*") if p.is_file() and not p.name.endswith(".partial")] if chunks.exists() else []

    while len(written()) < 3 and writer.poll() is None:
        time.sleep(0.01)
    writer.kill()
    writer.communicate()
    group = zarr.open_group(str(tmp_path / "ct.zarr"), mode="r")
    assert "input_size" not in group.attrs
    partial = group["features"][:]  # every chunk that exists decodes; the others read as zeros
    done = [z for z in range(12) if partial[z].any()]
    assert 3 <= len(done) < 12
    report = microsam.write_embeddings(raw, tmp_path / "ct.zarr", stub, store=store)
    assert (report["computed"], report["from_store"], report["up_to_date"]) == (0, 12, False)
    group = zarr.open_group(str(tmp_path / "ct.zarr"), mode="r")
    assert group.attrs["input_size"] == [1024, 1024]
    for z in range(12):
        np.testing.assert_array_equal(group["features"][z], store.get(store.key(stub.store_model, microsam.to_image(raw[z]))))
