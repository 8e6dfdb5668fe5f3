"""The vision-language model: vision tower -> token reduction -> projector -> image embeds merged into a causal LM.

The processor expands each `<image>` placeholder into exactly `tokens_per_tile * tiles` image-token ids; here those
positions of the LLM's input embeddings are overwritten with the projected image features, in order. Everything
else is the Hugging Face model untouched, so `generate` (KV cache, sampling, beams, streaming) works as-is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlm.config import ModelConfig
from vlm.data.processor import run_slots
from vlm.models.packing import packed_lm_inputs
from vlm.models.projector import build_projector
from vlm.models.reduction import TokenReducer
from vlm.models.vision import VisionTower

# Initial std of the slot vectors when they scale with the feature's RMS: a slot moves each image token by about half
# its own size, enough to tell two images apart from the first step, not enough to drown what the token shows.
FEATURE_SLOT_STD = 0.5


class VisionLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, lm: PreTrainedModel, image_token_id: int):
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.vision)
        self.reducer = TokenReducer(config.projector.reduction, config.projector.reduction_factor)
        self.lm = lm
        self.projector = build_projector(config.projector.type, self.reducer.out_width(self.vision.width),
                                         lm.get_input_embeddings().embedding_dim)
        self.image_token_id = image_token_id
        patches = self.vision.num_patches + (self.vision.num_prefix_tokens if config.vision.keep_cls else 0)
        if config.vision.keep_cls and config.projector.reduction != "none":
            raise ValueError("model.vision.keep_cls=true needs model.projector.reduction=none (the CLS token is not "
                             "on the patch grid)")
        self.tokens_per_tile: int = self.reducer.out_tokens(patches)
        # Which image a token belongs to, as BERT's segment embeddings mark sentences. Rotary position embeddings put
        # position in attention scores only, so without this a token copied from "the red circle" carries no trace of
        # whether it came from the first image or the second. Random at start: from zero the slots get near-symmetric
        # gradients and may never separate. With `image_slot_scale=feature` the mark is the slot vector times each
        # token's RMS: projected features grow to norms of 13-20 in the tiny preset while an unscaled slot stays
        # near its initial ~0.5 apart, buried in the features' own spread; scaled, it stays a fixed share of them.
        self.image_slot_embeddings = None
        self.slot_scales_with_feature = config.projector.image_slot_scale == "feature"
        if config.projector.image_slots > 0:
            token_embeddings = lm.get_input_embeddings().weight  # (V, Dlm)
            self.image_slot_embeddings = nn.Embedding(config.projector.image_slots, token_embeddings.shape[1])
            std = FEATURE_SLOT_STD if self.slot_scales_with_feature else float(token_embeddings.detach().float().std())
            nn.init.normal_(self.image_slot_embeddings.weight, std=std)

    def parts(self) -> dict[str, nn.Module]:
        """The named parts the stage table freezes or trains."""
        # the slots train with the projector; keyed by their attribute names, so a part names each parameter as the
        # model does (the optimizer keeps "...embedding..." out of weight decay by its name)
        projector = (nn.ModuleDict({"projector": self.projector, "image_slot_embeddings": self.image_slot_embeddings})
                     if self.image_slot_embeddings is not None else self.projector)
        return {"vision": self.vision, "projector": projector, "llm": self.lm}

    def idle_parameters(self) -> list[nn.Parameter]:
        """Parameters no forward reads, never trained whatever the stage trains: the ViT's pooling head and any
        blocks past its feature layer."""
        return self.vision.idle_in_patch_features()

    def image_features(self, pixel_values: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """(N_tiles, 3, S, S) -> (N_tiles * tokens_per_tile, Dlm); `patches` (N_tiles, P, Dv), the vision tower's
        features of those tiles when already known (a feature cache), skips the tower."""
        if patches is None:
            patches = self.vision.patch_features(pixel_values)  # (N_tiles, P, Dv)
        return self.projector(self.reducer(patches)).flatten(0, 1)  # reducer: (N_tiles, T, Dv')

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_slots: torch.Tensor | None = None, patches: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids with image-token runs + their tiles -> (B, L, Dlm) input embeddings.

        `image_slots` (N_image_tokens,) numbers each image token's image within its sample (`pad_batch` gives it);
        without it, each run of consecutive image tokens counts as one image. `patches`: see `image_features`; given,
        `pixel_values` may be None.
        """
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, L, Dlm)
        is_image = input_ids == self.image_token_id  # (B, L)
        positions = int(is_image.sum())
        if positions and patches is None and (pixel_values is None or pixel_values.numel() == 0):
            raise ValueError(f"the batch has {positions} image-token positions but no images")
        if patches is None and pixel_values is None:
            return embeds
        # a batch of no tiles (text-only) still runs the tower and projector, on nothing: FSDP needs every rank to
        # run the same blocks, whatever its batch holds

        features = self.image_features(pixel_values, patches).to(embeds.dtype)  # (N_img_tokens, Dlm)
        if positions != features.shape[0]:
            raise ValueError(f"the batch has {positions} image-token positions but its images give "
                             f"{features.shape[0]} image features ({self.tokens_per_tile} per tile)")
        if self.image_slot_embeddings is not None:
            if image_slots is None:
                image_slots = run_slots(is_image)
            last = self.image_slot_embeddings.num_embeddings - 1
            slots = self.image_slot_embeddings(image_slots.to(features.device).clamp(max=last))  # (N_img_tokens, Dlm)
            if self.slot_scales_with_feature:
                slots = slots * features.float().pow(2).mean(-1, keepdim=True).sqrt().to(features.dtype)
            features = features + slots
        return embeds.masked_scatter(is_image.unsqueeze(-1), features)  # image rows replaced in order

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_slots: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                patches: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """Returns the Hugging Face CausalLMOutput; `loss` is next-token cross-entropy over labels != -100.

        Packed rows (vlm.data.packing) come with `position_ids` (B, L) restarting at each sample and no
        `attention_mask`: each sample then attends only to itself. `patches`: see `image_features`."""
        embeds = self.embed(input_ids, pixel_values, image_slots, patches)  # (B, L, Dlm)
        if position_ids is not None:
            if attention_mask is not None:
                raise ValueError("packed rows (position_ids) take no attention_mask: the position ids mark the samples")
            return self.lm(**packed_lm_inputs(self.lm.config, embeds, position_ids, labels), **kwargs)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_slots: torch.Tensor | None = None,
                 **generate_kwargs) -> torch.Tensor:
        """Hugging Face `generate` on the merged embeddings; returns only the new token ids (B, T_new).

        The ids go along with the embeddings so that logits processors that look at the prompt (repetition
        penalty) see it; generation itself starts from the embeddings.
        """
        embeds = self.embed(input_ids, pixel_values, image_slots)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        read_prompt = getattr(generate_kwargs.get("cache"), "read_prompt", None)
        # a cache that reads the prompt its own way (H2O with h2o.prompt_block); False: cancelled while reading it
        if read_prompt is not None and not read_prompt(self.lm, embeds, input_ids == self.image_token_id, image_slots,
                                                       attention_mask):
            return input_ids.new_zeros((input_ids.shape[0], 0))
        out = self.lm.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask,
                               **generate_kwargs)  # (B, L + T_new)
        return out[:, input_ids.shape[1]:]
