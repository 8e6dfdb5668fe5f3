"""Text tower for the contrastive stage: open_clip's text transformer with its bundled CLIP BPE tokenizer."""

from __future__ import annotations

import open_clip
import torch
from open_clip.transformer import TextTransformer
from torch import nn

from vlm.config import ConfigError, TextConfig


class TextTower(nn.Module):
    """Caption ids (B, L) -> embeddings (B, E), pooled at the end-of-text token as CLIP does."""

    def __init__(self, config: TextConfig, embed_dim: int):
        super().__init__()
        self.config = config
        self.transformer = TextTransformer(context_length=config.context_length, vocab_size=config.vocab_size,
                                           width=config.width, heads=config.heads, layers=config.layers,
                                           output_dim=embed_dim)
        if config.pretrained:
            self._load_open_clip(config.pretrained)

    def _load_open_clip(self, spec: str) -> None:
        """Copy the text weights of an open_clip model ("MODEL/TAG"); needs the hub."""
        name, _, tag = spec.partition("/")
        reference = open_clip.create_model(name, pretrained=tag or None)
        keys = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
        state = {k: v for k, v in reference.state_dict().items() if k.split(".")[0] in keys}
        missing, unexpected = self.transformer.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k != "attn_mask"]:
            raise ConfigError(f"model.text.pretrained={spec!r} does not match model.text (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}); copy the text width/heads/layers of {name!r}")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(ids)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.set_grad_checkpointing(enable)


def clip_tokenizer(config: TextConfig) -> open_clip.tokenizer.SimpleTokenizer:
    """The open_clip tokenizer; CLIP's BPE vocabulary ships inside the open_clip wheel, so this works offline."""
    tokenizer = open_clip.get_tokenizer(config.tokenizer, context_length=config.context_length)
    if getattr(tokenizer, "vocab_size", config.vocab_size) > config.vocab_size:
        raise ConfigError(f"model.text.vocab_size={config.vocab_size} is smaller than the {config.tokenizer!r} "
                         f"tokenizer's vocabulary ({tokenizer.vocab_size})")
    return tokenizer
