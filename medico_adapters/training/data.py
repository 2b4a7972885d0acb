"""Labelled scans as users have them, checked and cut into the slices training uses.

Three layouts are found from the folder itself:

* a Medical Segmentation Decathlon folder (``dataset.json`` with a ``training`` list; MONAI's
  ``load_decathlon_datalist`` reads it) or an nnU-Net v2 one (``dataset.json`` with ``labels`` and
  ``file_ending``; ``imagesTr/<case>_0000<ending>`` paired with ``labelsTr/<case><ending>``);
* two folders, images and label maps, matched by file name (``imagesTr/labelsTr``,
  ``images/labels`` or ``images/masks`` inside DATA, or DATA plus ``--labels DIR``): NIfTI, NRRD,
  MHA, DICOM series folders, and 2D PNG/TIFF pairs;
* label maps saved by the annotation tools: napari's labels layer saved as NIfTI or TIFF (a TIFF
  has no geometry, so it takes the image's), Slicer segmentations exported as label maps or saved
  as ``.seg.nrrd`` (segment names from its header; a segmentation cropped to its extent is placed
  back on the image grid when the grids line up).

Everything is read and checked before anything is written: a shape or spacing mismatch, a label
map with non-integer values, a case without a labelled voxel of the chosen objects or an
unreadable file each stop the run with one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medico_adapters.errors import ImageError, MedicoError
from medico_adapters.io import LoadedImage, normalise, read_image

__all__ = ["Case", "Dataset", "DataError", "Slice", "discover", "load_slices", "split_cases"]

_IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff")
# what tools and people append to a label map's name ("case_seg.nii.gz", "case-label.nrrd", ...)
_LABEL_TAIL = re.compile(r"([_\-. ](seg|segmentation|label|labels|labelmap|mask|masks|gt))+$", re.IGNORECASE)
_CHANNEL_TAIL = re.compile(r"_\d{4}$")  # nnU-Net's per-channel suffix, "_0000"
_FOLDER_PAIRS = (("imagesTr", "labelsTr"), ("images", "labels"), ("images", "masks"))
_NO_GEOMETRY = (".png", ".tif", ".tiff")  # formats that store no spacing or origin
SPACING_TOLERANCE = 1e-3  # relative


class DataError(MedicoError):
    """The training data cannot be used as given (one line naming the file and the reason)."""


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    label: Path


@dataclass
class Dataset:
    """The cases found in DATA, with the label names and modality the folder declares."""

    root: Path
    layout: str  # "decathlon", "nnunet" or "folders"
    cases: list[Case]
    label_names: dict[int, str] = field(default_factory=dict)
    modality: str | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"root": str(self.root), "layout": self.layout, "cases": len(self.cases),
                "labels": {str(k): v for k, v in sorted(self.label_names.items())}, "modality": self.modality,
                "notes": self.notes}


@dataclass
class Slice:
    """One 2D training image: the pixels the encoder sees, and the label values on it."""

    case: str
    index: int  # z in the volume; 0 for a 2D image
    pixels: np.ndarray  # H x W or H x W x 3 uint8, after normalisation
    labels: np.ndarray  # H x W int32 label values
    depth: int = 1  # slices in the volume
    neighbours: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # z -> pixels (3D context)


# -- finding the cases --------------------------------------------------------------------------
def _stem(path: Path) -> str:
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name if path.is_dir() else path.stem


def case_key(path: Path) -> str:
    """The name an image and its label map share: extensions, nnU-Net's channel suffix and the
    usual label-map tails removed."""
    stem = _CHANNEL_TAIL.sub("", _stem(path))
    return _LABEL_TAIL.sub("", stem) or stem


def _entries(folder: Path) -> list[Path]:
    """Image files and DICOM series folders in ``folder`` (hidden files and sidecars skipped)."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() or path.name.lower().endswith(_IMAGE_SUFFIXES):
            found.append(path)
    return found


def _match(images: list[Path], labels: list[Path], where: Path) -> tuple[list[Case], list[str]]:
    by_key: dict[str, Path] = {}
    for path in labels:
        key = case_key(path)
        if key in by_key:
            raise DataError(f"{path}: two label maps for case {key!r} ({by_key[key].name} and {path.name})")
        by_key[key] = path
    cases, unmatched = [], []
    for path in images:
        key = case_key(path)
        if key in by_key:
            cases.append(Case(key, path, by_key.pop(key)))
        else:
            unmatched.append(path.name)
    notes = []
    if unmatched:
        notes.append(f"{len(unmatched)} image(s) without a label map skipped: {', '.join(unmatched[:5])}")
    if by_key:
        notes.append(f"{len(by_key)} label map(s) without an image skipped: {', '.join(p.name for p in list(by_key.values())[:5])}")
    if not cases:
        raise DataError(f"{where}: no image and label map share a name (images like case.nii.gz, labels like case.nii.gz or case_seg.nii.gz)")
    return cases, notes


