"""`vlm.constitution`: constitution files, pairs from the policy's own answers with the synthetic, self and HTTP
critics (a real `vlm.serve` on 127.0.0.1 speaking both APIs), resuming, and clear errors."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from images import solid
from live_server import LiveServer
from test_chat import scripted_answer
from tiny import sft_export, tiny_config

from vlm.chat import ChatModel
from vlm.cli import compose_config
from vlm.config import ConfigError, load_config
from vlm.constitution import run, why_no_pairs
from vlm.constitution.critics import (
    ChatCritic,
    CriticRefused,
    CriticUnreachable,
    HttpCompletion,
    Item,
    Principle,
    Revision,
    SyntheticCritic,
)
from vlm.constitution.pairs import Counts, PairMaker, read_prompts
from vlm.constitution.settings import ConstitutionConfig, load_constitution
from vlm.data.preferences import PreferenceDecoder
from vlm.data.shards import build_pipeline, list_shards
from vlm.errors import UserError
from vlm.exports.vlm import load_vlm
from vlm.generation.options import OptionError
from vlm.serve import ServeSettings, create_app
from vlm.training.stages import get_stage


def _config(tiny_sft_export: Path, small_synthetic: list[str], tmp_path: Path, *overrides: str) -> ConstitutionConfig:
    values = compose_config("constitution", [f"checkpoint={tiny_sft_export}", f"output_root={tmp_path}",
                                             f"out={tmp_path / 'pairs'}", "device=cpu", "max_train_prompts=6",
                                             "max_val_prompts=3", "prompts_per_shard=4", "batch_size=4",
                                             "max_new_tokens=4", *small_synthetic, *overrides])
    return load_config(ConstitutionConfig, values)


def test_an_output_path_that_is_a_file_is_refused_before_the_model_loads(tiny_sft_export, small_synthetic, tmp_path):
    (tmp_path / "pairs").write_text("notes")
    with pytest.raises(ConfigError, match=r"out='.*pairs' is a file; give a folder for the preference pairs"):
        run(_config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic"))
    assert (tmp_path / "pairs").read_text() == "notes"


def test_an_output_folder_with_shards_it_did_not_write_is_refused(tiny_sft_export, tmp_path):
    """out= set to the prompts' own folder (a converter's output) would have had its shards overwritten by pairs."""
    from data_scripts import llava_to_shards

    (tmp_path / "red.png").write_bytes(solid((255, 0, 0)))
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]}) + "\n")
    assert llava_to_shards.main(["--json", str(tmp_path / "prompts.jsonl"), "--images", str(tmp_path),
                                 "--out", str(tmp_path / "prompts"), "--val-fraction", "0"]) == 0
    shard = tmp_path / "prompts" / "train" / "shard-000000.tar"
    before = shard.read_bytes()
    with pytest.raises(ConfigError, match=r"out='.*prompts' holds shards that vlm.constitution did not write"):
        run(_config(tiny_sft_export, [f"data.train={shard}", f"data.val={shard}"], tmp_path, "critic=synthetic",
                    f"out={tmp_path / 'prompts'}"))
    assert shard.read_bytes() == before and not (tmp_path / "prompts" / "settings.json").exists()


def test_a_principle_type_no_prompt_has_is_named(tiny_sft_export, small_synthetic, tmp_path, caplog):
    """A misspelt `types` entry judges nothing: refused before the model loads on the synthetic data, whose types
    are known; named at the end of a run on other prompts, with the types they had."""
    import webdataset as wds

    from vlm.data import synthetic

    mine = tmp_path / "mine.yaml"
    mine.write_text("principles:\n  - name: hue\n    critique: Right colour?\n    revision: Fix it.\n"
                    "    types: [color, colour]\n  - name: any\n    critique: Right?\n    revision: Again.\n")
    with pytest.raises(ConfigError, match=r"principle types 'hue': 'colour' are no question type of the synthetic "
                                          r"data \(color, shape, position, count, compare\)"):
        run(_config(Path("missing-export"), [], tmp_path, "critic=synthetic", f"constitution={mine}"))
    shard = tmp_path / "prompts.tar"
    with wds.TarWriter(str(shard)) as sink:
        for sample in synthetic.conversation_samples(4, seed=3, image_size=32):
            sink.write(sample)
    with caplog.at_level(logging.WARNING, logger="vlm.constitution"):
        run(_config(tiny_sft_export, [f"data.train={shard}"], tmp_path, "critic=synthetic", f"constitution={mine}",
                    "max_val_prompts=0"))
    types = ", ".join(sorted({item.group for item in read_prompts(str(shard), "data.train")}))
    assert f"principle types 'hue': 'colour' match no prompt's type (the prompts' types: {types})" in caplog.text


def test_pairs_from_an_earlier_version_resume(tmp_path, caplog):
    """A folder whose settings name the constitution by another path (same text), or that predates settings.json
    (its shards have their pair counts beside them), resumes; shards without counts are no pairs of ours."""
    from vlm.constitution.output import SETTINGS_FILE, check_resumable

    mine = tmp_path / "mine.yaml"
    mine.write_text("principles:\n  - name: a\n    critique: Right?\n    revision: Again.\n")
    constitution = load_constitution(str(mine))
    out = tmp_path / "pairs"
    (out / "train").mkdir(parents=True)
    (out / "train" / "shard-000000.tar").write_bytes(b"")
    (out / "train" / "shard-000000.json").write_text(json.dumps(vars(Counts(prompts=4))))
    settings = {"constitution": constitution.source, "constitution_digest": constitution.digest, "seed": 0}
    (out / SETTINGS_FILE).write_text(json.dumps({**settings, "constitution": "mine.yaml"}))
    check_resumable(out, settings)
    with pytest.raises(ConfigError, match="seed=0 \\(now 1\\)"):
        check_resumable(out, {**settings, "seed": 1})
    (out / SETTINGS_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        check_resumable(out, settings)
    assert "has pairs but no settings.json: resuming them without checking their settings" in caplog.text
    (out / "train" / "shard-000000.json").unlink()
    with pytest.raises(ConfigError, match="holds shards that vlm.constitution did not write"):
        check_resumable(out, settings)


def test_held_out_prompts_are_answered_with_draws_of_their_own():
    """The policy's sampling seed differs by split, shard and batch (held-out answers replayed the train answers'
    draws, position by position), and is the same on a rerun, which a resumed shard relies on."""
    from vlm.constitution.output import sampling_seed

    seeds = {(split, shard, batch): sampling_seed(0, split, shard, batch) for split in ("train", "val")
             for shard in range(3) for batch in range(3)}
    assert len(set(seeds.values())) == len(seeds)
    assert sampling_seed(0, "val", 1, 2) == seeds["val", 1, 2] != sampling_seed(1, "val", 1, 2)


def test_a_folder_records_its_shards_by_absolute_path_and_one_with_shared_draws_is_not_resumed(tmp_path, monkeypatch):
    """settings.json names data.train as a path that reads the same shards from anywhere; a folder recording it as
    typed (relative) resumes from the folder it was typed in; one made before held-out answers drew seeds of their
    own (no sampling_seeds) is refused, since its pairs would be mixed with differently drawn ones."""
    from vlm.constitution.output import SETTINGS_FILE, check_resumable, pair_settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    for shard in ("train-0.tar", "train-1.tar"):
        (tmp_path / "prompts" / shard).write_bytes(b"prompts")
    config = load_config(ConstitutionConfig, compose_config("constitution"))
    constitution = load_constitution("synthetic")
    settings = pair_settings(config, tmp_path / "export", "prompts/train-{0..1}.tar", None, constitution)
    assert settings["data.train"] == f"{tmp_path}/prompts/train-{{0..1}}.tar" and settings["data.val"] is None
    out = tmp_path / "pairs"
    (out / "train").mkdir(parents=True)
    (out / "train" / "shard-000000.tar").write_bytes(b"")
    (out / "train" / "shard-000000.json").write_text(json.dumps(vars(Counts(prompts=4))))
    (out / SETTINGS_FILE).write_text(json.dumps({**settings, "data.train": "prompts/train-{0..1}.tar"}))
    check_resumable(out, settings)
    older = {k: v for k, v in settings.items() if k != "sampling_seeds"}
    (out / SETTINGS_FILE).write_text(json.dumps(older))
    with pytest.raises(ConfigError, match="sampling_seeds='shared by train and val' \\(now 'per split'\\)"):
        check_resumable(out, settings)
    # a prompt shard rewritten in place (a converter's --overwrite) under the same name: its old pairs would be kept
    (out / SETTINGS_FILE).write_text(json.dumps(settings))
    os.utime(tmp_path / "prompts" / "train-1.tar", ns=(1, 1))
    changed = pair_settings(config, tmp_path / "export", "prompts/train-{0..1}.tar", None, constitution)
    with pytest.raises(ConfigError, match=f"pairs made with data.train's shard '{tmp_path}/prompts/train-1.tar' as "
                                          f"it was before \\(it has changed since\\)"):
        check_resumable(out, changed)
    check_resumable(out, settings)  # as it was: resumed


def test_a_constitution_file_is_the_same_setting_by_any_path(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("principles:\n  - name: a\n    critique: Right?\n    revision: Again.\n")
    monkeypatch.chdir(tmp_path)
    assert load_constitution("mine.yaml").source == load_constitution(str(tmp_path / "mine.yaml")).source
    assert load_constitution("synthetic").source == "synthetic"


def _pairs(pattern_dir: Path) -> list[dict]:
    shards = sorted(str(p) for p in pattern_dir.glob("shard-*.tar"))
    return [json.loads(s["json"]) for s in build_pipeline(shards, lambda s: s, train=False, split_by_node=False)]


def _recorded_answers(pattern: str) -> dict[str, str]:
    """Each conversation sample's recorded last answer (for synthetic data, the scene's truth), by its `url:key`."""
    answers = {}
    for sample in build_pipeline(list_shards(pattern), lambda s: s, train=False, split_by_node=False):
        last = json.loads(sample["json"])["conversations"][-1]
        assert last["from"] == "gpt"
        answers[f"{sample['__url__']}:{sample['__key__']}"] = last["value"]
    return answers


@pytest.mark.parametrize("name", ["default", "synthetic"])
def test_shipped_constitutions_load(name):
    constitution = load_constitution(name)
    assert len(constitution.principles) >= 5 and constitution.examples
    assert all(p.critique.strip() and p.revision.strip() for p in constitution.principles)


def test_a_file_without_an_extension_is_read_unless_a_shipped_constitution_has_its_name(tmp_path, monkeypatch):
    rules = "principles:\n  - name: mine\n    critique: Is it right?\n    revision: Say it rightly.\n"
    (tmp_path / "myrules").write_text(rules)
    (tmp_path / "default").write_text(rules)
    monkeypatch.chdir(tmp_path)
    assert [p.name for p in load_constitution("myrules").principles] == ["mine"]
    assert [p.name for p in load_constitution(str(tmp_path / "default")).principles] == ["mine"]  # a path: the file
    assert len(load_constitution("default").principles) >= 5  # a bare shipped name: the shipped one
    with pytest.raises(ConfigError, match=r"^constitution='nosuch': no such file '.*constitutions/nosuch.yaml'; "
                                          r"shipped: \['default', 'synthetic'\], or give a path"):
        load_constitution("nosuch")


@pytest.mark.parametrize("text,message", [("principles: []\n", "has no principles"),
                                          ("principles:\n  - name: a\n    critique: Is it right?\n",
                                           "principle 0 ('a') has no 'revision' request"),
                                          ("principles: [\n", "is not valid YAML"),
                                          ("principles:\n  - name: a\n    critique: Right?\n    revision: Again.\n"
                                           "    types: color\n", "principle 0 ('a') has types 'color'"),
                                          ("principles:\n  - name: a\n    critique: [Is it right, Is it short]\n"
                                           "    revision: Again.\n", "principle 0 ('a') has list for its 'critique'"),
                                          ("principles:\n  - name: a\n    critique: Right?\n    revision: Again.\n"
                                           "    typo_types: [color]\n",
                                           "principle 0 ('a'): unknown key 'typo_types'. Did you mean 'types'?"),
                                          ("principle:\n  - name: a\n", "unknown key 'principle'. Did you mean "
                                                                        "'principles'?"),
                                          ("- a\n- b\n", "holds list; write a mapping with 'principles'"),
                                          ("principles:\n  - name: a\n    critique: Right?\n    revision: Again.\n"
                                           "examples:\n  - question: q\n    answer: a\n    critique: c\n",
                                           "example 0 needs question, answer, critique and revision"),
                                          ("principles:\n  - name: a\n    critique: Right?\n    revision: Again.\n"
                                           "examples:\n  - question: q\n    answer: a\n    critique: ' '\n"
                                           "    revision: r\n", "example 0 has an empty 'critique'"),
                                          ("principles:\n  - name: a\n    critique: Right?\n    revision: Again.\n"
                                           "examples:\n  - question: \"<image>\\nWhat colour?\"\n    answer: a\n"
                                           "    critique: c\n    revision: r\n",
                                           "example 0's question holds <image>: few-shot examples carry no image"),
                                          ("principles:\n  - name: a\n    critique: Look at <image> again.\n"
                                           "    revision: Again.\n",
                                           "principle 0 ('a')'s critique request holds <image>: the prompt's images"),
                                          (b"principles: \xff\xfe\n", "is not UTF-8 text")])
def test_bad_constitution_files_are_named(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        load_constitution(str(path))
    assert str(path) in str(err.value) and message in str(err.value)


@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
def test_synthetic_critic_pairs_wrong_answers_with_the_truth_and_resumes(tiny_sft_export, small_synthetic, tmp_path,
                                                                        caplog):
    caplog.set_level(logging.INFO, logger="vlm.constitution")
    config = _config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic")
    summary = run(config)
    out = tmp_path / "pairs"
    train = summary["train"]
    assert train["prompts"] == 6 and train["kept"] + train["dropped_unchanged"] == 6
    pairs = _pairs(out / "train")
    assert len(pairs) == train["kept"] > 0  # a random model answers wrongly
    from vlm.data.sources import resolve

    truth = _recorded_answers(resolve(config.data, "conversations").train)
    for pair in pairs:
        # chosen: the scene's recorded answer; rejected: the policy's answer, which is another
        assert pair["chosen"] == truth[pair["source"]]
        assert pair["rejected"].strip().lower() != pair["chosen"].lower()
        assert repr(pair["rejected"]) in pair["critique"]
        assert pair["prompt"][-1]["role"] == "user" and pair["type"]
        # the synthetic constitution's principles each judge one question type: the pair's is the one drawn
        assert pair["principle"] == {"compare": "which_image"}.get(pair["type"], pair["type"])
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.json", "shard-000000.tar",
                                                                 "shard-000001.json", "shard-000001.tar"]
    done = json.loads((out / "DONE").read_text())
    assert done["train"].endswith("shard-{000000..000001}.tar") and done["qa_val"]
    assert done["checkpoint"] == str(tiny_sft_export)  # stage=dpo starts from the model that gave the answers
    # out= is not where stage=dpo looks by itself, so the command it suggests names the pairs
    assert f"stage=dpo init_from={tiny_sft_export} data.train='{done['train']}' data.val='{done['val']}::" \
           f"{done['qa_val']}'" in caplog.text
    # a rerun after an interrupt: the finished shard is kept as it is, a half-written one is redone
    first = (out / "train" / "shard-000000.tar").stat().st_mtime_ns
    (out / "train" / "shard-000001.json").unlink()
    (out / "train" / "shard-000001.tar").rename(out / "train" / "shard-000001.tar.partial")
    again = run(config)
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == first
    assert again["train"] == train and len(_pairs(out / "train")) == len(pairs)
    assert "4 prompts were already done" in caplog.text
    # a rerun with settings that change what a shard holds would keep the old shards: refused, naming the key
    with pytest.raises(ConfigError) as err:
        run(_config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic", "anchors=0.5"))
    assert "anchors=0.05 (now 0.5)" in str(err.value) and str(out) in str(err.value)
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == first
    # asked for more prompts: the last shard held 2 of its 4, so it is made again, and a new one follows
    more = run(_config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic", "max_train_prompts=10"))
    assert more["train"]["prompts"] == 10 and "shard 1 holds 2 prompts where this run asks 4" in caplog.text
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == first
    assert [json.loads((out / "train" / f"shard-00000{i}.json").read_text())["prompts"] for i in range(3)] == [4, 4, 2]
    # asked for fewer: the shard cut short by the limit is made again with only the prompts asked for
    fewer = run(_config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic", "max_train_prompts=5"))
    assert fewer["train"]["prompts"] == 5 and "shard 1 holds 4 prompts where this run asks 1" in caplog.text
    assert json.loads((out / "DONE").read_text())["train"].endswith("shard-{000000..000001}.tar")
    assert json.loads((out / "train" / "shard-000001.json").read_text())["prompts"] == 1


@pytest.mark.slow  # a whole constitution run
def test_pairs_written_from_one_folder_are_read_from_any_other(tiny_sft_export, small_synthetic, tmp_path,
                                                                monkeypatch):
    """OUT/DONE and the dpo export that reads it name the shards and the policy by absolute paths, so stage=dpo and
    vlm.eval find them wherever they run, although the constitution was given relative ones."""
    from vlm.data.shards import list_shards

    (tmp_path / "runs" / "sft" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "sft" / "r" / "export").symlink_to(tiny_sft_export)
    monkeypatch.chdir(tmp_path)
    run(_config(Path("runs/sft/r/export"), small_synthetic, Path("runs"), "critic=synthetic"))
    done = json.loads((tmp_path / "runs" / "pairs" / "DONE").read_text())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert done["checkpoint"] == str(tmp_path / "runs" / "sft" / "r" / "export")
    for split in ("train", "val", "qa_val"):
        assert Path(done[split]).is_absolute() and list_shards(done[split]), split


def test_ctrl_c_keeps_the_shards_written_and_says_where(tiny_sft_export, small_synthetic, tmp_path, caplog,
                                                        monkeypatch):
    caplog.set_level(logging.INFO, logger="vlm.constitution")
    revise, calls = SyntheticCritic.revise, itertools.count()

    def interrupted_on_the_second_batch(self, *args):
        if next(calls) == 1:
            raise KeyboardInterrupt  # as Ctrl-C arrives while the critic works
        return revise(self, *args)

    monkeypatch.setattr(SyntheticCritic, "revise", interrupted_on_the_second_batch)
    config = _config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic")
    with pytest.raises(KeyboardInterrupt):
        run(config)
    out = tmp_path / "pairs" / "train"
    assert f"stopped: 4 train prompts were done and are kept in {out}; rerun the same command" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.json", "shard-000000.tar"]
    monkeypatch.setattr(SyntheticCritic, "revise", revise)
    assert run(config)["train"]["prompts"] == 6 and "4 prompts were already done" in caplog.text


@pytest.mark.slow  # the command in a process of its own, for its exit code
def test_sigterm_keeps_the_shards_written_says_where_and_exits_143(tiny_sft_export, small_synthetic, tmp_path, caplog,
                                                                   monkeypatch):
    """A scheduler's kill stops the run as Ctrl-C does: the finished shard stays, a line says where, and the command
    exits with 143 (it was killed with no word, leaving the user to guess what was kept)."""
    from vlm.signals import Terminated

    caplog.set_level(logging.INFO, logger="vlm.constitution")
    revise, calls = SyntheticCritic.revise, itertools.count()

    def killed_on_the_second_batch(self, *args):
        if next(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as the scheduler's signal arrives while the critic works
        return revise(self, *args)

    monkeypatch.setattr(SyntheticCritic, "revise", killed_on_the_second_batch)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        run(_config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic"))
    out = tmp_path / "pairs" / "train"
    assert f"stopped: 4 train prompts were done and are kept in {out}; rerun the same command" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.json", "shard-000000.tar"]
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone with it
    process = subprocess.run([sys.executable, "-c", "from vlm.signals import Terminated\n"
                              "from vlm.constitution import main_hydra\n"
                              "import vlm.constitution as c\n"
                              "def stop(config): raise Terminated\n"
                              "c.run = stop\n"
                              "main_hydra()", "critic=synthetic"], capture_output=True, text=True, timeout=120)
    assert process.returncode == 143, process.stderr[-500:]


def test_a_rerun_asks_again_the_prompts_a_failed_critic_request_lost(tiny_sft_export, small_synthetic, tmp_path,
                                                                       caplog, monkeypatch):
    """A busy endpoint (429s) loses some prompts' pairs; the run ends saying so, and a rerun makes the shards that lost
    prompts again, keeping the others, so it ends as a run whose critic never failed."""
    caplog.set_level(logging.INFO, logger="vlm.constitution")
    revise, calls = SyntheticCritic.revise, itertools.count()

    def busy_on_the_second_batch(self, items, *args):
        if next(calls) == 1:  # the second batch: shard 1's (4 prompts per shard, 4 per batch)
            self.failed += len(items)
            return [None] * len(items)
        return revise(self, items, *args)

    monkeypatch.setattr(SyntheticCritic, "revise", busy_on_the_second_batch)
    config = _config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic", "max_val_prompts=0")
    first = run(config)
    assert first["critic_failed_requests"] == first["train"]["dropped_failed"] == 2  # shard 1 holds 2 prompts
    assert "2 critic requests failed" in caplog.text and "rerun the same command to ask them again" in caplog.text
    out = tmp_path / "pairs" / "train"
    kept = (out / "shard-000000.tar").stat().st_mtime_ns
    monkeypatch.setattr(SyntheticCritic, "revise", revise)
    again = run(config)
    assert "shard 1 lost prompts to 2 failed critic requests in an earlier run" in caplog.text
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept
    assert again["critic_failed_requests"] == again["train"]["dropped_failed"] == 0
    assert again["train"]["kept"] + again["train"]["dropped_unchanged"] == 6


def test_a_changed_constitution_file_is_not_resumed_as_it_was(tiny_sft_export, small_synthetic, tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text((Path(load_constitution.__globals__["CONFIG_DIR"]) / "constitutions" / "synthetic.yaml")
                    .read_text())
    config = _config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic", f"constitution={mine}",
                     "max_train_prompts=4", "max_val_prompts=0")
    run(config)
    mine.write_text(mine.read_text().replace("principles:", "principles:  # edited", 1))
    with pytest.raises(ConfigError, match="constitution_digest="):
        run(config)


def test_a_critic_url_with_a_trailing_slash_is_the_same_endpoint(tiny_sft_export, small_synthetic, tmp_path):
    from vlm.constitution.output import pair_settings

    constitution = load_constitution("synthetic")
    settings = [pair_settings(_config(tiny_sft_export, small_synthetic, tmp_path, "critic=http",
                                     f"critic.url=http://127.0.0.1:9{suffix}"), tiny_sft_export, None, None,
                              constitution) for suffix in ("", "/")]
    assert settings[0] == settings[1] and settings[0]["critic.url"] == "http://127.0.0.1:9"


def test_a_principle_that_is_not_a_mapping_is_named(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text('principles:\n  - "just a string"\n')
    with pytest.raises(ConfigError, match=r"principle 0 is 'just a string'; write each principle as a mapping"):
        load_constitution(str(path))


class AskedCritic(SyntheticCritic):
    """The synthetic judge, noting each answer it is asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def revise(self, items, answers, principles):
        self.asked += answers
        return super().revise(items, answers, principles)

    def score(self, items, answers, principles):
        self.asked += answers
        return super().score(items, answers, principles)


