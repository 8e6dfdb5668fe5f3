"""Conversation samples for phase 2: a shard sample -> the encoded conversation, and, for held-out samples, the
assistant turns that validation answers and scores.

Caption samples (an image + `txt`) become a one-turn "describe the image" conversation, so `align` reads the same
shards as the contrastive stage. Conversation samples carry LLaVA-style `json` and their images in `<image>` order.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from typing import Any

from vlm.data.captions import image_fields, text_field
from vlm.data.processor import Encoded, Processor, PromptTooLong, SampleError
from vlm.data.synthetic import DESCRIBE_PROMPTS
from vlm.data.tokenizer import IMAGE_TOKEN

log = logging.getLogger(__name__)

Message = dict[str, str]
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class ScoredTurn:
    """One held-out assistant turn to answer: the true conversation before it, and what it should say."""

    prompt: Encoded  # the conversation up to the turn, ending in the generation prompt
    reference: str  # the recorded answer
    question: str  # the user message the turn answers
    group: str | None  # the record's (or the turn's) group field, e.g. the synthetic question type
    key: str  # shard:key of the sample
    images: list[str]  # the sample's image fields the prompt shows


@dataclass
class Conversation:
    messages: list[Message]
    groups: list[str | None]  # per message: its group field (the turn's own, else the record's)


def from_llava(conversations: Any, name: str = "sample", group_by: str = "type",
               record_group: str | None = None) -> Conversation:
    """LLaVA's [{"from": "human"|"gpt"|"system", "value": ...}] -> chat messages [{"role", "content"}]."""
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(f"{name}: 'conversations' must be a non-empty list")
    messages, groups = [], []
    for turn in conversations:
        if not isinstance(turn, dict):
            raise SampleError(f"{name}: each turn must be an object with 'from' and 'value'")
        role = ROLES.get(str(turn.get("from", turn.get("role"))))
        if role is None:
            raise SampleError(f"{name}: unknown role {turn.get('from', turn.get('role'))!r}; "
                              f"use one of {sorted(ROLES)}")
        if role == "assistant" and not any(m["role"] == "user" for m in messages):
            raise SampleError(f"{name}: turn {len(messages) + 1} is an assistant turn before any user turn; a "
                              f"conversation starts with the user (after an optional system turn)")
        messages.append({"role": role, "content": str(turn.get("value", turn.get("content", "")))})
        group = turn.get(group_by, record_group)
        groups.append(None if group is None else str(group))
    return Conversation(messages, groups)


class ConversationDecoder:
    """Raw shard sample -> {"encoded": Encoded, "key": "shard:key"}; with `evaluate`, also
    {"scored": [ScoredTurn, ...]}: the last assistant turn (`turns="last"`) or every one (`turns="all"`), each given
    the true history before it. `last_reply_only`: only the last assistant turn is labelled (the earlier ones are
    context)."""

    def __init__(self, processor: Processor, evaluate: bool = False, turns: str = "all", group_by: str = "type",
                 last_reply_only: bool = False):
        self.processor = processor
        self.evaluate = evaluate
        self.turns = turns
        self.group_by = group_by
        self.last_reply_only = last_reply_only

    def __call__(self, sample: dict) -> dict[str, Any]:
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        fields = image_fields(sample)
        conversation = self._conversation(sample, name)
        images = self.processor.tile_all([sample[f] for f in fields], name)  # once for the sample and each turn
        encoded = self.processor.encode(conversation.messages, images, name, last_reply_only=self.last_reply_only)
        out: dict[str, Any] = {"encoded": encoded, "key": name}
        if self.evaluate:
            out["scored"] = self._scored_turns(conversation, images, fields, name)
        return out

    def _conversation(self, sample: dict, name: str) -> Conversation:
        record = _json_record(sample, name) if "json" in sample else None
        # a caption sample: an image and its txt, maybe with metadata json beside them (img2dataset writes url, size)
        if record is None or ("conversations" not in record and "txt" in sample):
            if "txt" not in sample:
                raise SampleError(f"{name}: no 'json' field (a conversation) and no 'txt' field (a caption)")
            prompt = DESCRIBE_PROMPTS[zlib.crc32(str(sample.get("__key__")).encode()) % len(DESCRIBE_PROMPTS)]
            return Conversation([{"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}"},
                                 {"role": "assistant", "content": text_field(sample, "txt")}], [None, None])
        group = record.get(self.group_by)
        return from_llava(record.get("conversations"), name, self.group_by, None if group is None else str(group))

    def _scored_turns(self, conversation: Conversation, images: list, fields: list[str],
                      name: str) -> list[ScoredTurn]:
        messages = conversation.messages
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]  # encode() checked there is one
        scored = []
        for i in replies[-1:] if self.turns == "last" else replies:
            history = messages[:i]
            shown = sum(m["content"].count(IMAGE_TOKEN) for m in history)
            question = next((m["content"] for m in reversed(history) if m["role"] == "user"), "")
            try:
                prompt = self.processor.prompt(history, images[:shown], name)
            except PromptTooLong as err:  # the later turns' prompts are longer still
                if not scored:
                    raise
                log.warning("%s: assistant turn %d's prompt is %d tokens, more than the model's context of %d: it "
                            "and the %d after it are not scored, the %d before it are", name, len(scored), err.tokens,
                            self.processor.max_length, len(replies) - len(scored) - 1, len(scored))
                break
            scored.append(ScoredTurn(prompt, messages[i]["content"], question, conversation.groups[i], name,
                                     fields[:shown]))
        return scored


def _json_record(sample: dict, name: str) -> dict[str, Any]:
    try:
        record = json.loads(sample["json"])
    except (ValueError, TypeError) as err:
        raise SampleError(f"{name}: malformed json ({err})") from None
    if not isinstance(record, dict):
        raise SampleError(f"{name}: the json must be an object with 'conversations'")
    return record
