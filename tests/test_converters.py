"""The offline converters in data_scripts/: round trips through webdataset, skip reports, and training on the output."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from images import crafted_png, noise
from PIL import Image

from data_scripts import images_to_shards, llava_to_shards, make_synthetic
from data_scripts.shard_writing import Skip, image_group, read_image, split_names
from vlm.data import synthetic
from vlm.data.captions import image_fields
from vlm.data.shards import list_shards
from vlm.data.tiler import Tiler, TilerConfig

ROOT = Path(__file__).resolve().parents[1]

NAMES = ("cat", "dog", "bird")


def _write_images(folder: Path, count: int) -> list[dict]:
    """`count` small PNG / JPEG images (".jpg" and ".jpeg" names, one in a subfolder); annotation rows for them."""
    rows = []
    for i in range(count):
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("JPEG", "jpeg")][i % 3]
        name = f"sub/img{i}.{ext}" if i == 0 else f"img{i}.{ext}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(noise(i, fmt=fmt))
        rows.append({"image": name, "caption": f"a picture, number {i}", "label": NAMES[i % len(NAMES)]})
    return rows


def _write_csv(path: Path, rows: list[dict], columns: tuple[str, ...] = ("image", "caption", "label")) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[row.get(c, "") for c in columns] for row in rows])
    return path


def _read(pattern: str) -> dict[str, dict]:
    return {s["__key__"]: s for s in wds.WebDataset(pattern, shardshuffle=False, empty_check=False)}


def _read_split(directory: Path) -> dict[str, dict]:
    shards = sorted(directory.glob("shard-*.tar"))
    return _read(f"{directory}/shard-{{000000..{len(shards) - 1:06d}}}.tar") if shards else {}


def _convert(capsys, argv: list[str], main=images_to_shards.main) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _check_caption_samples(samples: dict[str, dict], rows: list[dict], folder: Path, classnames: list[str]) -> None:
    for key, sample in samples.items():
        row = rows[int(key)]
        ext = Path(row["image"]).suffix[1:].replace("jpeg", "jpg")
        assert sample[ext] == (folder / row["image"]).read_bytes()  # the original bytes, untouched
        assert sample["txt"].decode() == row["caption"]
        assert classnames[int(sample["cls"])] == row["label"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """40 images + a CSV with class names as labels, converted with a quarter held out."""
    base = tmp_path_factory.mktemp("csv")
    rows = _write_images(base / "images", 40)
    annotations = _write_csv(base / "captions.csv", rows)
    out = base / "shards"
    argv = ["--images", str(base / "images"), "--annotations", str(annotations), "--out", str(out),
            "--samples-per-shard", "16", "--val-fraction", "0.25", "--seed", "3"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = images_to_shards.main(argv)
    return code, rows, base, out, printed.getvalue()


def test_images_csv_round_trip(converted, capsys):
    code, rows, base, out, printed = converted
    assert code == 0
    train, val = _read_split(out / "train"), _read_split(out / "val")
    assert len(val) == 10 and len(train) == 30 and not set(train) & set(val)
    assert len(list((out / "train").glob("shard-*.tar"))) == 2  # 30 samples at 16 per shard
    for split in ("train", "val"):
        assert (out / split / "classnames.txt").read_text().splitlines() == sorted(NAMES)
    _check_caption_samples({**train, **val}, rows, base / "images", sorted(NAMES))
    assert not (out / "skipped.txt").exists()


def test_split_is_deterministic_and_refuses_to_mix_runs(converted, capsys, tmp_path):
    _, rows, base, out, _ = converted
    argv = ["--images", str(base / "images"), "--annotations", str(base / "captions.csv"), "--val-fraction", "0.25",
            "--seed", "3"]
    code, _, err = _convert(capsys, [*argv, "--out", str(out)])
    assert code == 2 and "--overwrite" in err
    code, _, _ = _convert(capsys, [*argv, "--out", str(tmp_path / "again"), "--no-shuffle"])
    val = set(_read_split(out / "val"))
    assert code == 0 and set(_read_split(tmp_path / "again" / "val")) == val
    # --seed picks the held-out records: another seed holds out others, as many
    code, _, _ = _convert(capsys, [*argv[:-1], "4", "--out", str(tmp_path / "other"), "--no-shuffle"])
    other = set(_read_split(tmp_path / "other" / "val"))
    assert code == 0 and len(other) == len(val) and other != val


@given(count=st.integers(0, 300), fraction=st.floats(0, 0.99), seed=st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_split_names_sizes(count, fraction, seed):
    splits = split_names(count, fraction, seed)
    assert splits == split_names(count, fraction, seed)
    val = splits.count("val")
    if fraction > 0 and count >= 2:
        assert 1 <= val <= count - 1 and abs(val - count * fraction) <= 1
    else:
        assert val == 0


def test_the_held_out_split_is_a_sample_drawn_by_the_seed():
    """Each seed holds out its own records (a record's image groups too), spread through the records rather than
    the first ones read."""
    splits = [split_names(100, 0.2, seed) for seed in range(5)]
    assert len({tuple(split) for split in splits}) == 5
    for split in splits:
        val = [i for i, name in enumerate(split) if name == "val"]
        assert len(val) == 20 and val != list(range(20))
    groups = [f"image{i // 2}" for i in range(100)]  # two records per image
    grouped = [split_names(100, 0.2, seed, groups) for seed in range(5)]
    assert len({tuple(split) for split in grouped}) == 5
    assert all(split[0:20] != ["val"] * 20 for split in grouped)


def test_images_jsonl_round_trip_with_reencoding(tmp_path, capsys):
    rows = _write_images(tmp_path / "images", 12)
    bmp = Image.new("RGB", (9, 7), (10, 200, 30))
    bmp.save(tmp_path / "images" / "odd.bmp")
    absolute = {"image": str(tmp_path / "images" / "odd.bmp"), "caption": "a bitmap", "label": "dog"}
    annotations = tmp_path / "captions.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in [*rows, absolute]))
    code, out, _ = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations", str(annotations),
                                     "--out", str(tmp_path / "out")])
    assert code == 0
    samples = _read(str(tmp_path / "out/train/shard-{000000..000000}.tar"))
    assert "data.train='" in out and str(tmp_path / "out/train/shard-{000000..000000}.tar") in out
    reencoded = samples.pop(f"{len(rows):08d}")
    assert set(reencoded) >= {"png", "txt", "cls"} and "bmp" not in reencoded
    assert Image.open(io.BytesIO(reencoded["png"])).tobytes() == bmp.tobytes()
    _check_caption_samples(samples, rows, tmp_path / "images", sorted(NAMES))


@pytest.mark.parametrize("fmt", ["pgm", "tiff"])
def test_sixteen_bit_images_read_as_pillow_int_mode_keep_their_shades_in_the_shards(tmp_path, fmt):
    """A 16-bit PGM or 32-bit TIFF opens in Pillow's mode "I"; stored, it must read back as the file does at chat
    time (scaled to 8 bits), not clipped to white above 255."""
    gradient = np.tile(np.linspace(0, 65535, 64), (8, 1)).astype(np.int32)  # (8, 64)
    path = tmp_path / f"gradient.{fmt}"
    if fmt == "pgm":
        path.write_bytes(b"P5\n64 8\n65535\n" + gradient.astype(">u2").tobytes())
    else:
        Image.fromarray(gradient, mode="I").save(path)
    assert Image.open(path).mode == "I"
    extension, stored = read_image(path)
    tiler = Tiler(TilerConfig(max_tiles=1), tile_size=64, tokens_per_tile=1)
    shades = [np.asarray(tiler.to_images(tiler(source))[0]) for source in (str(path), stored)]
    assert extension == "png" and shades[0].max() == 255 and len(np.unique(shades[0])) > 32
    assert np.array_equal(shades[0], shades[1])


def test_a_json_array_of_records_converts_like_jsonl(tmp_path, capsys):
    rows = _write_images(tmp_path / "images", 4)
    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps([*rows[:2], "not a record", *rows[2:]], indent=1))  # indented: "[\n {" ...
    code, out, err = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations", str(annotations),
                                       "--out", str(tmp_path / "out"), "--no-shuffle"])
    assert code == 0 and "wrote 4 sample(s)" in out
    assert "captions.json record 2: not a JSON object (string)" in err
    samples = _read_split(tmp_path / "out/train")
    assert sorted(samples) == ["00000000", "00000001", "00000003", "00000004"]  # keys: the records' places
    _check_caption_samples(samples, [*rows[:2], None, *rows[2:]], tmp_path / "images", sorted(NAMES[:4]))


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_record_naming_a_key_twice_is_skipped_naming_the_key(tmp_path, capsys, suffix):
    """JSON readers keep a repeated key's last value, so {"caption": "a cat", "caption": "a dog"} would be converted
    as a dog without a word: such a record is skipped instead, with its line (or place) and the key."""
    rows = _write_images(tmp_path / "images", 2)
    twice = json.dumps(rows[1]).replace('"caption":', '"caption": "a cat", "caption":')
    if suffix == ".jsonl":
        text, where = f"{json.dumps(rows[0])}\n{twice}\n", "line 2"
    else:
        text, where = f"[{json.dumps(rows[0])},\n{twice}]", "record 1"
    (tmp_path / f"captions{suffix}").write_text(text)
    code, out, err = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations",
                                       str(tmp_path / f"captions{suffix}"), "--out", str(tmp_path / "out")])
    assert code == 0 and "wrote 1 sample(s)" in out
    assert f"captions{suffix} {where}: names 'caption' more than once" in err, err
    assert [sample["txt"].decode() for sample in _read_split(tmp_path / "out/train").values()] == [rows[0]["caption"]]


def test_a_repeated_row_is_kept_once_and_an_images_captions_share_one_split(tmp_path, capsys):
    """COCO-style files give each image several captions: held out apart from its own image's other captions, a
    caption would be scored on a picture the model trained on."""
    rows = _write_images(tmp_path / "images", 12)
    captioned = [{**row, "caption": f"{row['caption']}, told the {nth} way"}
                 for row in rows for nth in ("one", "other")]
    annotations = _write_csv(tmp_path / "a.csv", [*captioned, captioned[5]])  # line 26 repeats line 7
    code, out, err = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations", str(annotations),
                                       "--out", str(tmp_path / "out"), "--val-fraction", "0.25", "--no-shuffle"])
    assert code == 0 and "a.csv line 26: the same image and caption as line 7; kept once" in err
    samples = {**_read_split(tmp_path / "out/train"), **_read_split(tmp_path / "out/val")}
    assert len(samples) == 24  # 12 images x 2 captions; the repeat is left out
    images_by_split = {split: {captioned[int(key)]["image"] for key in _read_split(tmp_path / "out" / split)}
                       for split in ("train", "val")}
    assert not images_by_split["train"] & images_by_split["val"] and len(images_by_split["val"]) == 3


def test_integer_labels_and_classnames_file(tmp_path, capsys):
    rows = _write_images(tmp_path / "images", 6)
    for i, row in enumerate(rows):
        row["label"] = str(i % 2)
    annotations = _write_csv(tmp_path / "a.csv", rows)
    argv = ["--images", str(tmp_path / "images"), "--annotations", str(annotations)]
    code, out, _ = _convert(capsys, [*argv, "--out", str(tmp_path / "plain")])
    assert code == 0 and not (tmp_path / "plain/train/classnames.txt").exists() and "--classnames" in out
    assert [int(s["cls"]) for s in _read_split(tmp_path / "plain/train").values()].count(1) == 3
    names = tmp_path / "names.txt"
    names.write_text("zebra\nantelope\n")
    code, _, _ = _convert(capsys, [*argv, "--out", str(tmp_path / "named"), "--classnames", str(names)])
    assert code == 0 and (tmp_path / "named/train/classnames.txt").read_text() == "zebra\nantelope\n"
    names.write_text("zebra\nantelope\n", encoding="utf-8-sig")  # as Notepad and Excel save UTF-8
    code, _, _ = _convert(capsys, [*argv, "--out", str(tmp_path / "bom"), "--classnames", str(names)])
    assert code == 0 and (tmp_path / "bom/train/classnames.txt").read_text() == "zebra\nantelope\n"
    (tmp_path / "one.txt").write_text("zebra\n")
    code, _, err = _convert(capsys, [*argv, "--out", str(tmp_path / "bad"), "--classnames", str(tmp_path / "one.txt")])
    assert code == 2 and "label index 1" in err


def test_a_number_among_name_labels_is_refused_unless_classnames_names_it(tmp_path, capsys):
    rows = _write_images(tmp_path / "images", 4)  # names, then one index: it would be a class "3" of its own
    rows[2]["label"] = "3"
    annotations = _write_csv(tmp_path / "a.csv", rows)
    argv = ["--images", str(tmp_path / "images"), "--annotations", str(annotations)]
    code, _, err = _convert(capsys, [*argv, "--out", str(tmp_path / "mixed")])
    assert code == 2 and f"labels mix class indices and class names: line 4 has label '3', line 2 has " \
                         f"{NAMES[0]!r} (1 numeric label(s) in all)" in err
    assert not (tmp_path / "mixed").exists()  # refused before anything is written
    names = tmp_path / "names.txt"  # a class that is called "3"
    names.write_text("".join(f"{n}\n" for n in sorted({*NAMES[:4], "3"})))
    code, _, _ = _convert(capsys, [*argv, "--out", str(tmp_path / "named"), "--classnames", str(names)])
    assert code == 0


def test_a_label_of_digit_like_characters_is_a_class_name(tmp_path, capsys):
    rows = _write_images(tmp_path / "images", 4)  # "①" and "²" are digits to str.isdigit, yet no index
    rows[1]["label"], rows[3]["label"] = "①", "²"
    code, out, err = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations",
                                       str(_write_csv(tmp_path / "a.csv", rows)), "--out", str(tmp_path / "out")])
    assert code == 0, err
    assert {"①", "²"} <= set((tmp_path / "out/train/classnames.txt").read_text().splitlines())


def test_missing_and_corrupt_images_are_skipped(tmp_path, capsys):
    rows = _write_images(tmp_path / "images", 4)
    (tmp_path / "images/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (tmp_path / "images/truncated.jpg").write_bytes(noise(9, (64, 64), fmt="JPEG")[:300])
    rows += [{"image": "gone.jpg", "caption": "missing", "label": "cat"},
             {"image": "corrupt.png", "caption": "corrupt", "label": "cat"},
             {"image": "truncated.jpg", "caption": "truncated", "label": "cat"},
             {"image": "img1.jpg", "caption": "", "label": "cat"}]
    annotations = _write_csv(tmp_path / "a.csv", rows)
    code, out, err = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations", str(annotations),
                                       "--out", str(tmp_path / "out")])
    assert code == 0
    assert "a.csv line 6: image file not found: " in err and "gone.jpg" in err
    assert "a.csv line 7" in err and "corrupt.png" in err
    assert "a.csv line 8" in err and "truncated.jpg" in err
    assert "a.csv line 9: empty caption" in err
    assert "skipped 4 record(s): unreadable image (2), empty caption (1), image not found (1)" in out
    assert "wrote 4 sample(s)" in out
    assert len((tmp_path / "out/skipped.txt").read_text().splitlines()) == 4
    assert len(_read_split(tmp_path / "out/train")) == 4


def test_a_latin1_caption_skips_its_row_and_the_rest_convert(tmp_path, capsys):
    rows = _write_images(tmp_path / "images", 3)
    annotations = tmp_path / "a.csv"
    captions = ["a cat", "a dog", "un caf\u00e9"]  # the last one written in Latin-1, as an old spreadsheet saves it
    annotations.write_bytes(b"image,caption,label\n" + b"".join(
        f"{r['image']},{c},{r['label']}\n".encode("latin-1" if "\u00e9" in c else "utf-8")
        for r, c in zip(rows, captions, strict=True)))
    code, out, err = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations", str(annotations),
                                       "--out", str(tmp_path / "out"), "--no-shuffle"])
    assert code == 0 and "wrote 2 sample(s)" in out
    assert "a.csv line 4: the caption holds text that is not valid UTF-8 after 'un caf'" in err
    assert [s["txt"].decode() for s in _read_split(tmp_path / "out/train").values()] == captions[:2]


def test_a_label_in_another_encoding_skips_its_row_and_stays_out_of_the_class_list(tmp_path, capsys):
    rows = _write_images(tmp_path / "images", 3)
    annotations = tmp_path / "a.csv"
    good = "".join(f"{r['image']},a picture,{r['label']}\n" for r in rows[:2]).encode()
    latin1 = f"{rows[2]['image']},a cup,caf\u00e9\n".encode("latin-1")  # as an old spreadsheet saves it
    annotations.write_bytes(b"image,caption,label\n" + good + latin1)
    code, out, err = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations", str(annotations),
                                       "--out", str(tmp_path / "out"), "--no-shuffle"])
    assert code == 0 and "wrote 2 sample(s)" in out
    assert "a.csv line 4: the label holds text that is not valid UTF-8 after 'caf'" in err
    names = (tmp_path / "out" / "train" / "classnames.txt").read_text().split()
    assert names == sorted({r["label"] for r in rows[:2]})


def test_a_raw_line_separator_inside_a_jsonl_string_is_part_of_its_record(tmp_path, capsys):
    """U+2028, U+2029 and U+0085 may stand raw in JSON strings; only newlines end a JSONL line."""
    rows = _write_images(tmp_path / "images", 3)
    for row, odd in zip(rows, ("\u2028", "\x85", "\u2029"), strict=True):
        row["caption"] += odd + "more"
    annotations = tmp_path / "a.jsonl"
    annotations.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    code, out, _ = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations", str(annotations),
                                     "--out", str(tmp_path / "out"), "--no-shuffle"])
    assert code == 0 and "wrote 3 sample(s)" in out
    assert [s["txt"].decode() for s in _read_split(tmp_path / "out/train").values()] == [r["caption"] for r in rows]


def test_nothing_written_exits_1(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    annotations = _write_csv(tmp_path / "a.csv", [{"image": "nope.png", "caption": "x"}], ("image", "caption"))
    code, _, err = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations", str(annotations),
                                     "--out", str(tmp_path / "out")])
    assert code == 2 and "no sample was written" in err
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_missing_column_is_named(tmp_path, capsys):
    rows = _write_images(tmp_path / "images", 2)
    annotations = _write_csv(tmp_path / "a.csv", rows, ("image", "label"))
    code, _, err = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations", str(annotations),
                                     "--out", str(tmp_path / "out")])
    assert code == 2 and "'caption' column" in err and str(annotations) in err
    assert not (tmp_path / "out").exists()  # nothing touched before the input was known to be usable


def test_an_unclosed_quote_is_reported_and_the_rows_it_swallowed_are_kept(tmp_path, capsys):
    """csv would read a quoted cell on over the following lines into the caption; each row stands on its line."""
    rows = _write_images(tmp_path / "images", 4)
    annotations = tmp_path / "a.csv"
    annotations.write_text(f'image,caption\n{rows[0]["image"]},"a red square\n{rows[1]["image"]},green\n'
                           f'{rows[2]["image"]},"blue, dark"\n\n{rows[3]["image"]},"open to the end')
    code, out, err = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations", str(annotations),
                                       "--out", str(tmp_path / "out"), "--no-shuffle"])
    assert code == 0 and "skipped 2 record(s): unparsable row (2)" in out and "wrote 2 sample(s)" in out
    assert "a.csv line 2: a quoted cell is not closed on this line (it runs on to line 4" in err
    assert "a.csv line 6: a quoted cell is not closed on this line (it is never closed" in err
    assert [line.split(":")[0] for line in (tmp_path / "out/skipped.txt").read_text().splitlines()] == \
           ["a.csv line 2", "a.csv line 6"]
    assert [s["txt"].decode() for s in _read_split(tmp_path / "out/train").values()] == ["green", "blue, dark"]


def test_an_unclosed_quote_in_a_large_file_and_a_long_caption_are_read(tmp_path, capsys):
    """The lines an unclosed quote runs on over (here 3,000 of them), and a 200,000-character caption, pass csv's
    128 KiB limit on a cell: the quote is reported at its line, the caption kept."""
    rows = _write_images(tmp_path / "images", 2)
    long_caption = "a red square " * 15_385
    filler = "".join(f"{rows[1]['image']},a green circle number {i}\n" for i in range(3000))
    annotations = tmp_path / "a.csv"
    annotations.write_text(f'image,caption\n{rows[0]["image"]},"open\n{filler}{rows[0]["image"]},{long_caption}\n')
    code, out, err = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations", str(annotations),
                                       "--out", str(tmp_path / "out"), "--no-shuffle", "--val-fraction", "0"])
    assert code == 0 and "a.csv line 2: a quoted cell is not closed on this line (it runs on to line 3003" in err
    captions = [s["txt"].decode() for s in _read_split(tmp_path / "out/train").values()]
    assert len(captions) == 3001 and captions[-1] == long_caption.strip()


def test_non_string_text_and_null_records_are_bad_records(tmp_path, capsys):
    rows = _write_images(tmp_path / "images", 2)
    lines = [json.dumps(rows[0]), json.dumps({**rows[1], "caption": ["a"]}), json.dumps({**rows[1], "caption": 7}),
             "null", json.dumps({**rows[1], "label": ["cat"]}), json.dumps({**rows[1], "image": [rows[1]["image"]]})]
    annotations = tmp_path / "a.jsonl"
    annotations.write_text("\n".join(lines) + "\n")
    code, out, err = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations", str(annotations),
                                       "--out", str(tmp_path / "out")])
    assert code == 0 and "wrote 1 sample(s)" in out and "skipped 5 record(s)" in out
    assert (tmp_path / "out/skipped.txt").read_text().splitlines() == [
        "a.jsonl line 2: 'caption' must be a string, got list",
        "a.jsonl line 3: 'caption' must be a string, got number",
        "a.jsonl line 4: not a JSON object (null)",
        "a.jsonl line 5: 'label' must be a class name or an integer class index, got list",
        "a.jsonl line 6: 'image' must be a string, got list"]
    assert (tmp_path / "out/train/classnames.txt").read_text() == "cat\ndog\n"  # no "['cat']" class


def test_overwrite_leaves_only_this_runs_output(tmp_path, capsys):
    rows = _write_images(tmp_path / "images", 4)
    annotations = _write_csv(tmp_path / "a.csv", [*rows, {"image": "gone.png", "caption": "x", "label": "cat"}])
    argv = ["--images", str(tmp_path / "images"), "--annotations", str(annotations), "--out", str(tmp_path / "ow")]
    assert _convert(capsys, [*argv, "--val-fraction", "0.5"])[0] == 0
    assert _read_split(tmp_path / "ow/val") and (tmp_path / "ow/skipped.txt").is_file()
    code, _, err = _convert(capsys, argv)
    assert code == 2 and "--overwrite" in err
    (tmp_path / "images/gone.png").write_bytes(noise(7))
    code, out, _ = _convert(capsys, [*argv, "--overwrite"])
    assert code == 0 and "wrote 5 sample(s)" in out and "data.val" not in out
    assert len(_read_split(tmp_path / "ow/train")) == 5
    assert sorted(p.relative_to(tmp_path / "ow").as_posix() for p in (tmp_path / "ow").rglob("*")) == \
           ["train", "train/classnames.txt", "train/shard-000000.tar"]  # no stale val/ nor skipped.txt


def test_an_interrupted_conversion_leaves_no_cut_off_shard_under_a_shard_name(tmp_path, capsys, monkeypatch, caplog):
    rows = _write_images(tmp_path / "images", 5)
    annotations = _write_csv(tmp_path / "a.csv", rows)
    argv = ["--images", str(tmp_path / "images"), "--annotations", str(annotations), "--out", str(tmp_path / "out"),
            "--samples-per-shard", "2", "--workers", "1", "--no-shuffle"]
    reads, read = [], images_to_shards.read_image

    def ctrl_c_at_the_fourth_image(path):
        reads.append(path)
        if len(reads) == 4:
            raise KeyboardInterrupt  # as the user's Ctrl-C arrives mid-conversion
        return read(path)

    monkeypatch.setattr(images_to_shards, "read_image", ctrl_c_at_the_fourth_image)
    code, _, err = _convert(capsys, argv)
    assert code == 130 and "stopped: the shards in" in err and "--overwrite" in err
    written = sorted(p.name for p in (tmp_path / "out/train").iterdir())
    assert written == ["shard-000000.tar", "shard-000001.tar.partial"]
    with caplog.at_level(logging.WARNING, logger="vlm.data.shards"):  # training on the whole shard says the set is cut
        assert len(list_shards(str(tmp_path / "out/train/shard-000000.tar"))) == 1
    assert f"data.train: {tmp_path / 'out/train'} holds shard-000001.tar.partial, left by a converter that was " \
           f"stopped before it finished" in caplog.text
    monkeypatch.undo()
    code, out, _ = _convert(capsys, [*argv, "--overwrite"])  # the rerun clears the partial one too
    assert code == 0 and sorted(p.name for p in (tmp_path / "out/train").glob("shard-*")) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_bad_out_and_option_values_are_one_line_and_create_nothing(tmp_path, capsys):
    rows = _write_images(tmp_path / "images", 2)
    annotations = _write_csv(tmp_path / "a.csv", rows)
    argv = ["--images", str(tmp_path / "images"), "--annotations", str(annotations)]
    code, _, err = _convert(capsys, [*argv, "--out", str(annotations)])
    assert code == 2 and err == f"error: --out {annotations} is a file, not a folder; choose another --out\n"
    code, _, err = _convert(capsys, ["--kind", "captions", "--num-train", "2", "--num-val", "0", "--image-size", "8",
                                     "--out", str(annotations)], main=make_synthetic.main)
    assert code == 2 and err == f"error: --out {annotations} is a file, not a folder; choose another --out\n"
    for option, value in (("--samples-per-shard", "0"), ("--val-fraction", "1.5")):
        code, _, err = _convert(capsys, [*argv, "--out", str(tmp_path / "out"), option, value])
        assert code == 2 and err.startswith(f"error: {option} must be") and err.count("\n") == 1
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seconds", [15.0, 0.0])
def test_progress_lines_in_a_log_file(tmp_path, capsys, monkeypatch, seconds):
    """Piped to a file (pytest's capture is not a terminal), a line every 5% of the records, or every `seconds`."""
    from data_scripts import shard_writing

    monkeypatch.setattr(shard_writing, "PLAIN_LINE_SECONDS", seconds)
    rows = _write_images(tmp_path / "images", 2) + [{"image": f"gone{i}.png", "caption": "x"} for i in range(38)]
    annotations = _write_csv(tmp_path / "a.csv", rows, ("image", "caption"))
    code, _, err = _convert(capsys, ["--images", str(tmp_path / "images"), "--annotations", str(annotations),
                                     "--out", str(tmp_path / f"out{seconds}"), "--no-shuffle"])
    assert code == 0 and "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("a.csv -> shards: ")]
    every = 2 if seconds else 1  # 5% of 40 records; with no time limit, every record
    assert [line.split()[3] for line in lines] == [f"{n}/40" for n in range(every, 41, every)]
    assert "(100%)" in lines[-1] and "records/s" in lines[-1] and lines[-1].endswith("s left, 38 skipped")


@pytest.mark.parametrize("script", ["images_to_shards.py", "llava_to_shards.py", "preferences_to_shards.py"])
def test_scripts_run_from_anywhere_with_help(script, tmp_path):
    """--help answers at once: from any folder, and without importing torch (seconds before the first line)."""
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "data_scripts" / script), "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "example:" in result.stdout and "output:" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time")}
    assert "argparse" in imported and "torch" not in imported


