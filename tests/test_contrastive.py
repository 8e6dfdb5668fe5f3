"""Phase 1: the CLIP model learns on a fixed batch, exports reload to identical outputs, bad exports are named."""

from __future__ import annotations

import io
import logging
import random

import pytest
import torch
from images import solid
from PIL import Image
from tiny import make_task, tiny_config

from vlm.data import synthetic
from vlm.exports.clip import load_clip
from vlm.exports.format import ExportError
from vlm.metrics import class_embeddings, contrastive_metrics, contrastive_predictions, retrieve
from vlm.models.factory import make_tiler
from vlm.training.contrastive import ContrastiveTask
from vlm.training.optim import build_optimizer, warmup_cosine


def _batch(task: ContrastiveTask, n: int = 16) -> dict:
    decode = task.batching().decode
    samples = [decode(s) for s in synthetic.caption_samples(n, seed=3, image_size=64)]
    return task.batching().collate(samples)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_loss_goes_down_on_a_fixed_batch(loss):
    torch.manual_seed(0)
    task = make_task(tiny_config(f"model.clip.loss={loss}", "stage.lr=3e-3"), synthetic.CLASSNAMES)
    batch = _batch(task)
    optimizer = build_optimizer(task.model.parts(), task.config.stage)
    losses = []
    for _ in range(40):
        out = task.loss_fn(**task.model(batch["pixels"], batch["ids"]), output_dict=True)
        loss_value = sum(out.values())
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
        losses.append(loss_value.item())
    assert "contrastive_loss" in out
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("warmup, peaks", [(1000, False), (2, True)])
def test_a_warmup_no_shorter_than_the_run_is_warned_about(caplog, warmup, peaks):
    """`stage.max_steps=3` under a long warmup would train at a sliver of `stage.lr`, the log saying nothing."""
    stage = tiny_config("stage.max_steps=3", f"stage.warmup_steps={warmup}", "stage.lr=1e-3").stage
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=stage.lr)
    with caplog.at_level(logging.WARNING, logger="vlm"):
        schedule = warmup_cosine(optimizer, stage)
    rates = [stage.lr * factor for factor in (schedule.lr_lambdas[0](step) for step in range(3))]
    assert (max(rates) == pytest.approx(stage.lr)) == peaks
    warned = "stage.warmup_steps=1000 is not below stage.max_steps=3: the learning rate never reaches its peak"
    assert (warned in caplog.text) != peaks


def test_export_reloads_to_identical_outputs(tmp_path):
    torch.manual_seed(0)
    task = make_task(tiny_config(), synthetic.CLASSNAMES)
    task.model.eval()
    batch = _batch(task, 8)
    task.export(tmp_path / "export")
    loaded = load_clip(tmp_path / "export")
    assert loaded.classnames == synthetic.CLASSNAMES
    with torch.no_grad():
        assert torch.equal(task.model.encode_image(batch["pixels"]), loaded.model.encode_image(batch["pixels"]))
        assert torch.equal(task.model.encode_text(batch["ids"]), loaded.model.encode_text(batch["ids"]))
    texts = ["a red circle", "a blue star in the top left"]
    assert torch.equal(task.tokenizer(texts), loaded.tokenizer(texts))
    image = synthetic.render(synthetic.ShapeSpec("red", "circle", "top left"), random.Random(0), 64)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert torch.equal(task.batching().decode.tiler(buffer.getvalue()).pixel_values,
                       loaded.tiler(Image.open(io.BytesIO(buffer.getvalue()))).pixel_values)


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json", "tokenizer"])
def test_export_with_a_missing_file_names_it(tmp_path, missing):
    task = make_task(tiny_config(), None)
    folder = task.export(tmp_path / "export")
    target = folder / missing
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(ExportError, match=f"is not an export folder: it has no '{missing}'; it is incomplete: copy "
                                          f"it again"):
        load_clip(folder)


