"""A SamPredictor work-alike that loads any SAM checkpoint and embeds images faster on CPU.

Why it exists: on a laptop CPU, plain ``segment_anything.SamPredictor.set_image`` spends most of
its time in the four global-attention blocks of the ViT, which materialise a 12x4096x4096
attention map, add the decomposed relative-position bias in several full-size copies and then
softmax it. Here each attention module *of the loaded model instance only* gets a forward that
calls ``torch.nn.functional.scaled_dot_product_attention`` with the bias passed as ``attn_mask``
(one head at a time for the global blocks, so only a 64 MiB mask exists at once). The result is
the same embedding (max abs diff well below 1e-4); ``segment_anything`` itself is never patched.

``exact=False`` additionally runs the ViT's linear layers through dynamically quantised int8
kernels (fbgemm), trading a cosine similarity of about 0.999 for more speed. bf16/fp16 autocast
was measured and rejected: on CPUs without native bf16 it is several times slower than fp32.

Accuracy of the masks comes from MedicoSAM's weights; it is not measured here (tests use random
weights and only check agreement with the reference implementation).
"""

from __future__ import annotations

import math
import os
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medico_adapters.checkpoint import Checkpoint, load_checkpoint, require_loadable
from medico_adapters.device import select_device
from medico_adapters.errors import CheckpointError, ImageError

__all__ = ["Embedding", "Predictor", "accelerate_image_encoder", "checkpoint_identity"]


@dataclass
class Embedding:
    """An image embedding with the sizes ``predict`` needs to map prompts and masks back."""

    features: torch.Tensor  # 1 x 256 x 64 x 64, float32, CPU or device
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def _rel_pos(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position table indexed by (query, key) for equal query and key sizes.

    Same maths as SAM's ``get_rel_pos`` for q_size == k_size, including the linear
    interpolation when the table was trained for another size.
    """
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t()[None], size=length, mode="linear")[0].t()
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[(coords[:, None] - coords[None, :] + size - 1)]


def _split_qkv(attn: torch.nn.Module, x: torch.Tensor):
    b, h, w, _ = x.shape
    qkv = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)  # each B x heads x N x C


def _bias(
    q: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor, h: int, w: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Decomposed rel-pos bias (B x heads x N x N) for queries ``q`` (B x heads x N x C).

    ``out`` lets the global blocks reuse one buffer for all heads: a fresh 64 MiB tensor per
    head costs more in page faults than the addition itself.
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
    """Drop-in forward for ``segment_anything``'s ViT ``Attention`` using SDPA.

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
        if h * w <= 1024:
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


def _quantise_linears(encoder: torch.nn.Module) -> None:
    """Swap the ViT blocks' Linear layers for int8 dynamic-quantised ones (CPU only)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in encoder.blocks:
            quantize_dynamic(block, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def accelerate_image_encoder(sam: torch.nn.Module, exact: bool = True) -> None:
    """Give the attention modules of *this* model's image encoder the SDPA forward.

    Binding a method on each instance (not assigning to the class) keeps every other SAM in the
    process, and ``segment_anything`` itself, untouched.
    """
    encoder = sam.image_encoder
    blocks = getattr(encoder, "blocks", None)
    if blocks is None:
        return  # not a ViT (e.g. MobileSAM's TinyViT): leave it as it is
    if not exact and next(encoder.parameters()).device.type == "cpu":
        _quantise_linears(encoder)
    for block in blocks:
        attn = block.attn
        attn.forward = types.MethodType(_sdpa_forward, attn)


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
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | Checkpoint,
        device: str | None = None,
        exact: bool = True,
        *,
        trust: bool = False,
    ) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(Path(checkpoint), trust=trust)
        require_loadable(ckpt)
        self.checkpoint_path = ckpt.info.path
        self.arch = ckpt.info.arch
        self.exact = exact
        self.checkpoint_id = checkpoint_identity(ckpt.state_dict)
        self.device = torch.device(select_device(device))
        self.model = _build_sam(ckpt).to(self.device)
        accelerate_image_encoder(self.model, exact=exact)
        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)
        self._dense_pe = None
        self._prep: _Prepared | None = None
        self._embedding: Embedding | None = None

    @property
    def identity(self) -> str:
        """What an embedding depends on besides the image: weights and exact/fast mode."""
        return f"{self.arch}-{self.checkpoint_id}-{'exact' if self.exact else 'fast'}"

    # -- embedding -------------------------------------------------------------------------
    def embed(self, image: np.ndarray) -> Embedding:
        """Compute the embedding of ``image`` without making it the current one."""
        rgb = as_rgb(image)
        resized = self.transform.apply_image(rgb)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        with torch.inference_mode():
            features = self.model.image_encoder(self.model.preprocess(tensor))
        return Embedding(features, tuple(rgb.shape[:2]), tuple(tensor.shape[-2:]))

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
# 64x64 dense positional encoding, adding ``no_mask_embed`` to the 4096 image tokens, and in the
# first two-way block (which skips the token PE on the image side of nothing but self-attention)
# three 4096x256 -> 128 projections of the unchanged image tokens. ``_Prepared`` computes those
# once; ``_decode`` is the decoder's forward with the same operations in the same order, reusing
# them, for the one prompt ``predict`` handles (batch 1, so no ``repeat_interleave``).


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, c = x.shape
    return x.reshape(b, t, n, c // n).transpose(1, 2)


def _attend(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention on head-separated projections, then recombine and ``out_proj`` (SAM's maths)."""
    a = q @ k.transpose(-1, -2)
    a = a / math.sqrt(q.shape[-1])
    a = torch.softmax(a, dim=-1)
    out = a @ v
    b, n, t, c = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, n * c))


