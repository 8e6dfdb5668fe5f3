"""webdataset pipelines: split by node and worker, bad samples skipped and counted, clear shard errors."""

from __future__ import annotations

import logging
import re
import threading

import pytest
import torch
import webdataset as wds
from images import solid
from tiny import make_task, tiny_config

from vlm.config import ConfigError, TilerConfig
from vlm.data.captions import CaptionDecoder, collate_captions, text_field
from vlm.data.shard_writer import ShardSplitWriter
from vlm.data.shards import (
    ShardError,
    SkipCount,
    SkipSample,
    build_pipeline,
    list_shards,
    make_loader,
    reader_plan,
)
from vlm.data.sources import DataSources, read_classnames, resolve
from vlm.data.tiler import Tiler
from vlm.training.datamodule import ShardDataModule
from vlm.training.health import DataHealth


def write_shards(directory, num_shards: int, per_shard: int, corrupt: set[int] = frozenset()) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    index = 0
    for shard in range(num_shards):
        with wds.TarWriter(str(directory / f"shard-{shard:03d}.tar")) as sink:
            for _ in range(per_shard):
                image = b"\x89PNG not really" if index in corrupt else solid("red", size=(16, 16))
                sink.write({"__key__": f"{index:05d}", "png": image, "txt": f"sample {index}", "cls": "0"})
                index += 1
    return str(directory / f"shard-{{000..{num_shards - 1:03d}}}.tar")


def _keys(sample: dict) -> dict:
    return {"key": sample["__key__"]}


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world_size: int = 2) -> None:
    """Make webdataset's node split see this process as `rank` of `world_size` (its RANK / WORLD_SIZE reading)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


def test_every_sample_once_over_two_ranks_and_two_workers(tmp_path, monkeypatch):
    urls = list_shards(write_shards(tmp_path, num_shards=8, per_shard=5))
    seen = []
    for rank in range(2):
        _as_rank(monkeypatch, rank)
        pipeline = build_pipeline(urls, _keys, train=True, shuffle_buffer=10, seed=1)
        loader = make_loader(pipeline, batch_size=3, num_workers=2, drop_last=False,
                             collate=lambda samples: [s["key"] for s in samples])
        rank_keys = [key for batch in loader for key in batch]
        assert len(rank_keys) == 20  # half the samples on each rank
        seen += rank_keys
    assert sorted(seen) == [f"{i:05d}" for i in range(40)]  # no duplicates, none missing


@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
@pytest.mark.parametrize("workers", [0, 2])
def test_a_runs_train_loaders_on_two_ranks_read_every_sample_once_and_its_val_loaders_all(tmp_path, monkeypatch,
                                                                                         workers):
    """The loaders a run builds: each rank trains on its own shards (together every sample, none twice in a pass),
    while every rank steps through the whole held-out set, whose batches the ranks then share."""
    pattern = write_shards(tmp_path, num_shards=8, per_shard=2)
    config = tiny_config(f"data.num_workers={workers}", "data.shuffle_buffer=8", "stage.batch_size=2")
    batching = make_task(config).batching()
    trained, validated = [], []
    for rank in range(2):
        _as_rank(monkeypatch, rank)
        data = ShardDataModule(DataSources(train=pattern, val=pattern, classnames=None), batching, config.data, seed=3)
        trained.append(sorted(key.rsplit(":", 1)[1] for batch in data.train_dataloader() for key in batch["keys"]))
        validated.append([key for batch in data.val_dataloader() for key in batch["keys"]])
    assert len(trained[0]) == len(trained[1]) == 8
    assert sorted(trained[0] + trained[1]) == [f"{i:05d}" for i in range(16)]
    assert validated[0] == validated[1] and len(validated[0]) == 16


def test_resampled_readers_of_one_shard_each_draw_their_own_order(tmp_path, monkeypatch):
    """Drawn with replacement, two ranks read the same shard: their batches must not be copies of each other."""
    urls = list_shards(write_shards(tmp_path, num_shards=1, per_shard=40))
    orders = []
    for rank in range(2):
        _as_rank(monkeypatch, rank)
        samples = iter(build_pipeline(urls, _keys, train=True, resampled=True, shuffle_buffer=40, seed=1))
        orders.append([next(samples)["key"] for _ in range(20)])
    assert orders[0] != orders[1] and sorted(orders[0]) != sorted(orders[1])
    again = iter(build_pipeline(urls, _keys, train=True, resampled=True, shuffle_buffer=40, seed=1))
    assert [next(again)["key"] for _ in range(20)] == orders[1]  # still seeded: rank 1's own order again


def test_a_pipeline_seeded_one_higher_reads_the_next_pass_in_the_same_order(tmp_path):
    """A run resumed at an epoch's start builds its pipeline with seed + 1 (vlm.training.data_position): its first
    pass must read the samples as the uninterrupted run's second pass does."""
    urls = list_shards(write_shards(tmp_path, num_shards=4, per_shard=10))
    uninterrupted = build_pipeline(urls, _keys, train=True, shuffle_buffer=20, seed=5)
    list(uninterrupted)  # the first pass
    second = [s["key"] for s in uninterrupted]
    resumed = [s["key"] for s in build_pipeline(urls, _keys, train=True, shuffle_buffer=20, seed=6)]
    assert second == resumed and second != sorted(second)


