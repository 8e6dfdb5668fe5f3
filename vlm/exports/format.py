"""The export folder format, `vlm-export/1`: safetensors weights, `config.json` metadata, a `tokenizer/` folder.

A folder is written under a temporary name and renamed into place, so a crash never leaves a half export, and
`is_complete` tells a finished export from anything else. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from vlm import __version__
from vlm.data.shards import shard_pattern_hint
from vlm.errors import UserError, first_line

log = logging.getLogger(__name__)

FORMAT = "vlm-export/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
REQUIRED = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR)
COPY_AGAIN = "copy it again from the run that wrote it"  # a run writes its export once, as it finishes


PROVENANCE_FILE = "vlm_provenance.json"  # in folders converted for other libraries (format=hf, format=open_clip)


class ExportError(UserError, FileNotFoundError):
    """An export folder that is missing, incomplete or of the wrong kind; the message names it."""


class ConversionError(UserError, ValueError):
    """A model setting, or an output folder, that a conversion for another library cannot take; the message names
    the setting and what would work."""


@dataclass
class ExportMeta:
    """config.json of an export folder: which stage wrote it and everything needed to rebuild the model."""

    stage: str  # the stage that trained it: contrastive, align, sft, ...
    model: dict[str, Any]  # the `model` config group (vlm.config.ModelConfig) it was built from
    tiler: dict[str, Any]  # the tiler settings it was trained with (vlm.data.tiler.TilerConfig)
    llm_config: dict[str, Any] | None = None  # phase 2: the LLM's Hugging Face config, to rebuild it offline
    # phase 2: the LLM's generation config (its generation_config.json, as far as it differs from the defaults): the
    # end-of-turn ids some LLMs name only there (Llama 3's <|eot_id|>, Phi-3's <|end|>)
    llm_generation_config: dict[str, Any] | None = None
    tokens_per_tile: int | None = None  # phase 2: image tokens per tile after reduction
    classnames: list[str] | None = None  # contrastive: class names in label order, for zero-shot eval
    templates: list[str] | None = None  # contrastive: zero-shot prompt templates
    train_config: dict[str, Any] | None = None  # the `stage` settings of the run that wrote it
    format: str = FORMAT

    @property
    def has_llm(self) -> bool:
        """A phase 2 model (an LLM reading image tokens); phase 1 exports are the aligned ViT and text tower."""
        return self.llm_config is not None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def read(cls, directory: Path) -> ExportMeta:
        path = directory / CONFIG_FILE
        try:
            raw = json.loads(path.read_text())
        except ValueError as err:
            raise ExportError(f"{str(path)!r} is not valid JSON ({err}); {COPY_AGAIN}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else None
            raise ExportError(f"{str(path)!r} is not a vlm export (format {found!r})")
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields if f.default is dataclasses.MISSING]
        if lacking := [name for name in required if name not in raw]:
            raise ExportError(f"{str(path)!r} lacks {lacking}: it is damaged; {COPY_AGAIN}")
        if wrong := [name for name, kind in (("stage", str), ("model", dict), ("tiler", dict))
                     if not isinstance(raw[name], kind)]:
            raise ExportError(f"{str(path)!r} is damaged: its {wrong[0]!r} is {json.dumps(raw[wrong[0]])[:60]}, not "
                              f"{'a string' if wrong[0] == 'stage' else 'an object'}; {COPY_AGAIN}")
        known = {f.name for f in fields}
        meta = cls(**{k: v for k, v in raw.items() if k in known})
        meta.check(path)
        return meta

    def check(self, path: Path) -> None:
        """Refuse what no model can be rebuilt from, naming the file and the key: a hand-edited config.json would
        otherwise fail deep in transformers, or with an error that reads as the command line's."""
        from transformers import AutoConfig

        from vlm.config import TilerConfig, check_templates, load_config, model_config_from

        def damaged(why: str) -> ExportError:
            return ExportError(f"{str(path)!r} is damaged: {why}; fix it or {COPY_AGAIN}")

        for key in ("llm_config", "llm_generation_config"):
            if (value := getattr(self, key)) is not None and not isinstance(value, dict):
                raise damaged(f"{key} is {json.dumps(value)[:60]}, not an object")
        try:
            load_config(TilerConfig, self.tiler, path="tiler.")
            model_config_from(self.model)
            if self.templates is not None:
                check_templates(self.templates, key="templates")
        except ValueError as err:  # the message names the key
            raise damaged(str(err).rstrip(".")) from None
        if self.llm_config is not None:
            try:
                AutoConfig.for_model(**self.llm_config)
            except (TypeError, ValueError, KeyError) as err:  # an unknown model_type lists every known one: cut
                raise damaged(f"llm_config is no transformers config ({first_line(err)[:160]})") from None


