"""The shard DataModule: one per run, the same for every stage; the stage's task supplies decoding and collation."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from vlm.config import ConfigError, DataConfig
from vlm.data.packing import LengthGrouping
from vlm.data.shards import SkipCount, build_pipeline, list_shards, make_loader, reader_plan
from vlm.data.sources import DataSources
from vlm.training.task import Batching

log = logging.getLogger(__name__)


class ShardDataModule(pl.LightningDataModule):
    def __init__(self, data: DataSources, batching: Batching, config: DataConfig, seed: int = 0):
        super().__init__()
        self.batching = batching
        self.config, self.seed = config, seed  # DataPosition reseeds a resumed run through `seed`
        self.train_pattern = data.train
        self.train_urls = list_shards(data.train, "data.train") if data.train else []  # eval reads val only
        self.val_urls = list_shards(data.val, "data.val") if data.val else []
        self.train_skips: SkipCount | None = None  # made with the train loader, for its number of workers
        if self.train_urls:  # at start-up, before any rank builds a model
            self._check_length_grouping()

    def _check_length_grouping(self) -> None:
        # data.packing is read by the stages that pack (align, sft) and left alone by the others
        if self.batching.length is None and self.config.length_group_batches:
            raise ConfigError("data.length_group_batches applies to phase 2 stages (align, sft), whose samples differ "
                              "in length; set it to 0 for this stage")
        if self.config.length_group_batches and self.config.packing:
            log.warning("data.length_group_batches=%d with data.packing=true: packed rows pad little already, so "
                        "grouping by length saves no padding here; it only changes which samples share a step "
                        "(set data.length_group_batches=0, or data.packing=false to pad instead)",
                        self.config.length_group_batches)

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        workers = reader_plan(len(self.train_urls), self.config.num_workers, world, self.train_pattern,
                              self.config.resampled)
        self.train_skips = SkipCount(workers)  # read by the task at each batch (data.max_skip_rate)
        pipeline = build_pipeline(self.train_urls, self.batching.decode, train=True, resampled=self.config.resampled,
                                  shuffle_buffer=self.config.shuffle_buffer, seed=self.seed, skips=self.train_skips)
        if self.config.length_group_batches:
            pipeline.append(LengthGrouping(self.config.length_group_batches, self.batching.batch_size,
                                            self.batching.length, self.seed))
        return make_loader(pipeline, self.batching.batch_size, workers, self.batching.collate, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        # unsplit: every rank steps through the same batches and scores its share of them (see HeldOutShare)
        pipeline = build_pipeline(self.val_urls, self.batching.val_decode, train=False, split_by_node=False)
        workers = min(self.config.num_workers, len(self.val_urls))
        collate = self.batching.val_collate or self.batching.collate
        return make_loader(pipeline, self.batching.eval_batch_size, workers, collate, drop_last=False)
