"""Answer accuracy on any held-out conversations: the normalisers, the scores a known answer gets, multi-turn
records, and `vlm.eval` on a user's own LLaVA-format data (no `type` field), end to end."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import webdataset as wds
from images import solid
from tiny import make_task, tiny_config

from data_scripts import llava_to_shards
from vlm.config import ConfigError
from vlm.data import synthetic
from vlm.data.captions import image_fields
from vlm.data.conversations import ConversationDecoder
from vlm.data.processor import SampleError
from vlm.eval import as_trained, evaluate, results_folder, show_confusions, show_worst, write_results
from vlm.exports.format import ExportError
from vlm.exports.vlm import export_vlm, load_vlm
from vlm.metrics import answer_metrics, normalize_exact, normalize_vqa, score_answer
from vlm.models.factory import new_vlm
from vlm.models.vlm import VisionLanguageModel
from vlm.train import run
from vlm.training.trainer import NothingToScore
from vlm.training.vlm_task import VLMTask


@pytest.mark.parametrize("text,exact,vqa", [
    ("Red.", "red", "red"),
    ("  The   RED circle!  ", "the red circle", "red circle"),
    ("Two red circles.", "two red circles", "2 red circles"),
    ("an apple", "an apple", "apple"),
    ("1,000.5 kg", "1,000.5 kg", "1000.5 kg"),
    ("It's 3.5 m.", "it's 3.5 m", "its 3.5 m"),
    ("zero; none", "zero; none", "0 0"),
    ("yes/no (maybe)", "yes/no (maybe)", "yes no maybe"),
])
def test_normalisers(text, exact, vqa):
    assert normalize_exact(text) == exact
    assert normalize_vqa(text) == vqa


def test_scores_of_one_answer():
    assert score_answer("Red.", "red") == {"exact_match": 1.0, "normalized_match": 1.0, "contains": 1.0}
    assert score_answer("2", "two") == {"exact_match": 0.0, "normalized_match": 1.0, "contains": 1.0}
    assert score_answer("It is a red circle.", "red") == {"exact_match": 0.0, "normalized_match": 0.0,
                                                          "contains": 1.0}
    assert score_answer("reddish", "red")["contains"] == 0.0  # whole words only, at either end
    assert score_answer("infrared light", "red")["contains"] == 0.0
    assert score_answer("It is a blue.", "a blue")["contains"] == 1.0  # a phrase, its article dropped as in the answer
    # a choice letter is no article to drop: an empty answer or "The." does not match "A", and "A" is contained
    assert score_answer("", "A") == {"exact_match": 0.0, "normalized_match": 0.0, "contains": 0.0}
    assert score_answer("The.", "a")["normalized_match"] == 0.0
    assert score_answer("The answer is A.", "A") == {"exact_match": 0.0, "normalized_match": 0.0, "contains": 1.0}
    metrics = answer_metrics([("color", score_answer("red", "red")), ("shape", score_answer("star", "circle")),
                              (None, score_answer("x", "x"))])
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert (metrics["exact_match/color"], metrics["exact_match/shape"]) == (1.0, 0.0)


def _record(*turns: tuple[str, str, str | None], kind: str | None = None) -> dict:
    conversations = []
    for question, answer, turn_type in turns:
        conversations.append({"from": "human", "value": question})
        conversations.append({"from": "gpt", "value": answer, **({"type": turn_type} if turn_type else {})})
    return {"conversations": conversations, **({"type": kind} if kind else {})}


def test_every_turn_is_scored_given_the_true_history():
    config = tiny_config(stage="sft")
    processor = new_vlm(config.model, config.tiler).processor
    sample = {"__key__": "k", "__url__": "u", "0.png": solid(),
              "json": json.dumps(_record(("<image>\nColour?", "red", "color"), ("Shape?", "circle", None),
                                         kind="shape"))}
    every = ConversationDecoder(processor, evaluate=True, turns="all")(sample)["scored"]
    last = ConversationDecoder(processor, evaluate=True, turns="last")(sample)["scored"]
    # a turn's own type groups it; a turn without one takes the record's
    assert [(t.reference, t.group, t.question) for t in every] == [("red", "color", "<image>\nColour?"),
                                                                   ("circle", "shape", "Shape?")]
    assert [t.reference for t in last] == ["circle"]
    # the second turn's prompt holds the true first answer, then asks the second question
    prompt = processor.tokenizer.decode(every[1].prompt.input_ids)
    assert "red" in prompt and prompt.rstrip().endswith("assistant") and every[1].images == ["0.png"]


def test_held_out_turns_that_fit_the_context_are_scored_when_a_later_one_does_not(caplog):
    """A held-out conversation whose later turns outgrow the context keeps its earlier turns scored, and says which
    were left out; one with no turn to score that fits is skipped whole, as before."""
    config = tiny_config(stage="sft")
    processor = new_vlm(config.model, config.tiler).processor
    long_answer = " ".join(["circle"] * 40)
    record = _record(("<image>\nColour?", "red", "color"), ("Shape?", long_answer, "shape"),
                     ("Count?", "one", "count"))
    sample = {"__key__": "k", "__url__": "u", "0.png": solid(), "json": json.dumps(record)}
    decoder = ConversationDecoder(processor, evaluate=True, turns="all")
    assert [t.reference for t in decoder(sample)["scored"]] == ["red", long_answer, "one"]
    second = len(processor.prompt([{"role": "user", "content": "<image>\nColour?"},
                                   {"role": "assistant", "content": "red"}, {"role": "user", "content": "Shape?"}],
                                  [solid()]).input_ids)
    processor.max_length = second + 8  # the first two prompts fit; the third, after the long answer, does not
    with caplog.at_level(logging.WARNING, logger="vlm.data.conversations"):
        assert [t.reference for t in decoder(sample)["scored"]] == ["red", long_answer]
    assert "u:k: assistant turn 2's prompt is" in caplog.text and "it and the 0 after it are not scored, the 2 " \
        "before it are" in caplog.text
    last = ConversationDecoder(processor, evaluate=True, turns="last")
    with pytest.raises(SampleError, match=f"more than the model's context of {second + 8}"):
        last(sample)  # its one turn to score does not fit: skipped whole


def _write_conversations(directory: Path, records: list[dict]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(directory / "shard-000000.tar")) as sink:
        for i, record in enumerate(records):
            sample = {"__key__": f"{i:04d}", "json": json.dumps(record)}
            for k in range(sum(t["value"].count("<image>") for t in record.get("conversations", []))):
                sample[f"{k}.png"] = solid((40 * i % 255, 30, 30), (32, 32))
            sink.write(sample)
    return str(directory / "shard-000000.tar")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config(stage="sft")
    torch.manual_seed(0)
    return export_vlm(tmp_path_factory.mktemp("export") / "export", new_vlm(config.model, config.tiler), "sft",
                      config.tiler)


def test_a_model_with_one_answer_scores_the_fraction_of_references_equal_to_it(tiny_export, tmp_path, monkeypatch):
    """Generation patched at its boundary to always say "blue": what is under test is the scoring of answers."""
    answers = ["blue", "Blue.", "red", "a blue", "two", "blue"]
    records = [_record(("<image>\nWhich colour?", answer, None), kind="odd" if i % 2 else "even")
               for i, answer in enumerate(answers)]
    val = _write_conversations(tmp_path / "val", records)
    tokenizer = load_vlm(tiny_export).tokenizer
    blue = torch.tensor(tokenizer.encode("blue", add_special_tokens=False) + [tokenizer.eos_token_id])
    monkeypatch.setattr(VisionLanguageModel, "generate", lambda self, input_ids, *_, **__: blue.expand(len(input_ids),
                                                                                                      -1))
    config = tiny_config(f"checkpoint={tiny_export}", f"data.val={val}", "data.train=null", "data.num_workers=0",
                         "eval.max_samples=null", stage="sft", tiny=False)
    metrics, predictions = evaluate(config)
    assert metrics["exact_match"] == 3 / 6  # "blue", "Blue.", "blue"
    assert metrics["normalized_match"] == 4 / 6  # and "a blue"
    assert metrics["contains"] == 4 / 6
    assert (metrics["exact_match/even"], metrics["exact_match/odd"]) == (1 / 3, 2 / 3)  # even: blue; odd: Blue., blue
    assert len(predictions) == 6 and {p["prediction"] for p in predictions} == {"blue"}
    write_results(metrics, predictions, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert sum(r["scores"]["exact_match"] for r in rows) / len(rows) == pytest.approx(metrics["exact_match"])


def test_eval_max_samples_bounds_the_held_out_loss_as_it_bounds_the_answers(tiny_export, tmp_path):
    """3 samples asked for, in batches of 4: the loss of exactly those 3, as one batch of 3 gives it, not of 4."""
    records = [_record(("<image>\nWhich colour?", answer, None)) for answer in ("blue", "a red one", "green", "pink")]
    val = _write_conversations(tmp_path / "val", records)

    def loss(limit: int, batch: int) -> float:
        config = tiny_config(f"checkpoint={tiny_export}", f"data.val={val}", "data.train=null", "data.num_workers=0",
                             f"eval.max_samples={limit}", f"eval.batch_size={batch}", "eval.max_new_tokens=2",
                             stage="sft", tiny=False)
        return evaluate(config)[0]["loss"]

    assert loss(3, 4) == pytest.approx(loss(3, 3), abs=1e-5)
    assert loss(3, 4) != pytest.approx(loss(4, 4), abs=1e-3)


def test_the_metrics_name_the_data_and_export_scored_by_absolute_paths(tiny_export, tmp_path, monkeypatch):
    """Paths given relative to the folder the command ran in still say what was scored once the file is moved."""
    val = _write_conversations(tmp_path / "val", [_record(("<image>\nWhich colour?", "blue", None))])
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(val, tmp_path)
    config = tiny_config(f"checkpoint={tiny_export}", f"data.val={relative}", "data.train=null", "data.num_workers=0",
                         "eval.max_new_tokens=2", stage="sft", tiny=False)
    metrics = evaluate(config)[0]
    assert metrics["data"] == str(tmp_path / relative) and metrics["checkpoint"] == str(Path(tiny_export).resolve())


def test_an_export_evaluated_as_the_other_phase_names_the_stage_to_pass(tiny_export):
    with pytest.raises(ConfigError, match=rf"checkpoint='{tiny_export}' holds a 'sft' model, which "
                                          rf"stage=contrastive cannot evaluate; pass stage=sft"):
        evaluate(tiny_config(f"checkpoint={tiny_export}", stage="contrastive"))


def test_trainer_settings_this_machine_cannot_run_are_named_as_training_names_them(tiny_export):
    config = tiny_config(f"checkpoint={tiny_export}", "trainer.accelerator=gpu", stage="sft")
    with pytest.raises(ConfigError, match=r"^trainer settings \(accelerator=gpu, devices=.*\): .*gpu"):
        evaluate(config)


def test_an_evaluation_stopped_by_ctrl_c_exits_130_and_says_so(tiny_export, tmp_path, monkeypatch, caplog):
    """Lightning ends a Ctrl-C with exit code 1, which would read as a failed evaluation."""
    def interrupted(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(VLMTask, "validation_step", interrupted)
    val = _write_conversations(tmp_path / "val", [_record(("<image>\nWhich colour?", "blue", None))])
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stop:
            evaluate(tiny_config(f"checkpoint={tiny_export}", f"data.val={val}", "data.num_workers=0", stage="sft"))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-Cs while it shuts down
    assert stop.value.code == 130
    assert "stopped by Ctrl-C before the evaluation finished; nothing was written" in caplog.text


def test_a_results_folder_that_cannot_be_made_fails_before_the_evaluation(tiny_export, tmp_path):
    (tmp_path / "red.png").write_bytes(b"an image, not a folder")
    config = tiny_config(f"checkpoint={tiny_export}", f"eval.output_dir={tmp_path / 'red.png'}", stage="sft")
    with pytest.raises(ConfigError, match=r"eval.output_dir='.*red.png' cannot be a folder for the results"):
        results_folder(config)
    assert results_folder(tiny_config(f"checkpoint={tiny_export}", stage="sft")) == tiny_export.parent / "eval"
    missing = tmp_path / "gone" / "export"
    with pytest.raises(ExportError, match="does not exist"):
        results_folder(tiny_config(f"checkpoint={missing}", stage="sft"))
    assert not (tmp_path / "gone").exists()  # no eval folder beside an export that is not there


def test_held_out_data_without_answers_or_samples_is_an_error(tiny_export, tmp_path, caplog):
    no_answers = _write_conversations(tmp_path / "noanswer", [{"conversations": [{"from": "human", "value": "hi"}]}])
    config = tiny_config(f"checkpoint={tiny_export}", f"data.val={no_answers}", "data.num_workers=0", stage="sft",
                         tiny=False)
    with pytest.raises(NothingToScore, match=re.escape(f"no held-out sample of data.val={no_answers!r} could be "
                                                       f"scored")):
        evaluate(config)
    # the warning names the sample and its shard, once
    assert f"skipping sample 0000 in {no_answers}: no assistant turn" in caplog.text
    empty = tmp_path / "empty" / "shard-000000.tar"
    empty.parent.mkdir()
    with wds.TarWriter(str(empty)):
        pass
    config = tiny_config(f"checkpoint={tiny_export}", f"data.val={empty}", "data.num_workers=0", stage="sft",
                         tiny=False)
    with pytest.raises(NothingToScore, match=re.escape(f"no held-out sample of data.val={str(empty)!r} could be "
                                                       f"scored: the shards hold none")):
        evaluate(config)
    # training on with such held-out data: the model is exported, and the missing figures are said, not left silent
    train = _write_conversations(tmp_path / "train", [{"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}] * 4)
    metrics = run(tiny_config(f"data.train={train}", f"data.val={no_answers}", "data.num_workers=0",
                              f"output_root={tmp_path / 'runs'}", f"init_from={tiny_export}", "stage.max_steps=1",
                              "stage.batch_size=2", stage="sft", tiny=False))
    assert "exact_match" not in metrics and Path(metrics["export"]).is_dir()
    assert f"no held-out sample of data.val={no_answers!r} could be scored" in caplog.text
    assert "metrics.json holds counts only" in caplog.text


@pytest.mark.slow
def test_a_llava_json_round_trip_trains_and_reports_answer_accuracy(tmp_path, capsys):
    """A user's LLaVA JSON (no `type` field) -> llava_to_shards.py -> a few sft steps -> vlm.eval: the answers are
    scored, and predictions.jsonl agrees with the metrics."""
    images = tmp_path / "images"
    images.mkdir()
    rng = random.Random(0)
    records = []
    for i in range(48):
        spec = synthetic.random_spec(rng)
        synthetic.render(spec, rng, 64).save(images / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": spec.color}]})
    (tmp_path / "llava.json").write_text(json.dumps(records))
    code = llava_to_shards.main(["--json", str(tmp_path / "llava.json"), "--images", str(images), "--out",
                                 str(tmp_path / "shards"), "--val-fraction", "0.25", "--samples-per-shard", "8"])
    assert code == 0
    train = str(tmp_path / "shards" / "train" / "shard-{000000..000004}.tar")
    val = str(tmp_path / "shards" / "val" / "shard-{000000..000001}.tar")
    common = [f"data.train='{train}'", f"data.val='{val}'", "data.num_workers=0", f"output_root={tmp_path / 'runs'}",
              "init_from=null", "stage.batch_size=8", "stage.max_steps=4", "trainer.val_check_interval=1000"]
    metrics = run(tiny_config(*common, stage="sft"))
    assert {"exact_match", "normalized_match", "contains", "answers_scored"} <= metrics.keys()
    assert metrics["answers_scored"] == 12
    # `vlm.eval stage=sft checkpoint=EXPORT`, no data.val: the held-out shards the run validated on, not the
    # synthetic set
    config = tiny_config(*common[2:], f"checkpoint={metrics['export']}", "eval.max_samples=null", stage="sft")
    as_trained(config, given={"stage", "checkpoint"})
    assert config.data.val == val
    evaluated, predictions = evaluate(config)
    assert evaluated["exact_match"] == pytest.approx(metrics["exact_match"], abs=1e-4)
    write_results(evaluated, predictions, tmp_path / "eval")
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["group"] is None and r["images"] == ["0.png"] for r in rows)
    for name in ("exact_match", "normalized_match", "contains"):
        assert sum(r["scores"][name] for r in rows) / 12 == pytest.approx(evaluated[name], abs=1e-4)


class _ValidationReads(pl.Callback):
    """(held-out samples read, answers scored) at the end of each validation."""

    def __init__(self):
        self.reads: list[tuple[int, int]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.reads.append((pl_module.within_limit.rows_read, len(pl_module.predictions)))


@pytest.mark.slow  # trains the default-sized model
def test_validations_during_training_read_eval_max_samples_and_the_final_one_reads_all(tmp_path):
    records = [_record(("<image>\nWhich colour?", colour, None)) for colour in ["red", "blue", "green"] * 2]
    shards = _write_conversations(tmp_path / "data", records)
    watch = _ValidationReads()
    run(tiny_config(f"data.train={shards}", f"data.val={shards}", "data.num_workers=0", f"output_root={tmp_path}",
                    "init_from=null", "stage.batch_size=3", "stage.max_steps=2", "trainer.val_check_interval=1",
                    "eval.max_samples=2", "eval.batch_size=2", stage="sft", tiny=False), callbacks=[watch])
    assert watch.reads == [(2, 2), (2, 2), (6, 6)]
    watch.reads.clear()
    run(tiny_config(f"data.train={shards}", f"data.val={shards}", "data.num_workers=0", f"output_root={tmp_path}",
                    "init_from=null", "stage.batch_size=3", "stage.max_steps=1", "trainer.val_check_interval=1",
                    "eval.max_samples=null", "eval.batch_size=2", stage="sft", tiny=False), callbacks=[watch])
    assert watch.reads == [(6, 6), (6, 6)]
    watch.reads.clear()  # a limit that ends inside a batch: that batch is read whole, and answered up to the limit
    run(tiny_config(f"data.train={shards}", f"data.val={shards}", "data.num_workers=0", f"output_root={tmp_path}",
                    "init_from=null", "stage.batch_size=3", "stage.max_steps=1", "trainer.val_check_interval=1",
                    "eval.max_samples=3", "eval.batch_size=2", stage="sft", tiny=False), callbacks=[watch])
    assert watch.reads == [(4, 3), (6, 6)]


def test_the_worst_answers_shown_are_wrong_ones_only(capsys):
    def row(key: str, reference: str, prediction: str) -> dict:
        return {"key": key, "question": "What color?", "reference": reference, "prediction": prediction,
                "scores": score_answer(prediction, reference)}

    show_worst([row("a", "pink", "pink"), row("b", "pink", "blue"), row("c", "red", "red")])
    shown = capsys.readouterr().err
    assert "the wrong answer:" in shown and "- b:" in shown and "- a:" not in shown
    # "a red one" for "red" is wrong but contains the answer: the wholly wrong "pink" is the worse one
    show_worst([row("a", "red", "a red one"), row("b", "pink", "pink"), row("c", "red", "pink")], count=1)
    shown = capsys.readouterr().err
    assert "the 1 worst-scored of 2 wrong answers:" in shown and "- c:" in shown and "- a:" not in shown
    show_worst([row("a", "pink", "pink")])
    assert capsys.readouterr().err == "the answer is an exact match\n"
    show_worst([row("a", "pink", "pink"), row("c", "red", "red")])
    assert capsys.readouterr().err == "all 2 answers are exact matches\n"


def test_an_evaluation_with_no_rows_leaves_no_earlier_rows_behind(tmp_path):
    """An evaluation that scores no answers writes its metrics alone, and removes the rows an earlier evaluation
    wrote to the same folder, which are not this model's."""
    write_results({"exact_match": 1.0}, [{"key": "s0", "prediction": "red"}], tmp_path)
    write_results({"rewards/accuracy": 0.5}, [], tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"rewards/accuracy": 0.5}
    assert not (tmp_path / "predictions.jsonl").exists()


