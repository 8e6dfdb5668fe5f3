"""Turn LLaVA-format conversation data (JSON list or JSONL, plus an image folder) into webdataset shards for `sft`.

Each sample holds the record as `json` (conversations with roles normalised to human/gpt/system, other fields kept)
and its images as `0.jpg`, `1.png`, ... in the order of the record's `image` list, with the original bytes. Records
that training could not use are reported with their index, id and reason, and skipped.
Run `python data_scripts/llava_to_shards.py --help` for the format.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python data_scripts/llava_to_shards.py`: make `data_scripts` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_scripts.shard_writing import (  # noqa: E402
    DataError,
    Skip,
    add_output_arguments,
    add_run_arguments,
    image_group,
    json_type,
    load_json,
    plan_jobs,
    prepare_output,
    read_image,
    read_text_keeping_bad_bytes,
    repeated_keys,
    report,
    run,
    text_lines,
    utf8,
    write_shards,
)

IMAGE_PLACEHOLDER = "<image>"
# Roles as written in the shards; OpenAI-style names are accepted and mapped.
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}
EXAMPLE = """\
input (a JSON list, or JSONL with one record per line):
  [{"id": "000000033471",
    "image": "coco/train2017/000000033471.jpg",
    "conversations": [
      {"from": "human", "value": "<image>\\nWhat are the colors of the bus in the image?"},
      {"from": "gpt", "value": "The bus in the image is white and red."}]},
   {"id": "cmp-1", "image": ["a.jpg", "b.jpg"],
    "conversations": [{"from": "human", "value": "<image>\\n<image>\\nWhich one is bigger?"},
                      {"from": "gpt", "value": "The first."}]},
   {"id": "text-only", "conversations": [...]}]

  image          a path relative to --images (or absolute), a list of them, or absent for text-only records
                 (the key `images` is read the same way)
  conversations  turns {"from": human|gpt|system, "value": "..."}; user/assistant are accepted as human/gpt.
                 Every image needs one <image> placeholder in the text, in the order of the image list.

output:
  OUT/train/shard-000000.tar ...  samples: KEY.json (the record), KEY.0.jpg, KEY.1.png, ...
  OUT/val/...                     with --val-fraction > 0
  OUT/skipped.txt                 every skipped record and why (only when some were); records of a JSON
                                  list are numbered from 0, as in the list; JSONL records by line number

example:
  python data_scripts/llava_to_shards.py --json llava_v1_5_mix665k.json --images data/ --out shards/ \\
      --val-fraction 0.01
  python -m vlm.train stage=sft "data.train='shards/train/shard-{000000..000664}.tar'" \\
      "data.val='shards/val/shard-{000000..000006}.tar'"

