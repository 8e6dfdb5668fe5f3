"""Typed configuration: the schema of every config group, and the one mechanism that checks a composed config.

Hydra composes the YAML groups under `configs/`, which hold every default: a field below has a default only where the
default composition gives it the same value (a test checks), or where an export written before the field existed
must still load. `load_config` merges a composed config onto a dataclass schema, so that an unknown key, a wrong type,
or a value outside a field's `choices`, `minimum` or `maximum` fails before any work starts, with a message that
names the key. `vlm.train` and `vlm.eval` read `TrainConfig`; `vlm.infer` and `vlm.serve` have their own schemas,
checked by the same functions. Every field says what it does: this file is the reference for `key=value` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from vlm.errors import UserError

T = TypeVar("T")

# The resolution cap of the tiler: its default, and the largest a config may ask for.
CAP_LONG_SIDE = 6144
CAP_SHORT_SIDE = 4096


class ConfigError(UserError, ValueError):
    """A configuration key or value that cannot work; the message names the key and what would. `key`, where the
    raiser sets it, is the key as the raiser knows it (`top_p`, `h2o.ranking`), and the message starts with it, so
    `load_config` can name the key by its full path (`generation.top_p`)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def setting(default: Any = MISSING, *, choices: Iterable[Any] | None = None, minimum: float | None = None,
            maximum: float | None = None) -> Any:
    """A config field. Without `default` the YAML gives the value; `choices`, `minimum` and `maximum` are checked by
    `check_fields` (None always passes: it means "off" or "unset")."""
    rules = {"choices": tuple(choices) if choices is not None else None, "minimum": minimum, "maximum": maximum}
    metadata = {k: v for k, v in rules.items() if v is not None}
    if isinstance(default, list | dict | tuple) and default != ():
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def closest(key: str, valid: Iterable[str]) -> str | None:
    """The valid name closest to a typo (or the one valid name it starts, "mlp" for "mlp2x_gelu"), or None."""
    names = [str(v) for v in valid]
    match = difflib.get_close_matches(key, names, n=1)
    started = [name for name in names if key and name.startswith(key)]
    return match[0] if match else started[0] if len(started) == 1 else None


def invalid_choice_message(key: str, value: Any, allowed: Iterable[Any]) -> str:
    """One message for a value outside its choices (a config key's, or a config group's): the valid ones and the
    closest."""
    allowed = list(allowed)
    match = closest(str(value), [str(a) for a in allowed])
    return f"{key}={value!r} is not valid; choose one of {allowed}." + (f" Did you mean {match!r}?" if match else "")


def unknown_key_message(key: str, valid: Iterable[str], what: str = "config key") -> str:
    """One message for every unknown name: the key, its closest valid sibling, and the valid ones under its parent."""
    valid = sorted(str(v) for v in valid)
    parent, _, leaf = key.rpartition(".")
    match = closest(leaf, valid)
    hint = f" Did you mean {(parent + '.' if parent else '') + match!r}?" if match else ""
    where = f" under {parent!r}" if parent else ""
    return f"unknown {what} {key!r}.{hint} Valid {what}s{where}: {valid}"


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)  # no NaN nor inf (an int of any size is finite)


def check_fields(obj: Any, path: str = "", error: type[ValueError] = ConfigError) -> None:
    """Check every field's `choices`, `minimum` and `maximum` in a dataclass tree; raise `error` naming the key."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{path}{f.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.", error)
            continue
        if value is None:
            continue
        allowed = f.metadata.get("choices")
        if allowed is not None and value not in allowed:
            raise error(invalid_choice_message(key, value, allowed))
        low, high = f.metadata.get("minimum"), f.metadata.get("maximum")
        if low is None and high is None:
            continue
        wants_int = hints.get(f.name) in (int, int | None)
        kind = "an integer" if wants_int else "a finite number"
        if not _is_number(value) or (wants_int and not isinstance(value, int)):
            raise error(f"{key}={value!r} must be {kind}")
        if low is not None and value < low:
            raise error(f"{key}={value} must be >= {low}")
        if high is not None and value > high:
            raise error(f"{key}={value} must be <= {high}")


def _escape_interpolations(value: Any) -> Any:
    """Strings with "${" escaped, so merging them into the schema does not read them as interpolations again
    (a prompt asking "What does ${HOME} mean?")."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: _escape_interpolations(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_interpolations(v) for v in value]
    return value


