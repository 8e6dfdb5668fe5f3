"""Resume after a crash: atomic checkpoints, `resume=auto` from the newest loadable one, and no silent overwrites.

(a) a training subprocess killed with SIGTERM mid-run exits 143, continues from its last checkpoint and completes;
(b) a truncated newest checkpoint is passed over, with a warning naming it, for the one before;
(c) a run_name that already holds a run, without resume=auto, stops with exit code 2 naming the folder.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_bad_data import COMMON, train
from tiny import TINY, make_task, tiny_config

from vlm.config import ConfigError
from vlm.training.checkpoint_io import AtomicCheckpointIO
from vlm.training.data_position import DataPosition
from vlm.training.resume import (
    CheckpointUnreadable,
    RunRecord,
    checkpoint_step,
    find_resume_checkpoint,
    remove_partial_writes,
)
from vlm.training.runs import INIT_ENV, PARENT_ENV, RESUME_ENV, RUN_DIR_ENV, prepare_run

ROOT = Path(__file__).resolve().parent.parent




def _step(path: Path) -> int:
    return int(re.search(r"step(\d+)", path.name).group(1))


def _logged_steps(run_dir: Path) -> list[int]:
    """The steps of the training-loss rows in a run's metrics.csv, in file order."""
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/contrastive_loss")]


# ---- atomic writes ----------------------------------------------------------------------------------------------

class _Explodes:
    def __reduce__(self):
        raise RuntimeError("disk full, say")


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "step00000010.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 10}, target)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 20, "x": _Explodes()}, target)
    assert torch.equal(torch.load(target)["state_dict"]["w"], torch.ones(3))  # the old one, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["step00000010.ckpt"]


@pytest.mark.slow
def test_a_writer_killed_mid_save_never_leaves_a_checkpoint_that_resume_picks(tmp_path, caplog):
    io = AtomicCheckpointIO()
    good = tmp_path / "checkpoints" / "step00000010.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 10}, good)
    # the child dies at the worst moment: every byte written, the rename not yet done
    script = ("import os, signal, torch; from vlm.training.checkpoint_io import AtomicCheckpointIO; "
              "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL); "
              "AtomicCheckpointIO().save_checkpoint({'state_dict': {'w': torch.zeros(1 << 20)}, 'global_step': 20}, "
              f"{str(tmp_path / 'checkpoints' / 'step00000020.ckpt')!r})")
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    leftovers = list((tmp_path / "checkpoints").glob(".step00000020.ckpt.tmp-*"))
    assert leftovers and leftovers[0].stat().st_size > 1 << 20  # 4 MB written, under a hidden name
    assert find_resume_checkpoint(tmp_path) == good
    staging = tmp_path / ".export.0123abcd.partial"  # an export whose writer was killed
    (staging / "tokenizer").mkdir(parents=True)
    with caplog.at_level(logging.INFO):
        remove_partial_writes(tmp_path)
    assert not leftovers[0].exists() and "step00000020.ckpt.tmp" in caplog.text
    assert not staging.exists() and good.exists()


# ---- (b) a truncated checkpoint, and everything a checkpoint restores -----------------------------------------

class Observe(pl.Callback):
    """Records the state training (re)starts from."""

    def on_train_start(self, trainer: pl.Trainer, task: pl.LightningModule) -> None:
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        optimizer = trainer.optimizers[0]
        self.start = {"step": trainer.global_step, "epoch": trainer.current_epoch,
                      "scheduler_step": scheduler.last_epoch, "lr": optimizer.param_groups[0]["lr"],
                      "adam_steps": {float(s["step"]) for s in optimizer.state.values()},
                      "weights": {k: v.detach().clone() for k, v in task.state_dict().items()},
                      "data_seed": trainer.datamodule.seed, "samples_seen": task.health.seen}


@pytest.mark.slow
def test_resume_falls_back_past_a_truncated_checkpoint_and_restores_everything(tmp_path, small_synthetic, caplog):
    # 64 samples / batch 8 = 8 batches an epoch; checkpoints at steps 4, 8, 12; step 12 is 4 batches into epoch 1
    args = [*COMMON, *small_synthetic, "stage.batch_size=8", "stage.max_steps=12", "trainer.checkpoint_every_n_steps=4",
            f"output_root={tmp_path}", "run_name=r"]
    train(tiny_config(*args))
    checkpoints = tmp_path / "contrastive" / "r" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == [f"step{s:08d}.ckpt" for s in (4, 8, 12)]
    newest = checkpoints / "step00000012.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # e.g. copied half-way, or a full disk

    resumed = tiny_config(*args, "resume=auto")
    with caplog.at_level(logging.WARNING):
        run = prepare_run(resumed)
    assert run.resume_from == checkpoints / "step00000008.ckpt"
    assert any("step00000012.ckpt" in r.getMessage() and "cannot be loaded" in r.getMessage() for r in caplog.records)

    saved = torch.load(run.resume_from, weights_only=False)
    assert 0 < saved[DataPosition.KEY]["wall_seconds"] < 600
    saved[DataPosition.KEY]["wall_seconds"] = 1000.0  # as if the sessions up to step 8 had taken that long
    torch.save(saved, run.resume_from)
    observe = Observe()
    metrics, _ = train(resumed, observe)
    start = observe.start
    assert start["step"] == 8 and metrics["global_step"] == 12  # continued from step 8, not 0, and completed
    assert start["scheduler_step"] == 8 and start["lr"] == pytest.approx(saved["optimizer_states"][0]
                                                                         ["param_groups"][0]["lr"])
    assert start["adam_steps"] == {8.0}
    assert all(torch.equal(start["weights"][k], v) for k, v in saved["state_dict"].items())
    # the step-8 save was on epoch 0's last batch, so the run resumes into epoch 1 with the shard order an
    # uninterrupted run uses there (seed + 1); and the sample counts carry on
    assert start["epoch"] == 1 and start["data_seed"] == 0 + 1 and start["samples_seen"] == 64
    assert metrics["samples_seen"] == 12 * 8
    assert 1000 < metrics["wall_seconds"] < 1600  # the whole run's wall time: the earlier sessions' and this one's
    assert (checkpoints / "step00000012.ckpt.corrupt").is_file()  # set aside for a post-mortem
    assert find_resume_checkpoint(checkpoints.parent) == newest  # rewritten whole by the resumed run
    assert _logged_steps(checkpoints.parent) == list(range(12))  # metrics.csv runs on: 0-7, then 8-11 after resume


