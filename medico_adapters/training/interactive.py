"""Interactive fine-tuning: SAM's prompt encoder and mask decoder (and, deeper, its encoder) trained
with simulated prompts and correction rounds, as SAM and micro-sam train them.

One step: a training slice and up to ``objects_per_step`` of its objects; a positive point on
even steps (three masks out, the loss takes the best, as SAM resolves ambiguity) or a jittered box
on odd steps; then ``rounds - 1`` correction rounds, each adding a point sampled in the previous
mask's error region and, with probability ``mask_prob``, feeding the previous low-res logits back as
the mask prompt (micro-sam's ``SamTrainer``). The loss of each round is

    Dice(sigmoid(logits), target) + focal(logits, target) + MSE(predicted IoU, actual IoU)

(MONAI's ``DiceLoss`` and ``FocalLoss``, each per object; for three masks the best mask's loss),
averaged over rounds. Masks are compared at the slice's own resolution.

Depths (``mode``): ``decoder`` trains the prompt encoder and mask decoder on embeddings computed
once (the encoder is frozen); ``lora`` adds low-rank adapters to the encoder's attention and runs
the encoder each step; ``full`` trains every weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medico_adapters.predictor import _upscale
from medico_adapters.training import prompts
from medico_adapters.training.data import Slice

__all__ = ["MODES", "Target", "InteractiveTask", "evaluate", "loss_terms", "targets_of"]

MODES = ("decoder", "lora", "full")
CORRECTIONS = 8  # the evaluation's iterative protocol: 1 to 8 correction clicks after the centre point


@dataclass
class Target:
    """One object on one slice: a label value (or one connected part of it) and its mask."""

    slice: int
    value: int
    name: str
    mask: np.ndarray  # H x W bool


def targets_of(slices: Sequence[Slice], names: dict[int, str], *, connected: bool = False,
               min_pixels: int = 10) -> list[list[Target]]:
    """The objects on each slice: one per label value, or per connected part with ``connected``;
    parts smaller than ``min_pixels`` are left out (too small to click on)."""
    per_slice = []
    for i, s in enumerate(slices):
        found = []
        for value in (int(v) for v in np.unique(s.labels) if v):
            mask = s.labels == value
            name = names.get(value, f"label {value}")
            parts = [mask]
            if connected:
                labelled, count = ndimage.label(mask)
                parts = [labelled == k for k in range(1, count + 1)]
            found += [Target(i, value, name, part) for part in parts if part.sum() >= min_pixels]
        per_slice.append(found)
    return per_slice


# -- SAM's forward, differentiable, for a batch of prompts on one slice --------------------------
def _scale(coords: np.ndarray, original: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """(x, y) pixels of the slice to SAM's resized input frame (``ResizeLongestSide.apply_coords``)."""
    h, w = original
    ih, iw = input_size
    out = np.array(coords, dtype=np.float64)
    out[..., 0] *= iw / w
    out[..., 1] *= ih / h
    return out


