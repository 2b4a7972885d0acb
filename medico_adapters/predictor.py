"""A SamPredictor work-alike that loads any SAM checkpoint and embeds images fast wherever it runs.

The image encoder is where the time goes (seconds per slice on a laptop CPU). What runs it is
decided per machine by ``choose_backend`` (``Predictor(backend="auto"|"torch"|"openvino")``,
``segment --backend``), and ``describe()`` says what was chosen and why:

* ``openvino`` -- what ``auto`` picks on a CPU when the ``[fast]`` extra is installed. The loaded
  ViT is exported with ``torch.export`` (no ONNX file) and compiled by OpenVINO; the compiled
  model is cached in the kit's cache (``openvino/``) per checkpoint hash, precision, CPU and
  OpenVINO/torch versions, written atomically, so later starts load it in seconds instead of
  converting again (tens of seconds). ``exact=True`` forces f32 inference precision (max abs diff
  ~1e-5 to ``SamPredictor``); ``exact=False`` runs bf16 where the CPU has AVX512-BF16 or AMX
  (cosine ~0.99995), f32 elsewhere.
* ``torch`` -- each attention module *of the loaded model instance only* gets a forward that calls
  ``scaled_dot_product_attention`` with the decomposed relative-position bias as ``attn_mask``
  (one head at a time in the global blocks: a 64 MiB mask instead of SAM's 12x4096x4096 attention
  map and its copies); ``exact=False`` autocasts to bf16 on CPUs with native bf16, and to bf16/f16
  on a GPU. ``segment_anything`` itself is never patched. This is also the fallback, with one
  ``BackendWarning``, when OpenVINO is missing or its conversion fails.

Both live in ``medico_adapters/accel/medico_sam_accel.py``, the self-contained file the patched
tools get a copy of, so each speed-up exists once.

Why these choices (``benchmarks/bench_predictor.py``, random ViT-B, one 512x512 slice from uint8 to
embedding, on a 2-core Xeon (Sapphire Rapids: AVX512-BF16 and AMX) shared with other work, so
single figures move by 10-20 %; benchmarks/RESULTS.md is one run, median of 5). Seconds per
embedding:

* Fast mode, native bf16. RESULTS.md: kit OpenVINO bf16 2.74 s, plain OpenVINO (default, bf16)
  2.67 s, torch autocast bf16 3.93 s, torch bf16 weights 3.90 s; plain SAM 12.51 s. Interleaved in
  one process (kit predictors only, an earlier session): OpenVINO bf16 2.55 s, autocast 3.77 s.
  Torch's own bf16 was not as fast in any side-by-side measurement, so ``auto`` uses OpenVINO;
  torch bf16 stays the fast mode without OpenVINO. Cosine to plain: 0.999953 (OpenVINO),
  0.999972 (autocast), 0.999947 (bf16 weights).
* Exact mode. RESULTS.md: kit OpenVINO f32 6.08 s (2.06x plain), plain OpenVINO f32 6.36 s, torch
  SDPA 6.90 s, ONNX Runtime fp32 6.79 s, ``torch.compile`` 7.95 s. Interleaved in one process:
  OpenVINO f32 6.24 s, torch SDPA 6.60 s. On this CPU they are close; on the AMD EPYC of issue 14
  OpenVINO f32 was 1.3x faster than the SDPA path (2.02x vs 1.56x plain), so ``auto`` uses it.
  Max abs diff to plain: 1.3e-5 (OpenVINO f32), 3.3e-6 (SDPA).
* No int8: torch's dynamic int8 (the old fast mode) held cosine ~0.9997 and ONNX Runtime's
  dynamic int8 0.999742, both below the 0.9999 that fast mode promises. On CPUs without native
  bf16, emulated bf16 is slower than f32, so those CPUs run f32 (not measured here: no such CPU).
* Memory (peak RSS, load plus embeddings): torch 1.4 GiB, OpenVINO bf16 1.9 GiB, OpenVINO f32
  2.4 GiB (its global blocks hold full attention maps: +1 GB while it runs; exporting them one
  head group at a time cut that to +0.4-0.7 GB but ran 11-30 % slower, so it was not adopted),
  plain SAM 3.6 GiB, ONNX Runtime 4.5-4.8 GiB. OpenVINO misses the 1.5 GB goal;
  ``backend="torch"`` is the low-memory choice.
* Start-up: the first start per checkpoint and precision converts and caches (16-20 s here);
  later starts load the cached compiled model (3.5-4.5 s, including reading the checkpoint).

``predict`` on a cached embedding does the image-only part of the mask decoder once per embedding
(dense PE, ``no_mask_embed``, the first block's image projections), runs the rest for one prompt
without batch copies, folds projections into the few prompt tokens where that is cheaper, and
runs the mask upscaling as two matrix products instead of mkldnn deconvolutions (see
``_decode``). Scores and low-res logits match ``SamPredictor.predict`` to float rounding
(~1e-7 / ~1e-6), so the thresholded masks are the same bar pixels whose logit is within
rounding of the threshold. Only this kit's code does this; the model's modules are unchanged.

Accuracy of the masks comes from MedicoSAM's weights; it is not measured here (tests use random
weights and only check agreement with the reference implementation).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medico_adapters.accel import medico_sam_accel as accel
from medico_adapters.checkpoint import Checkpoint, load_checkpoint, require_loadable
from medico_adapters.device import select_device
from medico_adapters.embeddings.store import EmbeddingStore, state_identity
from medico_adapters.errors import BackendError, CheckpointError, ImageError

__all__ = ["BACKENDS", "BackendWarning", "Embedding", "EncoderPlan", "Predictor", "checkpoint_identity", "choose_backend"]


@dataclass
class Embedding:
    """An image embedding with the sizes ``predict`` needs to map prompts and masks back."""

    features: torch.Tensor  # 1 x 256 x 64 x 64, float32, CPU or device
    original_size: tuple[int, int]
    input_size: tuple[int, int]


BACKENDS = ("auto", "torch", "openvino")


class BackendWarning(UserWarning):
    """The predictor runs, but not on the backend it would have liked (said once, with the reason)."""


@dataclass(frozen=True)
class EncoderPlan:
    """Which backend runs the image encoder, at which precision, and why."""

    backend: str  # "torch" or "openvino"
    precision: str  # "f32", "bf16" or "f16"
    reason: str
    missing_openvino: bool = False  # "auto" on a CPU would have used OpenVINO, had it been installed


def choose_backend(
    backend: str = "auto",
    device: str = "cpu",
    exact: bool = True,
    *,
    flags: frozenset | None = None,
    openvino: bool | None = None,
    cuda_bf16: bool | None = None,
) -> EncoderPlan:
    """Decide backend and precision from the request, the device and this CPU's flags.

    ``flags``, ``openvino`` (importable or not) and ``cuda_bf16`` default to what this machine
    has; tests pass fake ones. ``exact`` always means f32. Otherwise the CPU runs bf16 only
    where it has it in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than
    f32, and the int8 paths measured (torch dynamic quantisation, ONNX Runtime) miss the
    cosine >= 0.9999 bound, so those CPUs run f32. A GPU runs bf16 (CUDA with bf16) or f16.
    """
    if backend not in BACKENDS:
        raise BackendError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    kind = torch.device(device).type
    if kind != "cpu":
        if backend == "openvino":
            raise BackendError(f"backend 'openvino' runs on the CPU only, not on {device}; add --device cpu")
        if exact:
            return EncoderPlan("torch", "f32", f"exact on {kind}")
        if kind == "cuda" and (torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16):
            return EncoderPlan("torch", "bf16", "fast on a GPU with bf16")
        return EncoderPlan("torch", "f16", f"fast on {kind}")
    if flags is None:
        flags = accel.cpu_flags()
    if openvino is None:
        openvino = accel.openvino_version() is not None
    if backend == "openvino" and not openvino:
        raise BackendError(
            "backend 'openvino': OpenVINO is not installed; pip install 'medico-adapters[fast]' or use --backend torch"
        )
    bf16 = accel.native_bf16(flags)
    precision = "f32" if exact or not bf16 else "bf16"
    why = "exact" if exact else ("fast; the CPU has native bf16" if bf16 else "fast; no native bf16 on this CPU")
    if backend == "torch":
        return EncoderPlan("torch", precision, why)
    if not openvino:
        return EncoderPlan("torch", precision, f"{why}; OpenVINO is not installed", missing_openvino=True)
    return EncoderPlan("openvino", precision, why)


def checkpoint_identity(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of the weights, so caches notice a changed checkpoint whatever its path."""
    import xxhash

    digest = xxhash.xxh3_128()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().contiguous().cpu()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _build_sam(ckpt: Checkpoint) -> torch.nn.Module:
    from segment_anything import sam_model_registry

    arch = ckpt.info.arch
    if arch not in sam_model_registry:
        raise CheckpointError(f"{ckpt.info.path}: {arch} is not built by segment_anything")
    sam = sam_model_registry[arch]()
    try:
        sam.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.info.path}: weights do not fit {arch} ({str(e).splitlines()[0]})") from None
    return sam.eval()


