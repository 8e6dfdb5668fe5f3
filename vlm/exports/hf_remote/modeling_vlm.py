"""A vlm vision-language model for transformers: timm ViT -> token reduction -> projector (+ image-slot embeddings)
-> image embeds written into a causal LM's input embeddings at the `<image>` positions. Written by
`vlm.export format=hf` beside the weights; parameter names are those of vlm's own model."""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_vlm import VlmConfig


class ConvStemPatchEmbed(PatchEmbed):
    """timm's PatchEmbed with `proj` = [3x3 conv stride 2, BN, ReLU] x log2(patch) + 1x1 conv to embed_dim."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        patch = self.patch_size[0]
        embed_dim = self.proj.out_channels
        layers: list[nn.Module] = []
        channels, width = self.proj.in_channels, max(16, embed_dim // 2 ** (int(math.log2(patch)) - 1) // 2)
        for _ in range(int(math.log2(patch))):  # each stage halves the resolution
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            channels, width = width, width * 2
        layers.append(nn.Conv2d(channels, embed_dim, 1))
        self.proj = nn.Sequential(*layers)


class VisionTower(nn.Module):
    def __init__(self, settings: dict):
        super().__init__()
        kwargs = {"img_size": settings["image_size"], "patch_size": settings["patch_size"]}
        kwargs.update({k: v for k, v in settings["timm_overrides"].items() if v is not None})
        if settings["conv_stem"]:
            kwargs["embed_layer"] = ConvStemPatchEmbed
        self.vit = timm.create_model(settings["name"], pretrained=False, num_classes=0, **kwargs)
        self.feature_layer, self.keep_cls = settings["feature_layer"], settings["keep_cls"]
        self.num_prefix_tokens = getattr(self.vit, "num_prefix_tokens", 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, P, D) features of `feature_layer`, CLS dropped unless `keep_cls`."""
        if self.feature_layer == -1:
            tokens = self.vit.forward_features(pixels)  # (N, prefix + P, D)
            return tokens if self.keep_cls else tokens[:, self.num_prefix_tokens:]
        index = self.feature_layer % len(self.vit.blocks)
        keep_prefix = self.keep_cls and self.num_prefix_tokens > 0  # timm gives no pair without any
        tokens = self.vit.forward_intermediates(pixels, indices=[index], intermediates_only=True, stop_early=True,
                                                output_fmt="NLC", return_prefix_tokens=keep_prefix)[0]
        if keep_prefix:
            patches, prefix = tokens
            return torch.cat([prefix, patches], dim=1)  # (N, prefix + P, D)
        return tokens


def reduce_tokens(tokens: torch.Tensor, kind: str, factor: int) -> torch.Tensor:
    """(N, P, D) on a square grid -> (N, P/r^2, D r^2) pixel shuffle, (N, P/r^2, D) average pooling."""
    if kind == "none":
        return tokens
    b, n, d = tokens.shape
    side, r = math.isqrt(n), factor
    grid = tokens.reshape(b, side, side, d)  # (N, H, W, D)
    if kind == "avg_pool":
        return F.avg_pool2d(grid.permute(0, 3, 1, 2), r).flatten(2).transpose(1, 2)  # (N, P/r^2, D)
    grid = grid.reshape(b, side // r, r, side // r, r, d).permute(0, 1, 3, 2, 4, 5)  # (N, H/r, W/r, r, r, D)
    return grid.reshape(b, (side // r) ** 2, r * r * d)  # (N, P/r^2, D r^2)


class VlmForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = VlmConfig
    base_model_prefix = ""
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: VlmConfig):
        super().__init__(config)
        self.vision = VisionTower(config.vision)
        self.lm = AutoModelForCausalLM.from_config(config.text_config)
        settings = config.projector
        self.reduction, self.reduction_factor = settings["reduction"], settings["reduction_factor"]
        # the LLM's input embedding width, which may differ from its hidden size (OPT-350m projects 512 -> 1024)
        width, llm_width = settings["in_width"], self.lm.get_input_embeddings().embedding_dim
        if settings["type"] == "linear":
            self.projector = nn.Linear(width, llm_width)
        else:  # mlp2x_gelu
            self.projector = nn.Sequential(nn.Linear(width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))
        slots = settings["image_slots"]
        self.image_slot_embeddings = nn.Embedding(slots, llm_width) if slots > 0 else None
        # "feature": the slot vector is scaled by each image token's RMS; "embedding": added as it is
        self.slot_scales_with_feature = settings.get("image_slot_scale", "embedding") == "feature"
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """The weights come from the checkpoint; timm's non-persistent buffers (EVA's rotary tables) are not in it and
        from_pretrained builds the model on the meta device, so they are computed again, as TimmWrapperModel does."""
        super()._init_weights(module)
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N_tiles, 3, S, S) -> (N_tiles * tokens_per_tile, Dlm)"""
        reduced = reduce_tokens(self.vision(pixel_values), self.reduction, self.reduction_factor)
        return self.projector(reduced).flatten(0, 1)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """(B, L) ids -> (B, L, Dlm), image-token rows replaced by the image features in order."""
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, L, Dlm)
        if pixel_values is None:
            return embeds
        is_image = input_ids == self.config.image_token_id  # (B, L)
        features = self.image_features(pixel_values.to(self.dtype)).to(embeds.dtype)  # (N_img_tokens, Dlm)
        if int(is_image.sum()) != features.shape[0]:
            raise ValueError(f"{int(is_image.sum())} image tokens in the text but {features.shape[0]} image features")
        if self.image_slot_embeddings is not None:  # each run of image tokens is one image of its sample
            starts = is_image & ~F.pad(is_image, (1, 0))[:, :-1]  # (B, L) first token of each run
            slots = (starts.cumsum(dim=1) - 1)[is_image].clamp(max=self.image_slot_embeddings.num_embeddings - 1)
            marks = self.image_slot_embeddings(slots)  # (N_img_tokens, Dlm)
            if self.slot_scales_with_feature:
                marks = marks * features.float().pow(2).mean(-1, keepdim=True).sqrt().to(features.dtype)
            features = features + marks
        return embeds.masked_scatter(is_image.unsqueeze(-1), features)

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.Tensor | None = None, **model_kwargs):
        """Beams and num_return_sequences copy each prompt, and its images go with it. transformers repeats every
        row of pixel_values (N_images, 3, S, S) on its own, so a copy of a prompt with two images would see its
        first image twice."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        if expand_size > 1 and pixel_values is not None and input_ids is not None:
            tiles = ((input_ids == self.config.image_token_id).sum(dim=1) // self.config.tokens_per_tile).tolist()
            pixel_values = torch.cat([group for group in pixel_values.split(tiles) for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids,
                                                                        **model_kwargs)
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
