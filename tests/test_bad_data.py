"""Bad data and numerical faults never stop a run by themselves: they are skipped, named and counted.

Every test here trains the real task through a real `pl.Trainer` (in this process, tiny model, a few steps):
corrupt, truncated and undecodable images, missing captions and malformed JSON are skipped and counted in
metrics.json; a skip rate over `data.max_skip_rate` stops the run with an error naming it; one non-finite loss skips
its step with a warning naming the step, and `trainer.max_nonfinite_steps` of them in a row stop the run.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import webdataset as wds
from images import shapes
from safetensors.torch import load_file
from tiny import tiny_config
from torch import nn
from tqdm import tqdm

from vlm.data import synthetic
from vlm.train import run
from vlm.training.health import NoTrainingBatch

COMMON = ["data.num_workers=0", "stage.warmup_steps=2", "trainer.val_check_interval=1000",
          "trainer.checkpoint_every_n_steps=1000", "trainer.log_every_n_steps=1"]



def train(config, *callbacks: pl.Callback) -> tuple[dict, Path]:
    """`python -m vlm.train` in this process, with extra callbacks: (metrics, run folder)."""
    metrics = run(config, callbacks)
    return metrics, Path(metrics["export"]).parent


# ---- shards with bad samples --------------------------------------------------------------------------------------

BAD_CAPTIONS = {  # key -> how the sample is broken
    "corrupt": lambda i: {"png": b"\x89PNG\r\n\x1a\n" + bytes(random.Random(i).getrandbits(8) for _ in range(200)),
                          "txt": "a red circle"},
    "truncated": lambda i: {"jpg": shapes(i, fmt="JPEG")[: len(shapes(i, fmt="JPEG")) // 2], "txt": "a blue square"},
    "undecodable": lambda i: {"webp": b"this is a caption, not an image", "txt": "a green cross"},
    "nocaption": lambda i: {"png": shapes(i)},
    "emptycaption": lambda i: {"png": shapes(i), "txt": "   "},
    "noimage": lambda i: {"txt": "a caption without its picture"},
    "twoimages": lambda i: {"png": shapes(i), "jpg": shapes(i + 1, fmt="JPEG"), "txt": "a red circle"},
}


def write_caption_shards(directory: Path, good_per_shard: int, bad_kinds: list[str], shards: int = 2) -> str:
    """`shards` shards of good caption samples with the bad ones spread through them, never last in a shard (a
    run that stops at its last good sample reads no further, so its counts are exact)."""
    directory.mkdir(parents=True, exist_ok=True)
    bad = list(enumerate(bad_kinds))
    for shard in range(shards):
        mine = bad[shard::shards]
        slots = sorted(random.Random(shard).sample(range(good_per_shard - 1), len(mine)))
        with wds.TarWriter(str(directory / f"shard-{shard:03d}.tar")) as sink:
            good = 0
            for position in range(good_per_shard):
                while mine and slots and slots[0] == position:
                    slots.pop(0)
                    index, kind = mine.pop(0)
                    sink.write({"__key__": f"bad-{kind}-{index:04d}", **BAD_CAPTIONS[kind](index)})
                key = f"s{shard}-{good:05d}"
                seed = shard * 100_000 + good
                spec = synthetic.random_spec(random.Random(seed))
                sink.write({"__key__": key, "png": shapes(seed), "txt": synthetic.caption(spec, random.Random(seed)),
                            "cls": str(spec.label)})
                good += 1
    return str(directory / f"shard-{{000..{shards - 1:03d}}}.tar")


def write_conversation_shards(directory: Path, good: int, shards: int = 2) -> tuple[str, list[str]]:
    """Conversation shards (`sft`) from the synthetic set, with malformed JSON, a missing conversation and a
    corrupt image spread through them (never last in a shard)."""
    directory.mkdir(parents=True, exist_ok=True)
    samples = list(synthetic.conversation_samples(good, seed=3, image_size=32))
    broken = [
        {"__key__": "bad-json", "json": b'{"conversations": [{"from": "human", "value": "<image>\\nHi"', "0.png":
            shapes(1)},
         {"__key__": "bad-noconv", "json": json.dumps({"type": "color"}), "0.png": shapes(2)},
         {"__key__": "bad-image", "json": samples[0]["json"], "0.png": b"\x89PNG\r\n\x1a\nnot really"},
         {"__key__": "bad-notdict", "json": b"[1, 2, 3]", "0.png": shapes(3)},
         {"__key__": "bad-notext", "0.png": shapes(4)},  # neither a conversation nor a caption
    ]
    per_shard = good // shards
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"shard-{shard:03d}.tar")) as sink:
            chunk = samples[shard * per_shard:(shard + 1) * per_shard]
            for i, sample in enumerate(chunk):
                if i in (1, 3, 5) and broken:
                    sink.write(broken.pop())
                sink.write({**sample, "__key__": f"s{shard}-{sample['__key__']}"})
    return str(directory / f"shard-{{000..{shards - 1:03d}}}.tar"), ["bad-json", "bad-noconv", "bad-image",
                                                                     "bad-notdict", "bad-notext"]


def _warnings_naming(caplog: pytest.LogCaptureFixture, key: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and key in r.getMessage()]


# ---- bad samples ----------------------------------------------------------------------------------------------

def test_bad_caption_samples_are_skipped_named_once_and_counted(tmp_path, caplog, monkeypatch):
    bad_kinds = list(BAD_CAPTIONS) + ["corrupt", "truncated"]  # 9 bad samples among 48 good
    pattern = write_caption_shards(tmp_path / "shards", good_per_shard=24, bad_kinds=bad_kinds)
    # one pass exactly: 48 good samples / batch 8 = 6 steps; shuffle_buffer=1 keeps the stream order fixed
    monkeypatch.chdir(tmp_path)  # output_root relative to the launch folder, as in the README
    config = tiny_config(*COMMON, f"data.train='{pattern}'", "stage.batch_size=8", "stage.max_steps=6",
                         "data.shuffle_buffer=1", "output_root=runs", "run_name=bad")
    with caplog.at_level(logging.WARNING):
        metrics, run_dir = train(config)
    assert metrics["export"] == str(tmp_path / "runs" / "contrastive" / "bad" / "export")  # usable from any folder
    assert metrics["global_step"] == 6
    assert metrics["samples_skipped"] == len(bad_kinds) and metrics["samples_seen"] == 48 + len(bad_kinds)
    assert json.loads((run_dir / "metrics.json").read_text())["samples_skipped"] == len(bad_kinds)
    for index, kind in enumerate(bad_kinds):
        named = _warnings_naming(caplog, f"bad-{kind}-{index:04d}")
        assert len(named) == 1, (kind, named)  # logged once, with its shard
        assert "shard-00" in named[0]


def test_bad_conversation_samples_are_skipped_in_sft(tmp_path, caplog):
    pattern, bad_keys = write_conversation_shards(tmp_path / "conv", good=16)
    config = tiny_config(*COMMON, f"data.train='{pattern}'", "stage.batch_size=4", "stage.max_steps=4",
                         "data.shuffle_buffer=1", "init_from=null", f"output_root={tmp_path / 'runs'}",
                         "run_name=sft", stage="sft")
    with caplog.at_level(logging.WARNING):
        metrics, _ = train(config)
    assert metrics["global_step"] == 4 and metrics["samples_skipped"] == len(bad_keys)
    for key in bad_keys:
        assert len(_warnings_naming(caplog, key)) == 1, key
    assert "malformed json" in _warnings_naming(caplog, "bad-json")[0]
    assert _warnings_naming(caplog, "bad-notext")[0].endswith("no 'json' field (a conversation) and no 'txt' field "
                                                              "(a caption)")
    image_warning = _warnings_naming(caplog, "bad-image")[0]
    assert image_warning.count("shard-00") == 1 and ".tar: image 0: not a" in image_warning, image_warning


@pytest.mark.parametrize("good", [0, 3])
def test_data_that_gives_no_batch_stops_the_run_instead_of_passing_over_it_forever(tmp_path, caplog, good):
    """Only bad samples, or fewer good ones than a batch: the first pass yields no batch, and the run stops there."""
    if good:
        pattern = write_caption_shards(tmp_path / "shards", good_per_shard=good, bad_kinds=["corrupt", "noimage"],
                                       shards=1)
    else:
        pattern = str(tmp_path / "bad.tar")
        with wds.TarWriter(pattern) as sink:
            for index, kind in enumerate(["corrupt", "noimage"]):
                sink.write({"__key__": f"bad-{kind}-{index:04d}", **BAD_CAPTIONS[kind](index)})
    config = tiny_config(*COMMON, f"data.train='{pattern}'", "stage.batch_size=8", "stage.max_steps=5",
                         f"output_root={tmp_path / 'runs'}", "run_name=empty")
    with caplog.at_level(logging.WARNING), pytest.raises(NoTrainingBatch, match=r"gave no training batch in a whole "
                                                                                r"pass.*stage.batch_size=8"):
        train(config)
    assert len(_warnings_naming(caplog, "bad-corrupt-0000")) == 1  # one pass, one warning per bad sample


@pytest.mark.slow
def test_skip_rate_over_the_threshold_stops_the_run_naming_it(tmp_path):
    # 1 sample in 5 is bad (20%, over the default 5%); the check starts once 500 samples were read
    pattern = write_caption_shards(tmp_path / "shards", good_per_shard=240,
                                   bad_kinds=["corrupt", "nocaption", "truncated"] * 40)
    config = tiny_config(*COMMON, f"data.train='{pattern}'", "stage.batch_size=16", "stage.max_steps=100",
                         f"output_root={tmp_path / 'runs'}", "run_name=rate")
    assert config.data.max_skip_rate == 0.05
    with pytest.raises(RuntimeError, match=r"samples \(\d+\.\d%\) could not be decoded, more than "
                                           r"data.max_skip_rate=0.05"):
        train(config)
    # the stopped run closed its progress bar: an open one would redraw itself above whatever is printed next
    assert not [bar for bar in list(tqdm._instances) if "train" in str(bar.desc)]
    lenient = tiny_config(*COMMON, f"data.train='{pattern}'", "stage.batch_size=16", "stage.max_steps=30",
                          "data.max_skip_rate=0.3", f"output_root={tmp_path / 'runs'}", "run_name=lenient")
    metrics, _ = train(lenient)
    assert metrics["global_step"] == 30 and metrics["samples_skipped"] > 0



@pytest.mark.slow
def test_a_worker_whose_shard_holds_nothing_usable_still_counts_towards_the_skip_rate(tmp_path):
    """Two DataLoader workers, one shard each: one shard good, the other wholly bad. That worker never yields a
    sample, and its skips must still stop the run (a third of the samples read are bad)."""
    write_caption_shards(tmp_path / "shards", good_per_shard=240, bad_kinds=[], shards=1)
    with wds.TarWriter(str(tmp_path / "shards" / "shard-001.tar")) as sink:
        for index in range(120):
            sink.write({"__key__": f"bad-nocaption-{index:04d}", **BAD_CAPTIONS["nocaption"](index)})
    config = tiny_config(*COMMON, f"data.train='{tmp_path / 'shards' / 'shard-{000..001}.tar'}'", "data.num_workers=2",
                         "stage.batch_size=16", "stage.max_steps=60", f"output_root={tmp_path / 'runs'}")
    with pytest.raises(RuntimeError, match=r"samples \(\d+\.\d%\) could not be decoded, more than "
                                           r"data.max_skip_rate=0.05"):
        train(config)

# ---- non-finite losses ----------------------------------------------------------------------------------------

class PoisonedLoss(nn.Module):
    """The task's real loss, made NaN on the chosen global steps."""

    def __init__(self, loss: nn.Module, trainer: pl.Trainer, steps: set[int]):
        super().__init__()
        self.loss, self.trainer, self.steps = loss, trainer, steps

    def forward(self, **outputs) -> dict[str, torch.Tensor]:
        losses = self.loss(**outputs)
        if self.trainer.global_step in self.steps:
            return {k: v * float("nan") for k, v in losses.items()}
        return losses