def test_an_interrupted_synthetic_set_leaves_no_cut_off_shard_under_a_shard_name(tmp_path, capsys, monkeypatch):
    drawn = synthetic.caption_samples

    def ctrl_c_at_the_fifth_sample(*args, **kwargs):
        for i, sample in enumerate(drawn(*args, **kwargs)):
            if i == 4:
                raise KeyboardInterrupt  # as the user's Ctrl-C arrives mid-set
            yield sample

    monkeypatch.setattr(synthetic, "caption_samples", ctrl_c_at_the_fifth_sample)
    argv = ["--kind", "captions", "--out", str(tmp_path / "out"), "--num-train", "8", "--num-val", "2",
            "--image-size", "16", "--samples-per-shard", "3"]
    code, _, err = _convert(capsys, argv, main=make_synthetic.main)
    assert code == 130 and "stopped: the shards in" in err and "--overwrite" in err
    written = sorted(p.name for p in (tmp_path / "out/train").iterdir())
    assert written == ["shard-000000.tar", "shard-000001.tar.partial"]
    assert len(_read_split(tmp_path / "out/train")) == 3  # the whole shard; the cut one is not read as a shard


def test_make_synthetic_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_synthetic.main(["--help"])
    assert exit_info.value.code == 0 and "example:" in capsys.readouterr().out


