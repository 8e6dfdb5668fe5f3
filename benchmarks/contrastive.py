"""Benchmark: contrastive training throughput, vlm's real training path vs a plain PyTorch loop over open_clip.

Both sides train the same-sized CLIP model (configs/model/tiny.yaml unless overridden, with its conv stem turned off,
`model.vision.conv_stem=false`, since open_clip's ViT has only the patchify convolution; pass
`model.vision.conv_stem=true` to time the preset as it is, and the parameter line will show the difference) on the
synthetic caption shards, with the same batch size and the same number of torch threads, in one process:

- ours:  exactly what `python -m vlm.train stage=contrastive` builds: `to_train_config` -> `prepare_run` ->
         the stage table's ContrastiveTask (timm ViT + open_clip text tower, open_clip ClipLoss, our AdamW param
         groups and warmup-cosine schedule) -> `build_trainer` (Lightning: progress bar, CSV logger, LR monitor,
         gradient clipping) -> `trainer.fit`, reading the shards through the default data path (webdataset ->
         tiler -> open_clip tokenizer in `data.num_workers` DataLoader worker processes). Held-out validation is off
         (no data.val) and checkpointing is pushed out of the timed window (trainer.checkpoint_every_n_steps is set
         very large).
- plain: `open_clip.CLIP` built from `CLIPVisionCfg` / `CLIPTextCfg` with the same sizes (open_clip's own ViT here,
         timm's on our side; the text towers are the same open_clip class), `open_clip.loss.ClipLoss`, AdamW (same
         lr, betas, weight decay, no decay on gains/biases) and the same gradient clipping and logit-scale clamp as
         open_clip_train's loop, fed batches sliced from samples decoded once, up front, into tensors in memory by
         our own decoder (so the pixels and token ids are the real ones): the "no data path" baseline.
- ours-model (with --breakdown): our CLIPModel and loss in that same plain loop on the same in-memory tensors, which
  splits the gap into model (timm vs open_clip ViT) and everything else (Lightning, DataLoader workers, decoding).

Timing: each side runs in windows of `--warmup` untimed steps then `--steps` timed steps; the sides alternate
(ours, plain, ours, plain, ...; the order flips every repeat) `--repeats` times after one untimed warm-up round, and
the medians are compared. Every ours window is a fresh `trainer.fit` with a fresh Trainer (so the DataLoader workers
start again each window; their start-up and the filling of the prefetch queue fall in the untimed warm-up steps);
the model and its weights carry on across windows. The timed window runs from the end of warm-up step `--warmup` to
the end of the last step, so it includes waiting for data, forward, backward, clipping, the optimizer step, logging
and callbacks.

Reading the numbers: samples/s = timed steps x batch size / seconds. ratio = ours / plain median samples/s; the goal
is >= 0.95 (ours costs at most 5% over a bare loop fed from memory). The ratio of the best windows is printed too:
on a shared CPU a window's speed mostly says how busy the machine was, and the best window of each side is the one
least disturbed. Read the per-repeat ratios (adjacent windows) for the spread. The DataLoader workers are extra
processes: on a machine with few cores they compete with the training threads, which is part of what is measured.

Threads: --threads defaults to 1, not torch's default (one per core). With other jobs on the cores, torch's OpenMP
threads spin at every barrier waiting for a descheduled sibling: on a 2-core machine at load ~4, the same step took
4.7 s with 2 threads and 0.6 s with 1, and which window landed on a quiet moment decided the "ratio". One thread
keeps each step's cost steady under load. On an idle machine, compare with --threads 0 (torch's default) as well:
there the training threads take every core, so the DataLoader workers' decoding (tar reading, shuffling, the tiler
and the tokenizer: roughly 0.6 ms of CPU per 64 px PNG sample, ~80 ms per batch of 128) comes straight out of the
training step, whereas one thread leaves a core free for it.

Usage: python benchmarks/contrastive.py [--steps 30] [--warmup 5] [--batch-size 128] [--repeats 5] [--workers N]
                                       [--threads 1] [--pool 8] [--breakdown] [HYDRA_OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import open_clip
import torch
from hydra import compose, initialize_config_dir
from open_clip.loss import ClipLoss, SigLipLoss
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.cli import CONFIG_DIR  # noqa: E402
from vlm.config import TrainConfig, to_train_config  # noqa: E402
from vlm.data import synthetic  # noqa: E402
from vlm.data.captions import collate_captions  # noqa: E402
from vlm.data.shards import build_pipeline, list_shards  # noqa: E402
from vlm.data.sources import DataSources  # noqa: E402
from vlm.models.clip import MAX_LOGIT_SCALE, CLIPModel  # noqa: E402
from vlm.models.losses import build_contrastive_loss  # noqa: E402
from vlm.training.contrastive import ContrastiveTask  # noqa: E402
from vlm.training.datamodule import ShardDataModule  # noqa: E402
from vlm.training.runs import prepare_run  # noqa: E402
from vlm.training.stages import get_stage  # noqa: E402
from vlm.training.trainer import build_trainer  # noqa: E402

NEVER = 10**9  # a step interval that the benchmark never reaches


def load_config(args: argparse.Namespace, output_root: str) -> TrainConfig:
    """The composed train config, as `python -m vlm.train stage=contrastive` would see it, plus the bench settings."""
    workers = [] if args.workers is None else [f"data.num_workers={args.workers}"]
    # open_clip's ViT has a single patchify convolution, so ours drops the tiny preset's conv stem to match it
    # fp32 on both sides: the plain loop runs no autocast, so bf16-mixed (the CPU default) would compare unlike runs
    overrides = ["stage=contrastive", "model.vision.conv_stem=false", f"stage.batch_size={args.batch_size}", *workers,
                 "trainer.precision=32-true",
                 f"output_root={output_root}", "init_from=null", "trainer.accelerator=cpu", "trainer.devices=1",
                 f"trainer.checkpoint_every_n_steps={NEVER}", f"trainer.val_check_interval={NEVER}", *args.overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_train_config(compose("train", overrides=overrides))


class WindowTimer(pl.Callback):
    """Times the batches after the first `warmup` of a fit: from the end of batch `warmup` to the end of the last."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.batches = self.samples = 0
        self.start = self.stop = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: dict,
                           batch_idx: int) -> None:
        self.batches += 1
        if self.batches > self.warmup:
            self.samples += len(batch["ids"])
        self.stop = time.perf_counter()
        if self.batches == self.warmup:
            self.start = self.stop

    def samples_per_second(self) -> float:
        return self.samples / (self.stop - self.start)