def test_zero_shot_and_retrieval_metrics():
    torch.manual_seed(0)
    classes = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 1, 2, 3])
    image = classes[labels] + 0.01 * torch.randn(4, 8)
    text = image.clone()
    metrics = contrastive_metrics(retrieve(image, text), labels, image @ classes.T)
    assert metrics == {"i2t_r1": 1.0, "t2i_r1": 1.0, "zero_shot_top1": 1.0}
    metrics = contrastive_metrics(retrieve(image, text.roll(1, 0)), labels, None)
    assert metrics["i2t_r1"] == 0.0 and "zero_shot_top1" not in metrics
    # samples without a label are left out of the zero-shot score, not the whole score
    partly = torch.tensor([0, -1, 2, -1])
    wrong = contrastive_metrics(retrieve(image, text), partly, image @ classes.roll(1, 0).T)  # every class one off
    assert contrastive_metrics(retrieve(image, text), partly, image @ classes.T)["zero_shot_top1"] == 1.0
    assert wrong["zero_shot_top1"] == 0.0
    rows = contrastive_predictions(retrieve(image, text), partly, image @ classes.T, list("abcd"), list("kkkk"),
                                   list("cccc"))
    assert [r.get("correct") for r in rows] == [True, None, True, None] and rows[1]["prediction"] == "b"
    # a "hub" caption, closer to every image than their own captions are, is what each image retrieves, while each
    # caption still retrieves its own image: the two directions score differently, each by its own argmax
    own = torch.eye(4)
    hub = own.clone()
    hub[0] = torch.tensor([2.0, 1.5, 1.5, 1.5])
    no_labels = torch.full((4,), -1)
    assert contrastive_metrics(retrieve(own, hub), no_labels, None) == {"i2t_r1": 0.25, "t2i_r1": 1.0}
    assert contrastive_metrics(retrieve(hub, own), no_labels, None) == {"i2t_r1": 1.0, "t2i_r1": 0.25}