class RandomDraws(pl.Callback):
    """The torch generator's state as each training step starts, by global step."""

    def __init__(self) -> None:
        self.states: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        self.states[trainer.global_step] = torch.get_rng_state()


@pytest.mark.slow
def test_a_resumed_run_draws_what_the_interrupted_one_would_have_drawn_next(tmp_path, small_synthetic):
    """Dropout masks come from torch's generator: a resume must go on with its stream, not seed it afresh and replay
    step 0's masks. The step-8 save ends epoch 0 (64 samples, batch 8), so both runs open epoch 1's reader alike."""
    args = [*COMMON, *small_synthetic, "stage.batch_size=8", "trainer.checkpoint_every_n_steps=8",
            f"output_root={tmp_path}", "run_name=r"]
    whole = RandomDraws()
    train(tiny_config(*args, "stage.max_steps=10"), whole)
    (tmp_path / "contrastive/r/checkpoints/step00000010.ckpt").unlink()  # as if killed after step 8's save
    resumed = RandomDraws()
    train(tiny_config(*args, "stage.max_steps=10", "resume=auto"), resumed)
    assert sorted(resumed.states) == [8, 9]
    assert torch.equal(resumed.states[8], whole.states[8])
    assert not torch.equal(resumed.states[8], whole.states[0])


def _positions(checkpoints: Path) -> dict[int, tuple[int, int]]:
    """(epoch, batches into it) that each checkpoint of a run records, by step."""
    positions = {_step(p): torch.load(p, weights_only=False)[DataPosition.KEY] for p in checkpoints.glob("*.ckpt")}
    return {step: (position["epoch"], position["batches_in_epoch"]) for step, position in positions.items()}


@pytest.mark.slow
def test_every_checkpoint_records_the_epoch_and_batch_it_was_taken_at(tmp_path, small_synthetic):
    """64 samples / batch 8: 8 batches an epoch. Step 16 ends epoch 1, and the run's final save (after fit) must say
    epoch 2 from its start, as a save on the last batch does. A mid-epoch resume restarts its epoch's pass, and the
    count of batches into the epoch restarts with it."""
    args = [*COMMON, *small_synthetic, "stage.batch_size=8", "trainer.checkpoint_every_n_steps=5",
            f"output_root={tmp_path}", "run_name=p"]
    train(tiny_config(*args, "stage.max_steps=16"))
    checkpoints = tmp_path / "contrastive/p/checkpoints"
    assert _positions(checkpoints) == {10: (1, 2), 15: (1, 7), 16: (2, 0)}
    for later in (15, 16):
        (checkpoints / f"step{later:08d}.ckpt").unlink()
    train(tiny_config(*args, "stage.max_steps=22", "resume=auto"))  # from step 10: epoch 1's pass again, 8 batches
    assert _positions(checkpoints) == {15: (1, 5), 20: (2, 2), 22: (2, 4)}