class Ours:
    """vlm's training path: one `trainer.fit` per window, on the same ContrastiveTask throughout."""

    def __init__(self, config: TrainConfig, train_pattern: str) -> None:
        self.config = config
        self.data = DataSources(train_pattern, None, list(synthetic.CLASSNAMES))  # no data.val: no validation
        self.windows = 0
        self.task: ContrastiveTask | None = None
        self.datamodule = None

    def build(self) -> ContrastiveTask:
        pl.seed_everything(self.config.trainer.seed, workers=True, verbose=False)
        self.config.run_name = "ours-0"
        stage = get_stage("contrastive")
        task = stage.task.create(self.config, stage, prepare_run(self.config).init_from, self.data)
        assert isinstance(task, ContrastiveTask)
        self.datamodule = ShardDataModule(self.data, task.batching(), self.config.data, self.config.trainer.seed)
        self.task = task
        return task

    def window(self, warmup: int, steps: int) -> float:
        self.windows += 1
        self.config.run_name = f"ours-{self.windows}"  # a fresh run folder (logs) per window, as a new run has
        self.config.stage.max_steps = warmup + steps
        trainer = build_trainer(self.config, prepare_run(self.config), self.task, time.time())
        timer = WindowTimer(warmup)
        trainer.callbacks.append(timer)
        trainer.fit(self.task, datamodule=self.datamodule)
        if timer.batches != warmup + steps:
            raise RuntimeError(f"ours ran {timer.batches} batches, expected {warmup + steps}")
        del trainer
        gc.collect()  # let the window's DataLoader workers go before the next side runs
        return timer.samples_per_second() if steps else 0.0


def open_clip_model(model: CLIPModel) -> open_clip.CLIP:
    """open_clip.CLIP at our model's sizes, read off the built model (so null width/depth/heads resolve as timm's)."""
    vit = model.visual.vit
    width = model.visual.width
    heads = vit.blocks[0].attn.num_heads
    pool = {"token": "tok", "avg": "avg"}.get(getattr(vit, "global_pool", "token"), "tok")
    vision = CLIPVisionCfg(layers=len(vit.blocks), width=width, head_width=width // heads,
                           mlp_ratio=vit.blocks[0].mlp.fc1.out_features / width,
                           patch_size=model.config.vision.patch_size, image_size=model.config.vision.image_size,
                           no_ln_pre=isinstance(vit.norm_pre, nn.Identity), pool_type=pool)
    t = model.config.text
    text = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                       layers=t.layers)
    head = model.head
    return open_clip.CLIP(model.config.clip.embed_dim, vision, text, init_logit_scale=head.logit_scale.item(),
                          init_logit_bias=None if head.logit_bias is None else head.logit_bias.item(),
                          output_dict=True)