def test_retrieval_in_blocks_of_rows_equals_the_whole_similarity_matrix(monkeypatch):
    import vlm.metrics

    torch.manual_seed(0)
    image, text = torch.randn(50, 8), torch.randn(50, 8)
    similarity = image @ text.T  # (N, N), what the blocks must agree with
    monkeypatch.setattr(vlm.metrics, "SIMILARITY_BLOCK", 7 * 50)  # 7 rows a block: the last block is short
    retrieved = retrieve(image, text)
    assert torch.equal(retrieved.image_to_text, similarity.argmax(dim=1) == torch.arange(50))
    assert torch.equal(retrieved.text_to_image, similarity.argmax(dim=0) == torch.arange(50))
    assert torch.equal(retrieved.caption_ranks, (similarity > similarity.diagonal().unsqueeze(1)).sum(dim=1))
    # with images and captions shared, still the whole matrix's answer: 10 images of 5 captions each, from 25 texts
    image_groups, text_groups = [i // 5 for i in range(50)], [(i * 7) % 25 for i in range(50)]
    grouped = retrieve(image, text, image_groups, text_groups)
    pairs = {(g, t) for g, t in zip(image_groups, text_groups, strict=True)}
    match = torch.tensor([[(image_groups[i], text_groups[j]) in pairs for j in range(50)] for i in range(50)])
    best_match = similarity.masked_fill(~match, -torch.inf).amax(dim=1)
    assert torch.equal(grouped.image_to_text, best_match >= similarity.amax(dim=1))
    assert 0 < grouped.image_to_text.sum() < 50  # neither all nor none: the comparison above has something to check
    others_above = (similarity > similarity.diagonal().unsqueeze(1)) & ~match
    assert torch.equal(grouped.caption_ranks, others_above.sum(dim=1))
    # caption i with image j: (image of j, caption of i) is a pair
    caption_match = torch.tensor([[(image_groups[j], text_groups[i]) in pairs for j in range(50)] for i in range(50)])
    best_image = similarity.T.masked_fill(~caption_match, -torch.inf).amax(dim=1)
    assert torch.equal(grouped.text_to_image, best_image >= similarity.T.amax(dim=1))


def test_a_perfect_model_scores_r1_of_1_on_one_image_with_several_captions_and_one_caption_for_several_images():
    """images_to_shards writes a sample per caption, and synthetic captions repeat ("a red circle"): retrieving the
    same image's other caption, or another image's identical caption, is a match, not a miss."""
    e = torch.eye(4)  # (4, E)
    image = e[[0, 0, 1, 2, 3]]  # samples 0 and 1 show one image with two captions; 3 and 4 two different images
    alike = (e[2] + e[3]) / 2  # ... described in the same words (embedded in other batches: not bit-equal)
    text = torch.stack([e[0], 0.9 * e[0], e[1], alike, 0.999 * alike])
    image_groups, text_groups = [0, 0, 1, 2, 3], [0, 1, 2, 3, 3]
    no_labels = torch.full((5,), -1)
    assert contrastive_metrics(retrieve(image, text, image_groups, text_groups), no_labels, None) == {
        "i2t_r1": 1.0, "t2i_r1": 1.0}
    # each sample on its own, two of those answers count as misses: image 1 retrieves caption 0, image 4 caption 3
    assert contrastive_metrics(retrieve(image, text), no_labels, None) == {"i2t_r1": pytest.approx(0.6), "t2i_r1": 1.0}

def test_a_held_out_label_outside_the_class_names_is_a_skipped_sample_naming_them():
    from vlm.data.captions import CaptionDecoder
    from vlm.data.shards import SkipSample

    task = make_task(tiny_config(), synthetic.CLASSNAMES)
    tiler = make_tiler(task.config.tiler, task.model.visual)
    sample = {"__key__": "k7", "__url__": "val.tar", "png": solid(), "txt": b"a red circle", "cls": b"40"}
    held_out = CaptionDecoder(tiler, task.tokenizer, synthetic.CLASSNAMES)
    with pytest.raises(SkipSample, match=r"its 'cls' '40' is not a class index 0-31 of the 32 class names"):
        held_out(sample)
    assert CaptionDecoder(tiler, task.tokenizer)(sample)["label"] == 40  # training reads no label: kept
    assert CaptionDecoder(tiler, task.tokenizer)({**sample, "cls": b"dog"})["label"] == -1


def test_per_sample_predictions_rank_each_caption_and_name_the_classes():
    classes = torch.eye(3)  # (C, E): class i points along axis i
    image = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0], [0.0, 0.0, 1.0]])  # sample 1 looks like class 2
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.3, 1.0]])
    rows = contrastive_predictions(retrieve(image, text), torch.tensor([0, 1, 2]), image @ classes.T,
                                   ["red", "green", "blue"], ["s0", "s1", "s2"], ["a red", "a green", "a blue"], top=2)
    assert [r["caption_rank"] for r in rows] == [0, 1, 0]  # sample 1's image scores caption 2 above its own
    assert [(r["label"], r["prediction"], r["correct"]) for r in rows] == [
        ("red", "red", True), ("green", "blue", False), ("blue", "blue", True)]
    assert rows[1]["top"] == ["blue", "green"] and rows[1]["key"] == "s1" and rows[1]["caption"] == "a green"
    unlabelled = contrastive_predictions(retrieve(image, text), torch.tensor([-1, -1, -1]), None, None,
                                         ["s0", "s1", "s2"], ["a", "b", "c"])
    assert set(unlabelled[0]) == {"key", "caption", "caption_rank"}