def test_resampled_shards_that_never_read_stop_the_reader_naming_one(tmp_path):
    for name in ("a.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"not a tar file at all" * 100)
    urls = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    raised = []

    def first_sample() -> None:
        try:
            next(iter(build_pipeline(urls, _keys, train=True, resampled=True, seed=1)))
        except ShardError as err:
            raised.append(str(err))

    reader = threading.Thread(target=first_sample, daemon=True)  # without the guard it would draw forever
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive() and len(raised) == 1
    assert re.match(r"12 shards drawn in a row could not be read \(the last: .*\.tar\), with no sample between "
                    r"them; with data.resampled=true", raised[0])


def test_too_few_shards_for_the_ranks_names_numbers_and_fix(caplog):
    with pytest.raises(ShardError, match="has 2 shards for 4 ranks.*data.resampled=true"):
        reader_plan(num_shards=2, num_workers=2, world_size=4, pattern="s-{0..1}.tar", resampled=False)
    with caplog.at_level(logging.WARNING):
        assert reader_plan(num_shards=3, num_workers=2, world_size=2, pattern="p", resampled=False) == 1
    assert "3 shards for 2 ranks x 2 workers = 4 readers" in caplog.text
    # 3 shards for 2 ranks: one rank's pass is half the other's
    assert "'p' has 3 shards for 2 ranks: some ranks read 2 and others 1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert reader_plan(num_shards=4, num_workers=2, world_size=2, pattern="p", resampled=False) == 2
    assert not caplog.records
    assert reader_plan(num_shards=1, num_workers=4, world_size=8, pattern="p", resampled=True) == 4


def test_resampled_mode_never_ends(tmp_path):
    urls = list_shards(write_shards(tmp_path, num_shards=2, per_shard=3))
    pipeline = build_pipeline(urls, _keys, train=True, resampled=True, shuffle_buffer=1)
    stream = iter(pipeline)
    assert len([next(stream) for _ in range(50)]) == 50


def test_missing_shards_name_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing-{000..004}.tar")
    with pytest.raises(ShardError, match=r"data.val='.*nothing-\{000..004\}.tar' matches no shard file"):
        list_shards(pattern, "data.val")
    write_shards(tmp_path, 1, 1)
    with pytest.raises(ShardError, match="1 of 2 shards are missing"):
        list_shards(str(tmp_path / "shard-{000..001}.tar"))
    with pytest.raises(ShardError, match=r"shard-\{000..001.tar' is not a valid shard pattern \(Unbalanced braces"):
        list_shards(str(tmp_path / "shard-{000..001.tar"))


def test_a_folder_given_for_shards_gets_the_pattern_of_the_shards_inside(tmp_path):
    write_shards(tmp_path / "out" / "train", num_shards=3, per_shard=1)
    for folder in (tmp_path / "out", tmp_path / "out" / "train"):
        with pytest.raises(ShardError, match=rf"'{folder}' is a folder; name its shards, e.g. data.train="
                                             rf"'{tmp_path / 'out' / 'train'}/shard-\{{000..002\}}.tar'"):
            list_shards(str(folder))
    (tmp_path / "empty").mkdir()  # no shards to point at: no made-up pattern inside it either
    with pytest.raises(ShardError, match=rf"'{tmp_path / 'empty'}' is a folder with no .tar shard in it \(nor in a "
                                         rf"train/ folder inside\); name shard files"):
        list_shards(str(tmp_path / "empty"))


def test_corrupt_images_are_skipped_counted_and_logged(tmp_path, caplog):
    urls = list_shards(write_shards(tmp_path, num_shards=2, per_shard=10, corrupt={3, 14}))
    tiler = Tiler(TilerConfig(), tile_size=16, tokens_per_tile=4)
    decode = CaptionDecoder(tiler, lambda texts: torch.zeros(len(texts), 8, dtype=torch.long))
    skips = SkipCount()
    pipeline = build_pipeline(urls, decode, train=False, skips=skips)
    with caplog.at_level(logging.WARNING):
        batches = list(make_loader(pipeline, batch_size=4, num_workers=0, collate=collate_captions, drop_last=False))
    assert sum(len(b["ids"]) for b in batches) == 18 and skips.total() == 2
    assert "00003" in caplog.text and "00014" in caplog.text and "shard-001.tar" in caplog.text
    health = DataHealth(max_skip_rate=0.05, max_nonfinite_steps=3, min_samples=20)
    with pytest.raises(RuntimeError, match=r"2 of 20 samples \(10.0%\) could not be decoded"):
        health.count_batch(18, skips.take_new())
    lenient = DataHealth(max_skip_rate=0.2, max_nonfinite_steps=3, min_samples=10)
    lenient.count_batch(18, 2)
    assert lenient.skipped == 2 and lenient.seen == 20 and skips.take_new() == 0  # taken once


@pytest.mark.parametrize("workers", [0, 2])
def test_skips_are_counted_where_no_usable_sample_follows_them(tmp_path, caplog, workers):
    """A reader's last samples, and every sample of a worker whose shard holds nothing usable, count as skipped, in
    the DataLoader's workers too: the skip-rate guard must see a wholly bad shard. Each is named once, on its first
    pass: later passes count it without a line."""
    urls = list_shards(write_shards(tmp_path, num_shards=2, per_shard=5, corrupt={3, 4, *range(5, 10)}))
    decode = CaptionDecoder(Tiler(TilerConfig(), tile_size=16, tokens_per_tile=4), lambda t: torch.zeros(len(t), 8))
    skips = SkipCount(workers)
    loader = make_loader(build_pipeline(urls, decode, train=False, split_by_node=False, skips=skips), batch_size=1,
                         num_workers=workers, collate=collate_captions, drop_last=False)
    with caplog.at_level(logging.WARNING, logger="vlm.data.shards"):
        for epoch in (1, 2):  # two passes, as two epochs: each adds its own
            keys = [key.rsplit(":", 1)[1] for batch in loader for key in batch["keys"]]
            assert sorted(keys) == ["00000", "00001", "00002"] and skips.total() == 7 * epoch
    if not workers:  # what a worker process logs does not reach caplog
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping sample")]
        named = sorted(line.split()[2] for line in lines)
        assert named == [f"{i:05d}" for i in range(3, 10)]


def test_training_shards_without_held_out_ones_warn_that_nothing_is_measured(tmp_path, caplog):
    pattern = write_shards(tmp_path, num_shards=1, per_shard=1)
    with caplog.at_level(logging.WARNING):
        sources = resolve(tiny_config(f"data.train='{pattern}'").data, "captions")
    assert sources.val is None and "data.train is set and data.val is not: nothing is held out" in caplog.text


def test_a_shard_that_is_not_a_tar_is_named_once_and_the_others_are_read(tmp_path, caplog):
    pattern = write_shards(tmp_path, 2, 3)
    (tmp_path / "shard-001.tar").write_bytes(bytes(range(256)) * 20)  # garbage under a shard's name
    pipeline = build_pipeline(list_shards(pattern), lambda s: s, train=False, split_by_node=False)
    with caplog.at_level(logging.WARNING, logger="vlm.data.shards"):
        for _ in range(2):  # two passes, as two epochs
            assert [s["__key__"] for s in pipeline] == ["00000", "00001", "00002"]
    warnings = [r.getMessage() for r in caplog.records if "cannot be read as a tar file" in r.getMessage()]
    assert warnings == [f"skipping the rest of {tmp_path / 'shard-001.tar'}: it cannot be read as a tar file "
                        f"(ReadError: invalid header); its samples from there on are not read"]


def test_skip_warnings_stop_at_a_hundred_per_reader_and_the_rest_are_counted(tmp_path, caplog):
    from vlm.data.shards import MAX_SKIP_WARNINGS

    bad = MAX_SKIP_WARNINGS + 20
    pattern = write_shards(tmp_path, 1, bad + 1, corrupt=set(range(bad)))  # the last sample alone decodes
    decode = CaptionDecoder(Tiler(TilerConfig(max_tiles=1), tile_size=16, tokens_per_tile=1), lambda t: torch.zeros(1))
    skips = SkipCount()
    pipeline = build_pipeline(list_shards(pattern), decode, train=False, split_by_node=False, skips=skips)
    with caplog.at_level(logging.WARNING, logger="vlm.data.shards"):
        (only,) = list(pipeline)
    assert skips.total() == bad  # every skip counted
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == MAX_SKIP_WARNINGS + 1 and lines[-1].startswith(f"{MAX_SKIP_WARNINGS} samples skipped")


def test_a_caption_that_is_not_utf8_is_skipped_naming_its_field():
    with pytest.raises(SkipSample, match=r"^the 'txt' field is not UTF-8 text \(invalid start byte at byte 2\)$"):
        text_field({"txt": b"a \xff cat"}, "txt")


def test_a_conversation_sample_given_to_the_contrastive_stage_says_which_stages_read_it():
    decode = CaptionDecoder(Tiler(TilerConfig(), tile_size=16, tokens_per_tile=4), lambda texts: torch.zeros(1, 8))
    with pytest.raises(SkipSample, match=r"^no 'txt' caption: it holds a conversation \('json'\), which stage=align"):
        decode({"__key__": "k", "json": b"{}", "0.png": solid()})


@pytest.mark.slow  # starts a DataLoader worker process
def test_a_shard_error_raised_in_a_loader_worker_is_one_clean_line(tmp_path, capsys):
    """PyTorch wraps a worker's exception in its traceback; the user sees the message alone, exit code 2."""
    from vlm.cli import user_errors

    (tmp_path / "a.tar").write_bytes(b"not a tar file at all" * 100)
    loader = make_loader(build_pipeline([str(tmp_path / "a.tar")], _keys, train=True, resampled=True, seed=1),
                         batch_size=2, num_workers=1, drop_last=False, collate=list)
    with pytest.raises(SystemExit) as stop, user_errors():
        next(iter(loader))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: 10 shards drawn in a row could not be read") and "Traceback" not in lines[-1]
    assert not any("Original Traceback" in line for line in lines)


def test_an_interrupted_split_leaves_only_whole_shards_under_the_pattern(tmp_path):
    """Ctrl-C while a shard is being written: the whole shards keep their names, the cut one stays *.partial, and the
    pattern reads back exactly the samples of the whole ones."""
    with pytest.raises(KeyboardInterrupt), ShardSplitWriter(tmp_path / "train", samples_per_shard=2) as writer:
        for i in range(5):
            writer.write({"__key__": f"{i:03d}", "txt": f"sample {i}"})
        raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar.partial"]
    keys = [sample["__key__"] for sample in wds.WebDataset(writer.pattern(), shardshuffle=False)]
    assert keys == ["000", "001", "002", "003"]
    with ShardSplitWriter(tmp_path / "val", samples_per_shard=2) as finished:
        finished.write({"__key__": "000", "txt": "only"})
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["shard-000000.tar"]
    assert not ShardSplitWriter(tmp_path / "empty", 2).shards() and not (tmp_path / "empty").exists()


def test_the_contrastive_stage_refuses_a_tiler_of_several_tiles_naming_the_key():
    tiler = Tiler(TilerConfig(max_tiles=4), tile_size=16, tokens_per_tile=4)
    with pytest.raises(ConfigError, match=r"^tiler.max_tiles=4: the contrastive stage encodes one tile per image"):
        CaptionDecoder(tiler, lambda t: torch.zeros(len(t), 8))


def test_class_names_without_shards_of_ones_own_are_refused_naming_the_key(tmp_path):
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    with pytest.raises(ConfigError, match=r"data.classnames='.*names.txt' names the classes of your own held-out "
                                          r"shards, and none are given"):
        resolve(tiny_config(f"data.classnames={tmp_path / 'names.txt'}").data, "captions")


def test_class_names_saved_with_a_byte_order_mark_read_as_typed(tmp_path):
    names = tmp_path / "classnames.txt"
    names.write_text("cat\ndog\n", encoding="utf-8-sig")  # Notepad's and Excel's UTF-8
    assert read_classnames(names) == ["cat", "dog"]