@pytest.mark.slow
def test_converted_shards_train(converted, tmp_path):
    """The converted shards train, fed to the trainer exactly as the converter's printed command says."""
    code, _, _, _, printed = converted
    assert code == 0
    command = printed.splitlines()[-1].split()  # python -m vlm.train stage=... "data.train='...'" "data.val='...'"
    overrides = [arg.strip('"') for arg in command[3:]]  # undo the shell quoting, keep Hydra's
    assert [o.split("=", 1)[0] for o in overrides] == ["stage", "data.train", "data.val"]
    result = subprocess.run(
        [sys.executable, "-m", "vlm.train", *overrides, "stage.max_steps=3", "stage.batch_size=8",
         "trainer.val_check_interval=3", "data.num_workers=0", f"output_root={tmp_path / 'ckpt'}", "run_name=t",
         "model.vision.depth=1", "model.text.layers=1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ckpt/contrastive/t/metrics.json").read_text())
    assert "zero_shot_top1" in metrics and metrics["samples_skipped"] == 0


# ---- LLaVA conversations ----------------------------------------------------------------------------------------

def _turns(question: str, answer: str, human: str = "human", gpt: str = "gpt") -> list[dict]:
    return [{"from": human, "value": question}, {"from": gpt, "value": answer}]


def test_llava_round_trip(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(noise(1, fmt="JPEG"))
    (images / "b.png").write_bytes(noise(2, fmt="PNG"))
    (images / "c.jpeg").write_bytes(noise(3, fmt="JPEG"))
    (images / "d.webp").write_bytes(noise(4, fmt="WEBP"))
    records = [
        {"id": "one", "image": "a.jpg", "conversations": _turns("<image>\nWhat is it?", "Noise.")},
        {"id": "two", "image": ["b.png", "c.jpeg"], "source": "test",
         "conversations": [{"from": "system", "value": "Be brief."},
                           *_turns("<image>\n<image>\nSame?", "No.", "user", "assistant")]},
        {"id": "text", "conversations": _turns("Hello?", "Hi.")},
        {"id": "mixed", "image": ["d.webp", "a.jpg"], "conversations": _turns("<image>\n<image>\nSame?", "No.")},
        {"id": "images-key", "images": ["c.jpeg"], "conversations": _turns("<image>\nAnd this?", "Noise.")},
    ]
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(records))
    code, out, _ = _convert(capsys, ["--json", str(source), "--images", str(images), "--out", str(tmp_path / "out"),
                                     "--no-shuffle"], main=llava_to_shards.main)
    assert code == 0 and "stage=sft" in out
    # the one text-only record is said to be so: an image under a misspelt key ("img") would be counted here
    assert "note: 1 record(s) name no image (neither 'image' nor 'images'), so they train as text-only" in out
    samples = _read(str(tmp_path / "out/train/shard-{000000..000000}.tar"))
    assert list(samples) == ["00000000", "00000001", "00000002", "00000003", "00000004"]
    one, two, text, mixed, images_key = samples.values()
    assert images_key["0.jpg"] == (images / "c.jpeg").read_bytes()  # TRL's key: its image, not a text-only record
    assert one["0.jpg"] == (images / "a.jpg").read_bytes() and json.loads(one["json"]) == records[0]
    assert two["0.png"] == (images / "b.png").read_bytes() and two["1.jpg"] == (images / "c.jpeg").read_bytes()
    kept = json.loads(two["json"])
    assert [t["from"] for t in kept["conversations"]] == ["system", "human", "gpt"]  # user/assistant mapped
    assert kept["source"] == "test" and kept["image"] == ["b.png", "c.jpeg"]
    assert not any(k.endswith(("jpg", "png", "webp")) for k in text) and json.loads(text["json"]) == records[2]
    # the trainer reads the images in <image> order whatever their formats ("0.webp" before "1.jpg")
    assert [mixed[f] for f in image_fields(mixed)] == [(images / n).read_bytes() for n in ("d.webp", "a.jpg")]


