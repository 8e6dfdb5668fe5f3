"""data_scripts/preferences_to_shards.py: plain and TRL-style records round-trip into shards stage=dpo decodes; every
bad record is reported with its line and reason."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import webdataset as wds
from images import noise, solid
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tiny import tiny_config

from data_scripts import preferences_to_shards
from vlm.data.preferences import PreferenceDecoder, message_text, prompt_messages
from vlm.data.processor import IGNORE_INDEX
from vlm.data.shards import build_pipeline
from vlm.data.sources import DataSources
from vlm.data.tokenizer import IMAGE_TOKEN, joined_parts
from vlm.exports.hf import FLATTEN_CONTENT_PARTS
from vlm.server import ServeSettings
from vlm.server.anthropic import parse_anthropic
from vlm.server.requests import Parser
from vlm.training.stages import get_stage


def _samples(directory: Path) -> list[dict]:
    shards = sorted(str(p) for p in directory.glob("shard-*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))


def test_plain_and_trl_records_round_trip_and_decode(tmp_path, capsys, tiny_sft_export):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(noise(1, fmt="PNG"))
    (images / "b.jpg").write_bytes(noise(2, fmt="JPEG"))
    trl = {"images": ["a.png", "b.jpg"], "id": "trl",
           "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                   {"type": "text", "text": "Which is brighter?"}]}],
           "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "The first."}]}],
           "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "The second."}]}]}
    plain = {"image": "a.png", "prompt": "What is it?", "chosen": "Noise.", "rejected": "A cat."}
    source = tmp_path / "prefs.jsonl"
    source.write_text(json.dumps(plain) + "\n" + json.dumps(trl) + "\n")
    code = preferences_to_shards.main(["--json", str(source), "--images", str(images), "--out",
                                       str(tmp_path / "out"), "--no-shuffle"])
    out = capsys.readouterr().out
    assert code == 0 and "wrote 2 sample(s)" in out and "stage=dpo" in out
    first, second = _samples(tmp_path / "out" / "train")
    assert json.loads(first["json"]) == {"prompt": [{"role": "user", "content": "<image>\nWhat is it?"}],
                                         "chosen": "Noise.", "rejected": "A cat."}
    record = json.loads(second["json"])
    assert record["prompt"][0]["content"] == "<image>\n<image>\nWhich is brighter?" and record["id"] == "trl"
    assert (record["chosen"], record["rejected"]) == ("The first.", "The second.")  # TRL's message lists, as text
    assert second["1.jpg"] == (images / "b.jpg").read_bytes()
    config = tiny_config(stage="dpo", tiny=False)
    task = get_stage("dpo").task.create(config, get_stage("dpo"), tiny_sft_export, DataSources(None, None, None))
    decoder = PreferenceDecoder(task.bundle.processor)
    pairs = list(build_pipeline([str(p) for p in (tmp_path / "out" / "train").glob("*.tar")], decoder, train=False,
                                split_by_node=False))
    assert len(pairs) == 2 and len(pairs[1]["pair"].chosen.image_tokens) == 2
    tokenizer = task.bundle.tokenizer

    def answer(row) -> str:  # the labelled tokens: the answer and its end of turn
        return tokenizer.decode(row.labels[row.labels != IGNORE_INDEX])

    end = "<|im_end|>\n"  # the chat template's end of an assistant turn, learned with the answer
    assert [(answer(p["pair"].chosen), answer(p["pair"].rejected)) for p in pairs] == [
        (f"Noise.{end}", f"A cat.{end}"), (f"The first.{end}", f"The second.{end}")]


def test_bad_records_are_reported_with_line_and_reason(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(noise(1, fmt="PNG"))
    good = {"image": "ok.png", "prompt": "<image>\nQ?", "chosen": "A.", "rejected": "B."}
    bad = {
        "no-chosen": {k: v for k, v in good.items() if k != "chosen"},
        "no-rejected": {k: v for k, v in good.items() if k != "rejected"},
        "same": {**good, "rejected": "A."},
        "missing-image": {**good, "image": "nowhere.png"},
        "placeholders": {**good, "image": ["ok.png", "ok.png"]},
        "ends-with-assistant": {**good, "prompt": [{"role": "user", "content": "<image>Q?"},
                                                   {"role": "assistant", "content": "A."}]},
        "empty-chosen": {**good, "chosen": "  "},
        "empty-prompt": {**good, "prompt": " "},
        "image-in-answer": {**good, "chosen": "A. <image>"},
        "image-part-in-answer": {**good, "rejected": [{"role": "assistant", "content": [
            {"type": "image"}, {"type": "text", "text": "B."}]}]},
        "image-and-images": {**good, "images": ["ok.png"]},
    }
    lines = [json.dumps({"id": "fine", **good})] + [json.dumps({"id": k, **v}) for k, v in bad.items()]
    lines.insert(1, "{not json")
    source = tmp_path / "prefs.jsonl"
    source.write_text("\n".join(lines) + "\n")
    code = preferences_to_shards.main(["--json", str(source), "--images", str(images), "--out",
                                       str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0 and "wrote 1 sample(s)" in out and f"skipped {len(bad) + 1} record(s)" in out
    reasons = ["not valid JSON", "no 'chosen' field", "no 'rejected' field", "are the same answer",
               "image file not found", "2 image(s)", "must end with a user turn", "'chosen' must be a non-empty",
               "'prompt' is empty", "'chosen' holds <image>", "'rejected' holds <image>",
               "both 'image' and 'images'"]
    report = {line.split(": ", 1)[0]: line for line in err.splitlines() if line.startswith("skipped line ")}
    for number, reason in enumerate(reasons, start=2):
        where = f"skipped line {number}" + (f" (id {list(bad)[number - 3]!r})" if number > 2 else "")
        assert reason in report[where], (where, report.get(where))


def test_text_that_is_not_utf8_skips_its_record_with_its_line(tmp_path, capsys):
    """A Latin-1 line and a lone surrogate escape (as a cut emoji leaves in scraped data): each record is reported
    with its line, the others are written, and no shard is left half-written."""
    (tmp_path / "ok.png").write_bytes(noise(1, fmt="PNG"))
    good = {"image": "ok.png", "prompt": "Q?", "chosen": "A.", "rejected": "B."}
    lines = [json.dumps(good).encode(), json.dumps({**good, "prompt": "Caf\u00e9?"}).replace("\\u00e9", "\xe9")
             .encode("latin-1"), json.dumps({**good, "chosen": "A \ud83d"}).encode(), json.dumps(good).encode()]
    (tmp_path / "prefs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    code = preferences_to_shards.main(["--json", str(tmp_path / "prefs.jsonl"), "--images", str(tmp_path), "--out",
                                       str(tmp_path / "out")])
    assert code == 0 and "wrote 2 sample(s)" in capsys.readouterr().out
    skipped = (tmp_path / "out/skipped.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in skipped] == ["line 2", "line 3"]
    assert all("not valid UTF-8" in line for line in skipped) and "Caf" in skipped[0]
    assert not list((tmp_path / "out").rglob("*.partial"))


def test_null_records_null_answers_and_non_string_text_parts_are_bad_records(tmp_path, capsys):
    (tmp_path / "ok.png").write_bytes(noise(1, fmt="PNG"))
    good = {"image": "ok.png", "prompt": "Q?", "chosen": "A.", "rejected": "B."}
    parts = [{"type": "image"}, {"type": "text", "text": ["Q?"]}]
    lines = [json.dumps(good), "null", json.dumps({**good, "prompt": [{"role": "user", "content": parts}]}),
             json.dumps({**good, "rejected": [{"role": "assistant", "content": [{"type": "text", "text": 7}]}]}),
             json.dumps({**good, "chosen": None}), json.dumps({**good, "prompt": [{"role": "user"}]}),
             json.dumps({**good, "prompt": [{"role": "user", "content": None}]}),
             json.dumps({**good, "chosen": [{"role": "assistant"}]})]
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    code = preferences_to_shards.main(["--json", str(tmp_path / "prefs.jsonl"), "--images", str(tmp_path), "--out",
                                       str(tmp_path / "out")])
    assert code == 0 and "wrote 1 sample(s)" in capsys.readouterr().out
    assert (tmp_path / "out/skipped.txt").read_text().splitlines() == [
        "line 2: not a JSON object (null)",
        "line 3: 'prompt' message 1: a text part's 'text' must be a string, got list",
        "line 4: 'rejected' message 1: a text part's 'text' must be a string, got number",
        "line 5: 'chosen' must be a non-empty string or a message list, got null",
        "line 6: a 'user' message has no 'content'",
        "line 7: message content must be a string or a list of parts, got null",
        "line 8: the assistant message of 'chosen' has no 'content'"]


def test_prompts_in_either_message_form_give_the_same_text():
    parts = [{"type": "image"}, {"type": "text", "text": "What colour?"}]
    expected = [{"role": "user", "content": "<image>\nWhat colour?"}]
    assert prompt_messages([{"role": "user", "content": parts}], "r") == expected
    assert prompt_messages([{"from": "human", "value": parts}], "r") == expected  # LLaVA's keys, TRL's parts
    assert prompt_messages([{"from": "human", "value": "<image>\nWhat colour?"}], "r") == expected


IMAGE = object()  # an image part
PARTS = {"image-first": [IMAGE, "What colour?"], "two-images": [IMAGE, IMAGE, "Which is brighter?"],
         "text-first": ["Look:", IMAGE], "two-texts": ["Describe it", "briefly."]}


@pytest.mark.parametrize("name", sorted(PARTS))
def test_a_message_in_parts_reads_the_same_in_preference_data_the_server_and_the_hf_export(name):
    """DPO must learn on the prompt text the deployed model is sent: a TRL record's parts, the same parts sent to
    `vlm.serve` and to the HF export's processor all become one text."""
    parts = PARTS[name]
    trl = [{"type": "image"} if p is IMAGE else {"type": "text", "text": p} for p in parts]
    expected = message_text(trl, "prompt")
    assert expected == joined_parts([IMAGE_TOKEN if p is IMAGE else p for p in parts])
    png = base64.b64encode(solid()).decode()
    blocks = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}} if p is IMAGE
              else {"type": "text", "text": p} for p in parts]
    request, _ = parse_anthropic({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": blocks}]},
                                 Parser(ServeSettings(), 64, lambda text: text))
    assert request.messages == [{"role": "user", "content": expected}]
    flatten = ImmutableSandboxedEnvironment().from_string(FLATTEN_CONTENT_PARTS + "{{ messages[0]['content'] }}")
    assert flatten.render(messages=[{"role": "user", "content": trl}]) == expected