class FirstStepRates(pl.Callback):
    """Each param group's learning rate, betas and weight decay as the first step after a (re)start takes them."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if not hasattr(self, "groups"):
            self.groups = [(g["lr"], g["betas"], g["weight_decay"]) for g in trainer.optimizers[0].param_groups]


@pytest.mark.slow
def test_a_resume_with_another_learning_rate_trains_with_it(tmp_path, small_synthetic):
    """The optimizer's groups and the schedule's peak come back from the checkpoint; the new stage.* values must win,
    as the resume's warning and the run's config.json say."""
    args = [*COMMON, *small_synthetic, "stage.batch_size=8", "stage.warmup_steps=4",
            "trainer.checkpoint_every_n_steps=2", f"output_root={tmp_path}", "run_name=r"]
    train(tiny_config(*args, "stage.max_steps=2"))
    rates = FirstStepRates()
    train(tiny_config(*args, "stage.max_steps=4", "stage.lr=5e-4", "stage.weight_decay=0.2", "stage.betas=[0.8,0.9]",
                      "resume=auto"), rates)
    # step 2 of a 4-step warmup: 3/4 of the new peak, in every group (this stage trains one part at one rate)
    assert [lr for lr, _, _ in rates.groups] == pytest.approx([5e-4 * 3 / 4] * len(rates.groups))
    assert {betas for _, betas, _ in rates.groups} == {(0.8, 0.9)}
    assert {decay for _, _, decay in rates.groups} == {0.2, 0.0}  # weight decay only where the groups decay


@pytest.mark.slow
def test_a_mid_epoch_resume_reseeds_the_shard_order(tmp_path, small_synthetic):
    args = [*COMMON, *small_synthetic, "stage.batch_size=8", "stage.max_steps=6", "trainer.checkpoint_every_n_steps=3",
            f"output_root={tmp_path}", "run_name=m"]
    train(tiny_config(*args))
    (tmp_path / "contrastive/m/checkpoints/step00000006.ckpt").unlink()  # as if killed between steps 3 and 6
    observe = Observe()
    train(tiny_config(*args, "resume=auto", "stage.max_steps=12"), observe)
    assert observe.start["step"] == 3 and observe.start["epoch"] == 0
    # not a replay of any plain epoch's order (seed + k, the k-th pass through the shards)
    assert observe.start["data_seed"] not in range(0, 2**20)
    # the checkpoint it resumed from is pruned like the others (Lightning alone would keep it for good)
    checkpoints = sorted(p.name for p in (tmp_path / "contrastive/m/checkpoints").glob("*.ckpt"))
    assert checkpoints == [f"step{s:08d}.ckpt" for s in (6, 9, 12)]
    # a resume past the run's end is refused: it would only validate and overwrite the export
    with pytest.raises(ConfigError, match=r"step00000012.ckpt' is at step 12, past stage.max_steps=4: there is "
                                          r"nothing left to train"):
        train(tiny_config(*args, "resume=auto", "stage.max_steps=4"))


# ---- run folders --------------------------------------------------------------------------------------------

@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
def test_resume_auto_picks_the_newest_run_of_the_stage_and_never_reuses_a_folder_silently(tmp_path):
    for name in ("old", "new"):
        (tmp_path / "contrastive" / name / "checkpoints").mkdir(parents=True)
        time.sleep(0.02)
    assert prepare_run(tiny_config(f"output_root={tmp_path}", "resume=auto")).dir.name == "new"
    (tmp_path / "contrastive" / "old" / "eval").mkdir()  # vlm.eval of the older run: not a sign of training
    assert prepare_run(tiny_config(f"output_root={tmp_path}", "resume=auto")).dir.name == "new"
    (tmp_path / "contrastive" / "2020").mkdir()
    (tmp_path / "contrastive" / "2020" / "metrics.json").write_text("{}")
    (tmp_path / "contrastive" / "old" / "checkpoints" / "step00000003.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"run folder '.*old' already holds a run; pass resume=auto"):
        prepare_run(tiny_config(f"output_root={tmp_path}", "run_name=old"))
    # logs without a checkpoint (a run stopped by bad data at step 40): nothing to continue, so the message says so
    (tmp_path / "contrastive" / "early" / "logs").mkdir(parents=True)
    (tmp_path / "contrastive" / "early" / "logs" / "metrics.csv").write_text("step,train/loss\n")
    with pytest.raises(ConfigError, match=r"'.*early' already holds a run with no checkpoint yet: one still starting "
                                          r"or training, or one that stopped before its first checkpoint \(its logs "
                                          r"are there\); pass resume=auto to start a stopped one again"):
        prepare_run(tiny_config(f"output_root={tmp_path}", "run_name=early"))
    # a finished run: resume=auto goes on only with a checkpoint and more steps, so the message says what will work
    from vlm.exports.format import REQUIRED

    (tmp_path / "contrastive" / "old" / "export").mkdir()
    for name in REQUIRED:
        (tmp_path / "contrastive" / "old" / "export" / name).write_text("{}")
    with pytest.raises(ConfigError, match=r"holds a finished run \(its export is complete\); pass resume=auto with a "
                                          r"higher stage.max_steps"):
        prepare_run(tiny_config(f"output_root={tmp_path}", "run_name=old"))
    (tmp_path / "contrastive" / "old" / "checkpoints" / "step00000003.ckpt").unlink()
    with pytest.raises(ConfigError, match=r"with no checkpoint to continue from; choose another run_name, or delete"):
        prepare_run(tiny_config(f"output_root={tmp_path}", "run_name=old"))
    unnamed = prepare_run(tiny_config(f"output_root={tmp_path}"))
    assert unnamed.dir.name not in ("old", "new", "2020") and unnamed.dir.is_dir()
    # a start that failed before writing anything (bad data, a missing logger package) leaves empty folders only
    (tmp_path / "contrastive" / "failed" / "logs").mkdir(parents=True)
    assert prepare_run(tiny_config(f"output_root={tmp_path}", "run_name=failed")).dir.name == "failed"


def test_resume_auto_of_a_run_that_finished_without_a_checkpoint_is_refused(tmp_path, tiny_sft_export):
    import shutil

    shutil.copytree(tiny_sft_export, tmp_path / "contrastive" / "short" / "export")  # a finished run, 3 steps long
    with pytest.raises(ConfigError, match=r"'.*short' is a finished run \(its export is complete\) with no "
                                          r"checkpoint to continue from"):
        prepare_run(tiny_config(f"output_root={tmp_path}", "run_name=short", "resume=auto"))
    assert sorted(p.name for p in (tmp_path / "contrastive" / "short").iterdir()) == ["export"]


def test_an_unreadable_checkpoint_named_by_resume_is_one_clear_error(tmp_path):
    broken = tmp_path / "contrastive" / "r" / "checkpoints" / "step00000003.ckpt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ConfigError, match=r"resume='.*step00000003.ckpt' cannot be loaded \(.*\); name an earlier"):
        prepare_run(tiny_config(f"output_root={tmp_path}", f"resume={broken}"))
    for folder in (broken.parent, broken.parent.parent):  # the checkpoints folder, or the run's
        with pytest.raises(ConfigError, match=r"resume='.*' is a folder; pass one of its .ckpt files \(the newest "
                                              r"there: '.*step00000003.ckpt'\), or resume=auto"):
            prepare_run(tiny_config(f"output_root={tmp_path}", f"resume={folder}"))
    torch.save({"state_dict": {}, "global_step": 2}, broken.parent / "step00000002.ckpt")  # the furthest that loads
    with pytest.raises(ConfigError, match=r"\(the newest there: '.*step00000002.ckpt'\)"):
        prepare_run(tiny_config(f"output_root={tmp_path}", f"resume={broken.parent}"))


def test_a_checkpoint_of_another_stage_is_refused_before_its_run_is_touched(tmp_path):
    run_dir = tmp_path / "contrastive" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "metrics.csv").write_text("step,train/loss\n1,2.0\n2,1.5\n")
    checkpoint = run_dir / "checkpoints" / "step00000002.ckpt"
    written = {"state_dict": {}, "global_step": 2}
    RunRecord(None).on_save_checkpoint(None, make_task(tiny_config()), written)  # as a contrastive run saves
    torch.save(written, checkpoint)
    for where in (checkpoint, tmp_path / "elsewhere.ckpt"):  # the stage is recorded in it, wherever it is
        where.write_bytes(checkpoint.read_bytes())
        with pytest.raises(ConfigError, match=r"is a checkpoint of the contrastive stage, and this run is stage=sft; "
                                              r"pass stage=contrastive to continue it"):
            prepare_run(tiny_config(f"output_root={tmp_path}", f"resume={where}", stage="sft"))
    old = tmp_path / "align" / "o" / "checkpoints" / "step00000001.ckpt"  # written before the stage was recorded
    old.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 1}, old)
    with pytest.raises(ConfigError, match="is a checkpoint of the align stage"):
        prepare_run(tiny_config(f"output_root={tmp_path}", f"resume={old}", stage="sft"))
    assert (run_dir / "logs" / "metrics.csv").read_text() == "step,train/loss\n1,2.0\n2,1.5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["align", "contrastive", "elsewhere.ckpt"]  # no sft folder


def test_resume_auto_takes_the_furthest_step_whatever_the_files_times(tmp_path):
    """A copy, rsync or download resets modification times; the step each checkpoint records decides."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step, age in ((10, 30), (20, 0), (30, 20)):  # step 20 looks newest, as after `cp -r`
        path = folder / f"step{step:08d}.ckpt"
        torch.save({"state_dict": {}, "global_step": step}, path)
        os.utime(path, ns=(time.time_ns() - age * 10**9,) * 2)
    assert find_resume_checkpoint(tmp_path).name == "step00000030.ckpt"
    (folder / "step00000040.ckpt").write_bytes(b"cut short")  # unreadable: named and set aside first
    assert find_resume_checkpoint(tmp_path).name == "step00000030.ckpt"
    assert (folder / "step00000040.ckpt.corrupt").exists()


