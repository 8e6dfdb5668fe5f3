"""Projectors: map vision features (…, Dv) into the LLM's embedding space (…, Dlm). A registry with loud failures."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vlm.config import ConfigError


def linear(vision_width: int, llm_width: int) -> nn.Module:
    return nn.Linear(vision_width, llm_width)


def mlp2x_gelu(vision_width: int, llm_width: int) -> nn.Module:
    """LLaVA-1.5's projector: Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))


PROJECTORS: dict[str, Callable[[int, int], nn.Module]] = {"linear": linear, "mlp2x_gelu": mlp2x_gelu}


def build_projector(name: str, vision_width: int, llm_width: int) -> nn.Module:
    if name not in PROJECTORS:
        raise ConfigError(f"unknown projector {name!r}; choose one of {sorted(PROJECTORS)}")
    return PROJECTORS[name](vision_width, llm_width)