@pytest.mark.parametrize("mode", ["mode=revise", "mode=best_of_n"])
def test_an_empty_answer_is_dropped_as_empty_without_asking_the_critic(tiny_sft_export, tiny_chat_model,
                                                                       small_synthetic, tmp_path, mode):
    """A policy that ends its answer at once: nothing to critique and no rejected answer to learn from (and the
    Messages API refuses an empty assistant turn, which counted the model's empty answer as a critic failure)."""
    from vlm.data.sources import resolve

    config = _config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic", mode, "num_samples=2")
    items = list(itertools.islice(read_prompts(resolve(config.data, "conversations").train, "data.train"), 4))
    critic = AskedCritic()
    make = PairMaker(config, tiny_chat_model, critic, load_constitution("synthetic"))
    hook = scripted_answer(tiny_chat_model, [min(tiny_chat_model.eos_token_ids)])  # ends every answer at once
    try:
        samples, counts = make(items, seed=0, anchors=True)
    finally:
        hook.remove()
    assert samples == [] and critic.asked == []
    assert (counts.prompts, counts.dropped_empty, counts.dropped_failed, counts.dropped_unchanged) == (4, 4, 0, 0)


class MarkupCritic(SyntheticCritic):
    """A critic whose revisions spell `spelled` (an endpoint echoing the prompt's markup)."""

    def __init__(self, spelled: str) -> None:
        self.spelled = spelled

    def revise(self, items, answers, principles):
        return [Revision("wrong colour", f"The {self.spelled} shows it.") for _ in items]


