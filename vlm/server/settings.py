"""`ServeSettings`: the server's knobs. configs/serve.yaml gives each one's default and documents it; the defaults
here are the same (a test checks), for programs that build a server with `create_app` directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlm.config import check_fields, load_config, setting
from vlm.generation.options import KV_CACHES, H2OSettings


@dataclass
class ServeSettings:
    """Server settings (configs/serve.yaml documents each one)."""

    checkpoint: str | None = None
    host: str = "127.0.0.1"
    port: int = setting(8000, minimum=0, maximum=65535)
    api_key: str | None = None
    allowed_hosts: list[str] = setting([])  # host names besides loopback ones a loopback-bound server answers to
    model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_concurrency: int = setting(1, minimum=1)
    max_queue: int = setting(8, minimum=0)
    max_body_bytes: int = setting(20 * 1024 * 1024, minimum=1)
    max_image_bytes: int = setting(5 * 1024 * 1024, minimum=1)
    max_image_pixels: int = setting(50_000_000, minimum=1)
    max_images: int = setting(8, minimum=0)
    max_tokens_limit: int | None = setting(None, minimum=1)
    default_max_tokens: int = setting(512, minimum=1)
    temperature: int | float | str = "auto"  # a number (int too: YAML writes 0), or "auto"
    kv_cache: str = setting("dynamic", choices=KV_CACHES)  # when a request names none
    h2o: H2OSettings = field(default_factory=H2OSettings)
    log_level: str = "INFO"
    web: bool = True  # the chat page at GET /; false for API-only deployments

    def __post_init__(self) -> None:
        check_fields(self)
        if not isinstance(self.web, bool):
            raise ValueError(f"web={self.web!r} must be true or false")
        if self.api_key is not None and not str(self.api_key).strip():  # `api_key=$KEY` with KEY unset
            raise ValueError("api_key= is empty, which would serve without a key; give the key, or leave api_key out "
                             "to serve without one")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeSettings:
        """Settings from a composed serve config; an unknown or bad key raises ConfigError naming it."""
        return load_config(cls, values)
