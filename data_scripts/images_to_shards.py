"""Turn a folder of images and a CSV, JSONL or JSON caption file into webdataset shards for the contrastive and align
stages.

Each sample holds the original image bytes (jpg/png/webp; other formats re-encoded to png), the caption as `txt`,
and the class index as `cls` when the annotations have labels. Broken rows are reported with their line number and
skipped. Run `python data_scripts/images_to_shards.py --help` for the format.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_scripts/images_to_shards.py`: make `data_scripts` importable
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
    text_field,
    text_lines,
    utf8,
    write_classnames,
    write_shards,
)
from vlm.errors import is_text  # noqa: E402

REQUIRED = ("image", "caption")
EXAMPLE = """\
annotations (CSV with a header row; `label` is optional):
  image,caption,label
  cats/001.jpg,a grey cat asleep on a sofa,cat
  dogs/017.png,"a dog catching a frisbee, mid-air",dog

or JSONL, one object per line (or a JSON array of such objects, reported by record index):
  {"image": "cats/001.jpg", "caption": "a grey cat asleep on a sofa", "label": "cat"}

  image    path relative to --images, or absolute
  caption  the text paired with the image, on one line (quote it if it contains commas)
  label    a class name, or an integer class index (then pass --classnames to name the classes); one kind for
           every row