def test_a_resume_reads_its_checkpoint_once(tmp_path, monkeypatch):
    """Whether it loads, its stage, the export it started from and its step: one read of the file for all four."""
    checkpoint = tmp_path / "contrastive" / "r" / "checkpoints" / "step00000002.ckpt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 2, "init_from": None, "vlm_stage": "contrastive"}, checkpoint)
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda path, *args, **kwargs: reads.append(path) or load(path, *args, **kwargs))
    run = prepare_run(tiny_config(f"output_root={tmp_path}", f"resume={checkpoint}"))
    assert run.resume_from == checkpoint and checkpoint_step(checkpoint) == 2
    assert len(reads) == 1


def test_a_resumed_run_is_built_from_the_export_its_checkpoint_records(tmp_path, tiny_sft_export):
    run_dir = tmp_path / "sft" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    checkpoint = run_dir / "checkpoints" / "step00000002.ckpt"
    torch.save({"state_dict": {}, "global_step": 2, "init_from": str(tiny_sft_export)}, checkpoint)
    config = tiny_config(f"output_root={tmp_path}", "run_name=r", "resume=auto", "init_from=null", stage="sft")
    assert prepare_run(config).init_from == tiny_sft_export  # not what the command line says
    torch.save({"state_dict": {}, "global_step": 2, "init_from": str(tmp_path / "moved")}, checkpoint)
    with pytest.raises(ConfigError, match=r"needs the export its run started from, '.*moved', which is gone"):
        prepare_run(config)


def test_ranks_launched_by_lightning_use_rank_zero_folder_and_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "chosen"))
    monkeypatch.setenv(RESUME_ENV, str(tmp_path / "chosen" / "checkpoints" / "step00000004.ckpt"))
    monkeypatch.setenv(INIT_ENV, str(tmp_path / "sft" / "export"))
    monkeypatch.setenv(PARENT_ENV, str(os.getppid()))  # as in a process that rank 0 started...
    monkeypatch.setenv("LOCAL_RANK", "1")  # ...as Lightning's launcher starts rank 1
    run = prepare_run(tiny_config(f"output_root={tmp_path}", "run_name=other", "init_from=null", stage="sft"))
    assert run.dir == tmp_path / "chosen" and run.resume_from.name == "step00000004.ckpt"
    assert run.init_from == tmp_path / "sft" / "export"
    monkeypatch.delenv("LOCAL_RANK")  # a plain child of a process that trained in-process: its own choice
    assert prepare_run(tiny_config(f"output_root={tmp_path}", "run_name=other")).dir.name == "other"
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(PARENT_ENV, "1")  # inherited from further up: ignored
    assert prepare_run(tiny_config(f"output_root={tmp_path}", "run_name=other2")).dir.name == "other2"


@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
def test_externally_launched_ranks_agree_on_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(PARENT_ENV, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert prepare_run(tiny_config(f"output_root={tmp_path}")).dir.name == "slurm-4242"
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert prepare_run(tiny_config(f"output_root={tmp_path}", "resume=auto")).dir.name == "torchrun-job7"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="one of 4 ranks .* pass run_name=NAME"):
        prepare_run(tiny_config(f"output_root={tmp_path}"))
    assert prepare_run(tiny_config(f"output_root={tmp_path}", "run_name=x")).dir.name == "x"


@pytest.mark.parametrize("run_name", [None, "x"], ids=["timestamped", "named"])
def test_two_runs_started_at_the_same_moment_never_share_a_run_folder(tmp_path, monkeypatch, run_name):
    """Both runs find the folder free (the same second's timestamp, or one run_name) before either writes to it:
    the first to claim it gets it; the other takes a suffixed folder, or, named, is refused."""
    import threading

    import vlm.training.runs as runs

    monkeypatch.setattr(runs.time, "strftime", lambda pattern: "20261207-160219")  # one second for both
    both_checked = threading.Barrier(2, timeout=30)
    real_start = runs._start

    def start_together(*args):  # called after the folder check and before the folder is made
        both_checked.wait()
        return real_start(*args)

    monkeypatch.setattr(runs, "_start", start_together)
    config = tiny_config(f"output_root={tmp_path}", f"run_name={run_name or 'null'}")  # Hydra composes one at a time
    outcomes: list = []

    def start_a_run() -> None:
        try:
            outcomes.append(prepare_run(config).dir)
        except ConfigError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=start_a_run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    folders = [o for o in outcomes if isinstance(o, Path)]
    if run_name is None:
        assert len(set(folders)) == 2 and {f.parent for f in folders} == {tmp_path / "contrastive"}
        assert sorted(f.name for f in folders)[0] == "20261207-160219"
    else:
        (refused,) = [o for o in outcomes if isinstance(o, ConfigError)]
        assert folders == [tmp_path / "contrastive" / "x"]
        assert "was taken by another run started at the same time; choose another run_name" in str(refused)


