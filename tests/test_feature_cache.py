"""The frozen vision tower's feature cache: later epochs never run the tower, and training is unchanged by it."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from images import shapes
from test_bad_data import COMMON, train, write_conversation_shards
from tiny import make_task, tiny_config

from vlm.training.vlm_task import VLMTask


def _raw_samples(count: int) -> list[dict]:
    """Shard samples as webdataset gives them: one or two synthetic pictures and a conversation about them."""
    samples = []
    for i in range(count):
        images = 1 + i % 2
        question = " ".join(["<image>"] * images) + "\nWhat is shown?"
        record = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": f"shape {i}"}]}
        sample = {"__key__": f"{i:04d}", "__url__": "/data/shard-000.tar", "json": json.dumps(record).encode()}
        sample.update({f"{k}.png": shapes(seed=10 * i + k) for k in range(images)})
        samples.append(sample)
    return samples


def _task(tmp_path, *overrides: str) -> VLMTask:
    torch.manual_seed(0)
    return make_task(tiny_config(f"stage.feature_cache_dir={tmp_path}", *overrides, stage="sft"))


def _epoch_losses(task: VLMTask, raw: list[dict], epochs: int = 2) -> list[float]:
    """Two epochs of training forward passes (no updates: the losses must match exactly)."""
    batching = task.batching()
    losses = []
    for _ in range(epochs):
        for start in range(0, len(raw), 3):
            batch = batching.collate([batching.decode(s) for s in raw[start:start + 3]])
            losses.append(float(task.forward_batch(batch, cached=True).loss.detach()))
    return losses


class TowerCalls:
    """Counts forward calls of the ViT's patch embedding on at least one tile: one per tower run that computes
    features (a run on no tiles, which keeps FSDP's ranks in step, computes none)."""

    def __init__(self, task: VLMTask) -> None:
        self.count = 0
        task.model.vision.vit.patch_embed.register_forward_hook(self._seen)

    def _seen(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.count += len(inputs[0]) > 0


@pytest.mark.parametrize("memory", [10**9, 0], ids=["memory", "folder"])
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_the_second_epoch_never_runs_the_tower_and_losses_are_unchanged(tmp_path, memory, packing):
    raw = _raw_samples(6)
    settings = [f"data.packing={str(packing).lower()}"]
    plain = _task(tmp_path, *settings)
    reference = _epoch_losses(plain, raw)

    cached = _task(tmp_path, "stage.cache_vision_features=true", f"stage.feature_cache_memory={memory}", *settings)
    calls = TowerCalls(cached)
    first = _epoch_losses(cached, raw, epochs=1)
    assert calls.count == 2  # one tower run per batch, on the tiles of all its samples
    second = _epoch_losses(cached, raw, epochs=1)
    assert calls.count == 2  # the second epoch reads every feature from the cache
    assert first + second == reference  # exactly: the cache holds what the tower gave
    assert cached.feature_cache.hits == 6 and cached.feature_cache.misses == 6
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == (6 if memory == 0 else 0)


def test_a_batch_of_cached_and_new_samples_gets_each_samples_own_features(tmp_path):
    """A batch mixing samples read before (a resumed epoch, resampled shards) with new ones: the tower runs on the new
    ones alone, and every sample's features land at its own tiles, as the tower would give them."""
    raw = _raw_samples(5)
    mixed = [raw[1], raw[0], raw[3], raw[2], raw[4]]  # new, cached, new, cached, new: one and two images each
    # in training mode, as the trainer runs it: the frozen tower in eval mode, its BatchNorm by running statistics,
    # so a tile's features do not depend on the batch it came in
    reference = _epoch_losses(_task(tmp_path).train(), mixed, epochs=1)
    cached = _task(tmp_path, "stage.cache_vision_features=true").train()
    _epoch_losses(cached, [raw[0], raw[2]], epochs=1)
    calls = TowerCalls(cached)
    assert _epoch_losses(cached, mixed, epochs=1) == reference
    assert calls.count == 2 and (cached.feature_cache.hits, cached.feature_cache.misses) == (2, 5)


def test_a_sample_cut_to_fewer_images_than_cached_gets_its_own_features(tmp_path):
    """A run with a shorter model.llm.max_length keeps fewer of a sample's images (a cut never splits one): the
    cached features of all its tiles are not this sample's tiles, and the tower runs on the tiles it has."""
    two_images = _raw_samples(2)[1]
    task = _task(tmp_path, "stage.cache_vision_features=true").train()
    batch = task.batching().collate([task.batching().decode(two_images)])
    pixels, cache = batch["pixel_values"], task.feature_cache
    tiles = len(pixels)
    assert tiles >= 2
    cache.patch_features(["s"], pixels, [tiles])  # cached with all its tiles
    first = pixels[:tiles // 2]  # the same sample with its first image alone
    with torch.no_grad():
        assert torch.equal(cache.patch_features(["s"], first, [len(first)]), task.model.vision.patch_features(first))


def test_a_changed_tower_or_tiler_reads_fresh_features(tmp_path):
    raw = _raw_samples(3)
    settings = ["stage.cache_vision_features=true", "stage.feature_cache_memory=0"]
    task = _task(tmp_path, *settings)
    _epoch_losses(task, raw, epochs=1)
    assert len({p.parent for p in tmp_path.rglob("*.safetensors")}) == 1

    changed = _task(tmp_path, *settings)  # the same tower, but one weight differs
    with torch.no_grad():
        changed.model.vision.vit.blocks[0].mlp.fc1.bias.add_(1.0)
    calls = TowerCalls(changed)
    _epoch_losses(changed, raw, epochs=1)
    assert calls.count == 1 and changed.feature_cache.misses == 3

    retiled = _task(tmp_path, *settings, "tiler.thumbnail=false")  # the same tower, another tiler setting
    calls = TowerCalls(retiled)
    _epoch_losses(retiled, raw, epochs=1)
    assert calls.count == 1
    assert len({p.parent for p in tmp_path.rglob("*.safetensors")}) == 3  # one folder per tower + tiler


def test_features_computed_under_autocast_are_not_served_to_a_float32_run(tmp_path):
    shard = tmp_path / "shard-000.tar"
    shard.touch()  # a local file: its samples' features outlive the run that computed them
    raw = [{**sample, "__url__": str(shard)} for sample in _raw_samples(3)]
    settings = ["stage.cache_vision_features=true", "stage.feature_cache_memory=0"]
    _epoch_losses(_task(tmp_path / "cache", *settings), raw, epochs=1)
    again = _task(tmp_path / "cache", *settings)
    calls = TowerCalls(again)
    _epoch_losses(again, raw, epochs=1)
    assert calls.count == 0 and again.feature_cache.hits == 3  # a later float32 run reads them from the folder
    mixed = _task(tmp_path / "cache", *settings)  # a bf16-mixed run of the same tower
    calls = TowerCalls(mixed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _epoch_losses(mixed, raw, epochs=1)
    assert calls.count == 1 and mixed.feature_cache.misses == 3


@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
def test_a_rewritten_shard_or_another_shard_of_the_same_name_misses_the_cache(tmp_path, monkeypatch):
    """A sample's features belong to the shard file it came from: rewritten shards (same name, other pictures) and
    another project's shard of the same relative name must not get them."""
    settings = ["stage.cache_vision_features=true", "stage.feature_cache_memory=0"]
    for project in ("a", "b"):
        (tmp_path / project / "train").mkdir(parents=True)
        (tmp_path / project / "train" / "shard-000.tar").write_bytes(b"the pictures of " + project.encode())
    raw = [{**sample, "__url__": "train/shard-000.tar"} for sample in _raw_samples(3)]  # relative, as typed
    monkeypatch.chdir(tmp_path / "a")
    first = _task(tmp_path / "cache", *settings)
    _epoch_losses(first, raw, epochs=1)
    again = _task(tmp_path / "cache", *settings)
    _epoch_losses(again, raw, epochs=1)
    assert again.feature_cache.hits == 3  # the same file: its features are reused
    (tmp_path / "a" / "train" / "shard-000.tar").write_bytes(b"rewritten with other pictures")
    rewritten = _task(tmp_path / "cache", *settings)
    _epoch_losses(rewritten, raw, epochs=1)
    assert rewritten.feature_cache.hits == 0 and rewritten.feature_cache.misses == 3
    monkeypatch.chdir(tmp_path / "b")
    elsewhere = _task(tmp_path / "cache", *settings)
    _epoch_losses(elsewhere, raw, epochs=1)
    assert elsewhere.feature_cache.hits == 0



def test_a_shard_read_through_a_pipe_is_cached_for_its_run_only(tmp_path):
    """`pipe:` and URL shards have no size or time to tell a rewritten one by: a later run reads them again."""
    settings = ["stage.cache_vision_features=true", "stage.feature_cache_memory=0"]
    raw = [{**sample, "__url__": "pipe:aws s3 cp s3://bucket/shard-000.tar -"} for sample in _raw_samples(3)]
    first = _task(tmp_path / "cache", *settings)
    _epoch_losses(first, raw, epochs=2)
    assert (first.feature_cache.misses, first.feature_cache.hits) == (3, 3)  # the second epoch reuses them
    later = _task(tmp_path / "cache", *settings)
    _epoch_losses(later, raw, epochs=1)
    assert (later.feature_cache.misses, later.feature_cache.hits) == (3, 0)


def test_a_stage_that_trains_the_tower_runs_without_the_cache(tmp_path, caplog):
    """sft caches by default; a run that unfreezes the ViT must neither fail nor reuse stale features."""
    with caplog.at_level(logging.INFO, logger="vlm"):
        task = _task(tmp_path, "stage.cache_vision_features=true", "stage.train_vision=true")
    assert task.feature_cache is None
    assert "stage.cache_vision_features is off for this run" in caplog.text


@pytest.mark.slow
def test_packed_cached_training_counts_bad_samples_and_resumes(tmp_path, caplog):
    """sft with packing, the feature cache in a folder and length grouping: bad samples are skipped and counted, and
    resume=auto continues the run and the counts; the resumed process reads the features the first one wrote."""
    pattern, bad_keys = write_conversation_shards(tmp_path / "conv", good=16)
    args = [*COMMON, f"data.train='{pattern}'", "stage.batch_size=4", "data.shuffle_buffer=1", "init_from=null",
            f"output_root={tmp_path / 'runs'}", "run_name=packed", "data.packing=true", "data.length_group_batches=2",
            "trainer.checkpoint_every_n_steps=4", "stage.cache_vision_features=true", "stage.feature_cache_memory=0",
            f"stage.feature_cache_dir={tmp_path / 'features'}"]
    metrics, _ = train(tiny_config(*args, "stage.max_steps=4", stage="sft"))
    assert metrics["global_step"] == 4 and metrics["samples_skipped"] == len(bad_keys)
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "features").rglob("*.safetensors")}
    assert len(written) == 16  # one file per good sample

    metrics, _ = train(tiny_config(*args, "stage.max_steps=8", "resume=auto", stage="sft"))
    assert metrics["global_step"] == 8 and metrics["samples_seen"] == 2 * (16 + len(bad_keys))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "features").rglob("*.safetensors")} == written
