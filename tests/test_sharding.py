"""`trainer.strategy=fsdp`: which blocks become FSDP units, and the settings refused before a run starts.

The 2-process FSDP training runs themselves are in test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from timm.models.vision_transformer import Block
from tiny import tiny_config
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from vlm.config import ConfigError
from vlm.models.blocks import transformer_block_types
from vlm.models.clip import CLIPModel
from vlm.models.factory import new_vlm
from vlm.training import strategy as strategy_module
from vlm.training.strategy import (
    BlockShardedFSDP,
    build_strategy,
    check_strategy,
    resolve_precision,
    set_matmul_precision,
)


def test_the_blocks_of_every_tower_become_fsdp_units():
    clip = CLIPModel(tiny_config().model)
    assert transformer_block_types(clip) == {Block, ResidualAttentionBlock}
    config = tiny_config(stage="sft")
    vlm = new_vlm(config.model, config.tiler).model
    assert transformer_block_types(vlm) == {Block, LlamaDecoderLayer}  # the LLM's own `_no_split_modules`


def test_fsdp_builds_a_block_sharded_strategy_and_other_names_pass_through():
    config = tiny_config("trainer.strategy=fsdp", "trainer.fsdp_sharding=SHARD_GRAD_OP", "trainer.accelerator=cpu")
    model = CLIPModel(config.model)
    strategy = build_strategy(config.trainer, model)
    assert isinstance(strategy, BlockShardedFSDP)
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block, ResidualAttentionBlock}  # torch's policy
    assert build_strategy(tiny_config("trainer.strategy=ddp").trainer, model) == "ddp"


@pytest.mark.parametrize(("overrides", "named"), [
    (["trainer.precision=bf16-mixed"], "trainer.precision='bf16-mixed'"),
    (["trainer.fsdp_sharding=HYBRID_SHARD"], "trainer.fsdp_sharding=HYBRID_SHARD"),
    (["trainer.strategy=fsdp_cpu_offload"], "trainer.strategy=fsdp_cpu_offload"),
])
def test_fsdp_settings_cpu_ranks_cannot_run_are_refused_by_name(overrides, named):
    config = tiny_config("trainer.strategy=fsdp", "trainer.accelerator=cpu", *overrides)
    with pytest.raises(ValueError, match=named.replace("[", r"\[")):
        check_strategy(config.trainer)


def test_an_unknown_strategy_is_refused_with_a_suggestion():
    config = tiny_config("trainer.strategy=ddpp")
    with pytest.raises(ConfigError, match=r"trainer.strategy='ddpp' is not a Lightning strategy. Did you mean 'ddp'"):
        check_strategy(config.trainer)


def test_fsdp_cpu_offload_is_block_sharded_too():
    config = tiny_config("trainer.strategy=fsdp_cpu_offload", "trainer.accelerator=gpu")
    strategy = build_strategy(config.trainer, CLIPModel(config.model))
    assert isinstance(strategy, BlockShardedFSDP) and strategy.cpu_offload.offload_params


def test_an_unknown_sharding_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="trainer.fsdp_sharding.*FULL_SHARD"):
        tiny_config("trainer.fsdp_sharding=FULL")


@pytest.mark.parametrize(("overrides", "bf16_cpu", "chosen"), [
    (["trainer.precision=auto"], True, "bf16-mixed"),
    (["trainer.precision=auto"], False, "32-true"),
    (["trainer.precision=auto", "trainer.strategy=fsdp"], True, "32-true"),  # FSDP autocasts on CUDA only
    (["trainer.precision=32-true"], True, "32-true"),
    (["trainer.precision=bf16-mixed"], False, "bf16-mixed"),  # an explicit choice stands
])
def test_auto_precision_on_a_cpu_takes_bf16_only_where_it_runs_natively(monkeypatch, overrides, bf16_cpu, chosen):
    monkeypatch.setattr(strategy_module, "cpu_has_bf16", lambda: bf16_cpu)  # the hardware probe, not the rule
    config = tiny_config("trainer.accelerator=cpu", *overrides)
    check_strategy(config.trainer)  # auto passes the FSDP-on-CPU precision check
    assert resolve_precision(config.trainer) == chosen


@pytest.mark.parametrize(("accelerator", "setting", "expected"), [
    ("cpu", "medium", "highest"),  # CPUs keep torch's default: trainer.precision decides bf16 there
    ("gpu", "high", "high"),  # TF32, the default
    ("gpu", "highest", "highest"),
])
def test_matmul_precision_applies_to_gpu_runs_only(accelerator, setting, expected):
    config = tiny_config(f"trainer.accelerator={accelerator}", f"trainer.matmul_precision={setting}")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        set_matmul_precision(config.trainer)
        assert torch.get_float32_matmul_precision() == expected
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("precision", ["16-mixed", "16-true"])
def test_fp16_on_a_cpu_is_refused_where_lightning_would_run_bf16(precision):
    config = tiny_config("trainer.accelerator=cpu", f"trainer.precision={precision}")
    with pytest.raises(ConfigError, match=f"trainer.precision={precision}: fp16 runs on GPUs only"):
        resolve_precision(config.trainer)


def test_a_bad_matmul_precision_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="trainer.matmul_precision.*highest"):
        tiny_config("trainer.matmul_precision=fast")
