"""The vision-language model: vision tower -> token reduction -> projector -> image embeds merged into a causal LM.

The processor expands each `<image>` placeholder into exactly `tokens_per_tile * tiles` image-token ids; here those
positions of the LLM's input embeddings are overwritten with the projected image features, in order. Everything
else is the Hugging Face model untouched, so `generate` (KV cache, sampling, beams, streaming) works as-is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from vlm.config import ModelConfig
from vlm.models.projector import build_projector
from vlm.models.reduction import TokenReducer
from vlm.models.vision import VisionTower


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
        # whether it came from the first image or the second. Initialised at the scale of the token embeddings so the
        # slots differ from the first step: from zero they get near-symmetric gradients and may never separate.
        self.image_slot_embeddings = None
        if config.projector.image_slots > 0:
            token_embeddings = lm.get_input_embeddings().weight  # (V, Dlm)
            self.image_slot_embeddings = nn.Embedding(config.projector.image_slots, token_embeddings.shape[1])
            nn.init.normal_(self.image_slot_embeddings.weight, std=float(token_embeddings.detach().float().std()))

    def parts(self) -> dict[str, nn.Module]:
        """The named parts the stage table freezes or trains."""
        projector = (nn.ModuleList([self.projector, self.image_slot_embeddings]) if self.image_slot_embeddings
                     is not None else self.projector)
        return {"vision": self.vision, "projector": projector, "llm": self.lm}

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N_tiles, 3, S, S) -> (N_tiles * tokens_per_tile, Dlm)"""
        return self.project(self.vision.patch_features(pixel_values))  # vision: (N_tiles, P, Dv)

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        """The vision tower's patch features (N_tiles, P, Dv) -> image embeddings (N_tiles * tokens_per_tile, Dlm).
        Split from `image_features` so that models sharing a frozen vision tower can share its forward."""
        return self.projector(self.reducer(patches)).flatten(0, 1)  # reducer: (N_tiles, T, Dv')

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_slots: torch.Tensor | None = None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids with image-token runs + their tiles -> (B, L, Dlm) input embeddings.

        `image_slots` (N_image_tokens,) numbers each image token's image within its sample (`pad_batch` gives it);
        without it, each run of consecutive image tokens counts as one image. `image_features` (N_image_tokens, Dlm),
        from `project`, stand in for `pixel_values` when the caller computed them already.
        """
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, L, Dlm)
        is_image = input_ids == self.image_token_id  # (B, L)
        positions = int(is_image.sum())
        if image_features is None and (pixel_values is None or pixel_values.numel() == 0):
            if positions:
                raise ValueError(f"the batch has {positions} image-token positions but no images")
            return embeds
        if image_features is None:
            image_features = self.image_features(pixel_values)
        features = image_features.to(embeds.dtype)  # (N_img_tokens, Dlm)
        if positions != features.shape[0]:
            raise ValueError(f"the batch has {positions} image-token positions but its images give "
                             f"{features.shape[0]} image features ({self.tokens_per_tile} per tile)")
        if self.image_slot_embeddings is not None:
            if image_slots is None:
                starts = is_image & ~F.pad(is_image, (1, 0))[:, :-1]  # (B, L) first token of each run
                image_slots = (starts.cumsum(dim=1) - 1)[is_image]  # (N_image_tokens,)
            last = self.image_slot_embeddings.num_embeddings - 1
            features = features + self.image_slot_embeddings(image_slots.to(features.device).clamp(max=last))
        return embeds.masked_scatter(is_image.unsqueeze(-1), features)  # image rows replaced in order

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_slots: torch.Tensor | None = None, **kwargs):
        """Returns the Hugging Face CausalLMOutput; `loss` is next-token cross-entropy over labels != -100."""
        return self.lm(inputs_embeds=self.embed(input_ids, pixel_values, image_slots), attention_mask=attention_mask,
                       labels=labels, **kwargs)

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
        out = self.lm.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask,
                               **generate_kwargs)  # (B, L + T_new)
        return out[:, input_ids.shape[1]:]
