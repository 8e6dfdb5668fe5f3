"""The contrastive model: vision tower + text tower projected into one normalised embedding space."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm.config import ClipHeadConfig, ModelConfig
from vlm.models.text import TextTower
from vlm.models.vision import VisionTower

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learned temperature to 100


class ContrastiveHead(nn.Module):
    """The image projection into the shared space and the learned temperature (and SigLIP bias)."""

    def __init__(self, vision_width: int, config: ClipHeadConfig):
        super().__init__()
        siglip = config.loss == "siglip"
        self.image_projection = nn.Linear(vision_width, config.embed_dim, bias=False)
        init_scale = config.init_logit_scale if config.init_logit_scale is not None else (
            math.log(10) if siglip else math.log(1 / 0.07))
        # shape (1,), not a scalar as in open_clip: FSDP cannot shard 0-d parameters
        self.logit_scale = nn.Parameter(torch.tensor([float(init_scale)]))
        init_bias = config.init_logit_bias if config.init_logit_bias is not None else -10.0
        self.logit_bias = nn.Parameter(torch.tensor([float(init_bias)])) if siglip else None

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        for name in ("logit_scale", "logit_bias"):  # exports written before the (1,) shape hold scalars
            value = state_dict.get(prefix + name)
            # `.ndim` and `torch.reshape`, not `.dim()`: Lightning's FSDP resume passes lazily loaded tensors
            if value is not None and value.ndim == 0:
                state_dict[prefix + name] = torch.reshape(value, (1,))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CLIPModel(nn.Module):
    """encode_image / encode_text give unit-norm embeddings; forward returns what open_clip's losses take."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config.vision)
        self.text = TextTower(config.text, config.clip.embed_dim)
        self.head = ContrastiveHead(self.visual.width, config.clip)

    def parts(self) -> dict[str, nn.Module]:
        """The named parts the stage table freezes or trains."""
        return {"vision": self.visual, "text": self.text, "clip_head": self.head}

    def idle_parameters(self) -> list[nn.Parameter]:
        """Parameters no forward reads: none (the ViT's pooling and every block serve the image embedding)."""
        return []

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, S, S) -> (B, E)"""
        pooled = self.visual.pool(self.visual.forward_features(pixels))  # (B, Dv)
        features = self.head.image_projection(pooled)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, L) -> (B, E)"""
        features = self.text(ids)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"image_features": self.encode_image(pixels), "text_features": self.encode_text(ids),
               "logit_scale": self.head.logit_scale.exp()}
        if self.head.logit_bias is not None:
            out["logit_bias"] = self.head.logit_bias
        return out

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.head.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