def test_class_embeddings_average_templates():
    task = make_task(tiny_config(), None)
    task.model.eval()
    names = [f"{color} {shape}" for color in ("red", "blue", "green", "pink") for shape in ("circle", "star", "square")]
    templates = ["a {}.", "a photo of a {}.", "a drawing of a {}."]
    embeddings = class_embeddings(task.model, task.tokenizer, names, templates)  # 12 classes: two passes of 10
    with torch.no_grad():  # CLIP's recipe, class by class: the mean of the unit-norm prompt embeddings, renormed
        expected = torch.stack([task.model.encode_text(task.tokenizer([t.format(n) for t in templates])).mean(0)
                                for n in names])
    assert torch.allclose(embeddings, torch.nn.functional.normalize(expected, dim=-1), atol=1e-6)
    one_template = class_embeddings(task.model, task.tokenizer, names, templates[:1])
    assert not torch.allclose(embeddings, one_template, atol=1e-3)  # the templates matter


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_only_mean_pooling_trains_the_patch_tokens_phase_2_reads(pool):
    """Phase 2 reads the ViT's patch tokens. Pooled by a CLS token, the contrastive loss never reaches them (the LLM
    then learns shapes from a by-product); mean-pooled, as the tiny default is, every one of them is trained."""
    assert tiny_config().model.vision.global_pool == "avg"
    torch.manual_seed(0)
    task = make_task(tiny_config(f"model.vision.global_pool={pool}"), synthetic.CLASSNAMES)
    batch, model = _batch(task, 8), task.model
    tokens = model.visual.forward_features(batch["pixels"])  # (B, prefix + N, D): feature_layer=-1's tokens
    tokens.retain_grad()
    image = torch.nn.functional.normalize(model.head.image_projection(model.visual.pool(tokens)), dim=-1)
    out = task.loss_fn(image_features=image, text_features=model.encode_text(batch["ids"]),
                       logit_scale=model.head.logit_scale.exp(), output_dict=True)
    out["contrastive_loss"].backward()
    patch_gradients = tokens.grad[:, model.visual.num_prefix_tokens:].abs().amax(dim=-1)  # (B, N)
    if pool == "avg":
        assert bool((patch_gradients > 0).all())
    else:
        assert bool((patch_gradients == 0).all()) and bool((tokens.grad[:, 0] != 0).any())


@pytest.mark.parametrize("limit", [5, None], ids=["five", "all"])
def test_eval_max_samples_sets_how_many_held_out_samples_a_contrastive_validation_ranks(tmp_path, limit, caplog):
    """Retrieval R@1 depends on how many candidates it ranks, so eval.max_samples=5 must score exactly 5 samples,
    not the 8 of the two batches of 4 that hold them; without a limit, all 12 held-out samples are scored."""
    from vlm.eval import evaluate

    torch.manual_seed(0)
    export = make_task(tiny_config(), synthetic.CLASSNAMES).export(tmp_path / "export")
    config = tiny_config("data.synthetic.num_train=8", "data.synthetic.num_val=12",
                         "data.synthetic.samples_per_shard=12", f"data.synthetic.cache_dir={tmp_path / 'data'}",
                         "data.num_workers=0", "eval.batch_size=4",
                         f"eval.max_samples={limit if limit else 'null'}", f"checkpoint={export}")
    with caplog.at_level(logging.INFO):
        metrics, predictions = evaluate(config)
    assert "parameters by part" not in caplog.text  # a table of what trains and what is frozen: nothing trains here
    assert metrics["samples_scored"] == (limit or 12) and type(metrics["samples_scored"]) is int
    assert len(predictions) == len({p["key"] for p in predictions}) == metrics["samples_scored"]
    assert sum(p["correct"] for p in predictions) / len(predictions) == pytest.approx(metrics["zero_shot_top1"])
    assert sum(p["caption_rank"] == 0 for p in predictions) / len(predictions) == pytest.approx(metrics["i2t_r1"])


def test_held_out_samples_of_one_image_with_several_captions_retrieve_each_other(tmp_path):
    """A shard with one picture under six captions (as images_to_shards writes an image with several): whichever
    caption the picture retrieves is one of its own, so even a random model's image->text R@1 is 1. Each sample on
    its own, one of six would be."""
    import webdataset as wds

    from vlm.eval import evaluate

    torch.manual_seed(0)
    export = make_task(tiny_config(), synthetic.CLASSNAMES).export(tmp_path / "export")
    (tmp_path / "val").mkdir()
    picture = solid()
    with wds.TarWriter(str(tmp_path / "val" / "shard-000.tar")) as sink:
        for i, words in enumerate(["a red circle", "a circle", "a red shape", "red", "a round thing", "a disc"]):
            sink.write({"__key__": f"photo-{i}", "png": picture, "txt": words})
    val = str(tmp_path / "val" / "shard-000.tar")
    metrics, predictions = evaluate(tiny_config(f"checkpoint={export}", f"data.val='{val}'", "data.num_workers=0",
                                                "eval.batch_size=4"))
    assert metrics["samples_scored"] == 6
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == 1.0
    assert [row["caption_rank"] for row in predictions] == [0] * 6  # no caption but its own to rank above it


