"""Phase 2 exports (align, sft and later stages): the vision-language model, its LLM's Hugging Face config (so it
rebuilds offline, without the hub), and its tokenizer with the chat template and `<image>` token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, GenerationConfig

from vlm.config import TilerConfig, model_config_from, to_dict
from vlm.data.tokenizer import image_token_id, load_tokenizer, prepare_tokenizer
from vlm.errors import first_line
from vlm.exports.format import (
    COPY_AGAIN,
    TOKENIZER_DIR,
    ExportError,
    ExportMeta,
    load_weights,
    read_meta,
    write_export,
)
from vlm.models.factory import VLMBundle, bundle, empty_vlm
from vlm.models.llm import token_ids_only


def export_vlm(directory: Path, vlm: VLMBundle, stage: str, tiler: TilerConfig,
               train_config: dict[str, Any] | None = None) -> Path:
    model = vlm.model
    settings = to_dict(model.config)
    settings["llm"]["name_or_path"] = None  # the export is self-contained: rebuilt from llm_config
    meta = ExportMeta(stage=stage, model=settings, tiler=to_dict(tiler), llm_config=model.lm.config.to_dict(),
                      llm_generation_config=model.lm.generation_config.to_diff_dict(),
                      tokens_per_tile=model.tokens_per_tile, train_config=train_config)
    return write_export(directory, model, meta, lambda path: vlm.tokenizer.save_pretrained(str(path)))


def load_vlm(directory: str | Path, tiler: TilerConfig | None = None,
             gradient_checkpointing: bool = False) -> VLMBundle:
    """A phase 2 export folder (any stage after contrastive) -> model (in eval mode, as `from_pretrained` gives it),
    tokenizer and processor. `tiler` overrides the exported tiler settings."""
    meta = read_meta(directory)
    directory = Path(directory).expanduser()
    if not meta.has_llm:
        raise ExportError(f"{str(directory)!r} holds a {meta.stage!r} model, not a vision-language model; give an "
                          f"export of a phase 2 stage (align, sft, ...)")
    try:
        tokenizer = load_tokenizer(str(directory / TOKENIZER_DIR))
    except Exception as err:  # missing or damaged files surface as OSError, ValueError or an import hint
        raise ExportError(f"{str(directory / TOKENIZER_DIR)!r} cannot be loaded ({first_line(err)}): it is damaged "
                          f"or incomplete; {COPY_AGAIN}") from None
    if not tokenizer.chat_template:  # every export saves the template it trained with; a default would differ silently
        raise ExportError(f"{str(directory / TOKENIZER_DIR)!r} lacks its chat template (chat_template.jinja), though "
                          f"the model was trained with one; {COPY_AGAIN}")
    tokenizer = prepare_tokenizer(tokenizer)
    model = empty_vlm(model_config_from(meta.model), AutoConfig.for_model(**meta.llm_config),
                      image_token_id(tokenizer), gradient_checkpointing)
    load_weights(model, directory)
    # older exports: none recorded (the config's own stays), or an LLM's sampling defaults beside its token ids
    if meta.llm_generation_config is not None:
        model.lm.generation_config = token_ids_only(GenerationConfig.from_dict(meta.llm_generation_config))
    model.eval()  # the conv stem's BatchNorm would otherwise normalise each image by its own batch's statistics
    return bundle(model, tokenizer, tiler or TilerConfig(**meta.tiler))