def _project(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    n = attn.num_heads
    return _heads(attn.q_proj(q), n), _heads(attn.k_proj(k), n), _heads(attn.v_proj(v), n)


class _Prepared:
    """Image-only decoder inputs: tokens with ``no_mask_embed``, their PE and first-block projections."""

    def __init__(self, sam: torch.nn.Module, emb: Embedding, dense_pe: torch.Tensor) -> None:
        self.embedding = emb
        features = emb.features
        self.shape = tuple(features.shape)
        self.features = features
        self.pe = dense_pe.flatten(2).permute(0, 2, 1)
        no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        self.keys = (features + no_mask).flatten(2).permute(0, 2, 1)
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


def _decode(decoder: torch.nn.Module, prep: _Prepared, sparse: torch.Tensor, dense: torch.Tensor | None,
            multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.forward`` for one prompt, returning only the masks asked for."""
    transformer = decoder.transformer
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)[None]
    tokens = torch.cat((tokens, sparse), dim=1)
    if dense is None:
        keys, cached = prep.keys, prep.first
    else:
        keys, cached = (prep.features + dense).flatten(2).permute(0, 2, 1), None
    key_pe, query_pe = prep.pe, tokens

    queries = tokens
    for i, layer in enumerate(transformer.layers):
        if layer.skip_first_layer_pe:
            sa = layer.self_attn
            queries = _attend(sa, *_project(sa, queries, queries, queries))
        else:
            q = queries + query_pe
            sa = layer.self_attn
            queries = queries + _attend(sa, *_project(sa, q, q, queries))
        queries = layer.norm1(queries)

        to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        if i == 0 and cached is not None:
            k_img, v_img, q_img = cached
        else:
            key_in = keys + key_pe
            k_img = _heads(to_image.k_proj(key_in), to_image.num_heads)
            v_img = _heads(to_image.v_proj(keys), to_image.num_heads)
            q_img = None
        q_tok = _heads(to_image.q_proj(queries + query_pe), to_image.num_heads)
        queries = layer.norm2(queries + _attend(to_image, q_tok, k_img, v_img))
        queries = layer.norm3(queries + layer.mlp(queries))

        if q_img is None:
            q_img = _heads(to_token.q_proj(key_in), to_token.num_heads)
        q = queries + query_pe
        k_tok = _heads(to_token.k_proj(q), to_token.num_heads)
        v_tok = _heads(to_token.v_proj(queries), to_token.num_heads)
        keys = layer.norm4(keys + _attend(to_token, q_img, k_tok, v_tok))

    final = transformer.final_attn_token_to_image
    queries = queries + _attend(final, *_project(final, queries + query_pe, keys + key_pe, keys))
    queries = transformer.norm_final_attn(queries)

    b, c, h, w = prep.shape
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).view(b, c, h, w))
    chosen = range(1, decoder.num_mask_tokens) if multimask else range(1)
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + i, :]) for i in chosen], dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou = decoder.iou_prediction_head(queries[:, 0, :])
    return masks, iou[:, chosen.start : chosen.stop]


def _upscale(sam: torch.nn.Module, low_res: torch.Tensor, input_size, original_size) -> torch.Tensor:
    """``Sam.postprocess_masks``: bilinear to the padded input size, crop, bilinear to the original."""
    size = sam.image_encoder.img_size
    masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