def is_complete(directory: Path) -> bool:
    """True for a finished export folder (a partial write is renamed into place only once whole)."""
    return all((directory / name).exists() for name in REQUIRED)


def write_export(directory: str | Path, model: nn.Module, meta: ExportMeta,
                 write_tokenizer: Callable[[Path], None]) -> Path:
    """Save `model` and `meta`; `write_tokenizer(path)` writes the tokenizer files into `path`."""
    directory = Path(directory)
    staging = new_staging_folder(directory)
    (staging / TOKENIZER_DIR).mkdir()
    save_model(model, str(staging / WEIGHTS_FILE))  # handles tied weights (shared storage)
    (staging / CONFIG_FILE).write_text(meta.to_json())
    write_tokenizer(staging / TOKENIZER_DIR)
    readable_as_the_folder(staging)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory


def readable_as_the_folder(folder: Path) -> None:
    """Give every file in `folder` the permissions the umask gives new files. safetensors writes its files
    owner-only (0600), so an export shared with other users or containers would not load."""
    mode = folder.stat().st_mode & 0o666  # mkdir applied the umask to 0777
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def new_staging_folder(final: Path) -> Path:
    """A new, empty, uniquely named folder beside `final` to write into before renaming it to `final` (a fixed name
    such as FINAL.partial could be a folder of the user's). It is named with the writer's process id, so the staging
    folders of writers killed before their rename (SIGKILL, a lost node) are removed by the next writer."""
    remove_abandoned_staging(final)
    staging = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.partial")
    staging.mkdir(parents=True)  # with the umask's permissions, as the finished folder should have
    return staging


def remove_abandoned_staging(final: Path) -> None:
    """Delete the staging folders of `final` whose writer process no longer runs on this machine."""
    prefix = f".{final.name}."
    for staging in final.parent.glob(f"{glob.escape(prefix)}*.partial") if final.parent.is_dir() else []:
        writer = staging.name[len(prefix):].split("-", 1)[0]
        if writer.isdigit() and not process_runs(int(writer)):
            log.info("removing %s, left by a writer that was stopped before it finished", staging)
            shutil.rmtree(staging, ignore_errors=True)


def process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def not_a_folder(directory: str | Path) -> str | None:
    """Why `directory` is no export folder to open (missing, or a file), or None when it is a folder."""
    path = Path(directory).expanduser()
    if path.is_dir():
        return None
    if path.suffix == ".ckpt" and path.is_file():
        return (f"{str(directory)!r} is a training checkpoint, not an export; pass its run's export folder "
                f"({str(path.parent.parent / 'export')!r}), which the run writes when it ends (resume=PATH.ckpt "
                f"finishes an interrupted run)")
    if path.exists():
        return f"{str(directory)!r} is a file; pass the export folder that holds it ({str(path.parent)!r})"
    return f"{str(directory)!r} does not exist: give an export folder (OUTPUT_ROOT/STAGE/RUN/export)"


def require_export_folder(checkpoint: str | Path) -> None:
    """Raise ExportError naming the checkpoint= setting when it names no folder to open (missing, or a file)."""
    if problem := not_a_folder(checkpoint):
        raise ExportError(f"checkpoint={problem}")


