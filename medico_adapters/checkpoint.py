"""Read SAM checkpoints in every format met in the wild and export the one every tool loads.

Formats (``CheckpointInfo.format``):

* ``plain``     -- a SAM ``state_dict`` (what ``segment_anything.build_sam_*`` expects);
* ``prefixed``  -- a state dict whose keys carry ``sam.`` / ``module.sam.`` / ``module.``;
* ``training``  -- torch_em / micro-sam ``{"model_state", "decoder_state", "optimizer_state", ...}``;
* ``wrapped``   -- ``{"model": state_dict}`` (MedSAM) or ``{"state_dict": ...}`` (Lightning);
* ``semantic``  -- a ``finetune --semantic`` model: the SAM weights it embeds with, plus its head.

Loading never runs code from the file: it uses ``torch.load(weights_only=True)`` with a small
allow-list of harmless numpy types; anything else needs ``trust=True`` (``--trust-checkpoint``).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medico_adapters import fsio
from medico_adapters.errors import CheckpointError, UnsafeCheckpointError

#: embed dim and depth of each SAM-1 image encoder.
ARCHITECTURES = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
#: MobileSAM's TinyViT encoder has no ViT blocks; these key stems identify it.
_VIT_T_MARKERS = ("image_encoder.layers.", "image_encoder.patch_embed.seq.")
_SAM_ROOTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_TRAINING_KEYS = ("model_state",)
_WRAPPER_KEYS = ("model", "state_dict")
TRUST_FLAG = "--trust-checkpoint"


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    format: str
    prefix: str
    arch: str | None
    has_decoder: bool
    n_tensors: int
    dropped_keys: tuple[str, ...] = ()
    extra_entries: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def loadable(self) -> bool:
        return self.arch is not None and not self.problems

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "format": self.format,
            "prefix": self.prefix,
            "arch": self.arch,
            "decoder": self.has_decoder,
            "tensors": self.n_tensors,
            "dropped_keys": list(self.dropped_keys),
            "extra_entries": list(self.extra_entries),
            "problems": list(self.problems),
            "loadable": self.loadable,
        }


@dataclass
class Checkpoint:
    info: CheckpointInfo
    state_dict: dict[str, torch.Tensor]
    decoder_state: dict | None = field(default=None, repr=False)


def _numpy_safe_globals() -> list:
    """numpy scalars and dtypes that training loops store as metrics; unpickling them is inert."""
    import numpy as np

    allowed: list = [np.dtype, np.ndarray]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(module, fromlist=["scalar", "_reconstruct"])
        except ImportError:
            continue
        allowed += [mod.scalar, mod._reconstruct]
        break
    allowed += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return allowed


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    names = re.findall(r"GLOBAL ([\w.]+)", str(error))
    if not names and zipfile.is_zipfile(path):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            names = []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _numpy_safe_globals() if hasattr(g, "__qualname__")}
    return [n for n in names if n not in allowed] or names


def _torch_load(path: Path, trust: bool):
    is_zip = zipfile.is_zipfile(path)
    kwargs = {"map_location": "cpu"}
    if is_zip:
        kwargs["mmap"] = True
    try:
        if trust:
            return torch.load(path, weights_only=False, **kwargs)
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, e)
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path}: refused to unpickle {', '.join(unsafe[:3])}, which could run code; "
                f"pass {TRUST_FLAG} only if you trust this file"
            ) from None
        key = re.search(r"invalid load key, '[^']*'", str(e))
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({key.group(0) if key else _short(e)})") from None
    except (EOFError, RuntimeError, ValueError, OSError, AttributeError, ImportError, TypeError, IndexError) as e:
        reason = _short(e)
        if "central directory" in reason or "EOF" in reason or isinstance(e, EOFError):
            reason = "the file is truncated or damaged"
        elif any(t in reason for t in ("data.pkl", "constants.pkl", "not in a subdirectory", "inline_container")):
            reason = "a zip archive that is not a PyTorch file"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:160]


def _split_prefix(key: str) -> tuple[str, str] | None:
    for root in _SAM_ROOTS:
        if key.startswith(root):
            return "", key
        idx = key.find("." + root)
        if idx >= 0:
            return key[: idx + 1], key[idx + 1 :]
    return None


def _unwrap(obj, path: Path) -> tuple[str, Mapping, dict | None, tuple[str, ...]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a SAM checkpoint (it holds a {type(obj).__name__}, not a dict)")
    if isinstance(obj.get("medico_semantic"), Mapping) and isinstance(obj.get("sam_state"), Mapping):
        return "semantic", obj["sam_state"], None, tuple(str(k) for k in obj if k != "sam_state")
    for key in _TRAINING_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            extras = tuple(str(k) for k in obj if k not in (key, "decoder_state"))
            decoder = obj.get("decoder_state")
            return "training", obj[key], decoder if isinstance(decoder, Mapping) else None, extras
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping) and not isinstance(obj[key], torch.Tensor):
            extras = tuple(str(k) for k in obj if k != key)
            return "wrapped", obj[key], None, extras
    return "plain", obj, None, ()


def detect_arch(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the encoder from tensor shapes: ``vit_b``, ``vit_l``, ``vit_h`` or ``vit_t``."""
    if any(k.startswith(_VIT_T_MARKERS) for k in state_dict):
        return "vit_t"
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        raise CheckpointError("no SAM image encoder (image_encoder.patch_embed.proj.weight is missing)")
    blocks = {k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")}
    dims = (int(weight.shape[0]), len(blocks))
    for name, expected in ARCHITECTURES.items():
        if dims == expected:
            return name
    raise CheckpointError(f"unknown SAM image encoder (embed dim {dims[0]}, depth {dims[1]})")


@functools.cache
def expected_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict ``segment_anything`` builds for ``arch``.

    Built once on the meta device and kept in the kit's cache: importing segment_anything (and
    torchvision with it) costs more than reading a whole checkpoint.
    """
    from importlib.metadata import version

    from medico_adapters.registry import cache_dir

    cached = cache_dir() / "shapes" / f"segment-anything-{version('segment-anything')}-{arch}.json"
    try:
        return {k: tuple(v) for k, v in json.loads(cached.read_text("utf-8")).items()}
    except (OSError, ValueError):
        pass
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        model = sam_model_registry[arch]()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        fsio.write_text(cached, json.dumps(shapes))
    except OSError:
        pass  # a read-only cache only costs the import next time
    return shapes


def _problems(state_dict: Mapping[str, torch.Tensor], arch: str) -> tuple[str, ...]:
    if arch == "vit_t":
        return ()  # MobileSAM's builder lives in mobile_sam; shapes were checked by detection only
    expected = expected_shapes(arch)
    missing = [k for k in expected if k not in state_dict]
    wrong = [k for k, shape in expected.items() if k in state_dict and tuple(state_dict[k].shape) != shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} {arch} tensors missing (e.g. {missing[0]})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape (e.g. {wrong[0]})")
    return tuple(problems)


def load_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> Checkpoint:
    """Read any supported checkpoint into a plain SAM state dict of CPU tensors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")

    fmt, raw, decoder, extras = _unwrap(_torch_load(path, trust), path)

    prefixes: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in raw.items():
        split = _split_prefix(str(key)) if isinstance(value, torch.Tensor) else None
        if split is None:
            dropped.append(str(key))
            continue
        prefixes.add(split[0])
        state[split[1]] = value
    if not state:
        raise CheckpointError(f"{path}: not a SAM checkpoint (no image_encoder/prompt_encoder/mask_decoder tensors)")
    if len(prefixes) > 1:
        raise CheckpointError(f"{path}: SAM keys carry several prefixes ({', '.join(sorted(prefixes))})")
    prefix = prefixes.pop()
    if fmt == "plain" and prefix:
        fmt = "prefixed"
    try:
        arch = detect_arch(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    info = CheckpointInfo(
        path=str(path),
        format=fmt,
        prefix=prefix,
        arch=arch,
        has_decoder=decoder is not None,
        n_tensors=len(state),
        dropped_keys=tuple(dropped),
        extra_entries=extras,
        problems=_problems(state, arch),
    )
    return Checkpoint(info=info, state_dict=state, decoder_state=dict(decoder) if decoder is not None else None)


def require_loadable(ckpt: Checkpoint, expect_arch: str | None = None) -> None:
    info = ckpt.info
    if info.problems:
        raise CheckpointError(f"{info.path}: not a complete SAM {info.arch} state dict: {info.problems[0]}")
    if expect_arch is not None and info.arch != expect_arch:
        raise CheckpointError(f"{info.path}: the weights are {info.arch}, but {expect_arch} was asked for")


def _save_staged(obj, out: Path, tmp: Path | None = None) -> Path:
    """Save to a temporary file beside ``out`` (or at ``tmp``); return it for the caller to rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return fsio.write_file(tmp or fsio.temp_path(out, unique=True), lambda f: torch.save(obj, f))


def plain_state_dict(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The state dict as ``build_sam_*`` wants it: CPU tensors, no wrapper, no prefix."""
    return {k: v.detach().to("cpu") for k, v in ckpt.state_dict.items()}


def export_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    decoder_out: str | os.PathLike | None = None,
    expect_arch: str | None = None,
    trust: bool = False,
) -> CheckpointInfo:
    """Write ``src`` as a plain SAM state dict at ``out`` (and its decoder at ``decoder_out``).

    Both files appear together or not at all; ``out`` loads with
    ``segment_anything.build_sam_vit_*(checkpoint=out)`` under ``weights_only=True``.
    """
    ckpt = load_checkpoint(src, trust=trust)
    require_loadable(ckpt, expect_arch)
    if decoder_out is not None and ckpt.decoder_state is None:
        raise CheckpointError(f"{src}: has no decoder_state to write to {decoder_out}")
    out = Path(out)
    if out.is_dir():
        raise CheckpointError(f"{out}: is a directory; give a file name for the exported checkpoint")
    pending = [(_save_staged(plain_state_dict(ckpt), out), out)]
    try:
        if decoder_out is not None:
            decoder = {k: (v.detach().to("cpu") if isinstance(v, torch.Tensor) else v) for k, v in ckpt.decoder_state.items()}
            pending.append((_save_staged(decoder, Path(decoder_out)), Path(decoder_out)))
        for tmp, final in pending:
            fsio.replace(tmp, final)
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    for _, final in pending:
        fsio.fsync_dir(final.parent)
    return ckpt.info


def write_plain(ckpt: Checkpoint, out: Path, tmp: Path | None = None) -> Path:
    """Save the plain state dict to a temporary file beside ``out`` (or ``tmp``) and return it."""
    return _save_staged(plain_state_dict(ckpt), out, tmp)
