"""Shared command-line plumbing: where the configs live, friendly override checks and clean user-facing errors."""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
_MISSING = object()


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _groups() -> set[str]:
    return {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}


def unknown_key_message(cfg: DictConfig, key: str) -> str | None:
    """None when `key` exists in `cfg`; else a message naming it, its closest match and its siblings."""
    if OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING:
        return None
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    while node is None and parent:  # walk up to the deepest existing parent
        parent, _, leaf = parent.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    valid = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    match = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" Did you mean {(parent + '.' if parent else '') + match[0]!r}?" if match else ""
    return f"unknown config key {key!r}.{hint} Valid keys under {parent or 'the top level'!r}: {valid}"


PATTERN_KEYS = ("data.train", "data.val")  # shard patterns: braces and colons mean something to Hydra's parser


def quote_values(args: list[str], keys: tuple[str, ...]) -> list[str]:
    """Quote the values of `keys` for Hydra, so braces, commas, brackets and colons in them need no quoting by the
    user (`data.train=/d/shard-{000..009}.tar`, `prompt=Is it red, or blue?`); already-quoted values are kept."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        if eq and key in keys and not quoted:
            # inside Hydra's single quotes: escape quotes, the backslashes before them, and ${ interpolations
            escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
            arg = f"{key}='" + escaped.replace("${", "\\${") + "'"
        out.append(arg)
    return out


def preflight(args: list[str], config_name: str) -> None:
    """Compose the config once before Hydra runs, so a typo fails at once with the key and its valid choices.

    Also quotes shard patterns in place in sys.argv, where Hydra reads them.
    """
    args = quote_values(args, PATTERN_KEYS)
    if args != sys.argv[1:] and len(args) == len(sys.argv) - 1:
        sys.argv[1:] = args
    if not CONFIG_DIR.is_dir():
        fail(f"config folder {str(CONFIG_DIR)!r} not found; install vlm with `pip install -e .` from a checkout")
    if any(a.startswith("-") for a in args):
        return  # Hydra's own flags (--help, --cfg job, -m) do their own checking
    from hydra import compose, initialize_config_dir

    groups = _groups()
    bad = [a for a in args if "=" not in a]
    if bad:
        fail(f"arguments are key=value overrides, got {bad[0]!r}")
    group_args = [a for a in args if a.split("=", 1)[0] in groups]
    key_args = [a for a in args if a not in group_args and not a.startswith(("+", "~", "hydra."))]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        try:
            base = compose(config_name, overrides=group_args)
        except Exception as err:  # Hydra names the group and lists its options
            fail(str(err).split("Config search path")[0].strip())
        for arg in key_args:
            message = unknown_key_message(base, arg.split("=", 1)[0])
            if message:
                fail(message)
        try:
            compose(config_name, overrides=args)
        except Exception as err:
            fail(str(err).strip())


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix (bad config, missing files, bad data) into one clean line and exit code 2."""
    from vlm.config import ConfigError
    from vlm.data.shards import ShardError
    from vlm.export import ExportError

    try:
        yield
    except (ConfigError, ShardError, ExportError, FileNotFoundError) as err:
        fail(str(err))