def _value_for_a_group(structured: DictConfig, raw: dict[str, Any], prefix: str = "") -> str | None:
    """The first key of `raw` that gives one value where the schema has a group of settings (OmegaConf's merge error
    for it names no key)."""
    for key, value in raw.items():
        node = structured.get(key) if isinstance(structured, DictConfig) and key in structured else None
        if isinstance(node, DictConfig):
            if not isinstance(value, dict):
                return prefix + key
            if found := _value_for_a_group(node, value, f"{prefix}{key}."):
                return found
    return None


def load_config(schema: type[T], values: DictConfig | dict[str, Any], path: str = "",
                error: type[ValueError] = ConfigError) -> T:
    """Merge composed values onto `schema`: unknown keys, wrong types, missing values and values outside a field's
    rules raise `error` with the key's full name (`path` prefixes it)."""
    if isinstance(values, DictConfig):  # resolved here: text that spells ${...} is text from now on
        values = _escape_interpolations(OmegaConf.to_container(values, resolve=True))
    raw = {k: v for k, v in values.items() if k != "hydra"}
    structured = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(structured, raw)
        config = OmegaConf.to_object(merged)
    except MissingMandatoryValue as err:
        raise error(f"config key {path + str(err.full_key)!r} has no value; give it one (key=value)") from None
    except OmegaConfBaseException as err:
        if not getattr(err, "full_key", None) and (group := _value_for_a_group(structured, raw)):
            keys = ", ".join(str(k) for k in OmegaConf.select(structured, group).keys())
            raise error(f"bad value for {path + group!r}: it is a group of settings ({keys}); set them one by one, "
                        f"e.g. {path + group}.{keys.split(', ')[0]}=..., got "
                        f"{OmegaConf.select(OmegaConf.create(raw), group)!r}") from None
        key = str(getattr(err, "full_key", None) or "?")
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(structured, parent) if parent else structured
        valid = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
        if leaf in valid:  # a known key with a value of the wrong type
            reason = str(getattr(err, "msg", err)).splitlines()[0]
            if "is not a ListConfig" in reason:  # OmegaConf's words for one value given to a list
                given = OmegaConf.select(OmegaConf.create(raw), key, default=None)
                reason = f"it takes a list, e.g. {path + key}=[{given}], got {given!r}"
            raise error(f"bad value for {path + key!r}: {reason}") from None
        raise error(unknown_key_message(path + key, valid)) from None
    except ValueError as err:  # a dataclass's own __post_init__ check
        raise error(_with_full_key(str(err), getattr(err, "key", None), raw, path)) from None
    check_fields(config, path, error)
    return config  # type: ignore[return-value]


def _with_full_key(message: str, key: str | None, raw: dict[str, Any], path: str) -> str:
    """`message`, which starts with `key` as a nested dataclass knows it, starting with that key's full path in the
    composed values `raw` instead ("top_p=2" -> "generation.top_p=2") where exactly one path ends with it."""
    if not key or not message.startswith(key):
        return message
    paths = [p for p in _dotted_keys(raw) if p == key or p.endswith("." + key)]
    return path + paths[0] + message[len(key):] if len(paths) == 1 else message


def _dotted_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key of a nested dict as a dotted path, branches included."""
    keys = []
    for name, value in values.items():
        keys.append(prefix + str(name))
        if isinstance(value, dict):
            keys += _dotted_keys(value, prefix + str(name) + ".")
    return keys


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (for export folders and metrics)."""
    return dataclasses.asdict(config)


# ---- the tiler ----


@dataclass
class TilerConfig:
    """Resolution-tier settings (configs/tiler/*.yaml; the `low` tier's values are the defaults)."""

    max_tiles: int = setting(1, minimum=1)  # grid cells at most (rows * cols); a thumbnail is added when > 1
    max_long_side: int = setting(CAP_LONG_SIDE, minimum=1, maximum=CAP_LONG_SIDE)  # cap on the long side (px)
    max_short_side: int = setting(CAP_SHORT_SIDE, minimum=1, maximum=CAP_SHORT_SIDE)  # cap on the short side (px)
    thumbnail: bool = True  # add a whole-image thumbnail tile (last) when the grid has more than one tile
    background: tuple[int, int, int] = (255, 255, 255)  # RGB that transparent pixels are composited onto
    max_pixels: int = setting(256_000_000, minimum=1)  # decompression-bomb guard: refuse headers claiming more
    draft: bool = True  # decode JPEGs at a reduced DCT scale when the tiles need fewer pixels (off: full decode)

    def __post_init__(self) -> None:
        check_fields(self, "tiler.")
        for key in ("thumbnail", "draft"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"tiler.{key} must be true or false, got {getattr(self, key)!r}")
        try:
            background = tuple(self.background)  # YAML / Hydra give a list
        except TypeError:
            background = ()
        if len(background) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                           for v in background):
            raise ConfigError(f"tiler.background must be three integers 0-255 (an RGB colour), got "
                              f"{self.background!r}")
        self.background = background  # type: ignore[assignment]