def as_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Validate a 2D grey (HxW) or RGB (HxWx3) uint8 image and return it as HxWx3."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ImageError(
            f"{name}: expected uint8 pixels, got {image.dtype}; normalise it first "
            "(medico_adapters.io.to_uint8)"
        )
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"{name}: expected a HxW or HxWx3 image, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{name}: the image has zero size {image.shape[:2]}")
    return np.ascontiguousarray(image)


class Predictor:
    """Embed an image once, then predict masks for prompts, like ``SamPredictor``.

    ``checkpoint`` is a path in any format ``load_checkpoint`` reads, or a loaded ``Checkpoint``.
    ``exact=True`` reproduces ``SamPredictor``'s embedding; ``exact=False`` is faster and close.
    ``backend`` picks what runs the image encoder (see ``choose_backend``); ``describe()`` says
    what was chosen and why.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | Checkpoint,
        device: str | None = None,
        exact: bool = True,
        *,
        trust: bool = False,
        backend: str = "auto",
        log: Callable[[str], object] | None = None,
    ) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.device = torch.device(select_device(device))
        plan = choose_backend(backend, str(self.device), exact)
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(Path(checkpoint), trust=trust)
        require_loadable(ckpt)
        self.checkpoint_path = ckpt.info.path
        self.arch = ckpt.info.arch
        self.exact = exact
        self.checkpoint_id = checkpoint_identity(ckpt.state_dict)
        self.encoder_id = state_identity(ckpt.state_dict)
        self.model = _build_sam(ckpt).to(self.device)
        del ckpt
        self.encoder_cache: str | None = None  # the compiled-encoder file OpenVINO loaded or wrote
        self.plan = self._accelerate(plan, log)
        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)
        self._dense_pe = None
        self._prep: _Prepared | None = None
        self._embedding: Embedding | None = None

    def _accelerate(self, plan: EncoderPlan, log) -> EncoderPlan:
        """Swap in the planned encoder; a failed OpenVINO conversion falls back to torch, with a warning.

        ``log`` hears about the one slow step users would otherwise wonder about: the first
        conversion of a checkpoint.
        """
        if plan.backend == "openvino":
            from medico_adapters import fsio
            from medico_adapters.registry import cache_dir

            try:
                encoder = accel.openvino_encoder(
                    self.model.image_encoder, plan.precision, cache_dir=cache_dir() / "openvino",
                    key=f"{self.arch}-{self.checkpoint_id}", write=fsio.atomic_write, log=log,
                )
            except Exception as e:  # any OpenVINO or export failure leaves the torch path, which works
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                plan = EncoderPlan("torch", plan.precision, f"{plan.reason}; OpenVINO failed ({type(e).__name__}: {first})")
                warnings.warn(f"OpenVINO could not compile the image encoder, using torch: {plan.reason}",
                              BackendWarning, stacklevel=3)
            else:
                self.model.image_encoder = encoder
                self.encoder_cache = f"{'loaded' if encoder.from_cache else 'wrote'} {encoder.cache_file}"
                return plan
        elif plan.missing_openvino:
            warnings.warn("OpenVINO is not installed, so CPU embeddings use the slower torch path; "
                          "pip install 'medico-adapters[fast]' for the fast one", BackendWarning, stacklevel=3)
        accel.bind_sdpa_attention(self.model.image_encoder)
        return plan

    @property
    def backend(self) -> str:
        return self.plan.backend

    @property
    def precision(self) -> str:
        return self.plan.precision

    @property
    def identity(self) -> str:
        """What an embedding depends on besides the image: weights, and the precision when not exact."""
        mode = "exact" if self.exact else f"fast-{self.plan.backend}-{self.plan.precision}"
        return f"{self.arch}-{self.checkpoint_id}-{mode}"

    @property
    def store_model(self) -> str:
        """The model part of an embedding-store key: the encoder's weights, and the precision
        when it is not exact (exact embeddings are shared with the tools' own f32 ones)."""
        return self.encoder_id if self.exact else f"{self.encoder_id[:24]}{self.plan.backend[:2]}{self.plan.precision}"

    def describe(self) -> dict:
        """Backend, precision and why, for reports and ``--json``."""
        return {"backend": self.plan.backend, "precision": self.plan.precision, "reason": self.plan.reason,
                "encoder_cache": self.encoder_cache}

    # -- embedding -------------------------------------------------------------------------
    def embed(self, image: np.ndarray) -> Embedding:
        """Compute the embedding of ``image`` without making it the current one."""
        rgb = as_rgb(image)
        resized = self.transform.apply_image(rgb)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        with torch.inference_mode(), self._autocast():
            features = self.model.image_encoder(self.model.preprocess(tensor)).float()
        return Embedding(features, tuple(rgb.shape[:2]), tuple(tensor.shape[-2:]))

    def embed_stored(self, image: np.ndarray, store: EmbeddingStore | None) -> tuple[Embedding, bool]:
        """``embed``, through ``store`` (None: no store): (the embedding, whether it was computed)."""
        rgb = as_rgb(image)
        if store is None:
            return self.embed(rgb), True
        size = self.transform.get_preprocess_shape(rgb.shape[0], rgb.shape[1], self.transform.target_length)
        key = store.key(self.store_model, rgb, size)
        features = store.get(key)
        if features is not None:
            return Embedding(torch.from_numpy(features).to(self.device), tuple(rgb.shape[:2]), tuple(size)), False
        embedding = self.embed(rgb)
        store.put(key, embedding.features.cpu().numpy())
        return embedding, True

    def _autocast(self):
        """Lower precision for the torch backend when planned (OpenVINO sets its own)."""
        if self.plan.backend != "torch" or self.plan.precision == "f32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.plan.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def set_image(self, image: np.ndarray) -> None:
        """Embed ``image`` (HxW grey or HxWx3 RGB uint8) and make it current."""
        self._embedding = self.embed(image)

    def set_embedding(
        self,
        embedding: Embedding | torch.Tensor | np.ndarray,
        original_size: tuple[int, int] | None = None,
    ) -> None:
        """Reuse an embedding computed earlier (an ``Embedding``, or features plus image size)."""
        if not isinstance(embedding, Embedding):
            if original_size is None:
                raise ValueError("original_size is needed when passing raw features")
            h, w = (int(s) for s in original_size)
            features = torch.as_tensor(np.asarray(embedding) if not torch.is_tensor(embedding) else embedding)
            if features.ndim == 3:
                features = features[None]
            embedding = Embedding(features, (h, w), self.transform.get_preprocess_shape(h, w, self.transform.target_length))
        self._embedding = Embedding(
            embedding.features.to(self.device, torch.float32),
            tuple(embedding.original_size),
            tuple(embedding.input_size),
        )

    def get_image_embedding(self) -> torch.Tensor:
        """The current embedding, 1x256x64x64 (as ``SamPredictor.get_image_embedding``)."""
        return self._current().features

    def current_embedding(self) -> Embedding:
        return self._current()

    def reset_image(self) -> None:
        self._embedding = None

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    def _current(self) -> Embedding:
        if self._embedding is None:
            raise RuntimeError("set_image() or set_embedding() must be called before predicting")
        return self._embedding

    # -- prompting -------------------------------------------------------------------------
    def _image_pe(self) -> torch.Tensor:
        if self._dense_pe is None:
            with torch.inference_mode():
                self._dense_pe = self.model.prompt_encoder.get_dense_pe()
        return self._dense_pe

    def _prepared(self, emb: Embedding) -> _Prepared:
        """The prompt-independent decoder inputs for ``emb``, computed on its first predict."""
        cached = self._prep
        if cached is None or cached.embedding is not emb:
            with torch.inference_mode():
                cached = _Prepared(self.model, emb, self._image_pe())
            self._prep = cached
        return cached

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks (CxHxW), scores (C) and 256x256 low-res logits (CxHxW), as ``SamPredictor``.

        Points are (x, y) pixels of the original image; ``box`` is x0, y0, x1, y1.
        """
        emb = self._current()
        dev = self.device
        points = boxes = masks_in = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            coords = self.transform.apply_coords(np.asarray(point_coords, dtype=np.float64), emb.original_size)
            points = (
                torch.as_tensor(coords, dtype=torch.float, device=dev)[None],
                torch.as_tensor(np.asarray(point_labels), dtype=torch.int, device=dev)[None],
            )
        if box is not None:
            scaled = self.transform.apply_boxes(np.asarray(box, dtype=np.float64), emb.original_size)
            boxes = torch.as_tensor(scaled, dtype=torch.float, device=dev)[None]
        if mask_input is not None:
            masks_in = torch.as_tensor(np.asarray(mask_input), dtype=torch.float, device=dev)[None]
        prep = self._prepared(emb)
        with torch.inference_mode():
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=masks_in)
            low_res, scores = _decode(self.model.mask_decoder, prep, sparse, dense if masks_in is not None else None,
                                      multimask_output)
            masks = _upscale(self.model, low_res, emb.input_size, emb.original_size)
            if not return_logits:
                masks = masks > self.model.mask_threshold
        return masks[0].cpu().numpy(), scores[0].cpu().numpy(), low_res[0].cpu().numpy()


# -- mask decoder with the image-only work done once per embedding ---------------------------
#
# ``SamPredictor.predict`` re-runs, for every prompt, work that depends on the image alone: the
# 64x64 dense positional encoding, adding ``no_mask_embed`` to the 4096 image tokens and, in the
# first two-way block (which adds no PE to the prompt tokens' self-attention, and whose image
# tokens are still the embedding itself), three 4096x256 -> 128 projections. ``_Prepared``
# computes those once per embedding. ``_decode`` is the decoder's forward for the one prompt
# ``predict`` handles (batch 1, so no ``repeat_interleave``), with three reorderings that give
# the same values up to float rounding (max |diff| of the low-res logits ~1e-6):
#   * image -> token attention is computed transposed (tokens x pixels), so the softmax runs
#     over pixels, the slow softmax over the 7-ish prompt tokens and its head-recombining copy
#     disappear (matmul writes straight into the recombined layout);
#   * token -> image attention with few tokens folds the key and value projections into the
#     tokens, (W_k^T q) . x instead of q . (W_k x + b) (the bias only shifts every logit of a
#     row by the same amount, which softmax ignores), and W_v (sum_j p_j x_j) + b for the value:
#     2 x (8 T x 4096 x 256) multiply-adds instead of 2 x (4096 x 256 x 128) for T < 16 tokens;
#   * ``output_upscaling`` runs as two matrix products (``_upscaled_masks``).

_FOLD_TOKENS = 16  # token -> image attention folds projections below this many tokens


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, c = x.shape
    return x.reshape(b, t, n, c // n).transpose(1, 2)


def _recombined(out: torch.Tensor) -> torch.Tensor:
    b, n, t, c = out.shape
    return out.transpose(1, 2).reshape(b, t, n * c)


def _attend(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's ``Attention.forward`` (few tokens on both sides)."""
    n = attn.num_heads
    q, k, v = _heads(attn.q_proj(q), n), _heads(attn.k_proj(k), n), _heads(attn.v_proj(v), n)
    a = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return attn.out_proj(_recombined(a @ v))


def _token_to_image(attn: torch.nn.Module, q: torch.Tensor, key_in: torch.Tensor, values: torch.Tensor,
                    projected: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Prompt tokens (1 x T x C) attending to image tokens (1 x N x C): ``attn(q, key_in, values)``."""
    n = attn.num_heads
    qh = _heads(attn.q_proj(q), n)  # 1 x heads x T x d
    d = qh.shape[-1]
    if projected is not None:
        k, v = projected
    elif q.shape[1] < _FOLD_TOKENS:
        c = key_in.shape[-1]
        wk = attn.k_proj.weight.view(n, d, c)
        wv = attn.v_proj.weight.view(n, d, c)
        folded = (qh[0] @ wk).reshape(-1, c)  # heads*T x C
        a = torch.softmax((folded @ key_in[0].t()) / math.sqrt(d), dim=-1)  # heads*T x N
        pooled = (a @ values[0]).view(n, -1, c)  # heads x T x C
        out = pooled @ wv.transpose(1, 2) + attn.v_proj.bias.view(n, 1, d)
        return attn.out_proj(_recombined(out[None]))
    else:
        k, v = _heads(attn.k_proj(key_in), n), _heads(attn.v_proj(values), n)
    a = torch.softmax((qh @ k.transpose(-1, -2)) / math.sqrt(d), dim=-1)
    return attn.out_proj(_recombined(a @ v))


def _image_to_token(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Image tokens (projected, 1 x heads x N x d) attending to prompt tokens: SAM's maths, transposed."""
    n = attn.num_heads
    kh, vh = _heads(attn.k_proj(k), n), _heads(attn.v_proj(v), n)
    b, _, length, d = q.shape
    a = torch.softmax((kh @ q.transpose(-1, -2)) / math.sqrt(d), dim=-2)  # 1 x heads x T x N
    out = torch.empty((b, length, n, d), dtype=q.dtype, device=q.device)
    torch.matmul(a.transpose(-1, -2), vh, out=out.transpose(1, 2))
    return attn.out_proj(out.view(b, length, n * d))


class _Prepared:
    """Image-only decoder inputs: tokens with ``no_mask_embed``, their PE and first-block projections."""

    def __init__(self, sam: torch.nn.Module, emb: Embedding, dense_pe: torch.Tensor) -> None:
        self.embedding = emb
        features = emb.features
        self.shape = tuple(features.shape)
        self.features = features
        self.pe = dense_pe.flatten(2).transpose(1, 2).contiguous()
        no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        self.keys = (features + no_mask).flatten(2).transpose(1, 2).contiguous()
        first = sam.mask_decoder.transformer.layers[0]
        self.first = None
        if first.skip_first_layer_pe:
            key_in = self.keys + self.pe
            to_image, to_token = first.cross_attn_token_to_image, first.cross_attn_image_to_token
            self.first = (
                _heads(to_image.k_proj(key_in), to_image.num_heads),
                _heads(to_image.v_proj(self.keys), to_image.num_heads),
                _heads(to_token.q_proj(key_in), to_token.num_heads),
            )
        self.upscaling = _upscaling_weights(sam.mask_decoder.output_upscaling)


def _decode(decoder: torch.nn.Module, prep: _Prepared, sparse: torch.Tensor, dense: torch.Tensor | None,
            multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.forward`` for one prompt, computing only the masks asked for."""
    transformer = decoder.transformer
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)[None]
    tokens = torch.cat((tokens, sparse), dim=1)
    if dense is None:
        keys, cached = prep.keys, prep.first
    else:
        keys, cached = (prep.features + dense).flatten(2).transpose(1, 2).contiguous(), None
    key_pe, query_pe = prep.pe, tokens

    queries = tokens
    for i, layer in enumerate(transformer.layers):
        if layer.skip_first_layer_pe:
            queries = _attend(layer.self_attn, queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + _attend(layer.self_attn, q, q, queries)
        queries = layer.norm1(queries)

        to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        if i == 0 and cached is not None:
            key_in = None
            k_img, v_img, q_img = cached
            attn_out = _token_to_image(to_image, queries + query_pe, key_in, keys, (k_img, v_img))
        else:
            key_in = keys + key_pe
            attn_out = _token_to_image(to_image, queries + query_pe, key_in, keys)
            q_img = _heads(to_token.q_proj(key_in), to_token.num_heads)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + _image_to_token(to_token, q_img, queries + query_pe, queries))

    final = transformer.final_attn_token_to_image
    queries = queries + _token_to_image(final, queries + query_pe, keys + key_pe, keys)
    queries = transformer.norm_final_attn(queries)

    chosen = range(1, decoder.num_mask_tokens) if multimask else range(1)
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + i, :]) for i in chosen], dim=1)
    b, c, h, w = prep.shape
    if prep.upscaling is not None:
        masks = _upscaled_masks(prep.upscaling, keys[0], hyper[0], h, w)[None]
    else:
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).view(b, c, h, w))
        b, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou = decoder.iou_prediction_head(queries[:, 0, :])
    return masks, iou[:, chosen.start : chosen.stop]


def _upscaling_weights(upscaling: torch.nn.Module):
    """Weights to run SAM's ``output_upscaling`` as two matrix products, or None if it differs.

    A ConvTranspose2d with kernel 2 and stride 2 writes each input pixel's ``C -> 4 O`` linear
    map into a 2x2 output block, so it is a (pixels x C) @ (C x 4 O) product followed by a
    rearrangement. The columns are ordered (dy, dx, O) so that channels stay innermost for the
    channel LayerNorm and the next product; the spatial rearrangement is done once, on the
    (few) final mask logits. mkldnn's deconvolution on CPU is several times slower than this.
    """
    from segment_anything.modeling.common import LayerNorm2d

    parts = list(upscaling)
    if len(parts) != 5:
        return None
    up1, norm, act1, up2, act2 = parts
    for conv in (up1, up2):
        if not (
            isinstance(conv, torch.nn.ConvTranspose2d) and conv.kernel_size == (2, 2) and conv.stride == (2, 2)
            and conv.padding == (0, 0) and conv.output_padding == (0, 0) and conv.groups == 1
            and conv.dilation == (1, 1) and conv.bias is not None
        ):
            return None
    if not isinstance(norm, LayerNorm2d):
        return None

    def matrix(conv):  # C_in x O x 2 x 2 -> C_in x (2 * 2 * O)
        return conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1).contiguous()

    return (
        matrix(up1), up1.bias.repeat(4), norm, act1,
        matrix(up2), up2.bias.repeat(4), act2,
    )


def _activate(act: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)``, in place for GELU (saves a fresh multi-MiB buffer per call)."""
    if type(act) is torch.nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    return act(x)


def _upscaled_masks(weights, tokens: torch.Tensor, hyper: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Mask logits (n x 4h x 4w) from image tokens (h*w x C) and hypernetwork outputs (n x C/8)."""
    w1, b1, norm, act1, w2, b2, act2 = weights
    x = torch.addmm(b1, tokens, w1)  # rows (y, x); columns (dy, dx, o)
    o1 = norm.weight.shape[0]
    x = F.layer_norm(x.view(-1, o1), (o1,), norm.weight, norm.bias, norm.eps)
    x = _activate(act1, x)
    x = _activate(act2, torch.addmm(b2, x, w2))  # rows (y, x, dy, dx); columns (ey, ex, c)
    n = hyper.shape[0]
    logits = x.view(-1, hyper.shape[1]) @ hyper.t()  # rows (y, x, dy, dx, ey, ex)
    logits = logits.view(h, w, 2, 2, 2, 2, n).permute(6, 0, 2, 4, 1, 3, 5)
    return logits.reshape(n, 4 * h, 4 * w)


def _upscale(sam: torch.nn.Module, low_res: torch.Tensor, input_size, original_size) -> torch.Tensor:
    """``Sam.postprocess_masks``: bilinear to the padded input size, crop, bilinear to the original."""
    size = sam.image_encoder.img_size
    masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