def _label_names(raw) -> dict[int, str]:
    """MSD's ``{"1": "liver"}`` or nnU-Net v2's ``{"liver": 1}`` (regions, lists, are skipped)."""
    names = {}
    for key, value in (raw or {}).items():
        if isinstance(value, str) and str(key).lstrip("-").isdigit():
            names[int(key)] = value
        elif isinstance(value, int) and not isinstance(value, bool):
            names[value] = str(key)
    names.pop(0, None)
    return names


def _modality(meta: dict) -> str | None:
    channels = meta.get("modality") or meta.get("channel_names") or {}
    first = channels.get("0") if isinstance(channels, dict) else None
    return str(first) if first else None


def _decathlon(root: Path, meta: dict) -> tuple[list[Case], str, list[str]]:
    manifest = root / "dataset.json"
    if isinstance(meta.get("training"), list):
        try:
            from monai.data import load_decathlon_datalist
        except ImportError:
            from medico_adapters.errors import MissingDependencyError

            raise MissingDependencyError("finetune needs MONAI: pip install 'medico-adapters[train]'") from None
        try:
            items = load_decathlon_datalist(manifest, True, "training", base_dir=root)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{manifest}: not a Decathlon datalist ({e})") from None
        cases = []
        for item in items:
            image, label = item.get("image"), item.get("label")
            if isinstance(image, list):  # several channels: the first one is used
                image = image[0]
            if not image or not label:
                raise DataError(f"{manifest}: a training entry without image and label ({item})")
            image, label = Path(image), Path(label)
            for path in (image, label):
                if not path.exists():
                    raise DataError(f"{path}: listed in {manifest} but missing")
            cases.append(Case(case_key(image), image, label))
        return cases, "decathlon", []
    ending = meta.get("file_ending")
    if not ending or not (root / "imagesTr").is_dir() or not (root / "labelsTr").is_dir():
        raise DataError(f"{manifest}: neither a Decathlon datalist ('training') nor an nnU-Net v2 dataset "
                        "('file_ending' with imagesTr/ and labelsTr/)")
    images = [p for p in sorted((root / "imagesTr").glob(f"*_0000{ending}"))]
    labels = [p for p in sorted((root / "labelsTr").glob(f"*{ending}"))]
    cases, notes = _match(images, labels, root)
    return cases, "nnunet", notes


