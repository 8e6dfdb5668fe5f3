"""Prompts in, preference samples out: each prompt's conversation up to its last user turn, the policy's answers to
it, and the critic's judgement of them (`mode=revise` or `best_of_n`), with the counts of what was kept and dropped."""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vlm.constitution.critics import Critic, Item, Principle
from vlm.constitution.settings import Constitution, ConstitutionConfig
from vlm.data.captions import image_fields
from vlm.data.conversations import from_llava
from vlm.data.processor import PROMPT_NAME, SampleError
from vlm.data.shards import build_pipeline, list_shards
from vlm.data.tiler import ImageLoadError
from vlm.errors import UserError
from vlm.metrics import normalize_exact

log = logging.getLogger(__name__)


def read_prompts(pattern: str, key: str) -> Iterator[Item]:
    """Conversation shards -> one Item per sample: the conversation up to its last user turn, and its recorded last
    answer (the synthetic critic's ground truth). Caption and malformed samples are skipped with a warning."""
    for sample in build_pipeline(list_shards(pattern, key), lambda s: s, train=False, split_by_node=False):
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        try:
            record = json.loads(sample["json"])
            conversation = from_llava(record["conversations"], name, record_group=record.get("type"))
            messages = conversation.messages
        except (KeyError, ValueError, TypeError, UserError, SampleError) as err:
            log.warning("skipping %s: not a conversation sample (%s)", name, err)
            continue
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            log.warning("skipping %s: no user turn", name)
            continue
        reply = messages[last_user + 1]["content"] if last_user + 1 < len(messages) else None
        # the answer's own group (its turn's "type", else the record's); without an answer, the record's
        group = conversation.groups[last_user + 1] if reply is not None else record.get("type")
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
    dropped_empty: int = 0  # the policy's answer, or the critique or revision, came back empty (small models do that)
    dropped_failed: int = 0  # the critic's request failed, or the prompt could not be asked (an unreadable image)
    dropped_unscored: int = 0  # best_of_n: a reply held no number to score the answer by
    dropped_markup: int = 0  # the chosen or rejected answer spells <image> or a chat control token (training's markup)
    critic_failed: int = 0  # the critic's failed requests (a prompt may ask several)

    def add(self, other: Counts) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class PairMaker:
    """Prompts -> preference samples, a batch at a time: the policy answers, the critic judges."""

    def __init__(self, config: ConstitutionConfig, chat_model: Any, critic: Critic, constitution: Constitution):
        self.config, self.chat, self.critic, self.constitution = config, chat_model, critic, constitution
        self.question_types: set[str] = set()  # the prompts' types seen, which the principles' `types` pick from

    def __call__(self, items: list[Item], seed: int, anchors: bool = False) -> tuple[list[dict[str, Any]], Counts]:
        """Pair samples for `items`, then (with `anchors`) the anchor samples, and the counts."""
        from vlm.generation.completion import PromptError

        counts, asked, prompts = Counts(prompts=len(items)), [], []
        self.question_types.update(item.group for item in items if item.group is not None)
        for item in items:
            try:
                prompts.append(self.chat.prepare(item.messages, item.images))
                asked.append(item)
            except (PromptError, ImageLoadError) as err:  # the prompt's own fault: the others go on
                log.warning("skipping %s: %s", item.key, str(err).removeprefix(f"{PROMPT_NAME} "))
                counts.dropped_failed += 1
        principles = [self._principle(item) for item in asked]
        n = self.config.num_samples if self.config.mode == "best_of_n" else 1
        options = {"temperature": self.config.temperature, "top_p": self.config.top_p,
                   "max_new_tokens": self.config.max_new_tokens, "seed": seed}
        answers = self.chat.generate_batch(prompts * n, **options)  # sample k of prompt i at k * len(prompts) + i
        asked, principles, answers = self._without_empty_answers(asked, principles, answers, n, counts)
        kept_right: list[tuple[Item, str]] = []
        if self.config.mode == "revise":
            judged = self._revised(asked, answers, principles, counts, kept_right if anchors else None)
        else:
            judged = self._best_of_n(asked, answers, principles, counts)
        samples = [self._sample(item, principle, record) for item, principle, record in judged]
        counts.kept, counts.anchors = len(samples), len(kept_right)
        return samples + [self._anchor(item, answer) for item, answer in kept_right], counts

    @staticmethod
    def _without_empty_answers(items: list[Item], principles: list[Principle], answers: list[str], n: int,
                               counts: Counts) -> tuple[list[Item], list[Principle], list[str]]:
        """Drop the prompts with an empty answer (any of their n samples) before the critic is asked: there is
        nothing to critique, nor a rejected answer to learn from, and the Messages API refuses an empty turn."""
        width = len(items)
        keep = [i for i in range(width) if all(answers[k * width + i].strip() for k in range(n))]
        counts.dropped_empty += width - len(keep)
        return ([items[i] for i in keep], [principles[i] for i in keep],
                [answers[k * width + i] for k in range(n) for i in keep])

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
            elif self._spells_markup(item, revision=revised.revision, answer=answer):
                counts.dropped_markup += 1
            elif normalize_exact(revised.revision) == normalize_exact(answer):
                counts.dropped_unchanged += 1
                draw = random.Random(f"{self.config.seed}:{item.key}:anchor").random()
                if kept_right is not None and draw < self.config.anchors:
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
            if self._spells_markup(item, chosen=best[1], rejected=worst[1]):
                counts.dropped_markup += 1
                continue
            out.append((item, principle, {"chosen": best[1], "rejected": worst[1],
                                          "scores": {"chosen": best[0], "rejected": worst[0]}}))
        return out

    def _spells_markup(self, item: Item, **texts: str) -> bool:
        """Whether one of `texts` (named by their keywords) spells <image> or a control token of the chat template:
        stage=dpo would read it as an image placeholder or a turn's start or end and skip the pair, so it is dropped
        here, named, and counted."""
        for name, text in texts.items():
            if problem := self.chat.processor.template.markup_problem(text, f"the {name}"):
                log.warning("skipping %s: %s", item.key, problem)
                return True
        return False

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
