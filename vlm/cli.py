"""What every entry point shares: where the configs live, a start-up check of the overrides, and one-line errors.

The YAML configs sit in `configs/` at the top of a checkout, and ship inside the wheel as `vlm/configs/` (setuptools
maps the folder there), so `pip install .`, a wheel or `pip install -e .` all find them, from any working directory.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from vlm.config import invalid_choice_message, unknown_key_message
from vlm.errors import UserError

if TYPE_CHECKING:
    from vlm.chat import ChatModel

_PACKAGE = Path(__file__).resolve().parent
# inside an installed wheel: vlm/configs; in a checkout (editable installs too): configs/ beside the package
CONFIG_DIR = next((d for d in (_PACKAGE / "configs", _PACKAGE.parent / "configs") if d.is_dir()), _PACKAGE / "configs")
PATTERN_KEYS = ("data.train", "data.val")  # shard patterns: braces and colons mean something to Hydra's parser
# file and folder names: parentheses, quotes, commas, accents, `~`, `=` mean something to Hydra's parser too
TEXT_KEYS = ("prompt", "system")  # free text: "null" is a word there, not Hydra's null
LIST_TEXT_KEYS = ("generation.stop",)  # lists of free text: `[2.]` is the text "2.", not the number 2.0
PATH_KEYS = ("checkpoint", "init_from", "resume", "out", "output_root", "eval.output_dir", "data.classnames",
             "data.synthetic.cache_dir", "stage.reference", "constitution", "image")
_MISSING = object()


def setup_logging(level: str) -> None:
    """Logs go to stderr (so stdout holds only answers and results), vlm's at `level`, libraries' at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    try:
        logging.getLogger("vlm").setLevel(str(level).upper())
    except ValueError:
        fail(f"log_level={level!r} is not a logging level; use DEBUG, INFO, WARNING or ERROR")


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """`logger`'s INFO lines (and those of its children) left out while the block runs; its warnings stay."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(max(target.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        target.setLevel(level)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix (bad config, missing files, bad data) into one clean line and exit code 2."""
    try:
        yield
    except (UserError, FileNotFoundError) as err:
        fail(original_message(str(err)))


def require_chat_export(checkpoint: str | None) -> None:
    """vlm.infer's and vlm.serve's first check: checkpoint= names an export folder (exits with the reason if not)."""
    from vlm.exports.format import require_export_folder

    if not checkpoint:
        fail("checkpoint=PATH is required: an align or sft export folder, e.g. checkpoint=checkpoints/sft/RUN/export")
    with user_errors():
        require_export_folder(checkpoint)


def load_chat_model(checkpoint: str, device: str | None, dtype: str | None, name: str | None = None) -> ChatModel:
    """The export as a ChatModel for vlm.infer and vlm.serve; a damaged export or an unavailable device exits with
    one line."""
    from vlm.chat import ChatModel

    with user_errors():
        try:
            return ChatModel.load(checkpoint, device=device, dtype=dtype, name=name)
        except RuntimeError as err:  # an unavailable device
            fail(str(err))
        except KeyboardInterrupt:  # a large model loads for a while: Ctrl-C then is a choice, not a crash
            print("error: stopped by Ctrl-C while the model was loading", file=sys.stderr)
            raise SystemExit(130) from None


def original_message(message: str) -> str:
    """An error raised in a DataLoader worker reaches the main process as "Caught X in DataLoader worker process N.
    Original Traceback ...", ending with the original "X: message" line: the message alone, as if raised here."""
    if not message.startswith("Caught ") or "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def quote_values(args: list[str], keys: tuple[str, ...]) -> list[str]:
    """Quote the values of `keys` for Hydra, so braces, commas, brackets, colons and quotes in them need no quoting
    by the user (`data.train=/d/shard-{000..009}.tar`, `prompt=Is it red, or blue?`, `image=IMG (1).png`). Kept as
    they are: values already quoted, and `null` for a path or pattern (it means none). A list of paths
    (`image=[a.png,b (1).png]`) has each element quoted."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key in keys and not _quoted(value) and not (value == "null" and key not in TEXT_KEYS):
            if key in LIST_TEXT_KEYS and value.replace(" ", "") == "[]":
                arg = f"{key}=[]"  # no stop sequences, as in the config (not one empty one)
            elif key in PATH_KEYS + LIST_TEXT_KEYS and len(value) >= 2 and value[0] == "[" and value[-1] == "]":
                arg = f"{key}=[" + ",".join(_hydra_quoted(v.strip()) for v in _list_items(value[1:-1])) + "]"
            else:
                arg = f"{key}={_hydra_quoted(value)}"
        out.append(arg)
    return out


def _list_items(inner: str) -> list[str]:
    """The items of a list value's inside, split at the commas outside quotes: `'my pic, 1.png',b.png` is two."""
    items = [item for item, _ in re.findall(r"""((?:'[^']*'|"[^"]*"|[^,])+)(,|$)""", inner)]  # a lone ' is text
    return items or [inner]  # `[]`: one empty path, which the entry point names as such


