"""What a `vlm.constitution` run is told: its settings (configs/constitution.yaml), the constitution file with its
principles and few-shot examples, and the critic those settings choose."""

from __future__ import annotations

import hashlib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm.cli import CONFIG_DIR
from vlm.config import ConfigError, DataConfig, setting, unknown_key_message
from vlm.constitution.critics import (
    ChatCritic,
    Critic,
    Example,
    HttpCompletion,
    Principle,
    SyntheticCritic,
    api_key,
    fits_context,
    self_completion,
)
from vlm.data.tokenizer import IMAGE_TOKEN


@dataclass
class CriticConfig:
    kind: str = setting(choices=("self", "synthetic", "http"))  # pick with critic=self|synthetic|http
    url: str | None = setting()  # http: the endpoint's base URL, e.g. http://127.0.0.1:8000
    api: str | None = setting(choices=("openai", "anthropic"))  # http: which API it speaks
    model: str | None = setting()  # http: the model name the endpoint expects
    api_key_env: str | None = setting()  # http: the environment variable holding the key (never the key itself)
    timeout: float = setting(minimum=0.1)  # http: seconds per request
    retries: int = setting(minimum=0)  # http: retries after a failure, with exponential backoff
    concurrency: int = setting(minimum=1)  # http: requests in flight at most
    max_new_tokens: int = setting(minimum=1)  # the longest critique or revision


@dataclass
class ConstitutionConfig:
    data: DataConfig = field(default_factory=DataConfig)  # the prompts: conversation shards, or the synthetic data
    critic: CriticConfig = field(default_factory=CriticConfig)
    checkpoint: str | None = setting()  # the export that answers; null: the newest sft export under output_root
    output_root: str = setting()
    out: str | None = setting()  # null: OUTPUT_ROOT/constitution/<export run>-<critic>-<mode>
    constitution: str = setting()  # a name in configs/constitutions/ or a path to a YAML file
    mode: str = setting(choices=("revise", "best_of_n"))
    num_samples: int = setting(minimum=2)  # best_of_n: answers per prompt
    temperature: float = setting(minimum=0)  # the policy's sampling temperature (0: greedy)
    top_p: float = setting(minimum=0, maximum=1)
    max_new_tokens: int = setting(minimum=1)  # the longest sampled answer
    anchors: float = setting(minimum=0, maximum=1)  # revise: share of the unchanged train answers kept as anchors
    batch_size: int = setting(minimum=1)  # prompts answered at once
    prompts_per_shard: int = setting(minimum=1)  # one output shard per this many prompts: what a rerun skips
    max_train_prompts: int | None = setting(minimum=0)  # null: all of data.train
    max_val_prompts: int | None = setting(minimum=0)  # null: all of data.val
    seed: int = setting()
    device: str | None = setting()
    log_level: str = setting()


@dataclass
class Constitution:
    principles: list[Principle]
    examples: list[Example]
    digest: str = ""  # of the file's text: a resumed run must use the constitution its shards were made with
    source: str = ""  # the shipped name, or the file's absolute path: how a resumed run's settings name it


PRINCIPLE_KEYS = ("name", "critique", "revision", "types")
EXAMPLE_KEYS = ("question", "answer", "critique", "revision")


def load_constitution(name: str) -> Constitution:
    """A shipped constitution by name, or a YAML file (a bare name is a shipped one unless only a file has it); every
    problem names the file and what is wrong."""
    path, shipped_path = Path(name).expanduser(), CONFIG_DIR / "constitutions" / f"{name}.yaml"
    shipped = not path.suffix and "/" not in name and (shipped_path.is_file() or not path.is_file())
    if shipped:
        path = shipped_path
    if not path.is_file():
        names = sorted(p.stem for p in (CONFIG_DIR / "constitutions").glob("*.yaml"))
        raise ConfigError(f"constitution={name!r}: no such file {str(path)!r}; shipped: {names}, or give a path")
    where = f"constitution file {str(path)!r}"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} holds {type(raw).__name__}; write a mapping with 'principles' (and 'examples')")
    refuse_unknown_keys(raw, ("principles", "examples"), where)
    principles = raw.get("principles")
    if not principles or not isinstance(principles, list):
        raise ConfigError(f"{where} has no principles; write a list under 'principles:', each with a 'critique' and a "
                          f"'revision' request")
    examples = raw.get("examples") or []
    if not isinstance(examples, list):
        raise ConfigError(f"{where}: 'examples' must be a list, each with question, answer, critique and revision")
    return Constitution([principle(p, i, where) for i, p in enumerate(principles)],
                        [example(e, i, where) for i, e in enumerate(examples)],
                        hashlib.sha256(path.read_bytes()).hexdigest()[:16], name if shipped else str(path.resolve()))