def test_the_other_nodes_of_a_launched_run_take_the_folder_the_first_node_claimed(tmp_path, monkeypatch):
    """Lightning's multi-node launch starts each node's process on its own (NODE_RANK): the first claims the named
    folder, and the others, finding it claimed, join it rather than refuse it as another run's."""
    first = prepare_run(tiny_config(f"output_root={tmp_path}", "run_name=nodes")).dir
    monkeypatch.setenv("NODE_RANK", "1")
    assert prepare_run(tiny_config(f"output_root={tmp_path}", "run_name=nodes")).dir == first


# ---- (a) and (c): the real command line ----------------------------------------------------------------------

def _command(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlm.train", *TINY, *COMMON, "data.synthetic.num_train=64",
            "data.synthetic.num_val=16", "data.synthetic.samples_per_shard=32",
            f"data.synthetic.cache_dir={tmp_path / 'synthetic'}", "stage.batch_size=8",
            f"output_root={tmp_path / 'runs'}", "run_name=crash", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_ctrl_c_mid_run_exits_130_and_says_where_resume_auto_goes_on(tmp_path):
    checkpoints = tmp_path / "runs" / "contrastive" / "crash" / "checkpoints"
    with open(tmp_path / "first.log", "w") as log:  # SIGINT as the default: a background job's children ignore it
        first = subprocess.Popen(_command(tmp_path, "stage.max_steps=400", "trainer.checkpoint_every_n_steps=5"),
                                 cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 240
        while not any(checkpoints.glob("*.ckpt")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 4 minutes"
            time.sleep(0.02)
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
    output = (tmp_path / "first.log").read_text()
    assert first.returncode == 130, output[-3000:]  # 128 + SIGINT: not 1, as if the run had failed
    assert "stopped by Ctrl-C at step" in output and f"resume=auto continues from the newest checkpoint in " \
        f"{checkpoints}" in output, output[-3000:]


@pytest.mark.slow
def test_sigterm_mid_run_fails_and_resume_auto_continues_from_the_last_checkpoint(tmp_path):
    args = ["stage.max_steps=60", "trainer.checkpoint_every_n_steps=10"]
    checkpoints = tmp_path / "runs" / "contrastive" / "crash" / "checkpoints"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(_command(tmp_path, *args), cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not any(_step(p) >= 20 for p in checkpoints.glob("*.ckpt")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint at step 20 within 4 minutes"
            time.sleep(0.02)
        first.send_signal(signal.SIGTERM)  # a scheduler's kill (SIGKILL mid-save: test_a_writer_killed_mid_save...)
        first.wait(timeout=60)
    assert first.returncode == 143, (tmp_path / "first.log").read_text()[-3000:]  # not 0: the job did not finish
    assert "stopped by SIGTERM at step" in (tmp_path / "first.log").read_text()
    last = find_resume_checkpoint(checkpoints.parent)
    assert last is not None and 20 <= _step(last) < 60, "the run was not killed mid-way"

    second = subprocess.run(_command(tmp_path, *args, "resume=auto"), cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=300)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert f"continuing {checkpoints.parent} from {last.name}" in output
    metrics = json.loads((checkpoints.parent / "metrics.json").read_text())
    assert metrics["global_step"] == 60
    # metrics.csv: the killed process may not have flushed its rows (Lightning writes them every 100 steps); the
    # resumed one logged from the checkpoint's step on, not from 0, and no step twice
    steps = _logged_steps(checkpoints.parent)
    assert steps == sorted(set(steps)) and steps[-1] == 59 and _step(last) in steps
    assert steps[steps.index(_step(last)):] == list(range(_step(last), 60))


@pytest.mark.slow
class StopInFinalValidation(pl.Callback):
    """A scheduler's SIGTERM, or the user's Ctrl-C, while the run's last validation reads the held-out set, after
    training ended."""

    def __init__(self, by: str):
        self.by = by

    def on_validation_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.state.fn != "validate":  # the final pass, not the ones during fit
            return
        if self.by == "Ctrl-C":
            raise KeyboardInterrupt
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "Lightning handles no SIGTERM here"
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("by,code", [("SIGTERM", 143), ("Ctrl-C", 130)])
def test_a_stop_in_the_final_validation_ends_the_run_before_its_export(tmp_path, small_synthetic, caplog, by, code):
    args = [*COMMON, *small_synthetic, "stage.batch_size=8", "stage.max_steps=2", "trainer.checkpoint_every_n_steps=2",
            f"output_root={tmp_path}", "run_name=r"]
    with caplog.at_level(logging.ERROR, logger="vlm"), pytest.raises(SystemExit) as stop:
        train(tiny_config(*args), StopInFinalValidation(by))
    assert stop.value.code == code  # not a finished run: a kill must not read as success
    assert f"stopped by {by} at step 2" in caplog.text and "resume=auto continues" in caplog.text
    run_dir = tmp_path / "contrastive" / "r"
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "export").exists()
    metrics, _ = train(tiny_config(*args, "resume=auto"))  # from the step-2 checkpoint: validates and exports
    assert metrics["global_step"] == 2 and (run_dir / "export").is_dir()
    # now finished: a resume has nothing to train, and must not redo the figures over those of the real run
    written = (run_dir / "metrics.json").read_text()
    with pytest.raises(ConfigError, match=r"is a finished run: its export is complete and its newest checkpoint is "
                                          r"at step 2, stage.max_steps=2; raise stage.max_steps"):
        train(tiny_config(*args, "resume=auto"))
    assert (run_dir / "metrics.json").read_text() == written
    assert train(tiny_config(*args, "stage.max_steps=3", "resume=auto"))[0]["global_step"] == 3  # trained further
    # its last step falls between the periodic checkpoints: saved anyway, so that run too reads as finished
    assert (run_dir / "checkpoints" / "step00000003.ckpt").is_file()
    with pytest.raises(ConfigError, match=r"newest checkpoint is at step 3, stage.max_steps=3"):
        train(tiny_config(*args, "stage.max_steps=3", "resume=auto"))
    # resumed with a longer interval than its first session's (the default's, say): its last step is saved too
    longer = tiny_config(*args, "trainer.checkpoint_every_n_steps=1000", "stage.max_steps=4", "resume=auto")
    assert train(longer)[0]["global_step"] == 4 and (run_dir / "checkpoints" / "step00000004.ckpt").is_file()


class StopAfterTraining(pl.Callback):
    """A scheduler's SIGTERM after the last step, before fit has returned: the validation that follows would clear
    Lightning's record of it (each Trainer call installs its own handlers)."""

    def on_train_end(self, trainer: pl.Trainer, *args) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


class StopWhileSavingTheLastCheckpoint(pl.Callback):
    """A scheduler's SIGTERM while the run's last checkpoint is written, after fit (whose handlers are gone: without
    one the process died of the signal, unannounced, here the test worker)."""

    def on_save_checkpoint(self, trainer: pl.Trainer, task, checkpoint: dict) -> None:
        if trainer.global_step == 3:  # not a periodic step (every 2): the save `finish` makes
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
# steps=3 with checkpoints every 2: the last checkpoint is the one `finish` writes, the SIGTERM having come first
@pytest.mark.parametrize("stop_with, steps", [(StopAfterTraining, 2), (StopAfterTraining, 3),
                                              (StopWhileSavingTheLastCheckpoint, 3)])
def test_a_sigterm_after_the_last_step_stops_the_run_before_its_export(tmp_path, small_synthetic, caplog, stop_with,
                                                                       steps):
    """The run stops as a SIGTERM'd one (143) with its last checkpoint written, and resume=auto validates and exports
    from that checkpoint."""
    args = [*COMMON, *small_synthetic, "stage.batch_size=8", f"stage.max_steps={steps}",
            "trainer.checkpoint_every_n_steps=2", f"output_root={tmp_path}", "run_name=r"]
    with caplog.at_level(logging.ERROR, logger="vlm"), pytest.raises(SystemExit) as stop:
        train(tiny_config(*args), stop_with())
    assert stop.value.code == 143 and f"stopped by SIGTERM at step {steps}" in caplog.text
    run_dir = tmp_path / "contrastive" / "r"
    assert (run_dir / "checkpoints" / f"step{steps:08d}.ckpt").is_file()
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "export").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    assert train(tiny_config(*args, "resume=auto"))[0]["global_step"] == steps and (run_dir / "config.json").is_file()


@pytest.mark.parametrize("name", ["../../escape", "a/b", ".."])
def test_a_run_name_that_is_a_path_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match=f"run_name='{re.escape(name)}' must be a folder name, not a path"):
        prepare_run(tiny_config(f"output_root={tmp_path / 'runs'}", f"run_name={name}"))
    assert not tmp_path.joinpath("runs").exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage, init_from, message", [
    ("contrastive", "exports/clip", "init_from='exports/clip': stage=contrastive starts from fresh weights, or "
                                    "pretrained timm/open_clip ones"),
    ("sft", "exports/missing", "init_from='exports/missing' is not a folder: give an export folder"),
])
def test_an_init_from_the_stage_cannot_start_from_is_refused_before_a_run_folder_is_made(tmp_path, stage, init_from,
                                                                                        message):
    (tmp_path / "exports" / "clip").mkdir(parents=True)
    config = tiny_config(f"output_root={tmp_path / 'runs'}", f"init_from={tmp_path / init_from}", stage=stage)
    with pytest.raises(ConfigError, match=re.escape(message.replace("exports/", f"{tmp_path}/exports/"))):
        prepare_run(config)
    assert not tmp_path.joinpath("runs").exists()