def _quoted(value: str) -> bool:
    return len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""


def _hydra_quoted(value: str) -> str:
    """`value` inside Hydra's single quotes: quotes, the backslashes before them, and ${ interpolations escaped."""
    if _quoted(value):
        return value
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return "'" + escaped.replace("${", "\\${") + "'"


def _unknown_key(cfg: DictConfig, key: str) -> str | None:
    """None when `key` exists in `cfg`; else the message naming it, its closest match and its siblings."""
    if OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING:
        return None
    parent = key.rpartition(".")[0]
    while parent and not isinstance(OmegaConf.select(cfg, parent, default=None), DictConfig):
        parent = parent.rpartition(".")[0]  # walk up to the deepest existing parent
    node = OmegaConf.select(cfg, parent) if parent else cfg
    leaf = key[len(parent) + 1:].split(".")[0] if parent else key.split(".")[0]
    return unknown_key_message(f"{parent}.{leaf}" if parent else leaf, list(node.keys()))


def command_line_keys() -> set[str] | None:
    """The keys (and groups) set on this command's line ("stage", "model.llm.max_length"), or None when the config
    was not composed by a Hydra entry point (a test or a script calling `run` directly)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return {override.split("=", 1)[0].lstrip("+~") for override in HydraConfig.get().overrides.task}


def print_help(text: str) -> NoReturn:
    """Print `text` and exit 0; a reader that stops early (`--help | head`) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's own flush cannot fail again
    sys.exit(0)


def preflight(args: list[str], config_name: str) -> None:
    """Compose the config once before Hydra runs, so a typo fails at once with the key and its valid choices.

    Also quotes shard patterns and paths in place in sys.argv, where Hydra reads them.
    """
    if message := repeated_pattern_message(args):
        fail(message)
    args = quote_values(args, PATTERN_KEYS + PATH_KEYS)
    if args != sys.argv[1:] and len(args) == len(sys.argv) - 1:
        sys.argv[1:] = args
    if not CONFIG_DIR.is_dir():
        fail(f"config folder {str(CONFIG_DIR)!r} not found; reinstall vlm (`pip install .` ships the configs)")
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    group_args = [a for a in args if a.split("=", 1)[0] in groups]
    own = config_groups(config_name) if group_args else set()
    for group, value in (a.split("=", 1) for a in group_args):  # before --help, which shows the chosen options
        if group not in own:  # another entry point's group (vlm.train's model=, tiler=, ...)
            fail(f"{group}={value!r}: vlm.{config_name} has no config group {group!r}; "
                 + (f"its groups are {sorted(own)}" if own else "it reads the model and its settings from the export "
                    "given by checkpoint="))
        options = sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))
        if value not in options:
            fail(invalid_choice_message(group, value, options))
    if "--help" in args or "-h" in args:
        print_help(help_text(config_name, [a for a in args if not a.startswith("-")]))
    if any(a.startswith("-") for a in args):
        return  # Hydra's own flags (--hydra-help, --cfg job, -m) do their own checking
    bad = [a for a in args if "=" not in a]
    if bad:
        fail(f"arguments are key=value overrides, got {bad[0]!r}")
    key_args = [a for a in args if a not in group_args and not a.startswith(("+", "~", "hydra."))]
    base = _composed_or_fail(config_name, group_args)
    for arg in key_args:
        if message := _unknown_key(base, arg.split("=", 1)[0]):
            fail(message)
    try:
        compose_config(config_name, args)
    except Exception as err:
        fail(str(err).strip())


def repeated_pattern_message(args: list[str]) -> str | None:
    """None unless a shard pattern key is given several times with values that differ only in their numbers: the
    shell has then expanded an unquoted brace pattern into one argument per shard, and Hydra, which takes a key's
    last value, would read the last shard alone. (Other repeats stand, the last value winning, so a command can
    override what a shell alias set.)"""
    for key in PATTERN_KEYS:
        given = [arg.partition("=")[2] for arg in args if arg.partition("=")[0].lstrip("+") == key]
        if len(set(given)) < 2 or len({re.sub(r"\d+", "#", value) for value in given}) > 1:
            continue
        # the pattern back: what all values share around the number that differs, that number's first and last
        prefix = re.sub(r"\d+$", "", os.path.commonprefix(given))
        suffix = re.sub(r"^\d+", "", os.path.commonprefix([value[::-1] for value in given])[::-1])
        numbers = [value[len(prefix):len(value) - len(suffix)] for value in (given[0], given[-1])]
        pattern = f"{prefix}{{{numbers[0]}..{numbers[1]}}}{suffix}"
        return (f"{key} is given {len(given)} times ({', '.join(repr(v) for v in given[:3])}"
                f"{', ...' if len(given) > 3 else ''}): the shell expands an unquoted brace pattern into one argument "
                f"per shard, and only the last would be read. Quote the pattern: {key}='{pattern}'")
    return None