def test_the_most_frequent_zero_shot_confusions_are_shown(capsys):
    def row(label: str, prediction: str) -> dict:
        return {"key": "k", "caption": "c", "caption_rank": 0, "label": label, "prediction": prediction,
                "top": [prediction], "correct": label == prediction}

    show_confusions([row("red star", "red cross")] * 2 + [row("blue star", "red star"), row("red star", "red star")])
    assert capsys.readouterr().err == ("the most frequent of 3 zero-shot mistakes (label -> predicted class):\n"
                                       "- 'red star' -> 'red cross': 2\n- 'blue star' -> 'red star': 1\n")
    show_confusions([row("red star", "red star")])
    assert capsys.readouterr().err == "all 1 zero-shot predictions are right\n"


def test_vlm_eval_takes_the_stage_from_the_export_unless_given(tiny_sft_export, tmp_path):
    from vlm.eval import with_the_exports_stage

    plain = [f"checkpoint={tiny_sft_export}"]
    assert with_the_exports_stage(plain) == [*plain, "stage=sft"]
    assert with_the_exports_stage([*plain, "stage=dpo"]) == [*plain, "stage=dpo"]  # what the user gives stands
    missing = [f"checkpoint={tmp_path / 'none'}"]
    assert with_the_exports_stage(missing) == missing  # the evaluation names the missing folder itself