def open_clip_loss(config: TrainConfig) -> nn.Module:
    """open_clip's loss for model.clip.loss, one process."""
    return SigLipLoss() if config.model.clip.loss == "siglip" else ClipLoss()


def open_clip_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW as open_clip_train sets it up: no weight decay on gains, biases and the logit scale."""
    exclude = [p for n, p in model.named_parameters() if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
               or "logit_scale" in n]
    excluded = {id(p) for p in exclude}
    rest = [p for p in model.parameters() if id(p) not in excluded]
    s = config.stage
    groups = [{"params": exclude, "weight_decay": 0.0}, {"params": rest, "weight_decay": s.weight_decay}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=tuple(s.betas))


class PlainLoop:
    """A bare training loop over in-memory batches: forward, loss, backward, clip, AdamW, clamp the temperature."""

    def __init__(self, model: nn.Module, loss: nn.Module, optimizer: torch.optim.Optimizer,
                 logit_scale: nn.Parameter, pixels: torch.Tensor, ids: torch.Tensor, batch_size: int,
                 clip_norm: float) -> None:
        """`model(pixels, ids)` returns the dict open_clip's losses take (both CLIP classes do)."""
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.logit_scale, self.pixels, self.ids = logit_scale, pixels, ids
        self.batch_size, self.clip_norm = batch_size, clip_norm
        self.batches = len(pixels) // batch_size
        self.step = 0
        self.last_loss = math.nan

    def train_step(self) -> None:
        lo = (self.step % self.batches) * self.batch_size
        self.step += 1
        outputs = self.model(self.pixels[lo:lo + self.batch_size], self.ids[lo:lo + self.batch_size])
        loss = self.loss(**outputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.optimizer.step()
        with torch.no_grad():
            self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.last_loss = float(loss.detach())

    def window(self, warmup: int, steps: int) -> float:
        self.model.train()
        for _ in range(warmup):
            self.train_step()
        start = time.perf_counter()
        for _ in range(steps):
            self.train_step()
        return steps * self.batch_size / (time.perf_counter() - start) if steps else 0.0


def decode_pool(task: ContrastiveTask, train_pattern: str, count: int) -> dict[str, torch.Tensor]:
    """The first `count` samples of the train shards, through our decoder, stacked into tensors once."""
    pipeline = build_pipeline(list_shards(train_pattern), task.batching().decode, train=False, split_by_node=False)
    samples = []
    for sample in pipeline:
        samples.append(sample)
        if len(samples) == count:
            break
    if len(samples) < count:
        raise ValueError(f"the train split has only {len(samples)} samples; lower --pool or --batch-size")
    return collate_captions(samples)  # type: ignore[return-value]


@torch.no_grad()
def initial_loss(model: nn.Module, loss: nn.Module, pool: dict[str, torch.Tensor], batch_size: int) -> float:
    """The loss on the first batch, before any step: a sanity check that both sides compute the same kind of thing."""
    return float(loss(**model(pool["pixels"][:batch_size], pool["ids"][:batch_size])))


def millions(model: nn.Module) -> tuple[int, str]:
    n = sum(p.numel() for p in model.parameters())
    return n, f"{n / 1e6:.3f}M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per window (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of every window (default 5)")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per step, both sides (default 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per side, interleaved (default 5)")
    parser.add_argument("--workers", type=int, default=None,
                        help="ours: DataLoader worker processes, data.num_workers (default: the config's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the training process, both sides (default 1, the steadiest on "
                             "a shared CPU; 0: torch's default, one per core)")
    parser.add_argument("--pool", type=int, default=8, help="plain: batches decoded into memory and cycled (default 8)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time our CLIPModel in the plain loop (model cost vs pipeline cost)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for ours, e.g. model.vision.depth=6")
    args = parser.parse_args()
    if min(args.steps, args.warmup, args.repeats, args.batch_size, args.pool) < 1:
        parser.error("--steps, --warmup, --repeats, --batch-size and --pool must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    # Lightning's per-Trainer banners (GPU/TPU available, tips) would repeat every window; the progress bar stays.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")  # no val loader

    with tempfile.TemporaryDirectory(prefix="vlm-bench-contrastive-") as output_root:
        config = load_config(args, output_root)
        pattern = synthetic.ensure_split("captions", "train", config.data.synthetic)
        ours = Ours(config, pattern)
        task = ours.build()
        ours_model = task.model

        pool = decode_pool(task, pattern, args.pool * args.batch_size)
        pixels, ids = pool["pixels"], pool["ids"]  # (P, 3, S, S), (P, L)
        clip_norm = config.trainer.gradient_clip_val or 0.0

        torch.manual_seed(0)
        reference = open_clip_model(ours_model)
        plain = PlainLoop(reference, open_clip_loss(config), open_clip_optimizer(reference, config),
                          reference.logit_scale, pixels, ids, args.batch_size, clip_norm)
        sides: dict[str, Callable[[int, int], float]] = {"ours": ours.window, "plain": plain.window}
        mirror = None
        if args.breakdown:
            mirror = CLIPModel(config.model)
            mirror.load_state_dict(ours_model.state_dict())
            mirror_loop = PlainLoop(mirror, build_contrastive_loss(config.model.clip),
                                    open_clip_optimizer(mirror, config), mirror.head.logit_scale, pixels, ids,
                                    args.batch_size, clip_norm)
            sides["ours-model"] = mirror_loop.window

        (n_ours, ours_params), (n_plain, plain_params) = millions(ours_model), millions(reference)
        first = {"ours": initial_loss(ours_model, task.loss_fn, pool, args.batch_size),
                 "plain": initial_loss(reference, plain.loss, pool, args.batch_size)}
        v, t = config.model.vision, config.model.text
        print(f"contrastive benchmark: batch {args.batch_size}, {args.steps} timed steps per window after "
              f"{args.warmup} warm-up steps, {args.repeats} interleaved repeats (+1 warm-up round)")
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; torch {torch.__version__} with "
              f"{threads} intra-op threads in the training process (both sides); ours: {config.data.num_workers} "
              f"DataLoader workers (1 thread each); lightning {pl.__version__}, open_clip {open_clip.__version__}")
        print(f"model: ViT {ours_model.visual.width}x{len(ours_model.visual.vit.blocks)} @ {v.image_size}px/"
              f"{v.patch_size}, text {t.width}x{t.layers} ctx {t.context_length}, embed {config.model.clip.embed_dim}")
        stem = "conv stem" if v.conv_stem else "patchify conv"
        print(f"params: ours {ours_params} (timm ViT with {stem} + open_clip text tower), plain {plain_params} "
              f"(open_clip's own ViT + the same text tower): {100 * (n_ours - n_plain) / n_plain:+.2f}%")
        print(f"loss on the first batch before training: ours {first['ours']:.3f}, plain {first['plain']:.3f} "
              f"(ln batch = {math.log(args.batch_size):.3f})")
        if not all(math.isfinite(v) for v in first.values()):
            sys.exit("a side has a non-finite initial loss; not timing it")
        print(f"plain is fed {len(pixels)} samples decoded once into memory by our decoder, cycled; gradient clipping "
              f"{clip_norm or 'off'} on every side; ours: no validation, no checkpoint in the window\n", flush=True)

        results: dict[str, list[float]] = {name: [] for name in sides}
        for repeat in range(args.repeats + 1):  # round 0 warms up every side and is not recorded
            names = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
            for name in names:
                rate = sides[name](args.warmup, args.steps if repeat else 1)
                if repeat:
                    results[name].append(rate)
                    print(f"repeat {repeat} {name:<10} {rate:8.1f} samples/s (load {os.getloadavg()[0]:.2f})",
                          file=sys.stderr, flush=True)

    medians = {name: statistics.median(rates) for name, rates in results.items()}
    base = medians["plain"]
    best = {name: max(rates) for name, rates in results.items()}
    print(f"\n{'side':<11} {'median samples/s':>16} {'vs plain':>9} {'best':>8} {'vs plain':>9}   per repeat")
    print("-" * 90)
    for name, rates in results.items():
        per = ", ".join(f"{r:.1f}" for r in rates)
        print(f"{name:<11} {medians[name]:16.1f} {medians[name] / base:8.3f}x {best[name]:8.1f} "
              f"{best[name] / best['plain']:8.3f}x   {per}")
    ratio = medians["ours"] / base
    spread = [o / p for o, p in zip(results["ours"], results["plain"], strict=True)]
    print(f"\nratio ours/plain: {ratio:.3f}x of medians, {best['ours'] / best['plain']:.3f}x of bests; per repeat "
          f"(adjacent windows): {', '.join(f'{r:.3f}' for r in spread)}")
    if mirror is not None:
        model_part = medians["ours-model"] / base
        print(f"breakdown: our model in the plain loop {model_part:.3f}x plain; Lightning + data path on top of it "
              f"{medians['ours'] / medians['ours-model']:.3f}x")
    verdict = "meets" if ratio >= 0.95 else "misses"
    print(f"verdict: ours {verdict} the >= 0.95x goal ({ratio:.3f}x; load average now {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
