"""stage=dpo: the preference losses against the papers' formulas, the frozen reference, gradients on answer tokens
only, one vision forward per pair, truncation, bad shards, and a short end-to-end run."""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from preference_data import finished_pairs, png, write_pairs
from tiny import sft_export, tiny_config

from vlm.config import ConfigError
from vlm.data.processor import IGNORE_INDEX, pad_batch
from vlm.data.shards import build_pipeline
from vlm.data.sources import DataSources
from vlm.exports.vlm import load_vlm
from vlm.models.losses import answer_logprobs, preference_loss, reward_metrics
from vlm.training.stages import get_stage
from vlm.training.strategy import resolve_precision

LOGPS = {"pc": [-3.0, -10.0, -2.5], "pr": [-5.0, -4.0, -9.0], "rc": [-4.0, -9.0, -3.0], "rr": [-4.5, -6.0, -8.0]}
TOKENS = {"c": [2, 5, 1], "r": [3, 2, 4]}


def _paper(kind: str, beta: float, sft_weight: float) -> float:
    """DPO (Rafailov et al. 2023, eq. 7) / IPO (Azar et al. 2023, eq. 17 with per-token log-probs), written out."""
    total = 0.0
    for i in range(3):
        pc, pr, rc, rr = (LOGPS[k][i] for k in ("pc", "pr", "rc", "rr"))
        nc, nr = TOKENS["c"][i], TOKENS["r"][i]
        if kind == "sigmoid":
            total += -math.log(1 / (1 + math.exp(-beta * ((pc - rc) - (pr - rr)))))
        else:
            total += ((pc / nc - rc / nc) - (pr / nr - rr / nr) - 1 / (2 * beta)) ** 2
    nll = -sum(LOGPS["pc"][i] / TOKENS["c"][i] for i in range(3)) / 3
    return total / 3 + sft_weight * nll


@pytest.mark.parametrize("kind,beta,sft_weight", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.3), ("ipo", 0.1, 0.0),
                                                  ("ipo", 1.0, 2.0)])
def test_preference_loss_matches_the_papers(kind, beta, sft_weight):
    t = {k: torch.tensor(v) for k, v in LOGPS.items()}
    out = preference_loss(t["pc"], t["pr"], t["rc"], t["rr"], torch.tensor(TOKENS["c"]), torch.tensor(TOKENS["r"]),
                          beta, kind, sft_weight)
    assert out.loss.item() == pytest.approx(_paper(kind, beta, sft_weight), rel=1e-5)
    if kind == "sigmoid":
        expected = [beta * (policy - reference) for policy, reference in zip(LOGPS["pc"], LOGPS["rc"], strict=True)]
        assert out.chosen_rewards.tolist() == pytest.approx(expected)


@pytest.mark.parametrize("chosen,rejected,accuracy", [
    ([0.5, -0.2, 0.1, 0.3], [0.1, 0.4, 0.1, -0.5], 0.5),  # won, lost, tied, won
    ([0.2, 0.2], [0.2, 0.2], 0.0),  # ties only: no pair's chosen answer gets the higher reward
    ([-1.0, 0.0, 2.0], [-3.0, -0.5, 1.0], 1.0)])
def test_reward_metrics_are_means_over_pairs_and_a_tie_is_no_win(chosen, rejected, accuracy):
    metrics = reward_metrics(torch.tensor(chosen), torch.tensor(rejected))
    assert metrics["rewards/accuracy"].item() == accuracy
    assert metrics["rewards/chosen"].item() == pytest.approx(sum(chosen) / len(chosen))
    assert metrics["rewards/rejected"].item() == pytest.approx(sum(rejected) / len(rejected))
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    assert metrics["rewards/margins"].item() == pytest.approx(sum(margins) / len(margins))


def test_answer_logprobs_sum_only_labelled_tokens():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 3:] = torch.tensor([1, 2])
    labels[1, 4] = 6
    logps, tokens = answer_logprobs(logits, labels)
    table = logits.log_softmax(-1)
    assert tokens.tolist() == [2, 1]
    assert logps[0].item() == pytest.approx((table[0, 2, 1] + table[0, 3, 2]).item(), rel=1e-5)
    assert logps[1].item() == pytest.approx(table[1, 3, 6].item(), rel=1e-5)


def _task(export: Path, *overrides: str):
    config = tiny_config(f"init_from={export}", *overrides, stage="dpo", tiny=False)
    stage = get_stage("dpo")
    return stage.task.create(config, stage, export, DataSources(None, None, None))


def _batch(task, shard: str) -> dict:
    samples = list(build_pipeline([shard], task.batching().decode, train=False, split_by_node=False))
    return task.batching().collate(samples)


