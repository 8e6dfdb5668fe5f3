"""FSDP for every stage: Lightning's FSDPStrategy, sharded block by block, with gradient clipping that sees the shards.

`trainer.strategy=fsdp` builds `BlockShardedFSDP`. Each transformer block (ViT, text tower, LLM decoder layer) is its
own FSDP unit, so a rank holds whole weights for one block at a time rather than for the whole model. FSDP also runs on
CPU ranks over gloo, slowly: enough to smoke-test a sharded run on a laptop or in CI before it goes to the cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, Strategy, StrategyRegistry
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from vlm.config import ConfigError, TrainerConfig, closest
from vlm.models.blocks import transformer_block_types

log = logging.getLogger(__name__)

FSDP_NAMES = ("fsdp", "fsdp_cpu_offload")  # Lightning's names for FSDP; both get the settings below
Result = TypeVar("Result")


class BlockShardedFSDP(FSDPStrategy):
    """Lightning's FSDPStrategy, also on CPU ranks, and reusable after `fit`.

    - torch's FSDP must be told the device it runs on. Lightning passes a CUDA index only, None on a CPU, which FSDP
      refuses; on CPU this wraps the model itself with the CPU device named.
    - `trainer.validate` after `trainer.fit` would re-wrap a model whose blocks are already FSDP units and leave the
      top-level weights sharded (Lightning issue #19015); the root wrapper from `fit` is kept and reused instead.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._root: FullyShardedDataParallel | None = None

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self._root is not None and self._root.module is model:
            return self._root
        if self.root_device.type == "cpu":
            self._root = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                                  mixed_precision=self.mixed_precision_config,
                                                  sharding_strategy=self.sharding_strategy,
                                                  device_id=self.root_device, **self.kwargs)
        else:
            self._root = super()._setup_model(model)
        units = sum(isinstance(m, FullyShardedDataParallel) for m in self._root.modules())
        if self.global_rank == 0:
            log.info("FSDP (%s): %d units over %d ranks", self.sharding_strategy.name, units, self.world_size)
        return self._root


def run_with_whole_weights(trainer: pl.Trainer, task: pl.LightningModule, work: Callable[[], Result]) -> Result:
    """Run `work`, which calls the task's models outside a training or validation step, with every weight whole.

    Under FSDP the weights outside the blocks stay sharded except inside the root wrapper's forward (each block gathers
    its own as it runs), so `work` runs there: the root is called once with the task's forward pointed at `work`, as
    Lightning routes its steps. Other strategies hold whole weights, and `work` runs as it is.
    """
    root = trainer.strategy.model
    if not isinstance(root, FullyShardedDataParallel):
        return work()
    forward = task.forward

    def run_work(*_: Any, **__: Any) -> Result:
        task.forward = forward  # the models inside may call the task's own forward again
        return work()

    task.forward = run_work
    try:
        return root()
    finally:
        task.forward = forward


def every_rank(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order; [value] without a process group. A collective: every rank
    must call it at the same point (checkpoint hooks run on every rank)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    values: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def this_ranks(saved: dict[str, Any], trainer: pl.Trainer) -> dict[str, Any]:
    """This rank's entry of a checkpoint value saved with {"ranks": every_rank(value)}: rank 0's when the run
    resumes on another number of ranks, and a checkpoint's value as it is when it was saved before the ranks were."""
    if "ranks" not in saved:
        return saved
    values = saved["ranks"]
    return values[trainer.global_rank] if len(values) == trainer.world_size else values[0]


def runs_on_cpu(trainer: TrainerConfig) -> bool:
    return trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available())