def test_llava_records_of_one_image_share_a_split(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        (images / f"{i}.png").write_bytes(noise(i, fmt="PNG"))
    records = [{"id": f"{i}-{kind}", "image": f"{i}.png", "conversations": _turns("<image>\nWhat is it?", kind)}
               for i in range(8) for kind in ("brief", "detailed")]  # as LLaVA-Instruct asks of each COCO image
    (tmp_path / "llava.json").write_text(json.dumps(records))
    code, _, _ = _convert(capsys, ["--json", str(tmp_path / "llava.json"), "--images", str(images), "--out",
                                   str(tmp_path / "out"), "--val-fraction", "0.25"], main=llava_to_shards.main)
    assert code == 0
    shown = {split: {json.loads(s["json"])["image"] for s in _read_split(tmp_path / "out" / split).values()}
             for split in ("train", "val")}
    assert len(shown["val"]) == 2 and not shown["train"] & shown["val"]


def _chain_of_records(tmp_path: Path, count: int, images: int) -> tuple[Path, list[dict]]:
    """`images` pictures, and `count` records of which record i shows images i and i+1."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(images):
        (folder / f"{i}.png").write_bytes(noise(i, fmt="PNG"))
    return folder, [{"id": f"c{i}", "image": [f"{i}.png", f"{i + 1}.png"],
                     "conversations": _turns("<image>\n<image>\nWhich is brighter?", "brief")} for i in range(count)]


def test_records_sharing_any_image_share_a_split(tmp_path, capsys):
    """Record i shows images i and i+1, so a chain links records through their second images too: a held-out
    record must show no image a train record shows, whichever of its images they share."""
    images, chained = _chain_of_records(tmp_path, 6, images=13)
    apart = [{"id": f"a{i}", "image": f"{i}.png", "conversations": _turns("<image>\nWhat is it?", "brief")}
             for i in range(8, 13)]
    (tmp_path / "llava.json").write_text(json.dumps(chained + apart))
    code, _, _ = _convert(capsys, ["--json", str(tmp_path / "llava.json"), "--images", str(images), "--out",
                                   str(tmp_path / "out"), "--val-fraction", "0.5", "--seed", "5"],
                          main=llava_to_shards.main)
    assert code == 0
    shown, converted = {}, 0
    for split in ("train", "val"):
        records = [json.loads(sample["json"]) for sample in _read_split(tmp_path / "out" / split).values()]
        converted += len(records)
        shown[split] = {name for r in records for name in ([r["image"]] if isinstance(r["image"], str) else r["image"])}
    assert converted == 11 and shown["val"] and shown["train"] and not shown["train"] & shown["val"], shown


def test_records_all_linked_by_shared_images_say_that_none_can_be_held_out(tmp_path, capsys):
    images, chained = _chain_of_records(tmp_path, 4, images=5)
    (tmp_path / "llava.json").write_text(json.dumps(chained))
    code, out, _ = _convert(capsys, ["--json", str(tmp_path / "llava.json"), "--images", str(images), "--out",
                                     str(tmp_path / "out"), "--val-fraction", "0.3"], main=llava_to_shards.main)
    assert code == 0 and not list((tmp_path / "out").glob("val/*.tar"))
    assert "note: --val-fraction 0.3 holds out no record: all 4 share images, directly or through each other" in out


@pytest.mark.slow  # a fresh interpreter and worker processes
def test_a_fresh_process_with_a_text_only_record_first_converts_with_workers(tmp_path):
    """A fresh interpreter, as a user runs the script: the first record written has no image, so the main thread
    imports webdataset (and with it torch) while a worker thread imports the image check's tiler."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(noise(1, fmt="PNG"))
    (images / "b.png").write_bytes(noise(2, fmt="PNG"))
    records = [{"id": "text", "conversations": _turns("Hello?", "Hi.")},
               *({"id": name, "image": f"{name}.png", "conversations": _turns("<image>\nColour?", "grey")}
                 for name in ("a", "b"))]
    source = tmp_path / "llava.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = subprocess.run([sys.executable, str(ROOT / "data_scripts" / "llava_to_shards.py"), "--json", str(source),
                             "--images", str(images), "--out", str(tmp_path / "out"), "--no-shuffle", "--workers", "2"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(_read(str(tmp_path / "out/train/shard-{000000..000000}.tar"))) == ["00000000", "00000001", "00000002"]


def test_llava_bad_records_are_skipped_with_reasons(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(noise(1, fmt="PNG"))
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    good = _turns("<image>\nQ?", "A.")
    bad = {
        "missing-file": {"image": "nowhere.jpg", "conversations": good},
        "unreadable": {"image": "broken.jpg", "conversations": good},
        "no-conversations": {"image": "ok.png"},
        "empty-conversations": {"image": "ok.png", "conversations": []},
        "text-conversations": {"image": "ok.png", "conversations": "<image>\nQ?"},
        "unknown-role": {"image": "ok.png", "conversations": _turns("<image>\nQ?", "A.", gpt="robot")},
        "empty-answer": {"image": "ok.png", "conversations": _turns("<image>\nQ?", "  ")},
        "empty-question": {"image": "ok.png", "conversations": [*good, *_turns(" \n", "B.")]},
        "assistant-first": {"image": "ok.png", "conversations": [{"from": "gpt", "value": "Hello."}, *good]},
        "too-few-placeholders": {"image": ["ok.png", "ok.png"], "conversations": good},
        "placeholder-without-image": {"conversations": good},
        "image-and-images": {"image": "ok.png", "images": ["ok.png"], "conversations": good},
        "image-in-answer": {"image": "ok.png", "conversations": _turns("Q?", "<image>\nA.")},
    }
    lines = [json.dumps({"id": "fine", "image": "ok.png", "conversations": good})]
    lines += [json.dumps({"id": ident, **record}) for ident, record in bad.items()]
    source = tmp_path / "llava.jsonl"
    source.write_text("\n".join(lines) + "\n")
    code, out, err = _convert(capsys, ["--json", str(source), "--images", str(images), "--out", str(tmp_path / "out")],
                              main=llava_to_shards.main)
    assert code == 0 and "wrote 1 sample(s)" in out and f"skipped {len(bad)} record(s)" in out
    reasons = {
        "missing-file": "image file not found: " + str(images / "nowhere.jpg"),
        "unreadable": "broken.jpg",
        "no-conversations": "'conversations' is missing or empty",
        "empty-conversations": "'conversations' is missing or empty",
        "text-conversations": "'conversations' must be a list of turns ({\"from\": ..., \"value\": ...}), got "
                              "string",
        "unknown-role": "unknown role 'robot'",
        "empty-answer": "assistant (gpt) reply is empty",
        "empty-question": "turn 3: the user (human) turn is empty",
        "assistant-first": "turn 1: an assistant (gpt) turn before any user (human) turn",
        "too-few-placeholders": "1 <image> placeholder(s) in the conversation for 2 image(s)",
        "placeholder-without-image": "1 <image> placeholder(s) in the conversation for 0 image(s)",
        "image-and-images": "both 'image' and 'images': give the file names in one of them",
        "image-in-answer": "turn 2: <image> in a gpt turn; images belong in user (human) turns",
    }
    report = {line.split(": ", 1)[0]: line for line in err.splitlines() if line.startswith("skipped line ")}
    for number, (ident, reason) in enumerate(reasons.items(), start=2):
        assert reason in report[f"skipped line {number} (id {ident!r})"]
    assert list(_read_split(tmp_path / "out/train")) == ["00000000"]


def test_llava_input_with_no_usable_record_exits_2(tmp_path, capsys):
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "x", "conversations": []}]))
    argv = ["--images", str(tmp_path), "--out", str(tmp_path / "out")]
    code, _, err = _convert(capsys, ["--json", str(tmp_path / "llava.json"), *argv], main=llava_to_shards.main)
    assert code == 2 and "record 0 (id 'x')" in err and "error: no sample was written" in err
    # one record as a JSON object, not a list: said of the file as a whole, not as a record missing its fields
    (tmp_path / "one.json").write_text(json.dumps({"id": "x", "conversations": []}, indent=2))
    code, _, err = _convert(capsys, ["--json", str(tmp_path / "one.json"), *argv], main=llava_to_shards.main)
    assert code == 2 and err == f"error: {tmp_path / 'one.json'} holds one JSON object; a .json file holds a list " \
                                "of records ([{...}, {...}]), and a .jsonl file one record per line\n"
    # JSONL named .json is read as JSONL, and a cut-off object is no "one JSON object" either
    (tmp_path / "lines.json").write_text("\n".join(json.dumps({"id": f"r{i}", "conversations": []}) for i in (1, 2)))
    code, _, err = _convert(capsys, ["--json", str(tmp_path / "lines.json"), *argv], main=llava_to_shards.main)
    assert code == 2 and "line 1 (id 'r1')" in err and "line 2 (id 'r2')" in err and "no sample was written" in err
    (tmp_path / "cut.json").write_text('{"id": "x", "conversa')
    code, _, err = _convert(capsys, ["--json", str(tmp_path / "cut.json"), *argv], main=llava_to_shards.main)
    assert code == 2 and "is neither a JSON list of records nor JSONL (one record per line): line 1:" in err