def test_reference_stays_bit_identical_while_the_policy_moves(tiny_sft_export, tmp_path):
    task = _task(tiny_sft_export, "stage.lr=1e-2")
    batch = _batch(task, write_pairs(tmp_path / "p.tar", 4))
    before = {k: v.clone() for k, v in task.reference.model.state_dict().items()}
    policy_before = task.model.lm.get_input_embeddings().weight.clone()
    optimizer = task.configure_optimizers()["optimizer"]
    task.train()
    assert not task.reference.model.training
    for _ in range(3):
        optimizer.zero_grad()
        task.pair_loss(batch["pairs"]).loss.backward()
        optimizer.step()
    after = task.reference.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in task.reference.model.parameters())
    assert not torch.equal(policy_before, task.model.lm.get_input_embeddings().weight)


def test_gradients_reach_only_the_answer_tokens(tiny_sft_export, tmp_path):
    """The prompt (with an earlier assistant reply in it) gets no gradient from the loss; the answer does."""
    task = _task(tiny_sft_export)
    pairs = _batch(task, write_pairs(tmp_path / "p.tar", 2, history=True))["pairs"]
    model = task.model
    patches = model.vision.patch_features(pairs["pixel_values"])  # the chosen rows' tiles; the rejected rows' too
    embeds = model.embed(pairs["input_ids"], None, pairs["image_slots"], torch.cat([patches, patches]))
    logits = model.lm(inputs_embeds=embeds, attention_mask=pairs["attention_mask"]).logits
    logits.retain_grad()
    logps, tokens = answer_logprobs(logits, pairs["labels"])
    with torch.no_grad():
        reference = task.reference.pair_logps(pairs, None)
    preference_loss(logps[:2], logps[2:], reference[:2], reference[2:], tokens[:2], tokens[2:], 0.1,
                    sft_weight=1.0).loss.backward()
    predicts_answer = torch.zeros_like(pairs["labels"], dtype=torch.bool)
    predicts_answer[:, :-1] = pairs["labels"][:, 1:] != IGNORE_INDEX  # logits at t predict token t + 1
    grad = logits.grad.abs().sum(-1)  # (2B, L)
    assert grad[~predicts_answer].max().item() == 0
    assert (grad[predicts_answer] > 0).all()
    # only the last reply is learned: the earlier "blue" of the history has no label
    answer_tokens = [task.bundle.tokenizer.decode(row[row != IGNORE_INDEX]) for row in pairs["labels"]]
    assert all("blue" not in text or text.strip().startswith("blue") for text in answer_tokens)
    assert all(text.count("red") + text.count("blue") == 1 for text in answer_tokens)


def test_one_vision_forward_per_pair(tiny_sft_export, tmp_path):
    task = _task(tiny_sft_export)
    batch = _batch(task, write_pairs(tmp_path / "p.tar", 3))
    calls = {"policy": 0, "reference": 0}
    task.model.vision.vit.patch_embed.register_forward_hook(lambda *_: calls.__setitem__("policy", calls["policy"] + 1))
    task.reference.model.vision.vit.patch_embed.register_forward_hook(
        lambda *_: calls.__setitem__("reference", calls["reference"] + 1))
    task.pair_loss(batch["pairs"]).loss.backward()
    assert calls == {"policy": 1, "reference": 0}  # one call for the batch's 3 tiles: chosen, rejected and reference
    assert len(batch["pairs"]["pixel_values"]) == 3 and len(batch["pairs"]["input_ids"]) == 6


@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
def test_the_feature_cache_spares_the_vision_tower_from_the_second_epoch_on(tiny_sft_export, tmp_path):
    pairs = write_pairs(tmp_path / "p.tar", 3)
    cached = _task(tiny_sft_export, f"stage.feature_cache_dir={tmp_path / 'features'}")
    plain = _task(tiny_sft_export, "stage.cache_vision_features=false")
    calls = []
    cached.model.vision.vit.patch_embed.register_forward_hook(lambda _, inputs, __: calls.append(len(inputs[0])))
    batch = _batch(cached, pairs)
    losses = [cached.pair_loss(batch["pairs"]).loss for _ in range(2)]  # two epochs of the same pairs
    assert calls == [3, 0]  # the tower's tiles: all 3 in the first epoch, none in the second
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(losses[0], plain.pair_loss(_batch(plain, pairs)["pairs"]).loss)


