"""Typed configuration: one dataclass per config group, validated at start-up.

Hydra composes the YAML groups under `configs/`; `to_train_config` merges the result onto these dataclasses so an
unknown key, a wrong type or a value outside its choices fails before any work starts, with a message that names the
key. Every field carries a comment saying what it does: this file is the reference for every `key=value` override.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlm.data.tiler import TilerConfig

STAGE_NAMES = ("contrastive", "align", "sft")


class ConfigError(ValueError):
    """A configuration key or value that cannot work; the message names the key and what would."""


def choices(*values: str, default: str) -> Any:
    """A string field restricted to `values`, checked by `validate`."""
    return field(default=default, metadata={"choices": values})


@dataclass
class VisionConfig:
    name: str = "vit_tiny_patch16_224"  # any timm ViT name (vit_*, deit_*, eva02_*, ...)
    pretrained: bool = False  # load timm hub weights (needs the hub); tiny presets train from scratch
    image_size: int = 64  # encoder input size S: tiles are S x S
    patch_size: int = 8  # ViT patch size; tokens per tile = (S / patch)^2 before reduction
    width: int | None = None  # embed_dim override; null keeps the timm model's own
    depth: int | None = None  # number of blocks override; null keeps the timm model's own
    heads: int | None = None  # attention heads override; null keeps the timm model's own
    global_pool: str | None = None  # "token" (CLS) or "avg" (mean of patches, no CLS token); null keeps timm's
    conv_stem: bool = False  # stride-2 convolutions instead of one patchify conv: faster convergence from scratch
    feature_layer: int = -1  # phase 2: which block's output feeds the projector (-1 = last, -2 = penultimate)
    keep_cls: bool = False  # phase 2: keep the prefix (CLS) tokens in the image tokens
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory


@dataclass
class TextConfig:
    tokenizer: str = "ViT-B-32"  # open_clip tokenizer name; the CLIP BPE vocabulary ships with open_clip
    context_length: int = 32  # tokens per caption (longer captions are truncated)
    vocab_size: int = 49408  # must match the tokenizer
    width: int = 128
    heads: int = 4
    layers: int = 2
    pretrained: str | None = None  # "MODEL/TAG" of open_clip weights for the text tower, e.g. "ViT-B-16/openai"


@dataclass
class ClipHeadConfig:
    embed_dim: int = 128  # shared image/text embedding size
    loss: str = choices("clip", "siglip", default="clip")  # open_clip ClipLoss or SigLipLoss
    local_loss: bool = False  # each rank scores its own samples against the global batch (saves memory)
    gather_with_grad: bool = True  # gather features across ranks with gradients (the global batch sees all negatives)
    init_logit_scale: float | None = None  # log temperature at start; null: log(1/0.07) clip, log(10) siglip
    init_logit_bias: float | None = None  # siglip only; null: -10


@dataclass
class ProjectorConfig:
    type: str = choices("linear", "mlp2x_gelu", default="mlp2x_gelu")  # maps ViT features into the LLM's embeddings
    reduction: str = choices("none", "pixel_shuffle", "avg_pool", default="pixel_shuffle")  # token reduction per tile
    reduction_factor: int = 2  # tokens per tile shrink by factor^2
    image_slots: int = 0  # >0: a learned embedding per image position in a sample (1st, 2nd, ...), added to its tokens


@dataclass
class LLMConfig:
    name_or_path: str | None = None  # any Hugging Face AutoModelForCausalLM; null builds a tiny random Llama
    tokenizer: str | None = None  # tokenizer name or path; null: same as name_or_path, or the local synthetic one
    config: dict[str, Any] = field(default_factory=dict)  # LlamaConfig kwargs for the random model (name_or_path null)
    gradient_checkpointing: bool = False  # recompute decoder layers in backward to save memory
    max_length: int = 512  # sequence cap; a sample whose image tokens would be cut is dropped and counted
    chat_template: str | None = None  # Jinja template overriding the tokenizer's own; null keeps the tokenizer's


@dataclass
class ModelConfig:
    name: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    clip: ClipHeadConfig = field(default_factory=ClipHeadConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)


@dataclass
class StageConfig:
    name: str = choices(*STAGE_NAMES, default="contrastive")
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 128  # per device
    lr: float = 1e-3  # peak learning rate (AdamW)
    lr_projector: float | None = None  # per-part learning rates; null uses `lr`
    lr_llm: float | None = None
    lr_vision: float | None = None
    lr_text: float | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100  # linear warmup, then cosine decay to `min_lr_ratio * lr`
    min_lr_ratio: float = 0.0
    train_vision: bool | None = None  # null follows the stage table in vlm/stages.py
    train_llm: bool | None = None
    train_projector: bool | None = None


@dataclass
class SyntheticConfig:
    num_train: int = 20000  # samples in the train split
    num_val: int = 1024  # samples in the held-out split
    samples_per_shard: int = 2000
    image_size: int = 64  # rendered image side in pixels
    seed: int = 0  # the same seed always gives the same dataset
    cache_dir: str = "~/.cache/vlm/synthetic"  # generated once, reused after


@dataclass
class DataConfig:
    name: str = "synthetic"
    train: str | None = None  # webdataset shards: brace pattern, local or pipe:; null uses the synthetic dataset
    val: str | None = None  # held-out shards; null with train set means no validation
    classnames: str | None = None  # one class name per line, label order; null: classnames.txt by the shards
    num_workers: int = 2  # DataLoader workers (each reads its own shards)
    shuffle_buffer: int = 2000  # samples held for shuffling
    resampled: bool = False  # draw shards with replacement forever (no epochs) instead of one pass per epoch
    max_skip_rate: float = 0.05  # stop when more than this fraction of samples is undecodable
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # cpu, gpu, auto
    devices: Any = "auto"  # int, list of ids or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto, ddp, fsdp (Lightning strategies); fsdp shards every transformer block
    # FSDP's sharding: params+grads+optimizer state, grads+optimizer state, full within a node, or none (DDP-like)
    fsdp_sharding: str = choices("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD", default="FULL_SHARD")
    precision: str = "32-true"  # 32-true, bf16-mixed, 16-mixed
    gradient_clip_val: float = 1.0
    val_check_interval: int = 500  # validate every N optimizer steps
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 500
    logger: str = choices("csv", "tensorboard", default="csv")
    seed: int = 0
    compile: bool = False  # torch.compile each transformer block (ViT, text tower, LLM layers) in place
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row


@dataclass
class EvalConfig:
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}.", "a {}.", "an image of a {}."])
    batch_size: int = 256
    max_new_tokens: int = 16  # phase 2 answers


@dataclass
class TrainConfig:
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tiler: TilerConfig = field(default_factory=TilerConfig)  # defined with the tiler, in vlm/data/tiler.py
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_root: str = "checkpoints"  # runs go to OUTPUT_ROOT/STAGE/RUN_NAME
    run_name: str | None = None  # null: a timestamp
    init_from: str | None = "auto"  # export folder to start from; auto: the latest of the previous stage; null: fresh
    resume: str | None = None  # auto: continue this stage's newest run from its last valid checkpoint; or a .ckpt path
    checkpoint: str | None = None  # vlm.eval: the export folder to evaluate


def closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


def validate(obj: Any, path: str = "") -> None:
    """Check every `choices` field of a dataclass tree; raise ConfigError naming the key and its valid values."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{path}{f.name}"
        allowed = f.metadata.get("choices")
        if allowed and value not in allowed:
            hint = closest(str(value), list(allowed))
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(allowed)}.{hint}")
        if dataclasses.is_dataclass(value):
            validate(value, f"{key}.")


