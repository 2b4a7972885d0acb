"""Low-rank adapters on the image encoder's attention projections, merged away at the end.

``add_lora(sam.image_encoder, rank)`` wraps every ViT block's ``attn.qkv`` and ``attn.proj``
linear layer: ``y = W x + b + (alpha / rank) * B (A x)``, with ``A`` drawn like a linear layer's
weight and ``B`` zero, so the wrapped model starts out computing exactly what it did (Hu et al.,
"LoRA", 2021; micro-sam adapts the same projections). Only ``A`` and ``B`` train. ``merge_lora``
folds ``(alpha / rank) * B A`` into ``W`` and puts the plain ``nn.Linear`` back, so the trained
model saves as an ordinary SAM state dict that every tool loads.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LoRALinear", "add_lora", "lora_parameters", "merge_lora"]

TARGETS = ("qkv", "proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # what code reading ``qkv.weight`` (shapes, dtypes) expects
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        """The plain layer with the update folded in."""
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        self.base.weight.requires_grad_(True)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(True)
        return self.base


def _attentions(encoder: nn.Module) -> list[nn.Module]:
    blocks = getattr(encoder, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(encoder).__name__} has no ViT blocks to adapt")
    return [block.attn for block in blocks]


def add_lora(encoder: nn.Module, rank: int = 4, alpha: float | None = None) -> int:
    """Wrap the attention projections of every block; returns how many layers were wrapped."""
    count = 0
    for attn in _attentions(encoder):
        for name in TARGETS:
            layer = getattr(attn, name)
            if isinstance(layer, nn.Linear):
                setattr(attn, name, LoRALinear(layer, rank, alpha))
                count += 1
    return count


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def merge_lora(encoder: nn.Module) -> int:
    """Fold every adapter into its layer and restore plain ``nn.Linear`` modules."""
    count = 0
    for attn in _attentions(encoder):
        for name in TARGETS:
            layer = getattr(attn, name)
            if isinstance(layer, LoRALinear):
                setattr(attn, name, layer.merged())
                count += 1
    return count


def encoder_trainables(sam: nn.Module, mode: str, rank: int, device) -> list[nn.Parameter]:
    """Freeze all of ``sam`` but what ``mode`` trains in its image encoder, and return that:
    ``lora`` adds adapters (rank ``rank``) and returns theirs, ``full`` the whole encoder's,
    ``decoder`` none."""
    for p in sam.parameters():
        p.requires_grad_(mode == "full")
    if mode == "lora":
        add_lora(sam.image_encoder, rank)
        sam.to(device)
        return lora_parameters(sam.image_encoder)
    return list(sam.image_encoder.parameters()) if mode == "full" else []
