"""The language model: any Hugging Face causal LM by name or path, or a tiny random Llama built from a config, with
the attention `model.llm.attention` asks for (vlm.models.attention)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from vlm.config import ConfigError, LLMConfig
from vlm.errors import first_line
from vlm.models.attention import use_attention


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
    else:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}  # so generate stops on the template's end of turn
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **{**special, **config.config}))
    check_positions(lm, config.max_length)
    if lm.get_input_embeddings().num_embeddings < vocab_size:
        lm.resize_token_embeddings(vocab_size, mean_resizing=False)
    use_attention(lm, config)
    if config.gradient_checkpointing:
        enable_checkpointing(lm)
    return lm


def enable_checkpointing(lm: PreTrainedModel) -> None:
    """Recompute decoder layers in backward (non-reentrant, so frozen inputs still get gradients)."""
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_positions(lm: PreTrainedModel, max_length: int) -> None:
    """Refuse a sample length past the LLM's positions: learned position embeddings (GPT-2) fail at the first sample
    that long, possibly hours into a run, and rotary ones were never trained there (chat caps prompts at them)."""
    positions = getattr(lm.config.get_text_config(), "max_position_embeddings", None)  # GPT-2's n_positions too
    if isinstance(positions, int) and max_length > positions:
        raise ConfigError(f"model.llm.max_length={max_length} is more than the {positions} positions "
                          f"{type(lm).__name__} has (max_position_embeddings in its config): set "
                          f"model.llm.max_length={positions} or less")


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

