"""Phase 1 as a LightningModule: CLIP-style contrastive training with zero-shot and retrieval validation."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from vlm.config import TrainConfig, to_dict
from vlm.data.captions import CaptionDecoder, collate_captions
from vlm.export import write_export
from vlm.lit.common import DataHealth, apply_freezing, build_optimizer, warmup_cosine, with_gathered_weights
from vlm.lit.sharding import clip_gradients
from vlm.loading import make_tiler
from vlm.models.clip import CLIPModel
from vlm.models.losses import build_contrastive_loss
from vlm.models.text import clip_tokenizer, save_clip_tokenizer
from vlm.stages import trainable_parts
from vlm.zero_shot import class_embeddings, contrastive_metrics


class ContrastiveTask(pl.LightningModule):
    def __init__(self, config: TrainConfig, tokenizer, classnames: list[str] | None = None,
                 model: CLIPModel | None = None):
        super().__init__()
        self.config = config
        self.model = model or CLIPModel(config.model)
        self.tokenizer = tokenizer
        self.classnames = classnames
        self.loss_fn = build_contrastive_loss(config.model.clip)
        self.health = DataHealth(config.data.max_skip_rate, config.trainer.max_nonfinite_steps)
        self.parameter_counts = apply_freezing(self.model.parts(), trainable_parts(config.stage))
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._classes: torch.Tensor | None = None  # (C, E) class embeddings for zero-shot top-1

    def setup(self, stage: str) -> None:
        # the loss gathers features across ranks, so it needs this process's place in the world
        self.loss_fn = build_contrastive_loss(self.config.model.clip, self.global_rank, self.trainer.world_size)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.health.count_batch(len(batch["ids"]), batch["skipped"])
        outputs = self.model(batch["pixels"], batch["ids"])
        losses = self.loss_fn(**outputs, output_dict=True)
        loss = self.health.guard(sum(losses.values()), self.global_step, self)
        if self.health.skip_pending:
            return loss
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True)
        self.log("train/logit_scale", outputs["logit_scale"])
        self.health.log_to(self)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.health.drop_skipped_gradients(optimizer)

    def on_train_batch_end(self, *args) -> None:
        self.model.clamp_logit_scale()

    def on_validation_epoch_start(self) -> None:
        self._val, self._classes = [], None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch_idx == 0 and self.classnames:  # in a step, so sharded (FSDP) weights are gathered as for a batch
            self._classes = class_embeddings(self.model, self.tokenizer, self.classnames, self.config.eval.templates,
                                             self.device).float().cpu()
        image = self.model.encode_image(batch["pixels"])
        text = self.model.encode_text(batch["ids"])
        self._val.append((image.float().cpu(), text.float().cpu(), batch["labels"].cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        image, text, labels = (torch.cat(parts) for parts in zip(*self._val, strict=True))
        classes = self._classes if bool((labels >= 0).all()) else None
        metrics = contrastive_metrics(image, text, labels, classes)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=True, sync_dist=False, rank_zero_only=True)
        self._val, self._classes = [], None

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model.parts(), self.config.stage)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": warmup_cosine(optimizer, self.config.stage), "interval": "step"}}

    # ---- construction, data and export: what vlm.lit.build and vlm.eval call ----

    @classmethod
    def create(cls, config: TrainConfig, classnames: list[str] | None, init_from=None) -> ContrastiveTask:
        if init_from is not None:
            raise ValueError("the contrastive stage starts from fresh (or timm/open_clip pretrained) weights; "
                             "use resume=auto to continue a run")
        return cls(config, clip_tokenizer(config.model.text), classnames)

    def decoder(self, kind: str, evaluate: bool = False) -> CaptionDecoder:
        return CaptionDecoder(make_tiler(self.config.tiler, self.model.visual), self.tokenizer)

    collate = staticmethod(collate_captions)

    def export(self, directory: Path, gathered: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the export folder from this model, or from `gathered` weights (a sharded run's full state dict)."""
        model = self.model if gathered is None else with_gathered_weights(CLIPModel(self.config.model), gathered)
        meta = {"stage": "contrastive", "model": to_dict(self.config.model), "tiler": to_dict(self.config.tiler),
                "classnames": self.classnames, "templates": list(self.config.eval.templates)}
        return write_export(directory, model, meta, lambda path: save_clip_tokenizer(self.tokenizer, path))