@pytest.mark.parametrize("given, max_tiles", [({"checkpoint"}, 4), ({"checkpoint", "tiler"}, 1),
                                              ({"checkpoint", "tiler.max_tiles"}, 1)])
def test_vlm_eval_reads_images_at_the_tier_the_export_trained_with_unless_told(tiny_sft_export, tmp_path, given,
                                                                               max_tiles):
    """A model trained with tiler=mid scored with one tile per image would get figures its run never saw."""
    import shutil

    from vlm.training.stages import get_stage

    export = tmp_path / "export"
    shutil.copytree(tiny_sft_export, export)
    meta = json.loads((export / "config.json").read_text())
    meta["tiler"]["max_tiles"] = 4
    (export / "config.json").write_text(json.dumps(meta))
    config = tiny_config(f"checkpoint={export}", stage="sft")
    as_trained(config, given=given)
    assert config.tiler.max_tiles == max_tiles
    task = get_stage("sft").task.from_export(config, get_stage("sft"), export, None)
    assert task.bundle.processor.tiler.config.max_tiles == max_tiles  # what the held-out images go through


@pytest.mark.parametrize("given", [{"checkpoint"}, {"checkpoint", "eval.turns", "eval.max_new_tokens",
                                                     "trainer.precision"}])
def test_vlm_eval_scores_answers_as_the_run_did_unless_told(tiny_sft_export, tmp_path, given):
    """A run that scored each sample's last turn, answers cut at 4 tokens, in float32, has figures vlm.eval must
    reproduce."""
    import shutil

    run = tiny_config("eval.turns=last", "eval.max_new_tokens=4", "trainer.precision=32-true", stage="sft")
    recorded = make_task(run).export_settings()
    assert recorded["eval"] == {"turns": "last", "max_new_tokens": 4}  # what a run writes into its export
    assert recorded["trainer"] == {"precision": "32-true"}
    export = tmp_path / "export"
    shutil.copytree(tiny_sft_export, export)
    meta = json.loads((export / "config.json").read_text())
    meta["train_config"] = recorded
    (export / "config.json").write_text(json.dumps(meta))
    config = tiny_config(f"checkpoint={export}", stage="sft")
    defaults = (config.eval.turns, config.eval.max_new_tokens, config.trainer.precision)
    as_trained(config, given=given)
    told = "eval.turns" in given
    assert defaults != ("last", 4, "32-true")
    assert (config.eval.turns, config.eval.max_new_tokens, config.trainer.precision) == (
        defaults if told else ("last", 4, "32-true"))


