"""Export folders written by earlier versions of vlm still load: in `vlm.infer`'s ChatModel, in `vlm.eval`, and as a
later stage's `init_from`.

tests/fixtures/export_v1 holds what the earlier code wrote for the tiny preset (config.json and tokenizer files, as
written), and the names and shapes of its weights. The weights themselves are generated here: weights are never
committed, and the names and shapes are what a loader depends on.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from images import solid
from safetensors.torch import load_file, save_file
from tiny import make_task, tiny_config

from vlm.chat import ChatModel
from vlm.eval import evaluate
from vlm.exports.clip import BPE_FILE

FIXTURES = Path(__file__).parent / "fixtures" / "export_v1"


def old_export(kind: str, folder: Path) -> Path:
    """The fixture folder with random weights of the recorded names and shapes, as the earlier code left it."""
    shutil.copytree(FIXTURES / kind, folder)
    shapes = json.loads((folder / "weights.json").read_text())
    (folder / "weights.json").unlink()
    generator = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in shapes.items()}
    # the conv stem's BatchNorm statistics as training leaves them: variances positive, step counters integers
    weights |= {k: torch.rand(shape, generator=generator) + 0.5 for k, shape in shapes.items() if
                k.endswith("running_var")}
    weights |= {k: torch.tensor(7) for k in shapes if k.endswith("num_batches_tracked")}
    save_file(weights, str(folder / "model.safetensors"))
    if kind == "contrastive":  # the CLIP vocabulary ships with open_clip; the earlier code copied it in
        shutil.copy(open_clip.tokenizer.default_bpe(), folder / "tokenizer" / BPE_FILE)
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("old")
    return {kind: old_export(kind, root / kind) for kind in ("sft", "contrastive")}


SMALL_VAL = ["data.synthetic.num_train=16", "data.synthetic.num_val=8", "data.synthetic.samples_per_shard=8",
             "eval.batch_size=8", "data.num_workers=0"]


def test_an_earlier_sft_export_chats(exports):
    chat = ChatModel.load(exports["sft"], device="cpu")
    reply = chat.generate([{"role": "user", "content": "<image>\nWhat color is the shape?"}],
                          [solid((0, 0, 0), (64, 64))], max_new_tokens=3, temperature=0)
    assert reply.input_tokens > 16 and 1 <= reply.output_tokens <= 3  # 16 image tokens per tile, then the question


@pytest.mark.parametrize("stage,kind,metric", [("sft", "sft", "exact_match"),
                                                ("contrastive", "contrastive", "zero_shot_top1")])
def test_an_earlier_export_evaluates(exports, tmp_path, stage, kind, metric):
    config = tiny_config(*SMALL_VAL, f"data.synthetic.cache_dir={tmp_path}", f"checkpoint={exports[kind]}",
                         stage=stage)
    metrics, predictions = evaluate(config)
    if kind == "sft":  # every held-out answer scored, the rate their rows give, and a held-out loss
        right = [row["scores"]["exact_match"] for row in predictions]
        assert metrics["answers_scored"] == len(right) >= 8 and math.isfinite(metrics["loss"])
    else:  # every held-out image classified zero-shot
        right = [row["correct"] for row in predictions]
        assert metrics["samples_scored"] == len(right) == 8
    assert metrics[metric] == pytest.approx(sum(right) / len(right))


def test_an_earlier_export_starts_the_next_stage(exports):
    """Every weight the earlier code wrote arrives where the next stage reads it, compared with the file itself."""
    sft = make_task(tiny_config(stage="sft"), init_from=exports["sft"])  # sft from an sft export: every weight
    align = make_task(tiny_config(stage="align"), init_from=exports["contrastive"])  # align: the ViT only
    written = load_file(str(exports["sft"] / "model.safetensors"))
    state = sft.model.state_dict()
    assert written and all(torch.equal(state[name], weights) for name, weights in written.items())
    assert torch.equal(state["lm.model.embed_tokens.weight"], written["lm.lm_head.weight"])  # tied: written once
    written = load_file(str(exports["contrastive"] / "model.safetensors"))
    vision = align.model.vision.state_dict()
    assert set(vision) == {name.removeprefix("visual.") for name in written if name.startswith("visual.")}
    assert all(torch.equal(vision[name], written[f"visual.{name}"]) for name in vision)


def test_exports_of_hub_initialised_towers_load_offline(exports, tmp_path, monkeypatch):
    """A run that started from hub weights (model.vision.pretrained, model.text.pretrained) records them; loading its
    export builds the towers without them, since its own weights replace them, so it works with no hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for kind in ("sft", "contrastive"):
        folder = Path(shutil.copytree(exports[kind], tmp_path / kind))
        meta = json.loads((folder / "config.json").read_text())
        meta["model"]["vision"]["pretrained"] = True
        meta["model"]["text"]["pretrained"] = "ViT-B-16/openai"
        (folder / "config.json").write_text(json.dumps(meta))
        written = load_file(str(folder / "model.safetensors"))
        if kind == "sft":
            state = ChatModel.load(folder, device="cpu").model.state_dict()
        else:
            state = make_task(tiny_config(stage="align"), init_from=folder).model.state_dict()
            written = {f"vision.{k.removeprefix('visual.')}": v for k, v in written.items() if k.startswith("visual.")}
        assert all(torch.equal(state[name], weights) for name, weights in written.items())
