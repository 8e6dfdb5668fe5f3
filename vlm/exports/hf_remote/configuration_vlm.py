"""The configuration of a vlm vision-language model exported for transformers (written by `vlm.export format=hf`)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig


class VlmConfig(PretrainedConfig):
    """`vision`: the timm ViT and how its features are taken; `projector`: reduction, projector and image slots;
    `text_config`: the causal LM's own config."""

    model_type = "vlm_timm_llm"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, vision: dict[str, Any] | None = None, projector: dict[str, Any] | None = None,
                 text_config: dict[str, Any] | PretrainedConfig | None = None, image_token_id: int = 0,
                 tokens_per_tile: int = 1, **kwargs: Any):
        self.vision = dict(vision or {})
        self.projector = dict(projector or {})
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.image_token_id = image_token_id
        self.tokens_per_tile = tokens_per_tile
        if text_config is not None:
            kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