def test_an_image_past_pils_guard_but_within_the_trainers_is_checked_without_pils_warning(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(crafted_png(12_000, 10_000))  # 120 MP: PIL warns from 89 MP, the trainer takes up to 256 MP
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(Skip, match="big.png: cannot decode the image"):  # its header claims pixels it lacks
            read_image(path)
    assert not shown, [str(w.message) for w in shown]


def test_llava_prompts_for_the_constitution_need_a_user_turn_not_an_answer(tmp_path, capsys):
    from vlm.constitution.pairs import read_prompts

    (tmp_path / "a.png").write_bytes(noise(1, fmt="PNG"))
    records = [{"id": "asked", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}]},
               {"id": "told", "conversations": [{"from": "gpt", "value": "Red."}]}]
    (tmp_path / "prompts.json").write_text(json.dumps(records))
    argv = ["--json", str(tmp_path / "prompts.json"), "--images", str(tmp_path), "--out"]
    code, out, err = _convert(capsys, [*argv, str(tmp_path / "sft")], main=llava_to_shards.main)
    assert code == 2 and "record 0 (id 'asked'): no assistant (gpt) turn" in err and "need --prompts" in err
    assert "record 1 (id 'told'): turn 1: an assistant (gpt) turn before any user (human) turn" in err
    code, out, err = _convert(capsys, ["--prompts", *argv, str(tmp_path / "prompts")], main=llava_to_shards.main)
    assert code == 0 and "record 1 (id 'told'): no user (human) turn" in err
    assert "python -m vlm.constitution checkpoint=SFT_EXPORT \"data.train=" in out
    (item,) = read_prompts(str(tmp_path / "prompts/train/shard-000000.tar"), "data.train")
    assert item.messages == [{"role": "user", "content": "<image>\nColour?"}] and item.reference is None