# ---- the model ----


VIT_POOLS = ("token", "avg", "avgmax", "max", "map")  # timm ViT poolings: CLS, mean, mean+max, max, attention


@dataclass
class VisionConfig:
    name: str = setting()  # any timm ViT name (vit_*, deit_*, eva02_*, ...)
    pretrained: bool = setting()  # load timm hub weights (needs the hub); tiny presets train from scratch
    image_size: int = setting(minimum=1)  # encoder input size S: tiles are S x S
    patch_size: int = setting(minimum=1)  # ViT patch size; tokens per tile = (S / patch)^2 before reduction
    width: int | None = setting(minimum=1)  # embed_dim override; null keeps the timm model's own
    depth: int | None = setting(minimum=1)  # number of blocks override; null keeps the timm model's own
    heads: int | None = setting(minimum=1)  # attention heads override; null keeps the timm model's own
    global_pool: str | None = setting()  # "token" (CLS) or "avg" (mean of patches, no CLS token); null keeps timm's
    conv_stem: bool = setting()  # stride-2 convolutions instead of one patchify conv: faster convergence from scratch
    feature_layer: int = setting()  # phase 2: which block's output feeds the projector (-1 = last, -2 = penultimate)
    keep_cls: bool = setting()  # phase 2: keep the prefix (CLS) tokens in the image tokens
    gradient_checkpointing: bool = setting()  # recompute block activations in backward to save memory

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int) and isinstance(self.patch_size, int) and self.patch_size > 0 \
                and self.image_size % self.patch_size:
            raise ValueError(f"model.vision.image_size={self.image_size} must be a multiple of "
                             f"model.vision.patch_size={self.patch_size} (the ViT cuts each tile into whole patches)")
        if self.global_pool is not None and self.global_pool != MISSING and self.global_pool not in VIT_POOLS:
            raise ValueError(f"model.vision.global_pool={self.global_pool!r} is not a timm ViT pooling: use one of "
                             f"{', '.join(VIT_POOLS)}, or null for the model's own")
        _check_heads("model.vision", self.width, self.heads)


@dataclass
class TextConfig:
    tokenizer: str = setting()  # open_clip tokenizer name; the CLIP BPE vocabulary ships with open_clip
    context_length: int = setting(minimum=1)  # tokens per caption (longer captions are truncated)
    vocab_size: int = setting(minimum=1)  # must match the tokenizer
    width: int = setting(minimum=1)
    heads: int = setting(minimum=1)
    layers: int = setting(minimum=1)
    pretrained: str | None = setting()  # "MODEL/TAG" of open_clip weights for the text tower, e.g. "ViT-B-16/openai"
    quick_gelu: bool = setting()  # QuickGELU activations, as OpenAI's CLIP weights were trained with (plain GELU else)

    def __post_init__(self) -> None:
        _check_heads("model.text", self.width, self.heads)


def _check_heads(group: str, width: Any, heads: Any) -> None:
    """Attention splits the width evenly over the heads."""
    if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
        raise ValueError(f"{group}.heads={heads} does not divide {group}.width={width}: attention splits the width "
                         f"evenly over the heads")


@dataclass
class ClipHeadConfig:
    embed_dim: int = setting(minimum=1)  # shared image/text embedding size
    loss: str = setting(choices=("clip", "siglip"))  # open_clip ClipLoss or SigLipLoss
    local_loss: bool = setting()  # each rank scores its own samples against the global batch (saves memory)
    gather_with_grad: bool = setting()  # gather features across ranks with gradients (all negatives, all ranks)
    init_logit_scale: float | None = setting()  # log temperature at start; null: log(1/0.07) clip, log(10) siglip
    init_logit_bias: float | None = setting()  # siglip only; null: -10

    def __post_init__(self) -> None:
        if self.loss == "clip" and isinstance(self.init_logit_bias, int | float):
            raise ValueError(f"model.clip.init_logit_bias={self.init_logit_bias:g} applies to model.clip.loss=siglip "
                             f"only: CLIP's softmax loss has no bias")


