"""Progress when stderr is a log file (SLURM, CI, `> run.log`): plain lines every few percent, no bar redraws."""

from __future__ import annotations

import pytest
from tiny import tiny_config

from vlm.train import run


@pytest.mark.slow
def test_a_run_logged_to_a_file_prints_plain_progress_lines(tmp_path, capsys, small_synthetic):
    config = tiny_config(*small_synthetic, "stage.max_steps=40", "stage.batch_size=8", "data.num_workers=0",
                         "trainer.val_check_interval=1000", "trainer.checkpoint_every_n_steps=1000",
                         f"output_root={tmp_path}")
    run(config)
    err = capsys.readouterr().err  # pytest's capture is not a terminal, as a log file is not
    lines = [line for line in err.splitlines() if line.startswith("train contrastive: step ")]
    assert [line.split()[3] for line in lines] == [f"{step}/40" for step in range(2, 41, 2)]  # every 5%
    assert "steps/s" in lines[-1] and "loss" in lines[-1]
    assert "\r" not in err  # no carriage-return redraws
