"""Where a chat model runs: the device and the weights' dtype ("auto" picks what the hardware is fast at)."""

from __future__ import annotations

import torch

from vlm.generation.options import OptionError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as err:
        raise OptionError(f"device={device!r} is not valid: {err}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device={device!r}, but torch sees no CUDA GPU here; use device=cpu (or auto)")
    return chosen


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # bf16 halves memory and is what GPUs are fast at; CPUs stay in float32, where answers are the same on every
        # CPU (bf16 matmuls are emulated and slow on CPUs without bf16 kernels: vlm.training.strategy.cpu_has_bf16)
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise OptionError(f"dtype={dtype!r} is not valid; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]