def test_vlm_eval_scores_a_contrastive_export_on_the_held_out_data_its_run_validated_on(tmp_path):
    """Not the synthetic shapes: a model of one's own classes would score near chance there."""
    from vlm.eval import as_trained

    task = make_task(tiny_config(), synthetic.CLASSNAMES)
    task.held_out = str(tmp_path / "val" / "shard-{000000..000000}.tar")  # as vlm.train sets it from data.val
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "shard-000000.tar").write_bytes(b"")
    export = task.export(tmp_path / "export")
    config = tiny_config(f"checkpoint={export}")
    as_trained(config, given={"checkpoint"})
    assert config.data.val == task.held_out



@pytest.mark.parametrize("names_beside", [False, True], ids=["no-classnames", "classnames-beside"])
def test_vlm_eval_reads_labels_on_new_data_by_that_datas_class_names_only(tmp_path, names_beside):
    """An export's class names label its own held-out data. Labelled shards of one's own without a classnames.txt
    are scored by retrieval alone: read against the export's names, every label would name another class. With a
    classnames.txt beside them, their labels and predictions are read by those names, not by the export's."""
    import tarfile

    from test_bad_data import write_caption_shards

    from vlm.eval import evaluate

    torch.manual_seed(0)
    export = make_task(tiny_config(), synthetic.CLASSNAMES).export(tmp_path / "export")
    pattern = write_caption_shards(tmp_path / "val", good_per_shard=6, bad_kinds=[], shards=1)
    beside = synthetic.CLASSNAMES[::-1]  # the export's names in another order: label k names another class
    if names_beside:
        (tmp_path / "val" / "classnames.txt").write_text("\n".join(beside) + "\n")
    metrics, predictions = evaluate(tiny_config(f"checkpoint={export}", f"data.val='{pattern}'",
                                                "data.num_workers=0"))
    assert "i2t_r1" in metrics and ("zero_shot_top1" in metrics) == names_beside
    if names_beside:
        with tarfile.open(tmp_path / "val" / "shard-000.tar") as tar:
            labels = {member.name.removesuffix(".cls"): int(tar.extractfile(member).read())
                      for member in tar.getmembers() if member.name.endswith(".cls")}
        keys = [row["key"].rpartition(":")[2] for row in predictions]  # a row's key is "SHARD:KEY"
        assert sorted(keys) == sorted(labels)
        for key, row in zip(keys, predictions, strict=True):
            assert row["label"] == beside[labels[key]]
            assert row["correct"] == (row["prediction"] == row["label"]) and row["prediction"] == row["top"][0]

@pytest.mark.parametrize("given, templates", [({"checkpoint"}, ["{}"]), ({"checkpoint", "eval.templates"}, None)])
def test_vlm_eval_ranks_classes_with_the_prompts_the_export_validated_with_unless_told(tmp_path, given, templates):
    from vlm.eval import as_trained

    task = make_task(tiny_config("eval.templates=['{}']"), synthetic.CLASSNAMES)
    export = task.export(tmp_path / "export")
    config = tiny_config(f"checkpoint={export}")
    default = list(config.eval.templates)
    assert default != ["{}"]
    as_trained(config, given=given)
    assert list(config.eval.templates) == (templates or default)


