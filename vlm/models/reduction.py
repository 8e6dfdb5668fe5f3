"""Token reduction per tile, so high-resolution tiers stay affordable: pixel shuffle or average pooling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm.config import ConfigError


class TokenReducer(nn.Module):
    """(B, N, D) tokens on a square grid -> (B, N/r^2, D r^2) with pixel shuffle, (B, N/r^2, D) with pooling."""

    def __init__(self, kind: str, factor: int):
        super().__init__()
        if kind not in ("none", "pixel_shuffle", "avg_pool"):
            raise ConfigError(f"unknown token reduction {kind!r}; choose one of ['avg_pool', 'none', 'pixel_shuffle']")
        self.kind, self.factor = kind, factor if kind != "none" else 1

    def out_width(self, width: int) -> int:
        return width * self.factor**2 if self.kind == "pixel_shuffle" else width

    def out_tokens(self, tokens: int) -> int:
        side = math.isqrt(tokens)
        if self.kind == "none":
            return tokens
        if side * side != tokens or side % self.factor:
            raise ConfigError(f"token reduction {self.kind} x{self.factor} needs a square patch grid divisible by "
                             f"{self.factor}; got {tokens} tokens. Change model.projector.reduction_factor or the "
                             f"image/patch size")
        return (side // self.factor) ** 2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return tokens
        b, n, d = tokens.shape
        side, r = math.isqrt(n), self.factor
        grid = tokens.reshape(b, side, side, d)  # (B, H, W, D)
        if self.kind == "avg_pool":
            pooled = F.avg_pool2d(grid.permute(0, 3, 1, 2), r)  # (B, D, H/r, W/r)
            return pooled.flatten(2).transpose(1, 2)  # (B, N/r^2, D)
        # pixel shuffle (space-to-depth): each r x r block of patches becomes one token of width D * r^2
        grid = grid.reshape(b, side // r, r, side // r, r, d)  # (B, H/r, r, W/r, r, D)
        grid = grid.permute(0, 1, 3, 2, 4, 5)  # (B, H/r, W/r, r, r, D)
        return grid.reshape(b, (side // r) ** 2, r * r * d)  # (B, N/r^2, D r^2)