@pytest.mark.parametrize("spelled", ["<image>", "<|im_end|>"])
def test_a_revision_that_spells_markup_is_dropped_and_counted_not_written_for_dpo_to_skip(
        tiny_sft_export, tiny_chat_model, small_synthetic, tmp_path, spelled, caplog):
    """stage=dpo reads <image> in an answer as an image placeholder and a control token as a turn's end, and skips
    the pair: the constitution drops such pairs itself, names them and counts them."""
    from vlm.data.sources import resolve

    config = _config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic")
    items = list(itertools.islice(read_prompts(resolve(config.data, "conversations").train, "data.train"), 3))
    make = PairMaker(config, tiny_chat_model, MarkupCritic(spelled), load_constitution("synthetic"))
    with caplog.at_level(logging.WARNING):
        samples, counts = make(items, seed=0)
    assert samples == [] and (counts.prompts, counts.kept) == (3, 0)
    assert counts.dropped_markup == 3 - counts.dropped_empty > 0
    assert sum("the revision" in r.getMessage() and spelled in r.getMessage() for r in caplog.records) == 3 - \
        counts.dropped_empty
    assert "spelled <image> or a chat control token" in why_no_pairs(counts, "revise")


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_anchors_keep_a_share_of_the_answers_the_critic_left_unchanged(tiny_sft_export, tiny_chat_model,
                                                                       small_synthetic, tmp_path, share):
    from vlm.data.sources import resolve

    config = _config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic", f"anchors={share}")
    items = list(itertools.islice(read_prompts(resolve(config.data, "conversations").train, "data.train"), 40))
    answers = [item.reference if i % 4 else "no idea" for i, item in enumerate(items)]  # 30 right, 10 wrong
    make = PairMaker(config, tiny_chat_model, SyntheticCritic(), load_constitution("synthetic"))
    principles = [make._principle(item) for item in items]
    counts, kept = Counts(), []
    pairs = make._revised(items, answers, principles, counts, kept)
    right = [(item, answer) for i, (item, answer) in enumerate(zip(items, answers, strict=True)) if i % 4]
    assert len(pairs) == 10 and counts.dropped_unchanged == 30
    if share == 1.0:
        assert kept == right
    else:
        assert 5 < len(kept) < 25 and all(anchor in right for anchor in kept)
        again: list = []
        make._revised(items, answers, principles, Counts(), again)
        assert again == kept  # drawn from each prompt's own seed: a resumed run keeps the same anchors
    item, answer = kept[0]
    sample = make._anchor(item, answer)
    decoded = PreferenceDecoder(load_vlm(tiny_sft_export).processor)({"__url__": "a.tar", "__key__": "0", **sample})
    labels = decoded["encoded"].labels
    assert load_vlm(tiny_sft_export).tokenizer.decode(labels[labels != -100]).split("<|im_end|>")[0] == answer
    assert json.loads(sample["json"])["type"] == item.group


COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]


class ColourNamer:
    """A policy whose k-th sample of a prompt names the k-th colour: of 8 samples, one answers a colour question
    right and the others wrong; the answers to any other question are all wrong."""

    def __init__(self, processor) -> None:
        self.processor = processor  # the chat template the pairs are checked against

    def prepare(self, messages, images):
        return list(messages)  # a prompt of its own, whatever the messages

    def generate_batch(self, prompts, **options):
        samples_so_far: dict[int, int] = {}  # prompts arrive as prompts * num_samples: count each one's samples
        answers = []
        for prompt in prompts:
            k = samples_so_far[id(prompt)] = samples_so_far.get(id(prompt), -1) + 1
            answers.append(COLOURS[k])
        return answers


@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
def test_best_of_n_pairs_the_best_with_the_worst(tiny_sft_export, tiny_chat_model, small_synthetic, tmp_path):
    config = _config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic", "mode=best_of_n",
                     "num_samples=3", "temperature=1.5", "max_val_prompts=0")
    summary = run(config)
    assert summary["train"]["kept"] + summary["train"]["dropped_tie"] == 6 and "val" not in summary
    for pair in _pairs(tmp_path / "pairs" / "train"):
        assert pair["scores"] == {"chosen": 1.0, "rejected": 0.0}
    # answers that differ in score: the right colour is chosen, a wrong one rejected; other questions are ties
    from vlm.data.sources import resolve

    config = _config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic", "mode=best_of_n",
                     f"num_samples={len(COLOURS)}")
    items = list(itertools.islice(read_prompts(resolve(config.data, "conversations").train, "data.train"), 16))
    truth = {item.key: item.reference for item in items}
    make = PairMaker(config, ColourNamer(tiny_chat_model.processor), SyntheticCritic(), load_constitution("synthetic"))
    samples, counts = make(items, 0)
    colour_questions = sum(item.reference in COLOURS for item in items)
    assert counts.kept == len(samples) == colour_questions > 0 and counts.dropped_tie == len(items) - colour_questions
    for sample in samples:
        pair = json.loads(sample["json"])
        assert pair["chosen"] == truth[pair["source"]] and pair["rejected"] in COLOURS
        assert pair["rejected"] != pair["chosen"] and pair["scores"] == {"chosen": 1.0, "rejected": 0.0}


