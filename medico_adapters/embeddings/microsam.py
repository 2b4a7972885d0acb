"""Embeddings as micro-sam keeps them: its ``embedding_path`` zarr, filled from the kit's store.

micro-sam's annotators and ``util.precompute_image_embeddings(predictor, image, save_path=...)``
read an embedding file instead of computing when its attributes call it complete and its signature
matches the image and the model. What micro-sam 1.8.14 writes and checks (its ``util.py``:
``_compute_3d``, ``_compute_2d``, ``_write_embedding_signature``, ``_check_saved_embeddings``),
and so what ``write_embeddings`` writes:

* a zarr group with the array ``features``: a volume's is (slices, 1, 256, 64, 64) float32 in one
  chunk per slice, a 2D image's (1, 256, 64, 64) in one chunk;
* the group's attributes: ``data_signature`` (SHA-1 of the bytes of the array the user gives
  micro-sam, before its normalisation), ``tile_shape`` and ``halo`` (None: untiled), ``model_type``
  (``vit_b``; micro-sam refuses a file whose signature differs in these), ``model_name``,
  ``model_hash`` (micro-sam's xxh128 of the checkpoint file) and ``micro_sam_version`` (these three
  only make it warn), then ``input_size`` and ``original_size``. micro-sam takes a file holding
  ``input_size`` as complete, so the attributes are written in one update after every chunk.

Each slice is embedded as micro-sam would embed it: ``to_image`` reproduces its ``_to_image``
(per slice and channel: minus the minimum, divided by the new maximum + 1e-7, times 255, truncated
to uint8), and the embedding of those pixels comes from the kit's store, or is computed into it.
``segment --window microsam`` and ``precompute --window microsam`` normalise the same way, so the
three share entries.

A killed writer leaves no torn chunk: zarr >= 3.1.3's ``LocalStore`` writes every chunk and
metadata document to a temporary file renamed over its target. A file without ``input_size`` is
a partial one: the next ``write_embeddings`` completes it (micro-sam would too: it fills the
slices that are still zero).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medico_adapters.embeddings.store import EmbeddingStore, input_size
from medico_adapters.errors import ImageError, MedicoError, MissingDependencyError

__all__ = ["LAYOUT_VERSION", "Signature", "assemble", "data_signature", "checkpoint_signature", "normalise_slices",
           "slice_keys", "to_image", "write_embeddings"]

#: the micro-sam release whose layout this module writes (and whose name goes in the file when
#: micro-sam is not installed beside the kit; another version there only makes micro-sam warn).
LAYOUT_VERSION = "1.8.14"
EMBEDDING_SHAPE = (1, 256, 64, 64)
ZARR_NEEDED = "zarr>=3.1.3"


def _zarr():
    from packaging.version import Version

    try:
        import zarr
    except ImportError:
        zarr = None
    if zarr is None or Version(zarr.__version__) < Version(ZARR_NEEDED.split(">=")[1]):
        raise MissingDependencyError(
            f"writing micro-sam embedding files needs {ZARR_NEEDED} (Python >= 3.11, as micro-sam 1.8.14): "
            "pip install 'medico-adapters[precompute]'"
        )
    return zarr


# -- micro-sam's pixels ----------------------------------------------------------------------------
def _channels(image: np.ndarray) -> np.ndarray:
    """A 2D image as the three channels micro-sam embeds (grey repeated, a zero third channel
    beside two, the first three of more)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ImageError(f"micro-sam embeds 2D images (H x W[ x C]); got shape {image.shape}")
    channels = image.shape[2]
    if channels == 1:
        return np.concatenate([image] * 3, axis=2)
    if channels == 2:
        return np.concatenate([image, np.zeros(image.shape[:2] + (1,), image.dtype)], axis=2)
    return image[:, :, :3]


def _stretch(image: np.ndarray) -> np.ndarray:
    # The same float32 operations in the same order as micro-sam's _to_image, so the same bytes.
    x = image.astype(np.float32)
    x -= x.min(axis=(0, 1))[None, None]
    x /= x.max(axis=(0, 1))[None, None] + 1e-7
    return (x * 255).astype(np.uint8)


