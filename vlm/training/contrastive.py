"""Phase 1: CLIP-style contrastive training, validated by zero-shot classification and image<->text retrieval."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch
from open_clip.tokenizer import SimpleTokenizer

from vlm.config import TrainConfig
from vlm.data.captions import CaptionDecoder, collate_captions
from vlm.data.shards import absolute_pattern
from vlm.data.sources import DataSources
from vlm.exports.clip import export_clip, load_clip
from vlm.metrics import class_embeddings, contrastive_metrics, contrastive_predictions, groups_of, retrieve
from vlm.models.clip import CLIPModel
from vlm.models.factory import make_tiler
from vlm.models.losses import build_contrastive_loss
from vlm.models.text import clip_tokenizer
from vlm.training.task import Batching, Stage, StageTask

log = logging.getLogger(__name__)


class HeldOutBatch(NamedTuple):
    """What validation keeps of a held-out batch: embeddings (N, E) float32 on the CPU, labels (N,), image
    fingerprints (N,), (key, caption)."""

    image: torch.Tensor
    text: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor
    samples: list[tuple[str, str]]


class ContrastiveTask(StageTask):
    EMBEDS = True

    def __init__(self, config: TrainConfig, stage: Stage, model: CLIPModel, tokenizer: SimpleTokenizer,
                 classnames: list[str] | None):
        super().__init__(config, stage, model)
        self.tokenizer = tokenizer
        self.classnames = classnames
        self.loss_fn = build_contrastive_loss(config.model.clip)
        self._val: list[tuple[int, HeldOutBatch]] = []  # this rank's held-out batches, with their batch indices
        self._classes: torch.Tensor | None = None  # (C, E) class embeddings for zero-shot top-1

    @classmethod
    def create(cls, config: TrainConfig, stage: Stage, init_from: Path | None,
               data: DataSources) -> ContrastiveTask:
        return cls(config, stage, CLIPModel(config.model), clip_tokenizer(config.model.text), data.classnames)

    @classmethod
    def from_export(cls, config: TrainConfig, stage: Stage, directory: Path,
                    data: DataSources) -> ContrastiveTask:
        clip = load_clip(directory)
        # the export's class names label its own held-out data; other labelled shards bring theirs (classnames.txt
        # beside them, or data.classnames), and without them are scored by retrieval alone
        own_data = data.val is not None and absolute_pattern(data.val) == clip.held_out
        classnames = data.classnames or (clip.classnames if own_data else None)
        return cls(config, stage, clip.model, clip.tokenizer, classnames)

    def setup(self, stage: str) -> None:
        # the loss gathers features across ranks, so it needs this process's place in the world
        self.loss_fn = build_contrastive_loss(self.config.model.clip, self.global_rank, self.trainer.world_size)

    def batching(self) -> Batching:
        tiler = make_tiler(self.config.tiler, self.model.visual)
        decode = CaptionDecoder(tiler, self.tokenizer)
        # held out, a label names one of the class names zero-shot scores against
        decode_val = CaptionDecoder(tiler, self.tokenizer, self.classnames, held_out=True)
        return Batching(decode, decode_val, collate_captions, self.config.stage.batch_size,
                        self.config.eval.batch_size)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.count_batch(len(batch["ids"]))
        outputs = self.model(batch["pixels"], batch["ids"])
        losses = self.loss_fn(**outputs, output_dict=True)
        loss = self.guarded(sum(losses.values()))
        if self.health.skip_pending:
            return loss
        # means over ranks: with local_loss each rank's term covers its own rows only
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, sync_dist=True)
        self.log("train/logit_scale", outputs["logit_scale"])
        self.health.log_to(self)
        return loss

    def on_train_batch_end(self, *args) -> None:
        self.model.clamp_logit_scale()

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val, self._classes = [], None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch_idx == 0 and self.classnames:  # in a step, so sharded (FSDP) weights are gathered as for a batch
            self._classes = class_embeddings(self.model, self.tokenizer, self.classnames, self.config.eval.templates,
                                             self.device).float().cpu()
        if not self.held_out_share.mine(batch_idx):
            return
        image = self.model.encode_image(batch["pixels"])
        text = self.model.encode_text(batch["ids"])
        self._val.append((batch_idx, HeldOutBatch(image.float().cpu(), text.float().cpu(), batch["labels"].cpu(),
                                                  batch["image_ids"].cpu(),
                                                  list(zip(batch["keys"], batch["captions"], strict=True)))))

    def on_validation_epoch_end(self) -> None:
        scored = self.held_out_share.merged(self._val)  # every rank's batches, on every rank
        self._val = []
        if not scored:
            return
        # eval.max_samples: retrieval ranks among exactly that many, not the whole last batch's worth
        image, text, labels, image_ids = (torch.cat([getattr(b, name) for b in scored])[:self.sample_limit]
                                          for name in ("image", "text", "labels", "image_ids"))
        keys, captions = zip(*[sample for b in scored for sample in b.samples][:len(image)], strict=True)
        classes = self._classes
        if classes is not None and not bool((labels >= 0).all()):
            log.warning("zero-shot top-1 scores the %d of %d held-out samples that have a class label ('cls')",
                        int((labels >= 0).sum()), len(labels))
        # read by the metrics and the per-sample rows alike; a sample's image with another's caption matches when the
        # two share the image (one image, several captions) or the caption's words
        retrieved = retrieve(image, text, groups_of(image_ids.tolist()), groups_of(captions))
        class_scores = image @ classes.T if classes is not None else None  # (N, C)
        metrics = contrastive_metrics(retrieved, labels, class_scores) | {"samples_scored": float(len(image))}
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=True, sync_dist=False, rank_zero_only=True)
        self.predictions = contrastive_predictions(retrieved, labels, class_scores, self.classnames, list(keys),
                                                   list(captions))
        self._classes = None

    def empty_model(self) -> CLIPModel:
        return CLIPModel(self.config.model)

    def write_export(self, directory: Path, model: CLIPModel) -> Path:
        return export_clip(directory, model, self.tokenizer, self.config.tiler, self.classnames,
                           list(self.config.eval.templates), self.export_settings())
