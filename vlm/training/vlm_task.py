"""Phase 2: `align` (the projector on captions) and `sft` (projector + LLM on conversations), one task for both."""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from vlm.config import TrainConfig, to_dict
from vlm.data.conversations import ConversationDecoder
from vlm.data.processor import IGNORE_INDEX, pad_batch
from vlm.data.shards import collate_skipped
from vlm.data.sources import DataSources
from vlm.exports.clip import load_vision_from_clip
from vlm.exports.format import read_meta
from vlm.exports.vlm import export_vlm, load_vlm
from vlm.metrics import exact_match_metrics, normalize_answer
from vlm.models.factory import VLMBundle, empty_vlm, new_vlm
from vlm.models.vlm import VisionLanguageModel
from vlm.training.task import Batching, Stage, StageTask

log = logging.getLogger(__name__)


class VLMTask(StageTask):
    def __init__(self, config: TrainConfig, stage: Stage, bundle: VLMBundle):
        super().__init__(config, stage, bundle.model)
        self.bundle = bundle
        self._answers: dict[str, list[bool]] = defaultdict(list)

    @classmethod
    def create(cls, config: TrainConfig, stage: Stage, init_from: Path | None, data: DataSources) -> VLMTask:
        """From a phase 2 export (align -> sft), or a new VLM whose ViT comes from a contrastive export."""
        meta = read_meta(init_from) if init_from else None
        if meta is not None and meta.llm_config is not None:
            bundle = load_vlm(init_from, tiler=config.tiler,
                              gradient_checkpointing=config.model.llm.gradient_checkpointing)
            bundle.model.vision.vit.set_grad_checkpointing(config.model.vision.gradient_checkpointing)
        else:
            bundle = new_vlm(config.model, config.tiler)
            if meta is not None:
                load_vision_from_clip(bundle.model.vision, init_from)
        log.info("image tokens per tile: %d; tiles per image: at most %d", bundle.model.tokens_per_tile,
                 config.tiler.max_tiles + (1 if config.tiler.max_tiles > 1 and config.tiler.thumbnail else 0))
        return cls(config, stage, bundle)

    @classmethod
    def from_export(cls, config: TrainConfig, stage: Stage, directory: Path, data: DataSources) -> VLMTask:
        return cls(config, stage, load_vlm(directory, tiler=config.tiler))

    def batching(self) -> Batching:
        processor = self.bundle.processor
        return Batching(ConversationDecoder(processor, evaluate=False), ConversationDecoder(processor, evaluate=True),
                        self.collate, self.config.stage.batch_size, self.config.eval.batch_size)

    def collate(self, samples: list[dict]) -> dict[str, Any]:
        skipped = collate_skipped(samples)
        pad = self.bundle.tokenizer.pad_token_id
        batch = pad_batch([s["encoded"] for s in samples], pad)
        batch["skipped"] = skipped
        if samples and "prompt" in samples[0]:
            batch["prompt"] = pad_batch([s["prompt"] for s in samples], pad, left=True)
            batch["answers"] = [s["answer"] for s in samples]
            batch["types"] = [s["type"] for s in samples]
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.health.count_batch(len(batch["input_ids"]), batch["skipped"])
        out = self.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
                         batch["image_slots"])
        loss = self.guarded(out.loss)
        if self.health.skip_pending:
            return loss
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/tokens", (batch["labels"] != IGNORE_INDEX).sum().float(), reduce_fx="sum")
        self.health.log_to(self)
        return out.loss

    def on_validation_epoch_start(self) -> None:
        self._answers = defaultdict(list)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
                         batch["image_slots"])
        self.log("val/loss", out.loss, batch_size=len(batch["input_ids"]), sync_dist=False, rank_zero_only=True)
        if "prompt" not in batch:
            return
        for predicted, answer, kind in zip(self.answer(batch["prompt"]), batch["answers"], batch["types"],
                                           strict=True):
            self._answers[kind].append(normalize_answer(predicted) == normalize_answer(answer))

    def answer(self, prompt: dict[str, torch.Tensor], max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers for a left-padded prompt batch."""
        tokenizer = self.bundle.tokenizer
        # blocks compiled for training (trainer.compile) decode eagerly: every new KV-cache length would recompile them
        with eager_decoding():
            new = self.model.generate(prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"],
                                      prompt["image_slots"],
                                      max_new_tokens=max_new_tokens or self.config.eval.max_new_tokens,
                                      do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(new, skip_special_tokens=True)

    def on_validation_epoch_end(self) -> None:
        if not self._answers:
            return
        metrics = exact_match_metrics(self._answers)
        overall = metrics.pop("exact_match")
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False, rank_zero_only=True)
        self.log("val/exact_match", overall, prog_bar=True, sync_dist=False, rank_zero_only=True)

    def empty_model(self) -> VisionLanguageModel:
        return empty_vlm(self.model.config, self.model.lm.config, self.model.image_token_id)

    def write_export(self, directory: Path, model: VisionLanguageModel) -> Path:
        bundle = VLMBundle(model, self.bundle.tokenizer, self.bundle.processor)
        return export_vlm(directory, bundle, self.stage.name, self.config.tiler, to_dict(self.config.stage))


def eager_decoding() -> AbstractContextManager:
    """Compiled code runs eagerly inside (torch >= 2.6; older versions recompile, with warnings)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
