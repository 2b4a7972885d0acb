"""The checkpoints the kit knows, as data, fetched and verified by pooch.

The MedicoSAM entries and the SAM hashes are micro-sam's own (``micro_sam.util.models()``), so a
file verified here is the file micro-sam would accept under the same name.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pooch

from medico_adapters import fsio
from medico_adapters.errors import RegistryError

CACHE_ENV = "MEDICO_ADAPTERS_CACHE"
MEDICOSAM = "vit_b_medical_imaging"

#: name -> "alg:hash"; None where no hash has been published.
HASHES = {
    "vit_b_medical_imaging": "xxh128:40169f1e3c03a4b67bff58249c176d92",
    "vit_b_medical_imaging_decoder": "xxh128:9e498b12f526f119b96c88be76e3b2ed",
    "vit_b": "xxh128:6923c33df3637b6a922d7682bfc9a86b",
    "vit_l": "xxh128:a82beb3c660661e3dd38d999cc860e9a",
    "vit_h": "xxh128:97698fac30bd929c2e6d8d8cc15933c2",
    "medsam_vit_b": None,
}

URLS = {
    "vit_b_medical_imaging": "https://owncloud.gwdg.de/index.php/s/f5Ol4FrjPQWfjUF/download",
    "vit_b_medical_imaging_decoder": "https://owncloud.gwdg.de/index.php/s/ahd3ZhZl2e0RIwz/download",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "medsam_vit_b": "https://syncandshare.desy.de/index.php/s/yLfdFbpfEGSHJWY/download/medsam_20230423_vit_b_0.0.1.pth",
}


@dataclass(frozen=True)
class ModelCard:
    arch: str
    description: str


CARDS = {
    "vit_b_medical_imaging": ModelCard("vit_b", "MedicoSAM image encoder + SAM decoders (micro-sam's vit_b_medical_imaging)"),
    "vit_b_medical_imaging_decoder": ModelCard("vit_b", "MedicoSAM segmentation decoder for automatic instance segmentation"),
    "vit_b": ModelCard("vit_b", "Segment Anything ViT-B (Meta)"),
    "vit_l": ModelCard("vit_l", "Segment Anything ViT-L (Meta)"),
    "vit_h": ModelCard("vit_h", "Segment Anything ViT-H (Meta)"),
    "medsam_vit_b": ModelCard("vit_b", "MedSAM ViT-B (as napari-sam downloads it; no published hash)"),
}
ALIASES = {"medicosam": MEDICOSAM, "medicosam_decoder": "vit_b_medical_imaging_decoder"}


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path(pooch.os_cache("medico-adapters"))


def models_dir() -> Path:
    return cache_dir() / "models"


def canonical(name: str) -> str:
    name = ALIASES.get(name.lower(), name)
    if name not in HASHES:
        raise RegistryError(f"unknown model {name!r}; known: {', '.join(HASHES)}")
    return name


def _pooch() -> pooch.Pooch:
    return pooch.create(path=models_dir(), base_url="", registry=dict(HASHES), urls=dict(URLS))


def cached_path(name: str) -> Path | None:
    path = models_dir() / canonical(name)
    return path if path.is_file() else None


def fetch(name: str, *, progress: bool = True) -> Path:
    """Return the cached file for ``name``, downloading and verifying it first if needed."""
    name = canonical(name)
    # pooch logs "Downloading ..." to stderr; the progress bar says it, and a failure is one line.
    pooch.get_logger().setLevel("WARNING")
    try:
        return Path(_pooch().fetch(name, progressbar=progress))
    except ValueError as e:  # pooch's hash mismatch; it has already removed the download
        raise RegistryError(f"{name}: {str(e).splitlines()[0]}") from None
    except Exception as e:
        raise RegistryError(
            f"{name}: download from {URLS[name]} failed ({type(e).__name__}); on an offline machine "
            f"download it elsewhere and run `medico-adapters fetch {name} --from-file PATH`"
        ) from None


def register_file(name: str, source: str | os.PathLike) -> tuple[Path, bool]:
    """Copy a local file into the cache under ``name``; returns (path, hash was verified)."""
    name = canonical(name)
    source = Path(source)
    if not source.is_file():
        raise RegistryError(f"{source}: no such file")
    known = HASHES[name]
    if known is not None:
        alg, _, expected = known.partition(":")
        actual = pooch.file_hash(str(source), alg=alg)
        if actual != expected:
            raise RegistryError(
                f"{source}: {alg} hash {actual} does not match the registry's {expected} for {name}"
            )
    target = models_dir() / name
    fsio.atomic_write(target, lambda out: _copy_into(source, out))
    return target, known is not None


def _copy_into(source: Path, out) -> None:
    with open(source, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 22)


def listing() -> list[dict]:
    rows = []
    for name, known in HASHES.items():
        path = cached_path(name)
        rows.append(
            {
                "name": name,
                "arch": CARDS[name].arch,
                "description": CARDS[name].description,
                "hash": known,
                "url": URLS[name],
                "cached": path is not None,
                "path": str(path) if path else None,
            }
        )
    return rows
