"""Preference pairs for `stage=dpo`: the record form, its decoding into a chosen and a rejected row that share their
images, and where `python -m vlm.constitution` leaves its pairs.

A preference sample holds `json` = {"prompt": [{"role", "content"}, ...] (ending with a user turn), "chosen": str,
"rejected": str, and optionally "principle", "critique", "type"} and its images `0.png`, `1.jpg`, ... in `<image>`
order. Shards may mix in conversation samples (LLaVA `json` with "conversations"). In training they are anchors:
their answers' likelihood is kept up (`stage.anchor_weight`), so the answers the policy already gets right do not
drift while the pairs move it. Held out, they are answered and scored as in `sft`, so one validation reports both
the rewards and the answers' exact match.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webdataset.shardlists import expand_urls

from vlm.config import ConfigError
from vlm.data.captions import image_fields
from vlm.data.conversations import ConversationDecoder, from_llava
from vlm.data.packing import padded_batch
from vlm.data.processor import Encoded, Processor, SampleError, pad_batch
from vlm.data.shards import REMOTE_PREFIXES
from vlm.data.tokenizer import IMAGE_TOKEN, joined_parts
from vlm.errors import json_type

PAIR_SCAN_SAMPLES = 1000  # samples read at start-up to tell preference shards from conversation shards
PAIRS_DONE = "DONE"  # written last into a finished `vlm.constitution` output folder: the shard patterns to train on


@dataclass
class Pair:
    chosen: Encoded  # prompt + chosen answer; labels on the answer only
    rejected: Encoded  # prompt + rejected answer; the same images as `chosen`
    key: str  # shard:key, for precomputed reference log-probs


def message_text(content: Any, name: str) -> str:
    """A message's content as text: a string, or a list of parts ({"type": "text", "text"} and image parts, which
    become `<image>` placeholders in place, each part on its own line: `joined_parts`), as TRL's vision datasets
    write them."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                pieces.append(str(part.get("text", "")))
            elif kind in ("image", "image_url"):
                pieces.append(IMAGE_TOKEN)
            else:
                raise SampleError(f"{name}: unknown content part {part!r:.80}; use text or image parts")
        return joined_parts(pieces)
    raise SampleError(f"{name}: message content must be a string or a list of parts, got {json_type(content)}")


def turn_text(turn: dict, name: str, which: str) -> str:
    """The text of a {"role", "content"} or LLaVA {"from", "value"} message; `which` names it in the error for a
    message without either."""
    if "content" not in turn and "value" not in turn:
        raise SampleError(f"{name}: {which} has no 'content'")
    return message_text(turn.get("content", turn.get("value")), name)


def _as_text_turn(turn: dict, name: str) -> dict:
    """A turn with its text in "content" alone: from_llava reads "value" first, so parts left there would reach the
    model as the list's repr."""
    text = turn_text(turn, name, f"a {turn.get('role', turn.get('from', 'prompt'))!r} message")
    return {**{k: v for k, v in turn.items() if k != "value"}, "content": text}