def test_the_picture_command_draws_what_it_says(tmp_path, capsys):
    """`python -m vlm.data.synthetic shape.png a.png`: each picture's shape is in the colour and quadrant printed."""
    import numpy as np
    from PIL import Image

    synthetic.main([str(tmp_path / "shape.png"), str(tmp_path / "a.jpg"), "--seed", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line in lines:
        path, said = line.split(": ")
        colour, rest = said.split(" ", 2)[1:]
        position = rest.split(", ")[1]
        image = np.asarray(Image.open(path).convert("RGB"), dtype=float)
        assert image.shape == (64, 64, 3)
        # the pixels closest to the named colour lie in the named quadrant
        distance = np.abs(image - np.array(synthetic.COLORS[colour])).sum(axis=2)
        rows, cols = np.nonzero(distance < 60)
        assert len(rows) > 20, line
        assert ("bottom" in position) == (rows.mean() > 32) and ("right" in position) == (cols.mean() > 32), line
    bad = {"give a file name ending in .png": [str(tmp_path / "notes.txt")],
           "--size 100000: give 8 to 4096 pixels": [str(tmp_path / "big.png"), "--size", "100000"],
           f"cannot write '{tmp_path / 'no' / 'b.png'}': there is no folder": [str(tmp_path / "first.png"),
                                                                            str(tmp_path / "no" / "b.png")]}
    for message, argv in bad.items():
        with pytest.raises(SystemExit) as exit_:
            synthetic.main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "shape.png"]  # nothing of the refused commands


def test_a_text_tower_started_from_open_clip_weights_runs_them_as_they_were_trained(tmp_path):
    """Weights trained with QuickGELU (OpenAI's CLIP) run in a GELU tower would give other embeddings, which open_clip
    only warns about: the tower takes the activation model.text.quick_gelu names, and a mismatch is refused."""
    import dataclasses
    import json

    import open_clip

    from vlm.config import ConfigError
    from vlm.models.text import TextTower

    text_cfg = {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    (tmp_path / "vlm-test-quickgelu.json").write_text(json.dumps({
        "embed_dim": 16, "quick_gelu": True, "text_cfg": text_cfg,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}}))
    open_clip.add_model_config(tmp_path / "vlm-test-quickgelu.json")
    torch.manual_seed(0)
    reference = open_clip.create_model("vlm-test-quickgelu").eval()
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    config = tiny_config(f"model.text.pretrained='vlm-test-quickgelu/{tmp_path / 'weights.pt'}'",
                         "model.text.quick_gelu=true", "model.text.context_length=20", "model.text.width=32",
                         "model.text.heads=2", "model.text.layers=1").model.text
    tower = TextTower(config, 16).eval()
    ids = open_clip.get_tokenizer("ViT-B-32", context_length=20)(["a red circle", "two blue squares"])
    with torch.no_grad():
        assert torch.allclose(tower(ids), reference.encode_text(ids), atol=1e-6)
    with pytest.raises(ConfigError, match=r"was trained with QuickGELU activations: set model.text.quick_gelu=true"):
        TextTower(dataclasses.replace(config, quick_gelu=False), 16)
    with pytest.raises(ConfigError, match=r"does not match model.text \(.*size mismatch for positional_embedding"):
        TextTower(dataclasses.replace(config, context_length=30), 16)
    with pytest.raises(ConfigError, match=r"'vlm-test-quickgelu/.*missing.pt': its weights cannot be loaded \("):
        TextTower(dataclasses.replace(config, pretrained=f"vlm-test-quickgelu/{tmp_path / 'missing.pt'}"), 16)
    with pytest.raises(ConfigError, match=r"'vlm-test-quickgelu' names no weights: give MODEL/TAG"):
        TextTower(dataclasses.replace(config, pretrained="vlm-test-quickgelu"), 16)
    # OpenAI's registered weights are refused before anything is fetched, by open_clip's own registry
    with pytest.raises(ConfigError, match=r"'ViT-B-32/openai' was trained with QuickGELU"):
        TextTower(dataclasses.replace(config, pretrained="ViT-B-32/openai", quick_gelu=False), 16)


def test_an_export_written_before_model_text_quick_gelu_loads_with_gelu(tmp_path):
    import json

    from tiny import contrastive_export

    export = contrastive_export(tmp_path / "export")
    meta = json.loads((export / "config.json").read_text())
    del meta["model"]["text"]["quick_gelu"]
    (export / "config.json").write_text(json.dumps(meta))
    assert load_clip(export).model.text.config.quick_gelu is False
