"""A convolutional stem for ViTs ("Early Convolutions Help Transformers See Better", Xiao et al., 2021).

Stride-2 3x3 convolutions replace the single patchify convolution; the token grid is the same, so it drops into any
timm VisionTransformer as its `embed_layer`. Small ViTs trained from scratch converge much faster with it.
"""

from __future__ import annotations

import math

from timm.layers import PatchEmbed
from torch import nn

from vlm.config import ConfigError


class ConvStemPatchEmbed(PatchEmbed):
    """timm's PatchEmbed with `proj` = [3x3 conv stride 2, BN, ReLU] x log2(patch) + 1x1 conv to embed_dim."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        patch = self.patch_size[0]
        if patch != self.patch_size[1] or patch < 2 or patch & (patch - 1):
            raise ConfigError(f"model.vision.conv_stem needs a square power-of-two patch size, got {self.patch_size}")
        embed_dim = self.proj.out_channels
        layers: list[nn.Module] = []
        channels, width = self.proj.in_channels, max(16, embed_dim // 2 ** (int(math.log2(patch)) - 1) // 2)
        for _ in range(int(math.log2(patch))):  # each stage halves the resolution: (S, S) -> (S/p, S/p)
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            channels, width = width, width * 2
        layers.append(nn.Conv2d(channels, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
