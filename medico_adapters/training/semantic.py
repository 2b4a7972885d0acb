"""Automatic semantic segmentation: a class per pixel from SAM's image embedding, no prompts.

``SemanticHead`` is a UNETR-style decoder (Hatamizadeh et al., 2022; medico-sam and micro-sam put
one on SAM's encoder) sized for a CPU. It starts from the 256 x 64 x 64 embedding the store holds
-- the same one the interactive tools use, so a slice embedded for one is embedded for both -- and
upsamples it by transposed convolutions to a quarter of SAM's input frame. The image part of that
map is resized to the slice, where a small convolutional stem on the slice's own pixels adds the
fine detail a 16-pixel patch embedding lacks (UNETR's full-resolution skip from the input). UNETR
also takes skips from intermediate ViT blocks; those would mean storing 3 x 768 x 64 x 64 floats
more per slice, so the head does without them.

``dims=3`` makes it a light 3D head: the embeddings of ``context`` neighbouring slices on each side
are mixed by one 3D convolution across the slices before the 2D path, so organs stay consistent
from slice to slice. A semantic model file holds the head, its class table, how slices were
normalised, and the SAM weights it embeds with (``SemanticModel``).

The loss is Dice + cross-entropy over the classes (MONAI's ``DiceCELoss``). Validation pools each
class's pixels over all validation slices before taking Dice (``per_class_dice``): MONAI's
``DiceMetric`` averages per image, which would weigh a slice with three lesion pixels like one
with three thousand.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medico_adapters.errors import CheckpointError

__all__ = ["KIND", "SemanticHead", "SemanticModel", "SemanticTask", "load_model", "per_class_dice"]

KIND = "medico-adapters semantic model"
FORMAT = 1
STEM = 16


def _block(cin: int, cout: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
    )


class SemanticHead(nn.Module):
    """Logits (N x classes x H x W) from embeddings (N x S x 256 x 64 x 64, S = 1 or 2 * context + 1)
    and the slices' SAM-normalised pixels (N x 3 x H x W)."""

    def __init__(self, classes: int, dims: int = 2, context: int = 1, width: int = 96, embed_dim: int = 256) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        self.classes, self.dims, self.context, self.width = classes, dims, context if dims == 3 else 0, width
        depth = 2 * self.context + 1
        self.fuse = (nn.Conv3d(embed_dim, width, (depth, 3, 3), padding=(0, 1, 1)) if dims == 3
                     else nn.Conv2d(embed_dim, width, 3, padding=1))
        self.low = _block(width, width)
        self.up1 = nn.ConvTranspose2d(width, width // 2, 2, stride=2)
        self.mid = _block(width // 2, width // 2)
        self.up2 = nn.ConvTranspose2d(width // 2, width // 4, 2, stride=2)
        self.high = _block(width // 4, width // 4)
        self.stem = _block(3, STEM)
        self.out = nn.Sequential(_block(width // 4 + STEM, 32), nn.Conv2d(32, classes, 1))

    def forward(self, embeddings: torch.Tensor, pixels: torch.Tensor, input_size: tuple[int, int],
                frame: int = 1024) -> torch.Tensor:
        if self.dims == 3:
            x = self.fuse(embeddings.transpose(1, 2)).squeeze(2)  # N x 256 x S x 64 x 64 -> N x width x 64 x 64
        else:
            x = self.fuse(embeddings[:, embeddings.shape[1] // 2])
        x = self.high(self.up2(self.mid(self.up1(self.low(x)))))
        scale = x.shape[-1] / frame  # the map covers SAM's padded square input frame
        h, w = (max(1, round(s * scale)) for s in input_size)
        x = F.interpolate(x[..., :h, :w], tuple(pixels.shape[-2:]), mode="bilinear", align_corners=False)
        return self.out(torch.cat([x, self.stem(pixels)], dim=1))

    def config(self) -> dict:
        return {"classes": self.classes, "dims": self.dims, "context": self.context, "width": self.width}


def normalised_pixels(pixels: np.ndarray) -> torch.Tensor:
    """A slice's uint8 pixels as the head's stem takes them: RGB, SAM's mean and std, 1 x 3 x H x W."""
    from medico_adapters.predictor import as_rgb

    rgb = torch.from_numpy(as_rgb(pixels)).permute(2, 0, 1).float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    return ((rgb - mean) / std)[None]


# -- the model file -------------------------------------------------------------------------------
@dataclass
class SemanticModel:
    """A head, its class table (label value, name; value 0 is the background) and what it needs."""

    head: SemanticHead
    classes: list[tuple[int, str]]
    window: object  # how slices are normalised: a preset name, (width, level), "percentile" or None
    sam_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    trained: dict = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return self.head.dims

    @property
    def context(self) -> int:
        return self.head.context

    def meta(self) -> dict:
        return {"kind": KIND, "format": FORMAT, "classes": [[v, n] for v, n in self.classes],
                "head": self.head.config(), "window": list(self.window) if isinstance(self.window, tuple) else self.window,
                "trained": self.trained}

    def state(self) -> dict:
        """What ``torch.save`` writes: tensors, numbers and strings only (loads with weights_only)."""
        return {"medico_semantic": self.meta(), "sam_state": {k: v.detach().cpu() for k, v in self.sam_state.items()},
                "head_state": {k: v.detach().cpu() for k, v in self.head.state_dict().items()}}


def load_model(path: str | os.PathLike) -> SemanticModel:
    """Read a semantic model file; an interactive checkpoint or anything else is refused by name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable model file ({type(e).__name__})") from None
    meta = raw.get("medico_semantic") if isinstance(raw, dict) else None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        from medico_adapters.checkpoint import load_checkpoint

        try:
            load_checkpoint(path)
        except CheckpointError:
            raise CheckpointError(f"{path}: not a semantic model (train one with `finetune --semantic`)") from None
        raise CheckpointError(f"{path}: an interactive SAM checkpoint, not a semantic model; segment with it through "
                              "--checkpoint and --point/--box, or train a semantic model with `finetune --semantic`")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: semantic model format {meta.get('format')} (this kit reads {FORMAT})")
    config = meta["head"]
    classes = [(int(v), str(n)) for v, n in meta["classes"]]
    if config["classes"] != len(classes):
        raise CheckpointError(f"{path}: the head has {config['classes']} outputs but the class table {len(classes)} classes")
    head = SemanticHead(config["classes"], config["dims"], config["context"], config["width"])
    try:
        head.load_state_dict(raw["head_state"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: the head's weights do not fit its description ({str(e).splitlines()[0][:120]})") from None
    window = meta.get("window")
    return SemanticModel(head.eval(), classes, tuple(window) if isinstance(window, list) else window,
                         dict(raw["sam_state"]), meta.get("trained") or {})


# -- training -------------------------------------------------------------------------------------
def class_map(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Label values to class indices (0 background; values outside the table are background too)."""
    lut = np.zeros(int(max(int(labels.max(initial=0)), *values)) + 1, dtype=np.int64)
    for index, value in enumerate(values):
        if index:
            lut[value] = index
    return lut[labels]


def per_class_dice(intersections: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Dice per class from summed intersections and summed (prediction + truth) sizes; NaN where
    neither prediction nor truth has the class."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sizes > 0, 2 * intersections / sizes, np.nan)


class SemanticTask:
    """One training step on a few slices; validation Dice per class (``loop.py`` drives it).

    ``samples[i]`` is (embedding stack S x 256 x 64 x 64 -- or, for lora/full training samples, the
    list of encoder inputs --, normalised pixels 1 x 3 x H x W, class-index map H x W, input size);
    ``encoder`` is None for cached embeddings, else the SAM model whose encoder runs on encoder inputs.
    Validation samples are always stored embeddings: during lora/full training they come from the
    base encoder (embedding them again at every validation would cost a ViT pass per slice), and
    the final evaluation re-embeds them with the trained one.
    """

    kind = "semantic"

    def __init__(self, head: SemanticHead, classes: list[tuple[int, str]], train: list, val: list, *, batch: int = 2,
                 device: str = "cpu", encoder=None, extra_params: Sequence[nn.Parameter] = ()) -> None:
        from monai.losses import DiceCELoss

        self.head, self.classes = head.to(device), classes
        self.train, self.val, self.batch, self.device, self.encoder = train, val, batch, torch.device(device), encoder
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.params = [*head.parameters(), *extra_params]
        if not train:
            raise ValueError("no training slice")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        names = {id(p) for p in self.params}
        state = {f"head.{k}": v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        if self.encoder is not None:
            state.update({f"sam.{k}": v.detach().cpu().clone() for k, v in self.encoder.named_parameters() if id(v) in names})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        if self.encoder is not None:
            own = dict(self.encoder.named_parameters())
            with torch.no_grad():
                for key, value in state.items():
                    if key.startswith("sam."):
                        own[key[4:]].copy_(value)

    def _embeddings(self, sample) -> torch.Tensor:
        stack = sample[0]
        if isinstance(stack, torch.Tensor):  # stored embeddings: every validation sample, and decoder training
            return stack.to(self.device)[None]
        return torch.stack([self.encoder.image_encoder(x.to(self.device))[0] for x in stack])[None]

    def logits(self, sample) -> torch.Tensor:
        return self.head(self._embeddings(sample), sample[1].to(self.device), sample[3])

    def step(self, rng: np.random.Generator, step: int) -> dict[str, float]:
        picks = rng.choice(len(self.train), size=min(self.batch, len(self.train)), replace=False)
        total = 0.0
        for i in picks:
            sample = self.train[int(i)]
            target = torch.from_numpy(sample[2])[None, None].to(self.device)
            loss = self.loss(self.logits(sample), target) / len(picks)
            loss.backward()
            total += float(loss.detach())
        return {"loss": total, "passes": len(picks)}

    @torch.no_grad()
    def evaluate(self, samples: list | None = None) -> dict:
        samples = self.val if samples is None else samples
        n = len(self.classes)
        inter, sizes = np.zeros(n), np.zeros(n)
        self.head.eval()
        for sample in samples:
            predicted = self.logits(sample).argmax(1)[0].cpu().numpy()
            truth = sample[2]
            for c in range(1, n):
                p, t = predicted == c, truth == c
                inter[c] += np.logical_and(p, t).sum()
                sizes[c] += p.sum() + t.sum()
        self.head.train()
        dice = per_class_dice(inter, sizes)
        per = {name: (None if np.isnan(dice[c]) else float(dice[c])) for c, (_, name) in enumerate(self.classes) if c}
        scored = [d for d in per.values() if d is not None]
        return {"per_class": per, "mean": float(np.mean(scored)) if scored else None}

    def validate(self) -> float | None:
        return self.evaluate()["mean"] if self.val else None


def build_samples(slices, embeddings: dict, values: Sequence[int], context: int, encoder_inputs: dict | None = None) -> list:
    """Training/validation samples: for each slice, the embeddings of it and its ``context``
    neighbours on each side (clamped at the volume's ends), its pixels and class map."""
    samples = []
    for s in slices:
        zs = [min(max(s.index + k, 0), s.depth - 1) for k in range(-context, context + 1)]
        source = encoder_inputs if encoder_inputs is not None else embeddings
        stack = [source[(s.case, z)] for z in zs]
        first = stack[0]
        if encoder_inputs is None:
            tensor = torch.cat([e.features for e in stack], dim=0)  # S x 256 x 64 x 64
            input_size = first.input_size
        else:
            tensor = [x[0] for x in stack]
            input_size = first[1]
        samples.append((tensor, normalised_pixels(s.pixels), class_map(s.labels, values), tuple(input_size)))
    return samples