@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
def test_truncation_skips_pairs_that_would_cut_an_image_and_names_them(tiny_sft_export, tmp_path, caplog):
    task = _task(tiny_sft_export)
    task.bundle.processor.max_length = 12  # the image alone is 16 tokens
    shard = write_pairs(tmp_path / "p.tar", 3)
    with caplog.at_level(logging.WARNING, logger="vlm.data.shards"):
        samples = list(build_pipeline([shard], task.batching().decode, train=False, split_by_node=False))
    assert samples == []  # all three skipped, none crashed (tests/test_shards.py: how skips are counted)
    for key in ("000000", "000001", "000002"):
        assert f"skipping sample {key} in {shard}: " in caplog.text
    assert caplog.text.count("and cutting before image 0, which does not fit whole, leaves no assistant tokens; "
                             "sample dropped") == 3
    task.bundle.processor.max_length = 40  # long answers are cut after the image: kept
    long = write_pairs(tmp_path / "long.tar", 2, answer_words=30)
    batching = task.batching()
    batch = batching.collate(list(build_pipeline([long], batching.decode, train=False, split_by_node=False)))
    assert batch["pairs"]["input_ids"].shape == (4, 40)


def test_anchors_add_their_answers_nll_to_the_pairs_loss(tiny_sft_export, tmp_path):
    """Conversation samples in the pair shards are anchors: the loss is the pairs' loss plus anchor_weight times
    the NLL of the anchors' answers, which reaches the answer tokens only."""
    task = _task(tiny_sft_export, "stage.anchor_weight=0.5")
    batch = _batch(task, write_pairs(tmp_path / "p.tar", 3, anchors=2))
    anchors = batch["anchors"]
    assert len(batch["pairs"]["keys"]) == 3 and anchors["num_samples"] == 2 and batch["scored"] == []
    answer = [task.bundle.tokenizer.decode(row[row != IGNORE_INDEX]) for row in anchors["labels"]]
    assert all(text.strip().startswith("a circle") for text in answer)
    total, pairs, anchor_nll = task.training_loss(batch)
    out = task.model(anchors["input_ids"], anchors["attention_mask"], anchors["pixel_values"],
                     image_slots=anchors["image_slots"])
    logps, tokens = answer_logprobs(out.logits, anchors["labels"])
    assert anchor_nll.item() == pytest.approx(-(logps.sum() / tokens.sum()).item(), rel=1e-4)
    assert total.item() == pytest.approx(pairs.loss.item() + 0.5 * anchor_nll.item(), rel=1e-5)
    only_anchors = {**batch, "pairs": None}
    assert task.training_loss(only_anchors)[0].item() == pytest.approx(0.5 * anchor_nll.item(), rel=1e-5)


def test_shards_without_chosen_are_skipped_with_the_reason(tiny_sft_export, tmp_path, caplog):
    task = _task(tiny_sft_export)
    shard = write_pairs(tmp_path / "bad.tar", 2, chosen=False)
    assert list(build_pipeline([shard], task.batching().decode, train=False, split_by_node=False)) == []
    assert f"skipping sample 000000 in {shard}: no 'chosen' field" in caplog.text


