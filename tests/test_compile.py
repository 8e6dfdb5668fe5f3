"""`trainer.compile=true`: every transformer block is compiled in place, and training computes what it did before."""

from __future__ import annotations

import logging

import pytest
from safetensors.torch import load_file
from test_bad_data import COMMON, train
from tiny import tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["dense", "local_global"])
def test_compiled_blocks_train_to_the_same_loss_and_export_the_same_keys(tmp_path, caplog, small_synthetic, attention):
    sparse = ["model.llm.sparse.window=8", "model.llm.sparse.stride=4", "model.llm.sparse.sinks=1"]
    data = [*small_synthetic, "stage.batch_size=8", "eval.batch_size=8", "stage.max_steps=3", "init_from=null",
            f"output_root={tmp_path / 'runs'}", f"model.llm.attention={attention}", *sparse]
    plain, plain_run = train(tiny_config(*COMMON, *data, "run_name=plain", stage="sft"))
    with caplog.at_level(logging.INFO, logger="vlm.training.trainer"):
        compiled, compiled_run = train(tiny_config(*COMMON, *data, "run_name=compiled", "trainer.compile=true",
                                                   stage="sft"))
    assert "trainer.compile: 4 transformer blocks" in caplog.text  # 2 ViT blocks + 2 LLM decoder layers
    assert compiled["loss"] == pytest.approx(plain["loss"], abs=1e-4)
    # validation decodes eagerly, so the compiled model answers as the plain one does
    assert compiled["exact_match"] == plain["exact_match"]
    keys = [set(load_file(str(run / "export" / "model.safetensors"))) for run in (plain_run, compiled_run)]
    assert keys[0] == keys[1]  # compiling in place leaves the module tree, so checkpoints and exports, unchanged
