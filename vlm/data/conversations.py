"""Conversation samples for phase 2: a shard sample -> the encoded conversation, and for held-out samples the question
and reference answer that validation scores.

Caption samples (an image + `txt`) become a one-turn "describe the image" conversation, so `align` reads the same
shards as the contrastive stage. Conversation samples carry LLaVA-style `json` and their images in `<image>` order.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from vlm.data.captions import image_fields, text_field
from vlm.data.processor import Processor, SampleError, from_llava
from vlm.data.synthetic import DESCRIBE_PROMPTS
from vlm.data.tokenizer import IMAGE_TOKEN

Message = dict[str, str]


def first_exchange(messages: list[Message]) -> tuple[list[Message], str] | None:
    """The messages before the first assistant reply, and that reply (what eval asks and expects)."""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            return messages[:i], message["content"]
    return None


class ConversationDecoder:
    """Raw shard sample -> {"encoded": Encoded}, plus for held-out samples with a `type` the first question as a prompt
    ("prompt"), its reference answer ("answer") and the type."""

    def __init__(self, processor: Processor, evaluate: bool):
        self.processor = processor
        self.evaluate = evaluate

    def __call__(self, sample: dict) -> dict[str, Any]:
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        images = [sample[f] for f in image_fields(sample)]
        kind = None
        if "json" in sample:
            try:
                record = json.loads(sample["json"])
            except (ValueError, TypeError) as err:
                raise SampleError(f"{name}: malformed json ({err})") from None
            if not isinstance(record, dict):
                raise SampleError(f"{name}: the json must be an object with 'conversations'")
            messages = from_llava(record.get("conversations"), name)
            kind = record.get("type")
        else:
            prompt = DESCRIBE_PROMPTS[zlib.crc32(str(sample.get("__key__")).encode()) % len(DESCRIBE_PROMPTS)]
            messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}"},
                        {"role": "assistant", "content": text_field(sample, "txt")}]
        out: dict[str, Any] = {"encoded": self.processor.encode(messages, images, name)}
        if self.evaluate and kind is not None:
            question, answer = first_exchange(messages)  # encode() checked there is an assistant turn
            used = sum(m["content"].count(IMAGE_TOKEN) for m in question)
            out.update(prompt=self.processor.prompt(question, images[:used], name), answer=answer, type=kind)
        return out
