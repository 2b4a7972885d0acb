"""A faster image encoder for one Segment Anything model instance, with the same embedding.

This file is self-contained on purpose: it imports only the standard library, torch and (when it
is installed) openvino. medico-adapters copies it unchanged into the trees of the tools it patches
(napari-sam, samm, SlicerSegmentWithSAM), which call ``accelerate(sam)`` right after they build
their SAM model, and the kit's own ``Predictor`` uses the same functions, so each speed-up exists
once. It may be imported under any module name, and it degrades instead of failing:

* on a CPU with OpenVINO importable, the ViT is exported from the loaded model (``torch.export``,
  or tracing on old torch), compiled by OpenVINO with f32 inference precision, and cached on disk
  as a compiled blob keyed by the weights, the precision, the CPU and the OpenVINO/torch versions,
  so only the first start pays for the conversion;
* otherwise (GPU model, no OpenVINO, conversion failed) each attention module of *this* model
  instance gets a forward that calls ``scaled_dot_product_attention`` with SAM's decomposed
  relative-position bias as the mask, one head at a time in the global blocks (a 64 MiB mask
  instead of a 12x4096x4096 attention map plus its copies);
* on a torch without SDPA, or a model that is not SAM's ViT, nothing changes and ``accelerate``
  says why in one log line.

``accelerate`` keeps the embedding within float rounding of the original (max abs diff ~1e-5 on a
random ViT-B, the bound checked is 1e-4), so the tool's masks stay what they were;
``segment_anything`` itself is never modified. Lower precisions (bf16) are for callers that ask
for them explicitly through ``openvino_encoder``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import platform
import subprocess
import sys
import threading
import types
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "FORMAT",
    "OpenVINOImageEncoder",
    "accelerate",
    "bind_sdpa_attention",
    "cpu_flags",
    "default_cache_dir",
    "native_bf16",
    "openvino_encoder",
    "openvino_version",
    "store_identity",
]

#: bumped whenever the conversion or the cache file changes; part of every cache key.
FORMAT = 1
#: the marker ``accelerate`` leaves on what it changed, checked by name so that two copies of this
#: file imported under different module names still recognise each other's work.
MARKER = "_medico_sam_accel"
#: the embedding store's module where the kit places it beside this one (``--lazy-embeddings``), and
#: the attribute its ``model_identity`` memoises an encoder's identity on.
STORE_MODULE = "_medico_embedding_store"
IDENTITY_ATTR = "_medico_identity"
_MAGIC = b"MEDICO-SAM-ACCEL-OV\n"
_GLOBAL_TOKENS = 1024  # attention over more tokens than this goes one head at a time


# -- SDPA attention ------------------------------------------------------------------------------
def _rel_pos(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """SAM's ``get_rel_pos`` for equal query and key sizes, interpolating a table of another size."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t()[None], size=length, mode="linear")[0].t()
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[(coords[:, None] - coords[None, :] + size - 1)]


def _split_qkv(attn: torch.nn.Module, x: torch.Tensor):
    b, h, w, _ = x.shape
    qkv = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)  # each B x heads x N x C


def _bias(q, rh, rw, h: int, w: int, out=None) -> torch.Tensor:
    """Decomposed rel-pos bias (B x heads x N x N) for queries ``q`` (B x heads x N x C).

    ``out`` lets the global blocks reuse one buffer for all heads: a fresh 64 MiB tensor per head
    costs more in page faults than the addition itself.
    """
    lead = q.shape[:-2]
    r_q = q.reshape(*lead, h, w, q.shape[-1])
    rel_h = torch.einsum("...hwc,hkc->...hwk", r_q, rh)
    rel_w = torch.einsum("...hwc,wkc->...hwk", r_q, rw)
    if out is None:
        out = torch.empty((*lead, h, w, h, w), dtype=q.dtype, device=q.device)
    torch.add(rel_h[..., :, None], rel_w[..., None, :], out=out.view(*lead, h, w, h, w))
    return out.view(*lead, h * w, h * w)


