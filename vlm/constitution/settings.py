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
from vlm.config import ConfigError, DataConfig, setting
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


def load_constitution(name: str) -> Constitution:
    """A shipped constitution by name, or a YAML file (a bare name is a shipped one unless only a file has it); every
    problem names the file and what is wrong."""
    path, shipped_path = Path(name).expanduser(), CONFIG_DIR / "constitutions" / f"{name}.yaml"
    if not path.suffix and "/" not in name and (shipped_path.is_file() or not path.is_file()):
        path = shipped_path
    if not path.is_file():
        shipped = sorted(p.stem for p in (CONFIG_DIR / "constitutions").glob("*.yaml"))
        raise ConfigError(f"constitution={name!r}: no such file {str(path)!r}; shipped: {shipped}, or give a path")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"constitution file {str(path)!r} is not valid YAML: {err}") from None
    principles = raw.get("principles") if isinstance(raw, dict) else None
    if not principles or not isinstance(principles, list):
        raise ConfigError(f"constitution file {str(path)!r} has no principles; write a list under 'principles:', "
                          f"each with a 'critique' and a 'revision' request")
    out = []
    for i, p in enumerate(principles):
        if not isinstance(p, dict):
            raise ConfigError(f"constitution file {str(path)!r}: principle {i} is {p!r:.60}; write each principle as "
                              f"a mapping with a 'critique' and a 'revision' request (and optionally 'name', 'types')")
        missing = [k for k in ("critique", "revision") if not str(p.get(k) or "").strip()]
        if missing:
            raise ConfigError(f"constitution file {str(path)!r}: principle {i} ({p.get('name', 'unnamed')!r}) has no "
                              f"{missing[0]!r} request")
        types = p.get("types") or []
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise ConfigError(f"constitution file {str(path)!r}: principle {i} ({p.get('name', 'unnamed')!r}) has "
                              f"types {types!r}; write a list of question types, e.g. [color, shape]")
        out.append(Principle(str(p.get("name", i)), str(p["critique"]), str(p["revision"]), tuple(types)))
    examples = []
    if not isinstance(raw.get("examples") or [], list):
        raise ConfigError(f"constitution file {str(path)!r}: 'examples' must be a list, each with question, answer, "
                          f"critique and revision")
    for i, e in enumerate(raw.get("examples") or []):
        try:
            examples.append(Example(*(str(e[k]) for k in ("question", "answer", "critique", "revision"))))
        except (KeyError, TypeError):
            raise ConfigError(f"constitution file {str(path)!r}: example {i} needs question, answer, critique and "
                              f"revision") from None
    return Constitution(out, examples, hashlib.sha256(path.read_bytes()).hexdigest()[:16])


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