def _red_over_blue(export: Path, images: list[bytes]) -> float:
    """How much more log-probability the export's model gives the answer "red" than "blue" to the colour question
    about each image (mean over the images), encoded as a plain conversation, apart from any preference pair."""
    bundle = load_vlm(export)
    question = {"role": "user", "content": "<image>\nWhat color is the shape?"}
    rows = [bundle.processor.encode([question, {"role": "assistant", "content": answer}], [image])
            for image in images for answer in ("red", "blue")]
    batch = pad_batch(rows, bundle.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = bundle.model.eval()(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                     image_slots=batch["image_slots"]).logits
    logps, _ = answer_logprobs(logits, batch["labels"])
    return (logps[0::2] - logps[1::2]).mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_trains_exports_and_evaluates(tiny_sft_export, tmp_path, precompute, monkeypatch):
    from vlm.eval import as_trained, evaluate
    from vlm.train import run

    train = write_pairs(tmp_path / "train" / "shard-000000.tar", 8, anchors=4)  # anchors train alongside
    # the held-out pairs have the training pairs' keys (000000...) in another shard, with other images: a
    # precomputed reference that mixed them up would give the training pairs the held-out ones' log-probs
    val = write_pairs(tmp_path / "val" / "shard-000000.tar", 4, first_image=100)
    common = [f"data.train={train}", f"data.val={val}", "data.num_workers=0", "stage.batch_size=4",
              f"stage.precompute_reference={str(precompute).lower()}", "eval.batch_size=4"]
    monkeypatch.chdir(tiny_sft_export.parent)  # init_from relative to the launch folder: recorded absolute
    config = tiny_config(*common, f"init_from={tiny_sft_export.name}", f"output_root={tmp_path}", "stage.max_steps=4",
                         "stage.lr=1e-2", "stage.warmup_steps=0", "run_name=r", "trainer.log_every_n_steps=1",
                         "stage.beta=0.1", "stage.loss=sigmoid", stage="dpo", tiny=False)
    metrics = run(config)
    with open(tmp_path / "dpo" / "r" / "logs" / "metrics.csv") as file:
        first = next(row for row in csv.DictReader(file) if row.get("train/margin"))
    # at the first step the policy is the reference: a precomputed reference ran in the steps' precision (bf16 AMP
    # on CPUs that have it), so the margin is exactly zero, as with the copy
    assert float(first["train/margin"]) == 0.0 and first["step"] == "0"
    assert metrics["rewards/accuracy"] == 1.0  # red over blue, learned
    assert metrics["pairs_scored"] == 4 and type(metrics["pairs_scored"]) is int  # a count, written as one
    assert metrics["rewards/margins"] > 0
    export = tmp_path / "dpo" / "r" / "export"
    # the trained policy itself moved towards the chosen answer, on the held-out images
    held_out = [png(100 + i) for i in range(4)]
    moved = _red_over_blue(export, held_out) - _red_over_blue(tiny_sft_export, held_out)
    assert moved > 1.0, moved  # nats: 4 steps at lr=1e-2 move it by several
    recorded = json.loads((export / "config.json").read_text())["train_config"]
    assert recorded["reference"] == str(tiny_sft_export)
    assert recorded["trainer"]["precision"] == resolve_precision(config.trainer) != "auto"  # as it ran, for vlm.eval
    scored, _ = evaluate(tiny_config(*common, f"checkpoint={export}", stage="dpo", tiny=False))
    assert scored["rewards/accuracy"] == metrics["rewards/accuracy"]
    fewer, _ = evaluate(tiny_config(*common, f"checkpoint={export}", "eval.max_samples=2", stage="dpo", tiny=False))
    assert fewer["pairs_scored"] == 2  # eval.max_samples bounds the pairs too
    # `python -m vlm.eval stage=dpo checkpoint=EXPORT`, nothing else given: scored as the run scored itself, with its
    # beta and loss (not the stage's defaults) and on its held-out pairs (not whatever is newest under output_root)
    plain = ["data.num_workers=0", "eval.batch_size=4", f"checkpoint={export}", f"output_root={tmp_path / 'none'}"]
    as_run = tiny_config(*plain, stage="dpo", tiny=False)
    as_trained(as_run, given={"stage", "checkpoint", "output_root"})
    assert (as_run.stage.beta, as_run.stage.loss, as_run.data.val) == (0.1, "sigmoid", val)
    scored, _ = evaluate(as_run)
    assert scored["rewards/margins"] == pytest.approx(metrics["rewards/margins"], rel=1e-3)
    given = tiny_config(*plain, "stage.beta=0.5", stage="dpo", tiny=False)
    as_trained(given, given={"stage", "checkpoint", "output_root", "stage.beta"})
    assert (given.stage.beta, given.stage.loss) == (0.5, "sigmoid")  # what the user gives stands


@pytest.mark.slow
def test_a_trained_vision_tower_is_scored_against_the_references_own(tmp_path):
    """stage.train_vision=true on the tiny preset (its conv stem has BatchNorm): the policy starts equal to the
    reference, and held-out rewards agree whether the reference is a frozen copy (reading its own tower's features)
    or precomputed, in the run and in vlm.eval."""
    from vlm.eval import as_trained, evaluate
    from vlm.train import run

    export = sft_export(tmp_path / "sft")
    train = write_pairs(tmp_path / "train" / "shard-000000.tar", 8)
    val = write_pairs(tmp_path / "val" / "shard-000000.tar", 4)
    margins = {}
    for precompute, name in (("false", "copy"), ("true", "table")):
        config = tiny_config(f"data.train={train}", f"data.val={val}", "data.num_workers=0", "stage.batch_size=4",
                             "eval.batch_size=4", f"init_from={export}", f"output_root={tmp_path}", f"run_name={name}",
                             "stage.max_steps=3", "stage.lr=1e-2", "stage.warmup_steps=0", "stage.train_vision=true",
                             f"stage.precompute_reference={precompute}", "trainer.precision=32-true",
                             "trainer.log_every_n_steps=1", stage="dpo", tiny=False)
        metrics = run(config)
        with open(tmp_path / "dpo" / name / "logs" / "metrics.csv") as file:
            first = next(row for row in csv.DictReader(file) if row.get("train/margin"))
        assert float(first["train/margin"]) == 0.0  # BatchNorm on its running statistics, as in the reference
        margins[precompute] = metrics["rewards/margins"]
    trained, start = load_vlm(tmp_path / "dpo" / "copy" / "export").model, load_vlm(export).model
    assert any(not torch.equal(a, b) for a, b in zip(trained.vision.parameters(), start.vision.parameters(),
                                                     strict=True))  # the tower trained
    assert margins["false"] == pytest.approx(margins["true"], rel=1e-4, abs=1e-6)
    plain = tiny_config("data.num_workers=0", "eval.batch_size=4", "trainer.precision=32-true",
                        f"checkpoint={tmp_path / 'dpo' / 'table' / 'export'}", f"output_root={tmp_path / 'none'}",
                        stage="dpo", tiny=False)
    as_trained(plain, given={"stage", "checkpoint", "output_root"})
    assert plain.stage.train_vision is True
    scored, _ = evaluate(plain)
    assert scored["rewards/margins"] == pytest.approx(margins["true"], rel=1e-4, abs=1e-6)


def test_a_dpo_run_on_conversations_alone_is_refused_at_start_up_or_said_at_the_end(tiny_sft_export, tmp_path,
                                                                                      caplog):
    """Conversation shards (sft data) given to stage=dpo would train on anchors only: refused before the model is
    built when the shards can be read, said when the run ends when they cannot (read through a pipe)."""
    from vlm.data.preferences import refuse_conversations_only
    from vlm.train import run

    conversations_only = write_pairs(tmp_path / "train" / "shard-000000.tar", 0, anchors=4)

    def dpo(train: str) -> dict:
        return run(tiny_config(f"data.train={train}", "data.num_workers=0", "stage.batch_size=2",
                               f"init_from={tiny_sft_export}", f"output_root={tmp_path}", "stage.max_steps=2",
                               "stage.precompute_reference=true", stage="dpo", tiny=False))

    with pytest.raises(ConfigError, match=rf"^data.train='{re.escape(conversations_only)}' holds conversations and "
                                          r"no preference pair \(the first 4 samples read\): stage=dpo learns from "
                                          r"pairs"):
        dpo(conversations_only)
    assert not list((tmp_path / "dpo").iterdir())  # the run folder made for it is gone
    pairs = write_pairs(tmp_path / "pairs" / "shard-000000.tar", 2, anchors=2)  # anchors first, then the pairs
    for joined in (f"{pairs}::{conversations_only}", f"{conversations_only}::{pairs}"):
        refuse_conversations_only(joined)  # a part with pairs: not refused
    with caplog.at_level(logging.WARNING):
        dpo(f"pipe:cat {conversations_only}")
    assert "stage=dpo trained 2 batches without a single preference pair" in caplog.text


def test_a_constitution_output_that_kept_no_pair_is_named_when_dpo_looks_for_pairs(tmp_path):
    from vlm.data.preferences import PAIRS_DONE
    from vlm.data.sources import constitution_pairs, resolve_eval

    folder = tmp_path / "constitution" / "run-synthetic-revise"
    folder.mkdir(parents=True)
    shards = {"train": str(folder / "train" / "shard-{000000..000000}.tar"),
              "val": str(folder / "val" / "shard-{000000..000000}.tar"), "qa_val": None}
    (folder / PAIRS_DONE).write_text(json.dumps({**shards, "train_pairs": 0}))
    with pytest.raises(ConfigError, match=f"the newest preference pairs, '{folder}', hold no train pair"):
        constitution_pairs(str(tmp_path))
    data = tiny_config(stage="dpo", tiny=False).data  # no data.val: vlm.eval reads the held-out pairs alone
    assert resolve_eval(data, "preferences", str(tmp_path)).val == shards["val"]
    (folder / PAIRS_DONE).write_text(json.dumps({**shards, "train_pairs": 3}))
    assert constitution_pairs(str(tmp_path)).train == shards["train"]
    with pytest.raises(ConfigError, match=r"^no data.val given and no finished preference pairs .*pass data.val="):
        resolve_eval(data, "preferences", str(tmp_path / "elsewhere"))  # vlm.eval of an export without pairs
    # written with max_train_prompts=0 (or max_val_prompts=0): no such split to train (or score) on
    (folder / PAIRS_DONE).write_text(json.dumps({**shards, "train": None, "train_pairs": None}))
    with pytest.raises(ConfigError, match=f"the newest preference pairs, '{folder}', have no train split"):
        constitution_pairs(str(tmp_path))
    (folder / PAIRS_DONE).write_text(json.dumps({**shards, "val": None, "train_pairs": 3}))
    with pytest.raises(ConfigError, match=f"the newest preference pairs, '{folder}', have no held-out split"):
        resolve_eval(data, "preferences", str(tmp_path))


@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
def test_dpo_starts_from_the_export_whose_answers_its_pairs_are(tmp_path, caplog):
    from vlm.data.sources import constitution_pairs
    from vlm.training.runs import prepare_run

    made_by, newer = sft_export(tmp_path / "sft" / "a" / "export"), sft_export(tmp_path / "sft" / "b" / "export")
    folder = tmp_path / "constitution" / "a-synthetic-revise"
    finished_pairs(folder, str(folder / "train" / "shard-{000000..000000}.tar"), made_by)
    pairs = constitution_pairs(str(tmp_path))
    assert pairs.made_by == str(made_by)
    common = [f"output_root={tmp_path}"]
    with caplog.at_level(logging.INFO, logger="vlm"):  # init_from=auto: the model that answered, not the newest sft
        assert prepare_run(tiny_config(*common, "run_name=auto", stage="dpo"), lambda: pairs).init_from == made_by
    assert f"starting from {made_by}, whose answers the preference pairs are" in caplog.text
    with caplog.at_level(logging.WARNING, logger="vlm"):  # another model: said, not refused
        prepare_run(tiny_config(*common, "run_name=other", f"init_from={newer}", stage="dpo"), lambda: pairs)
    assert f"the preference pairs are the answers of {made_by}, and this run starts from {newer}" in caplog.text
    caplog.clear()  # a contrastive export is refused by name when the model is built: no word on whose answers first
    from tiny import contrastive_export

    clip = contrastive_export(tmp_path / "clip")
    with caplog.at_level(logging.WARNING, logger="vlm"):
        prepare_run(tiny_config(*common, "run_name=clip", f"init_from={clip}", stage="dpo"), lambda: pairs)
    assert "answers of" not in caplog.text
    # pairs of unknown origin (data.train given) and no sft export to start from: refused, never fresh weights
    with pytest.raises(ConfigError, match=r"no 'sft' export under .*stage=dpo starts from a trained model"):
        prepare_run(tiny_config(f"output_root={tmp_path / 'empty'}", "run_name=none", stage="dpo"))
    with pytest.raises(ConfigError, match=r"stage=dpo learns from a chat model's own answers .* init_from=PATH"):
        _task(None)
    with caplog.at_level(logging.WARNING, logger="vlm"):  # vlm.eval's key, given to training
        _task(made_by, "stage.reference=/elsewhere")
    assert f"stage.reference='/elsewhere' is read by vlm.eval only: this run's reference is the export it starts " \
           f"from, {made_by}" in caplog.text


class ReferenceWatch(pl.Callback):
    """Records whether the task's reference equals the starting export when training starts and ends."""

    def __init__(self, export: Path):
        self.expected = load_vlm(export).model.state_dict()
        self.same: list[bool] = []

    def _check(self, trainer: pl.Trainer, task) -> None:
        state = task.reference.model.state_dict()
        self.same.append(all(torch.equal(state[k], v) for k, v in self.expected.items()))

    def on_train_start(self, trainer: pl.Trainer, task) -> None:
        self._check(trainer, task)

    def on_train_end(self, trainer: pl.Trainer, task) -> None:
        self._check(trainer, task)


@pytest.mark.slow
def test_resume_rebuilds_the_model_and_its_reference_from_the_export_the_run_started_from(tmp_path, caplog):
    """Checkpoints hold the policy, not the frozen reference's copy of it: a resumed run builds both from the export
    its first session started from (recorded), here one whose shapes differ from the command line's defaults."""
    from vlm.train import run

    export = sft_export(tmp_path / "sft")  # the tiny preset's shapes; the runs below name the default ones
    train = write_pairs(tmp_path / "train" / "shard-000000.tar", 8, anchors=4)  # anchors train alongside
    finished_pairs(tmp_path / "constitution" / "a", train, export)  # the newest pairs, read without data.train
    common = ["data.num_workers=0", "stage.batch_size=4", f"init_from={export}", f"output_root={tmp_path}",
              "run_name=r", "stage.lr=1e-2", "trainer.checkpoint_every_n_steps=2", "resume=auto"]
    run(tiny_config(*common, "stage.max_steps=2", stage="dpo", tiny=False))
    checkpoint = torch.load(tmp_path / "dpo" / "r" / "checkpoints" / "step00000002.ckpt", weights_only=False)
    assert checkpoint["init_from"] == str(export)
    assert checkpoint["vlm_stage_settings"]["lr"] == 1e-2 and checkpoint["vlm_stage_settings"]["max_steps"] == 2
    assert checkpoint["vlm_data"] == {"train": train, "val": "", "made_by": str(export)}
    assert not [k for k in checkpoint["state_dict"] if k.startswith("reference.")]
    assert any(k.startswith("model.lm.") for k in checkpoint["state_dict"])
    # a later vlm.constitution run writes newer pairs, another model's answers: the resumed run keeps to its own
    other_train = write_pairs(tmp_path / "other-train" / "shard-000000.tar", 4)
    finished_pairs(tmp_path / "constitution" / "b", other_train, tmp_path / "other-sft")
    caplog.clear()
    watch = ReferenceWatch(export)
    with caplog.at_level(logging.WARNING, logger="vlm"):
        metrics = run(tiny_config(*common, "stage.max_steps=4", "stage.loss=sigmoid", stage="dpo", tiny=False),
                      callbacks=[watch])
    assert metrics["global_step"] == 4 and watch.same == [True, True]
    # the resumed run says which settings it changes: the first two steps trained with IPO
    assert "stage.loss: 'ipo' -> 'sigmoid'; stage.max_steps: 2 -> 4" in caplog.text
    assert "answers of" not in caplog.text
    last = tmp_path / "dpo" / "r" / "checkpoints" / "step00000004.ckpt"
    assert torch.load(last, weights_only=False)["vlm_data"]["train"] == train  # what the resumed session read
    from vlm.data.sources import constitution_pairs
    from vlm.training.runs import prepare_run

    newest = functools.partial(constitution_pairs, str(tmp_path))
    longer = tiny_config(*common, "stage.max_steps=6", stage="dpo", tiny=False)
    Path(train).rename(f"{train}.moved")  # its own pairs gone: refused, not swapped for the newest
    with pytest.raises(ConfigError, match=f"resuming from '{last}' continues on the preference pairs its run "
                                          f"started with, and they are gone .*{train}"):
        prepare_run(longer, newest)
    Path(f"{train}.moved").rename(train)
    # a checkpoint written before runs recorded their pairs reads the newest ones, and says whose answers they are
    older = torch.load(last, weights_only=False)
    del older["vlm_data"]
    torch.save(older, last)
    with caplog.at_level(logging.WARNING, logger="vlm"):
        assert prepare_run(longer, newest).data.train == other_train
    assert (f"the preference pairs this session reads are the answers of {tmp_path / 'other-sft'}, and this run "
            f"started from {export}: they are not the pairs its earlier steps trained on") in caplog.text


class ModeWatch(pl.Callback):
    """Records, at each training batch, which of the task's parts run in training mode."""

    def __init__(self):
        self.training: list[dict[str, bool]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, task, *_) -> None:
        self.training.append({name: part.training for name, part in task.model.parts().items()})


@pytest.mark.parametrize("precompute", ["false", "true"])
def test_trained_parts_train_and_the_frozen_vision_tower_stays_in_eval_mode(tiny_sft_export, tmp_path, precompute):
    """The export loads in eval mode; training runs the projector and the LLM in training mode (dropout, gradient
    checkpointing) and the frozen ViT in eval mode, also after the precomputing pass switched modes for itself."""
    from vlm.train import run

    train = write_pairs(tmp_path / "train" / "shard-000000.tar", 4)
    watch = ModeWatch()
    run(tiny_config(f"data.train={train}", "data.num_workers=0", "stage.batch_size=4", f"init_from={tiny_sft_export}",
                    f"output_root={tmp_path}", f"stage.precompute_reference={precompute}", "stage.max_steps=1",
                    stage="dpo", tiny=False), callbacks=[watch])
    assert watch.training == [{"vision": False, "projector": True, "llm": True}]


@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
@pytest.mark.parametrize("disable_dropout", ["true", "false"])
def test_the_policy_trains_without_dropout_so_it_starts_as_the_reference(tmp_path, disable_dropout):
    """On an LLM built with attention dropout, the first step's margin is exactly zero only with dropout off (the
    default): with it on, the policy's log-probs are noisy where the reference's are not."""
    from vlm.train import run

    export = sft_export(tmp_path / "sft", "+model.llm.config.attention_dropout=0.5")
    train = write_pairs(tmp_path / "train" / "shard-000000.tar", 4)
    run(tiny_config(f"data.train={train}", "data.num_workers=0", "stage.batch_size=4", f"init_from={export}",
                    f"output_root={tmp_path}", f"stage.disable_dropout={disable_dropout}", "stage.max_steps=1",
                    "run_name=r", "trainer.log_every_n_steps=1", stage="dpo", tiny=False))
    with open(tmp_path / "dpo" / "r" / "logs" / "metrics.csv") as file:
        first = next(row for row in csv.DictReader(file) if row.get("train/margin"))
    assert (float(first["train/margin"]) == 0.0) == (disable_dropout == "true")
    reloaded = load_vlm(tmp_path / "dpo" / "r" / "export").model
    assert reloaded.lm.config.attention_dropout == 0.5  # the export keeps the model's own rate for later stages


def test_disable_dropout_silences_every_kind_of_dropout_in_a_timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    from vlm.training.freezing import disable_dropout

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_rate=0.3,
                            pos_drop_rate=0.3, attn_drop_rate=0.3, proj_drop_rate=0.3, drop_path_rate=0.3).train()
    images = torch.randn(2, 3, 32, 32)
    assert not torch.equal(vit(images), vit(images))
    assert disable_dropout(vit) > 0
    assert torch.equal(vit(images), vit(images)) and vit.training


