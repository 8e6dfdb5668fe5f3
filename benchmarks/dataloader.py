"""Benchmark: would data loading starve training? Loader images/s against the trainer's images/s, per preset.

Loader: webdataset shards written to a temporary folder -> vlm's train pipeline (`build_pipeline`: shard shuffle,
sample shuffle, tolerant decode) -> the contrastive stage's decode (`CaptionDecoder`: image bytes -> tiler -> one
S x S tile, caption -> CLIP token ids) -> `collate_captions`, through `make_loader` with 0, 1 and 2 DataLoader
workers (each DataLoader worker is one process, so workers scale with free CPU cores). Images/s is measured over a
second pass through the shards (worker start-up is left out; the pipeline filling up is counted).
Images in the shards:
- tiny: the synthetic shapes dataset's own images (64 x 64 PNG), what the tiny preset trains on by default;
- base: web-photo-like JPEGs (--image-size, default 512 x 384, quality 90), tiled to 224 x 224; JPEG draft decoding
  (tiler.draft) shrinks them in the DCT domain first, as in training.

Trainer: the preset's CLIPModel with random weights (base: ViT-B/16 at 224 px and the 12-layer, 512-wide text tower,
~150M parameters, timm/open_clip architectures built with pretrained=False) and the stage's loss: forward + backward
+ AdamW step at --train-batch (base defaults to 2: a few steps of a real-size model on a CPU take a minute), on
--device. Trainer images/s = batch size / median step time.

Verdict per preset: the loader's best rate (at most 2 workers here) against the trainer's rate, and the workers
that keep up (trainer images/s / one worker's images/s). A CPU trainer is slow, so on CPUs the answer is nearly always
"no"; the question that matters is a GPU's rate: run with --device cuda on a GPU machine, or pass --gpu-rate with a
rate you measured there, and the verdict says how many DataLoader workers (and free CPU cores) each GPU process needs.

Usage: python benchmarks/dataloader.py [--presets tiny,base] [--workers 0,1,2] [--images 1024] [--device cpu|cuda]
                                       [--train-batch N] [--train-steps 3] [--threads N] [--gpu-rate IMG_PER_S]
"""

from __future__ import annotations

import argparse
import io
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arguments import at_least  # noqa: E402  (benchmarks/, this script's folder)
from hydra import compose, initialize_config_dir  # noqa: E402

from vlm.cli import CONFIG_DIR  # noqa: E402
from vlm.config import TrainConfig, to_train_config  # noqa: E402
from vlm.data import synthetic  # noqa: E402
from vlm.data.captions import CaptionDecoder, collate_captions  # noqa: E402
from vlm.data.shards import build_pipeline, list_shards, make_loader  # noqa: E402
from vlm.models.clip import CLIPModel  # noqa: E402
from vlm.models.factory import make_tiler  # noqa: E402
from vlm.models.losses import build_contrastive_loss  # noqa: E402
from vlm.models.text import clip_tokenizer  # noqa: E402
from vlm.training.optim import build_optimizer  # noqa: E402

PRESETS = {  # preset -> (config overrides, image source, default trainer batch)
    "tiny": (["model=tiny"], "synthetic", None),
    "base": (["model=base", "model.vision.pretrained=false"], "photo", 2),
}


def compose_config(overrides: list[str]) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_train_config(compose("train", overrides=["stage=contrastive", *overrides]))