@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
def test_pairs_train_stage_dpo(tiny_sft_export, small_synthetic, tmp_path):
    """The written pairs decode as stage=dpo's batches, on the path `stage=dpo` finds without data.train."""
    run(_config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic",
                f"out={tmp_path / 'constitution' / 'run'}"))
    from vlm.data.sources import resolve

    config = tiny_config(f"output_root={tmp_path}", stage="dpo", tiny=False)
    data = resolve(config.data, "preferences", config.output_root)
    stage = get_stage("dpo")
    task = stage.task.create(config, stage, tiny_sft_export, data)
    written = sorted(str(p) for p in (tmp_path / "constitution" / "run" / "train").glob("*.tar"))
    assert list_shards(data.train) == written  # the pairs stage=dpo finds by itself
    samples = list(build_pipeline(list_shards(data.train), task.batching().decode, train=False, split_by_node=False))
    batch = task.batching().collate(samples)
    assert batch["pairs"] is not None and task.pair_loss(batch["pairs"]).loss.isfinite()
    # held-out pairs and the held-out conversations they came from
    pairs_val, conversations_val = data.val.split("::")
    assert list_shards(pairs_val) == sorted(str(p) for p in (tmp_path / "constitution" / "run" / "val").glob("*.tar"))
    assert conversations_val == json.loads((tmp_path / "constitution" / "run" / "DONE").read_text())["qa_val"]


@pytest.fixture(scope="module")
def critic_export(tmp_path_factory) -> Path:
    """A tiny random sft export whose greedy replies are text: with the output layer tied to the embeddings (the
    tiny preset's), a random model repeats the prompt's last token, a newline, and every critique comes back empty."""
    return sft_export(tmp_path_factory.mktemp("critic") / "export", "model.llm.config.tie_word_embeddings=false")


@pytest.fixture(scope="module")
def critic_server(critic_export):
    """A live `vlm.serve` of `critic_export`, and the replies its model wrote (the served ones, before the API's
    JSON: a spy on the model's generate)."""
    chat, replies = ChatModel.load(critic_export, device="cpu"), []
    generate = chat.generate

    def noting_replies(*args, **kwargs):
        completion = generate(*args, **kwargs)
        replies.append(completion.text.strip())
        return completion

    chat.generate = noting_replies
    server = LiveServer(create_app(chat, ServeSettings(max_queue=16, web=False)))
    yield server.url, replies
    server.stop()