@pytest.mark.slow  # `python -m vlm.train` processes, each importing torch and Lightning
def test_a_run_name_that_holds_a_run_is_refused_without_resume(tmp_path):
    folder = tmp_path / "runs" / "contrastive" / "crash"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "step00000001.ckpt").write_bytes(b"")
    (folder / "metrics.json").write_text("{}")
    result = subprocess.run(_command(tmp_path, "stage.max_steps=2"), cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"run folder {str(folder)!r} already holds a run; pass resume=auto" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "metrics.json"]  # untouched
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["step00000001.ckpt"]


def test_a_resumed_metrics_csv_keeps_the_validation_logged_at_the_checkpoints_step(tmp_path):
    """A run that ended at step 4 validated there; resumed from its step-4 checkpoint, it trains step 4 again (logged
    at step 4) but does not validate again: the validation row stays, the training rows from step 4 on go."""
    from vlm.training.loggers import _ContinuingWriter

    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss,val/loss\n0,3,2.0,\n0,4,,1.7\n0,4,1.8,\n0,5,1.6,\n")
    _ContinuingWriter(str(tmp_path), resume_step=4)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch,step,train/loss,val/loss", "0,3,2.0,",
                                                                   "0,4,,1.7"]


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, caplog):
    """resume=step4 while step6 exists starts a new branch from step 4; the old branch's step 6 must not be what a
    later resume=auto continues, so it is renamed *.superseded (kept, and out of every search)."""
    checkpoints = tmp_path / "contrastive" / "r" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in (2, 4, 6):
        torch.save({"state_dict": {}, "global_step": step, "vlm_stage": "contrastive"},
                   checkpoints / f"step{step:08d}.ckpt")
    with caplog.at_level(logging.WARNING):
        run = prepare_run(tiny_config(f"output_root={tmp_path}", f"resume={checkpoints / 'step00000004.ckpt'}"))
    assert run.resume_from == checkpoints / "step00000004.ckpt"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step00000002.ckpt", "step00000004.ckpt",
                                                             "step00000006.ckpt.superseded"]
    assert "1 later checkpoints of the run (step00000006.ckpt) are set aside" in caplog.text
    assert find_resume_checkpoint(checkpoints.parent) == checkpoints / "step00000004.ckpt"


