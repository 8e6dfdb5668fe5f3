"""The shard DataModule: one per run, the same for every stage; the stage supplies decode and collate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from vlm.config import DataConfig
from vlm.data.shards import build_pipeline, list_shards, make_loader, reader_plan


class ShardDataModule(pl.LightningDataModule):
    def __init__(self, train: str | None, val: str | None, decode: Callable[[dict], dict],
                 collate: Callable[[list[dict]], dict[str, Any]], batch_size: int, eval_batch_size: int,
                 config: DataConfig, seed: int = 0, val_decode: Callable[[dict], dict] | None = None):
        super().__init__()
        self.train_pattern, self.val_pattern = train, val
        self.decode, self.collate = decode, collate
        self.val_decode = val_decode or decode
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.config, self.seed = config, seed
        self.train_urls = list_shards(train, "data.train") if train else []  # eval reads val only
        self.val_urls = list_shards(val, "data.val") if val else []

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        workers = reader_plan(len(self.train_urls), self.config.num_workers, world, self.train_pattern,
                              self.config.resampled)
        pipeline = build_pipeline(self.train_urls, self.decode, train=True, resampled=self.config.resampled,
                                  shuffle_buffer=self.config.shuffle_buffer, seed=self.seed)
        return make_loader(pipeline, self.batch_size, workers, self.collate, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        # every rank scores the whole held-out split, so metrics need no cross-rank reduction
        pipeline = build_pipeline(self.val_urls, self.val_decode, train=False, split_by_node=False)
        workers = min(self.config.num_workers, len(self.val_urls))
        return make_loader(pipeline, self.eval_batch_size, workers, self.collate, drop_last=False)
