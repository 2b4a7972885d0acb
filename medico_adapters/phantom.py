"""A small, deterministic CT-like phantom (Hounsfield units, 1 mm spacing) for demos and tests.

An axial stack through the lower thorax / upper abdomen: air around an elliptical body whose
outer layer is fat-like (~0 HU) around soft tissue (40 HU), two lungs (-800 HU) that shrink
towards the feet, a vertebra (700 HU) with an aorta in front of it, a liver-like organ (60 HU)
that grows towards the feet, and a round hypodense lesion (10 HU) inside the liver. The middle
slice shows every structure. Gaussian noise from a fixed seed makes it look like CT while
keeping every call byte-identical.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from medico_adapters import fsio

SHAPE = (48, 128, 128)
SPACING = (1.0, 1.0, 1.0)  # z, y, x in mm

#: label value -> (name, nominal HU); later structures are painted over earlier ones.
STRUCTURES = {
    1: ("body", 0),
    2: ("soft_tissue", 40),
    3: ("lung", -800),
    4: ("aorta", 50),
    5: ("bone", 700),
    6: ("liver", 60),
    7: ("lesion", 10),
}
AIR_HU = -1000
LABELS = {name: value for value, (name, _) in STRUCTURES.items()}
HU = {name: hu for name, hu in STRUCTURES.values()} | {"air": AIR_HU}

#: CT display windows (width, level) in HU.
WINDOWS = {"soft_tissue": (400, 40), "lung": (1500, -600), "bone": (1800, 400)}


@dataclass(frozen=True)
class Phantom:
    volume: np.ndarray  # int16 HU, (z, y, x)
    labels: np.ndarray  # uint8 structure labels (see LABELS)
    spacing: tuple[float, float, float] = SPACING
    landmarks: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def middle(self) -> int:
        return self.volume.shape[0] // 2

    def mask(self, name: str) -> np.ndarray:
        return self.labels == LABELS[name]


def _ellipsoid(grid, center, radii) -> np.ndarray:
    zz, yy, xx = grid
    cz, cy, cx = center
    rz, ry, rx = radii
    return ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _cylinder(grid, center_yx, radii_yx) -> np.ndarray:
    _, yy, xx = grid
    return ((yy - center_yx[0]) / radii_yx[0]) ** 2 + ((xx - center_yx[1]) / radii_yx[1]) ** 2 <= 1.0


def make_phantom(shape: tuple[int, int, int] = SHAPE, *, noise: float = 8.0, seed: int = 0) -> Phantom:
    """Build the phantom; geometry scales with ``shape`` (defaults to 48 x 128 x 128 voxels)."""
    nz, ny, nx = shape
    if min(shape) < 8:
        raise ValueError(f"phantom shape {shape} is too small (each side needs at least 8 voxels)")
    grid = np.meshgrid(
        np.arange(nz, dtype=np.float32), np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32),
        indexing="ij",
    )
    sy, sx, sz = ny / 128.0, nx / 128.0, nz / 48.0
    mid_z, cy, cx = (nz - 1) / 2.0, (ny - 1) / 2.0, (nx - 1) / 2.0
    tall = nz * 10.0  # a z radius that makes an ellipsoid a cylinder over the stack

    # Image rows grow towards the patient's back (posterior), columns towards the patient's left,
    # so the patient's right side (the liver) is on the image's left, as radiologists view it.
    lesion_center = (int(round(mid_z)), int(round(cy - 2 * sy)), int(round(cx - 28 * sx)))
    shapes = [
        ("body", _cylinder(grid, (cy, cx), (46 * sy, 60 * sx))),
        ("soft_tissue", _cylinder(grid, (cy, cx), (40 * sy, 54 * sx))),
        ("lung", _ellipsoid(grid, (mid_z - 14 * sz, cy + 8 * sy, cx - 27 * sx), (26 * sz, 26 * sy, 20 * sx))
                 | _ellipsoid(grid, (mid_z - 14 * sz, cy + 8 * sy, cx + 27 * sx), (26 * sz, 26 * sy, 20 * sx))),
        ("aorta", _cylinder(grid, (cy + 16 * sy, cx + 6 * sx), (5 * sy, 5 * sx))),
        ("bone", _ellipsoid(grid, (mid_z, cy + 29 * sy, cx), (tall, 9 * sy, 10 * sx))
                 | _cylinder(grid, (cy + 39 * sy, cx), (5 * sy, 3 * sx))),
        ("liver", _ellipsoid(grid, (mid_z + 14 * sz, cy - 4 * sy, cx - 26 * sx), (30 * sz, 28 * sy, 24 * sx))),
        ("lesion", _ellipsoid(grid, lesion_center, (7 * sz, 7 * sy, 7 * sx))),
    ]
    labels = np.zeros(shape, dtype=np.uint8)
    for name, inside in shapes:
        if name == "lesion":
            inside &= labels == LABELS["liver"]
        labels[inside] = LABELS[name]

    lut = np.full(256, AIR_HU, dtype=np.float32)
    for value, (_, hu) in STRUCTURES.items():
        lut[value] = hu
    volume = lut[labels]
    if noise:
        rng = np.random.default_rng(seed)
        volume = volume + rng.normal(0.0, noise, size=shape).astype(np.float32)
    volume = np.clip(np.rint(volume), -1024, 3071).astype(np.int16)

    landmarks = {
        "lesion": lesion_center,
        # well inside the liver and away from the lesion, for organ clicks
        "liver": (lesion_center[0], int(round(cy - 18 * sy)), int(round(cx - 24 * sx))),
        "spine": (int(round(mid_z)), int(round(cy + 29 * sy)), int(round(cx))),
    }
    return Phantom(volume=volume, labels=labels, landmarks=landmarks)


def window(image: np.ndarray, width: float = 400, level: float = 40) -> np.ndarray:
    """HU -> uint8 with a CT window (default soft tissue W400/L40)."""
    low = level - width / 2.0
    scaled = (np.asarray(image, dtype=np.float32) - low) / float(width)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write(phantom: Phantom, path: str | os.PathLike) -> str:
    """Save the volume (NIfTI, NRRD, MHA: anything SimpleITK writes) with its 1 mm spacing."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(phantom.volume)
    img.SetSpacing(tuple(float(s) for s in reversed(phantom.spacing)))
    with fsio.atomic_output(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
    return str(path)