def check_strategy(trainer: TrainerConfig) -> None:
    """Refuse, before any work, a strategy Lightning does not know and FSDP settings these devices cannot run."""
    known = ["auto", *StrategyRegistry.available_strategies()]
    if trainer.strategy not in known:
        match = closest(trainer.strategy, known)
        hint = f" Did you mean {match!r}?" if match else ""
        raise ConfigError(f"trainer.strategy={trainer.strategy!r} is not a Lightning strategy.{hint} "
                          "Common ones: auto, ddp, fsdp")
    if trainer.strategy not in FSDP_NAMES:
        return
    on_cpu = runs_on_cpu(trainer)
    if on_cpu and trainer.precision not in ("32-true", "auto"):
        # Lightning's FSDP mixed precision autocasts on CUDA only; on CPU the blocks would get bf16 inputs in fp32 ops
        raise ConfigError(f"trainer.precision={trainer.precision!r} with trainer.strategy=fsdp needs GPUs; "
                          "FSDP on CPU ranks runs in 32-true")
    if on_cpu and trainer.strategy == "fsdp_cpu_offload":
        raise ConfigError("trainer.strategy=fsdp_cpu_offload needs GPUs (it moves GPU shards to CPU memory); "
                          "on CPU ranks use trainer.strategy=fsdp")
    if on_cpu and trainer.fsdp_sharding == "HYBRID_SHARD":
        # torch groups HYBRID_SHARD ranks by the accelerators of a node, which CPU ranks do not have
        raise ConfigError("trainer.fsdp_sharding=HYBRID_SHARD needs GPUs (it groups ranks by GPUs per node); "
                          "on CPU ranks use FULL_SHARD or SHARD_GRAD_OP")


def cpu_has_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (x86 with AVX-512 or AMX, Arm with BF16): bf16 matmuls are
    then faster than fp32 ones, where elsewhere they would be emulated and slower."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(trainer: TrainerConfig) -> str:
    """`trainer.precision`, with `auto` made concrete for these devices: bf16 mixed precision where the hardware
    runs it natively (a GPU with bf16, else fp16 mixed; a CPU whose oneDNN has bf16 kernels, as AVX-512 and AMX x86
    CPUs do), else 32-true. FSDP on CPU ranks always runs in 32-true (see check_strategy)."""
    if trainer.precision.startswith("16") and runs_on_cpu(trainer):  # Lightning would run bf16-mixed instead
        raise ConfigError(f"trainer.precision={trainer.precision}: fp16 runs on GPUs only; on CPUs use bf16-mixed or "
                          f"32-true (or auto)")
    if trainer.precision != "auto":
        return trainer.precision
    if not runs_on_cpu(trainer):
        chosen, why = ("bf16-mixed", "the GPU has bf16") if torch.cuda.is_bf16_supported() else (
            "16-mixed", "the GPU has no bf16")
    elif trainer.strategy in FSDP_NAMES:
        chosen, why = "32-true", "FSDP on CPU ranks"
    elif cpu_has_bf16():
        chosen, why = "bf16-mixed", "this CPU has bf16 kernels; trainer.precision=32-true for full precision"
    else:
        chosen, why = "32-true", "this CPU has no bf16 kernels"
    log.info("trainer.precision=auto: %s (%s)", chosen, why)
    return chosen


def set_matmul_precision(trainer: TrainerConfig) -> None:
    """`trainer.matmul_precision` for the fp32 matmuls left under mixed precision, on GPUs only: on CPUs torch would
    let oneDNN run them in bf16 too, which `trainer.precision` decides there."""
    if not runs_on_cpu(trainer):
        torch.set_float32_matmul_precision(trainer.matmul_precision)
        log.info("fp32 matmuls on GPUs: trainer.matmul_precision=%s", trainer.matmul_precision)


def build_strategy(trainer: TrainerConfig, model: nn.Module) -> str | Strategy:
    """The Lightning strategy for `trainer.strategy`: a name Lightning resolves, or block-sharded FSDP for `fsdp` (and
    `fsdp_cpu_offload`, which also keeps the shards in CPU memory between uses). `vlm.train` has already run
    `check_strategy` on these settings, at start-up."""
    if trainer.strategy not in FSDP_NAMES:
        return trainer.strategy
    blocks = transformer_block_types(model)
    if not blocks:
        raise ConfigError("trainer.strategy=fsdp: the model has no transformer blocks to shard (no timm `blocks`, "
                          "open_clip `resblocks` or Hugging Face `_no_split_modules`)")
    return BlockShardedFSDP(auto_wrap_policy=blocks, sharding_strategy=trainer.fsdp_sharding,
                            cpu_offload=trainer.strategy == "fsdp_cpu_offload",
                            state_dict_type="full")  # one checkpoint file: atomic writes and resume=auto as ever


def configure_precision(trainer: TrainerConfig) -> str:
    """Set this process's fp32 matmul precision (`set_matmul_precision`) and return the Trainer's precision
    (`resolve_precision`): what every entry point that builds a Trainer does first."""
    set_matmul_precision(trainer)
    return resolve_precision(trainer)
