"""Builds models with what they need around them: a new VLM (random or hub-initialised towers, its tokenizer and
processor), an empty one for a state dict to be loaded into, and the tiler that matches a vision tower."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from vlm.config import LLMConfig, ModelConfig, TilerConfig
from vlm.data.processor import Processor
from vlm.data.tiler import Tiler
from vlm.data.tokenizer import image_token_id, new_tokenizer
from vlm.models.attention import use_attention
from vlm.models.llm import build_llm, enable_checkpointing
from vlm.models.vision import VisionTower
from vlm.models.vlm import VisionLanguageModel


def make_tiler(settings: TilerConfig, vision: VisionTower, tokens_per_tile: int | None = None) -> Tiler:
    """The tiler matching a vision tower: its input size, its normalisation, and the model's tokens per tile."""
    return Tiler(settings, tile_size=vision.config.image_size, tokens_per_tile=tokens_per_tile or vision.num_patches,
                 mean=vision.mean, std=vision.std)


@dataclass
class VLMBundle:
    """A vision-language model with its tokenizer and the processor (tiler + chat template) that feeds it."""

    model: VisionLanguageModel
    tokenizer: PreTrainedTokenizerBase
    processor: Processor


def bundle(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, tiler: TilerConfig) -> VLMBundle:
    tiled = make_tiler(tiler, model.vision, model.tokens_per_tile)
    return VLMBundle(model, tokenizer, Processor(tokenizer, tiled, model.config.llm.max_length))


def new_vlm(config: ModelConfig, tiler: TilerConfig) -> VLMBundle:
    """A VLM built from `config`: the LLM by name (or a random tiny Llama), a fresh projector and vision tower."""
    tokenizer = new_tokenizer(config.llm)
    model = VisionLanguageModel(config, build_llm(config.llm, tokenizer), image_token_id(tokenizer))
    return bundle(model, tokenizer, tiler)


def empty_vlm(config: ModelConfig, llm_config: PretrainedConfig, token_id: int,
              gradient_checkpointing: bool = False) -> VisionLanguageModel:
    """A VLM shaped by `config` and the LLM's `llm_config`, for a whole state dict to be loaded into.

    Its weights are left uninitialised (transformers' `no_init_weights`): the state dict overwrites every one of them
    (loading is strict), and the random init of a billion-parameter LLM takes seconds to minutes on a CPU."""
    with no_init_weights():
        lm = AutoModelForCausalLM.from_config(llm_config)
        lm.tie_weights()  # tying happens in the init that is skipped; the export stores tied weights once
        use_attention(lm, config.llm)
        if gradient_checkpointing:
            enable_checkpointing(lm)
        return VisionLanguageModel(config, lm, token_id)


def set_attention(model: VisionLanguageModel, settings: LLMConfig) -> None:
    """Give a built VLM the attention of `settings` (a run's model.llm.attention and .sparse), recorded in its config
    so that its export carries it."""
    model.config.llm.attention, model.config.llm.sparse = settings.attention, settings.sparse
    use_attention(model.lm, settings)


def no_init_weights() -> AbstractContextManager:
    """transformers' context that skips weight initialisation (for models a state dict is loaded into next)."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()
