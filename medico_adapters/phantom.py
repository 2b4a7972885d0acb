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
from pathlib import Path

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


@dataclass(frozen=True)
class Anatomy:
    """Where and how large each structure is, in voxels of the 48 x 128 x 128 reference grid
    (``make_phantom`` scales them to its shape). The defaults are the demo phantom; ``vary`` draws
    another patient."""

    body: tuple[float, float] = (46, 60)  # y, x radii
    fat: float = 6  # thickness of the fat-like outer layer
    lung_offset: tuple[float, float, float] = (-14, 8, 27)  # z, y, |x| of each lung's centre
    lung_radii: tuple[float, float, float] = (26, 26, 20)
    aorta: tuple[float, float, float] = (16, 6, 5)  # y, x offset and radius
    vertebra: tuple[float, float, float] = (29, 9, 10)  # y offset, y and x radii
    liver_offset: tuple[float, float, float] = (14, -4, -26)
    liver_radii: tuple[float, float, float] = (30, 28, 24)
    #: lesions as (z, y, x) offsets from the liver's centre plus a radius
    lesions: tuple[tuple[float, float, float, float], ...] = ((-14, 2, -2, 7),)
    hu_shift: float = 0.0  # a per-scan calibration offset added to every tissue


def vary(seed: int) -> Anatomy:
    """A plausible other patient: organ sizes and places, 0-3 lesions, tissue HU shifted a little."""
    rng = np.random.default_rng(seed)

    def jitter(values, spread):
        return tuple(float(v + rng.uniform(-spread, spread)) for v in values)

    scale = rng.uniform(0.88, 1.08)
    lesions = []
    for _ in range(int(rng.integers(0, 4))):
        radius = rng.uniform(3.5, 8.0)
        lesions.append((float(rng.uniform(-18, 18)), *jitter((0, 0), 12), float(radius)))
    return Anatomy(
        body=(46 * scale, 60 * scale),
        fat=float(rng.uniform(4, 8)),
        lung_offset=jitter((-14, 8, 27), 3),
        lung_radii=tuple(r * rng.uniform(0.8, 1.15) for r in (26, 26, 20)),
        aorta=(*jitter((16, 6), 2), float(rng.uniform(4, 6))),
        vertebra=(float(29 * scale), *jitter((9, 10), 1)),
        liver_offset=jitter((14, -4, -26), 4),
        liver_radii=tuple(r * rng.uniform(0.8, 1.15) for r in (30, 28, 24)),
        lesions=tuple(lesions),
        hu_shift=float(rng.uniform(-15, 15)),
    )


