"""Export folders written by earlier versions of vlm still load: in `vlm.infer`'s ChatModel, in `vlm.eval`, and as a
later stage's `init_from`.

tests/fixtures/export_v1 holds what the earlier code wrote for the tiny preset (config.json and tokenizer files, as
written), and the names and shapes of its weights. The weights themselves are generated here: weights are never
committed, and the names and shapes are what a loader depends on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from images import solid
from safetensors.torch import save_file
from tiny import make_task, tiny_config

from vlm.chat import ChatModel
from vlm.eval import evaluate
from vlm.exports.clip import BPE_FILE, load_clip

FIXTURES = Path(__file__).parent / "fixtures" / "export_v1"


def old_export(kind: str, folder: Path) -> Path:
    """The fixture folder with random weights of the recorded names and shapes, as the earlier code left it."""
    shutil.copytree(FIXTURES / kind, folder)
    shapes = json.loads((folder / "weights.json").read_text())
    (folder / "weights.json").unlink()
    generator = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(shape, generator=generator) * 0.02 for k, shape in shapes.items()},
              str(folder / "model.safetensors"))
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
    metrics, _ = evaluate(config)
    assert 0.0 <= metrics[metric] <= 1.0


def test_an_earlier_export_starts_the_next_stage(exports):
    sft = make_task(tiny_config(stage="sft"), init_from=exports["sft"])  # sft from an sft export: every weight
    align = make_task(tiny_config(stage="align"), init_from=exports["contrastive"])  # align: the ViT only
    clip = load_clip(exports["contrastive"])
    assert all(torch.equal(a, b) for a, b in zip(align.model.vision.state_dict().values(),
                                                  clip.model.visual.state_dict().values(), strict=True))
    chat = ChatModel.load(exports["sft"], device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(sft.model.state_dict().values(),
                                                  chat.model.state_dict().values(), strict=True))