def test_vlm_eval_scores_a_gpu_runs_fp16_export_in_its_own_precision_on_a_cpu(tiny_sft_export, tmp_path):
    """fp16 runs on GPUs only: on a CPU the evaluation keeps its own precision rather than fail."""
    import shutil

    export = tmp_path / "export"
    shutil.copytree(tiny_sft_export, export)
    meta = json.loads((export / "config.json").read_text())
    meta["train_config"] = {"trainer": {"precision": "16-mixed"}}
    (export / "config.json").write_text(json.dumps(meta))
    config = tiny_config(f"checkpoint={export}", "trainer.accelerator=cpu", stage="sft")
    as_trained(config, given={"checkpoint"})
    assert config.trainer.precision == "auto"


def test_answers_stop_at_the_llms_own_end_of_turn_ids_as_in_chat(tiny_sft_export, tmp_path):
    """An LLM whose generation config names end-of-turn ids beyond the tokenizer's EOS (Gemma's `<end_of_turn>`):
    held-out answers, chat and the Hugging Face export all stop at them, and so does the model loaded again from its
    export folder."""
    from vlm.chat import ChatModel
    from vlm.data.processor import pad_batch
    from vlm.exports.hf import generation_settings
    from vlm.training.stages import get_stage

    stage = get_stage("sft")
    task = stage.task.from_export(tiny_config(stage="sft", tiny=False), stage, tiny_sft_export, None)
    tokenizer = task.bundle.tokenizer
    prompt = pad_batch([task.bundle.processor.prompt([{"role": "user", "content": "<image>\nWhat color?"}],
                                                     [solid((200, 30, 30), (64, 64))])], tokenizer.pad_token_id,
                       left=True)
    free = task.model.generate(prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"],
                               prompt["image_slots"], max_new_tokens=4, do_sample=False,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0].tolist()
    first = free[0]
    assert len(free) == 4 and first != tokenizer.eos_token_id  # the random model says more than one token
    task.model.lm.generation_config.eos_token_id = [first]  # its first word now ends a turn
    assert task.answer(prompt, max_new_tokens=4) == [tokenizer.decode([first], skip_special_tokens=True)]
    assert generation_settings(task.bundle)["eos_token_id"] == sorted({first, tokenizer.eos_token_id})
    chat = ChatModel(task.model, tokenizer, task.bundle.processor, torch.device("cpu"))
    conversation, image = [{"role": "user", "content": "<image>\nWhat color?"}], [solid((200, 30, 30), (64, 64))]
    answer = chat.generate(conversation, image, max_new_tokens=4, temperature=0)
    assert answer.token_ids == [first]
    # a batch of prompts (vlm.constitution's answers) decodes each row as chat decodes its answer
    assert chat.generate_batch([chat.prepare(conversation, image)], max_new_tokens=4, temperature=0) == \
        [answer.text.strip()] == [tokenizer.decode([first]).strip()]
    reloaded = ChatModel.load(export_vlm(tmp_path / "export", task.bundle, "sft", task.config.tiler), device="cpu")
    assert reloaded.generate(conversation, image, max_new_tokens=4, temperature=0).token_ids == [first]


