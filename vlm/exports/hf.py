"""`format=hf`: an align or sft export as a transformers model folder.

The folder holds `config.json`, `model.safetensors`, the tokenizer (chat template and `<image>` token), the processor
config and a generation config, and loads with `AutoModelForImageTextToText`, `AutoProcessor` and
`pipeline("image-text-to-text")`. Two routes:
- stock (`hf_stock`): transformers' own `PerceptionLMForConditionalGeneration`, no remote code, where every setting
  maps (a timm ViT without conv stem, last-layer features without CLS, no reduction, mlp2x_gelu, no image slots);
- remote code: otherwise (conv stem, pixel shuffle or pooling before the projector, image slots), the folder carries
  its own modeling and processing code (`vlm/exports/hf_remote/`, which imports transformers, timm and torch only)
  under the config's `auto_map`, and loads with `trust_remote_code=True`.
Both reproduce the single-tile tier (`tiler=low`); an export trained with more tiles is refused rather than fed
differently. The stock processor stretches non-square images where ours letterboxes them (square ones match).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vlm.config import to_dict
from vlm.exports.format import ConversionError, read_meta, refuse_taken, staged_folder, write_provenance
from vlm.exports.hf_remote.configuration_vlm import VlmConfig
from vlm.exports.hf_remote.modeling_vlm import VlmForConditionalGeneration
from vlm.exports.hf_remote.processing_vlm import VlmProcessor
from vlm.exports.hf_stock import stock_mismatches, stock_model, stock_processor
from vlm.exports.vlm import load_vlm
from vlm.generation.stopping import turn_end_ids
from vlm.models.factory import VLMBundle, no_init_weights
from vlm.models.vision import timm_overrides

log = logging.getLogger("vlm.export")
# hf_route: stock = PerceptionLM, no remote code (only where every setting maps); remote_code = the modeling code
# shipped in the folder; auto = stock where it maps, else remote code.
ROUTES = ("auto", "stock", "remote_code")
# Put before the tokenizer's chat template for the processor: messages whose content is a list of parts
# ({"type": "image"}, {"type": "text", "text": ...}), as pipelines send them, become the plain strings our template
# renders, each part on its own line as `vlm.data.tokenizer.joined_parts` joins them (so an image part precedes its
# question as "<image>\n" does in LLaVA-style data); string contents pass unchanged.
FLATTEN_CONTENT_PARTS = (
    "{%- set flat = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set flat.messages = flat.messages + [m] -%}"
    "{%- else -%}{%- set part = namespace(text='') -%}"
    "{%- for c in m['content'] if c['type'] in ('image', 'text') -%}"
    "{%- set part.text = part.text + ('' if loop.first else '\n') + ('<image>' if c['type'] == 'image' else c['text'])"
    " -%}"
    "{%- endfor -%}"
    "{%- set flat.messages = flat.messages + [{'role': m['role'], 'content': part.text}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = flat.messages -%}"
)


def remote_config(vlm: VLMBundle) -> VlmConfig:
    """The transformers config of `vlm`: our vision and projector settings plus the LLM's own config."""
    model, settings = vlm.model, vlm.model.config
    vision = {"name": settings.vision.name, "image_size": settings.vision.image_size,
              "patch_size": settings.vision.patch_size, "timm_overrides": timm_overrides(settings.vision),
              "conv_stem": settings.vision.conv_stem, "feature_layer": settings.vision.feature_layer,
              "keep_cls": settings.vision.keep_cls}
    projector = {**to_dict(settings.projector), "in_width": model.reducer.out_width(model.vision.width)}
    return VlmConfig(vision=vision, projector=projector, text_config=model.lm.config.to_dict(),
                     image_token_id=model.image_token_id, tokens_per_tile=model.tokens_per_tile,
                     bos_token_id=model.lm.config.bos_token_id, eos_token_id=model.lm.config.eos_token_id,
                     pad_token_id=model.lm.config.pad_token_id)


def remote_processor(vlm: VLMBundle, chat_template: str) -> VlmProcessor:
    tiler = vlm.processor.tiler
    return VlmProcessor(vlm.tokenizer, chat_template=chat_template, tile_size=tiler.tile_size,
                        tokens_per_tile=tiler.tokens_per_tile, image_mean=list(tiler.mean),
                        image_std=list(tiler.std), background=list(tiler.config.background),
                        max_long_side=tiler.config.max_long_side, max_short_side=tiler.config.max_short_side)


def remote_model(vlm: VLMBundle) -> VlmForConditionalGeneration:
    with no_init_weights():
        model = VlmForConditionalGeneration(remote_config(vlm))
    model.load_state_dict(vlm.model.state_dict(), strict=True)  # the same parameter names as ours
    return model


