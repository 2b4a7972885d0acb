"""The embedding store: each slice's image embedding computed once, read by the kit and the tools.

This file is self-contained on purpose (the standard library and numpy; torch only when a model's
identity is asked for): the kit copies it unchanged into the tools it patches, which then read and
write the same entries as ``medico-adapters segment``, ``finetune`` and ``precompute``.
A patched tool calls ``set_image(predictor, image)`` where it called ``predictor.set_image(image)``
(samm's ``CalculateEmbeddings``, for one): a stored slice skips the encoder, a new one is stored.

An entry is one embedding (float32, 1 x 256 x 64 x 64 for SAM-1) under a key made of

* the model's identity: a hash of the image encoder's weights (``model_identity``), plus the
  precision when it is not exact f32 -- another checkpoint is never served this one's features;
* the pixels as the encoder sees them: the H x W x 3 uint8 image after the caller's own
  normalisation (a changed contrast window is another image, so another key);
* the size SAM resizes it to (``input_size``).

Layout: ``<root>/v1/<model[:20]>/<key[:2]>/<key>.emb``, a header (magic, a BLAKE2b digest of the
payload) followed by the array in ``.npy`` format. Writes go to a unique temporary file beside the
entry and are renamed over it, so a killed writer leaves no torn entry and two writers of the same
entry both succeed (the content is the same). An entry whose digest does not match is removed and
reported missing, so it is recomputed, never served.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "ENV", "FORMAT", "EmbeddingStore", "default_root", "input_size", "model_identity", "set_image", "state_identity",
]

#: bumped whenever the key or the entry format changes (old entries are then simply not found).
FORMAT = 1
#: a folder named here holds the store instead of the kit's cache (a lab's shared drive, say).
ENV = "MEDICO_EMBEDDING_STORE"
#: the attribute ``model_identity`` memoises the hash on (and that an accelerated encoder carries
#: over from the torch module it replaced).
IDENTITY_ATTR = "_medico_identity"
_MAGIC = b"MEDICO-EMB1\n"
_DIGEST = 32
_ENCODER_PREFIX = "image_encoder."
_TARGET_LENGTH = 1024


def default_root() -> Path:
    """``$MEDICO_EMBEDDING_STORE``, else ``embeddings/`` in the kit's cache (``$MEDICO_ADAPTERS_CACHE``
    or the per-user cache folder of each OS)."""
    named = os.environ.get(ENV)
    if named:
        return Path(named)
    root = os.environ.get("MEDICO_ADAPTERS_CACHE")
    if root:
        return Path(root) / "embeddings"
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "medico-adapters" / "medico-adapters" / "Cache" / "embeddings"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "medico-adapters" / "embeddings"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medico-adapters" / "embeddings"


def _digest_tensors(items, precision: str) -> str:
    import torch

    digest = hashlib.blake2b(f"format={FORMAT};precision={precision}".encode(), digest_size=16)
    for name, tensor in items:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def state_identity(state_dict: Mapping, precision: str = "f32") -> str:
    """The identity of the image encoder held in a SAM state dict (keys ``image_encoder.*``)."""
    items = sorted((k[len(_ENCODER_PREFIX):], v) for k, v in state_dict.items() if k.startswith(_ENCODER_PREFIX))
    if not items:
        raise ValueError("the state dict has no image_encoder.* tensors")
    return _digest_tensors(items, precision)


def model_identity(encoder, precision: str = "f32") -> str:
    """The identity of a SAM image encoder module (``sam.image_encoder``), memoised on it.

    Equal to ``state_identity`` of the checkpoint the module was loaded from. A module that no
    longer holds the weights (an OpenVINO-compiled encoder) answers with the identity it carries.
    """
    if precision == "f32":
        known = getattr(encoder, IDENTITY_ATTR, None)
        if known:
            return known
    items = sorted(encoder.state_dict().items())
    if not items:  # every weightless encoder would share one identity, and so one another's entries
        raise ValueError(f"{type(encoder).__name__} holds no weights and carries no {IDENTITY_ATTR}")
    identity = _digest_tensors(items, precision)
    if precision == "f32":
        with contextlib.suppress(AttributeError, TypeError):
            object.__setattr__(encoder, IDENTITY_ATTR, identity)
    return identity


def input_size(height: int, width: int, target_length: int = _TARGET_LENGTH) -> tuple[int, int]:
    """The size SAM's ``ResizeLongestSide`` gives an ``height`` x ``width`` image."""
    scale = target_length / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _as_rgb(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise TypeError(f"embedding store: pixels must be uint8 as the encoder sees them, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"embedding store: pixels must be H x W or H x W x 3, got shape {pixels.shape}")
    return np.ascontiguousarray(pixels)


def _encode(features: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
    payload = buffer.getvalue()
    return _MAGIC + hashlib.blake2b(payload, digest_size=_DIGEST).digest() + payload


def _decode(blob: bytes) -> np.ndarray | None:
    head = len(_MAGIC) + _DIGEST
    if len(blob) <= head or not blob.startswith(_MAGIC):
        return None
    payload = blob[head:]
    if hashlib.blake2b(payload, digest_size=_DIGEST).digest() != blob[len(_MAGIC):head]:
        return None
    try:
        return np.load(io.BytesIO(payload), allow_pickle=False)
    except (OSError, ValueError):
        return None


class EmbeddingStore:
    """Entries on disk under ``root`` (default: ``default_root()``); ``stats`` counts what happened."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.stats = {"hits": 0, "misses": 0, "damaged": 0, "writes": 0}

    def key(self, model: str, pixels: np.ndarray, size: tuple[int, int] | None = None) -> str:
        """The key of ``pixels`` (uint8, H x W[ x 3], after the caller's normalisation) for ``model``."""
        rgb = _as_rgb(pixels)
        size = tuple(size) if size is not None else input_size(*rgb.shape[:2])
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"format={FORMAT};model={model};shape={rgb.shape};input={tuple(int(s) for s in size)};".encode())
        digest.update(memoryview(rgb).cast("B"))
        return f"{model[:20]}-{digest.hexdigest()}"

    def path(self, key: str) -> Path:
        model, _, rest = key.partition("-")
        return self.root / f"v{FORMAT}" / model / rest[:2] / f"{key}.emb"

    def __contains__(self, key: str) -> bool:
        """Whether an entry exists (not whether it is whole: ``get`` checks that)."""
        return self.path(key).is_file()

    def get(self, key: str) -> np.ndarray | None:
        """The stored embedding, or None when absent; a damaged entry is removed and is None."""
        path = self.path(key)
        try:
            blob = path.read_bytes()
        except OSError:
            self.stats["misses"] += 1
            return None
        features = _decode(blob)
        if features is None:
            self.stats["damaged"] += 1
            self.stats["misses"] += 1
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        self.stats["hits"] += 1
        return features

    def put(self, key: str, features: np.ndarray) -> Path:
        """Store ``features`` under ``key`` atomically (temporary file, fsync, rename)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(tmp, flags, 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(_encode(features))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.replace(tmp, path)
            except PermissionError:
                # Windows: a reader holds the existing entry open. Another writer made it, with
                # the same content, so this one is not needed.
                if _decode(path.read_bytes()) is None:
                    raise
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.stats["writes"] += 1
        return path

    def get_or_compute(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The stored embedding for ``key``, else ``compute()``, stored before it is returned."""
        features = self.get(key)
        if features is None:
            features = np.asarray(compute(), dtype=np.float32)
            self.put(key, features)
        return features


# -- the one call a tool makes ---------------------------------------------------------------------
def _stored_identity(model) -> str | None:
    """The identity of ``model.image_encoder``, or None where it cannot be known.

    A compiled encoder holds no weights: it answers with the identity it was given, else with the
    one its model was tagged with before the swap (a patched tool tags it where it builds the
    model), else None -- keying it by its empty weights would serve every checkpoint the same
    features."""
    encoder = model.image_encoder
    known = getattr(encoder, IDENTITY_ATTR, None)
    if known:
        return known
    if next(iter(encoder.parameters()), None) is None:
        return getattr(model, IDENTITY_ATTR, None) or None
    return model_identity(encoder)


_said: set[str] = set()


def _say(kind: str, line: str) -> None:
    """Print the first ``line`` of each ``kind``: a tool embeds hundreds of slices, each would repeat it."""
    if kind not in _said:
        _said.add(kind)
        print(f"medico embedding store: {line}")


def set_image(predictor, image, image_format: str = "RGB", store: EmbeddingStore | None = None) -> bool:
    """``predictor.set_image(image, image_format)`` through the store; True when it was a stored entry.

    ``predictor`` is a ``segment_anything`` (or MobileSAM) ``SamPredictor``. A stored entry leaves
    it exactly as ``set_image`` would (features, sizes, ``is_image_set``) without running the
    encoder; a computed one is stored before this returns. Whatever goes wrong with the store
    (unknown identity, unwritable folder) costs the store, never the embedding: the image is then
    embedded as before.
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be RGB or BGR, got {image_format!r}")
    model = predictor.model
    try:
        identity = _stored_identity(model)
        pixels = np.asarray(image)
        if image_format != model.image_format:
            pixels = pixels[..., ::-1]
        size = input_size(pixels.shape[0], pixels.shape[1], int(predictor.transform.target_length))
        store = store if store is not None else EmbeddingStore()
        if not identity:
            _say("identity", "not used (the image encoder holds no weights and carries no identity)")
        key = store.key(identity, pixels, size) if identity else None
        features = store.get(key) if key else None
    except Exception as e:  # noqa: BLE001 -- the store is an optimisation, never a new failure
        _say("read", f"not used ({type(e).__name__}: {e})")
        key = features = None
    if features is not None:
        import torch

        predictor.reset_image()
        predictor.original_size = tuple(pixels.shape[:2])
        predictor.input_size = size
        predictor.features = torch.from_numpy(features).to(predictor.device)
        predictor.is_image_set = True
        return True
    predictor.set_image(image, image_format)
    if key and str(predictor.features.dtype) == "torch.float32":
        try:
            store.put(key, predictor.features.detach().to("cpu").numpy())
        except Exception as e:  # noqa: BLE001
            _say("write", f"could not store embeddings in {store.root} ({type(e).__name__}: {e})")
    return False
