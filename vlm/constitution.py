"""`python -m vlm.constitution [key=value ...]`: preference pairs from a chat model's own answers.

For each prompt (images + the conversation up to its last user turn) the policy samples an answer; a critic
critiques it under one principle of the constitution, drawn at random, and revises it (`mode=revise`: chosen = the
revision, rejected = the answer; a revision equal to the answer is dropped), or scores `num_samples` answers
(`mode=best_of_n`: the best against the worst; ties are dropped). With `anchors` > 0, that share of the training
answers the critic leaves unchanged is kept too, as conversation samples: `stage=dpo` holds their likelihood up, so
what the policy already answers right does not drift while the pairs move it. Samples go to
OUT/{train,val}/shard-NNNNNN.tar, one shard per `prompts_per_shard` prompts, each written under a temporary name and
renamed into place with its counts beside it; a rerun skips the prompts whose shard is there. OUT/DONE, written
last, tells `stage=dpo` the patterns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import yaml
from omegaconf import DictConfig
from tqdm import tqdm

from vlm.cli import CONFIG_DIR, preflight, setup_logging, user_errors
from vlm.config import ConfigError, DataConfig, load_config, setting
from vlm.critics import (
    ChatCritic,
    Critic,
    CriticRefused,
    Example,
    HttpCompletion,
    Item,
    Principle,
    SyntheticCritic,
    api_key,
    fits_context,
    self_completion,
)
from vlm.data.captions import image_fields
from vlm.data.conversations import from_llava
from vlm.data.preferences import PAIRS_DONE
from vlm.data.shards import build_pipeline, list_shards
from vlm.data.sources import pair_sources, resolve
from vlm.errors import UserError
from vlm.metrics import normalize_exact

log = logging.getLogger("vlm.constitution")


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
    """A shipped constitution by name, or a YAML file; every problem names the file and what is wrong."""
    path = Path(name).expanduser()
    if not path.suffix:
        path = CONFIG_DIR / "constitutions" / f"{name}.yaml"
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


def read_prompts(pattern: str, key: str) -> Iterator[Item]:
    """Conversation shards -> one Item per sample: the conversation up to its last user turn, and its recorded last
    answer (the synthetic critic's ground truth). Caption and malformed samples are skipped with a warning."""
    for sample in build_pipeline(list_shards(pattern, key), lambda s: s, train=False, split_by_node=False):
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        try:
            record = json.loads(sample["json"])
            messages = from_llava(record["conversations"], name).messages
        except (KeyError, ValueError, TypeError, UserError) as err:
            log.warning("skipping %s: not a conversation sample (%s)", name, err)
            continue
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            log.warning("skipping %s: no user turn", name)
            continue
        reply = messages[last_user + 1]["content"] if last_user + 1 < len(messages) else None
        turns = record["conversations"]
        group = (turns[last_user + 1].get("type") if reply is not None else None) or record.get("type")
        fields = image_fields(sample)
        yield Item(name, messages[: last_user + 1], [sample[f] for f in fields], reply, fields,
                   None if group is None else str(group))


@dataclass
class Counts:
    prompts: int = 0
    kept: int = 0
    dropped_unchanged: int = 0  # revise: the revision equals the answer (nothing to learn)
    anchors: int = 0  # revise: unchanged answers kept as anchors (train split; counted in dropped_unchanged too)
    dropped_tie: int = 0  # best_of_n: every answer scored the same
    dropped_empty: int = 0  # the critique or the revision came back empty (small critics do that)
    dropped_failed: int = 0  # the critic's request failed, or the prompt could not be asked
    dropped_unscored: int = 0  # best_of_n: a reply held no number to score the answer by
    critic_failed: int = 0  # the critic's failed requests (a prompt may ask several)

    def add(self, other: Counts) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class PairMaker:
    """Prompts -> preference samples, a batch at a time: the policy answers, the critic judges."""

    def __init__(self, config: ConstitutionConfig, chat_model: Any, critic: Critic, constitution: Constitution):
        self.config, self.chat, self.critic, self.constitution = config, chat_model, critic, constitution

    def __call__(self, items: list[Item], seed: int, anchors: bool = False) -> tuple[list[dict[str, Any]], Counts]:
        """Pair samples for `items`, then (with `anchors`) the anchor samples, and the counts."""
        from vlm.generation.completion import PromptError

        counts, asked, prompts = Counts(prompts=len(items)), [], []
        for item in items:
            try:
                prompts.append(self.chat.prepare(item.messages, item.images))
                asked.append(item)
            except PromptError as err:
                log.warning("skipping %s: %s", item.key, err)
                counts.dropped_failed += 1
        principles = [self._principle(item) for item in asked]
        n = self.config.num_samples if self.config.mode == "best_of_n" else 1
        options = {"temperature": self.config.temperature, "top_p": self.config.top_p,
                   "max_new_tokens": self.config.max_new_tokens, "seed": seed}
        answers = self.chat.generate_batch(prompts * n, **options)  # sample k of prompt i at k * len(prompts) + i
        kept_right: list[tuple[Item, str]] = []
        if self.config.mode == "revise":
            judged = self._revised(asked, answers, principles, counts, kept_right if anchors else None)
        else:
            judged = self._best_of_n(asked, answers, principles, counts)
        samples = [self._sample(item, principle, record) for item, principle, record in judged]
        counts.kept, counts.anchors = len(samples), len(kept_right)
        return samples + [self._anchor(item, answer) for item, answer in kept_right], counts

    def _principle(self, item: Item) -> Principle:
        """One principle per prompt, drawn at random from those that judge its question type (all of them when none
        does), from the prompt's own seed, so a resumed run draws the same ones."""
        every = self.constitution.principles
        fitting = [p for p in every if p.judges(item.group)] or every
        return random.Random(f"{self.config.seed}:{item.key}").choice(fitting)

    def _revised(self, items: list[Item], answers: list[str], principles: list[Principle], counts: Counts,
                 kept_right: list[tuple[Item, str]] | None) -> list:
        """(item, principle, pair record) for each answer the critic changed; of those it left as they were, the
        share `anchors` (drawn from each prompt's own seed) goes to `kept_right`, when given."""
        out = []
        for item, answer, principle, revised in zip(items, answers, principles,
                                                    self.critic.revise(items, answers, principles), strict=True):
            if revised is None:
                counts.dropped_failed += 1
            elif not revised.revision.strip():
                counts.dropped_empty += 1
            elif normalize_exact(revised.revision) == normalize_exact(answer) or not answer.strip():
                counts.dropped_unchanged += 1
                draw = random.Random(f"{self.config.seed}:{item.key}:anchor").random()
                if kept_right is not None and answer.strip() and draw < self.config.anchors:
                    kept_right.append((item, answer))
            else:
                out.append((item, principle, {"chosen": revised.revision, "rejected": answer,
                                              "critique": revised.critique}))
        return out

    def _best_of_n(self, items: list[Item], answers: list[str], principles: list[Principle], counts: Counts) -> list:
        n, width = self.config.num_samples, len(items)
        scores = self.critic.score(items * n, answers, principles * n)
        out = []
        for i, (item, principle) in enumerate(zip(items, principles, strict=True)):
            rows = [(scores[k * width + i], answers[k * width + i]) for k in range(n)]
            if any(score is None for score, _ in rows):
                counts.dropped_failed += 1
                continue
            if any(math.isnan(score) for score, _ in rows):
                counts.dropped_unscored += 1
                continue
            best, worst = max(rows, key=lambda r: r[0]), min(rows, key=lambda r: r[0])
            if best[0] == worst[0] or normalize_exact(best[1]) == normalize_exact(worst[1]):
                counts.dropped_tie += 1
                continue
            out.append((item, principle, {"chosen": best[1], "rejected": worst[1],
                                          "scores": {"chosen": best[0], "rejected": worst[0]}}))
        return out

    def _sample(self, item: Item, principle: Principle, record: dict[str, Any]) -> dict[str, Any]:
        record = {"prompt": item.messages, **record, "principle": principle.name, "type": item.group,
                  "source": item.key}
        return {"json": json.dumps(record), **dict(zip(item.image_names, item.images, strict=True))}

    @staticmethod
    def _anchor(item: Item, answer: str) -> dict[str, Any]:
        """A conversation sample: the prompt and the policy's own answer, which the critic left unchanged."""
        record = {"conversations": [*item.messages, {"role": "assistant", "content": answer}], "type": item.group,
                  "source": item.key, "anchor": True}
        return {"json": json.dumps(record), **dict(zip(item.image_names, item.images, strict=True))}


def write_atomic_shard(path: Path, samples: list[dict[str, Any]], counts: Counts, first_key: int) -> None:
    """The shard, then its counts beside it, each under a temporary name renamed into place: a shard is whole or
    absent, and the counts file (written last) marks its prompts as done."""
    import webdataset as wds

    partial = path.with_name(path.name + ".partial")
    with wds.TarWriter(str(partial)) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": f"{first_key + i:09d}", **sample})
    os.replace(partial, path)
    counts_file = path.with_suffix(".json")
    partial = counts_file.with_name(counts_file.name + ".partial")
    partial.write_text(json.dumps(vars(counts)) + "\n")
    os.replace(partial, counts_file)


def batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def make_split(name: str, pattern: str, limit: int | None, directory: Path, make: PairMaker,
               config: ConstitutionConfig, total: int | None) -> tuple[str, Counts]:
    """Pairs for one split, a shard per `prompts_per_shard` prompts; shards already written are skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    counts, resumed = Counts(), 0
    items = read_prompts(pattern, f"data.{name}")
    wanted = min(x for x in (limit, total) if x is not None) if (limit, total) != (None, None) else None
    if limit is not None:
        items = (item for i, item in zip(range(limit), items, strict=False))
    shards = 0
    with tqdm(total=wanted, desc=f"{name} prompts", unit="prompt", dynamic_ncols=True, disable=None) as bar:
        for index, chunk in enumerate(batches(items, config.prompts_per_shard)):
            path, shards = directory / f"shard-{index:06d}.tar", index + 1
            if path.is_file() and path.with_suffix(".json").is_file():
                recorded = Counts(**json.loads(path.with_suffix(".json").read_text()))
                if recorded.prompts >= len(chunk):  # it holds these prompts (an earlier run may have asked fewer)
                    counts.add(recorded)
                    resumed += len(chunk)
                    bar.update(len(chunk))
                    continue
                log.info("%s: shard %d holds %d of its %d prompts (an earlier run stopped there): making it again",
                         name, index, recorded.prompts, len(chunk))
            samples, done, failed_before = [], Counts(), make.critic.failed
            for b, batch in enumerate(batches(iter(chunk), config.batch_size)):
                try:
                    made, batch_counts = make(batch, config.seed * 1_000_003 + index * 1009 + b, name == "train")
                except UserError as err:  # a refusal needs a fix first; a critic that was away, only a rerun
                    rerun = "" if isinstance(err, CriticRefused) else ": rerun the same command to go on from there"
                    raise UserError(f"{err}; {counts.prompts} {name} prompts were done and are kept in "
                                    f"{directory}{rerun}") from None
                except KeyboardInterrupt:
                    bar.close()
                    log.warning("stopped: %d %s prompts were done and are kept in %s; rerun the same command to go "
                                "on from there", counts.prompts, name, directory)
                    raise
                samples += made
                done.add(batch_counts)
                bar.set_postfix(kept=counts.kept + done.kept, dropped=counts.prompts + done.prompts - counts.kept
                                - done.kept, anchors=counts.anchors + done.anchors, refresh=False)
                bar.update(len(batch))  # draws the bar with the counts above
            done.critic_failed = make.critic.failed - failed_before
            write_atomic_shard(path, samples, done, index * config.prompts_per_shard)
            counts.add(done)
            log.info("%s: shard %d written (%d pairs and %d anchors from %d prompts)", name, index, done.kept,
                     done.anchors, done.prompts)
    if resumed:
        log.info("%s: %d prompts were already done by an earlier run and skipped", name, resumed)
    if counts.prompts == 0:
        raise ConfigError(f"data.{name}={pattern!r} gave no prompt: no conversation sample with a user turn")
    return str(directory / f"shard-{{000000..{shards - 1:06d}}}.tar"), counts


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


SETTINGS_FILE = "settings.json"  # what the shards in an output folder were made with


def pair_settings(config: ConstitutionConfig, checkpoint: Path, train: str | None, val: str | None,
                  constitution: Constitution) -> dict[str, Any]:
    """The settings that decide what each shard holds: a rerun that resumes a folder must use the same ones."""
    c = config
    url = c.critic.url and c.critic.url.rstrip("/")  # http://host:8000/ and http://host:8000 are one endpoint
    return {"checkpoint": str(checkpoint.resolve()), "data.train": train, "data.val": val, "critic.kind": c.critic.kind,
            "critic.url": url, "critic.api": c.critic.api, "critic.model": c.critic.model,
            "critic.max_new_tokens": c.critic.max_new_tokens, "constitution": c.constitution,
            "constitution_digest": constitution.digest,
            "mode": c.mode, "num_samples": c.num_samples, "temperature": c.temperature, "top_p": c.top_p,
            "max_new_tokens": c.max_new_tokens, "anchors": c.anchors, "batch_size": c.batch_size,
            "prompts_per_shard": c.prompts_per_shard, "seed": c.seed}


def check_resumable(out: Path, settings: dict[str, Any]) -> None:
    """Record `settings` in the output folder; where it already has shards, refuse settings that differ from theirs,
    since those shards would be skipped and kept as they are."""
    recorded_file = out / SETTINGS_FILE
    if any(out.glob("*/shard-*.tar")):
        if not recorded_file.is_file():  # written before settings were recorded: nothing to compare with
            log.warning("%s has shards but no %s: resuming them without checking their settings", out, SETTINGS_FILE)
            return
        recorded = json.loads(recorded_file.read_text())
        changed = [k for k in settings if k in recorded and recorded[k] != settings[k]]  # older folders record fewer
        if changed:
            listed = ", ".join(f"{k}={recorded.get(k)!r} (now {settings[k]!r})" for k in changed)
            raise ConfigError(f"{out} holds pairs made with {listed}; a rerun there resumes them as they are. Pass "
                              f"out= for a new folder, or delete {out} to start over")
        return
    out.mkdir(parents=True, exist_ok=True)
    recorded_file.write_text(json.dumps(settings, indent=2) + "\n")


def run(config: ConstitutionConfig) -> dict[str, Any]:
    """Write the pairs of every split; returns the summary (also OUT/summary.json)."""
    from vlm.chat import ChatModel
    from vlm.training.runs import latest_export

    started = time.time()
    check_critic(config)
    constitution = load_constitution(config.constitution)
    checkpoint = Path(config.checkpoint).expanduser() if config.checkpoint else latest_export(config.output_root,
                                                                                              "sft")
    if checkpoint is None:
        raise ConfigError(f"checkpoint=null and no sft export under {config.output_root!r}: run `python -m vlm.train "
                          f"stage=sft` first, or pass checkpoint=EXPORT_FOLDER")
    out = Path(config.out or Path(config.output_root) / "constitution" /
               f"{checkpoint.resolve().parent.name}-{config.critic.kind}-{config.mode}").expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} is a file; give a folder for the preference pairs")
    data = resolve(config.data, "conversations")
    chat_model = ChatModel.load(checkpoint, device=config.device)
    make = PairMaker(config, chat_model, build_critic(config, chat_model, constitution), constitution)
    # after the model and critic load: a start that fails there leaves no output folder behind
    check_resumable(out, pair_settings(config, checkpoint, data.train, data.val, constitution))
    synthetic = config.data.train is None
    splits = {"train": (data.train, config.max_train_prompts, config.data.synthetic.num_train if synthetic else None),
              "val": (data.val, config.max_val_prompts, config.data.synthetic.num_val if synthetic else None)}
    patterns, summary = {}, {}
    for name, (pattern, limit, total) in splits.items():
        if pattern and limit != 0:
            patterns[name], counts = make_split(name, pattern, limit, out / name, make, config, total)
            summary[name] = vars(counts)
    summary.update(checkpoint=str(checkpoint), critic=config.critic.kind, mode=config.mode,
                   constitution=config.constitution,
                   critic_failed_requests=sum(split["critic_failed"] for split in summary.values()),
                   wall_seconds=round(time.time() - started, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    train_pairs = summary.get("train", {}).get("kept")
    done = {"train": patterns.get("train"), "val": patterns.get("val"), "qa_val": data.val, "train_pairs": train_pairs,
            "checkpoint": str(checkpoint)}
    (out / PAIRS_DONE).write_text(json.dumps(done) + "\n")
    if train_pairs == 0:
        log.warning("no preference pair was kept from the %d train prompts: %s", summary["train"]["prompts"],
                    why_no_pairs(Counts(**summary["train"]), config.mode))
    elif train_pairs is not None:
        sources = pair_sources(done)  # what stage=dpo would find by itself as the newest output under output_root
        held_out = f" data.val='{sources.val}'" if sources.val else ""
        log.info("pairs in %s; train on them with: python -m vlm.train stage=dpo init_from=%s data.train='%s'%s",
                 out, checkpoint, sources.train, held_out)
    return summary


def why_no_pairs(counts: Counts, mode: str) -> str:
    """What most of a split's prompts were dropped for, and what to change: for the warning when none was kept."""
    better_critic = "a stronger critic (critic=http with a larger model)"
    reasons = {
        "dropped_unchanged": "the critic left the answers as they were (the model answers them right, or the critic "
                             "agrees with it); use more prompts (max_train_prompts), "
                             + ("a higher temperature, or " if mode == "best_of_n" else "mode=best_of_n, or ")
                             + better_critic,
        "dropped_tie": "the critic gave every answer of a prompt the same score; raise num_samples or temperature, "
                       f"or use {better_critic}",
        "dropped_unscored": f"the critic's replies held no number to score the answers by; use {better_critic}",
        "dropped_empty": f"the critiques or revisions came back empty; use {better_critic}",
        "dropped_failed": "the critic's requests failed or the prompts could not be asked (see the warnings above)",
    }
    most = max(reasons, key=lambda name: getattr(counts, name))
    return f"{reasons[most]}. stage=dpo has nothing to learn from here"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="constitution")
def main_hydra(cfg: DictConfig) -> dict[str, Any]:
    with user_errors():
        config = load_config(ConstitutionConfig, cfg)
        setup_logging(config.log_level)
        try:
            summary = run(config)
        except KeyboardInterrupt:  # the shards written so far are whole, and make_split said where they are
            raise SystemExit(130) from None
    print(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    preflight(sys.argv[1:], "constitution")
    main_hydra()


if __name__ == "__main__":
    main()
