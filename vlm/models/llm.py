"""The language model: any Hugging Face causal LM by name or path, or a tiny random Llama built from a config, with
the attention `model.llm.attention` asks for (vlm.models.attention)."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vlm.config import ConfigError, LLMConfig
from vlm.errors import first_line
from vlm.models.attention import use_attention

log = logging.getLogger(__name__)

GENERATION_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # what vlm keeps of an LLM's generation config


def build_llm(config: LLMConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A Hugging Face causal LM by name or path, or a random Llama from `config.config`; embeddings fit the vocab."""
    vocab_size = len(tokenizer)
    if config.name_or_path:
        try:
            # float32 whatever the checkpoint's dtype (most ship bf16): the projector and ViT are float32, and the
            # trainer's precision setting (bf16-mixed, bf16-true, ...) decides what runs in lower precision
            lm = AutoModelForCausalLM.from_pretrained(config.name_or_path, dtype=torch.float32)
        except OSError as err:
            raise FileNotFoundError(f"model.llm.name_or_path={config.name_or_path!r}: {err}") from None
        except ValueError as err:  # a config of no causal LM (T5, CLIP, ...): transformers names the classes it knows
            raise ConfigError(f"model.llm.name_or_path={config.name_or_path!r} is not a causal language model "
                              f"({first_line(err)[:200]})") from None
        check_causal(lm, config.name_or_path)
        lm.generation_config = token_ids_only(lm.generation_config)
    else:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}  # so generate stops on the template's end of turn
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **{**special, **config.config}))
    check_positions(lm, config)
    if lm.get_input_embeddings().num_embeddings < vocab_size:
        lm.resize_token_embeddings(vocab_size, mean_resizing=False)
    use_attention(lm, config)
    if config.gradient_checkpointing:
        enable_checkpointing(lm)
    return lm


def token_ids_only(generation_config: GenerationConfig) -> GenerationConfig:
    """An LLM's generation config with its token ids only: BOS, pad, and the end-of-turn ids (Llama 3's and Phi-3's
    are only there). vlm's decoding settings (`generation.*`) decide the rest, so a hub LLM's sampling defaults
    (Qwen2.5-Instruct's repetition_penalty 1.05, top_p 0.8, top_k 20) change neither vlm's answers nor its scores,
    and its answers stay those of its Hugging Face export, which carries the same ids."""
    return GenerationConfig(**{name: value for name in GENERATION_TOKEN_IDS
                               if (value := getattr(generation_config, name, None)) is not None})


def enable_checkpointing(lm: PreTrainedModel) -> None:
    """Recompute decoder layers in backward (non-reentrant, so frozen inputs still get gradients)."""
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def trained_positions(lm: PreTrainedModel) -> int | None:
    """How many positions `lm` was built for (its config's max_position_embeddings, which transformers also maps
    GPT-2's n_positions to); None when its config names none."""
    positions = getattr(lm.config.get_text_config(), "max_position_embeddings", None)
    return positions if isinstance(positions, int) else None


def learned_positions(lm: PreTrainedModel) -> int | None:
    """How many positions `lm`'s learned position table holds (GPT-2, OPT, BioGPT), past which it fails with an
    IndexError; None for an LLM without one (rotary or ALiBi positions run past their trained length)."""
    tables = [m for m in lm.modules() if isinstance(m, nn.Embedding) and m is not lm.get_input_embeddings()]
    return trained_positions(lm) if tables else None


def check_positions(lm: PreTrainedModel, config: LLMConfig) -> None:
    """Refuse a `max_length` past a learned position table (the first sample that long would fail, possibly hours
    into a run), and warn past a rotary LLM's trained positions (its answers degrade there, and chat caps prompts at
    them) unless its rope scaling covers the length."""
    positions = trained_positions(lm)
    if positions is None or config.max_length <= positions:
        return
    text = lm.config.get_text_config()
    key = type(text).attribute_map.get("max_position_embeddings", "max_position_embeddings")  # GPT-2: n_positions
    fix = f"set model.llm.max_length={positions} or less" + ("" if config.name_or_path else
                                                             f", or model.llm.config.{key}={config.max_length}")
    if learned_positions(lm) is not None:
        raise ConfigError(f"model.llm.max_length={config.max_length} is more than the {positions} positions "
                          f"{type(lm).__name__}'s position table holds ({key} in its config): {fix}")
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if not isinstance(factor, int | float) or config.max_length > positions * factor:
        log.warning("model.llm.max_length=%d is more than the %d positions %s was trained on (%s in its config): "
                    "samples past them train positions it has not seen, and chat caps prompts at %d; %s",
                    config.max_length, positions, type(lm).__name__, key, positions, fix)


def check_causal(lm: PreTrainedModel, name: str) -> None:
    """Refuse an LLM whose tokens see later ones: an encoder such as BERT loads as a causal LM class with
    is_decoder=False and would learn to copy the token it should predict. Two prompts that differ only in their
    last token must give the first token the same logits."""
    ids = torch.tensor([[0, 1], [0, 2]])  # (2, 2)
    with torch.no_grad():
        first = lm(input_ids=ids).logits[:, 0].float()  # (2, V)
    if not torch.allclose(first[0], first[1], atol=1e-5, rtol=1e-4):
        raise ConfigError(f"model.llm.name_or_path={name!r} ({type(lm).__name__}) is not causal: its tokens attend to "
                          f"later ones, so it cannot learn to predict the next token; give a decoder-only LLM")

