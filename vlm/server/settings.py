"""`ServeSettings`: the server's knobs (configs/serve.yaml documents each one) and their validation."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class ServeSettings:
    """Server settings (configs/serve.yaml documents each one)."""

    checkpoint: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_concurrency: int = 1
    max_queue: int = 8
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_bytes: int = 5 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_images: int = 8
    max_tokens_limit: int | None = None
    default_max_tokens: int = 512
    temperature: float | str = "auto"
    log_level: str = "INFO"
    web: bool = True  # the chat page at GET /; false for API-only deployments

    def __post_init__(self) -> None:
        for key in ("max_concurrency", "max_body_bytes", "max_image_bytes", "max_image_pixels", "default_max_tokens"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)!r} must be an integer >= 1")
        for key in ("max_queue", "max_images"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be an integer >= 0")
        if self.max_tokens_limit is not None and (not isinstance(self.max_tokens_limit, int)
                                                  or self.max_tokens_limit < 1):
            raise ValueError(f"max_tokens_limit={self.max_tokens_limit!r} must be an integer >= 1 or null")
        if not isinstance(self.web, bool):
            raise ValueError(f"web={self.web!r} must be true or false")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r} must be an integer 0-65535")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeSettings:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown server setting {unknown[0]!r}; valid settings: {sorted(names)}")
        return cls(**values)
