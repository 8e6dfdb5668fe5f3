"""`format=hf` route 1: a stock transformers class, no remote code.

transformers' `PerceptionLMForConditionalGeneration` (registered under `AutoModelForImageTextToText`) is a timm ViT
through the `timm_wrapper` config (its `forward_features`, i.e. the last block after the final norm), optionally
without its CLS token (`vision_use_cls_token`), then Linear -> GELU -> Linear, then the LLM with image features
written at the image-token positions. That is our model exactly when `stock_mismatches` finds nothing.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    PerceptionLMConfig,
    PerceptionLMForConditionalGeneration,
    PerceptionLMImageProcessor,
    PerceptionLMProcessor,
    PerceptionLMVideoProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vlm.data.tokenizer import IMAGE_TOKEN
from vlm.models.factory import VLMBundle, no_init_weights
from vlm.models.vision import timm_overrides


def video_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """PerceptionLM's processor needs a video token; any special token other than `<image>` that chat text never
    holds will do (videos are not used). None when the tokenizer has none to spare."""
    used = (IMAGE_TOKEN, tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token)
    added = tokenizer.get_added_vocab()  # {token: id}
    spare = [t for t in sorted(added, key=added.get) if t not in used]
    template = tokenizer.chat_template or ""
    return next((t for t in spare if t not in template), None)


def stock_mismatches(vlm: VLMBundle) -> list[str]:
    """The settings of `vlm` that PerceptionLM cannot express (empty: route 1 applies)."""
    settings, model = vlm.model.config, vlm.model
    found = [f"model.vision.conv_stem={settings.vision.conv_stem}"] if settings.vision.conv_stem else []
    if settings.projector.reduction != "none":
        found.append(f"model.projector.reduction={settings.projector.reduction}")
    if settings.projector.type != "mlp2x_gelu":
        found.append(f"model.projector.type={settings.projector.type}")
    if settings.projector.image_slots:
        found.append(f"model.projector.image_slots={settings.projector.image_slots}")
    if settings.vision.feature_layer != -1:
        found.append(f"model.vision.feature_layer={settings.vision.feature_layer}")
    if settings.vision.keep_cls:
        found.append("model.vision.keep_cls=true (PerceptionLM reads the patch tokens only)")
    if model.vision.num_prefix_tokens > 1:
        found.append(f"a tower with {model.vision.num_prefix_tokens} prefix tokens (distillation or register tokens "
                     f"beside the CLS token), where PerceptionLM drops one at most")
    if not hasattr(model.lm, "model") or not hasattr(model.lm, "lm_head"):
        found.append(f"an LLM ({type(model.lm).__name__}) without the usual model + lm_head layout")
    elif getattr(model.lm.lm_head, "bias", None) is not None:
        found.append(f"an LLM ({type(model.lm).__name__}) whose output layer has a bias, which PerceptionLM's lacks")
    elif not logits_are_lm_heads(model.lm):
        found.append(f"an LLM ({type(model.lm).__name__}) that scales or soft-caps its logits after its output "
                     f"layer, which PerceptionLM skips")
    if video_token(vlm.tokenizer) is None:
        found.append("a tokenizer with no spare special token for PerceptionLM's video token")
    text_config, embedding_width = model.lm.config.get_text_config(), model.lm.get_input_embeddings().embedding_dim
    if embedding_width != text_config.hidden_size:  # PerceptionLM's projector writes hidden_size-wide features
        found.append(f"an LLM whose input embeddings are {embedding_width} wide, not its hidden size "
                     f"{text_config.hidden_size} (OPT-350m's shape)")
    if vlm.tokenizer("a").input_ids != vlm.tokenizer("a", add_special_tokens=False).input_ids:
        found.append("a tokenizer that adds special tokens (a BOS) to every text, which PerceptionLM's processor "
                     "adds again after the chat template's")
    background = tuple(vlm.processor.tiler.config.background)
    if background != (255, 255, 255):  # PerceptionLM's processor puts transparent pixels on white
        found.append(f"tiler.background={list(background)} (transparent pixels over a colour other than white)")
    return found


@torch.no_grad()
def logits_are_lm_heads(lm: PreTrainedModel) -> bool:
    """Whether the LLM's logits are its lm_head applied to its base model's output, as PerceptionLM computes them;
    not so where the LLM's own forward scales them after (Cohere's logit_scale, Granite's logits_scaling) or soft-caps
    them (Gemma 2). Probed on a few tokens rather than read from config keys that each family names its own way."""
    ids = torch.arange(1, 9, device=lm.device)[None] % lm.config.get_text_config().vocab_size  # (1, 8)
    was_training = lm.training
    lm.eval()  # dropout would make the two passes differ
    try:
        logits = lm(input_ids=ids).logits
        from_head = lm.lm_head(lm.model(input_ids=ids).last_hidden_state)
    finally:
        lm.train(was_training)
    return torch.allclose(logits.float(), from_head.float(), rtol=1e-4, atol=1e-5)


def stock_config(vlm: VLMBundle) -> PerceptionLMConfig:
    model, vision = vlm.model, vlm.model.config.vision
    model_args: dict[str, Any] = {"img_size": vision.image_size, "patch_size": vision.patch_size,
                                  **timm_overrides(vision), "embed_dim": model.vision.width}
    return PerceptionLMConfig(
        vision_config={"model_type": "timm_wrapper", "architecture": vision.name, "model_args": model_args,
                       "num_labels": 0},
        text_config=model.lm.config.to_dict(), vision_use_cls_token=model.vision.num_prefix_tokens == 1,
        projector_pooling_ratio=1, image_token_id=model.image_token_id,
        video_token_id=vlm.tokenizer.convert_tokens_to_ids(video_token(vlm.tokenizer)))


def stock_state_dict(vlm: VLMBundle) -> dict[str, torch.Tensor]:
    """Our parameter names -> PerceptionLM's."""
    renames = (("vision.vit.", "model.vision_tower.timm_model."), ("projector.0.", "model.multi_modal_projector."
               "linear_1."), ("projector.2.", "model.multi_modal_projector.linear_2."),
               ("lm.model.", "model.language_model."), ("lm.lm_head.", "lm_head."))
    state = {}
    for key, value in vlm.model.state_dict().items():
        prefix, target = next((p, t) for p, t in renames if key.startswith(p))
        state[target + key.removeprefix(prefix)] = value
    return state


