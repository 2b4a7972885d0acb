"""Read medical images with SimpleITK, turn them into SAM's 8-bit RGB, write masks back.

Why SimpleITK: one reader covers NIfTI, NRRD, MHA, DICOM series and PNG/TIFF and keeps the
physical geometry (spacing, origin, direction), so a mask written here overlays the input in
any viewer. Arrays are numpy in SimpleITK's index order reversed: ``(z, y, x)`` for volumes,
``(y, x)`` or ``(y, x, 3)`` for 2D images.

Intensity normalisation is explicit and recorded: CT window presets, a percentile stretch
(0.5-99.5 % over the *whole volume*, so neighbouring slices share one mapping), or ``microsam``:
micro-sam's own per-slice min-max, so that the kit embeds the pixels micro-sam embeds and both
share the embedding store's entries. Nothing here judges segmentation accuracy; that comes from the
model weights and is not measured in this kit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medico_adapters import fsio
from medico_adapters.errors import ImageError

__all__ = [
    "WINDOWS",
    "Geometry",
    "ImageInfo",
    "LoadedImage",
    "read_image",
    "read_info",
    "write_mask",
    "to_uint8",
    "normalise",
]

#: CT window presets, name -> (width, level) in Hounsfield units.
WINDOWS = {
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}
PERCENTILES = (0.5, 99.5)
#: the ``window`` that normalises as micro-sam does (see ``normalise``).
MICROSAM = "microsam"
_MASK_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff")


@dataclass(frozen=True)
class Geometry:
    """Physical placement of the image grid, in SimpleITK's (x, y[, z]) order."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def dimension(self) -> int:
        return len(self.size)

    def as_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


@dataclass
class LoadedImage:
    """Pixels plus geometry; ``rgb`` is True for (y, x, 3) colour images."""

    array: np.ndarray
    geometry: Geometry
    path: str
    rgb: bool = False

    @property
    def is_volume(self) -> bool:
        return self.geometry.dimension == 3


def _reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()[:160]
    return (lines[-1] if lines else type(error).__name__)[:160]