def _came_from_the_critic(pairs: list[dict], replies: list[str]) -> None:
    """Each pair's critique and its revision (the chosen answer) are replies the critic wrote, and the revision
    differs from the policy's answer."""
    assert pairs
    for pair in pairs:
        assert pair["critique"] and pair["critique"] in replies
        assert pair["chosen"] in replies and pair["chosen"] != pair["rejected"]


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_http_critic_against_a_live_vlm_serve(tiny_sft_export, small_synthetic, tmp_path, critic_server, api,
                                              monkeypatch):
    url, replies = critic_server
    monkeypatch.setenv("CRITIC_KEY", "unused-by-this-server")
    summary = run(_config(tiny_sft_export, small_synthetic, tmp_path, "critic=http", f"critic.url={url}",
                          f"critic.api={api}", "critic.api_key_env=CRITIC_KEY", "critic.max_new_tokens=4",
                          "constitution=synthetic", "max_val_prompts=0", "critic.concurrency=2"))
    assert summary["critic_failed_requests"] == 0
    train = summary["train"]
    assert train["prompts"] == 6 and train["dropped_failed"] == 0 and train["kept"] > 0
    assert train["kept"] + train["dropped_unchanged"] + train["dropped_empty"] == 6
    pairs = _pairs(tmp_path / "pairs" / "train")
    assert len(pairs) == train["kept"]
    _came_from_the_critic(pairs, replies)


def test_self_critic_runs_the_loop(critic_export, small_synthetic, tmp_path, monkeypatch):
    """The policy critiques and revises its own answers: each kept pair's critique and revision are replies it
    wrote."""
    replies: list[str] = []
    generate_batch = ChatModel.generate_batch

    def noting_replies(self, *args, **kwargs):
        written = generate_batch(self, *args, **kwargs)
        replies.extend(text.strip() for text in written)
        return written

    monkeypatch.setattr(ChatModel, "generate_batch", noting_replies)
    summary = run(_config(critic_export, small_synthetic, tmp_path, "critic=self", "constitution=default",
                          "critic.max_new_tokens=4", "max_val_prompts=0"))
    train = summary["train"]
    assert train["prompts"] == 6 and train["dropped_failed"] == 0 and summary["critic_failed_requests"] == 0
    assert train["kept"] + train["dropped_unchanged"] + train["dropped_empty"] == 6 and train["kept"] > 0
    pairs = _pairs(tmp_path / "pairs" / "train")
    assert len(pairs) == train["kept"]
    _came_from_the_critic(pairs, replies)


def test_a_self_critic_gets_as_many_examples_as_its_context_leaves_room_for(caplog):
    """Each example is 6 turns; a context of 12 turns holds the critique request (3 turns), the room for its reply
    and the revision request (2), and one example; a context of 6 holds none, and the request is still asked. A
    critic given fewer examples than the constitution has says so, once."""
    constitution = load_constitution("default")
    item = Item("k", [{"role": "user", "content": "<image>\nWhat color is the shape?"}], [b""], "red")
    asked: list = []

    def complete(requests):
        asked.extend(requests)
        return ["ok" for _ in requests]

    total = len(constitution.examples)
    for context, examples in ((12, 1), (6, 0), (100, total)):
        asked.clear()
        caplog.clear()
        critic = ChatCritic(complete, constitution.examples, lambda messages, images, n=context: len(messages) <= n, 8)
        with caplog.at_level(logging.WARNING, logger="vlm.constitution.critics"):
            for _ in range(2):
                critic.revise([item], ["blue"], constitution.principles[:1])
        critique_request = asked[0][0]
        assert len(critique_request) == 6 * examples + 3
        assert critique_request[-3:-1] == [*item.messages, {"role": "assistant", "content": "blue"}]
        told = f"the critic's context holds {examples} of the constitution's {total} few-shot examples for k"
        assert caplog.text.count(told) == (examples < total)



def test_a_prompts_system_message_opens_the_critique_request_before_the_examples():
    constitution = load_constitution("default")
    system = {"role": "system", "content": "Answer in one word."}
    item = Item("k", [system, {"role": "user", "content": "<image>\nWhat color is the shape?"}], [b""], "red")
    asked: list = []

    def complete(requests):
        asked.extend(requests)
        return ["ok" for _ in requests]

    for fits in (None, lambda messages, images: len(messages) <= 6):  # with every example, and with none
        asked.clear()
        ChatCritic(complete, constitution.examples, fits, 8).revise([item], ["blue"], constitution.principles[:1])
        critique_request, revision_request = asked[0][0], asked[1][0]
        for request in (critique_request, revision_request):
            assert request[0] == system and [m["role"] for m in request].count("system") == 1
        assert critique_request[-3:-1] == [item.messages[1], {"role": "assistant", "content": "blue"}]

@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
def test_unreachable_critic_names_the_url_and_the_prompts_done(tiny_sft_export, small_synthetic, tmp_path):
    with pytest.raises(UserError) as err:
        run(_config(tiny_sft_export, small_synthetic, tmp_path, "critic=http", "critic.url=http://127.0.0.1:9",
                    "critic.api=openai", "critic.retries=1", "critic.timeout=2", "constitution=synthetic"))
    message = str(err.value)
    assert "http://127.0.0.1:9/v1/chat/completions" in message and "0 train prompts were done" in message
    assert message.endswith("rerun the same command to go on from there")  # the critic may be back by then
    assert not (tmp_path / "pairs" / "DONE").exists()
    assert not list((tmp_path / "pairs").rglob("*.tar"))  # nothing half-written left as a shard


@pytest.mark.slow  # a whole constitution run
def test_the_synthetic_critic_on_prompts_without_answers_says_what_to_change(tiny_sft_export, tmp_path):
    """Prompt-only shards carry no true answer to judge by: a rerun would fail the same way, so none is suggested."""
    from data_scripts import llava_to_shards

    (tmp_path / "red.png").write_bytes(solid((255, 0, 0)))
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the shape?"}]}) + "\n")
    assert llava_to_shards.main(["--prompts", "--json", str(tmp_path / "prompts.jsonl"), "--images", str(tmp_path),
                                 "--out", str(tmp_path / "shards"), "--val-fraction", "0"]) == 0
    train = tmp_path / "shards" / "train" / "shard-000000.tar"
    with pytest.raises(UserError) as err:
        run(_config(tiny_sft_export, [f"data.train={train}", f"data.val={train}"], tmp_path, "critic=synthetic"))
    assert "critic=synthetic needs the recorded answer of" in str(err.value)
    assert "0 train prompts were done" in str(err.value) and "rerun" not in str(err.value)


