"""Segment a 2D image or a 3D volume from point/box prompts, or automatically, from a file.

Why it looks like this: a volume has hundreds of slices and one ViT-B embedding costs seconds on
a CPU, so slices are embedded lazily (only the prompted slice and those propagation reaches) and
every embedding goes through the kit's embedding store (``medico_adapters.embeddings.store``),
keyed by the encoder's weights, the slice's pixels after normalisation and SAM's input size.
Re-running on the same volume, a ``precompute`` run before it, or a patched tool that embedded the
same slice with the same weights, means reading embeddings instead of computing them; a changed
window or checkpoint gives other pixels or weights, so other keys, never stale embeddings.

Propagation follows micro-sam's ``segment_mask_in_volume``: from the prompted slice, each next
slice (up, then down) is prompted with the bounding box and the low-res logits of the previous
slice's mask; it stops where the mask vanishes or its IoU with the previous slice's mask falls
below ``iou_threshold``, and that slice is not kept.

Prompt conventions (used by ``medico-adapters segment``):

* points: ``(z, y, x[, label])`` for volumes, ``(y, x[, label])`` for 2D images; label 1 is
  foreground (default), 0 background. ``(y, x[, label])`` is accepted in a volume together with
  ``slice_index``;
* boxes: ``(z, y0, x0, y1, x1)`` for volumes, ``(y0, x0, y1, x1)`` for 2D, corners inclusive;
  at most one box (one object) per call;
* all prompts of a call lie on one slice and describe one object, labelled 1 in the output.

Segmentation quality comes from MedicoSAM's weights and is not measured here.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from medico_adapters import fsio
from medico_adapters.embeddings.store import EmbeddingStore
from medico_adapters.errors import CheckpointError, ImageError
from medico_adapters.io import LoadedImage, normalise, read_image, write_mask
from medico_adapters.predictor import Embedding, Predictor

__all__ = ["VolumePredictor", "propagate", "segment", "DEFAULT_IOU_THRESHOLD"]

DEFAULT_IOU_THRESHOLD = 0.5
AUTO_POINTS_PER_SIDE = 16


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="slice", disable=not enabled, leave=False)


class VolumePredictor:
    """Prompt any slice of a (z, y, x[, 3]) uint8 volume; embeddings computed on demand.

    ``store`` is where embeddings are read and written (None: computed every time, kept in
    memory only). ``stats`` counts the slices ``computed`` and those read ``from_cache``.
    """

    def __init__(self, predictor: Predictor, volume: np.ndarray, *, store: EmbeddingStore | None = None) -> None:
        volume = np.asarray(volume)
        if volume.dtype != np.uint8:
            raise ImageError(f"volume: expected uint8 after normalisation, got {volume.dtype}")
        if volume.ndim not in (3, 4) or 0 in volume.shape:
            raise ImageError(f"volume: expected a non-empty (z, y, x[, 3]) array, got shape {volume.shape}")
        self.predictor = predictor
        self.volume = volume
        self.store = store
        self.stats = {"computed": 0, "from_cache": 0}
        self._memory: dict[int, Embedding] = {}

    @property
    def n_slices(self) -> int:
        return self.volume.shape[0]

    def embedding(self, z: int) -> Embedding:
        """The embedding of slice ``z``: from memory, else from the store, else computed (and stored)."""
        if z not in self._memory:
            emb, computed = self.predictor.embed_stored(self.volume[z], self.store)
            self.stats["computed" if computed else "from_cache"] += 1
            self._memory[z] = emb
        return self._memory[z]

    def embed_slices(self, slices: Sequence[int], progress: bool = True) -> None:
        """Make sure the given slices are embedded (cached or computed), with a progress bar."""
        for z in _progress(slices, len(slices), "embedding", progress and len(slices) > 1):
            self.embedding(z)

    def predict_slice(
        self,
        z: int,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = False,
    ) -> tuple[np.ndarray, float, np.ndarray]:
        """Best mask (y, x bool), its score and its 256x256 logits; points are (x, y) like SAM."""
        self.predictor.set_embedding(self.embedding(z))
        masks, scores, logits = self.predictor.predict(
            point_coords=points, point_labels=labels, box=box, mask_input=mask_input,
            multimask_output=multimask_output,
        )
        best = int(np.argmax(scores))
        return masks[best], float(scores[best]), logits[best]

    def propagate(
        self,
        z: int,
        mask: np.ndarray,
        logits: np.ndarray | None = None,
        iou_threshold: float = DEFAULT_IOU_THRESHOLD,
        progress: bool = True,
    ) -> tuple[np.ndarray, dict]:
        """Extend the mask of slice ``z`` through the volume; see ``propagate``."""

        def step(k: int, prev_mask: np.ndarray, prev_logits: np.ndarray | None):
            m, _, lg = self.predict_slice(k, box=mask_box(prev_mask), mask_input=None if prev_logits is None else prev_logits[None])
            return m, lg

        return propagate(step, self.n_slices, z, mask, logits, iou_threshold, progress)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """SAM box (x0, y0, x1, y1) around a 2D mask."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def propagate(
    step: Callable[[int, np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray | None]],
    n_slices: int,
    z: int,
    mask: np.ndarray,
    logits: np.ndarray | None = None,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    progress: bool = True,
) -> tuple[np.ndarray, dict]:
    """Carry a 2D mask from slice ``z`` up and down a volume of ``n_slices``.

    ``step(k, previous_mask, previous_logits) -> (mask_k, logits_k)`` segments slice ``k``.
    Each direction stops at the volume's end, where the mask vanishes, or where the IoU with the
    previous slice's mask drops below ``iou_threshold`` (that slice is left empty). Returns the
    3D boolean mask and ``{"up": reason, "down": reason, "slices": [first, last]}``.
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros((n_slices, *mask.shape), dtype=bool)
    out[z] = mask
    report = {"iou_threshold": iou_threshold}
    if not mask.any():
        report.update(up="empty start mask", down="empty start mask", slices=[z, z])
        return out, report
    extent = [z, z]
    for name, direction in (("up", 1), ("down", -1)):
        prev, prev_logits, k = mask, logits, z + direction
        reason = "end of volume"
        todo = (n_slices - 1 - z) if direction > 0 else z
        with _progress(None, todo, f"propagating {name}", progress and todo > 1) as bar:
            while 0 <= k < n_slices:
                new, new_logits = step(k, prev, prev_logits)
                new = np.asarray(new, dtype=bool)
                if not new.any():
                    reason = f"mask vanished at slice {k}"
                    break
                overlap = iou(prev, new)
                if overlap < iou_threshold:
                    reason = f"IoU {overlap:.2f} < {iou_threshold} at slice {k}"
                    break
                out[k] = new
                extent[0 if direction < 0 else 1] = k
                prev, prev_logits, k = new, new_logits, k + direction
                bar.update(1)
        report[name] = reason
    report["slices"] = extent
    return out, report


# -- the CLI-facing function --------------------------------------------------------------------
def default_checkpoint() -> Path:
    from medico_adapters.registry import MEDICOSAM, cached_path

    path = cached_path(MEDICOSAM)
    if path is None:
        raise CheckpointError(
            f"no checkpoint given and {MEDICOSAM} is not cached; pass --checkpoint CKPT "
            f"or run `medico-adapters fetch {MEDICOSAM}`"
        )
    return path


def _parse_points(points, is_volume: bool, slice_index: int | None) -> list[tuple[int | None, int, int, int]]:
    parsed = []
    for p in points or ():
        p = tuple(p)
        if is_volume and len(p) in (3, 4):
            z, y, x, label = (*p, 1)[:4]
        elif len(p) in (2, 3) and (not is_volume or slice_index is not None):
            z, (y, x, label) = slice_index, (*p, 1)[:3]
        else:
            form = "Z,Y,X[:LABEL]" if is_volume else "Y,X[:LABEL]"
            raise ImageError(f"--point {p}: expected {form}")
        if int(label) not in (0, 1):
            raise ImageError(f"--point {p}: label must be 1 (foreground) or 0 (background), got {label}")
        parsed.append((None if z is None else int(z), int(y), int(x), int(label)))
    return parsed


def _parse_box(boxes, is_volume: bool, slice_index: int | None):
    boxes = list(boxes or ())
    if len(boxes) > 1:
        raise ImageError(f"--box: {len(boxes)} boxes given; one call segments one object (give one box)")
    if not boxes:
        return None
    b = tuple(int(v) for v in boxes[0])
    if is_volume and len(b) == 5:
        return b
    if len(b) == 4 and (not is_volume or slice_index is not None):
        return (slice_index, *b)
    raise ImageError(f"--box {b}: expected {'Z,Y0,X0,Y1,X1' if is_volume else 'Y0,X0,Y1,X1'}")


def _check_inside(name: str, value: tuple, shape: tuple[int, ...], coords: Sequence[tuple[int, int]]) -> None:
    for index, axis in coords:
        v = value[index]
        if v is None or not 0 <= v < shape[axis]:
            raise ImageError(f"{name} {value}: outside the image of shape {tuple(shape)}")


def _overlay_png(image: np.ndarray, labels: np.ndarray, path: str | os.PathLike) -> str:
    """Blend labels over one slice (red for a single object, a palette for many)."""
    from PIL import Image

    rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    rgb = rgb.astype(np.float32)
    palette = np.random.default_rng(7).integers(60, 256, size=(int(labels.max(initial=0)) + 1, 3))
    palette[min(1, len(palette) - 1)] = (255, 0, 0)
    colour = palette[labels].astype(np.float32)
    inside = labels[..., None] > 0
    blended = np.where(inside, 0.5 * rgb + 0.5 * colour, rgb)
    path = Path(path)
    with fsio.atomic_output(path) as tmp:
        Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(tmp)
    return str(path)


def _auto_labels(predictor: Predictor, image: np.ndarray, points_per_side: int) -> np.ndarray:
    from segment_anything import SamAutomaticMaskGenerator

    from medico_adapters.predictor import as_rgb

    generator = SamAutomaticMaskGenerator(predictor.model, points_per_side=points_per_side, points_per_batch=64)
    with torch.inference_mode():
        records = generator.generate(as_rgb(image))
    labels = np.zeros(image.shape[:2], dtype=np.uint16)
    for i, rec in enumerate(sorted(records, key=lambda r: r["area"], reverse=True), start=1):
        labels[rec["segmentation"]] = i  # smaller masks drawn last stay visible
    return labels


def segment(
    image_path: str | os.PathLike,
    out_path: str | os.PathLike,
    points: Sequence[Sequence[int]] | None = None,
    boxes: Sequence[Sequence[int]] | None = None,
    auto: bool = False,
    checkpoint: str | os.PathLike | None = None,
    window: str | tuple[float, float] | None = None,
    overlay: str | os.PathLike | None = None,
    slice_index: int | None = None,
    device: str | None = None,
    exact: bool = True,
    *,
    propagate_masks: bool = True,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    points_per_side: int = AUTO_POINTS_PER_SIDE,
    cache: bool = True,
    store: str | os.PathLike | EmbeddingStore | None = None,
    progress: bool = True,
    predictor: Predictor | None = None,
    backend: str = "auto",
) -> dict:
    """Segment ``image_path`` and write the label image to ``out_path``; return a report dict.

    ``predictor`` lets a caller reuse a loaded model (then ``checkpoint``/``device``/``exact``/
    ``backend`` are taken from it). ``store`` is the embedding store (its folder, or None for
    ``default_root()``); ``cache=False`` computes every embedding and stores none. See the
    module docstring for the prompt conventions.
    """
    started = time.perf_counter()
    if auto and (points or boxes):
        raise ImageError("--auto: cannot be combined with --point/--box prompts")
    if not auto and not points and not boxes:
        raise ImageError("segment: give --point, --box or --auto")
    loaded: LoadedImage = read_image(image_path)
    volume = loaded.array if loaded.is_volume else loaded.array[None]
    shape = volume.shape[:3]
    if slice_index is not None and not 0 <= slice_index < shape[0]:
        raise ImageError(f"--slice {slice_index}: outside the volume's {shape[0]} slices")

    pts = _parse_points(points, loaded.is_volume, slice_index)
    box = _parse_box(boxes, loaded.is_volume, slice_index)
    if not loaded.is_volume:
        pts = [(0, y, x, lab) for _, y, x, lab in pts]
        box = None if box is None else (0, *box[1:])
    for p in pts:
        _check_inside("--point", p[:3], shape, [(0, 0), (1, 1), (2, 2)])
    if box is not None:
        _check_inside("--box", box, shape, [(0, 0), (1, 1), (2, 2), (3, 1), (4, 2)])
        if box[3] < box[1] or box[4] < box[2]:
            raise ImageError(f"--box {box}: expected y0 <= y1 and x0 <= x1")
    zs = {p[0] for p in pts} | ({box[0]} if box is not None else set())
    if len(zs) > 1:
        raise ImageError(f"--point/--box: prompts lie on slices {sorted(zs)}; give prompts on one slice")
    if slice_index is not None and zs and zs != {slice_index}:
        raise ImageError(f"--slice {slice_index}: the prompts lie on slice {zs.pop()}")
    z = zs.pop() if zs else (slice_index if slice_index is not None else shape[0] // 2)

    pixels, norm = normalise(volume, window)
    if predictor is None:
        say = (lambda line: print(f"medico-adapters: {line}", file=sys.stderr, flush=True)) if progress else None
        predictor = Predictor(
            checkpoint if checkpoint is not None else default_checkpoint(), device=device, exact=exact, backend=backend,
            log=say,
        )
    if not cache:
        store = None
    elif not isinstance(store, EmbeddingStore):
        store = EmbeddingStore(store)
    vp = VolumePredictor(predictor, pixels, store=store)

    report = {
        "image": str(image_path), "output": str(out_path), "shape": list(loaded.array.shape),
        "mode": "auto" if auto else "prompt", "slice": z, "normalisation": norm,
        "checkpoint": predictor.checkpoint_path, "device": str(predictor.device), "exact": predictor.exact,
        **predictor.describe(),
    }
    labels = np.zeros(shape, dtype=np.uint16 if auto else np.uint8)
    if auto:
        labels[z] = _auto_labels(predictor, pixels[z], points_per_side)
        report["objects"] = int(labels[z].max())
    else:
        coords = np.array([[x, y] for _, y, x, _ in pts], dtype=np.float64) if pts else None
        labs = np.array([lab for *_, lab in pts]) if pts else None
        sam_box = None if box is None else np.array([box[2], box[1], box[4], box[3]], dtype=np.float64)
        multi = box is None and len(pts) == 1
        mask, score, logits = vp.predict_slice(z, coords, labs, sam_box, multimask_output=multi)
        report["score"] = score
        if loaded.is_volume and propagate_masks and shape[0] > 1:
            masks3d, prop = vp.propagate(z, mask, logits, iou_threshold, progress)
            report["propagation"] = prop
            labels[masks3d] = 1
        else:  # a 2D image, or only the prompted slice of a volume
            labels[z][mask] = 1
        report["voxels"] = int(np.count_nonzero(labels))
    write_mask(labels if loaded.is_volume else labels[0], out_path, loaded.geometry)
    if overlay is not None:
        report["overlay"] = _overlay_png(pixels[z], labels[z], overlay)
    report["embeddings"] = dict(vp.stats, store=str(store.root) if store is not None else None)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report
