"""Benchmark: training-step throughput, vlm's VisionLanguageModel vs transformers' LlavaForConditionalGeneration.

Both sides are built at the same sizes with random weights (nothing is downloaded):
- ours:  `vlm.models.factory.new_vlm(config.model, config.tiler)` on the composed config (model=tiny, or the larger
         "small" preset), with `model.projector.reduction=none`, `model.vision.feature_layer=-1` and
         `model.vision.conv_stem=false` (CLIP's ViT has a single patchify convolution; the tiny preset's conv stem
         would make the two ViTs different models): timm ViT -> mlp2x_gelu projector -> the HF LlamaForCausalLM that
         `build_llm` makes, with the local synthetic tokenizer;
- HF:    LlavaForConditionalGeneration with a CLIPVisionConfig of the same width, depth, heads, MLP width (4x), patch
         and image size (exact GELU, as timm), `LlamaConfig(**ours.lm.config.to_dict())` as the text config, LLaVA's
         own projector (Linear -> GELU -> Linear, i.e. mlp2x_gelu), `vision_feature_layer=-1` and
         `vision_feature_select_strategy="default"` (CLS dropped), `image_token_index` = our `<image>` id.
         The LLM and projector weights are copied from ours so the two first losses are directly comparable (the
         ViTs differ in kind and keep their own random weights; weights do not change the speed).
- batch: the same (B, L) ids on both sides: 3 text tokens, then (S/patch)^2 image tokens (one image per sequence,
         as LLaVA spends patches-per-image tokens when it drops CLS), then random text tokens up to --seq-len; labels
         are the ids with the prefix and the image positions set to -100; one (B, 3, S, S) pixel tensor.

A training step is forward (loss on the labels) + backward + AdamW step (torch's default implementation, the same
settings on both sides) on every parameter; nothing is frozen. Each side runs windows of --warmup untimed steps then
--steps timed steps; the sides alternate --repeats times (the order flips every repeat) after one untimed warm-up
round, and medians are compared.

Threads: --threads defaults to 1 (0: torch's default, one per core). On a CPU shared with other jobs, torch's OpenMP
threads spin at every barrier waiting for a descheduled sibling, so with several threads a step's time mostly says how
busy the machine was; one thread keeps it steady. On an idle machine, try --threads 0 too.

Reading the numbers: tokens/s = B x L sequence tokens (image tokens included) per second of training. ratio =
ours / HF median tokens/s; > 1.0 means ours is faster; the goal is >= 1.0. On a shared CPU absolute numbers move
with the load, so read the ratio and the per-repeat ratios for its spread.

--length-mix: useful tokens/s on a realistic mix of lengths instead of full rows. A seeded mix of samples, each one
image (its patches as image tokens) then 1-6 turns; a turn is a question and an answer of 8-200 tokens each, drawn
from a log-normal (median 40), the sample cut at model.llm.max_length (--max-length, default 1024). Labels are the
answers. As in align/sft the ViT is frozen (eval mode, no gradients) on every side; projector and LLM train. Useful
tokens/s = labelled tokens (labels != -100, never padding) per second; four setups on the same batches:
- HF:      LlavaForConditionalGeneration, batches padded to their longest sample;
- padded:  ours, the same padded batches (vlm.data.processor.pad_batch);
- packed:  ours, each batch's samples packed into as few rows as wide as its longest sample (vlm.data.packing, as
           data.packing=true does);
- cached:  packed, and the ViT's features read from vlm.models.feature_cache (stage.cache_vision_features=true): every
           window after the warm-up round finds all of them cached, as every epoch after the first does.
It prints the mix's padding fraction (padding / all tokens of the padded batches) and each setup's ratio to HF.

Usage: python benchmarks/train_step.py [--preset tiny|small] [--steps 10] [--warmup 2] [--batch-size 8]
                                      [--seq-len N] [--repeats 5] [--threads 1] [HYDRA_OVERRIDE ...]
       python benchmarks/train_step.py --length-mix [--max-length 1024] [--batches 4] [--steps 4] [--repeats 3] ...
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from hydra import compose, initialize_config_dir
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_twin import llava_twin  # noqa: E402  (benchmarks/, this script's folder)

from vlm.cli import CONFIG_DIR  # noqa: E402
from vlm.config import TrainConfig, to_train_config  # noqa: E402
from vlm.data.packing import pack_batch  # noqa: E402
from vlm.data.processor import IGNORE_INDEX, Encoded, pad_batch  # noqa: E402
from vlm.models.factory import make_tiler, new_vlm  # noqa: E402
from vlm.models.feature_cache import VisionFeatureCache  # noqa: E402
from vlm.models.vlm import VisionLanguageModel  # noqa: E402

# "tiny" is configs/model/tiny.yaml (what the tests and the synthetic run use); "small" is a few times larger (the same
# sizes as benchmarks/decode.py), so the step is less dominated by per-op overhead.
PRESETS: dict[str, list[str]] = {
    "tiny": [],
    "small": ["model.vision.image_size=224", "model.vision.patch_size=16", "model.vision.width=384",
              "model.vision.depth=6", "model.vision.heads=6", "model.llm.config.hidden_size=512",
              "model.llm.config.intermediate_size=1376", "model.llm.config.num_hidden_layers=8",
              "model.llm.config.num_attention_heads=8", "model.llm.config.num_key_value_heads=8",
              "model.llm.config.max_position_embeddings=1024", "model.llm.max_length=1024"],
}
DEFAULT_SEQ_LEN = {"tiny": 256, "small": 512}
PREFIX = 3  # text tokens before the image


def load_config(preset: str, overrides: list[str]) -> TrainConfig:
    """The composed sft config with the preset's sizes; image tokens = patches, as LLaVA has."""
    fixed = ["stage=sft", "model.vision.conv_stem=false", "model.projector.type=mlp2x_gelu",
             "model.projector.reduction=none", "model.vision.feature_layer=-1", "model.vision.keep_cls=false",
             "model.vision.global_pool=null",
             "model.llm.name_or_path=null", "model.llm.gradient_checkpointing=false",
             "model.vision.gradient_checkpointing=false"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_train_config(compose("train", overrides=[*fixed, *PRESETS[preset], *overrides]))


def make_batch(ours: VisionLanguageModel, special: set[int], vocab: int, batch: int, seq_len: int,
               image_size: int) -> dict[str, torch.Tensor]:
    """(B, L) ids: PREFIX text tokens, the image's tokens, text up to L; labels on the text after the image."""
    image_tokens = ours.tokens_per_tile
    if seq_len < PREFIX + image_tokens + 2:
        raise SystemExit(f"--seq-len {seq_len} is too short for {image_tokens} image tokens plus text; use at least "
                         f"{PREFIX + image_tokens + 2}")
    generator = torch.Generator().manual_seed(0)
    text = torch.tensor([i for i in range(vocab) if i not in special])
    ids = text[torch.randint(len(text), (batch, seq_len), generator=generator)]  # (B, L)
    ids[:, PREFIX:PREFIX + image_tokens] = ours.image_token_id
    labels = ids.clone()
    labels[:, :PREFIX + image_tokens] = IGNORE_INDEX
    pixels = torch.randn(batch, 3, image_size, image_size, generator=generator)  # (B, 3, S, S)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels}


class StepLoop:
    """forward + backward + AdamW step on the trainable parameters of one model, cycling through the batches; a
    window's rate counts `tokens(batch)` per batch (all sequence tokens, or the labelled ones)."""

    def __init__(self, model: nn.Module, loss: Callable[[dict], torch.Tensor], batches: list[dict], lr: float,
                 tokens: Callable[[dict], int] = lambda b: b["input_ids"].numel()) -> None:
        self.model, self.forward, self.batches, self.tokens = model, loss, batches, tokens
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        self.next = 0

    def step(self) -> int:
        batch = self.batches[self.next % len(self.batches)]
        self.next += 1
        loss = self.forward(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return self.tokens(batch)

    def window(self, warmup: int, steps: int) -> float:
        self.model.train()
        keep_frozen_in_eval(self.model)
        for _ in range(warmup):
            self.step()
        start = time.perf_counter()
        tokens = sum(self.step() for _ in range(steps))
        return tokens / (time.perf_counter() - start) if steps else 0.0


def keep_frozen_in_eval(model: nn.Module) -> None:
    """Modules with parameters, all frozen (the ViT in --length-mix), stay in eval mode, as in align/sft."""
    for module in model.modules():
        parameters = list(module.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            module.eval()


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights count once


def interleaved(sides: dict[str, StepLoop], repeats: int, warmup: int, steps: int) -> dict[str, list[float]]:
    """Timed windows of every side, alternating (the order flips every repeat) after one untimed warm-up round."""
    results: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(repeats + 1):  # round 0 warms up every side and is not recorded
        names = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
        for name in names:
            rate = sides[name].window(warmup, steps if repeat else 1)
            if repeat:
                results[name].append(rate)
                print(f"repeat {repeat} {name:<7} {rate:9.1f} tokens/s (load {os.getloadavg()[0]:.2f})",
                      file=sys.stderr, flush=True)
    return results


def mix_samples(ours: VisionLanguageModel, special: set[int], count: int, max_length: int,
                image_size: int, seed: int) -> list[Encoded]:
    """The --length-mix samples: an image after PREFIX tokens, then 1-6 turns of a question and an answer of 8-200
    tokens each (log-normal, median 40), cut at max_length; labels on the answers."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.tensor([i for i in range(ours.lm.config.vocab_size) if i not in special])

    def turn_length() -> int:
        return int(torch.empty(1).log_normal_(math.log(40), 0.9, generator=generator).clamp(8, 200))

    samples = []
    while len(samples) < count:
        ids = [*text[torch.randint(len(text), (PREFIX,), generator=generator)].tolist(),
               *[ours.image_token_id] * ours.tokens_per_tile]
        labels = [IGNORE_INDEX] * len(ids)
        for _ in range(int(torch.randint(1, 7, (1,), generator=generator))):
            question, answer = turn_length(), turn_length()
            words = text[torch.randint(len(text), (question + answer,), generator=generator)].tolist()
            ids += words
            labels += [IGNORE_INDEX] * question + words[question:]
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE_INDEX for label in labels):
            samples.append(Encoded(torch.tensor(ids), torch.tensor(labels),
                                   torch.randn(1, 3, image_size, image_size, generator=generator),
                                   [ours.tokens_per_tile]))
    return samples


def useful_tokens(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def length_mix(args: argparse.Namespace, config: TrainConfig, ours: VisionLanguageModel,
               theirs: transformers.LlavaForConditionalGeneration, special: set[int], tokenizer_pad: int) -> None:
    """The --length-mix benchmark (see the module docstring)."""
    ours.vision.requires_grad_(False)
    theirs.model.vision_tower.requires_grad_(False)
    max_length = config.model.llm.max_length
    samples = mix_samples(ours, special, args.batches * args.batch_size, max_length, config.model.vision.image_size,
                          seed=args.seed)
    groups = [samples[i:i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    padded = [pad_batch(group, tokenizer_pad) for group in groups]
    packed = [pack_batch(group, tokenizer_pad) for group in groups]
    for g, batch in enumerate(packed):  # the cache's sample keys: each sample's index in the mix
        batch.update(keys=[f"mix:{g * args.batch_size + i}" for i in batch["order"]], tiles=[1] * len(batch["order"]))
    cache = VisionFeatureCache(ours.vision, make_tiler(config.tiler, ours.vision, ours.tokens_per_tile),
                               memory_bytes=10**10, directory=Path(tempfile.gettempdir()) / "vlm-benchmark-features")

    def padded_loss(b: dict) -> torch.Tensor:
        return ours(b["input_ids"], b["attention_mask"], b["pixel_values"], b["labels"], b["image_slots"]).loss

    def packed_loss(b: dict) -> torch.Tensor:
        return ours(b["input_ids"], None, b["pixel_values"], b["labels"], b["image_slots"],
                    position_ids=b["position_ids"]).loss

    def cached_loss(b: dict) -> torch.Tensor:
        patches = cache.patch_features(b["keys"], b["pixel_values"], b["tiles"])
        return ours(b["input_ids"], None, b["pixel_values"], b["labels"], b["image_slots"],
                    position_ids=b["position_ids"], patches=patches).loss

    def hf_loss(b: dict) -> torch.Tensor:
        return theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                      labels=b["labels"]).loss

    lengths = [len(s.input_ids) for s in samples]
    padded_tokens = sum(b["input_ids"].numel() for b in padded)
    packed_tokens = sum(b["input_ids"].numel() for b in packed)
    useful = sum(useful_tokens(b) for b in padded)
    print(f"length-mix benchmark, preset {args.preset}: {len(samples)} samples (seed {args.seed}) in {len(groups)} "
          f"batches of {args.batch_size}, max_length {max_length}; {args.steps} timed steps per window after "
          f"{args.warmup} warm-up steps, {args.repeats} interleaved repeats (+1 warm-up round); ViT frozen")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; torch {torch.__version__} with "
          f"{torch.get_num_threads()} intra-op threads; transformers {transformers.__version__}; attention "
          f"{ours.lm.config._attn_implementation} (ours) / {theirs.config.text_config._attn_implementation} (HF)")
    print(f"sample lengths: min {min(lengths)}, median {int(statistics.median(lengths))}, max {max(lengths)} tokens "
          f"({ours.tokens_per_tile} of them image tokens); labelled tokens {useful} "
          f"({100 * useful / sum(lengths):.0f}% of sample tokens)")
    print(f"padding fraction: padded batches {1 - sum(lengths) / padded_tokens:.3f} "
          f"({padded_tokens} tokens for {sum(lengths)}), packed rows {1 - sum(lengths) / packed_tokens:.3f} "
          f"({sum(len(b['input_ids']) for b in packed)} rows for {len(samples)} samples)")
    with torch.no_grad():
        first = {"HF": float(hf_loss(padded[0])), "padded": float(padded_loss(padded[0])),
                 "packed": float(packed_loss(packed[0]))}
    print("loss on the first batch before training: " + ", ".join(f"{k} {v:.5f}" for k, v in first.items())
          + " (ours padded and packed must agree)", flush=True)
    if abs(first["padded"] - first["packed"]) > 1e-4:
        sys.exit("packed and padded losses differ: not timing them")

    sides = {"HF": StepLoop(theirs, hf_loss, padded, args.lr, useful_tokens),
             "padded": StepLoop(ours, padded_loss, padded, args.lr, useful_tokens),
             "packed": StepLoop(ours, packed_loss, packed, args.lr, useful_tokens),
             "cached": StepLoop(ours, cached_loss, packed, args.lr, useful_tokens)}
    sides["cached"].window(0, len(packed))  # the first epoch: every feature computed once and stored
    results = interleaved(sides, args.repeats, args.warmup, args.steps)
    medians = {name: statistics.median(rates) for name, rates in results.items()}
    print(f"\n{'setup':<7} {'useful tokens/s':>15} {'x HF':>6}   per repeat")
    print("-" * 60)
    for name, rates in results.items():
        print(f"{name:<7} {medians[name]:15.1f} {medians[name] / medians['HF']:6.2f}   "
              f"{', '.join(f'{r:.0f}' for r in rates)}")
    print(f"\nratios of medians: padded/HF {medians['padded'] / medians['HF']:.3f}, packed/HF "
          f"{medians['packed'] / medians['HF']:.3f}, cached/HF {medians['cached'] / medians['HF']:.3f}, packed/padded "
          f"{medians['packed'] / medians['padded']:.3f}, cached/packed {medians['cached'] / medians['packed']:.3f}")
    verdict = "meets" if medians["packed"] >= 1.5 * medians["HF"] else "misses"
    print(f"verdict: packed {verdict} the >= 1.5x HF goal ({medians['packed'] / medians['HF']:.3f}x; cached "
          f"{medians['cached'] / medians['HF']:.3f}x; load average now {os.getloadavg()[0]:.2f}; vision feature "
          f"cache: {cache.hits} hits, {cache.misses} misses)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per window (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every window (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: tiny 256, small 512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per side, interleaved (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads, both sides (default 1, the steadiest on a shared CPU; 0: torch's "
                             "default, one per core)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, both sides (default 1e-4)")
    parser.add_argument("--length-mix", action="store_true",
                        help="useful tokens/s on a seeded mix of lengths: HF padded, ours padded, packed, packed+cache")
    parser.add_argument("--max-length", type=int, default=1024,
                        help="--length-mix: model.llm.max_length (default 1024)")
    parser.add_argument("--batches", type=int, default=4, help="--length-mix: distinct batches, cycled (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="--length-mix: the mix's seed (default 0)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for ours, e.g. model.vision.depth=6")
    args = parser.parse_args()
    if min(args.steps, args.repeats, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats and --batch-size must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    seq_len = args.seq_len or DEFAULT_SEQ_LEN[args.preset]
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")

    overrides = args.overrides
    if args.length_mix:
        overrides = [f"model.llm.max_length={args.max_length}",
                     f"model.llm.config.max_position_embeddings={args.max_length}", *overrides]
    config = load_config(args.preset, overrides)
    torch.manual_seed(0)
    bundle = new_vlm(config.model, config.tiler)
    ours = bundle.model
    theirs = llava_twin(ours)
    special = set(bundle.tokenizer.all_special_ids) | {ours.image_token_id}
    if args.length_mix:
        length_mix(args, config, ours, theirs, special, bundle.tokenizer.pad_token_id)
        return
    batch = make_batch(ours, special, ours.lm.config.vocab_size, args.batch_size, seq_len,
                       config.model.vision.image_size)

    def ours_loss(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return ours(b["input_ids"], b["attention_mask"], b["pixel_values"], b["labels"]).loss

    def hf_loss(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                      labels=b["labels"]).loss

    with torch.no_grad():
        first = {"ours": float(ours_loss(batch)), "HF": float(hf_loss(batch))}
    n_ours, n_hf = count(ours), count(theirs)
    v, lm = config.model.vision, ours.lm.config
    print(f"train-step benchmark, preset {args.preset}: batch {args.batch_size} x {seq_len} tokens "
          f"({ours.tokens_per_tile} image tokens per sequence), {args.steps} timed steps per window after "
          f"{args.warmup} warm-up steps, {args.repeats} interleaved repeats (+1 warm-up round)")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; torch {torch.__version__} with "
          f"{torch.get_num_threads()} intra-op threads (both sides); transformers {transformers.__version__}")
    print(f"ViT {ours.vision.width}x{len(ours.vision.vit.blocks)} @ {v.image_size}px/{v.patch_size} (ours: timm; HF: "
          f"CLIPVisionModel, attn {theirs.config.vision_config._attn_implementation}); projector mlp2x_gelu; Llama "
          f"{lm.hidden_size}x{lm.num_hidden_layers}, vocab {lm.vocab_size}, tied embeddings "
          f"{lm.tie_word_embeddings}, attn {ours.lm.config._attn_implementation} (ours) / "
          f"{theirs.config.text_config._attn_implementation} (HF)")
    print(f"params: ours {n_ours / 1e6:.3f}M, HF {n_hf / 1e6:.3f}M ({100 * (n_ours - n_hf) / n_hf:+.2f}%)")
    print(f"loss on the batch before training: ours {first['ours']:.3f}, HF {first['HF']:.3f} "
          f"(ln vocab = {math.log(lm.vocab_size):.3f})")
    if not all(math.isfinite(x) for x in first.values()):
        sys.exit("a side has a non-finite loss; not timing it")
    if abs(n_ours - n_hf) > 0.05 * n_hf:
        print("WARNING: parameter counts differ by more than 5%; the sizes do not match", file=sys.stderr)
    print(flush=True)

    sides = {"ours": StepLoop(ours, ours_loss, [batch], args.lr), "HF": StepLoop(theirs, hf_loss, [batch], args.lr)}
    results = interleaved(sides, args.repeats, args.warmup, args.steps)

    medians = {name: statistics.median(rates) for name, rates in results.items()}
    print(f"{'side':<5} {'median tokens/s':>15} {'best':>9} {'ms/step':>8}   per repeat")
    print("-" * 72)
    for name, rates in results.items():
        per = ", ".join(f"{r:.0f}" for r in rates)
        ms = 1000 * batch["input_ids"].numel() / medians[name]
        print(f"{name:<5} {medians[name]:15.1f} {max(rates):9.1f} {ms:8.1f}   {per}")
    ratio = medians["ours"] / medians["HF"]
    spread = [o / h for o, h in zip(results["ours"], results["HF"], strict=True)]
    best = max(results["ours"]) / max(results["HF"])
    print(f"\nratio ours/HF: {ratio:.3f}x of medians, {best:.3f}x of bests; per repeat (adjacent windows): "
          f"{', '.join(f'{r:.3f}' for r in spread)}   (> 1.0: ours is faster)")
    verdict = "meets" if ratio >= 1.0 else "misses"
    print(f"verdict: ours {verdict} the >= 1.0x goal ({ratio:.3f}x; load average now {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