def missing_file_hint(directory: Path) -> str:
    """What the folder missing an export's files is instead, and what to pass."""
    if (directory / "export").is_dir():
        return f"it is a run folder; pass its export folder {str(directory / 'export')!r}"
    if (directory / "train").is_dir():  # a converter's or vlm.constitution's output
        return (f"it holds data shards, not a model (as data: data.train={shard_pattern_hint(str(directory))!r}); "
                f"pass an export folder (OUTPUT_ROOT/STAGE/RUN/export)")
    if (directory / PROVENANCE_FILE).exists():
        source = json.loads((directory / PROVENANCE_FILE).read_text()).get("source")
        return (f"it was converted for another library (it loads with transformers or open_clip); vlm reads the "
                f"export it came from: {source!r}")
    if any((directory / name).exists() for name in REQUIRED):
        return f"it is incomplete: {COPY_AGAIN}"
    if directory.name == "checkpoints" and (directory.parent / "export").is_dir():
        return (f"it holds a run's training checkpoints; pass the export beside them "
                f"{str(directory.parent / 'export')!r}")
    run = directory.parent if directory.name == "checkpoints" else directory
    if any(directory.glob("*.ckpt")) or any(directory.glob("checkpoints/*.ckpt")):  # stopped before its export
        return (f"it holds training checkpoints of a run that has not written its export yet; "
                f"resume=auto run_name={run.name} (with its stage and output_root) finishes it")
    if runs := sorted(directory.glob("*/export/" + REQUIRED[0])):
        return f"it holds runs; pass one's export folder, e.g. {str(runs[-1].parent)!r}"
    return "pass the export folder a training run writes when it finishes (OUTPUT_ROOT/STAGE/RUN/export)"


def read_meta(directory: str | Path, expect_stage: tuple[str, ...] | None = None) -> ExportMeta:
    """The metadata of an export folder, after checking that every required file is there."""
    if problem := not_a_folder(directory):
        raise ExportError(problem)
    directory = Path(directory).expanduser()
    for name in REQUIRED:
        if not (directory / name).exists():
            raise ExportError(f"{str(directory)!r} is not an export folder: it has no {name!r}; "
                              f"{missing_file_hint(directory)}")
    meta = ExportMeta.read(directory)
    if expect_stage and meta.stage not in expect_stage:
        raise ExportError(f"{str(directory)!r} holds a {meta.stage!r} model; expected one of {list(expect_stage)}")
    return meta


def load_weights(model: nn.Module, directory: str | Path) -> None:
    """Load the folder's weights into `model`; every key must match."""
    weights = Path(directory).expanduser() / WEIGHTS_FILE
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{str(weights)!r} cannot be read ({first_line(err)}): it is damaged or cut short; "
                          f"{COPY_AGAIN}") from None
    except RuntimeError as err:  # a tensor of another shape than config.json's settings give
        # torch's first line only says "Error(s) in loading state_dict"; the next names the tensor and its shapes
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), first_line(err))
        raise ExportError(f"{str(weights)!r} does not match the model its config.json describes ({detail})") from None
    if missing or unexpected:
        raise ExportError(f"{str(directory)!r} does not match the model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")


def refuse_taken(out: str | Path) -> None:
    """A conversion writes a new folder: an existing non-empty `out` is refused (converters call this before loading
    the model, so a taken `out` fails at once)."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else "already exists and is not empty"
        raise ConversionError(f"out={str(out)!r} {what}; give a new folder")
    nearest = next(p for p in out.parents if p.exists())  # the folder the new ones will be made in
    if not nearest.is_dir():
        raise ConversionError(f"out={str(out)!r}: {str(nearest)!r} is a file, so no folder can be made inside it")
    if not os.access(nearest, os.W_OK):
        raise ConversionError(f"out={str(out)!r}: no permission to make folders in {str(nearest)!r}")


@contextlib.contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `out` and rename it to `out` once the block finishes; on an error the
    staging folder is removed, so `out` is either complete or absent. An existing non-empty `out` is refused."""
    out = Path(out).expanduser().resolve()  # "." has no name to put a staging folder beside
    refuse_taken(out)
    try:
        staging = new_staging_folder(out)
    except OSError as err:  # a file system that refuses new folders (read-only, /sys, ...)
        raise ConversionError(f"out={str(out)!r}: cannot make a folder beside it ({err.strerror or err})") from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    readable_as_the_folder(staging)
    if out.exists():  # empty, checked above; filled in place, so a shell standing in it (out=.) sees the files
        for item in staging.iterdir():
            item.rename(out / item.name)
        staging.rmdir()
    else:
        staging.rename(out)


def write_provenance(folder: Path, source: Path, meta: ExportMeta, target: str, **details: Any) -> None:
    """Record where a converted folder came from: the source export, its stage, vlm's version and the route taken."""
    record = {"source": str(source.resolve()), "source_stage": meta.stage, "vlm_version": __version__,
              "format": target, **details}
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