@dataclass
class ProjectorConfig:
    type: str = setting(choices=("linear", "mlp2x_gelu"))  # maps ViT features into the LLM's embeddings
    reduction: str = setting(choices=("none", "pixel_shuffle", "avg_pool"))  # token reduction per tile
    reduction_factor: int = setting(minimum=1)  # tokens per tile shrink by factor^2
    image_slots: int = setting(minimum=0)  # >0: a learned embedding per image position in a sample (1st, 2nd, ...)
    # how a slot marks its image's tokens: "feature" adds the slot vector times each token's RMS, so the mark stays a
    # fixed share of the feature however large the projected features grow; "embedding" adds it unscaled
    image_slot_scale: str = setting(choices=("feature", "embedding"))


@dataclass
class SparseAttentionConfig:
    """The local + global pattern (model.llm.attention=local_global); positions count from each sample's first token.
    Defaults exist so exports written before these keys load (they load as dense)."""

    window: int = setting(1024, minimum=1)  # every token reads the previous `window` tokens (itself included)
    stride: int = setting(64, minimum=1)  # positions divisible by `stride` are global: every later token reads them
    sinks: int = setting(4, minimum=0)  # the first `sinks` tokens are always read
    kernel: str = setting("sdpa", choices=("sdpa", "flex"))  # sdpa: boolean mask; flex: flex_attention on GPUs


@dataclass
class LLMConfig:
    name_or_path: str | None = setting()  # any Hugging Face AutoModelForCausalLM; null builds a tiny random Llama
    tokenizer: str | None = setting()  # tokenizer name or path; null: same as name_or_path, or the local synthetic one
    config: dict[str, Any] = setting()  # LlamaConfig kwargs for the random model (when name_or_path is null)
    gradient_checkpointing: bool = setting()  # recompute decoder layers in backward to save memory
    max_length: int = setting(minimum=8)  # sequence cap; a sample whose image tokens would be cut is dropped
    chat_template: str | None = setting()  # Jinja template overriding the tokenizer's own; null keeps the tokenizer's
    attention: str = setting("dense", choices=("dense", "local_global"))  # causal attention, or local window + global
    sparse: SparseAttentionConfig = field(default_factory=SparseAttentionConfig)  # the local_global pattern


@dataclass
class ModelConfig:
    name: str = setting()  # the preset's name
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    clip: ClipHeadConfig = field(default_factory=ClipHeadConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)


# Values that exports written before a model key existed were trained with: such an export loads as it was trained.
EARLIER_MODEL_VALUES: dict[str, dict[str, Any]] = {"projector": {"image_slot_scale": "embedding"},
                                                    "text": {"quick_gelu": False}}


def model_config_from(values: dict[str, Any]) -> ModelConfig:
    """The ModelConfig an export folder recorded (keys added since it was written get their earlier behaviour), to
    build the model its weights are loaded into: no hub weights are fetched for the towers (pretrained off), since the
    export's replace them, and loading must work offline."""
    merged = {**values}
    for group, earlier in EARLIER_MODEL_VALUES.items():
        if isinstance(merged.get(group), dict):
            merged[group] = {**earlier, **merged[group]}
    config = load_config(ModelConfig, merged, path="model.")
    config.vision.pretrained, config.text.pretrained = False, None
    return config


# ---- training ----


PREFERENCE_SETTINGS = ("beta", "loss", "sft_weight", "anchor_weight", "precompute_reference", "disable_dropout",
                       "reference")  # the stage keys only the preference stages read