def test_prompts_with_an_unreadable_image_or_a_bad_conversation_are_skipped_and_counted(tiny_sft_export, tmp_path,
                                                                                       caplog):
    """One bad sample in the prompt shards is named and counted; the run goes on (a rerun would stop at it again)."""
    import webdataset as wds

    def conversation(question: str, answer: str, role: str = "human") -> str:
        return json.dumps({"conversations": [{"from": role, "value": question}, {"from": "gpt", "value": answer}]})

    shard = tmp_path / "prompts" / "shard-000000.tar"
    shard.parent.mkdir()
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "good", "json": conversation("<image>\nWhat color is the shape?", "red"),
                    "0.png": solid((255, 0, 0))})
        sink.write({"__key__": "truncated", "json": conversation("<image>\nWhat color?", "red"),
                    "0.png": b"\x89PNG cut short"})
        sink.write({"__key__": "robot", "json": conversation("<image>\nhi", "red", role="robot"),
                    "0.png": solid((0, 0, 255))})
    with caplog.at_level(logging.WARNING):
        run(_config(tiny_sft_export, [f"data.train={shard}", f"data.val={shard}"], tmp_path, "critic=synthetic"))
    summary = json.loads((tmp_path / "pairs" / "summary.json").read_text())
    assert summary["train"]["prompts"] == 2 and summary["train"]["dropped_failed"] == 1  # the robot's is no prompt
    assert f"skipping {shard}:truncated: image 0: not an image" in caplog.text
    assert f"skipping {shard}:robot: not a conversation sample" in caplog.text and "unknown role 'robot'" in caplog.text


def test_missing_api_key_variable_is_named(tiny_sft_export, small_synthetic, tmp_path):
    os.environ.pop("NO_SUCH_KEY_VAR", None)
    with pytest.raises(UserError, match="NO_SUCH_KEY_VAR"):
        run(_config(tiny_sft_export, small_synthetic, tmp_path, "critic=http", "critic.url=http://127.0.0.1:9",
                    "critic.api=anthropic", "critic.api_key_env=NO_SUCH_KEY_VAR"))
    assert not (tmp_path / "pairs").exists()  # a start that failed leaves no folder to trip over


def test_generate_batch_matches_one_by_one_greedy_answers(tiny_chat_model):
    conversations = [([{"role": "user", "content": f"<image>\n{q}"}], [solid(color)])
                     for q, color in [("What color is the shape?", (255, 0, 0)), ("Where is it?", (0, 0, 255)),
                                      ("What shape is this? Answer in a few words.", (0, 255, 0))]]
    prompts = [tiny_chat_model.prepare(m, i) for m, i in conversations]
    batched = tiny_chat_model.generate_batch(prompts, temperature=0, max_new_tokens=6)
    single = [tiny_chat_model.generate(m, i, temperature=0, max_new_tokens=6).text.strip() for m, i in conversations]
    assert batched == single and len(batched) == 3
    # a stop sequence cuts each answer where generate stops; an H2O cache is refused, never silently dropped
    stop = [next(c for c in text if c.strip()) for text in single][:1]  # a character the first answer holds
    cut = [tiny_chat_model.generate(m, i, temperature=0, max_new_tokens=6, stop=stop).text.strip()
           for m, i in conversations]
    assert tiny_chat_model.generate_batch(prompts, temperature=0, max_new_tokens=6, stop=stop) == cut
    assert cut[0] != single[0]
    with pytest.raises(OptionError, match=r"kv_cache='h2o': generate_batch decodes with the dynamic cache"):
        tiny_chat_model.generate_batch(prompts, temperature=0, kv_cache="h2o")


class _OddCritic(BaseHTTPRequestHandler):
    """A critic endpoint whose reply depends on the URL's first path segment: the replies a buggy or wrong server
    sends."""

    REPLIES = {
        "parts": json.dumps({"choices": [{"message": {"content": [{"type": "text", "text": "looks "},
                                                                   {"type": "text", "text": "fine"}]}}]}),
        "null-choices": json.dumps({"choices": None}),
        "null-content": json.dumps({"choices": [{"message": {"content": None}}]}),
        "a-list": "[]",
        "anthropic-text": json.dumps({"content": [{"type": "text", "text": "ok"}]}),
    }

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["content-length"]))
        mode = self.path.split("/")[1]
        body = self.REPLIES.get(mode, "").encode()
        self.send_response(503 if mode == "busy" else 200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body) + 100 if mode == "cut-short" else len(body)))
        self.end_headers()
        self.wfile.write(body if mode != "cut-short" else b'{"choices": [')

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def odd_critic():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OddCritic)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


REQUEST = ([{"role": "user", "content": "<image>\nWhat color is it?"}], [solid((255, 0, 0))])


@pytest.mark.parametrize("mode,api,refusal", [
    ("null-choices", "openai", "the reply has no choices[0].message.content"),
    ("a-list", "openai", "the reply has no choices[0].message.content"),
    ("null-content", "openai", "the reply's choices[0].message.content is NoneType, not text"),
    ("parts", "anthropic", "the reply has no content"),  # an OpenAI reply read as an Anthropic one
])
def test_a_critic_reply_in_the_wrong_shape_is_a_refused_request_not_a_crash(odd_critic, mode, api, refusal, caplog):
    ask = HttpCompletion(f"{odd_critic}/{mode}", api, None, None, timeout=5, retries=2, concurrency=2,
                         max_new_tokens=8)
    with pytest.raises(CriticRefused) as err:  # a UserError: one line for the user, and the prompts done so far kept
        ask([REQUEST, REQUEST])
    assert refusal in str(err.value) and f"critic.api={api!r}" in str(err.value)
    assert f"is critic.api={api!r} the endpoint's API?" in caplog.text
    assert "(3 tries)" not in caplog.text  # the same request would get the same reply: not retried


def test_critic_replies_that_are_text_parts_or_cut_short(odd_critic, caplog):
    assert HttpCompletion(f"{odd_critic}/parts", "openai", None, None, 5, 0, 1, 8)([REQUEST]) == ["looks fine"]
    assert HttpCompletion(f"{odd_critic}/anthropic-text", "anthropic", None, None, 5, 0, 1, 8)([REQUEST]) == ["ok"]
    with pytest.raises(CriticUnreachable, match="IncompleteRead"):  # a connection cut mid-reply: retried, then given up
        HttpCompletion(f"{odd_critic}/cut-short", "openai", None, None, 5, 1, 1, 8)([REQUEST])
    assert "(2 tries)" in caplog.text


