"""micro-sam: no code change -- MedicoSAM is already in its registry as ``vit_b_medical_imaging``.

micro-sam fetches registry models through pooch into ``$MICROSAM_CACHEDIR/models`` (default
``pooch.os_cache("micro_sam")/models``) and trusts a file found there when its hash matches. So the
kit places the published file there, and only that file: anything else (a re-export, a user's own
fine-tune) would be re-downloaded over, so the user is told to load it as custom weights instead.

``--path`` names the folder ``MICROSAM_CACHEDIR`` names, as micro-sam reads it; the files go in its
``models`` folder. A ``models`` folder given itself is refused with the folder to give instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pooch

from medico_adapters import checkpoint as ckpt_mod
from medico_adapters import fsio, registry
from medico_adapters.errors import PatchError

TOOL = "micro-sam"
NAMES = (registry.MEDICOSAM, f"{registry.MEDICOSAM}_decoder")
RECORD = ".medico-adapters.json"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """micro-sam's models folder: ``<override or $MICROSAM_CACHEDIR or pooch's cache>/models``."""
    if override is not None:
        root = Path(override)
        if _is_models_folder(root):
            raise PatchError(
                f"{root}: is micro-sam's models folder itself; --path names the folder MICROSAM_CACHEDIR "
                f"names, which holds it: --path {root.parent}"
            )
        return root / "models"
    root = os.environ.get("MICROSAM_CACHEDIR")
    return (Path(root) if root else Path(pooch.os_cache("micro_sam"))) / "models"


def _is_models_folder(folder: Path) -> bool:
    """Holds the kit's record or registry files (named like ``vit_b``), as ``<cache>/models`` does."""
    if (folder / RECORD).is_file():
        return True
    try:
        return any(p.is_file() and p.name.startswith("vit_") and not p.suffix for p in folder.iterdir())
    except OSError:
        return False


def _hash_ok(path: Path, name: str) -> bool:
    alg, _, expected = registry.HASHES[name].partition(":")
    return path.is_file() and pooch.file_hash(str(path), alg=alg) == expected


def _custom_hint(source: Path) -> str:
    return (
        f"use it as micro-sam custom weights: in the annotator's embedding settings set the custom weights "
        f"path to {source} with model type vit_b, or in Python "
        f"micro_sam.util.get_sam_model(model_type='vit_b', checkpoint_path='{source}')"
    )


def _copy_of(source: Path):
    """A writer that streams ``source`` (hundreds of MB) into the file ``atomic_write`` opens."""

    def write(out) -> None:
        with open(source, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 22)

    return write


def _read_record(cache: Path) -> dict:
    path = cache / RECORD
    if not path.exists():
        return {"placed": []}
    try:
        return json.loads(path.read_text("utf-8"))
    except ValueError:
        raise PatchError(f"{path}: damaged record of placed files") from None


def patch(checkpoint=None, *, cache=None, dry_run: bool = False, trust: bool = False) -> dict:
    cache = cache_dir(cache)
    source = Path(checkpoint) if checkpoint else (registry.cached_path(registry.MEDICOSAM) or registry.fetch(registry.MEDICOSAM))
    ckpt_mod.require_loadable(ckpt_mod.load_checkpoint(source, trust=trust), "vit_b")
    if not _hash_ok(source, registry.MEDICOSAM):
        return {
            "tool": TOOL, "mode": "custom-weights", "cache": str(cache), "placed": [],
            "message": f"{source}: not the published {registry.MEDICOSAM} file, so micro-sam's cache would replace it; "
            + _custom_hint(source),
        }
    sources = {registry.MEDICOSAM: source}
    decoder = registry.cached_path(NAMES[1])
    if decoder is not None and _hash_ok(decoder, NAMES[1]):
        sources[NAMES[1]] = decoder
    record = _read_record(cache)
    placed = []
    for name, src in sources.items():
        target = cache / name
        if _hash_ok(target, name):
            continue
        placed.append(str(target))
        if dry_run:
            continue
        fsio.atomic_write(target, _copy_of(src))
        record["placed"] = sorted(set(record["placed"]) | {name})
    if placed and not dry_run:
        fsio.write_text(cache / RECORD, json.dumps(record, indent=2))
    note = "" if NAMES[1] in sources else f"; micro-sam downloads {NAMES[1]} itself on first use"
    verb = "would place" if dry_run else "placed"
    message = (f"{cache}: {verb} {', '.join(placed)}" if placed else f"{cache}: MedicoSAM already in place") + note
    return {"tool": TOOL, "mode": "registry-cache", "cache": str(cache), "placed": placed, "message": message}


def unpatch(*, cache=None) -> dict:
    cache = cache_dir(cache)
    record = _read_record(cache)
    if not record["placed"]:
        raise PatchError(f"{cache}: medico-adapters placed nothing here")
    removed = []
    for name in record["placed"]:
        target = cache / name
        if target.exists():
            fsio.remove(target)
            removed.append(str(target))
    fsio.remove(cache / RECORD)
    return {"tool": TOOL, "cache": str(cache), "removed": removed, "message": f"{cache}: removed {', '.join(removed) or 'nothing'}"}


def status(*, cache=None) -> dict:
    cache = cache_dir(cache)
    files = {name: {"present": (cache / name).is_file(), "hash_ok": _hash_ok(cache / name, name)} for name in NAMES}
    ready = files[registry.MEDICOSAM]["hash_ok"]
    placed = _read_record(cache)["placed"] if (cache / RECORD).exists() else []
    message = (
        f"{cache}: {registry.MEDICOSAM} is in micro-sam's cache and verified; select it as the model in micro-sam"
        if ready
        else f"{cache}: {registry.MEDICOSAM} is not cached; run `medico-adapters patch micro-sam` (or use custom weights)"
    )
    return {"tool": TOOL, "layout": "registry-cache", "cache": str(cache), "ready": ready, "files": files,
            "placed_by_kit": placed, "message": message}