def _dicom_files(folder: Path) -> list[str]:
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise ImageError(f"{folder}: a folder without a DICOM series")
    if len(ids) > 1:
        raise ImageError(f"{folder}: holds {len(ids)} DICOM series; point at a folder with one series")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def _check_series(folder: Path, files: list[str]) -> None:
    """Refuse series whose slices differ in size or are not evenly spaced (missing slices)."""
    sizes, positions, normal = set(), [], None
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise ImageError(f"{folder}: DICOM slice {Path(name).name} cannot be read ({_reason(e)})") from None
        sizes.add(tuple(reader.GetSize()[:2]))
        origin = np.array(reader.GetOrigin())
        if normal is None:
            direction = np.array(reader.GetDirection()).reshape(3, 3)
            normal = direction[:, 2]
        positions.append(float(origin @ normal))
    if len(sizes) > 1:
        raise ImageError(f"{folder}: inconsistent DICOM series (slices of sizes {sorted(sizes)})")
    if len(positions) > 2:
        steps = np.diff(np.sort(positions))
        if steps.min() <= 0 or (steps.max() - steps.min()) > 0.01 * abs(np.median(steps)) + 1e-4:
            raise ImageError(f"{folder}: inconsistent DICOM series (uneven slice spacing or missing slices)")


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise ImageError(f"{path}: no such file or folder")
    if path.is_dir():
        files = _dicom_files(path)
        _check_series(path, files)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        try:
            return reader.Execute()
        except RuntimeError as e:
            raise ImageError(f"{path}: DICOM series cannot be read ({_reason(e)})") from None
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ImageError(f"{path}: not a readable image ({_reason(e)})") from None


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, before any pixel is read: enough to plan memory and to tell 2D from 3D."""

    dimension: int
    size: tuple[int, ...]  # SimpleITK's (x, y[, z]) order
    components: int
    bytes_per_component: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.size, dtype=np.int64)) * self.components * self.bytes_per_component


def read_info(path: str | os.PathLike) -> ImageInfo:
    """The header of a 2D image or 3D volume (file or DICOM series folder); a 4D file with one
    time point counts as 3D, as ``read_image`` reads it."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file or folder")
    files = _dicom_files(path) if path.is_dir() else [str(path)]
    if not path.is_dir() and path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty")
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ImageError(f"{path}: not a readable image ({_reason(e)})") from None
    size = tuple(reader.GetSize())
    if path.is_dir():
        size = (*size[:2], len(files))
    elif len(size) == 4 and size[3] == 1:
        size = size[:3]
    probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    return ImageInfo(len(size), size, reader.GetNumberOfComponents(), probe.GetSizeOfPixelComponent())


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read a 2D image or 3D volume (file or DICOM series folder) with its geometry."""
    path = Path(path)
    image = _read_sitk(path)
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4 and size[3] == 1:
        image = image[:, :, :, 0]
        dim, size = 3, image.GetSize()
    if dim not in (2, 3):
        raise ImageError(f"{path}: a {dim}D image of size {size}; only 2D images and 3D volumes are supported")
    if 0 in size:
        raise ImageError(f"{path}: the image has zero size {size}")
    components = image.GetNumberOfComponentsPerPixel()
    array = sitk.GetArrayFromImage(image)
    rgb = False
    if components > 1:
        if dim != 2 or components not in (3, 4):
            raise ImageError(f"{path}: {components}-component pixels in a {dim}D image are not supported")
        array, rgb = array[..., :3], True
    return LoadedImage(array=np.ascontiguousarray(array), geometry=Geometry.of(image), path=str(path), rgb=rgb)


def _stretch(array: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (array.astype(np.float32) - np.float32(low)) * np.float32(255.0 / max(high - low, 1e-6))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def normalise(array: np.ndarray, window: str | tuple[float, float] | None = None) -> tuple[np.ndarray, dict]:
    """Map intensities to uint8 (same shape) and describe how, for reports and cache keys.

    ``window``: a preset name from ``WINDOWS``, a ``(width, level)`` pair, ``"percentile"``,
    ``"microsam"`` (each slice as micro-sam's annotators normalise it; ``array`` is then a
    (slices, y, x[, 3]) stack or one (y, x) image), or None -- which keeps uint8 images as they
    are and percentile-stretches anything else.
    """
    array = np.asarray(array)
    if array.size == 0:
        raise ImageError("image: zero-size array cannot be normalised")
    if isinstance(window, str) and window.lower() == MICROSAM:
        from medico_adapters.embeddings.microsam import normalise_slices

        pixels = normalise_slices(array[None])[0] if array.ndim == 2 else normalise_slices(array)
        return pixels, {"method": MICROSAM, "scope": "slice", "as": "micro-sam's _to_image (min-max per slice and channel)"}
    if isinstance(window, str) and window.lower() not in ("percentile", "auto"):
        key = window.lower().replace("-", "_").replace(" ", "_")
        if key not in WINDOWS:
            raise ImageError(f"--window {window!r}: unknown preset; use one of {', '.join(WINDOWS)}, percentile or {MICROSAM}")
        width, level = WINDOWS[key]
        return _stretch(array, level - width / 2, level + width / 2), {
            "method": "window", "name": key, "width": width, "level": level,
        }
    if isinstance(window, (tuple, list)):
        width, level = (float(v) for v in window)
        if width <= 0:
            raise ImageError(f"--window {window!r}: the width must be positive")
        return _stretch(array, level - width / 2, level + width / 2), {
            "method": "window", "name": "custom", "width": width, "level": level,
        }
    if window is None and array.dtype == np.uint8:
        return array, {"method": "none", "reason": "already uint8"}
    finite = array[np.isfinite(array)] if np.issubdtype(array.dtype, np.floating) else array
    if finite.size == 0:
        raise ImageError("image: no finite intensities to normalise")
    low, high = (float(v) for v in np.percentile(finite, PERCENTILES))
    return _stretch(np.nan_to_num(array, nan=low), low, high), {
        "method": "percentile", "percentiles": list(PERCENTILES), "low": low, "high": high, "scope": "volume",
    }


def to_uint8(array: np.ndarray, window: str | tuple[float, float] | None = None) -> np.ndarray:
    """``normalise`` without the description."""
    return normalise(array, window)[0]


def _mask_suffix_ok(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in _MASK_SUFFIXES)


def write_mask(mask: np.ndarray, path: str | os.PathLike, geometry: Geometry, metadata: dict[str, str] | None = None) -> Path:
    """Write a label array with the input's geometry (uint8, or uint16 beyond 255 labels);
    ``metadata`` goes into the header where the format keeps key/value pairs (NRRD, NIfTI's descrip)."""
    path = Path(path)
    if path.is_dir() or not _mask_suffix_ok(path):
        raise ImageError(f"{path}: write masks to a .nii.gz, .nrrd, .mha, .png or .tif file")
    mask = np.asarray(mask)
    expected = tuple(reversed(geometry.size))
    if mask.shape != expected:
        raise ImageError(f"{path}: mask shape {mask.shape} does not match the image's {expected}")
    dtype = np.uint8 if mask.max(initial=0) <= 255 else np.uint16
    image = geometry.apply(sitk.GetImageFromArray(mask.astype(dtype)))
    for key, value in (metadata or {}).items():
        image.SetMetaData(key, value)
    try:
        with fsio.atomic_output(path) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=True)
    except RuntimeError as e:
        raise ImageError(f"{path}: cannot write the mask ({_reason(e)})") from None
    return path