def test_a_refused_resume_leaves_the_runs_checkpoints_as_they_were(tmp_path):
    """resume=PATH past stage.max_steps is refused; it must not set the later checkpoints aside first, or the next
    resume=auto would go back to PATH's step and lose the steps after it."""
    checkpoints = tmp_path / "contrastive" / "r" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in (10, 15, 20):
        torch.save({"state_dict": {}, "global_step": step, "vlm_stage": "contrastive"},
                   checkpoints / f"step{step:08d}.ckpt")
    before = sorted(p.name for p in checkpoints.iterdir())
    with pytest.raises(ConfigError, match=r"step00000015.ckpt' is at step 15, past stage.max_steps=12"):
        prepare_run(tiny_config(f"output_root={tmp_path}", "stage.max_steps=12",
                                f"resume={checkpoints / 'step00000015.ckpt'}"))
    with pytest.raises(ConfigError, match=r"step00000020.ckpt' is at step 20, past stage.max_steps=12"):
        prepare_run(tiny_config(f"output_root={tmp_path}", "stage.max_steps=12", "run_name=r", "resume=auto"))
    assert sorted(p.name for p in checkpoints.iterdir()) == before


def test_resuming_names_changed_settings_and_refuses_a_change_of_what_trains(tmp_path, caplog):
    """stage.* settings and those that change what a run trains on or how (seed, precision, devices, data) are named
    when a resume changes them; a change of what trains is refused."""
    from vlm.training.resume import RUN_SETTINGS_KEY, STAGE_SETTINGS_KEY, run_settings, warn_changed_settings
    from vlm.training.stages import get_stage

    sft = get_stage("sft")
    trained = tiny_config("stage.lr=1e-3", stage="sft")
    path = tmp_path / "step=000010.ckpt"
    torch.save({"state_dict": {}, "global_step": 10, STAGE_SETTINGS_KEY: dataclasses.asdict(trained.stage),
                RUN_SETTINGS_KEY: run_settings(trained)}, path)
    with caplog.at_level(logging.WARNING, logger="vlm"):
        warn_changed_settings(path, tiny_config("stage.lr=1e-3", stage="sft"), sft.trains)
    assert "resuming" not in caplog.text  # the settings it trained with: nothing to say
    resumed = tiny_config("stage.lr=5e-4", "trainer.seed=1", "trainer.precision=32-true",
                          "data.synthetic.num_train=512", stage="sft")
    with caplog.at_level(logging.WARNING, logger="vlm"):
        warn_changed_settings(path, resumed, sft.trains)
    assert "resuming with settings other than those the run trained with until step=000010.ckpt: " \
           "stage.lr: 0.001 -> 0.0005; data.synthetic.num_train: " in caplog.text
    assert f"trainer.precision: {trained.trainer.precision!r} -> '32-true'; trainer.seed: " in caplog.text
    caplog.clear()  # a run trained with local_global attention, resumed without saying so, would train dense
    with caplog.at_level(logging.WARNING, logger="vlm"):
        warn_changed_settings(path, tiny_config("stage.lr=1e-3", "model.llm.attention=local_global",
                                                "model.llm.sparse.window=8", stage="sft"), sft.trains)
    assert "model.llm.attention: 'dense' -> 'local_global'; model.llm.sparse.window: " in caplog.text
    # naming a part the table trains anyway changes nothing that trains
    warn_changed_settings(path, tiny_config("stage.train_llm=true", stage="sft"), sft.trains)
    with pytest.raises(ConfigError, match=r"^stage.train_vision=True changes what step=000010.ckpt trained "
                                          r"\(llm \+ projector\) to llm \+ projector \+ vision: its optimizer state"):
        warn_changed_settings(path, tiny_config("stage.train_vision=true", stage="sft"), sft.trains)
    # the way out it names is one the stage can take: a later stage starts from an export, contrastive does not
    with pytest.raises(ConfigError, match=r"start a new run from this run's export \(init_from=\.\.\.\)"):
        warn_changed_settings(path, tiny_config("stage.train_vision=true", stage="sft"), sft.trains)
    contrastive = get_stage("contrastive")
    torch.save({"state_dict": {}, "global_step": 10,
                STAGE_SETTINGS_KEY: dataclasses.asdict(tiny_config(stage="contrastive").stage)}, path)
    with pytest.raises(ConfigError, match=r"or start a new run without resume= \(stage=contrastive starts from "
                                          r"fresh or pretrained weights, not from an export\) to train other parts$"):
        warn_changed_settings(path, tiny_config("stage.train_vision=false", stage="contrastive"), contrastive.trains)