def test_llava_records_naming_a_key_twice_at_any_depth_are_bad_records(tmp_path, capsys):
    """A repeated key anywhere in a record (its own, or a turn's) is one the converter cannot read as meant."""
    good = json.dumps({"id": "fine", "conversations": _turns("Q?", "A.")})
    turns_twice = good.replace('"value": "A."', '"value": "B.", "value": "A."').replace('"fine"', '"turn"')
    record_twice = good.replace('"id": "fine"', '"id": "top", "id": "top"')
    (tmp_path / "llava.jsonl").write_text(f"{good}\n{turns_twice}\n{record_twice}\n")
    code, out, _ = _convert(capsys, ["--json", str(tmp_path / "llava.jsonl"), "--images", str(tmp_path), "--out",
                                     str(tmp_path / "out")], main=llava_to_shards.main)
    assert code == 0 and "wrote 1 sample(s)" in out
    assert (tmp_path / "out/skipped.txt").read_text().splitlines() == [
        "line 2 (id 'turn'): names 'value' more than once (which one is meant?)",
        "line 3 (id 'top'): names 'id' more than once (which one is meant?)"]


def test_llava_null_and_non_string_records_are_bad_records(tmp_path, capsys):
    good = {"id": "fine", "conversations": _turns("Q?", "A.")}
    records = [good, None, {"conversations": [{"from": "human", "value": ["Q?"]}, {"from": "gpt", "value": "A."}]},
               {"conversations": [{"from": ["human"], "value": "Q?"}, {"from": "gpt", "value": "A."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    (tmp_path / "llava.jsonl").write_text(f"{json.dumps(good)}\nnull\n")
    argv = ["--images", str(tmp_path), "--out"]
    code, out, _ = _convert(capsys, ["--json", str(tmp_path / "llava.json"), *argv, str(tmp_path / "list")],
                            main=llava_to_shards.main)
    assert code == 0 and "wrote 1 sample(s)" in out
    assert (tmp_path / "list/skipped.txt").read_text().splitlines() == [
        "record 1: not a JSON object (null)", "record 2: turn 1: 'value' must be a string, got list",
        "record 3: turn 1: 'from' must be a string, got list"]
    code, _, _ = _convert(capsys, ["--json", str(tmp_path / "llava.jsonl"), *argv, str(tmp_path / "lines")],
                          main=llava_to_shards.main)
    assert code == 0 and (tmp_path / "lines/skipped.txt").read_text() == "line 2: not a JSON object (null)\n"


# ---- synthetic ----------------------------------------------------------------------------------------------------

def test_make_synthetic_matches_the_trainers_cache(tmp_path, capsys):
    from vlm.config import SyntheticConfig
    from vlm.data import synthetic

    code, out, _ = _convert(capsys, ["--kind", "captions", "--out", str(tmp_path / "out"), "--num-train", "20",
                                     "--num-val", "10", "--image-size", "32", "--samples-per-shard", "8"],
                            main=make_synthetic.main)
    assert code == 0 and "data.train='" in out and "data.val='" in out
    for split, num in (("train", 20), ("val", 10)):
        assert (tmp_path / "out" / split / "classnames.txt").read_text().splitlines() == synthetic.CLASSNAMES
        ours = _read_split(tmp_path / "out" / split)
        settings = SyntheticConfig(num_train=20, num_val=10, samples_per_shard=8, image_size=32, seed=0,
                                   cache_dir=str(tmp_path / "cache"))
        cached = _read(synthetic.ensure_split("captions", split, settings))
        assert len(ours) == num
        assert [(s["png"], s["txt"], s["cls"]) for s in ours.values()] == \
               [(s["png"], s["txt"], s["cls"]) for s in cached.values()]
    code, _, _ = _convert(capsys, ["--kind", "conversations", "--out", str(tmp_path / "conv"), "--num-train", "5",
                                   "--num-val", "0", "--image-size", "16"], main=make_synthetic.main)
    assert code == 0 and len(_read_split(tmp_path / "conv/train")) == 5 and not (tmp_path / "conv/val").exists()


def test_train_conversations_follow_the_question_mix_and_held_out_ones_ask_every_type_equally(tmp_path):
    from collections import Counter

    from vlm.config import ConfigError, QuestionMix, SyntheticConfig
    from vlm.data import synthetic

    settings = SyntheticConfig(num_train=16, num_val=10, samples_per_shard=100, image_size=16, seed=0,
                               cache_dir=str(tmp_path), question_mix=QuestionMix(1, 0, 0, 1, 2),
                               same_shape_pairs=0.0, color_only_pairs=0.0)
    kinds = {split: Counter(json.loads(s["json"])["type"]
                            for s in _read(synthetic.ensure_split("conversations", split, settings)).values())
             for split in ("train", "val")}
    assert kinds["train"] == {"color": 4, "count": 4, "compare": 8}
    assert kinds["val"] == dict.fromkeys(synthetic.QUESTION_TYPES, 2)
    nothing = dataclasses.replace(settings, cache_dir=str(tmp_path / "none"), question_mix=QuestionMix(0, 0, 0, 0, 0))
    with pytest.raises(ConfigError, match="data.synthetic.question_mix"):
        synthetic.ensure_split("conversations", "train", nothing)
    assert not (tmp_path / "none").exists()  # refused before anything was written


def test_a_negative_question_count_is_refused_by_key():
    from tiny import tiny_config

    from vlm.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.synthetic.question_mix.compare=-1 must be >= 0"):
        tiny_config("data.synthetic.question_mix.compare=-1")


def test_two_image_train_choices_shape_the_train_split_only(tmp_path):
    """same_shape_pairs: one shape in two colours; color_only_pairs: asked by colour alone, about two colours."""
    from vlm.config import QuestionMix, SyntheticConfig
    from vlm.data import synthetic

    def records(split: str, same_shape_pairs: float = 0.0, color_only_pairs: float = 0.0) -> list[dict]:
        settings = SyntheticConfig(num_train=40, num_val=40, samples_per_shard=100, image_size=16, seed=0,
                                   cache_dir=str(tmp_path / f"{same_shape_pairs}-{color_only_pairs}"),
                                   question_mix=QuestionMix(0, 0, 0, 0, 1), same_shape_pairs=same_shape_pairs,
                                   color_only_pairs=color_only_pairs)
        shards = synthetic.ensure_split("conversations", split, settings)
        return [r for r in (json.loads(s["json"]) for s in _read(shards).values()) if r["type"] == "compare"]

    same_shape = [r["pictures"] for r in records("train", same_shape_pairs=1.0)]
    assert len(same_shape) == 40
    assert all(a["shape"] == b["shape"] and a["color"] != b["color"] for a, b in same_shape)
    assert any(a["shape"] != b["shape"] for a, b in (r["pictures"] for r in records("train")))
    for record in records("train", color_only_pairs=1.0):
        first, second = record["pictures"]
        assert first["color"] != second["color"]
        for question, answer in zip(record["conversations"][::2], record["conversations"][1::2], strict=True):
            named = first if answer["value"] == "first" else second
            assert f"the {named['color']} shape" in question["value"]
    # held-out pictures and questions never follow the train-only settings
    assert records("val", 1.0, 1.0) == records("val")


def test_an_image_named_relatively_and_absolutely_is_one_group_for_the_split(tmp_path, monkeypatch):
    """`--images imgs` (relative, as the README's examples give it): a record naming `a.jpg`, one naming `./a.jpg`
    and one naming its absolute path all hold out or train together."""
    monkeypatch.chdir(tmp_path)
    names = ["a.jpg", "./a.jpg", str(tmp_path / "imgs" / "a.jpg")]
    assert len({image_group(Path("imgs"), name, "record") for name in names}) == 1