def _without_blocks(yaml_text: str, keys: tuple[str, ...]) -> str:
    """The YAML text without the top-level blocks `keys` (each runs to the next top-level key)."""
    kept, skipping = [], False
    for line in yaml_text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            skipping = line.split(":", 1)[0] in keys
        if not skipping:
            kept.append(line)
    return "\n".join(kept).strip()


def help_text(config_name: str, args: list[str] = ()) -> str:
    """`--help` for an entry point: what it does, its config groups with their options, and its settings as its YAML
    files document them: its own, and each group's chosen option (`args` may choose, e.g. stage=dpo)."""
    module = importlib.import_module(f"vlm.{config_name}")
    summary = (module.__doc__ or "").strip().split("\n\n")[0]
    chosen = [a for a in args if "=" in a and (CONFIG_DIR / a.split("=", 1)[0]).is_dir()]
    picked = {a.split("=", 1)[0] for a in chosen}
    composed = _composed_or_fail(config_name, chosen, return_hydra_config=True)
    groups = {group: value for group, value in composed.hydra.runtime.choices.items() if not group.startswith("hydra/")}
    from_export = getattr(module, "GROUPS_FROM_EXPORT", ())  # chosen by the export read, unless given
    usage = f"usage: python -m vlm.{config_name} {'[GROUP=OPTION ...] ' if groups else ''}[KEY=VALUE ...]"
    lines = [summary, "", usage, f"config files: {CONFIG_DIR}"]
    if groups:
        lines += ["", "config groups (GROUP=OPTION; each option is configs/GROUP/OPTION.yaml, its keys GROUP.KEY=...):"]
        for group, option in sorted(groups.items()):
            options = sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))
            if group in from_export and group not in picked:
                lines.append(f"  {group}: " + ", ".join(options) + " (default: the export's own)")
                continue
            mark = " (chosen)" if group in picked else " (default)"
            lines.append(f"  {group}: " + ", ".join(f"{o}{mark}" if o == option else o for o in options))
    example = _nested_key_example(composed, config_name)
    nested = f"; nested keys with dots, e.g. {example}" if example else ""
    for name in [config_name, *_file_defaults(CONFIG_DIR / f"{config_name}.yaml")]:
        text = _without_blocks((CONFIG_DIR / f"{name}.yaml").read_text(), ("defaults", "hydra"))
        lines += ["", f"settings of configs/{name}.yaml (KEY=VALUE{nested}):", text]
        nested = ""  # said once
    for group, option in sorted(groups.items()):
        for name in _with_parents(group, option):
            text = _without_blocks((CONFIG_DIR / group / f"{name}.yaml").read_text(), ("defaults",))
            lines += ["", f"settings of configs/{group}/{name}.yaml ({group}.KEY=VALUE; {group}=OPTION picks another "
                          f"file):", text]
    return "\n".join(lines)


def _nested_key_example(config: DictConfig, config_name: str) -> str | None:
    """A nested KEY=VALUE this entry point takes, for its help's example: the first number set in its own section
    (vlm.eval's `eval`), else in the first section that has one."""
    sections = sorted((s for s in config if s != "hydra" and isinstance(config[s], DictConfig)),
                      key=lambda s: s != config_name)  # stable: the file's order after the entry point's own
    for section in sections:
        for key, setting in config[section].items():
            if isinstance(setting, (int, float)) and not isinstance(setting, bool):
                return f"{section}.{key}={setting}"
    return None


def _file_defaults(path: Path) -> list[str]:
    """The files a YAML config's `defaults` list names beside it (plain names; not group choices, not _self_)."""
    defaults = OmegaConf.load(path).get("defaults", [])
    return [entry for entry in defaults if isinstance(entry, str) and entry != "_self_"]


def _with_parents(group: str, option: str) -> list[str]:
    """The option files of `group` that `option` is composed from: the options its `defaults` list names (each with
    its own), then itself."""
    parents = _file_defaults(CONFIG_DIR / group / f"{option}.yaml")
    return [name for parent in parents for name in _with_parents(group, parent)] + [option]


def compose_config(config_name: str, overrides: list[str] | None = None, return_hydra_config: bool = False
                   ) -> DictConfig:
    """The composed config `config_name` (train, infer, serve) with Hydra overrides, outside any Hydra app."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides or []), return_hydra_config=return_hydra_config)


def config_groups(config_name: str) -> set[str]:
    """The config groups an entry point's config chooses from (stage, model, ... for vlm.train; none for vlm.infer)."""
    choices = _composed_or_fail(config_name, [], return_hydra_config=True).hydra.runtime.choices
    return {group for group in choices if not group.startswith("hydra/")}


def _composed_or_fail(config_name: str, overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """`compose_config`, or one `error:` line with what Hydra says is wrong (it names the group and its options)."""
    try:
        return compose_config(config_name, overrides, return_hydra_config)
    except Exception as err:
        fail(str(err).split("Config search path")[0].strip())