def test_a_failed_start_leaves_no_empty_run_folder_and_only_rank_zero_removes_it(tmp_path, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    from vlm.training.runs import removed_if_left_empty

    for rank, left in ((1, True), (0, False)):  # rank 1 leaves it to rank 0, which may still be walking it
        (tmp_path / "run" / "logs").mkdir(parents=True, exist_ok=True)
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        with pytest.raises(ConfigError), removed_if_left_empty(tmp_path / "run"):
            raise ConfigError("bad data")
        assert (tmp_path / "run").exists() == left
    (tmp_path / "run" / "logs").mkdir(parents=True)
    (tmp_path / "run" / "logs" / "metrics.csv").write_text("step\n")
    with pytest.raises(ConfigError), removed_if_left_empty(tmp_path / "run"):
        raise ConfigError("bad data at step 40")
    assert (tmp_path / "run" / "logs" / "metrics.csv").is_file()  # a run that wrote something keeps it


def test_a_checkpoint_naming_a_missing_module_is_refused_and_left_in_place(tmp_path, monkeypatch):
    """A package uninstalled since the run saved is no damage: resume=auto says which module is missing and renames
    nothing, where a damaged file would be set aside and the run would go back a checkpoint (or to step 0)."""
    (tmp_path / "run_extras.py").write_text("class Note:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import run_extras

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in (10, 20):
        extra = {"note": run_extras.Note()} if step == 20 else {}
        torch.save({"state_dict": {}, "global_step": step, **extra}, checkpoints / f"step{step:08d}.ckpt")
    (tmp_path / "run_extras.py").unlink()
    monkeypatch.delitem(sys.modules, "run_extras")
    with pytest.raises(CheckpointUnreadable, match=r"step00000020.ckpt cannot be read here \(ModuleNotFoundError: "
                                                   r"No module named 'run_extras'\)"):
        find_resume_checkpoint(checkpoints.parent)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step00000010.ckpt", "step00000020.ckpt"]


@pytest.mark.slow
def test_a_resume_into_a_model_its_settings_no_longer_build_is_one_error_naming_the_weights(tmp_path, small_synthetic):
    args = [*COMMON, *small_synthetic, "stage.batch_size=8", "trainer.checkpoint_every_n_steps=2",
            f"output_root={tmp_path}", "run_name=r"]
    train(tiny_config(*args, "stage.max_steps=2"))
    with pytest.raises(ConfigError, match=r"step00000002.ckpt holds the weights of another model than these model.\* "
                                          r"settings build \(model.head.logit_bias is not in it\)"):
        train(tiny_config(*args, "stage.max_steps=4", "model.clip.loss=siglip", "resume=auto"))
    assert train(tiny_config(*args, "stage.max_steps=3", "resume=auto"))[0]["global_step"] == 3  # as built: resumes


def test_each_rank_resumes_from_its_own_data_position():
    """Ranks with unequal shards pass their epochs at different steps: rank 0 at an epoch's end, rank 1 three batches
    into the same epoch. Each resumes from its own position: rank 1 restarts its epoch with a fresh order (none of its
    samples skipped), rank 0 takes the next epoch's order, and both count their epochs on from Lightning's."""
    from types import SimpleNamespace

    mine = [{"epoch": 1, "batches_in_epoch": 0, "first_epoch": 0, "seed": 7},
            {"epoch": 0, "batches_in_epoch": 3, "first_epoch": 0, "seed": 7}]
    checkpoint = {DataPosition.KEY: {**mine[0], "ranks": mine, "global_step": 3, "wall_seconds": 1.0}}
    seeds = []
    for rank in (0, 1):
        trainer = SimpleNamespace(global_rank=rank, world_size=2, datamodule=SimpleNamespace(seed=7),
                                  current_epoch=1)  # Lightning resumes counting from rank 0's epoch
        position = DataPosition(time.time())
        position.on_load_checkpoint(trainer, None, checkpoint)
        seeds.append(trainer.datamodule.seed)
        position.on_train_batch_end(trainer)
        assert (position.epoch, position.batches_in_epoch) == (mine[rank]["epoch"], 1)
    assert seeds[0] == 8  # epoch 1's order: seed + 1, as the uninterrupted run would have taken it
    # rank 1's restarted epoch is no plain epoch's order (seed + k, the k-th pass), which it would replay
    assert seeds[1] not in range(7, 7 + 2**20)
    # resumed on one rank: rank 0's position
    trainer = SimpleNamespace(global_rank=0, world_size=1, datamodule=SimpleNamespace(seed=7), current_epoch=1)
    DataPosition(time.time()).on_load_checkpoint(trainer, None, checkpoint)
    assert trainer.datamodule.seed == 8

    def mid_epoch_seed(step: int) -> int:
        """The data seed of a one-rank run resumed 3 batches into epoch 0 at global step `step`."""
        position = {"epoch": 0, "batches_in_epoch": 3, "first_epoch": 0, "seed": 7}
        saved = {DataPosition.KEY: {**position, "ranks": [position], "global_step": step, "wall_seconds": 1.0}}
        trainer = SimpleNamespace(global_rank=0, world_size=1, datamodule=SimpleNamespace(seed=7), current_epoch=0)
        DataPosition(time.time()).on_load_checkpoint(trainer, None, saved)
        return trainer.datamodule.seed

    # the same position gives the same order; a run that crashes again further into the epoch gets a new one
    assert mid_epoch_seed(3) == mid_epoch_seed(3) == seeds[1]
    later = [mid_epoch_seed(step) for step in (4, 5, 103)]
    assert len({seeds[1], *later}) == 4 and not any(seed in range(7, 7 + 2**20) for seed in later)


class RequeueSave(pl.Callback):
    """Saves a SLURM requeue checkpoint after step `at`, as Lightning's SIGUSR1 handler does (hpc_ckpt_N.ckpt in
    the run folder), and lets the run go on."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.at:
            trainer.save_checkpoint(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))


def test_a_run_under_slurm_exports_and_scores_its_last_weights_not_a_requeue_checkpoint(tmp_path, small_synthetic,
                                                                                      monkeypatch):
    """Under SLURM, Lightning's validate() loads the newest hpc_ckpt_*.ckpt of the run folder over the model it is
    given: the final validation, metrics.json and the export were those of a SIGUSR1 save many steps back."""
    from safetensors.torch import load_file

    for name, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                        "SLURM_NODEID": "0", "SLURM_JOB_ID": "4243", "SLURM_JOB_NAME": "train",
                        "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(name, value)
    args = [*COMMON, *small_synthetic, "stage.batch_size=8", "stage.max_steps=12", "trainer.checkpoint_every_n_steps=6",
            f"output_root={tmp_path}", "run_name=r"]
    metrics, run_dir = train(tiny_config(*args), RequeueSave(at=3))
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file()
    assert metrics["global_step"] == 12 and metrics["samples_seen"] == 12 * 8  # not the requeue save's 3 * 8
    final = torch.load(run_dir / "checkpoints" / "step00000012.ckpt", weights_only=False)["state_dict"]
    exported = load_file(run_dir / "export" / "model.safetensors")
    shared = [name for name in exported if "model." + name in final]
    assert shared and all(torch.equal(exported[name], final["model." + name]) for name in shared)