def test_a_caption_sample_with_metadata_json_is_a_describe_turn_in_phase_2():
    """img2dataset writes each caption sample as image + txt + a json of its url and size: align reads the same
    shards as contrastive, so the json beside a txt is metadata, not a conversation. A json without conversations
    and without a txt is still refused by name."""
    config = tiny_config(stage="sft")
    processor = new_vlm(config.model, config.tiler).processor
    sample = {"__key__": "k", "__url__": "u", "png": solid(), "txt": b"a red square",
              "json": json.dumps({"url": "http://example.com/1.png", "caption": "a red square", "width": 64})}
    decoded = ConversationDecoder(processor)(sample)["encoded"]
    answer = processor.tokenizer.decode(decoded.input_ids[decoded.labels != -100], skip_special_tokens=True)
    assert answer.strip() == "a red square" and len(decoded.image_tokens) == 1
    del sample["txt"]
    with pytest.raises(SampleError, match="u:k: 'conversations' must be a non-empty list"):
        ConversationDecoder(processor)(sample)


def test_conversation_images_in_every_format_the_tiler_reads_are_found_in_order():
    """A shard written by hand may store its pictures as gif, bmp or tif: each is read, in `<image>` order."""
    config = tiny_config(stage="sft")
    processor = new_vlm(config.model, config.tiler).processor
    turns = [{"from": "human", "value": "<image>\n<image>\n<image>\nWhich is red?"}, {"from": "gpt", "value": "first"}]
    sample = {"__key__": "k", "__url__": "u", "json": json.dumps({"conversations": turns}),
              "0.gif": solid((255, 0, 0), fmt="GIF"), "1.bmp": solid((0, 255, 0), fmt="BMP"),
              "2.tif": solid((0, 0, 255), fmt="TIFF")}
    decoded = ConversationDecoder(processor)(sample)["encoded"]
    assert len(decoded.image_tokens) == 3
    red, green, blue = (decoded.pixel_values[i].mean(dim=(1, 2)) for i in range(3))  # normalised channel means
    assert red.argmax() == 0 and green.argmax() == 1 and blue.argmax() == 2
    # by the number before the extension, not as text: a sample's eleventh image comes after its third
    assert image_fields({"__key__": "k", "json": b"{}", "10.png": b"", "2.jpg": b"", "0.webp": b""}) == [
        "0.webp", "2.jpg", "10.png"]