def to_image(image: np.ndarray) -> np.ndarray:
    """One 2D image (H x W or H x W x C, any dtype) as micro-sam's encoder sees it: H x W x 3 uint8."""
    return _stretch(_channels(np.asarray(image)))


def normalise_slices(stack: np.ndarray) -> np.ndarray:
    """``to_image`` of every slice of a (slices, y, x[, 3]) stack, keeping its shape (grey stays grey:
    its three channels would be equal)."""
    stack = np.asarray(stack)
    if stack.ndim not in (3, 4):
        raise ImageError(f"--window microsam: expected (slices, y, x[, 3]), got shape {stack.shape}")
    if stack.ndim == 3:
        return np.stack([_stretch(s[:, :, None])[:, :, 0] for s in stack])
    return np.stack([to_image(s) for s in stack])


# -- signature -------------------------------------------------------------------------------------
def data_signature(raw: np.ndarray) -> str:
    """micro-sam's ``_compute_data_signature``: SHA-1 of the raw array's bytes in C order."""
    return hashlib.sha1(np.ascontiguousarray(raw).data.cast("B")).hexdigest()


def checkpoint_signature(path: str | os.PathLike, arch: str) -> tuple[str, str]:
    """(model_hash, model_name) as micro-sam's ``get_sam_model`` sets them for this file.

    The hash is xxh128 of the file, micro-sam's own; the name is the registry name whose published
    hash it is (what ``-m vit_b_medical_imaging`` gives), else ``arch`` (``checkpoint_path=`` with
    ``model_type=arch``). micro-sam only warns when these differ.
    """
    import xxhash

    from medico_adapters.registry import HASHES

    digest = xxhash.xxh128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    model_hash = f"xxh128:{digest.hexdigest()}"
    names = [name for name, known in HASHES.items() if known == model_hash]
    return model_hash, names[0] if names else arch


def _micro_sam_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("micro-sam")
    except PackageNotFoundError:
        return LAYOUT_VERSION


@dataclass(frozen=True)
class Signature:
    """The attributes micro-sam checks and reads, in the order it writes them."""

    data_signature: str
    model_type: str
    model_name: str
    model_hash: str
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    micro_sam_version: str = LAYOUT_VERSION

    def attrs(self) -> dict:
        return {
            "data_signature": self.data_signature, "tile_shape": None, "halo": None,
            "model_type": self.model_type, "model_name": self.model_name,
            "micro_sam_version": self.micro_sam_version, "model_hash": self.model_hash,
            "input_size": list(self.input_size), "original_size": list(self.original_size),
        }


def _slices(raw: np.ndarray, ndim: int | None) -> tuple[list[np.ndarray], int]:
    raw = np.asarray(raw)
    ndim = raw.ndim if ndim is None else ndim  # micro-sam's own default
    if ndim == 2 and raw.ndim in (2, 3):
        return [raw], 2
    if ndim == 3 and raw.ndim == 3:
        return list(raw), 3
    raise ImageError(f"micro-sam embeddings: an array of shape {raw.shape} is not a 2D image or a 3D volume (ndim={ndim})")


def slice_keys(raw: np.ndarray, model: str, store: EmbeddingStore, ndim: int | None = None) -> tuple[list[str], list[np.ndarray], int]:
    """The store keys of micro-sam's pixels for each slice of ``raw``, those pixels, and ndim."""
    slices, ndim = _slices(raw, ndim)
    pixels = [to_image(s) for s in slices]
    return [store.key(model, p, input_size(*p.shape[:2])) for p in pixels], pixels, ndim


# -- the file --------------------------------------------------------------------------------------
def _mismatch(existing: dict, wanted: dict) -> str | None:
    for key in ("data_signature", "tile_shape", "halo", "model_type", "model_hash"):
        if existing.get(key) != wanted[key]:
            return key
    return None