def test_ctrl_c_ends_the_critic_requests_in_flight_at_their_next_retry(odd_critic, caplog):
    ask = HttpCompletion(f"{odd_critic}/busy", "openai", None, None, timeout=5, retries=6, concurrency=2,
                         max_new_tokens=8)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt, as in shells
    try:
        threading.Timer(0.3, signal.pthread_kill, (threading.get_ident(), signal.SIGINT)).start()  # Ctrl-C, 0.3 s in
        with caplog.at_level(logging.WARNING, logger="vlm"), pytest.raises(KeyboardInterrupt):
            ask([REQUEST] * 4)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 3  # retrying on, the two in flight would try until 0.5 + 1 + ... + 16 = 31.5 s
    while caplog.text.count("failed: HTTP 503") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    tries = [int(t) for t in re.findall(r"\((\d+) tries\)", caplog.text)]
    assert len(tries) == 2 and max(tries) <= 2, caplog.text  # the two queued requests were never sent


def test_images_go_to_the_critic_with_their_own_media_type():
    from io import BytesIO

    from PIL import Image

    jpeg = BytesIO()
    Image.new("RGB", (8, 8), "red").save(jpeg, "JPEG")
    for api in ("openai", "anthropic"):
        body = HttpCompletion("http://127.0.0.1:9", api, None, None, 5, 0, 1, 8)._body(
            [{"role": "user", "content": "<image>\n<image>\nWhich is red?"}], [jpeg.getvalue(), solid((0, 0, 255))])
        parts = json.dumps(body["messages"][0]["content"])
        assert parts.index("image/jpeg") < parts.index("image/png"), parts


def test_best_of_n_counts_replies_without_a_score(tiny_sft_export, tiny_chat_model, small_synthetic, tmp_path,
                                                   caplog):
    config = _config(tiny_sft_export, small_synthetic, tmp_path, "critic=synthetic", "mode=best_of_n",
                     "num_samples=2", "max_train_prompts=3")
    from vlm.data.sources import resolve

    items = list(itertools.islice(read_prompts(resolve(config.data, "conversations").train, "data.train"), 3))
    critic = ChatCritic(lambda requests: ["7" if i % 2 else "I cannot rate that" for i in range(len(requests))], [])
    make = PairMaker(config, tiny_chat_model, critic, load_constitution("synthetic"))
    counts = Counts()
    make._best_of_n(items, ["red", "blue", "green"] * 2, [make._principle(item) for item in items], counts)
    assert counts.dropped_unscored == 3 and counts.dropped_failed == 0
    assert "the critic's reply held no score, or several, for 3 of 6 answers (e.g. 'I cannot rate that')" in caplog.text
    assert why_no_pairs(counts, "best_of_n").startswith("the critic's replies held no score")


@pytest.mark.parametrize("reply,score", [("8", 8.0), ("Score: 7.5", 7.5), ("Rating: 9/10", 9.0),
                                         ("I would rate it 2 out of 10", 2.0), ("Score (1-10): 9", 9.0),
                                         ("On a scale of 1 to 10: 3", 3.0), ("Out of 10: 3", 3.0),
                                         ("Score (0-10): 7", 7.0), ("Score: 8\n\n1. The answer is right.", 8.0),
                                         ("9, or maybe 3", None), ("100", None), ("no idea", None),
                                         # two scores, one of them a scale's top or a second thought: none, not 10
                                         ("Score: 4. A perfect answer would earn 10/10.", None),
                                         ("Score: 3\nIt misses the colour; a right answer would be 9/10.", None),
                                         ("Score: 9. On reflection, Score: 2.", None), ("Rating: 15", None),
                                         ("Score: -3", None), ("Score: 6/10", 6.0)])
def test_a_critics_score_is_read_past_the_scale_it_names(reply, score):
    """The scale's own numbers (1-10, out of 10) are no score; a reply with two different scores has none."""
    critic = ChatCritic(lambda requests: [reply] * len(requests), [])
    item = Item("k", [{"role": "user", "content": "What color is it?"}], [], None)
    (read,) = critic.score([item], ["red"], [Principle("p", "Is it right?", "Fix it.")])
    assert read == score if score is not None else math.isnan(read)


@pytest.mark.parametrize("url", ["localhost:1234", "ftp://example.com", "http://"])
def test_a_critic_url_that_is_not_http_is_refused_before_the_model_loads(tmp_path, url):
    config = load_config(ConstitutionConfig, compose_config("constitution", [
        "checkpoint=/nonexistent/export", "critic=http", f"critic.url={url}", "critic.api=openai",
        f"out={tmp_path / 'pairs'}"]))
    with pytest.raises(ConfigError, match=r"critic.url=.* is not an http:// or https:// URL"):
        run(config)
    assert not (tmp_path / "pairs").exists()


def test_generate_batch_samples_each_prompt_at_its_own_auto_temperature(tiny_chat_model):
    code, poem = ([{"role": "user", "content": text}] for text in ("Fix this python function", "Write a poem"))
    prompts = [tiny_chat_model.prepare(messages, []) for messages in (poem, code, poem)]
    answers = tiny_chat_model.generate_batch(prompts, temperature="auto", max_new_tokens=6, seed=3)
    # a batch per temperature, each seeded as a batch of its own would be
    poems = tiny_chat_model.generate_batch([prompts[0], prompts[2]], temperature=0.8, max_new_tokens=6, seed=3)
    fixes = tiny_chat_model.generate_batch([prompts[1]], temperature=0.2, max_new_tokens=6, seed=3)
    assert answers == [poems[0], fixes[0], poems[1]]


@pytest.mark.parametrize("mode,drops,advice", [
    ("revise", {"dropped_unchanged": 5, "dropped_empty": 1}, "the critic left the answers as they were (the model "
     "answers them right, or the critic agrees with it); use more prompts (max_train_prompts), mode=best_of_n, or a "
     "stronger critic"),
    ("best_of_n", {"dropped_tie": 4, "dropped_unscored": 2}, "the critic gave every answer of a prompt the same score; "
     "raise num_samples or temperature")])
@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
def test_a_run_that_kept_no_pair_says_what_dropped_most_and_what_to_change(tmp_path, caplog, mode, drops, advice):
    from vlm.constitution import say_what_next
    from vlm.constitution.pairs import Counts

    counts = Counts(prompts=6, **drops)
    done = {"train": str(tmp_path / "train" / "shard-{000000..000000}.tar"), "val": None, "qa_val": None,
            "train_pairs": 0, "checkpoint": str(tmp_path / "export")}
    with caplog.at_level(logging.INFO, logger="vlm.constitution"):
        say_what_next(done, {"train": vars(counts)}, tmp_path, mode)
    assert f"no preference pair was kept from the 6 train prompts: {advice}" in caplog.text
    assert "stage=dpo has nothing to learn from here" in caplog.text and "train on them with" not in caplog.text