@dataclass
class StageConfig:
    name: str = setting()  # the stage: a row of the stage table (vlm/training/stages.py)
    max_steps: int = setting(minimum=1)  # optimizer steps
    batch_size: int = setting(minimum=1)  # per device
    lr: float = setting(minimum=0)  # peak learning rate (AdamW)
    lr_projector: float | None = setting(minimum=0)  # per-part learning rates; null uses `lr`
    lr_llm: float | None = setting(minimum=0)
    lr_vision: float | None = setting(minimum=0)
    lr_text: float | None = setting(minimum=0)
    weight_decay: float = setting(minimum=0)
    betas: tuple[float, float] = setting()  # AdamW betas: (beta1, beta2), each in [0, 1)
    warmup_steps: int = setting(minimum=0)  # linear warmup, then cosine decay to `min_lr_ratio * lr`
    min_lr_ratio: float = setting(minimum=0, maximum=1)
    train_vision: bool | None = setting()  # null follows the stage table; true/false overrides it
    train_llm: bool | None = setting()
    train_projector: bool | None = setting()
    # phase 2: compute each training image's vision-tower features once and reuse them (needs a frozen ViT)
    cache_vision_features: bool = setting()
    feature_cache_memory: int = setting(minimum=0)  # bytes of features kept in memory; the rest go to the folder
    feature_cache_dir: str = setting()  # the cache folder (one subfolder per tower + tiler fingerprint)
    # preference stages (dpo); null elsewhere (PREFERENCE_SETTINGS)
    beta: float | None = setting(minimum=0)  # DPO's beta: how far the policy may move from the reference
    loss: str | None = setting(choices=("sigmoid", "ipo"))  # DPO's sigmoid loss, or IPO (log-probs per token)
    sft_weight: float | None = setting(minimum=0)  # weight of an NLL term on the chosen answers (0: off)
    anchor_weight: float | None = setting(minimum=0)  # weight of the NLL of conversation samples mixed into the pairs
    precompute_reference: bool | None = setting()  # reference log-probs computed once before training, no copy
    disable_dropout: bool | None = setting()  # no dropout in the policy: its log-probs compare with the reference's
    reference: str | None = setting()  # vlm.eval: the reference export; null: the one the run recorded

    def __post_init__(self) -> None:
        betas = list(self.betas) if isinstance(self.betas, list | tuple) else None
        if betas is not None and (len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1
                                                              for b in betas)):
            raise ValueError(f"stage.betas={betas!r} must be two numbers in [0, 1): AdamW's [beta1, beta2], e.g. "
                             f"[0.9, 0.95]")
        if isinstance(self.beta, int | float) and self.beta <= 0:
            raise ValueError(f"stage.beta={self.beta:g} must be > 0: the preference losses divide by it (IPO aims each "
                             f"pair's margin at 1/(2 beta))")


@dataclass
class QuestionMix:
    """How many of every N train conversations ask each question type (the held-out split asks each equally)."""
    color: int = setting(minimum=0)
    shape: int = setting(minimum=0)
    position: int = setting(minimum=0)
    count: int = setting(minimum=0)
    compare: int = setting(minimum=0)  # two-image "which image shows ..." questions


@dataclass
class SyntheticConfig:
    num_train: int = setting(minimum=1)  # samples in the train split
    num_val: int = setting(minimum=1)  # samples in the held-out split
    samples_per_shard: int = setting(minimum=1)
    image_size: int = setting(minimum=16)  # rendered image side in pixels
    seed: int = setting()  # the same seed always gives the same dataset
    cache_dir: str = setting()  # generated once, reused after
    question_mix: QuestionMix = field(default_factory=QuestionMix)  # train conversations' share of each type
    same_shape_pairs: float = setting(minimum=0, maximum=1)  # train two-image questions showing one shape in two
    #                                                          colours (held-out: pictures drawn at random)
    color_only_pairs: float = setting(minimum=0, maximum=1)  # train two-image questions asked by colour alone


