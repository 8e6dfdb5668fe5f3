"""Our VisionLanguageModel as transformers' LlavaForConditionalGeneration at the same sizes, with its weights.

The benchmarks (train_step.py, decode.py) race the two; tests/test_export_hf.py checks that they give the same logits,
as litgpt checks its models against Hugging Face's. LLaVA's vision tower is CLIP's ViT, so the ViT weights copy
across only when our timm ViT is CLIP-shaped: a pre-norm ViT without patch-embedding bias (timm's `*_clip_*` models,
e.g. `vit_base_patch16_clip_224` at any width/depth/heads), with exact GELU; other ViTs keep LLaVA's random ones.
Our `feature_layer` maps to LLaVA's `vision_feature_layer` (timm's intermediate block outputs are un-normed, as
CLIP's hidden states are); -1 (timm's final norm applied) has no LLaVA equivalent and keeps LLaVA's un-normed last
layer.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from vlm.models.vlm import VisionLanguageModel


def clip_shaped(ours: VisionLanguageModel) -> bool:
    vit = ours.vision.vit
    return (isinstance(vit.norm_pre, torch.nn.LayerNorm) and vit.patch_embed.proj.bias is None
            and getattr(vit, "cls_token", None) is not None and ours.vision.num_prefix_tokens == 1)


def llava_twin(ours: VisionLanguageModel, copy_vision: bool = False) -> LlavaForConditionalGeneration:
    """LLaVA at our model's sizes (read off the built model, so null width/depth/heads resolve as timm's) with our
    LLM and projector weights, and with `copy_vision` our ViT's too (it must be CLIP-shaped)."""
    vit, settings = ours.vision.vit, ours.config.vision
    vision = CLIPVisionConfig(hidden_size=ours.vision.width, intermediate_size=vit.blocks[0].mlp.fc1.out_features,
                              num_hidden_layers=len(vit.blocks), num_attention_heads=vit.blocks[0].attn.num_heads,
                              image_size=settings.image_size, patch_size=settings.patch_size, hidden_act="gelu",
                              layer_norm_eps=vit.blocks[0].norm1.eps)
    llava = LlavaConfig(vision_config=vision, text_config=ours.lm.config.to_dict(),
                        image_token_index=ours.image_token_id, image_seq_length=ours.tokens_per_tile,
                        vision_feature_layer=settings.feature_layer, vision_feature_select_strategy="default",
                        projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(llava)
    model.model.language_model.load_state_dict(ours.lm.model.state_dict())
    model.lm_head.load_state_dict(ours.lm.lm_head.state_dict())
    projector = model.model.multi_modal_projector
    projector.linear_1.load_state_dict(ours.projector[0].state_dict())
    projector.linear_2.load_state_dict(ours.projector[2].state_dict())
    if copy_vision:
        if not clip_shaped(ours):
            raise ValueError(f"model.vision.name={settings.name!r} is not CLIP-shaped (pre-norm, no patch bias, one "
                             f"CLS token); its weights do not fit LLaVA's CLIP ViT")
        model.model.vision_tower.load_state_dict(clip_vision_state(ours))
    return model


def clip_vision_state(ours: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """timm ViT weights under CLIPVisionModel's names (timm's fused qkv split into q, k, v)."""
    vit = ours.vision.vit
    state = {"embeddings.class_embedding": vit.cls_token.reshape(-1),  # (1, 1, D) -> (D,)
             "embeddings.position_embedding.weight": vit.pos_embed[0],  # (1, 1 + N, D) -> (1 + N, D)
             "embeddings.patch_embedding.weight": vit.patch_embed.proj.weight,
             "pre_layrnorm.weight": vit.norm_pre.weight, "pre_layrnorm.bias": vit.norm_pre.bias,
             "post_layernorm.weight": vit.norm.weight, "post_layernorm.bias": vit.norm.bias}
    for i, block in enumerate(vit.blocks):
        layer = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):  # (3D, D) -> (D, D) each; (3D,) -> (D,) each
            for name, part in zip(("q_proj", "k_proj", "v_proj"), getattr(block.attn.qkv, kind).chunk(3), strict=True):
                state[f"{layer}self_attn.{name}.{kind}"] = part
        pairs = {"self_attn.out_proj": block.attn.proj, "layer_norm1": block.norm1, "layer_norm2": block.norm2,
                 "mlp.fc1": block.mlp.fc1, "mlp.fc2": block.mlp.fc2}
        for name, module in pairs.items():
            state[f"{layer}{name}.weight"], state[f"{layer}{name}.bias"] = module.weight, module.bias
    return {k: v.detach().clone() for k, v in state.items()}