def write_shards(directory: Path, source: str, num: int, image_size: tuple[int, int], shards: int = 4) -> str:
    """`num` caption samples in `shards` shards: synthetic 64 px PNGs, or photo-like JPEGs of `image_size`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng, noise = random.Random(0), np.random.default_rng(0)
    samples = synthetic.caption_samples(num, seed=0, image_size=64)
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"shard-{shard:03d}.tar")) as sink:
            for _ in range(num // shards):
                sample = next(samples)
                if source == "photo":
                    # a rendered scene plus noise, so the JPEG carries photo-like entropy (and decode cost)
                    scene = synthetic.render(synthetic.random_spec(rng), rng, max(image_size)).resize(image_size)
                    pixels = np.asarray(scene, dtype=np.int16) + noise.integers(-24, 25, (*image_size[::-1], 3))
                    buffer = io.BytesIO()
                    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
                    sample = {"__key__": sample["__key__"], "jpg": buffer.getvalue(), "txt": sample["txt"],
                              "cls": sample["cls"]}
                sink.write(sample)
    return str(directory / f"shard-{{000..{shards - 1:03d}}}.tar")


def loader_rate(pattern: str, decode: CaptionDecoder, workers: int, batch_size: int) -> float:
    """Images/s out of the DataLoader over a whole second pass: the first pass starts the (persistent) workers, and
    timing from iter() to the end counts the pipeline filling up, not batches prefetched before the clock started."""
    pipeline = build_pipeline(list_shards(pattern), decode, train=True, shuffle_buffer=256, seed=0)
    loader = make_loader(pipeline, batch_size, workers, collate_captions, drop_last=False)
    for _ in loader:
        pass
    count, started = 0, time.perf_counter()
    for batch in loader:
        count += len(batch["ids"])
    elapsed = time.perf_counter() - started
    del loader  # stops persistent workers
    return count / elapsed


def trainer_rate(config: TrainConfig, batch_size: int, steps: int, device: str) -> tuple[float, float]:
    """(images/s, seconds per step) of forward + backward + AdamW on random inputs, after one warm-up step."""
    torch.manual_seed(0)
    model = CLIPModel(config.model).to(device)
    loss_fn = build_contrastive_loss(config.model.clip)
    optimizer = build_optimizer(model.parts(), config.stage)
    size = config.model.vision.image_size
    pixels = torch.randn(batch_size, 3, size, size, device=device)
    ids = torch.randint(1, 1000, (batch_size, config.model.text.context_length), device=device)
    times = []
    for step in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = loss_fn(**model(pixels, ids), output_dict=True)["contrastive_loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step pays for allocation and kernel selection
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return batch_size / seconds, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,base")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--images", type=at_least(1), default=1024, help="samples in the benchmark shards")
    parser.add_argument("--image-size", default="512x384", help="base: JPEG width x height")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-batch", type=at_least(1), default=None, help="default: stage batch (tiny), 2 (base)")
    parser.add_argument("--train-steps", type=at_least(1), default=3)
    parser.add_argument("--threads", type=at_least(1), default=torch.get_num_threads(),
                        help="torch threads for the trainer")
    parser.add_argument("--gpu-rate", type=float, default=None,
                        help="images/s one GPU process trains at, if known: prints the loader workers it needs")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    width, height = (int(v) for v in args.image_size.split("x"))

    rows, verdicts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            overrides, source, default_batch = PRESETS[preset]
            config = compose_config(overrides)
            pattern = write_shards(Path(tmp) / preset, source, args.images, (width, height))
            model_for_tiler = CLIPModel(config.model).visual  # the tiler needs the tower's size and normalisation
            decode = CaptionDecoder(make_tiler(config.tiler, model_for_tiler), clip_tokenizer(config.model.text))
            del model_for_tiler
            torch.set_num_threads(1)  # the loader is single-threaded per process, as in DataLoader workers
            rates = {w: loader_rate(pattern, decode, w, min(32, config.stage.batch_size)) for w in workers}
            torch.set_num_threads(args.threads)
            batch = args.train_batch or default_batch or config.stage.batch_size
            consumed, step_seconds = trainer_rate(config, batch, args.train_steps, args.device)
            per_worker = rates.get(1) or max(rates.values())
            for w, rate in rates.items():
                rows.append((preset, source, w, rate, consumed, batch, step_seconds))
            best_workers, best = max(rates.items(), key=lambda item: item[1])
            needed = math.ceil(consumed / per_worker)
            starve = best < consumed
            verdict = (f"{preset}: data loading {'WOULD' if starve else 'would not'} starve training on "
                       f"{args.device} here: loader {best:,.0f} img/s ({best_workers} workers) vs trainer "
                       f"{consumed:,.2f} img/s ({best / consumed:,.0f}x); {needed} worker(s) at {per_worker:,.0f} "
                       f"img/s each keep up")
            if args.gpu_rate:
                verdict += (f"; a GPU at {args.gpu_rate:,.0f} img/s needs {math.ceil(args.gpu_rate / per_worker)} "
                            f"workers (data.num_workers) and as many free CPU cores per GPU")
            verdicts.append(verdict)

    print(f"\n{'preset':<6} {'images':<10} {'workers':>7} {'loader img/s':>13} {'trainer img/s':>14} "
          f"{'batch':>5} {'s/step':>7} {'headroom':>9}")
    for preset, source, w, rate, consumed, batch, seconds in rows:
        print(f"{preset:<6} {source:<10} {w:>7} {rate:>13,.0f} {consumed:>14,.2f} {batch:>5} {seconds:>7.2f} "
              f"{rate / consumed:>8,.0f}x")
    print()
    for line in verdicts:
        print(line)


if __name__ == "__main__":
    main()