def to_train_config(cfg: DictConfig | dict) -> TrainConfig:
    """Merge a composed config onto the typed schema; unknown keys and bad types raise ConfigError."""
    schema = OmegaConf.structured(TrainConfig)
    raw = {k: v for k, v in (OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg).items()
           if k != "hydra"}
    try:
        merged = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(schema, parent) if parent else schema
        valid = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
        if leaf in valid:  # a known key with a value of the wrong type
            raise ConfigError(f"bad value for {key!r}: {reason}") from None
        raise ConfigError(f"unknown config key {key!r}.{closest(leaf, valid)} Valid keys under "
                          f"{parent or 'the top level'!r}: {valid}") from None
    try:
        config: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ValueError as err:  # a dataclass's own validation (e.g. TilerConfig); name the group
        raise ConfigError(str(err).replace("TilerConfig.", "tiler.")) from None
    validate(config)
    minimums = (("stage.max_steps", config.stage.max_steps, 1), ("stage.batch_size", config.stage.batch_size, 1),
                ("model.projector.reduction_factor", config.model.projector.reduction_factor, 1),
                ("model.projector.image_slots", config.model.projector.image_slots, 0))
    for key, value, least in minimums:
        if value < least:
            raise ConfigError(f"{key}={value} must be >= {least}")
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (for export folders and metrics)."""
    return dataclasses.asdict(config)
