"""Packed rows train exactly as padded batches do, and no sample sees another; length-grouped batches."""

from __future__ import annotations

import logging
import math
import tarfile

import pytest
import torch
import torch.nn.functional as F
import webdataset
from tiny import make_task, tiny_config
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import and_masks, causal_mask_function, packed_sequence_mask_function, sdpa_mask

from vlm.config import ConfigError
from vlm.data.packing import LengthGrouping, best_width, pack_batch, pack_rows
from vlm.data.processor import IGNORE_INDEX, Encoded, pad_batch
from vlm.data.sources import DataSources
from vlm.models.factory import new_vlm
from vlm.models.packing import PACKED_MASKS, attention_break_even, keeps_samples_apart
from vlm.models.vlm import VisionLanguageModel
from vlm.training.datamodule import ShardDataModule


def _vlm(family: str, attention: str = "sdpa") -> VisionLanguageModel:
    torch.manual_seed(0)
    config = tiny_config(stage="sft")
    bundle = new_vlm(config.model, config.tiler)
    model = bundle.model
    if family == "qwen2":
        lm = model.lm.config
        qwen = Qwen2Config(vocab_size=lm.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
        model = VisionLanguageModel(config.model, Qwen2ForCausalLM(qwen), model.image_token_id)
    model.lm.set_attn_implementation(attention)
    return model.eval()  # no dropout either way; gradients still flow


def _samples(model: VisionLanguageModel, lengths: list[int], images: list[int], seed: int = 0) -> list[Encoded]:
    """Random samples: `images[i]` images (one tile each) after a 2-token prefix, labels on the second half."""
    generator = torch.Generator().manual_seed(seed)
    tokens, size = model.tokens_per_tile, model.config.vision.image_size
    samples = []
    for length, count in zip(lengths, images, strict=True):
        ids = torch.randint(10, 100, (length,), generator=generator)
        ids[2:2 + count * tokens] = model.image_token_id
        labels = torch.where(torch.arange(length) >= length // 2, ids, IGNORE_INDEX)
        labels[ids == model.image_token_id] = IGNORE_INDEX
        samples.append(Encoded(ids, labels, torch.randn(count, 3, size, size, generator=generator),
                               [tokens] * count))
    return samples


def _sample_losses(logits: torch.Tensor, labels: torch.Tensor, spans: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Mean next-token loss of each sample at (row, start, end) of logits (B, L, V) and labels (B, L)."""
    return [F.cross_entropy(logits[row, start:end - 1], labels[row, start + 1:end], ignore_index=IGNORE_INDEX)
            for row, start, end in spans]


def _packed_spans(samples: list[Encoded], capacity: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of each sample in `pack_batch(samples, width=capacity)`, in packed order."""
    spans = []
    for row, members in enumerate(pack_rows([len(s.input_ids) for s in samples], capacity)):
        start = 0
        for i in members:
            spans.append((row, start, start + len(samples[i].input_ids)))
            start = spans[-1][2]
    return spans


@pytest.mark.parametrize("family,attention", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_packed_rows_give_the_unpacked_losses_and_gradients(family, attention):
    model = _vlm(family, attention)
    tokens = model.tokens_per_tile
    samples = _samples(model, [tokens + 40, 2 * tokens + 9, tokens + 20, 30, tokens + 60], [1, 2, 1, 0, 1])
    packed = pack_batch(samples, pad_id=0, width=3 * tokens + 40)
    assert len(packed["input_ids"]) < len(samples)  # several samples share a row

    out = model(packed["input_ids"], None, packed["pixel_values"], packed["labels"], packed["image_slots"],
                position_ids=packed["position_ids"])
    packed_losses = _sample_losses(out.logits, packed["labels"], _packed_spans(samples, 3 * tokens + 40))
    sum(packed_losses).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    alone = []
    for i in packed["order"]:
        single = pad_batch([samples[i]], pad_id=0)
        logits = model(single["input_ids"], single["attention_mask"], single["pixel_values"],
                       image_slots=single["image_slots"]).logits
        alone += _sample_losses(logits, single["labels"], [(0, 0, len(samples[i].input_ids))])
    sum(alone).backward()
    assert torch.allclose(torch.stack(packed_losses), torch.stack(alone), atol=1e-5, rtol=0)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.allclose(packed_grads[name], parameter.grad, atol=1e-5, rtol=1e-5), name

    padded = pad_batch(samples, pad_id=0)  # the batch loss (mean over labelled tokens) is the padded batch's
    with torch.no_grad():
        padded_loss = model(padded["input_ids"], padded["attention_mask"], padded["pixel_values"], padded["labels"],
                            padded["image_slots"]).loss
    assert abs(float(out.loss.detach()) - float(padded_loss)) < 1e-5


def test_a_sample_never_sees_the_other_samples_of_its_row():
    model = _vlm("llama")
    tokens = model.tokens_per_tile
    first, second = _samples(model, [tokens + 30, tokens + 25], [1, 1])
    changed = _samples(model, [tokens + 30], [1], seed=1)[0]  # other text and another image, same length
    logits = []
    for a in (first, changed):
        batch = pack_batch([a, second], pad_id=0, width=2 * tokens + 80)
        assert len(batch["input_ids"]) == 1 and batch["order"] == [0, 1]  # one row: a, then second, then padding
        with torch.no_grad():
            logits.append(model(batch["input_ids"], None, batch["pixel_values"], position_ids=batch["position_ids"],
                                image_slots=batch["image_slots"]).logits[0])
    start, end = len(first.input_ids), len(first.input_ids) + len(second.input_ids)
    assert not torch.equal(logits[0][:start], logits[1][:start])
    assert torch.equal(logits[0][start:end], logits[1][start:end])  # bit-identical


def test_packing_keeps_whole_samples_and_their_images_in_order():
    model = _vlm("llama")
    tokens = model.tokens_per_tile
    samples = _samples(model, [tokens + 5, 20, 2 * tokens + 5, tokens + 9], [1, 0, 2, 1])
    samples[1].labels[0] = samples[1].input_ids[0]  # a labelled first token: still never predicted
    batch = pack_batch(samples, pad_id=0, width=2 * tokens + 30)
    rows = pack_rows([len(s.input_ids) for s in samples], 2 * tokens + 30)
    assert sorted(batch["order"]) == [0, 1, 2, 3] and batch["order"] == [i for row in rows for i in row]
    spans = _packed_spans(samples, 2 * tokens + 30)
    ordered = [samples[i] for i in batch["order"]]
    for (row, start, end), sample in zip(spans, ordered, strict=True):
        assert torch.equal(batch["input_ids"][row, start:end], sample.input_ids)
        assert torch.equal(batch["position_ids"][row, start:end], torch.arange(end - start))
        assert batch["labels"][row, start] == IGNORE_INDEX  # nothing before a sample predicts its first token
        assert torch.equal(batch["labels"][row, start + 1:end], sample.labels[1:])
    assert torch.equal(batch["pixel_values"], torch.cat([s.pixel_values for s in ordered]))
    assert batch["image_slots"].tolist() == [k for s in ordered for k in range(len(s.image_tokens))
                                             for _ in range(tokens)]
    narrowest = pack_batch(samples, pad_id=0)  # by default rows are as wide as the longest sample
    assert narrowest["input_ids"].shape[1] == 2 * tokens + 5
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([10, 50], 40)


def test_rows_are_as_wide_as_packs_at_the_least_compute():
    lengths = [12, 10, 10, 8]
    # attention free (varlen kernels): the fullest rows, 12 + 8 and 10 + 10, no padding at all
    assert best_width(lengths, 48, math.inf) == 20
    # attention dearer than the linear layers from width 1: rows never wider than the longest sample
    assert best_width(lengths, 48, 1.0) == 12
    assert best_width([30, 5], 24, math.inf) == 30  # max_length below the longest sample: that sample's width
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=192, intermediate_size=512, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=1, vocab_size=64,
                                         attn_implementation="sdpa"))
    # per token: q, o 2 x 192 x 192, k, v 2 x 192 x 96, a gated MLP 3 x 192 x 512; attention 2 x 192 per key
    assert attention_break_even(llama) == (2 * 192 * 192 + 2 * 192 * 96 + 3 * 192 * 512) / (2 * 192)
    llama.config._attn_implementation = "flash_attention_2"
    assert attention_break_even(llama) == math.inf


def test_length_grouping_batches_similar_lengths_and_keeps_every_sample():
    lengths = [int(x) for x in torch.randint(1, 500, (64,), generator=torch.Generator().manual_seed(0))]
    stage = LengthGrouping(batches_per_window=4, batch_size=4, length=lambda s: s["n"], seed=0)
    out = [s["n"] for s in stage.run({"n": n} for n in lengths)]
    assert sorted(out) == sorted(lengths)
    batches = [out[i:i + 4] for i in range(0, len(out), 4)]
    spread = sum(max(b) - min(b) for b in batches) / len(batches)
    ungrouped = sum(max(b) - min(b) for b in (lengths[i:i + 4] for i in range(0, 64, 4))) / 16
    assert spread < ungrouped / 3
    assert out != sorted(out)  # the batches of a window come in a shuffled order
    # a stream that ends inside a window and inside a batch: its last samples are given out too, the short batch last
    tail = [int(x) for x in torch.randint(1, 500, (10,), generator=torch.Generator().manual_seed(1))]
    out = [s["n"] for s in stage.run({"n": n} for n in lengths + tail)]
    assert sorted(out) == sorted(lengths + tail) and out[-2:] == sorted(tail)[-2:]


def test_length_grouped_batches_come_in_a_new_order_each_pass_and_reader(monkeypatch):
    """The same window read again (the next pass, or another rank's worker) must not put its shortest batch at the
    same step: the batch order is seeded per pass and reader, as the shuffle buffer is."""
    samples = [{"n": n} for n in range(32)]

    def order_of_batches(stage: LengthGrouping) -> list[int]:
        return [s["n"] // 4 for s in stage.run(iter(samples))][::4]  # each batch by its shortest sample

    stage = LengthGrouping(batches_per_window=8, batch_size=4, length=lambda s: s["n"], seed=0)
    passes = [order_of_batches(stage) for _ in range(3)]
    assert all(sorted(p) == list(range(8)) for p in passes)
    assert len({tuple(p) for p in passes}) == 3
    assert order_of_batches(LengthGrouping(8, 4, lambda s: s["n"], seed=0)) == passes[0]  # a restart: pass 0 again
    monkeypatch.setattr(webdataset.utils, "pytorch_worker_info", lambda: (0, 1, 1, 2))  # the second worker
    assert order_of_batches(LengthGrouping(8, 4, lambda s: s["n"], seed=0)) != passes[0]


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_length_grouping_beside_packing_says_it_saves_no_padding(tmp_path, caplog, packing):
    shard = tmp_path / "shard-000000.tar"
    tarfile.open(shard, "w").close()
    config = tiny_config("data.length_group_batches=2", f"data.packing={str(packing).lower()}", stage="sft")
    batching = make_task(config).batching()
    with caplog.at_level(logging.WARNING, logger="vlm"):  # said when the data is set up, before any step
        ShardDataModule(DataSources(train=str(shard), val=None, classnames=None), batching, config.data)
    warned = [r.getMessage() for r in caplog.records if "length_group_batches" in r.getMessage()]
    assert warned == (["data.length_group_batches=2 with data.packing=true: packed rows pad little already, so "
                       "grouping by length saves no padding here; it only changes which samples share a step (set "
                       "data.length_group_batches=0, or data.packing=false to pad instead)"] if packing else [])


def test_a_registered_packed_mask_builder_gets_each_tokens_sample_and_position(monkeypatch):
    """An attention implementation with its own mask builds it from `sample_layout`; here the plain block-diagonal
    causal mask, built that way, must give what transformers builds from the position ids."""
    model = _vlm("llama")
    tokens = model.tokens_per_tile
    batch = pack_batch(_samples(model, [tokens + 30, 25, tokens + 10], [1, 0, 1]), pad_id=0, width=2 * tokens + 70)
    seen = {}

    def block_diagonal(config, sample_ids, positions):
        seen.update(sample_ids=sample_ids, positions=positions)
        batch_size, length = sample_ids.shape
        same_sample = and_masks(causal_mask_function, packed_sequence_mask_function(sample_ids))
        return sdpa_mask(batch_size, length, length, mask_function=same_sample, allow_is_causal_skip=False)

    def logits():
        with torch.no_grad():
            return model(batch["input_ids"], None, batch["pixel_values"], image_slots=batch["image_slots"],
                         position_ids=batch["position_ids"]).logits

    reference = logits()
    monkeypatch.setitem(PACKED_MASKS, "sdpa", block_diagonal)
    assert torch.allclose(logits(), reference, atol=1e-6)
    assert torch.equal(seen["positions"], batch["position_ids"])
    row = batch["position_ids"][0]
    restarts = (row == 0).long().cumsum(0) - 1  # a new sample wherever the positions restart
    assert torch.equal(seen["sample_ids"][0], restarts)


def test_length_grouping_for_a_stage_whose_samples_have_no_length_is_refused_at_start_up(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    tarfile.open(shard, "w").close()
    config = tiny_config("data.length_group_batches=2")  # contrastive: image + caption, one length
    with pytest.raises(ConfigError, match=r"^data.length_group_batches applies to phase 2 stages \(align, sft\)"):
        ShardDataModule(DataSources(train=str(shard), val=None, classnames=None), make_task(config).batching(),
                        config.data)


def _tiny_lm(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    decoder = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                   intermediate_size=64)
    sizes = {"llama": decoder, "qwen2": decoder,
             "opt": dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, ffn_dim=64,
                         word_embed_proj_dim=32),
             "bloom": dict(hidden_size=32, n_head=2, n_layer=2),
             "mpt": dict(d_model=32, n_heads=2, n_layers=2)}[family]
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=128, **sizes)
    attention = "eager" if family in ("bloom", "mpt") else "sdpa"  # transformers runs those two eager only
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llms_whose_mask_ignores_position_ids_are_found_to_mix_packed_samples(dtype):
    """OPT, Bloom and MPT build a plain causal mask over the whole row (and Bloom's ALiBi bias counts on across it):
    a sample packed after another attends to it. Llama and Qwen2 keep them apart."""
    found = {family: keeps_samples_apart(_tiny_lm(family, dtype)) for family in ("llama", "qwen2", "opt", "bloom",
                                                                                   "mpt")}
    assert found == {"llama": True, "qwen2": True, "opt": False, "bloom": False, "mpt": False}


def test_a_run_on_an_llm_that_mixes_packed_samples_pads_its_batches_instead(caplog):
    task = make_task(tiny_config(stage="sft"))
    task.model.lm = _tiny_lm("opt")
    with caplog.at_level(logging.WARNING, logger="vlm"):
        batching = task.batching()
    assert "data.packing is off for this run: OPTForCausalLM does not keep the samples of a packed row apart" in \
        caplog.text
    model = _vlm("llama")
    batch = batching.collate([{"encoded": e, "key": str(i)} for i, e in enumerate(_samples(model, [20, 12],
                                                                                            [1, 0]))])
    assert "position_ids" not in batch and batch["attention_mask"].shape == (2, 20)  # padded: one sample a row


def test_the_packing_probe_leaves_each_modules_train_or_eval_mode_as_it_was():
    lm = _tiny_lm("llama").train()
    lm.model.layers[0].eval()  # a part kept in eval mode, as a frozen one is
    before = [module.training for module in lm.modules()]
    assert keeps_samples_apart(lm)
    assert [module.training for module in lm.modules()] == before