def choose_route(route: str, mismatches: list[str]) -> str:
    """`auto`: stock where every setting maps, else remote code; `stock` refuses a model that does not map."""
    if route not in ROUTES:
        raise ConversionError(f"hf_route={route!r} is not valid; choose one of {list(ROUTES)}")
    if route == "stock" and mismatches:
        raise ConversionError(f"hf_route=stock: no stock transformers class takes {', '.join(mismatches)}; use "
                              f"hf_route=auto or remote_code")
    if route == "auto":
        return "remote_code" if mismatches else "stock"
    return route


def export_hf(checkpoint: Path, out: Path, route: str = "auto") -> Path:
    """Convert the align / sft export `checkpoint` into the transformers folder `out` (`route`: see ROUTES)."""
    meta = read_meta(checkpoint)
    if not meta.has_llm:
        raise ConversionError(f"checkpoint={str(checkpoint)!r} holds a {meta.stage!r} model; format=hf takes an "
                              f"align, sft or dpo export (format=open_clip takes contrastive ones)")
    refuse_taken(out)  # before the model is loaded
    vlm = load_vlm(checkpoint)
    if vlm.processor.tiler.config.max_tiles != 1:
        raise ConversionError(f"tiler.max_tiles={vlm.processor.tiler.config.max_tiles}: format=hf reproduces the "
                              f"single-tile tier only (tiler=low); fine-tune with tiler=low to export this model")
    # batched generation: every prompt ends where its answer starts (init_kwargs: what save_pretrained writes)
    vlm.tokenizer.padding_side = vlm.tokenizer.init_kwargs["padding_side"] = "left"
    mismatches = stock_mismatches(vlm)
    route = choose_route(route, mismatches)
    chat_template = FLATTEN_CONTENT_PARTS + vlm.tokenizer.chat_template
    if route == "stock":
        model, processor = stock_model(vlm), stock_processor(vlm, chat_template)
        details = {"route": "stock PerceptionLMForConditionalGeneration (no remote code)",
                   "images": "square images as in training; others are stretched to the tile, not letterboxed"}
    else:
        model, processor = remote_model(vlm), remote_processor(vlm, chat_template)
        details = {"route": "remote code (trust_remote_code=True)", "remote_code_because": mismatches or
                   ["hf_route=remote_code"], "images": "any image exactly as in training (single tile)"}
        for cls, auto in ((VlmConfig, "AutoConfig"), (VlmForConditionalGeneration, "AutoModelForImageTextToText"),
                          (VlmProcessor, "AutoProcessor")):
            cls.register_for_auto_class(auto)
        # AutoModel as well (a class registers under one auto class): the whole model, as remote-code VLMs offer it
        model.config.auto_map = {"AutoModel": f"{VlmForConditionalGeneration.__module__.rpartition('.')[2]}."
                                              f"{VlmForConditionalGeneration.__name__}"}
    if note := dense_attention_note(vlm):
        log.warning("%s", note)
        details["attention"] = note
    model.generation_config.update(**generation_settings(vlm))
    with staged_folder(out) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_provenance(staging, checkpoint, meta, "hf", hf_route=route, **details)
    if route == "stock":
        log.info("wrote %s as a stock PerceptionLMForConditionalGeneration (no remote code). Its processor stretches "
                 "non-square images to the tile where vlm letterboxes them; hf_route=remote_code reproduces that too",
                 out)
    else:
        log.info("wrote %s with its own modeling code (because of %s): load it with trust_remote_code=True", out,
                 ", ".join(details["remote_code_because"]))
    return out


def dense_attention_note(vlm: VLMBundle) -> str | None:
    """transformers has no local + global attention: an export of a model trained with it attends densely, which is
    the same pattern only while a sequence fits the window."""
    llm = vlm.model.config.llm
    if llm.attention != "local_global":
        return None
    sparse = llm.sparse
    return (f"model.llm.attention=local_global (window {sparse.window}, stride {sparse.stride}, sinks {sparse.sinks}): "
            f"the exported model attends densely, as transformers has no such attention; it answers as vlm does for "
            f"sequences up to {sparse.window} tokens, prompt and answer together, and differently past that")


def generation_settings(vlm: VLMBundle) -> dict[str, Any]:
    """Stop where vlm's chat stops (the tokenizer's EOS and the LLM's end-of-turn ids), pad with the tokenizer's pad
    token."""
    tokenizer = vlm.tokenizer
    return {"eos_token_id": turn_end_ids(tokenizer, vlm.model.lm.generation_config),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id}


