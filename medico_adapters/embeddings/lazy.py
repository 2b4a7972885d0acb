"""Embeddings a tool asks for when it needs them, instead of a whole volume up front.

napari-sam's ``set_image`` embeds every slice of a 3D image before the first click can be used,
and again after every contrast change. ``patch napari-sam --lazy-embeddings`` replaces that loop
with a ``LazySlices``: a sequence the tool indexes as it indexed its list of embeddings, which

* embeds a slice when a prompt first needs it (on the calling thread: the clicked slice first);
* once the user has prompted, embeds the other slices in a background thread, nearest to the last
  prompt first, pausing while a prompt waits for its own slice; it never touches Qt and stops when
  the tool replaces the sequence (``set_image`` again: another image, a contrast change) or the
  widget is destroyed;
* reads and writes the embedding store (``_medico_embedding_store``, beside this file), so a
  volume opened again, or a contrast window used before, costs no encoder call. A contrast change
  gives new pixels, hence new keys: nothing is recomputed until a slice is needed.

Each embedding is what the tool's own ``set_image`` computes for the pixels the tool's own code
prepares (the loop body, moved into a function by the codemod), so the masks are the eager tool's.
``stored_set_image`` does the same for a tool's one-image ``predictor.set_image(image)``.

This file is self-contained on purpose (the standard library, numpy, torch, and the store module
beside it): the kit copies it unchanged into the tools it patches, as ``_medico_lazy_embeddings``.
"""

from __future__ import annotations

import copy
import functools
import operator
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch

try:  # in a tool: the store the kit placed beside this file
    from ._medico_embedding_store import EmbeddingStore, input_size, model_identity
except ImportError:  # in the kit: medico_adapters.embeddings
    from .store import EmbeddingStore, input_size, model_identity

__all__ = ["LazySlices", "stored_set_image"]

PREFIX = "medico_lazy_embeddings:"
_WAIT_S = 0.5  # how often a waiting prompt checks that the thread it waits for is still alive


def _target_length(predictor) -> int:
    return int(getattr(getattr(predictor, "transform", None), "target_length", 0) or predictor.model.image_encoder.img_size)


def _storable(pixels) -> bool:
    return isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3


class _Stored:
    """The store as one predictor's model uses it: keys, reads as tensors on the model's device, writes.

    Any failure (no identity for a weightless encoder, a read-only or full disk) turns the store
    off for this object with one log line; the tool then embeds as it would have without it.
    """

    def __init__(self, predictor, store, log) -> None:
        self.predictor = predictor
        self.store = store
        self.log = log
        self.model: str | None = None
        self.lock = threading.Lock()

    def _off(self, why: str) -> None:
        if self.store is not None:
            self.log(f"{PREFIX} embedding store off ({why}); slices are embedded as usual")
        self.store = None

    def identity(self) -> str | None:
        with self.lock:
            if self.model is None and self.store is not None:
                try:
                    self.model = model_identity(self.predictor.model.image_encoder)
                except Exception as e:  # e.g. a compiled encoder that carries no identity
                    self._off(f"{type(e).__name__}: {e}")
            return self.model

    def key(self, pixels) -> str | None:
        if self.store is None or not _storable(pixels) or self.identity() is None:
            return None
        size = input_size(pixels.shape[0], pixels.shape[1], _target_length(self.predictor))
        return self.store.key(self.model, pixels, size)

    def get(self, key: str | None):
        if key is None or self.store is None:
            return None
        try:
            found = self.store.get(key)
        except Exception as e:
            self._off(f"reading {self.store.root}: {type(e).__name__}: {e}")
            return None
        if found is None:
            return None
        decoder = next(iter(self.predictor.model.mask_decoder.parameters()), None)  # its input's dtype
        return torch.from_numpy(found).to(self.predictor.model.device, decoder.dtype if decoder is not None else None)

    def put(self, key: str | None, features: torch.Tensor) -> None:
        if key is None or self.store is None:
            return
        try:
            self.store.put(key, features.detach().to("cpu", torch.float32).numpy())
        except Exception as e:
            self._off(f"writing {self.store.root}: {type(e).__name__}: {e}")


def _open_store(store) -> EmbeddingStore | None:
    if store is False:
        return None
    if store is None or isinstance(store, EmbeddingStore):
        return store or EmbeddingStore()
    return EmbeddingStore(store)