def test_an_sft_export_scored_as_dpo_keeps_dpos_settings(tiny_sft_export, caplog):
    from vlm.eval import as_trained

    config = tiny_config(f"checkpoint={tiny_sft_export}", stage="dpo", tiny=False)
    with caplog.at_level(logging.INFO, logger="vlm"):
        as_trained(config, given={"stage", "checkpoint"})
    assert (config.stage.beta, config.stage.loss, config.stage.sft_weight) == (0.3, "ipo", 1.0)
    assert "stage.beta" not in caplog.text  # its sft run had no beta to take


def test_eval_says_each_setting_it_scores_a_dpo_export_with_even_at_its_default(tiny_sft_export, tmp_path, caplog):
    import shutil

    from vlm.eval import as_trained

    export = Path(shutil.copytree(tiny_sft_export, tmp_path / "dpo-export"))
    meta = json.loads((export / "config.json").read_text())
    meta["stage"], meta["train_config"] = "dpo", {"beta": 0.3, "loss": "ipo", "sft_weight": 2.0,  # beta, loss:
                                                  "reference": str(tiny_sft_export)}  # defaults
    (export / "config.json").write_text(json.dumps(meta))
    config = tiny_config(f"checkpoint={export}", stage="dpo", tiny=False)
    with caplog.at_level(logging.INFO, logger="vlm"):
        as_trained(config, given={"stage", "checkpoint"})
        get_stage("dpo").task.from_export(config, get_stage("dpo"), export, None)
    for setting in ("stage.beta=0.3", "stage.loss='ipo'", "stage.sft_weight=2.0"):
        assert f"{setting}, as its run trained (recorded in the export)" in caplog.text
    # and the model the rewards are measured against
    assert f"stage.reference={tiny_sft_export}: the export its run started from (recorded" in caplog.text



