"""Build and load models with everything they need: weights, tokenizer, tiler. Used by every stage, eval, infer and
serve, so an export folder always comes back exactly as it was trained."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from vlm.config import ModelConfig, TilerConfig
from vlm.data import synthetic
from vlm.data.processor import Processor
from vlm.data.tiler import Tiler
from vlm.data.tokenizer import build_local_tokenizer, image_token_id, load_tokenizer, prepare_tokenizer
from vlm.export import TOKENIZER_DIR, WEIGHTS_FILE, ExportError, load_weights, read_meta, write_export
from vlm.models.clip import CLIPModel
from vlm.models.text import load_clip_tokenizer
from vlm.models.vision import VisionTower
from vlm.models.vlm import VisionLanguageModel, build_llm, enable_checkpointing

log = logging.getLogger(__name__)


def model_config_from(meta: dict) -> ModelConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"]))  # type: ignore


def make_tiler(settings: TilerConfig, vision: VisionTower, tokens_per_tile: int | None = None) -> Tiler:
    """The tiler matching a vision tower: its input size, its normalisation, and the model's tokens per tile."""
    return Tiler(settings, tile_size=vision.config.image_size, tokens_per_tile=tokens_per_tile or vision.num_patches,
                 mean=vision.mean, std=vision.std)


def tiler_config_from(meta: dict) -> TilerConfig:
    return TilerConfig(**meta["tiler"])


@dataclass
class ClipBundle:
    model: CLIPModel
    tokenizer: object  # open_clip SimpleTokenizer
    tiler: Tiler
    classnames: list[str] | None
    templates: list[str]


def load_clip(directory: str | Path) -> ClipBundle:
    meta = read_meta(directory, expect_stage=("contrastive",))
    model = CLIPModel(model_config_from(meta))
    load_weights(model, directory)
    model.eval()
    return ClipBundle(model, load_clip_tokenizer(Path(directory).expanduser() / TOKENIZER_DIR),
                      make_tiler(tiler_config_from(meta), model.visual), meta.get("classnames"),
                      meta.get("templates") or ["a photo of a {}."])


def load_vision_from_clip(vision: VisionTower, directory: str | Path) -> None:
    """Copy the ViT of a contrastive export into `vision` (phase 2 starts from the phase 1 image tower)."""
    meta = read_meta(directory, expect_stage=("contrastive",))
    exported = model_config_from(meta).vision
    for key in ("name", "image_size", "patch_size", "width", "depth", "heads"):
        if getattr(exported, key) != getattr(vision.config, key):
            raise ExportError(f"init_from={str(directory)!r} has model.vision.{key}={getattr(exported, key)!r} but "
                              f"this run has {getattr(vision.config, key)!r}; use the same model preset")
    with safe_open(str(Path(directory).expanduser() / WEIGHTS_FILE), framework="pt") as f:
        state = {k.removeprefix("visual."): f.get_tensor(k) for k in f.keys() if k.startswith("visual.")}
    vision.load_state_dict(state)


def new_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer by name/path, or the local one trained on the synthetic corpus."""
    source = config.llm.tokenizer or config.llm.name_or_path
    tokenizer = load_tokenizer(source) if source else build_local_tokenizer(list(synthetic.corpus()))
    return prepare_tokenizer(tokenizer, config.llm.chat_template)


@dataclass
class VLMBundle:
    model: VisionLanguageModel
    tokenizer: PreTrainedTokenizerBase
    processor: Processor
    meta: dict


def new_vlm(config: ModelConfig, tiler: TilerConfig) -> VLMBundle:
    tokenizer = new_tokenizer(config)
    model = VisionLanguageModel(config, build_llm(config.llm, tokenizer), image_token_id(tokenizer))
    return _bundle(model, tokenizer, tiler, {"model": config})


def _bundle(model: VisionLanguageModel, tokenizer, tiler: TilerConfig, meta: dict) -> VLMBundle:
    tiled = make_tiler(tiler, model.vision, model.tokens_per_tile)
    processor = Processor(tokenizer, tiled, model.config.llm.max_length)
    return VLMBundle(model, tokenizer, processor, meta)


def empty_vlm(config: ModelConfig, llm_config: PretrainedConfig, token_id: int,
              gradient_checkpointing: bool = False) -> VisionLanguageModel:
    """A VLM shaped by `config` and the LLM's `llm_config`, for a whole state dict to be loaded into.

    Its weights are left uninitialised (transformers' `no_init_weights`): the state dict overwrites every one of them
    (loading is strict), and the random init of a billion-parameter LLM takes seconds to minutes on a CPU."""
    with _no_init_weights():
        lm = AutoModelForCausalLM.from_config(llm_config)
        lm.tie_weights()  # tying happens in the init that is skipped; the export stores tied weights once
        if gradient_checkpointing:
            enable_checkpointing(lm)
        return VisionLanguageModel(config, lm, token_id)


def _no_init_weights() -> AbstractContextManager:
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def load_vlm(directory: str | Path, tiler: TilerConfig | None = None,
             gradient_checkpointing: bool = False) -> VLMBundle:
    """An align/sft export folder -> model, tokenizer and processor. `tiler` overrides the exported tiler settings."""
    meta = read_meta(directory, expect_stage=("align", "sft"))
    directory = Path(directory).expanduser()
    config = model_config_from(meta)
    tokenizer = prepare_tokenizer(load_tokenizer(str(directory / TOKENIZER_DIR)))
    llm_config = AutoConfig.for_model(**meta["llm_config"])
    model = empty_vlm(config, llm_config, image_token_id(tokenizer), gradient_checkpointing)
    load_weights(model, directory)
    return _bundle(model, tokenizer, tiler or tiler_config_from(meta), meta)


def export_vlm(directory: Path, bundle: VLMBundle, stage: str, tiler: TilerConfig, extra: dict | None = None) -> Path:
    from vlm.config import to_dict

    model = bundle.model
    meta = {"stage": stage, "model": to_dict(model.config), "tiler": to_dict(tiler),
            "llm_config": model.lm.config.to_dict(), "tokens_per_tile": model.tokens_per_tile, **(extra or {})}
    meta["model"]["llm"]["name_or_path"] = None  # the export is self-contained: rebuild from llm_config
    return write_export(directory, model, meta, lambda path: bundle.tokenizer.save_pretrained(str(path)))