class PoisonAndWatch(pl.Callback):
    """Injects NaN losses (after the task's own setup built its loss) and records which steps changed the weights."""

    def __init__(self, steps: set[int]):
        self.steps = steps
        self.changed: dict[int, bool] = {}
        self.schedule_steps: dict[int, int] = {}  # the LR schedule's position after each step
        self._before: list[torch.Tensor] = []

    def on_fit_start(self, trainer: pl.Trainer, task: pl.LightningModule) -> None:
        task.loss_fn = PoisonedLoss(task.loss_fn, trainer, self.steps)

    def on_train_batch_start(self, trainer: pl.Trainer, task: pl.LightningModule, *_) -> None:
        self._before = [p.detach().clone() for p in task.parameters() if p.requires_grad]
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, task: pl.LightningModule, *_) -> None:
        after = [p.detach() for p in task.parameters() if p.requires_grad]
        self.changed[self._step] = any(not torch.equal(a, b) for a, b in zip(self._before, after, strict=True))
        self.schedule_steps[self._step] = trainer.lr_scheduler_configs[0].scheduler.last_epoch



def test_one_nonfinite_loss_skips_its_step_with_a_warning(tmp_path, caplog, small_synthetic):
    config = tiny_config(*COMMON, *small_synthetic, "stage.batch_size=8", "stage.max_steps=6",
                         f"output_root={tmp_path}", "run_name=nan")
    watch = PoisonAndWatch({3})
    with caplog.at_level(logging.WARNING):
        metrics, run_dir = train(config, watch)
    assert metrics["global_step"] == 6  # the run completes
    assert _warnings_naming(caplog, "non-finite loss at step 3")
    assert watch.changed == {0: True, 1: True, 2: True, 3: False, 4: True, 5: True}  # step 3 left the weights alone
    assert watch.schedule_steps == {0: 1, 1: 2, 2: 3, 3: 3, 4: 4, 5: 5}  # and the learning-rate schedule
    assert all(torch.isfinite(w).all() for w in load_file(run_dir / "export" / "model.safetensors").values())


def test_nonfinite_losses_in_a_row_stop_the_run_naming_the_step(tmp_path, small_synthetic):
    config = tiny_config(*COMMON, *small_synthetic, "stage.batch_size=8", "stage.max_steps=10",
                         "trainer.max_nonfinite_steps=3", f"output_root={tmp_path}", "run_name=nan")
    with pytest.raises(FloatingPointError, match=r"3 non-finite losses in a row, the last at step 4"):
        train(config, PoisonAndWatch({2, 3, 4}))
