"""Vision tower: any timm ViT, returning patch features (B, N, D) and a pooled embedding (B, D)."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlm.config import ConfigError, VisionConfig
from vlm.errors import first_line
from vlm.models.conv_stem import ConvStemPatchEmbed

NOT_A_VIT = "vlm trains timm ViTs (VisionTransformer, Eva and their kin, e.g. vit_base_patch16_224); pick one of those"


def timm_overrides(config: VisionConfig) -> dict[str, Any]:
    """The keyword arguments that shape `timm.create_model(config.name, ...)` beyond its image and patch size (the
    conv stem aside): the size overrides that are set, and the pooling."""
    overrides = {"embed_dim": config.width, "depth": config.depth, "num_heads": config.heads}
    if config.global_pool == "avg":  # mean pooling needs no CLS token, and small ViTs learn faster with it
        overrides.update(global_pool="avg", class_token=False)
    elif config.global_pool is not None:
        overrides["global_pool"] = config.global_pool
    return {k: v for k, v in overrides.items() if v is not None}


class VisionTower(nn.Module):
    """A timm Vision Transformer with its classifier removed.

    `forward_features` gives every token of the chosen block, `pool` the model's own pooled output (CLS or mean,
    as the timm model is configured). Mean/std come from the timm model so the tiler normalises to match it.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        kwargs = timm_overrides(config)
        if config.conv_stem:
            kwargs["embed_layer"] = ConvStemPatchEmbed
        try:
            self.vit = timm.create_model(config.name, pretrained=config.pretrained, num_classes=0,
                                         img_size=config.image_size, patch_size=config.patch_size, **kwargs)
        except RuntimeError as err:  # timm raises RuntimeError for unknown names
            raise ConfigError(f"model.vision.name={config.name!r}: {err}") from None
        except TypeError as err:  # a tower that is no ViT (ResNet, ConvNeXt) takes no image or patch size
            raise ConfigError(f"model.vision.name={config.name!r} cannot be built with an image and patch size "
                              f"({first_line(err)}): {NOT_A_VIT}") from None
        except AssertionError as err:  # timm asserts on overrides its model cannot take (heads that split no width)
            overrides = [key for key in ("width", "depth", "heads", "global_pool") if getattr(config, key) is not None]
            settings = ", ".join(f"model.vision.{key}={getattr(config, key)!r}" for key in overrides)
            raise ConfigError(f"model.vision.name={config.name!r} cannot be built with {settings}: {err}") from None
        if not hasattr(self.vit, "blocks") or not hasattr(self.vit, "patch_embed"):
            raise ConfigError(f"model.vision.name={config.name!r} ({type(self.vit).__name__}) has no patch_embed and "
                              f"blocks: {NOT_A_VIT}")
        depth = len(self.vit.blocks)
        if not -depth <= config.feature_layer < depth:
            raise ConfigError(f"model.vision.feature_layer={config.feature_layer} is not a block of "
                              f"{config.name} ({depth} blocks): use 0 to {depth - 1}, or -1 (the last) to "
                              f"-{depth}")
        self.config = config
        self.feature_block: int = config.feature_layer % depth  # the block patch_features reads, 0 to depth - 1
        self.width: int = self.vit.num_features
        self.num_prefix_tokens: int = getattr(self.vit, "num_prefix_tokens", 1)  # CLS / register tokens
        self.grid_size: tuple[int, int] = tuple(self.vit.patch_embed.grid_size)  # (H/p, W/p)
        data_config = self.vit.pretrained_cfg
        self.mean: tuple[float, float, float] = tuple(data_config.get("mean", (0.5, 0.5, 0.5)))
        self.std: tuple[float, float, float] = tuple(data_config.get("std", (0.5, 0.5, 0.5)))
        if config.gradient_checkpointing:
            self.vit.set_grad_checkpointing(True)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, prefix + N, D), the final normed tokens."""
        return self.vit.forward_features(pixels)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, prefix + N, D) -> (B, D) with the timm model's own pooling."""
        return self.vit.forward_head(tokens, pre_logits=True)

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N(+prefix), D) from `config.feature_layer`, CLS dropped unless `keep_cls`.

        A batch of no tiles (text-only, or every feature cached) still runs the tower, so that FSDP's ranks run the
        same blocks and BatchNorm's ranks the same syncs; its attention then runs SDPA's math kernel alone, since
        CUDA's flash and cuDNN kernels fail on, or return nothing for, a batch of 0."""
        if pixels.shape[0] == 0:
            with sdpa_kernel([SDPBackend.MATH]):
                return self._patch_features(pixels)  # (0, N(+prefix), D)
        return self._patch_features(pixels)

    def idle_in_patch_features(self) -> list[nn.Parameter]:
        """The parameters `patch_features` never reads: the pooling head's (fc_norm, attn_pool, head) and, below
        the last block, the later blocks' and the final norm's. A phase 2 model never trains them: DDP requires every
        trainable parameter to get a gradient."""
        idle = [getattr(self.vit, name, None) for name in ("fc_norm", "attn_pool", "head")]
        if self.config.feature_layer != -1:
            idle += [*self.vit.blocks[self.feature_block + 1:], self.vit.norm]
        return [p for module in idle if isinstance(module, nn.Module) for p in module.parameters()]

    def _patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.config.feature_layer == -1:
            tokens = self.vit.forward_features(pixels)  # (B, prefix + N, D), after the final norm
        else:
            keep_prefix = self.config.keep_cls and self.num_prefix_tokens > 0  # timm gives no pair without any
            tokens = self.vit.forward_intermediates(pixels, indices=[self.feature_block], intermediates_only=True,
                                                    stop_early=True, output_fmt="NLC",
                                                    return_prefix_tokens=keep_prefix)[0]
            if keep_prefix:
                patches, prefix = tokens
                return torch.cat([prefix, patches], dim=1)  # (B, prefix + N, D)
            return tokens  # (B, N, D)
        return tokens if self.config.keep_cls else tokens[:, self.num_prefix_tokens:]  # (B, N, D)