def decode(sam, features: torch.Tensor, input_size, original_size, points=None, labels=None, boxes=None,
           mask_input=None, multimask: bool = False, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask logits at the slice's size (B x M x H x W), IoU predictions (B x M), low-res logits.

    ``points`` B x N x 2 and ``boxes`` B x 4 in slice pixels (x, y); ``mask_input`` B x 1 x 256 x 256.
    ``exact``: upscale as the tools do (the predictor's ``_upscale``); else in one step (``upscale_once``, training).
    """
    device = features.device
    pts = boxes_t = None
    if points is not None:
        pts = (torch.as_tensor(_scale(points, original_size, input_size), dtype=torch.float32, device=device),
               torch.as_tensor(np.asarray(labels), dtype=torch.int, device=device))
    if boxes is not None:
        scaled = _scale(np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2), original_size, input_size)
        boxes_t = torch.as_tensor(scaled.reshape(-1, 4), dtype=torch.float32, device=device)
    sparse, dense = sam.prompt_encoder(points=pts, boxes=boxes_t, masks=mask_input)
    if exact:
        low_res, iou = sam.mask_decoder(
            image_embeddings=features, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
        )
    else:
        low_res, iou = train_decoder(sam.mask_decoder, features, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
    resize = _upscale if exact else upscale_once
    return resize(sam, low_res, input_size, original_size), iou, low_res


def train_decoder(decoder, features: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
                  multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.forward`` for training, with the same values (float rounding apart) in less time.

    Two changes: only the masks asked for are upscaled (multimask: tokens 1-3; else token 0),
    and ``output_upscaling``'s two 2 x 2 stride-2 transposed convolutions run as matrix products
    on channel-last pixels, their 2 x 2 blocks rearranged once on the final logits (mkldnn's
    transposed convolution and its backward were a fifth of a training step on a CPU).
    """
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([tokens[None].expand(sparse.shape[0], -1, -1), sparse], dim=1)
    n = tokens.shape[0]
    src = torch.repeat_interleave(features, n, dim=0) + dense
    pos = torch.repeat_interleave(image_pe, n, dim=0)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos, tokens)
    chosen = range(1, decoder.num_mask_tokens) if multimask else range(1)
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in chosen], dim=1)
    up1, norm, act1, up2, act2 = decoder.output_upscaling
    x = src.reshape(b * h * w, c)  # rows (b, y, x): channel-last pixels
    x = x @ up1.weight.permute(0, 2, 3, 1).reshape(c, -1) + up1.bias.repeat(4)  # columns (dy, dx, o)
    o1 = up1.out_channels
    x = act1(F.layer_norm(x.reshape(-1, o1), (o1,), norm.weight, norm.bias, norm.eps))
    x = x @ up2.weight.permute(0, 2, 3, 1).reshape(o1, -1) + up2.bias.repeat(4)  # rows (b, y, x, dy, dx); (ey, ex, o)
    x = act2(x).reshape(b, -1, up2.out_channels)
    logits = x @ hyper.transpose(1, 2)  # b x (y, x, dy, dx, ey, ex) x masks
    m = hyper.shape[1]
    logits = logits.reshape(b, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, m, 4 * h, 4 * w)
    iou = decoder.iou_prediction_head(hs[:, 0, :])[:, chosen.start: chosen.stop]
    return logits, iou


def upscale_once(sam, low_res: torch.Tensor, input_size, original_size) -> torch.Tensor:
    """The low-res logits' image part straight to the slice's size: one bilinear resize instead of
    the tools' two through a 1024 x 1024 intermediate (its backward was a large share of a step)."""
    scale = low_res.shape[-1] / sam.image_encoder.img_size
    h, w = (max(1, round(s * scale)) for s in input_size)
    return F.interpolate(low_res[..., :h, :w], tuple(original_size), mode="bilinear", align_corners=False)


# -- the loss ---------------------------------------------------------------------------------------
_LOSSES = {}


def _monai_losses():
    if not _LOSSES:
        from monai.losses import DiceLoss, FocalLoss

        _LOSSES["dice"] = DiceLoss(sigmoid=True, reduction="none")
        _LOSSES["focal"] = FocalLoss(gamma=2.0, reduction="none")
    return _LOSSES["dice"], _LOSSES["focal"]


