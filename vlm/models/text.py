"""Text tower for the contrastive stage: open_clip's text transformer with its bundled CLIP BPE tokenizer."""

from __future__ import annotations

import open_clip
import torch
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn

from vlm.config import ConfigError, TextConfig
from vlm.errors import first_line


class TextTower(nn.Module):
    """Caption ids (B, L) -> embeddings (B, E), pooled at the end-of-text token as CLIP does."""

    def __init__(self, config: TextConfig, embed_dim: int):
        super().__init__()
        self.config = config
        reference = open_clip_reference(config.pretrained, config.quick_gelu) if config.pretrained else None
        self.transformer = TextTransformer(context_length=config.context_length, vocab_size=config.vocab_size,
                                           width=config.width, heads=config.heads, layers=config.layers,
                                           output_dim=embed_dim, act_layer=QuickGELU if config.quick_gelu else nn.GELU)
        if reference is not None:
            self._copy_text_weights(reference, config.pretrained)

    def _copy_text_weights(self, reference: nn.Module, spec: str) -> None:
        keys = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
        state = {k: v for k, v in reference.state_dict().items() if k.split(".")[0] in keys}
        mismatch = f"model.text.pretrained={spec!r} does not match model.text"
        hint = f"copy the text context_length/width/heads/layers of {spec.partition('/')[0]!r}"
        try:
            missing, unexpected = self.transformer.load_state_dict(state, strict=False)
        except RuntimeError as err:  # a tensor of another shape; torch's next line names it and both shapes
            detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
            raise ConfigError(f"{mismatch} ({detail}); {hint}") from None
        if unexpected or [k for k in missing if k != "attn_mask"]:
            raise ConfigError(f"{mismatch} (missing {missing[:5]}, unexpected {unexpected[:5]}); {hint}")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(ids)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.set_grad_checkpointing(enable)


def open_clip_reference(spec: str, quick_gelu: bool) -> nn.Module:
    """The open_clip model "MODEL/TAG" names, with its weights (from the hub, or a local file as TAG), whose text
    tower the tower copies; refused when its activation is not model.text.quick_gelu's."""
    name, _, tag = spec.partition("/")
    if not tag:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)[:6]) or "none registered"
        raise ConfigError(f"model.text.pretrained={spec!r} names no weights: give MODEL/TAG, e.g. {name}/openai "
                          f"(tags of {name!r}: {tags}), or a checkpoint file of that model as MODEL/PATH")
    # OpenAI's weights are QuickGELU-trained whatever the model name says; open_clip would only warn
    trained_quick = open_clip.get_pretrained_cfg(name, tag).get("quick_gelu")
    if trained_quick is not None and trained_quick != quick_gelu:
        raise _activation_mismatch(spec, trained_quick)
    try:
        reference = open_clip.create_model(name, pretrained=tag, force_quick_gelu=bool(trained_quick),
                                           require_pretrained=True)
    except (RuntimeError, OSError) as err:  # no hub (offline), an unknown tag, a damaged file
        raise ConfigError(f"model.text.pretrained={spec!r}: its weights cannot be loaded ({first_line(err)}); a "
                          f"tag needs the Hugging Face hub, or give a checkpoint file of that model as MODEL/PATH"
                          ) from None
    built_quick = any(isinstance(module, QuickGELU) for module in reference.modules())
    if built_quick != quick_gelu:  # a -quickgelu model name, or a local checkpoint of one
        raise _activation_mismatch(spec, built_quick)
    return reference


def _activation_mismatch(spec: str, quick: bool) -> ConfigError:
    return ConfigError(f"model.text.pretrained={spec!r} was trained with {'QuickGELU' if quick else 'GELU'} "
                       f"activations: set model.text.quick_gelu={str(quick).lower()} to run it as trained")


def clip_tokenizer(config: TextConfig) -> open_clip.tokenizer.SimpleTokenizer:
    """The open_clip tokenizer; CLIP's BPE vocabulary ships inside the open_clip wheel, so this works offline."""
    tokenizer = open_clip.get_tokenizer(config.tokenizer, context_length=config.context_length)
    if getattr(tokenizer, "vocab_size", config.vocab_size) > config.vocab_size:
        raise ConfigError(f"model.text.vocab_size={config.vocab_size} is smaller than the {config.tokenizer!r} "
                         f"tokenizer's vocabulary ({tokenizer.vocab_size})")
    return tokenizer