def types_judging_nothing(constitution: Constitution, question_types: set[str]) -> list[str]:
    """Each principle's `types` entries outside `question_types` (a misspelt one judges no prompt), as
    "'name': 'type'"."""
    return [f"{p.name!r}: {t!r}" for p in constitution.principles for t in p.types if t not in question_types]


def principle(entry: Any, index: int, where: str) -> Principle:
    """Principle `index` of a constitution file: critique and revision requests as text, an optional name and list
    of question types it judges."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: principle {index} is {entry!r:.60}; write each principle as a mapping with a "
                          f"'critique' and a 'revision' request (and optionally 'name', 'types')")
    label = f"{where}: principle {index} ({entry.get('name', 'unnamed')!r})"
    refuse_unknown_keys(entry, PRINCIPLE_KEYS, label)
    for key in ("critique", "revision"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            got = "has no" if entry.get(key) in (None, "") else f"has {type(entry[key]).__name__} for its"
            raise ConfigError(f"{label} {got} {key!r} request; write it as text")
        if IMAGE_TOKEN in entry[key]:
            raise ConfigError(f"{label}'s {key} request holds {IMAGE_TOKEN}: the prompt's images go with the "
                              f"conversation, and a placeholder here would ask for one more; remove it")
    types = entry.get("types") or []
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise ConfigError(f"{label} has types {types!r}; write a list of question types, e.g. [color, shape]")
    return Principle(str(entry.get("name", index)), entry["critique"], entry["revision"], tuple(types))


def example(entry: Any, index: int, where: str) -> Example:
    """Few-shot example `index`: a question, an answer, and the critique and revision the critic should write."""
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in EXAMPLE_KEYS):
        raise ConfigError(f"{where}: example {index} needs question, answer, critique and revision, each as text")
    refuse_unknown_keys(entry, EXAMPLE_KEYS, f"{where}: example {index}")
    for key in EXAMPLE_KEYS:
        if not entry[key].strip():
            raise ConfigError(f"{where}: example {index} has an empty {key!r}; write it as text")
        if IMAGE_TOKEN in entry[key]:
            raise ConfigError(f"{where}: example {index}'s {key} holds {IMAGE_TOKEN}: few-shot examples carry no "
                              f"image, and the placeholder would take the prompt's own image; remove it")
    return Example(*(entry[k] for k in EXAMPLE_KEYS))


def refuse_unknown_keys(entry: dict, known: tuple[str, ...], where: str) -> None:
    """A misspelt key would be ignored (a principle's `typo_types` would let it judge every question type)."""
    for key in entry:
        if key not in known:
            raise ConfigError(f"{where}: {unknown_key_message(str(key), known, what='key')}")


def check_critic(config: ConstitutionConfig) -> None:
    """The critic's settings, checked before the policy loads (which takes long for a large one)."""
    c = config.critic
    if c.kind != "http":
        if c.url:
            raise ConfigError(f"critic.url is set but critic.kind={c.kind!r}; pick critic=http to use it")
        return
    if not c.url:
        raise ConfigError("critic=http needs critic.url (the endpoint's base URL, e.g. http://127.0.0.1:8000)")
    parsed = urllib.parse.urlparse(c.url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"critic.url={c.url!r} is not an http:// or https:// URL, e.g. http://127.0.0.1:8000")
    if c.api is None:
        raise ConfigError("critic=http needs critic.api: openai or anthropic")
    api_key(c.api_key_env)


def build_critic(config: ConstitutionConfig, chat_model: Any, constitution: Constitution) -> Critic:
    c = config.critic
    if c.kind == "synthetic":
        return SyntheticCritic()
    if c.kind == "self":
        return ChatCritic(self_completion(chat_model, c.max_new_tokens), constitution.examples,
                          fits_context(chat_model), c.max_new_tokens)
    completion = HttpCompletion(c.url, c.api, c.model, c.api_key_env, c.timeout, c.retries, c.concurrency,
                                c.max_new_tokens)
    return ChatCritic(completion, constitution.examples)
