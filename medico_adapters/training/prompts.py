"""Prompts simulated from ground truth, as SAM and micro-sam train and evaluate with them.

Training draws them at random (from a ``numpy.random.Generator`` the run seeds and checkpoints):
a positive point anywhere inside the object, or its bounding box with each side moved by up to
10 % of the box size (SAM's jitter); then, in each correction round, one point in the region the
previous mask got wrong -- a positive one where it missed the object, a negative one where it
spilled over (micro-sam's ``IterativePromptGenerator`` samples both kinds each round; one point
per round halves the prompt growth and keeps rounds cheap on a CPU).

Evaluation places them deterministically, so before and after are measured on the same prompts:
the object's centre (the pixel farthest from its border), its tight box, and each correction at
the centre of the larger error region. Coordinates are (x, y) pixels of the slice, as SAM takes them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["centre", "correction", "jittered_box", "random_correction", "random_point", "tight_box"]

BOX_JITTER = 0.1


def centre(mask: np.ndarray) -> tuple[int, int]:
    """The pixel farthest from the object's border, (x, y); ties go to the first in raster order."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x), int(y)


def random_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    ys, xs = np.nonzero(mask)
    i = int(rng.integers(len(ys)))
    return int(xs[i]), int(ys[i])


def tight_box(mask: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) around the object, corners inclusive."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def jittered_box(mask: np.ndarray, rng: np.random.Generator, jitter: float = BOX_JITTER) -> np.ndarray:
    """The tight box with each side moved by a uniform draw of up to ``jitter`` of its size, clipped."""
    box = tight_box(mask)
    size = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2)
    box = box + rng.uniform(-jitter, jitter, size=4) * size
    h, w = mask.shape
    box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
    lo, hi = np.minimum(box[:2], box[2:]), np.maximum(box[:2], box[2:])
    return np.concatenate([lo, hi])


def _errors(mask: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask, predicted = mask.astype(bool), predicted.astype(bool)
    return mask & ~predicted, predicted & ~mask  # missed, spilled


def random_correction(mask: np.ndarray, predicted: np.ndarray, rng: np.random.Generator) -> tuple[tuple[int, int], int]:
    """A point in the larger error region: (x, y) and label 1 (missed object) or 0 (spill).

    A perfect prediction gets a positive point inside the object, which changes nothing.
    """
    missed, spilled = _errors(mask, predicted)
    if missed.sum() >= spilled.sum() and missed.any():
        return random_point(missed, rng), 1
    if spilled.any():
        return random_point(spilled, rng), 0
    return random_point(mask, rng), 1


def correction(mask: np.ndarray, predicted: np.ndarray) -> tuple[tuple[int, int], int]:
    """The evaluation's correction click: the centre of the largest connected error, labelled
    as the kind of error it is (1 missed, 0 spilled)."""
    missed, spilled = _errors(mask, predicted)
    best = None
    for region, label in ((missed, 1), (spilled, 0)):
        if not region.any():
            continue
        parts, count = ndimage.label(region)
        sizes = ndimage.sum_labels(region, parts, index=np.arange(1, count + 1))
        largest = int(np.argmax(sizes)) + 1
        if best is None or sizes[largest - 1] > best[0]:
            best = (sizes[largest - 1], parts == largest, label)
    if best is None:
        return centre(mask), 1
    return centre(best[1]), best[2]
