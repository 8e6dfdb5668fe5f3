"""The repeated transformer blocks of a model: the units FSDP shards one by one and `trainer.compile` compiles."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

# Repeated blocks by container name: timm ViTs keep theirs in `blocks`, open_clip's text transformer in `resblocks`.
BLOCK_CONTAINERS = ("blocks", "resblocks")


def transformer_block_types(model: nn.Module) -> set[type[nn.Module]]:
    """The block classes: each Hugging Face model's own `_no_split_modules` (its decoder layers) and the classes in
    timm's and open_clip's block lists."""
    types: set[type[nn.Module]] = set()
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            declared = set(getattr(module, "_no_split_modules", None) or [])
            types |= {type(m) for m in module.modules() if type(m).__name__ in declared}
        if name.rsplit(".", 1)[-1] in BLOCK_CONTAINERS and isinstance(module, nn.ModuleList | nn.Sequential):
            types |= {type(block) for block in module}
    return types


def compile_blocks(model: nn.Module) -> int:
    """`torch.compile` every transformer block in place; returns how many. Compiling block by block keeps the module
    tree and state-dict keys as they are (checkpoints, exports and FSDP's per-block wrapping see no difference), and
    one compiled graph serves every block of a class."""
    types = tuple(transformer_block_types(model))
    blocks = [module for module in model.modules() if isinstance(module, types)]
    for block in blocks:
        block.compile()
    return len(blocks)
