"""`trainer.compile=true`: every transformer block is compiled in place, and training computes what it did before."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file
from test_bad_data import COMMON, train
from tiny import tiny_config
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from vlm.training.vlm_task import eager_decoding


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["dense", "local_global"])
def test_compiled_blocks_train_to_the_same_loss_and_export_the_same_keys(tmp_path, caplog, small_synthetic, attention):
    sparse = ["model.llm.sparse.window=8", "model.llm.sparse.stride=4", "model.llm.sparse.sinks=1"]
    data = [*small_synthetic, "stage.batch_size=8", "eval.batch_size=8", "stage.max_steps=3", "init_from=null",
            f"output_root={tmp_path / 'runs'}", f"model.llm.attention={attention}", *sparse]
    graphs_before = counters["stats"]["unique_graphs"]  # what dynamo has compiled in this process
    plain, plain_run = train(tiny_config(*COMMON, *data, "run_name=plain", stage="sft"))
    assert counters["stats"]["unique_graphs"] == graphs_before
    with caplog.at_level(logging.INFO, logger="vlm.training.trainer"):
        compiled, compiled_run = train(tiny_config(*COMMON, *data, "run_name=compiled", "trainer.compile=true",
                                                   stage="sft"))
    assert "trainer.compile: 4 transformer blocks" in caplog.text  # 2 ViT blocks + 2 LLM decoder layers
    assert counters["stats"]["unique_graphs"] > graphs_before  # the blocks ran compiled
    assert compiled["loss"] == pytest.approx(plain["loss"], abs=1e-4)
    # validation decodes eagerly, so the compiled model answers as the plain one does
    assert compiled["exact_match"] == plain["exact_match"]
    keys = [set(load_file(str(run / "export" / "model.safetensors"))) for run in (plain_run, compiled_run)]
    assert keys[0] == keys[1]  # compiling in place leaves the module tree, so checkpoints and exports, unchanged


@pytest.mark.parametrize("blocks_compiled", [False, True])
def test_validation_decodes_eagerly_only_when_blocks_were_compiled(blocks_compiled):
    """The eager stance reaches every compiled function, flex_attention's kernel too (it would fall back to an unfused
    pass over all scores), so held-out answers take it only when trainer.compile compiled the blocks."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lambda x: x * 2 + 1, backend=counter)
    with eager_decoding(blocks_compiled):
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 3.0))
    assert counter.frame_count == (0 if blocks_compiled else 1)