output:
  OUT/train/shard-000000.tar ...  samples: KEY.jpg|png|webp, KEY.txt, KEY.cls (label index)
  OUT/val/...                     with --val-fraction > 0
  OUT/*/classnames.txt            class names in label order, for zero-shot accuracy during training
  OUT/skipped.txt                 every skipped row and why (only when some were)

example:
  python data_scripts/images_to_shards.py --images photos/ --annotations captions.csv --out shards/ \\
      --val-fraction 0.05
  python -m vlm.train stage=contrastive "data.train='shards/train/shard-{000000..000009}.tar'" \\
      "data.val='shards/val/shard-{000000..000000}.tar'"
"""


@dataclass
class Row:
    line: int  # line number in the annotation file (1-based, the header is line 1 for CSV); in a JSON array, the index
    fields: dict | None  # None: the line could not be parsed (`problem` says why)
    problem: str = ""
    unit: str = "line"  # "record" in a JSON array

    @property
    def where(self) -> str:
        return f"{self.unit} {self.line}"


def read_annotations(path: Path) -> list[Row]:
    """Rows of a CSV (header row; .tsv: tab-separated) or JSONL file; the format is told by the name or the content."""
    try:
        text = read_text_keeping_bad_bytes(path)
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}") from None
    except OSError as err:
        raise DataError(f"cannot read annotation file {path}: {err.strerror or err}") from None
    start = text.lstrip()[:1]
    is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or (path.suffix.lower() not in (".csv", ".tsv")
                                                                 and start in ("{", "["))
    if is_jsonl and start == "[":  # one JSON array of records (a .json file)
        rows = _read_json_array(text, path)
    else:
        rows = _read_jsonl(text) if is_jsonl else _read_csv(text, path)
    if not rows:
        raise DataError(f"{path} has no annotation rows")
    present = set().union(*(row.fields for row in rows if row.fields))
    for column in REQUIRED:
        if column not in present:
            kind = "field in any line" if is_jsonl else "column"
            found = ", ".join(sorted(present)) or "none"
            raise DataError(f"{path} has no {column!r} {kind} (found: {found}); each row needs "
                            f"{', '.join(REQUIRED)} and optionally label")
    return rows


def _read_csv(text: str, path: Path) -> list[Row]:
    """Rows of a CSV with a header row. A quoted cell must end on the line it starts on: a row whose quote is not
    closed there (which the csv module would silently continue over the following lines, swallowing them into the
    caption) is reported at its line, and the lines after it are read as rows of their own."""
    lines = io.StringIO(text, newline="").readlines()  # split at \n, \r\n or \r only, as the csv module splits
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += "\n"  # so that a quote left open on the last line shows as a line break in its cell
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # csv refuses cells over 128 KiB, which a long caption, or the lines an unclosed quote runs on over, pass
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    names: list[str] | None = None
    rows: list[Row] = []
    start = 0  # index in `lines` where the current csv reader began
    while start < len(lines):
        reader = csv.reader((lines[i] for i in range(start, len(lines))), delimiter=delimiter)
        consumed = 0  # lines this reader has read
        for cells in reader:
            first, consumed = start + consumed + 1, reader.line_num  # `first`: 1-based line the row starts on
            if any("\n" in cell or "\r" in cell for cell in cells):
                if names is None:
                    raise DataError(f"{path} line {first}: the header row has a quote that is not closed on its line")
                runs_on = f"it runs on to line {start + consumed}" if start + consumed > first else "it is never closed"
                rows.append(Row(first, None, f"a quoted cell is not closed on this line ({runs_on}: an unclosed "
                                             "quote? a caption cannot span lines)"))
                start = first  # the lines it swallowed are read again, as rows of their own
                break
            if names is None:
                names = [name.strip() for name in cells]  # "image, caption" headers are common
            elif not cells:
                continue  # a blank line
            elif len(cells) > len(names):
                rows.append(Row(first, None, f"{len(cells) - len(names)} more cell(s) than the header has columns "
                                             "(quote captions that contain commas)"))
            else:
                rows.append(Row(first, dict(zip(names, [*cells, *[None] * (len(names) - len(cells))], strict=True))))
        else:
            break
    return rows


def _read_json_array(text: str, path: Path) -> list[Row]:
    try:
        records = load_json(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); write one JSON array of records, "
                        f"or one record per line (JSONL)") from None
    if not isinstance(records, list):
        raise DataError(f"{path} holds {json_type(records)}; write one JSON array of records, or JSONL")
    return [_record_row(i, r, unit="record") for i, r in enumerate(records)]


def _read_jsonl(text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text_lines(text), start=1):
        if not line.strip():
            continue
        try:
            fields = load_json(line)
        except json.JSONDecodeError as err:
            rows.append(Row(number, None, f"not valid JSON ({err.msg})"))
            continue
        rows.append(_record_row(number, fields))
    return rows


def _record_row(line: int, fields: object, unit: str = "line") -> Row:
    """The row of one parsed JSON record, or the reason it cannot be one."""
    if not isinstance(fields, dict):
        return Row(line, None, f"not a JSON object ({json_type(fields)})", unit=unit)
    problem = repeated_keys(fields)
    return Row(line, None, problem, unit=unit) if problem else Row(line, fields, unit=unit)


def _is_index(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value.strip().isdecimal())  # not ① or ²


def _is_label(value: object) -> bool:
    """A class name or an integer class index (not a list, a float or a boolean, whose text is no class name)."""
    return isinstance(value, str) or _is_index(value)


def _label_value(fields: dict) -> object:
    value = fields.get("label")
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def class_list(rows: list[Row], classnames_file: Path | None) -> tuple[bool, list[str] | None]:
    """(labels are indices, class names in label order or None).

    All non-empty labels integers: they are indices, named by --classnames if given. Otherwise they are names: the
    class list is --classnames (its order) or else the sorted unique names.
    """
    labelled = [(row.where, v) for row in rows if row.fields and _is_label(v := _label_value(row.fields))
                and not _not_utf8(v)]
    labels = [v for _, v in labelled]  # the other rows are skipped
    given = None
    if classnames_file is not None:
        try:
            given = [n.strip() for n in classnames_file.read_text(encoding="utf-8-sig").splitlines() if n.strip()]
        except OSError as err:
            raise DataError(f"cannot read --classnames {classnames_file}: {err}") from None
        if not given:
            raise DataError(f"--classnames {classnames_file} is empty; write one class name per line, in label order")
    if labels and all(_is_index(v) for v in labels):
        if given is not None and (top := max(int(v) for v in labels)) >= len(given):
            raise DataError(f"label index {top} is out of range for the {len(given)} names in --classnames "
                            f"{classnames_file} (indices start at 0)")
        return True, given
    if not labels:
        return False, given
    # names, and some numbers among them: an index would become a class of its own ("3"), shifting every index after
    # it, unless --classnames lists it as a name
    numbers = [(line, v) for line, v in labelled if _is_index(v) and str(v).strip() not in (given or [])]
    if numbers:
        (line, number), (name_line, name) = numbers[0], next((n, v) for n, v in labelled if not _is_index(v))
        raise DataError(f"labels mix class indices and class names: {line} has label {number!r}, "
                        f"{name_line} has {name!r} ({len(numbers)} numeric label(s) in all); write every label as a "
                        f"name, or every label as an index with --classnames naming them")
    return False, given if given is not None else sorted({str(v).strip() for v in labels})


def _not_utf8(value: object) -> bool:
    """A label read from bytes of another encoding (lone surrogates): skipped, and kept out of the class list."""
    return isinstance(value, str) and not is_text(value)


def _stripped(row: Row, name: str) -> str:
    """A field's text, stripped; "" where the row has none (its own check reports why, when it is converted)."""
    value = row.fields.get(name) if row.fields else None
    return value.strip() if isinstance(value, str) else ""


def image_key(row: Row, images: Path) -> str:
    """The image a row shows, as a normalised path (a row without one is its own group)."""
    return image_group(images, _stripped(row, "image"), f"row {row.where}")


def repeated_rows(rows: list[Row], images: Path) -> dict[str, str]:
    """{where a row repeats an earlier one's image and caption: where that one is}."""
    seen: dict[tuple[str, str], str] = {}
    repeats = {}
    for row in rows:
        if not _stripped(row, "image") or not _stripped(row, "caption"):
            continue  # what is missing is reported when the row is converted
        key = (image_key(row, images), _stripped(row, "caption"))
        if key in seen:
            repeats[row.where] = seen[key]
        else:
            seen[key] = row.where
    return repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="images_to_shards.py",
        description="Convert images + captions (+ optional class labels) into webdataset shards for vlm's "
                    "contrastive and align stages.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", metavar="DIR", type=Path, required=True,
                        help="folder the `image` paths are relative to")
    parser.add_argument("--annotations", metavar="FILE", type=Path, required=True,
                        help="CSV (header row), JSONL, or a JSON array of records")
    add_output_arguments(parser, "rows")
    parser.add_argument("--classnames", metavar="FILE", type=Path,
                        help="class names, one per line in label order: names integer labels, or fixes the order "
                             "of name labels (default: sorted names)")
    add_run_arguments(parser, "annotation")
    return run(convert, parser.parse_args(argv))


def convert(args: argparse.Namespace) -> int:
    if not args.images.is_dir():
        raise DataError(f"--images {args.images} is not a folder")
    rows = read_annotations(args.annotations)
    indexed, classnames = class_list(rows, args.classnames)
    position = {name: i for i, name in enumerate(classnames or [])}
    first_of = repeated_rows(rows, args.images)

    def build(row: Row) -> dict:
        if row.fields is None:
            raise Skip("unparsable row", row.problem)
        if row.where in first_of:
            raise Skip("duplicate", f"the same image and caption as {first_of[row.where]}; kept once")
        image = text_field(row.fields, "image")
        if image is None or not image.strip():
            raise Skip("no image", "no image path in the 'image' column")
        caption = (text_field(row.fields, "caption") or "").strip()
        if not caption:
            raise Skip("empty caption", f"empty caption for {image}")
        sample: dict = {"txt": utf8(caption, "the caption")}
        label = _label_value(row.fields)
        if label is not None:
            if _not_utf8(label):
                utf8(label, "the label")  # raises Skip, naming the text before the bad bytes
            if not _is_label(label):
                raise Skip("bad record", f"'label' must be a class name or an integer class index, got "
                                         f"{json_type(label)}")
            if indexed:
                sample["cls"] = str(int(label)).encode()
            elif str(label).strip() in position:
                sample["cls"] = str(position[str(label).strip()]).encode()
            else:
                raise Skip("unknown label", f"label {label!r} is not in --classnames {args.classnames}")
        extension, data = read_image(args.images / image.strip())
        sample[extension] = data
        return sample

    splits = ["train", "val"] if args.val_fraction > 0 else ["train"]
    jobs = plan_jobs(rows, lambda _, row: f"{args.annotations.name} {row.where}", args.val_fraction, args.seed,
                     shuffle=not args.no_shuffle, group=lambda _, row: image_key(row, args.images))
    prepare_output(args.out, splits, args.overwrite)
    result = write_shards(args.out, jobs, build, samples_per_shard=args.samples_per_shard, workers=args.workers,
                          desc=f"{args.annotations.name} -> shards")
    if classnames:
        write_classnames([s.directory for s in result.splits.values() if s.samples], classnames)
        print(f"{len(classnames)} classes, written to classnames.txt beside the shards")
    elif any(_is_label(_label_value(r.fields)) for r in rows if r.fields):
        print("note: labels are class indices and no --classnames was given, so no classnames.txt was written; "
              "training reports retrieval but not zero-shot accuracy")
    return report(result, "python -m vlm.train stage=contrastive")


if __name__ == "__main__":
    raise SystemExit(main())