def _sdpa_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Drop-in forward for ``segment_anything``'s ViT ``Attention``.

    Global blocks (many tokens) go one head at a time so the float mask stays small; windowed
    blocks (196 tokens per window) go in one call.
    """
    b, h, w, _ = x.shape
    q, k, v = _split_qkv(self, x)
    if not self.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        rh = _rel_pos(h, self.rel_pos_h)
        rw = _rel_pos(w, self.rel_pos_w)
        if h * w <= _GLOBAL_TOKENS:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=_bias(q, rh, rw, h, w))
        else:
            out = torch.empty_like(q)
            mask = torch.empty((b, 1, h * w, h * w), dtype=q.dtype, device=q.device)
            for head in range(q.shape[1]):
                sl = slice(head, head + 1)
                _bias(q[:, sl], rh, rw, h, w, out=mask)
                out[:, sl] = F.scaled_dot_product_attention(q[:, sl], k[:, sl], v[:, sl], attn_mask=mask)
            del mask
    out = out.permute(0, 2, 1, 3).reshape(b, h, w, -1)
    return self.proj(out)


def _sam_attentions(encoder: torch.nn.Module) -> list | None:
    """The ViT attention modules this file knows how to run, or None for any other encoder."""
    blocks = getattr(encoder, "blocks", None)
    if blocks is None:
        return None
    attns = [getattr(block, "attn", None) for block in blocks]
    needed = ("qkv", "proj", "num_heads", "use_rel_pos")
    if not attns or not all(a is not None and all(hasattr(a, n) for n in needed) for a in attns):
        return None
    return attns


def _has_sdpa() -> bool:
    return hasattr(F, "scaled_dot_product_attention")


def bind_sdpa_attention(encoder: torch.nn.Module) -> bool:
    """Give each attention module of *this* encoder the SDPA forward; False if it cannot.

    The forward is bound on the instances, never assigned to the class, so every other SAM in the
    process and ``segment_anything`` itself stay untouched.
    """
    attns = _sam_attentions(encoder)
    if attns is None or not _has_sdpa():
        return False
    for attn in attns:
        attn.forward = types.MethodType(_sdpa_forward, attn)
        setattr(attn, MARKER, "sdpa")
    return True


# -- the CPU -------------------------------------------------------------------------------------
_SYSCTL_KEYS = ("machdep.cpu.features", "machdep.cpu.leaf7_features", "machdep.cpu.brand_string")


def _flags_from_cpuinfo(text: str) -> set:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return set(value.lower().split())
    return set()


def _flags_from_sysctl(text: str) -> set:
    """``sysctl`` output on macOS: Intel feature lists, and Apple Silicon's ``hw.optional.arm.FEAT_*: 1``."""
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key.startswith("hw.optional.arm.FEAT_") and value == "1":
            flags.add(key.rsplit("FEAT_", 1)[1].lower())
        elif key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
            # Intel Macs spell them AVX512BF16, AVX2, AVX1.0; use Linux's names.
            flags.update(v.lower().replace("avx512bf16", "avx512_bf16").replace(".0", "") for v in value.split())
    return flags


def _flags_from_torch() -> set:
    """What torch's own CPU probe says (its private helpers; only where nothing better exists)."""
    flags = set()
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported",
              "avx512_vnni": "_is_avx512_vnni_supported", "avx2": "_is_avx2_supported"}
    cpu = getattr(torch, "cpu", None)
    for flag, name in probes.items():
        with contextlib.suppress(Exception):
            if getattr(cpu, name)():
                flags.add(flag)
    return flags


def cpu_flags(system: str | None = None) -> frozenset:
    """The CPU's feature flags, lower-case with Linux's names (``avx2``, ``avx512_bf16``, ``amx_bf16``).

    Read from ``/proc/cpuinfo`` on Linux and ``sysctl`` on macOS; elsewhere (Windows) from torch's
    CPU probe, and an empty set if that fails too, which makes every caller pick f32.
    """
    system = system or platform.system()
    try:
        if system == "Linux":
            return frozenset(_flags_from_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace")))
        if system == "Darwin":
            out = subprocess.run(["sysctl", *_SYSCTL_KEYS, "hw.optional"], capture_output=True, text=True,
                                 timeout=10).stdout
            return frozenset(_flags_from_sysctl(out))
    except (OSError, subprocess.SubprocessError):
        pass
    return frozenset(_flags_from_torch())


def native_bf16(flags) -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX), so bf16 is faster, not slower."""
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


# -- OpenVINO ------------------------------------------------------------------------------------
def openvino_version() -> str | None:
    """The importable OpenVINO's version, or None."""
    try:
        import openvino
    except Exception:  # an absent package, and a broken install, both mean "not available"
        return None
    return str(getattr(openvino, "__version__", None) or openvino.get_version())


