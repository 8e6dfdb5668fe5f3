"""Turn preference data (JSON list or JSONL, plus an image folder) into webdataset shards for `stage=dpo`.

Each record needs `prompt`, `chosen` and `rejected`, as plain strings or as chat-message lists (TRL's vision DPO
datasets write content as parts: {"type": "image"} and {"type": "text", "text": ...}), and `image` or `images` (file
names). Each sample holds {"prompt": [messages], "chosen": str, "rejected": str, + the record's other fields} as
`json` and its images as `0.jpg`, `1.png`, ... Records that training could not use are reported with their line and
reason, and skipped. Run `python data_scripts/preferences_to_shards.py --help` for the format.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_scripts/preferences_to_shards.py`: make `data_scripts` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_scripts.llava_to_shards import convert_records, image_names, records_parser  # noqa: E402
from data_scripts.shard_writing import (  # noqa: E402
    Skip,
    json_type,
    run,
)

IMAGE_PLACEHOLDER = "<image>"
EXAMPLE = """\
input (a JSON list, or JSONL with one record per line):
  {"image": "cat.jpg", "prompt": "<image>\\nWhat is on the mat?", "chosen": "A grey cat.",
   "rejected": "A dog and a cat."}
  {"images": ["a.png", "b.png"],
   "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                           {"type": "text", "text": "Which one is bigger?"}]}],
   "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "The first."}]}],
   "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "The second."}]}]}

  image / images   a file name relative to --images (or absolute), or a list of them
  prompt           a string (one user message) or messages ending with a user turn; one <image> (or image part)
                   per image, in order. A string prompt without any gets one <image> per image put in front.
  chosen, rejected a string, or messages whose last assistant message is the answer

output:
  OUT/train/shard-000000.tar ...  samples: KEY.json, KEY.0.jpg, KEY.1.png, ...
  OUT/val/...                     with --val-fraction > 0
  OUT/skipped.txt                 every skipped record and why (only when some were); records of a JSON
                                  list are numbered from 0, as in the list; JSONL records by line number

example:
  python data_scripts/preferences_to_shards.py --json rlaif_v.jsonl --images images/ --out pairs/ --val-fraction 0.02
  python -m vlm.train stage=dpo "data.train='pairs/train/shard-{000000..000009}.tar'" \\
      "data.val='pairs/val/shard-{000000..000000}.tar'"
"""


def check_text_parts(value: object, field: str) -> None:
    """Raise Skip for a text part whose 'text' is not a string (a list, a number) in a message list: read as the
    text of its Python repr, it would be written out as the prompt or the answer."""
    for number, message in enumerate(value if isinstance(value, list) else [], start=1):
        content = message.get("content", message.get("value")) if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "text" and not isinstance(part.get("text", ""), str):
                raise Skip("bad record", f"{field!r} message {number}: a text part's 'text' must be a string, got "
                                         f"{json_type(part['text'])}")


def normalise(record: dict, num_images: int) -> dict:
    """{"prompt": messages, "chosen": str, "rejected": str} with the record's other fields; raises Skip."""
    from vlm.data.preferences import answer_text, prompt_messages
    from vlm.data.processor import SampleError

    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise Skip(f"no {missing[0]}", f"no {missing[0]!r} field; a record needs prompt, chosen and rejected")
    for field in ("prompt", "chosen", "rejected"):
        check_text_parts(record[field], field)
    prompt = record["prompt"]
    if isinstance(prompt, str) and not prompt.strip():
        raise Skip("bad record", "'prompt' is empty: give the question the answers reply to")
    if isinstance(prompt, str) and IMAGE_PLACEHOLDER not in prompt:
        prompt = f"{IMAGE_PLACEHOLDER}\n" * num_images + prompt
    try:
        messages = prompt_messages(prompt, "record")
        chosen, rejected = (answer_text(record[k], k, "record") for k in ("chosen", "rejected"))
    except SampleError as err:
        raise Skip("bad record", str(err).removeprefix("record: ")) from None
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != num_images:
        raise Skip("placeholder mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the prompt for "
                                           f"{num_images} image(s); each image needs exactly one")
    for field, answer in (("chosen", chosen), ("rejected", rejected)):
        if IMAGE_PLACEHOLDER in answer:
            raise Skip("placeholder in answer", f"{field!r} holds {IMAGE_PLACEHOLDER} (or an image part): images go "
                                                f"in the prompt, an answer is text")
    if chosen.strip() == rejected.strip():
        raise Skip("chosen equals rejected", "'chosen' and 'rejected' are the same answer: nothing to learn")
    rest = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected", "image", "images")}
    return {**rest, "prompt": messages, "chosen": chosen, "rejected": rejected}


def main(argv: list[str] | None = None) -> int:
    parser = records_parser("preferences_to_shards.py", "Convert preference pairs (prompt, chosen, rejected + images) "
                            "into webdataset shards for vlm's dpo stage.", EXAMPLE, "JSON list or JSONL file")
    args = parser.parse_args(argv)
    return run(lambda a: convert_records(a, image_names, normalise, "python -m vlm.train stage=dpo"), args)


if __name__ == "__main__":
    raise SystemExit(main())
