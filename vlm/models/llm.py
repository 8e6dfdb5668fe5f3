"""The language model: any Hugging Face causal LM by name or path, or a tiny random Llama built from a config, with
the attention `model.llm.attention` asks for (vlm.models.attention)."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from vlm.config import LLMConfig
from vlm.models.attention import use_attention


def build_llm(config: LLMConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A Hugging Face causal LM by name or path, or a random Llama from `config.config`; embeddings fit the vocab."""
    vocab_size = len(tokenizer)
    if config.name_or_path:
        try:
            lm = AutoModelForCausalLM.from_pretrained(config.name_or_path, dtype="auto")
        except OSError as err:
            raise FileNotFoundError(f"model.llm.name_or_path={config.name_or_path!r}: {err}") from None
    else:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}  # so generate stops on the template's end of turn
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **{**special, **config.config}))
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