def _sizes(predictor, pixels: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """``original_size`` and ``input_size`` as ``SamPredictor.set_image`` sets them for ``pixels``."""
    h, w = pixels.shape[:2]
    return (h, w), input_size(h, w, _target_length(predictor))


def _show(predictor, features, sizes) -> None:
    """Leave ``predictor`` as its own ``set_image`` would have (the features included)."""
    predictor.original_size, predictor.input_size = sizes
    predictor.features = features
    predictor.is_image_set = True


def stored_set_image(predictor, image, *args, store=None, log=print, **kwargs) -> bool:
    """``predictor.set_image(image)``, unless the store holds this image's embedding; True if it did.

    Only the tool's plain call is served from the store (a uint8 H x W x 3 image, no other
    arguments); anything else goes to ``set_image`` unchanged.
    """
    stored = _Stored(predictor, _open_store(store) if not (args or kwargs) else None, log)
    key = stored.key(image)
    features = stored.get(key)
    if features is not None:
        if hasattr(predictor, "reset_image"):
            predictor.reset_image()
        _show(predictor, features, _sizes(predictor, image))
        return False
    predictor.set_image(image, *args, **kwargs)
    stored.put(key, predictor.features)
    return True


def _close(ref) -> None:
    slices = ref()
    if slices is not None:
        slices.close()


class LazySlices(Sequence):
    """The embeddings of ``count`` slices, each computed when it is first indexed.

    ``predictor``: the tool's ``SamPredictor`` (its model embeds; indexing leaves it sized as its
    own ``set_image`` would). ``pixels(index)``: the tool's code for the image it gives
    ``set_image`` for that slice. ``owner``/``attribute``: where the tool keeps this sequence; the
    background fill stops once that attribute holds something else, or the owner (a Qt widget)
    is destroyed. ``store``: an ``EmbeddingStore``, a folder, None for the default store, False
    for none. ``stats`` counts slices computed and read from the store.
    """

    def __init__(self, predictor, pixels: Callable[[int], np.ndarray], count: int, *, owner=None,
                 attribute: str | None = None, store=None, log=print) -> None:
        self._predictor = predictor
        self._pixels = pixels
        self._features: list = [None] * int(count)
        self._sizes = None
        self._busy: dict[int, threading.Thread] = {}  # slice -> the thread embedding it
        self._demands = 0
        self._focus = 0
        self._closed = False
        self._worker: threading.Thread | None = None
        self._ready = threading.Condition()
        self._log = log
        self._stored = _Stored(predictor, _open_store(store), log)
        self._owner = weakref.ref(owner) if owner is not None else None
        self._attribute = attribute
        self.stats = {"computed": 0, "stored": 0}
        destroyed = getattr(owner, "destroyed", None)
        if destroyed is not None and hasattr(destroyed, "connect"):
            destroyed.connect(functools.partial(_close, weakref.ref(self)))
        if self._stored.store is not None and self._stored.model is None:
            # hashing the weights (~0.4 s for a ViT-B, once per model) before the first click needs it
            threading.Thread(target=self._stored.identity, name="medico-lazy-identity", daemon=True).start()

    # -- the sequence the tool indexes ----------------------------------------------------------
    def __len__(self) -> int:
        return len(self._features)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"slice {index} of a {len(self)}-slice volume")
        with self._ready:
            self._focus = i
            while self._features[i] is None and i in self._busy:  # another thread is on it: wait
                if not self._busy[i].is_alive():
                    del self._busy[i]
                    break
                self._ready.wait(_WAIT_S)
            features = self._features[i]
            if features is None:
                self._busy[i] = threading.current_thread()
                self._demands += 1
        if features is None:
            started = time.perf_counter()
            try:
                features = self._embed(i)
            finally:
                with self._ready:
                    self._busy.pop(i, None)
                    self._demands -= 1
                    self._ready.notify_all()
            if self._worker is None:
                self._log(f"{PREFIX} slice {i} ready in {time.perf_counter() - started:.1f} s; "
                          f"the other {len(self) - 1} follow in the background")
        self._start_fill()
        _show(self._predictor, features, self._sizes)
        return features

    # -- what the tests, benchmarks and a curious user read -------------------------------------
    @property
    def ready(self) -> int:
        """How many slices are embedded (or read from the store) so far."""
        return sum(f is not None for f in self._features)

    def is_ready(self, index: int) -> bool:
        return self._features[index] is not None

    @property
    def filling(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the background fill; True once it has ended."""
        if self._worker is not None:
            self._worker.join(timeout)
        return not self.filling

    def close(self) -> None:
        """Stop the background fill after the slice it is computing."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    # -- embedding ----------------------------------------------------------------------------------
    def _embed(self, i: int):
        pixels = self._pixels(i)
        key = self._stored.key(pixels)
        features = self._stored.get(key)
        computed = features is None
        if computed:
            clone = copy.copy(self._predictor)  # own attributes: the tool's predictor is never half-set
            type(self._predictor).set_image(clone, pixels)
            features = clone.features
            self._stored.put(key, features)
        with self._ready:
            self.stats["computed" if computed else "stored"] += 1
            if self._sizes is None:
                self._sizes = _sizes(self._predictor, pixels)
            self._features[i] = features
        return features

    def _replaced(self) -> bool:
        if self._closed:
            return True
        if self._owner is None:
            return False
        owner = self._owner()
        return owner is None or (self._attribute is not None and getattr(owner, self._attribute, None) is not self)

    def _start_fill(self) -> None:
        with self._ready:
            if self._worker is not None or self._closed or None not in self._features:
                return
            self._worker = threading.Thread(target=self._fill, name="medico-lazy-embeddings", daemon=True)
        self._worker.start()

    def _next(self) -> int | None:
        todo = [j for j, f in enumerate(self._features) if f is None and j not in self._busy]
        return min(todo, key=lambda j: (abs(j - self._focus), j)) if todo else None

    def _fill(self) -> None:
        started = time.perf_counter()
        while True:
            with self._ready:
                while self._demands and not self._closed:  # a prompt waits for its slice: let it have the CPU
                    self._ready.wait(_WAIT_S)
                i = None if self._replaced() else self._next()
                if i is None:
                    break
                self._busy[i] = threading.current_thread()
            try:
                self._embed(i)
            except Exception as e:
                self._log(f"{PREFIX} background embedding stopped at slice {i} ({type(e).__name__}: {e}); "
                          "the other slices are embedded when a prompt needs them")
                return
            finally:
                with self._ready:
                    self._busy.pop(i, None)
                    self._ready.notify_all()
        if self.ready == len(self):
            where = f" ({self._stored.store.root})" if self._stored.store is not None else ""
            self._log(f"{PREFIX} all {len(self)} slices ready in {time.perf_counter() - started:.0f} s: "
                      f"{self.stats['computed']} embedded, {self.stats['stored']} from the store{where}")
