"""Phase 2 as a LightningModule: `align` (projector on captions) and `sft` (projector + LLM on conversations)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import zlib
from collections import defaultdict
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from vlm.config import TrainConfig, to_dict
from vlm.data.captions import image_fields, text_field
from vlm.data.processor import IGNORE_INDEX, SampleError, from_llava, pad_batch
from vlm.data.shards import collate_skipped
from vlm.data.synthetic import DESCRIBE_PROMPTS
from vlm.data.tokenizer import IMAGE_TOKEN
from vlm.export import read_meta
from vlm.lit.common import (
    DataHealth,
    apply_freezing,
    build_optimizer,
    keep_frozen_parts_in_eval,
    warmup_cosine,
    with_gathered_weights,
)
from vlm.lit.sharding import clip_gradients
from vlm.loading import VLMBundle, empty_vlm, export_vlm, load_vision_from_clip, load_vlm, new_vlm
from vlm.stages import trainable_parts

log = logging.getLogger(__name__)


def normalize_answer(text: str) -> str:
    """Exact match ignores case, surrounding space and a final full stop."""
    return text.strip().lower().rstrip(".").strip()


def first_exchange(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str] | None:
    """The messages before the first assistant reply, and that reply (what eval asks and expects)."""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            return messages[:i], message["content"]
    return None


class ConversationDecoder:
    """Raw shard sample -> encoded conversation (and, for eval, the first question as a prompt and its answer).

    Caption samples (an image + `txt`) become a one-turn "describe the image" conversation, so `align` reads the
    same shards as the contrastive stage.
    """

    def __init__(self, bundle: VLMBundle, evaluate: bool):
        self.processor = bundle.processor
        self.evaluate = evaluate

    def __call__(self, sample: dict) -> dict[str, Any]:
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        images = [sample[f] for f in image_fields(sample)]
        kind = None
        if "json" in sample:
            try:
                record = json.loads(sample["json"])
            except (ValueError, TypeError) as err:
                raise SampleError(f"{name}: malformed json ({err})") from None
            messages = from_llava(record.get("conversations"), name)
            kind = record.get("type")
        else:
            prompt = DESCRIBE_PROMPTS[zlib.crc32(str(sample.get("__key__")).encode()) % len(DESCRIBE_PROMPTS)]
            messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}"},
                        {"role": "assistant", "content": text_field(sample, "txt")}]
        out: dict[str, Any] = {"encoded": self.processor.encode(messages, images, name)}
        if self.evaluate and kind is not None:
            question, answer = first_exchange(messages)  # encode() checked there is an assistant turn
            used = sum(m["content"].count(IMAGE_TOKEN) for m in question)
            out.update(prompt=self.processor.prompt(question, images[:used], name), answer=answer, type=kind)
        return out


class VLMTask(pl.LightningModule):
    def __init__(self, config: TrainConfig, bundle: VLMBundle):
        super().__init__()
        self.config = config
        self.bundle = bundle
        self.model = bundle.model
        self.health = DataHealth(config.data.max_skip_rate, config.trainer.max_nonfinite_steps)
        self.parameter_counts = apply_freezing(self.model.parts(), trainable_parts(config.stage))
        self._answers: dict[str, list[bool]] = defaultdict(list)

    def train(self, mode: bool = True) -> VLMTask:
        super().train(mode)
        if mode:
            keep_frozen_parts_in_eval(self.model.parts(), trainable_parts(self.config.stage))
        return self

    @classmethod
    def create(cls, config: TrainConfig, init_from: Path | None = None) -> VLMTask:
        meta = read_meta(init_from) if init_from else None
        if meta is not None and meta["stage"] in ("align", "sft"):
            bundle = load_vlm(init_from, tiler=config.tiler,
                              gradient_checkpointing=config.model.llm.gradient_checkpointing)
            bundle.model.vision.vit.set_grad_checkpointing(config.model.vision.gradient_checkpointing)
        else:
            bundle = new_vlm(config.model, config.tiler)
            if meta is not None:
                load_vision_from_clip(bundle.model.vision, init_from)
        log.info("image tokens per tile: %d; tiles per image: at most %d", bundle.model.tokens_per_tile,
                 config.tiler.max_tiles + (1 if config.tiler.max_tiles > 1 and config.tiler.thumbnail else 0))
        return cls(config, bundle)

    def decoder(self, kind: str, evaluate: bool = False) -> ConversationDecoder:
        return ConversationDecoder(self.bundle, evaluate)

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
        loss = self.health.guard(out.loss, self.global_step, self)
        if self.health.skip_pending:
            return loss
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/tokens", (batch["labels"] != IGNORE_INDEX).sum().float(), reduce_fx="sum")
        self.health.log_to(self)
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.health.drop_skipped_gradients(optimizer)

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

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model.parts(), self.config.stage)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": warmup_cosine(optimizer, self.config.stage), "interval": "step"}}

    def export(self, directory: Path, gathered: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the export folder from this model, or from `gathered` weights (a sharded run's full state dict)."""
        bundle = self.bundle
        if gathered is not None:
            fresh = empty_vlm(self.model.config, self.model.lm.config, self.model.image_token_id)
            bundle = dataclasses.replace(bundle, model=with_gathered_weights(fresh, gathered))
        return export_vlm(directory, bundle, self.config.stage.name, self.config.tiler,
                          {"templates": None, "train_config": to_dict(self.config.stage)})


def eager_decoding() -> AbstractContextManager:
    """Compiled code runs eagerly inside (torch >= 2.6; older versions recompile, with warnings)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def exact_match_metrics(answers: dict[str, list[bool]]) -> dict[str, float]:
    """{type: [correct?]} -> overall and per-type exact match."""
    every = [hit for hits in answers.values() for hit in hits]
    metrics = {"exact_match": sum(every) / len(every)}
    metrics.update({f"exact_match/{kind}": sum(hits) / len(hits) for kind, hits in sorted(answers.items())})
    return metrics