def make_phantom(
    shape: tuple[int, int, int] = SHAPE, *, noise: float = 8.0, seed: int = 0, anatomy: Anatomy | None = None
) -> Phantom:
    """Build the phantom; geometry scales with ``shape`` (defaults to 48 x 128 x 128 voxels).

    ``seed`` draws the noise; ``anatomy`` places the organs (default: the demo patient;
    ``vary(seed)`` for a cohort whose cases really differ).
    """
    nz, ny, nx = shape
    if min(shape) < 8:
        raise ValueError(f"phantom shape {shape} is too small (each side needs at least 8 voxels)")
    a = anatomy or Anatomy()
    grid = np.meshgrid(
        np.arange(nz, dtype=np.float32), np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32),
        indexing="ij",
    )
    sy, sx, sz = ny / 128.0, nx / 128.0, nz / 48.0
    mid_z, cy, cx = (nz - 1) / 2.0, (ny - 1) / 2.0, (nx - 1) / 2.0
    tall = nz * 10.0  # a z radius that makes an ellipsoid a cylinder over the stack

    # Image rows grow towards the patient's back (posterior), columns towards the patient's left,
    # so the patient's right side (the liver) is on the image's left, as radiologists view it.
    lz, ly, lx = a.lung_offset
    liver_c = (mid_z + a.liver_offset[0] * sz, cy + a.liver_offset[1] * sy, cx + a.liver_offset[2] * sx)
    lesion_centers = [
        (int(round(liver_c[0] + dz * sz)), int(round(liver_c[1] + dy * sy)), int(round(liver_c[2] + dx * sx)))
        for dz, dy, dx, _ in a.lesions
    ]
    lesion = np.zeros(shape, dtype=bool)
    for (z0, y0, x0), (*_, r) in zip(lesion_centers, a.lesions, strict=False):
        lesion |= _ellipsoid(grid, (z0, y0, x0), (r * sz, r * sy, r * sx))
    vy, vry, vrx = a.vertebra
    shapes = [
        ("body", _cylinder(grid, (cy, cx), (a.body[0] * sy, a.body[1] * sx))),
        ("soft_tissue", _cylinder(grid, (cy, cx), ((a.body[0] - a.fat) * sy, (a.body[1] - a.fat) * sx))),
        ("lung", _ellipsoid(grid, (mid_z + lz * sz, cy + ly * sy, cx - lx * sx), [r * s for r, s in zip(a.lung_radii, (sz, sy, sx), strict=False)])
                 | _ellipsoid(grid, (mid_z + lz * sz, cy + ly * sy, cx + lx * sx), [r * s for r, s in zip(a.lung_radii, (sz, sy, sx), strict=False)])),
        ("aorta", _cylinder(grid, (cy + a.aorta[0] * sy, cx + a.aorta[1] * sx), (a.aorta[2] * sy, a.aorta[2] * sx))),
        ("bone", _ellipsoid(grid, (mid_z, cy + vy * sy, cx), (tall, vry * sy, vrx * sx))
                 | _cylinder(grid, (cy + (vy + 10) * sy, cx), (5 * sy, 3 * sx))),
        ("liver", _ellipsoid(grid, liver_c, [r * s for r, s in zip(a.liver_radii, (sz, sy, sx), strict=False)])),
        ("lesion", lesion),
    ]
    labels = np.zeros(shape, dtype=np.uint8)
    for name, inside in shapes:
        if name == "lesion":
            inside &= labels == LABELS["liver"]
        labels[inside] = LABELS[name]

    lut = np.full(256, AIR_HU, dtype=np.float32)
    for value, (_, hu) in STRUCTURES.items():
        lut[value] = hu + a.hu_shift
    volume = lut[labels]
    if noise:
        rng = np.random.default_rng(seed)
        volume = volume + rng.normal(0.0, noise, size=shape).astype(np.float32)
    volume = np.clip(np.rint(volume), -1024, 3071).astype(np.int16)

    first_lesion = lesion_centers[0] if lesion_centers else None
    landmarks = {
        # well inside the liver and away from the lesion, for organ clicks
        "liver": (int(round(mid_z)), int(round(cy - 18 * sy)), int(round(cx - 24 * sx))),
        "spine": (int(round(mid_z)), int(round(cy + vy * sy)), int(round(cx))),
    }
    if first_lesion is not None:
        landmarks = {"lesion": first_lesion, **landmarks}
        landmarks["liver"] = (first_lesion[0], *landmarks["liver"][1:])
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


def write_cohort(folder: str | os.PathLike, cases: int, shape: tuple[int, int, int] = SHAPE, *, seed: int = 0,
                 suffix: str = ".nii.gz") -> str:
    """A Medical Segmentation Decathlon folder of ``cases`` varied phantoms (``vary``): ``dataset.json``,
    ``imagesTr/`` and ``labelsTr/``, as public sets and nnU-Net exports are laid out."""
    import json

    import SimpleITK as sitk

    root = Path(folder)
    training = []
    for i in range(cases):
        case = make_phantom(shape, seed=seed + i, anatomy=vary(seed + i))
        name = f"phantom_{i:03d}{suffix}"
        for sub, array in (("imagesTr", case.volume), ("labelsTr", case.labels)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(tuple(float(s) for s in reversed(case.spacing)))
            with fsio.atomic_output(root / sub / name) as tmp:
                sitk.WriteImage(image, str(tmp), useCompression=True)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    dataset = {
        "name": "MedicoPhantom", "description": "CT-like phantoms from medico_adapters.phantom (varied anatomy)",
        "modality": {"0": "CT"}, "tensorImageSize": "3D",
        "labels": {"0": "background", **{str(v): n for v, (n, _) in STRUCTURES.items()}},
        "numTraining": cases, "numTest": 0, "training": training, "test": [],
    }
    fsio.write_text(root / "dataset.json", json.dumps(dataset, indent=2) + "\n")
    return str(root)