def loss_terms(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-object loss terms for B objects with M candidate masks each.

    ``logits`` B x M x H x W, ``iou_pred`` B x M, ``target`` B x 1 x H x W (0/1). Returns
    ``mask`` (Dice + focal of the best candidate, B), ``iou`` (MSE of the IoU head over all
    candidates, B), ``best`` (index of the best candidate, B) and ``actual_iou`` (B x M).
    """
    dice_loss, focal_loss = _monai_losses()
    b, m = logits.shape[:2]
    flat = logits.reshape(b * m, 1, *logits.shape[2:])
    tgt = target.repeat_interleave(m, dim=0)
    dice = dice_loss(flat, tgt).reshape(b, m)
    focal = focal_loss(flat, tgt).mean(dim=(1, 2, 3)).reshape(b, m)
    per_mask = dice + focal
    mask_loss, best = per_mask.min(dim=1)
    with torch.no_grad():
        predicted = logits > 0
        truth = target.bool()
        inter = (predicted & truth).sum(dim=(2, 3)).float()
        union = (predicted | truth).sum(dim=(2, 3)).float()
        actual = inter / union.clamp(min=1)
    iou_loss = ((iou_pred - actual) ** 2).mean(dim=1)
    return {"mask": mask_loss, "iou": iou_loss, "best": best, "actual_iou": actual, "dice": dice, "focal": focal}


# -- the task -----------------------------------------------------------------------------------
class InteractiveTask:
    """What one training step and one validation pass do; the loop (``loop.py``) drives it."""

    kind = "interactive"

    def __init__(self, sam, mode: str, train: list[list[Target]], slices: Sequence[Slice], features,
                 val: list[list[Target]] | None = None, val_features=None, *, objects_per_step: int = 2,
                 rounds: int = 2, mask_prob: float = 0.5, lora_rank: int = 4, device: str = "cpu") -> None:
        from medico_adapters.training.lora import encoder_trainables

        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
        self.sam, self.mode, self.device = sam, mode, torch.device(device)
        self.slices = slices
        self.features = features  # decoder: slice index -> Embedding-like (features, sizes); else pixels
        self.train = [t for t in train if t]
        self.val, self.val_features = val or [], val_features
        self.objects_per_step, self.rounds, self.mask_prob = objects_per_step, rounds, mask_prob
        encoder = encoder_trainables(sam, mode, lora_rank, self.device)
        decoder = [*sam.prompt_encoder.parameters(), *sam.mask_decoder.parameters()]
        for p in decoder:
            p.requires_grad_(True)
        self.params = [*encoder, *decoder]  # full: sam.parameters()' own order, so saved optimiser states resume
        if not self.train:
            raise ValueError("no training slice holds an object")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        names = {id(p) for p in self.params}
        return {k: v.detach().cpu().clone() for k, v in self.sam.named_parameters() if id(v) in names}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.sam.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value.to(own[key].device))

    def _embedding(self, slice_index: int):
        """(features 1 x 256 x 64 x 64, input size, slice size) for training: cached or encoded now."""
        if self.mode == "decoder":
            emb = self.features[slice_index]
            return emb.features.to(self.device), emb.input_size, emb.original_size
        image, input_size, original = self.features[slice_index]
        return self.sam.image_encoder(image.to(self.device)), input_size, original

    def step(self, rng: np.random.Generator, step: int) -> dict[str, float]:
        """One training step's loss, backpropagated (the loop steps the optimiser)."""
        objects = self.train[int(rng.integers(len(self.train)))]
        picks = rng.choice(len(objects), size=min(self.objects_per_step, len(objects)), replace=False)
        chosen = [objects[int(i)] for i in picks]
        features, input_size, original = self._embedding(chosen[0].slice)
        target = torch.from_numpy(np.stack([t.mask for t in chosen])[:, None].astype(np.float32)).to(self.device)
        points = labels = boxes = None
        if step % 2 == 0:
            points = np.array([[prompts.random_point(t.mask, rng)] for t in chosen], dtype=np.float64)
            labels = np.ones((len(chosen), 1), dtype=np.int64)
        else:
            boxes = np.stack([prompts.jittered_box(t.mask, rng) for t in chosen])
        mask_input = None
        total = mask_total = iou_total = 0.0
        for r in range(self.rounds):
            logits, iou_pred, low_res = decode(self.sam, features, input_size, original, points, labels, boxes,
                                               mask_input, multimask=points is not None and boxes is None and r == 0,
                                               exact=False)
            terms = loss_terms(logits, iou_pred, target)
            round_loss = (terms["mask"] + terms["iou"]).mean()
            total = total + round_loss
            mask_total += float(terms["mask"].detach().mean())
            iou_total += float(terms["iou"].detach().mean())
            if r == self.rounds - 1:
                break
            with torch.no_grad():
                best = terms["best"]
                rows = torch.arange(len(chosen))
                predicted = (logits[rows, best] > 0).cpu().numpy()
                clicks = [prompts.random_correction(t.mask, p, rng) for t, p in zip(chosen, predicted, strict=True)]
                new_points = np.array([[c[0]] for c in clicks], dtype=np.float64)
                new_labels = np.array([[c[1]] for c in clicks], dtype=np.int64)
                points = new_points if points is None else np.concatenate([points, new_points], axis=1)
                labels = new_labels if labels is None else np.concatenate([labels, new_labels], axis=1)
                mask_input = low_res[rows, best][:, None].detach() if rng.random() < self.mask_prob else None
        (total / self.rounds).backward()
        return {"loss": float(total.detach()) / self.rounds, "mask": mask_total / self.rounds, "iou": iou_total / self.rounds,
                "passes": self.rounds * len(chosen)}

    def validate(self) -> float | None:
        """Mean Dice (over organs) on the validation slices with one centre point per object."""
        if not self.val:
            return None
        result = evaluate(self.sam, self.val, self.val_features, corrections=0, protocols=("point",))
        return result["point"]["mean"]


# -- evaluation ---------------------------------------------------------------------------------
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def _summary(scores: dict[str, list[float]]) -> dict:
    per = {name: float(np.mean(v)) for name, v in sorted(scores.items())}
    every = [d for v in scores.values() for d in v]
    return {"per_object": per, "mean": float(np.mean(list(per.values()))) if per else None,
            "mean_all_objects": float(np.mean(every)) if every else None, "objects": len(every)}


@torch.no_grad()
def evaluate(sam, targets: list[list[Target]], features, *, corrections: int = CORRECTIONS,
             protocols: Sequence[str] = ("point", "box", "iterative"), keep_masks: int = 0) -> dict:
    """Dice per object name and their mean for a fixed prompt protocol (see ``prompts``).

    ``point``: one click at the object's centre (three masks, the one with the best predicted IoU,
    as the tools pick); ``box``: its tight box; ``iterative``: the centre click followed by
    ``corrections`` clicks at the centre of the largest error, each round fed the previous
    logits (Dice after each click: ``by_clicks``). ``keep_masks``: also return the point masks
    of the first few objects (for the report's picture).
    """
    was_training = sam.training
    sam.eval()
    point, box = {}, {}
    rounds: list[dict[str, list[float]]] = [{} for _ in range(corrections + 1)]
    kept = []
    for per_slice in targets:
        if not per_slice:
            continue
        emb = features[per_slice[0].slice]
        feats, input_size, original = emb.features.to(next(sam.parameters()).device), emb.input_size, emb.original_size
        for t in per_slice:
            click = np.array([[prompts.centre(t.mask)]], dtype=np.float64)
            ones = np.ones((1, 1), dtype=np.int64)
            if "point" in protocols or "iterative" in protocols:
                logits, iou, low = decode(sam, feats, input_size, original, click, ones, multimask=True)
                best = int(iou[0].argmax())
                mask = (logits[0, best] > 0).cpu().numpy()
                point.setdefault(t.name, []).append(_dice(mask, t.mask))
                if len(kept) < keep_masks:
                    kept.append({"slice": t.slice, "name": t.name, "click": click[0, 0].tolist(), "mask": mask,
                                 "truth": t.mask, "dice": point[t.name][-1]})
            if "box" in protocols:
                logits, _, _ = decode(sam, feats, input_size, original, boxes=prompts.tight_box(t.mask)[None])
                box.setdefault(t.name, []).append(_dice((logits[0, 0] > 0).cpu().numpy(), t.mask))
            if "iterative" in protocols:
                rounds[0].setdefault(t.name, []).append(point[t.name][-1])
                pts, labs, previous = click, ones, low[:, best:best + 1]
                for k in range(1, corrections + 1):
                    (x, y), label = prompts.correction(t.mask, mask)
                    pts = np.concatenate([pts, [[[x, y]]]], axis=1)
                    labs = np.concatenate([labs, [[label]]], axis=1)
                    logits, _, low = decode(sam, feats, input_size, original, pts, labs, mask_input=previous)
                    mask, previous = (logits[0, 0] > 0).cpu().numpy(), low[:, :1]
                    rounds[k].setdefault(t.name, []).append(_dice(mask, t.mask))
    sam.train(was_training)
    result = {}
    if "point" in protocols:
        result["point"] = _summary(point)
    if "box" in protocols:
        result["box"] = _summary(box)
    if "iterative" in protocols:
        result["iterative"] = {"by_clicks": [_summary(r)["mean"] for r in rounds],
                               "final": _summary(rounds[-1])}
    if keep_masks:
        result["masks"] = kept
    return result