def test_a_sample_encoded_several_times_decodes_its_images_once(monkeypatch):
    """A held-out sample is encoded once to train and once per scored turn, a pair once per answer: each image is
    read and tiled once for all of them."""
    from vlm.data.preferences import PreferenceDecoder

    config = tiny_config(stage="sft")
    processor = new_vlm(config.model, config.tiler).processor
    tiled = []
    tile = type(processor.tiler).__call__
    monkeypatch.setattr(type(processor.tiler), "__call__", lambda self, *a, **k: tiled.append(1) or tile(self, *a, **k))
    turns = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"},
             {"from": "human", "value": "What shape?"}, {"from": "gpt", "value": "square"},
             {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "one"}]
    sample = {"__key__": "k", "__url__": "u", "png": solid(), "json": json.dumps({"conversations": turns})}
    decoded = ConversationDecoder(processor, evaluate=True, turns="all")(sample)
    assert len(decoded["scored"]) == 3 and len(tiled) == 1
    tiled.clear()
    pair = {"__key__": "p", "__url__": "u", "png": solid(), "json": json.dumps(
        {"prompt": [{"role": "user", "content": "<image>\nWhat color?"}], "chosen": "red", "rejected": "blue"})}
    decoded = PreferenceDecoder(processor)(pair)["pair"]
    assert torch.equal(decoded.chosen.pixel_values, decoded.rejected.pixel_values) and len(tiled) == 1


@pytest.mark.parametrize("override, launcher, message", [
    ("trainer.devices=2", {}, "trainer.devices=2: vlm.eval scores an export on one device"),
    ("trainer.num_nodes=2", {}, "trainer.num_nodes=2: vlm.eval scores an export on one device"),
    (None, {"WORLD_SIZE": "2"}, "vlm.eval was started as one of several processes (WORLD_SIZE=2: torchrun or srun)"),
    (None, {"SLURM_NTASKS": "4"}, "vlm.eval was started as one of several processes (SLURM_NTASKS=4"),
])
def test_eval_on_several_devices_or_processes_is_refused(tmp_path, monkeypatch, override, launcher, message):
    """Each process would score the whole held-out set and write the same metrics.json and predictions.jsonl, and a
    devices setting was silently ignored."""
    for name, value in launcher.items():
        monkeypatch.setenv(name, value)
    config = tiny_config(f"checkpoint={tmp_path}", *([override] if override else []), stage="sft")
    with pytest.raises(ConfigError, match=re.escape(message)):
        as_trained(config, {"checkpoint", *([override.split("=")[0]] if override else [])})