def test_the_reference_vlm_eval_needs_is_named_when_it_is_missing(tiny_sft_export, tmp_path):
    import shutil

    export = Path(shutil.copytree(tiny_sft_export, tmp_path / "dpo-export"))
    meta = json.loads((export / "config.json").read_text())
    meta["stage"], meta["train_config"] = "dpo", {"reference": str(tmp_path / "moved-away")}
    (export / "config.json").write_text(json.dumps(meta))
    dpo, config = get_stage("dpo"), tiny_config(f"checkpoint={export}", stage="dpo", tiny=False)
    with pytest.raises(ConfigError, match=r"need its reference model: pass stage.reference=EXPORT .*recorded: "
                                          r"'.*moved-away'"):
        dpo.task.from_export(config, dpo, export, None)
    config.stage.reference = str(tmp_path / "typo")
    with pytest.raises(ConfigError, match=r"stage.reference='.*typo' is not a folder"):
        dpo.task.from_export(config, dpo, export, None)


def test_a_preference_setting_left_null_is_named():
    from vlm.training.preference_task import require_preference_settings

    settings = tiny_config(stage="dpo").stage
    require_preference_settings(settings)  # the shipped stage file sets them all
    settings.anchor_weight = None
    with pytest.raises(ConfigError, match=r"stage 'dpo' trains on preferences and needs stage.anchor_weight"):
        require_preference_settings(settings)