def stock_model(vlm: VLMBundle) -> PerceptionLMForConditionalGeneration:
    with no_init_weights():
        model = PerceptionLMForConditionalGeneration(stock_config(vlm))
    model.load_state_dict(stock_state_dict(vlm), strict=True)
    model.tie_weights()
    return model


def stock_processor(vlm: VLMBundle, chat_template: str) -> PerceptionLMProcessor:
    """PerceptionLM's processor in its single-tile ("vanilla") mode with our tile size and normalisation."""
    tiler = vlm.processor.tiler
    with tempfile.TemporaryDirectory() as folder:  # a copy that names its image and video tokens, as PerceptionLM's
        vlm.tokenizer.save_pretrained(folder)     # processor reads them (tokenizer.image_token, .video_token)
        tokenizer = AutoTokenizer.from_pretrained(folder, image_token=IMAGE_TOKEN,
                                                  video_token=video_token(vlm.tokenizer))
    images = PerceptionLMImageProcessor(vision_input_type="vanilla", tile_size=tiler.tile_size, max_num_tiles=1,
                                        image_mean=list(tiler.mean), image_std=list(tiler.std))
    videos = PerceptionLMVideoProcessor(tile_size=tiler.tile_size, image_mean=list(tiler.mean),
                                        image_std=list(tiler.std))  # required by the processor; videos are unused
    return PerceptionLMProcessor(videos, images, tokenizer, patch_size=vlm.model.config.vision.patch_size,
                                 pooling_ratio=1, chat_template=chat_template)