prompts for vlm.constitution (records whose conversation ends with the user's question):
  python data_scripts/llava_to_shards.py --prompts --json prompts.jsonl --images data/ --out prompts/
  python -m vlm.constitution checkpoint=checkpoints/sft/RUN/export \\
      "data.train='prompts/train/shard-{000000..000009}.tar'"
"""


@dataclass
class Entry:
    where: str  # "record 12 (id 'abc')" or "line 13 (id 'abc')"
    record: Any  # the parsed record (`null` in the file: None); None too when the line was not valid JSON
    problem: str = ""  # why the line could not be parsed, when it could not


def read_records(path: Path) -> list[Entry]:
    """Records of a JSON list, or of JSONL (one JSON object per line); told apart by the first character. Bytes that
    are not UTF-8 (a Latin-1 line, a cut-off character) are kept as lone surrogates, so that only the records holding
    them are refused, each with its line."""
    try:
        text = read_text_keeping_bad_bytes(path)
    except FileNotFoundError:
        raise DataError(f"JSON file not found: {path}") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("{") and _one_object(text):
        raise DataError(f"{path} holds one JSON object; a .json file holds a list of records ([{{...}}, {{...}}]), "
                        f"and a .jsonl file one record per line")
    if text.lstrip().startswith("["):
        try:
            records = load_json(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
        entries = [_entry(_where("record", i, r), r) for i, r in enumerate(records)]
    else:
        entries = []
        for number, line in enumerate(text_lines(text), start=1):
            if not line.strip():
                continue
            try:
                record = load_json(line)
            except json.JSONDecodeError as err:
                if number == 1 and not entries:  # e.g. a single pretty-printed object rather than a list or JSONL
                    raise DataError(f"{path} is neither a JSON list of records nor JSONL (one record per line): "
                                    f"line 1: {err.msg}") from None
                entries.append(Entry(f"line {number}", None, f"not valid JSON ({err.msg})"))
                continue
            entries.append(_entry(_where("line", number, record), record))
    if not entries:
        raise DataError(f"{path} holds no records")
    return entries


def _entry(where: str, record: Any) -> Entry:
    problem = repeated_keys(record)
    return Entry(where, None, problem) if problem else Entry(where, record)


def _one_object(text: str) -> bool:
    """Whether `text` is one JSON object as a whole; JSONL named .json, or a cut-off file, is not (read as JSONL,
    its records or its broken line are then reported line by line)."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _where(unit: str, number: int, record: Any) -> str:
    ident = record.get("id") if isinstance(record, dict) else None
    return f"{unit} {number}" + (f" (id {ident!r})" if ident is not None else "")


def image_names(record: dict) -> list[str]:
    """The record's image files, from `image` (LLaVA's key) or `images` (TRL's and many multi-image sets'), never
    both; none for a text-only record."""
    if "image" in record and "images" in record:
        raise Skip("bad record", "both 'image' and 'images': give the file names in one of them")
    image = record.get("images", record.get("image"))
    if image is None:
        return []
    names = [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise Skip("bad record", f"'image'/'images' must be a file name or a list of file names, got {image!r:.80}")
    return names


def normalise_conversations(record: dict, num_images: int, prompts: bool = False) -> list[dict]:
    """The record's turns with roles mapped to human/gpt/system; raises Skip when training could not use them, or
    with `prompts`, when vlm.constitution could not (it needs a user turn to answer, not an assistant turn)."""
    turns = record.get("conversations")
    if turns is not None and not isinstance(turns, list):
        raise Skip("bad record", f"'conversations' must be a list of turns ({{\"from\": ..., \"value\": ...}}), got "
                                 f"{json_type(turns)}")
    if not turns:
        raise Skip("no conversations", "'conversations' is missing or empty")
    normalised = []
    for number, turn in enumerate(turns, start=1):
        if isinstance(turn, dict) and turn.get("value") is not None and not isinstance(turn["value"], str):
            raise Skip("bad turn", f"turn {number}: 'value' must be a string, got {json_type(turn['value'])}")
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise Skip("bad turn", f"turn {number} is not an object with a text 'value': {turn!r:.80}")
        if not isinstance(turn.get("from", ""), str):
            raise Skip("bad turn", f"turn {number}: 'from' must be a string, got {json_type(turn['from'])}")
        role = ROLES.get(turn.get("from", "").strip().lower())
        if role is None:
            raise Skip("unknown role", f"turn {number} has unknown role {turn.get('from')!r}; use human, gpt or "
                                       "system (user and assistant are accepted too)")
        if role == "gpt" and not turn["value"].strip():
            raise Skip("empty assistant turn", f"turn {number}: the assistant (gpt) reply is empty")
        if role == "human" and not turn["value"].strip():  # a chat refuses an empty message too
            raise Skip("empty user turn", f"turn {number}: the user (human) turn is empty; it asks nothing")
        if role != "human" and IMAGE_PLACEHOLDER in turn["value"]:  # vlm.serve and vlm.infer take images there only
            raise Skip("image outside a user turn", f"turn {number}: {IMAGE_PLACEHOLDER} in a {role} turn; images "
                                                    "belong in user (human) turns")
        normalised.append({**turn, "from": role})
    if prompts and not any(turn["from"] == "human" for turn in normalised):
        raise Skip("no user turn", "no user (human) turn: there is no prompt to answer")
    if not prompts and not any(turn["from"] == "gpt" for turn in normalised):
        raise Skip("no assistant turn", "no assistant (gpt) turn: there is nothing to learn from (prompts for "
                                        "vlm.constitution need --prompts)")
    first = next(number for number, turn in enumerate(normalised, start=1) if turn["from"] != "system")
    if normalised[first - 1]["from"] == "gpt":
        raise Skip("assistant turn first", f"turn {first}: an assistant (gpt) turn before any user (human) turn; a "
                                           "conversation starts with the user (after an optional system turn)")
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in normalised)
    if placeholders != num_images:
        raise Skip("placeholder mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the conversation "
                                           f"for {num_images} image(s); each image needs exactly one")
    return normalised


def main(argv: list[str] | None = None) -> int:
    parser = records_parser("llava_to_shards.py", "Convert LLaVA-format conversations (+ images) into webdataset "
                            "shards for vlm's sft stage.", EXAMPLE, "LLaVA JSON list or JSONL file")
    parser.add_argument("--prompts", action="store_true",
                        help="the records are prompts for vlm.constitution: a conversation may end with a user turn "
                             "and need not hold an assistant turn")
    args = parser.parse_args(argv)
    use = "python -m vlm.constitution checkpoint=SFT_EXPORT" if args.prompts else "python -m vlm.train stage=sft"
    return run(lambda a: convert_records(a, image_names, partial(with_conversations, prompts=a.prompts), use), args)


def with_conversations(record: dict, num_images: int, prompts: bool = False) -> dict:
    return {**record, "conversations": normalise_conversations(record, num_images, prompts)}


def records_parser(prog: str, description: str, example: str, json_help: str) -> argparse.ArgumentParser:
    """The command line of a converter from a JSON/JSONL file of records plus an image folder."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=example,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="FILE", type=Path, required=True, help=json_help)
    parser.add_argument("--images", metavar="DIR", type=Path, required=True,
                        help="folder the image paths are relative to")
    add_output_arguments(parser, "records")
    add_run_arguments(parser, "input")
    return parser


def convert_records(args: argparse.Namespace, names_of: Callable[[dict], list[str]],
                    to_json: Callable[[dict, int], dict], use: str) -> int:
    """Records (one JSON object each) -> shards of {"json": to_json(record, number of images), "0.jpg", ...}; a record
    `names_of` or `to_json` rejects with `Skip` is reported with its line and reason."""
    if not args.images.is_dir():
        raise DataError(f"--images {args.images} is not a folder")
    entries = read_records(args.json)

    def build(entry: Entry) -> dict:
        if entry.problem:
            raise Skip("bad record", entry.problem)
        if not isinstance(entry.record, dict):
            raise Skip("bad record", f"not a JSON object ({json_type(entry.record)})")
        names = names_of(entry.record)
        sample: dict = {"json": utf8(json.dumps(to_json(entry.record, len(names)), ensure_ascii=False), "the record")}
        for index, name in enumerate(names):
            extension, data = read_image(args.images / name.strip())
            sample[f"{index}.{extension}"] = data
        return sample

    def image_names_of(entry: Entry) -> list[str] | None:
        """The entry's image file names; None for a record `build` will skip as bad."""
        if entry.problem or not isinstance(entry.record, dict):
            return None
        try:
            return names_of(entry.record)
        except Skip:
            return None

    names_by_entry = [image_names_of(entry) for entry in entries]

    def images_of(index: int, entry: Entry) -> list[str]:  # records that share an image stay in one split
        return [image_group(args.images, name, entry.where) for name in names_by_entry[index] or []] or [entry.where]

    splits = ["train", "val"] if args.val_fraction > 0 else ["train"]
    jobs = plan_jobs(entries, lambda _, entry: entry.where, args.val_fraction, args.seed, shuffle=not args.no_shuffle,
                     group=images_of)
    prepare_output(args.out, splits, args.overwrite)
    result = write_shards(args.out, jobs, build, samples_per_shard=args.samples_per_shard, workers=args.workers,
                          desc=f"{args.json.name} -> shards")
    if text_only := names_by_entry.count([]):
        # said, not refused: mixes such as LLaVA's hold text-only conversations; a misspelt key ("img") shows here
        print(f"note: {text_only} record(s) name no image (neither 'image' nor 'images'), so they train as text-only "
              f"conversations")
    return report(result, use)


if __name__ == "__main__":
    raise SystemExit(main())