@dataclass
class DataConfig:
    name: str = setting()  # the data preset's name
    train: str | None = setting()  # webdataset shards: brace pattern, local or pipe:; null uses the synthetic dataset
    val: str | None = setting()  # held-out shards; null with train set means no validation
    classnames: str | None = setting()  # one class name per line, label order; null: classnames.txt by the shards
    num_workers: int = setting(minimum=0)  # DataLoader workers per rank (each reads its own shards)
    shuffle_buffer: int = setting(minimum=0)  # samples held for shuffling
    resampled: bool = setting()  # draw shards with replacement forever (no epochs) instead of one pass per epoch
    max_skip_rate: float = setting(minimum=0, maximum=1)  # stop when more than this fraction of samples is bad
    eval_group_by: str = setting()  # held-out answers are scored per value of this turn or record field (e.g. type)
    packing: bool = setting()  # phase 2: lay each batch's samples into as few rows as fit; each sees only itself
    length_group_batches: int = setting(minimum=0)  # >0: batch samples of similar length, sorted within this many
    #                                                 batches' worth of samples (for runs that pad); 0: off
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainerConfig:
    accelerator: str = setting(choices=("auto", "cpu", "gpu", "cuda", "mps"))
    devices: Any = setting()  # a count, -1 (all), a list of ids, "0,1", or "auto"
    num_nodes: int = setting(minimum=1)
    strategy: str = setting()  # auto, ddp, fsdp (Lightning strategies); fsdp shards every transformer block
    # FSDP's sharding: params+grads+optimizer state, grads+optimizer state, full within a node, or none (DDP-like)
    fsdp_sharding: str = setting(choices=("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"))
    # auto: bf16-mixed where the hardware runs it natively, else 32-true (vlm.training.strategy.resolve_precision)
    precision: str = setting(choices=("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"))
    # fp32 matmuls on GPUs: highest (full fp32), high (TF32 where the GPU has it), medium (bf16); CPUs ignore it
    matmul_precision: str = setting(choices=("highest", "high", "medium"))
    gradient_clip_val: float | None = setting(minimum=0)  # clip the gradient norm to this; null: no clipping
    val_check_interval: int = setting(minimum=1)  # validate every N optimizer steps
    log_every_n_steps: int = setting(minimum=1)
    checkpoint_every_n_steps: int = setting(minimum=1)
    logger: str = setting(choices=("csv", "tensorboard"))
    seed: int = setting()  # seeds weights, data order and dropout
    compile: bool = setting()  # torch.compile each transformer block (ViT, text tower, LLM layers) in place
    max_nonfinite_steps: int = setting(minimum=1)  # stop after this many non-finite losses in a row

    def __post_init__(self) -> None:
        devices = self.devices
        if devices == MISSING:  # the schema's own placeholder, before the YAML's value arrives
            return
        if isinstance(devices, str) and devices != "auto":
            ok = all(part.strip().isdigit() for part in devices.split(",")) and devices.strip() != ""
        elif isinstance(devices, list | tuple):
            ok = bool(devices) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
        else:
            ok = devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool)
                                       and (devices >= 1 or devices == -1))
        if not ok:
            raise ValueError(f"trainer.devices={devices!r}: give a count (1, 8), -1 for every device, a list of ids "
                             f"([0, 1] or \"0,1\"), or auto")


@dataclass
class EvalConfig:
    templates: list[str] = setting()  # zero-shot prompts; {} is the class name
    batch_size: int = setting(minimum=1)
    max_new_tokens: int = setting(minimum=1)  # phase 2: the longest answer generated for scoring
    turns: str = setting(choices=("all", "last"))  # phase 2: score every assistant turn, or each sample's last
    max_samples: int | None = setting(minimum=1)  # held-out samples a validation reads (loss, answers); null: all
    output_dir: str | None = setting()  # vlm.eval: where metrics.json and predictions.jsonl go; null: RUN/eval

    def __post_init__(self) -> None:
        if self.templates != MISSING and self.templates is not None:
            check_templates(self.templates)


def check_templates(templates: Any, key: str = "eval.templates") -> None:
    """Zero-shot prompt templates, from the command line or an export's config.json: a list of prompts, each with
    one {} for the class name. Raises ValueError naming `key`."""
    if not isinstance(templates, list | tuple) or not templates:
        raise ValueError(f"{key}={templates!r} holds no prompt: zero-shot needs a list of at least one, e.g. "
                         f"{key}=['a photo of a {{}}.']")
    if bad := [t for t in templates if not isinstance(t, str) or "{}" not in t]:
        raise ValueError(f"{key}: {bad[0]!r} has no {{}} for the class name, so every class would get the same "
                         f"prompt; write e.g. 'a photo of a {{}}.'")
    for template in templates:  # a second {} or a named field would fail only at the first validation
        try:
            template.format("class")
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(f"{key}: {template!r} is not a prompt with one {{}} for the class name ({err}); write "
                             f"a literal brace as {{{{ or }}}}") from None


@dataclass
class TrainConfig:
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tiler: TilerConfig = field(default_factory=TilerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_root: str = setting()  # runs go to OUTPUT_ROOT/STAGE/RUN_NAME
    run_name: str | None = setting()  # null: a timestamp
    # export folder to start from; auto: the previous stage's latest (dpo: the one its pairs came from); null: fresh
    init_from: str | None = setting()
    resume: str | None = setting()  # auto: continue this stage's newest run from its last valid checkpoint; or a .ckpt
    checkpoint: str | None = setting()  # vlm.eval: the export folder to evaluate


def to_train_config(cfg: DictConfig | dict) -> TrainConfig:
    """A composed training config, checked against the schema."""
    return load_config(TrainConfig, cfg)