def prompt_messages(prompt: Any, name: str) -> list[dict[str, str]]:
    """`prompt` as chat messages ending with a user turn: a plain string is one user message; a list may use
    {"role", "content"} or LLaVA's {"from", "value"}."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise SampleError(f"{name}: empty 'prompt'")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise SampleError(f"{name}: 'prompt' must be a string or a non-empty list of messages")
    turns = [_as_text_turn(t, name) if isinstance(t, dict) else t for t in prompt]
    messages = from_llava(turns, name).messages
    if messages[-1]["role"] != "user":
        raise SampleError(f"{name}: the prompt must end with a user turn, not {messages[-1]['role']!r}")
    return messages


MISSING = object()  # a record without the field, told apart from one whose field is null


def answer_text(answer: Any, field: str, name: str) -> str:
    """`chosen` / `rejected` as text: a string, or messages whose last assistant turn is the answer. `answer` is
    MISSING when the record has no such field."""
    if answer is MISSING:
        raise SampleError(f"{name}: no {field!r} field; a preference record needs 'prompt', 'chosen' and 'rejected'")
    if isinstance(answer, list):
        replies = [m for m in answer if isinstance(m, dict) and m.get("role", m.get("from")) in ("assistant", "gpt")]
        if not replies:
            raise SampleError(f"{name}: {field!r} is a message list without an assistant message")
        answer = turn_text(replies[-1], name, f"the assistant message of {field!r}")
    if not isinstance(answer, str) or not answer.strip():
        got = "an empty string" if isinstance(answer, str) else json_type(answer)
        raise SampleError(f"{name}: {field!r} must be a non-empty string or a message list, got {got}")
    return answer


def read_record(sample: dict, name: str) -> dict[str, Any]:
    try:
        record = json.loads(sample["json"])
    except KeyError:
        raise SampleError(f"{name}: no 'json' field") from None
    except (ValueError, TypeError) as err:
        raise SampleError(f"{name}: malformed json ({err})") from None
    if not isinstance(record, dict):
        raise SampleError(f"{name}: the json must be an object with 'prompt', 'chosen' and 'rejected'")
    return record


class PreferenceDecoder:
    """Raw shard sample -> {"pair": Pair}. Conversation samples become {"encoded", "key"} with their last answer
    labelled (an anchor, as a pair's chosen answer is); with `evaluate`, also {"scored"}, answered and scored."""

    def __init__(self, processor: Processor, evaluate: bool = False, turns: str = "all", group_by: str = "type"):
        self.processor = processor
        self.conversations = ConversationDecoder(processor, evaluate, turns, group_by, last_reply_only=True)

    def __call__(self, sample: dict) -> dict[str, Any]:
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        record = read_record(sample, name)
        if "chosen" not in record and "conversations" in record:
            return self.conversations(sample)
        prompt = prompt_messages(record.get("prompt"), name)
        chosen, rejected = (answer_text(record.get(f, MISSING), f, name) for f in ("chosen", "rejected"))
        images = self.processor.tile_all([sample[f] for f in image_fields(sample)], name)  # once for both answers
        rows = [self.processor.encode([*prompt, {"role": "assistant", "content": answer}], images, name,
                                      last_reply_only=True) for answer in (chosen, rejected)]
        return {"pair": Pair(rows[0], rows[1], name)}


def refuse_conversations_only(pattern: str, key: str = "data.train") -> None:
    """Shards of conversations alone (sft data) given to stage=dpo would train every step on anchors and never on a
    pair. Refused at start-up when, in every `::` part of `pattern`, the first PAIR_SCAN_SAMPLES samples hold
    conversations and no pair. Remote or unreadable shards are left to the data pipeline."""
    conversations = 0
    for part in pattern.split("::"):
        found, seen = _scan_for_a_pair(part)
        if found is not False:  # a pair, or shards this cannot read
            return
        conversations += seen
    if conversations:
        raise ConfigError(f"{key}={pattern!r} holds conversations and no preference pair (the first {conversations:,} "
                          f"samples read): stage=dpo learns from pairs with 'prompt', 'chosen' and 'rejected', which "
                          f"python -m vlm.constitution writes (or data_scripts/preferences_to_shards.py from JSON). "
                          f"Conversations join pairs as anchors (PAIRS::CONVERSATIONS); to learn from them alone, use "
                          f"stage=sft")


def _scan_for_a_pair(pattern: str) -> tuple[bool | None, int]:
    """(True, _) when one of the first PAIR_SCAN_SAMPLES samples of `pattern` is a pair, (False, conversations seen)
    when none is, (None, _) when a shard is remote or cannot be read."""
    seen = 0
    for url in expand_urls(pattern):
        if url.startswith(REMOTE_PREFIXES):
            return None, seen
        try:
            with tarfile.open(url.removeprefix("file:")) as shard:
                for member in shard:
                    if not member.name.endswith(".json") or (data := shard.extractfile(member)) is None:
                        continue
                    with contextlib.suppress(ValueError):
                        record = json.load(data)
                        if isinstance(record, dict) and "chosen" in record:
                            return True, seen
                        seen += isinstance(record, dict) and "conversations" in record
                    if seen >= PAIR_SCAN_SAMPLES:
                        return False, seen
        except (OSError, tarfile.TarError):
            return None, seen
    return False, seen


def latest_pairs(root: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest finished `vlm.constitution` output under `root` (OUTPUT_ROOT/constitution): its folder and its
    record, the shard patterns {"train", "val", "qa_val"} (None for a split it wrote no prompt of) with "train_pairs"
    and "checkpoint"; or None."""
    done = sorted(Path(root).expanduser().glob(f"*/{PAIRS_DONE}"), key=lambda p: p.stat().st_mtime)
    return (done[-1].parent, json.loads(done[-1].read_text())) if done else None


@dataclass(frozen=True)
class PreferenceCollator:
    """Decoded `stage=dpo` samples -> {"pairs": the pairs' rows (None without pairs), "anchors": the training
    conversation samples as a padded batch (None without them), "scored": the held-out conversations' turns to
    answer}. Held-out conversations are only answered, so they are not padded into a batch."""

    pad_id: int

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        anchors = [s for s in samples if "encoded" in s and "scored" not in s]
        return {"pairs": collate_pairs([s["pair"] for s in samples if "pair" in s], self.pad_id),
                "anchors": padded_batch(anchors, self.pad_id) if anchors else None,
                "scored": [s["scored"] for s in samples if "scored" in s]}


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, Any] | None:
    """B pairs -> one batch of 2B rows, the B chosen rows first, then the B rejected ones in the same order:
    input_ids / attention_mask / labels (2B, L), image_slots for all rows, and `pixel_values` of the chosen rows only
    (the rejected rows show the same images, so their features are the chosen rows' features again). None for B=0."""
    if not pairs:
        return None
    chosen = [p.chosen for p in pairs]
    batch = pad_batch(chosen + [p.rejected for p in pairs], pad_id, tiles_of=chosen)  # tiles: (N of B prompts, 3, S, S)
    batch["keys"] = [p.key for p in pairs]
    batch["tiles"] = [len(p.chosen.pixel_values) for p in pairs]  # per pair, for the feature cache
    return batch