def default_cache_dir() -> Path:
    """Where compiled encoders are kept: the kit's cache (``$MEDICO_ADAPTERS_CACHE``) or its default."""
    root = os.environ.get("MEDICO_ADAPTERS_CACHE")
    if root:
        return Path(root) / "openvino"
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "medico-adapters" / "medico-adapters" / "Cache" / "openvino"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "medico-adapters" / "openvino"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medico-adapters" / "openvino"


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of the module's architecture and every tensor's bytes."""
    digest = hashlib.sha256(repr(module).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(memoryview(t.view(torch.uint8).numpy()))
    return digest.hexdigest()


def _atomic_write(path: Path, payload) -> None:
    """Write bytes (or ``payload(file)``) to a temporary file beside ``path``, then rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            payload(f) if callable(payload) else f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _read_entry(path: Path):
    """The compiled blob stored at ``path`` (mapped, not copied) if the file is whole and unchanged."""
    import numpy as np

    head_len = len(_MAGIC) + 32
    try:
        with open(path, "rb") as f:
            head = f.read(head_len)
        if len(head) != head_len or not head.startswith(_MAGIC) or path.stat().st_size == head_len:
            return None
        blob = np.memmap(path, dtype=np.uint8, mode="c", offset=head_len)  # OpenVINO wants it writable
    except (OSError, ValueError):
        return None
    if hashlib.sha256(blob).digest() != head[len(_MAGIC):]:
        del blob  # unmapped before the entry is rewritten (Windows cannot replace a mapped file)
        return None
    return blob


def _convert(encoder: torch.nn.Module, example: torch.Tensor):
    import openvino as ov

    # SAM's own attention is exported, not the SDPA forward: OpenVINO fuses it as well, and
    # converts it in about half the time (measured, see the kit's predictor module).
    with torch.no_grad():
        export = getattr(getattr(torch, "export", None), "export", None)
        if export is not None:
            try:
                # torch.export runs the model on fake tensors: ~10x faster than tracing it for real.
                return ov.convert_model(export(encoder, (example,)))
            except Exception:
                pass
        return ov.convert_model(encoder, example_input=example)


class OpenVINOImageEncoder(torch.nn.Module):
    """Stands in for ``sam.image_encoder``: same input (B x 3 x S x S float), same output, on OpenVINO.

    Holds no torch weights (the ViT's were dropped after compiling), keeps ``img_size`` which the
    SAM predictors read, and returns its output on the input's device.
    """

    def __init__(self, compiled, img_size: int, precision: str, cache_file: Path | None, from_cache: bool,
                 mapped=None):
        super().__init__()
        self.img_size = img_size
        self.precision = precision
        self.cache_file = cache_file
        self.from_cache = from_cache
        setattr(self, MARKER, "openvino")
        self._compiled = compiled
        self._mapped = mapped
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()  # one request, and tools embed from worker threads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        with self._lock:
            for item in x.detach().to("cpu", torch.float32).contiguous().split(1):
                result = self._request.infer({0: item.numpy()})
                outs.append(torch.from_numpy(result[0].copy()))  # the request reuses its buffer
        return torch.cat(outs).to(x.device)

    def extra_repr(self) -> str:
        return f"openvino, precision={self.precision}, img_size={self.img_size}"