def discover(data: str | os.PathLike, labels: str | os.PathLike | None = None) -> Dataset:
    """Find the cases in ``data`` (see the module docstring for the layouts)."""
    root = Path(data)
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: give a folder of cases (a Decathlon/nnU-Net folder, or images with --labels DIR)")
    manifest = root / "dataset.json"
    if labels is None and manifest.is_file():
        try:
            meta = json.loads(manifest.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{manifest}: not readable JSON ({e})") from None
        if not isinstance(meta, dict):
            raise DataError(f"{manifest}: not a dataset description (a JSON object)")
        cases, layout, notes = _decathlon(root, meta)
        return Dataset(root, layout, cases, _label_names(meta.get("labels")), _modality(meta), notes)
    if labels is not None:
        label_dir = Path(labels)
        if not label_dir.is_dir():
            raise DataError(f"{label_dir}: --labels must name a folder of label maps")
        cases, notes = _match(_entries(root), _entries(label_dir), root)
        return Dataset(root, "folders", cases, notes=notes)
    for image_sub, label_sub in _FOLDER_PAIRS:
        if (root / image_sub).is_dir() and (root / label_sub).is_dir():
            cases, notes = _match(_entries(root / image_sub), _entries(root / label_sub), root)
            return Dataset(root, "folders", cases, notes=notes)
    raise DataError(f"{root}: no dataset.json, no images/ and labels/ folders; or name the label folder with --labels DIR")


# -- the split ----------------------------------------------------------------------------------
def _rank(seed: int, name: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_cases(names: Sequence[str], fraction: float, seed: int,
                previous: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Training and validation cases, by case (a case's slices never sit on both sides).

    Cases are ordered by a seeded hash of their name, so the split does not depend on the order
    files are listed in, and the first ``round(fraction * n)`` (at least one, at most n - 1) go to
    validation. ``previous`` (name -> "train"/"val", from a run being resumed) keeps known cases
    where they were; a case added since goes to validation when its hash falls below ``fraction``.
    """
    if not 0 <= fraction < 1:
        raise DataError(f"--val-fraction {fraction}: use a fraction from 0 (no validation) to below 1")
    names = sorted(set(names))
    if previous:
        val = [n for n in names if previous.get(n) == "val" or (n not in previous and _rank(seed, n) < fraction)]
        return [n for n in names if n not in val], val
    if fraction == 0:
        return names, []
    if len(names) < 2:
        raise DataError(f"{names[0] if names else 'DATA'}: one case cannot be split by case; "
                        "add cases or pass --val-fraction 0 (no validation)")
    count = min(max(1, round(fraction * len(names))), len(names) - 1)
    ordered = sorted(names, key=lambda n: _rank(seed, n))
    val = sorted(ordered[:count])
    return [n for n in names if n not in val], val


# -- reading and checking a case ----------------------------------------------------------------
def _read_label(path: Path) -> tuple[LoadedImage, dict[int, str]]:
    """A label map, and the segment names a Slicer ``.seg.nrrd`` carries in its header."""
    names: dict[int, str] = {}
    if path.name.lower().endswith(".seg.nrrd"):
        import SimpleITK as sitk

        image = sitk.ImageFileReader()  # the header only: read_image below reads the voxels
        image.SetFileName(str(path))
        try:
            image.ReadImageInformation()
        except RuntimeError as e:
            raise DataError(f"{path}: not a readable segmentation ({str(e).strip().splitlines()[-1][:120]})") from None
        if image.GetNumberOfComponents() > 1 or image.GetDimension() > 3:
            raise DataError(f"{path}: a segmentation with overlapping segments in several layers; "
                            "in Slicer, export it as a label map (Segmentations > Export to files, labelmap)")
        keys = set(image.GetMetaDataKeys())
        for i in range(1000):
            name_key, value_key = f"Segment{i}_Name", f"Segment{i}_LabelValue"
            if name_key not in keys:
                break
            if value_key in keys:
                names[int(image.GetMetaData(value_key))] = image.GetMetaData(name_key)
    try:
        return read_image(path), names
    except ImageError as e:
        raise DataError(str(e)) from None


def _integer_labels(label: LoadedImage) -> np.ndarray:
    array = label.array
    if label.rgb:
        raise DataError(f"{label.path}: a colour image, not a label map (one integer label value per pixel)")
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        bad = array[array != np.rint(array)] if finite.all() else array[~finite]
        if bad.size:
            raise DataError(f"{label.path}: a label map with non-integer values (e.g. {float(bad.flat[0]):g}); "
                            "label maps hold one integer per object")
        array = np.rint(array)
    if array.min(initial=0) < 0:
        raise DataError(f"{label.path}: a label map with negative values (e.g. {int(array.min())})")
    return array.astype(np.int32)


def _aligned(image: LoadedImage, label: LoadedImage, values: np.ndarray) -> np.ndarray:
    """The label values on the image's grid (same shape), or a DataError naming the mismatch."""
    ig, lg = image.geometry, label.geometry
    shape = image.array.shape[: ig.dimension]
    no_geometry = Path(label.path).name.lower().endswith(_NO_GEOMETRY)
    if values.shape == shape and no_geometry:
        return values
    if ig.dimension != lg.dimension:
        raise DataError(f"{label.path}: a {lg.dimension}D label map for a {ig.dimension}D image ({image.path})")
    spacing_ok = all(abs(a - b) <= SPACING_TOLERANCE * max(abs(a), abs(b), 1e-9) for a, b in zip(ig.spacing, lg.spacing, strict=True))
    if not spacing_ok:
        raise DataError(f"{label.path}: spacing {tuple(round(s, 4) for s in lg.spacing)} differs from the image's "
                        f"{tuple(round(s, 4) for s in ig.spacing)} ({Path(image.path).name})")
    if values.shape == shape:
        return values
    if not Path(label.path).name.lower().endswith(".seg.nrrd"):
        raise DataError(f"{label.path}: shape {values.shape} differs from the image's {shape} ({Path(image.path).name})")
    # Slicer saves a segmentation cropped to its extent: paste it back when the grids line up.
    direction_ok = np.allclose(ig.direction, lg.direction, atol=1e-4)
    offset = np.linalg.solve(np.array(ig.direction).reshape(ig.dimension, -1) * np.array(ig.spacing),
                             np.array(lg.origin) - np.array(ig.origin)) if direction_ok else None
    if offset is None or not np.allclose(offset, np.rint(offset), atol=1e-3):
        raise DataError(f"{label.path}: shape {values.shape} differs from the image's {shape} ({Path(image.path).name})")
    start = [int(v) for v in np.rint(offset)[::-1]]  # (z, y, x) order
    stop = [s + n for s, n in zip(start, values.shape, strict=True)]
    if min(start) < 0 or any(e > n for e, n in zip(stop, shape, strict=True)):
        raise DataError(f"{label.path}: shape {values.shape} differs from the image's {shape} and does not fit inside it")
    placed = np.zeros(shape, dtype=values.dtype)
    placed[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))] = values
    return placed


def _spread(indices: np.ndarray, count: int | None) -> list[int]:
    """``count`` of ``indices`` spread evenly, each the middle of its share (all when None)."""
    if count is None or len(indices) <= count:
        return [int(i) for i in indices]
    picks = ((np.arange(count) + 0.5) * len(indices) / count).astype(int)
    return sorted({int(indices[p]) for p in picks})


def resolve_objects(requested: Sequence[str] | None, names: dict[int, str]) -> tuple[int, ...] | None:
    """``--objects``: label names (from dataset.json or the segmentation) or label values."""
    if not requested:
        return None
    by_name = {n.lower(): v for v, n in names.items()}
    values = []
    for item in requested:
        item = item.strip()
        if item.isdigit():
            values.append(int(item))
        elif item.lower() in by_name:
            values.append(by_name[item.lower()])
        else:
            known = ", ".join(f"{n} ({v})" for v, n in sorted(names.items())) or "none declared; use label values"
            raise DataError(f"--objects {item!r}: no such label (known: {known})")
    return tuple(sorted(set(values)))


def choose_window(window, modality: str | None, image: LoadedImage):
    """``auto``: CT (declared, or Hounsfield-like values) gets the soft-tissue window the
    predictor offers, anything else the percentile stretch; other values pass through."""
    if window not in (None, "auto"):
        return window
    if image.array.dtype == np.uint8 or image.rgb:
        return None
    if modality is not None:
        return "soft_tissue" if modality.strip().upper() == "CT" else "percentile"
    return "soft_tissue" if float(image.array.min()) <= -500 else "percentile"


def load_slices(
    dataset: Dataset,
    cases: Sequence[Case],
    *,
    objects: tuple[int, ...] | None = None,
    slices_per_case: int | None = None,
    window="auto",
    context: int = 0,
) -> tuple[list[Slice], dict]:
    """Read, check and normalise each case; return the slices that hold a chosen object.

    Volumes give the axial slices (first array axis) where an object appears, ``slices_per_case``
    of them spread over the object's extent (all when None); ``context`` also keeps the pixels of
    that many neighbours on each side (a 3D head needs them). Returns the slices and a record of
    the normalisation and counts per case.
    """
    slices: list[Slice] = []
    record: dict = {}
    for case in cases:
        try:
            image = read_image(case.image)
        except ImageError as e:
            raise DataError(str(e)) from None
        label, seg_names = _read_label(case.label)
        for value, name in seg_names.items():
            dataset.label_names.setdefault(value, name)
        values = _aligned(image, label, _integer_labels(label))
        wanted = values if objects is None else np.where(np.isin(values, objects), values, 0)
        volume = image.array if image.is_volume else image.array[None]
        wanted = wanted if image.is_volume else wanted[None]
        present = np.flatnonzero(wanted.reshape(wanted.shape[0], -1).any(axis=1))
        if not len(present):
            which = "" if objects is None else f" of label(s) {', '.join(str(v) for v in objects)}"
            raise DataError(f"{case.label}: no labelled voxel{which}")
        chosen_window = choose_window(window, dataset.modality, image)
        pixels, norm = normalise(volume, chosen_window)
        picks = _spread(present, slices_per_case)
        depth = volume.shape[0]
        for z in picks:
            near = {int(k): np.ascontiguousarray(pixels[k]) for k in range(max(0, z - context), min(depth, z + context + 1)) if k != z}
            slices.append(Slice(case.name, int(z), np.ascontiguousarray(pixels[z]), np.ascontiguousarray(wanted[z]), depth, near))
        record[case.name] = {"image": str(case.image), "label": str(case.label), "normalisation": norm,
                             "slices": picks, "labelled_slices": int(len(present)),
                             "values": sorted(int(v) for v in np.unique(wanted) if v)}
    return slices, record