def test_a_pair_missing_from_the_precomputed_table_names_the_data_change():
    from vlm.training.reference import Reference

    reference = Reference(None, None)
    reference.table = {"shard:00000001": (-1.0, -2.0)}
    pairs = {"keys": ["shard:00000001", "other:00000007"], "input_ids": torch.zeros(4, 3, dtype=torch.long)}
    with pytest.raises(ConfigError, match=r"pair 'other:00000007': data.train or data.val changed .* resume it with "
                                          r"its own data"):
        reference.pair_logps(pairs, None)
    assert reference.pair_logps({**pairs, "keys": pairs["keys"][:1]}, None).tolist() == [-1.0, -2.0]


def test_a_contrastive_export_is_refused_as_the_policy_to_start_from(tmp_path):
    from tiny import contrastive_export

    clip = contrastive_export(tmp_path / "clip")
    with pytest.raises(ConfigError, match=r"is a 'contrastive' export; stage=dpo starts from a chat model"):
        _task(clip)


def test_a_held_out_set_without_pairs_is_said_to_measure_no_rewards(caplog):
    """data.val with conversations and no pair: the answers are scored, and the missing rewards/* are said (they
    were missing from metrics.json without a word)."""
    from types import SimpleNamespace

    from vlm.training.preference_task import PreferenceTask
    from vlm.training.trainer import check_scored

    task = SimpleNamespace(READS_PREFERENCES=PreferenceTask.READS_PREFERENCES, predictions=[{"key": "a"}])
    with caplog.at_level(logging.WARNING):
        check_scored(task, {"loss": 1.0, "exact_match": 0.5}, "val/shard-000000.tar")
    assert "data.val='val/shard-000000.tar' holds no preference pair that could be scored" in caplog.text
    caplog.clear()
    check_scored(task, {"loss": 1.0, "rewards/accuracy": 0.5, "exact_match": 0.5}, "val/shard-000000.tar")
    assert caplog.text == ""