def openvino_encoder(encoder: torch.nn.Module, precision: str = "f32", *, cache_dir=None, key: str | None = None,
                     write=None, log=None) -> OpenVINOImageEncoder:
    """Compile ``encoder`` (on the CPU) with OpenVINO at ``precision`` ("f32" is exact), using the cache.

    ``key`` names the weights (the kit passes its checkpoint hash; by default they are hashed
    here); ``write(path, payload)`` stores a cache file atomically (the kit passes its own
    writer). Raises on any failure; the caller decides what to fall back to.
    """
    import openvino as ov

    if next(encoder.parameters()).device.type != "cpu":
        raise RuntimeError("OpenVINO runs the encoder on the CPU; this model is on another device")
    core = ov.Core()
    cpu = f"{core.get_property('CPU', 'FULL_DEVICE_NAME')}|{','.join(sorted(cpu_flags()))}"
    parts = [FORMAT, precision, openvino_version(), torch.__version__, cpu, key or weights_digest(encoder)]
    if key is not None:  # a caller's key names the weights, not the architecture around them
        parts.append(repr(encoder))
    name = hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:32]
    cache_file = Path(cache_dir or default_cache_dir()) / f"encoder-{name}.ov"
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    img_size = int(getattr(encoder, "img_size", 1024))

    blob = _read_entry(cache_file)
    if blob is not None:
        try:
            try:
                compiled = core.import_model(ov.Tensor(blob, shared_memory=True), "CPU", config)
            except TypeError:  # OpenVINO before 2025 imports from bytes only
                compiled = core.import_model(bytes(blob), "CPU", config)
            # the compiled model reads its weights from the mapped file: it keeps the mapping
            return OpenVINOImageEncoder(compiled, img_size, precision, cache_file, from_cache=True, mapped=blob)
        except Exception:
            del blob  # from another OpenVINO build, or damaged in a way the hash missed: convert again
    if log is not None:
        log(f"converting the image encoder for OpenVINO ({precision}); once per checkpoint, cached in {cache_file.parent}")
    model = _convert(encoder, torch.zeros(1, 3, img_size, img_size))
    compiled = core.compile_model(model, "CPU", config)
    del model
    stream = io.BytesIO()
    stream.write(_MAGIC + bytes(32))
    compiled.export_model(stream)
    entry = stream.getbuffer()
    entry[len(_MAGIC):len(_MAGIC) + 32] = hashlib.sha256(entry[len(_MAGIC) + 32:]).digest()
    try:
        (write or _atomic_write)(cache_file, entry)
    except Exception as e:  # a read-only or busy cache costs the next start a conversion, nothing more
        if log is not None:
            log(f"could not cache the compiled encoder in {cache_file} ({type(e).__name__}: {e})")
        cache_file = None
    del entry, stream
    return OpenVINOImageEncoder(compiled, img_size, precision, cache_file, from_cache=False)


# -- the one call a tool makes ---------------------------------------------------------------------
def store_identity(encoder: torch.nn.Module) -> str | None:
    """The embedding store's identity of ``encoder``'s weights, where the store sits beside this
    module (or the encoder already carries one); None where nothing would read it.

    A compiled encoder holds no weights to hash, so ``accelerate`` hands this identity over to it:
    the tool's stored embeddings stay keyed by the checkpoint, not by an empty state dict.
    """
    known = getattr(encoder, IDENTITY_ATTR, None)
    if known:
        return known
    name = f"{__package__}.{STORE_MODULE}" if __package__ else STORE_MODULE
    try:
        store = importlib.import_module(name)
    except ImportError:
        return None
    return store.model_identity(encoder)


def accelerate(sam: torch.nn.Module, log=print, *, cache_dir=None) -> bool:
    """Make ``sam.image_encoder`` faster with the same embedding; True if it did (or already had).

    Call it once the model is built (and moved to its device). Logs one line saying what it did,
    or why it could not; the model then runs exactly as before.
    """
    say = (lambda line: log(f"medico_sam_accel: {line}")) if log is not None else (lambda line: None)
    encoder = getattr(sam, "image_encoder", None)
    if encoder is None:
        say("not accelerated: the model has no image_encoder")
        return False
    if getattr(encoder, MARKER, None) or any(getattr(a, MARKER, None) for a in _sam_attentions(encoder) or ()):
        return True
    if _sam_attentions(encoder) is None:
        say(f"not accelerated: {type(encoder).__name__} is not Segment Anything's ViT encoder")
        return False
    params = list(encoder.parameters())
    on_cpu = bool(params) and params[0].device.type == "cpu"
    reason = None
    if on_cpu and openvino_version() is not None:
        try:
            identity = store_identity(encoder)
            compiled = openvino_encoder(encoder, "f32", cache_dir=cache_dir, log=say)
            if identity:
                setattr(compiled, IDENTITY_ATTR, identity)
            sam.image_encoder = compiled
            say(f"image encoder runs on OpenVINO {openvino_version()} (f32, same embedding)")
            return True
        except Exception as e:
            reason = f"OpenVINO failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})"
    elif on_cpu:
        reason = "OpenVINO is not installed"
    if bind_sdpa_attention(encoder):
        say(f"image encoder uses SDPA attention{'; ' + reason if reason else ''}")
        return True
    say(f"not accelerated: this torch {torch.__version__} has no scaled_dot_product_attention"
        + (f" and {reason}" if reason else ""))
    return False
