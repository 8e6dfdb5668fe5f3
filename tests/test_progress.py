"""What a run prints: plain progress lines when stderr is a log file (SLURM, CI, `> run.log`), no bar redraws,
and no warnings a vlm user cannot act on."""

from __future__ import annotations

import re
import time

import pytest
from tiny import tiny_config

from vlm.train import run


@pytest.mark.slow
def test_a_run_logged_to_a_file_prints_plain_progress_lines(tmp_path, capsys, small_synthetic):
    config = tiny_config(*small_synthetic, "stage.max_steps=40", "stage.batch_size=8", "data.num_workers=0",
                         "trainer.val_check_interval=1000", "trainer.checkpoint_every_n_steps=1000",
                         f"output_root={tmp_path}")
    started = time.monotonic()
    run(config)
    took = time.monotonic() - started
    err = capsys.readouterr().err  # pytest's capture is not a terminal, as a log file is not
    lines = [line for line in err.splitlines() if line.startswith("train contrastive: step ")]
    assert [line.split()[3] for line in lines] == [f"{step}/40" for step in range(2, 41, 2)]  # every 5%
    assert "loss" in lines[-1]
    for line in lines:
        shown = re.fullmatch(r"train contrastive: step (\d+)/40 \((\d+)%\), ([\d.]+) steps/s, (\d+) s left .*", line)
        assert shown, line
        step, percent, rate, left = int(shown[1]), int(shown[2]), float(shown[3]), int(shown[4])
        assert percent == round(100 * step / 40), line
        # the time left is the steps left at the rate shown (the rate rounded to 0.01, the time to 1 s)
        assert (40 - step) / (rate + 0.005) - 0.5 <= left <= (40 - step) / max(rate - 0.005, 1e-9) + 0.5, line
        assert rate >= step / took - 0.005, (line, took)  # at least the steps done over the whole run's time
    assert "\r" not in err  # no carriage-return redraws


def test_frozen_parts_in_eval_mode_raise_no_lightning_warning(tmp_path):
    """vlm keeps frozen parts in eval mode on purpose; Lightning's own check at the start of fit must stay quiet."""
    import warnings

    import lightning.pytorch as pl
    import torch
    from torch import nn

    from vlm.training import quiet_lightning

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.frozen, self.head = nn.Linear(2, 2).eval(), nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.head(self.frozen(batch[0])).pow(2).mean()

        def train(self, mode: bool = True):
            super().train(mode)
            self.frozen.eval()
            return self

        def configure_optimizers(self):
            return torch.optim.SGD(self.head.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a warning shown earlier in this process would otherwise be shown once only
        quiet_lightning()  # as on import (its filters go in front); pytest restores the filters an import left
        trainer.fit(Module(), data)
    assert not [w for w in caught if "eval mode" in str(w.message)]


def test_rank_zero_validation_metrics_raise_no_sync_dist_advice(tmp_path):
    """The held-out scores are gathered from every rank before they are logged; in a distributed run Lightning's
    advice to sync each epoch-level value (20 lines per validation) must stay quiet."""
    import os
    import warnings

    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    from test_distributed import free_port

    from vlm.training import quiet_lightning

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.layer(batch[0]).pow(2).mean(), sync_dist=False, rank_zero_only=True)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
        trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_lightning()
            trainer.validate(Module(), data, verbose=False)
    finally:
        dist.destroy_process_group()
    assert not [w for w in caught if "sync_dist" in str(w.message)]


@pytest.mark.parametrize("seconds", [0.0, 15.0], ids=["long", "short"])
def test_a_long_validation_logged_to_a_file_prints_plain_lines(tmp_path, capsys, seconds):
    """A validation running longer than the line interval (here 0 s) gets a line per interval, with batch, share and
    time; a short one (a 15 s interval, not reached here) prints none, so validations during training add no noise."""
    import lightning.pytorch as pl
    import torch
    from torch import nn

    from vlm.training.callbacks import PlainProgress

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 1)

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(10, 2)), batch_size=2)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path, callbacks=[PlainProgress(validation_line_seconds=seconds)])
    trainer.validate(Module(), data, verbose=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("validate")]
    if seconds:
        assert lines == []
    else:
        expected = [f"validate: batch {n}/5 ({n / 5:.0%})" for n in range(1, 6)]
        assert [line.rsplit(",", 1)[0] for line in lines] == expected
        assert all(line.endswith(" s") for line in lines)


def test_a_resumed_run_hears_nothing_of_its_checkpoint_folder_not_being_empty(tmp_path):
    """Resuming reopens a checkpoint folder that holds checkpoints on purpose; Lightning's warning about it is noise."""
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint

    from vlm.training import quiet_lightning

    (tmp_path / "step00000004.ckpt").write_bytes(b"")
    checkpoints = ModelCheckpoint(dirpath=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        checkpoints._ModelCheckpoint__warn_if_dir_not_empty(tmp_path)  # what Lightning's setup calls on resume
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)  # others still get through
    assert [str(w.message) for w in caught] == ["an unrelated warning"]


def test_open_clips_info_chatter_stays_out_of_the_log_and_warnings_stay_in(caplog):
    import logging

    import open_clip

    from vlm.training import quiet_lightning

    quiet_lightning()  # as on import
    with caplog.at_level(logging.INFO):
        open_clip.get_tokenizer("ViT-B-32")
        logging.warning("a root warning still shows")
    assert [r.getMessage() for r in caplog.records] == ["a root warning still shows"]


def test_a_run_without_held_out_data_hears_nothing_of_its_empty_validation_loader():
    """Without data.val the held-out loader is an empty list and the run says so itself; Lightning's warning about the
    list's length would only alarm."""
    import warnings

    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities.data import has_len_all_ranks

    from vlm.training import quiet_lightning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        assert has_len_all_ranks([], SingleDeviceStrategy(device="cpu"))  # what Lightning's fit loop asks of it
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)  # others still get through
    assert [str(w.message) for w in caught] == ["an unrelated warning"]