def _open(path: Path, wanted: dict):
    """The group at ``path`` (created when absent) and whether it already holds these embeddings."""
    zarr = _zarr()
    if path.exists() and not path.is_dir():
        raise ImageError(f"{path}: not a zarr folder")
    try:
        group = zarr.open_group(str(path), mode="a")
    except Exception as e:  # zarr raises its own types for a folder holding something else
        raise ImageError(f"{path}: cannot be opened as a zarr group ({type(e).__name__}: {e})") from None
    existing = dict(group.attrs)
    if "input_size" in existing:
        differs = _mismatch(existing, wanted)
        if differs is None:
            return group, True
        raise ImageError(
            f"{path}: holds embeddings for another {'image' if differs == 'data_signature' else 'model'} "
            f"({differs} differs); remove it or write to another path"
        )
    return group, False


def assemble(path: str | os.PathLike, store: EmbeddingStore, keys: Sequence[str], signature: Signature, ndim: int) -> bool:
    """Write micro-sam's file at ``path`` from the store entries ``keys`` (one per slice).

    Returns False when the file already held these embeddings (nothing written). Raises
    ``MedicoError`` if an entry is missing or damaged (it then has to be computed first).
    """
    path = Path(path)
    wanted = signature.attrs()
    group, done = _open(path, wanted)
    if done:
        return False
    shape = (len(keys), *EMBEDDING_SHAPE) if ndim == 3 else EMBEDDING_SHAPE
    if "features" in group:
        features = group["features"]
        if tuple(features.shape) != shape or tuple(features.chunks) != (1, *EMBEDDING_SHAPE)[-len(shape):]:
            raise ImageError(f"{path}: holds a partial features array of another shape; remove it or write to another path")
    else:
        chunks = (1, *EMBEDDING_SHAPE) if ndim == 3 else EMBEDDING_SHAPE
        features = group.create_array("features", shape=shape, chunks=chunks, dtype="float32")
    for z, key in enumerate(keys):
        entry = store.get(key)
        if entry is None:
            raise MedicoError(f"{path}: the embedding of slice {z} is not in the store {store.root}; compute it first")
        entry = np.asarray(entry, dtype=np.float32).reshape(EMBEDDING_SHAPE)
        if ndim == 3:
            features[z] = entry
        else:
            features[...] = entry
    group.attrs.update(wanted)  # last, in one metadata write: from here on micro-sam reads the file
    return True


def write_embeddings(
    raw: np.ndarray,
    path: str | os.PathLike,
    predictor,
    *,
    store: EmbeddingStore | None = None,
    ndim: int | None = None,
    model_name: str | None = None,
    progress: Callable[[int], object] | None = None,
) -> dict:
    """Write the micro-sam embedding file of ``raw`` -- the array exactly as the user gives it to
    micro-sam -- at ``path``, embedding with the kit's ``predictor`` through ``store``.

    ``predictor`` must be exact (f32, what micro-sam computes). Slices whose entries are in the
    store are not computed again; a file that already holds these embeddings is left as it is.
    ``progress(n)`` is called after each slice. Returns counts and the signature written.
    """
    if not predictor.exact:
        raise MedicoError("micro-sam embeddings are exact f32 ones; use an exact predictor (no --fast)")
    store = store if store is not None else EmbeddingStore()
    keys, pixels, ndim = slice_keys(raw, predictor.store_model, store, ndim)
    height, width = pixels[0].shape[:2]
    model_hash, default_name = checkpoint_signature(predictor.checkpoint_path, predictor.arch)
    signature = Signature(
        data_signature=data_signature(raw), model_type=predictor.arch, model_name=model_name or default_name,
        model_hash=model_hash, original_size=(height, width), input_size=input_size(height, width),
        micro_sam_version=_micro_sam_version(),
    )
    group, done = _open(Path(path), signature.attrs())
    del group
    counts = {"computed": 0, "from_store": 0}
    if not done:
        for image in pixels:
            _, computed = predictor.embed_stored(image, store)
            counts["computed" if computed else "from_store"] += 1
            if progress is not None:
                progress(1)
        assemble(path, store, keys, signature, ndim)
    return {"path": str(path), "ndim": ndim, "slices": len(keys), "up_to_date": done, **counts,
            "signature": signature.attrs()}
