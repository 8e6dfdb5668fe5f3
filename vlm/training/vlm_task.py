"""Phase 2: `align` (the projector on captions) and `sft` (projector + LLM on conversations), one task for both."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlm.cli import command_line_keys
from vlm.config import ModelConfig, TrainConfig, load_config, model_config_from, to_dict
from vlm.data.conversations import ConversationDecoder, ScoredTurn
from vlm.data.packing import ConversationCollator
from vlm.data.processor import IGNORE_INDEX, pad_batch
from vlm.data.sources import DataSources
from vlm.exports.clip import load_vision_from_clip
from vlm.exports.format import ExportMeta, read_meta
from vlm.exports.vlm import export_vlm, load_vlm
from vlm.generation.kv_cache import cache_kwargs
from vlm.generation.stopping import answer_texts, turn_end_ids
from vlm.metrics import answer_metrics, score_answer
from vlm.models.factory import VLMBundle, empty_vlm, new_vlm, set_attention
from vlm.models.feature_cache import VisionFeatureCache
from vlm.models.llm import learned_positions
from vlm.models.losses import answer_logprobs
from vlm.models.packing import attention_break_even, keeps_samples_apart
from vlm.models.vlm import VisionLanguageModel
from vlm.training.held_out import SampleLimit
from vlm.training.task import Batching, Stage, StageTask

log = logging.getLogger(__name__)


class VLMTask(StageTask):
    def __init__(self, config: TrainConfig, stage: Stage, bundle: VLMBundle):
        super().__init__(config, stage, bundle.model)
        self.bundle = bundle
        self.within_limit = SampleLimit(self.sample_limit)  # this validation's count towards eval.max_samples
        # this rank's (batch index, item) scores, merged over ranks at the validation's end
        self.val_losses: list[tuple[int, tuple[float, int]]] = []  # (mean loss, rows it averages)
        self.answers: list[tuple[int, dict[str, Any]]] = []
        self.feature_cache = self._feature_cache()
        # packed rows' best width, from the LLM's layers as built (FSDP may flatten their weights later)
        self.packing_break_even = attention_break_even(self.model.lm)
        self.packing_probed = False  # data.packing is checked against the LLM once (see `batching`)
        self.position_limit = learned_positions(self.model.lm)  # None: positions run on (rotary, ALiBi)

    @classmethod
    def create(cls, config: TrainConfig, stage: Stage, init_from: Path | None, data: DataSources) -> VLMTask:
        if init_from and stage.previous != "contrastive" and read_meta(init_from).stage == "contrastive":
            from vlm.training.stages import STAGES  # the stage table imports this module

            after = next(s.name for s in STAGES.values() if s.previous == "contrastive")
            log.warning("stage=%s starts from the contrastive export %s: only its ViT comes trained, the projector and "
                        "the LLM start fresh. stage=%s trains the projector first; pass init_from=its export (or "
                        "init_from=auto once it has run)", stage.name, init_from, after)
        return cls(config, stage, start_bundle(config, init_from))

    @classmethod
    def from_export(cls, config: TrainConfig, stage: Stage, directory: Path, data: DataSources) -> VLMTask:
        return cls(config, stage, load_vlm(directory, tiler=config.tiler))

    def _feature_cache(self) -> VisionFeatureCache | None:
        stage = self.config.stage
        if not stage.cache_vision_features:
            return None
        if "vision" in self.trainable:  # features change every step: nothing to reuse
            log.info("stage.cache_vision_features is off for this run: it trains the vision tower (stage.train_vision)")
            return None
        return VisionFeatureCache(self.model.vision, self.bundle.processor.tiler, stage.feature_cache_memory,
                                  stage.feature_cache_dir)

    def batching(self) -> Batching:
        if self.config.data.packing and not self.packing_probed:  # in the main process, before workers copy it
            self.packing_probed = True
            if not keeps_samples_apart(self.model.lm):
                self.config.data.packing = False  # the run's config.json says it padded
                log.warning("data.packing is off for this run: %s does not keep the samples of a packed row apart "
                            "(its attention mask ignores position ids, or its position bias does not restart), so "
                            "each sample would see the ones before it; batches are padded instead",
                            type(self.model.lm).__name__)
        processor, settings = self.bundle.processor, self.config.eval
        held_out = ConversationDecoder(processor, evaluate=True, turns=settings.turns,
                                       group_by=self.config.data.eval_group_by)
        # training batches packed with data.packing (after the probe above), held-out ones padded
        collate = ConversationCollator(self.bundle.tokenizer.pad_token_id, processor.max_length,
                                       self.packing_break_even, self.config.data.packing)
        return Batching(ConversationDecoder(processor), held_out, collate, self.config.stage.batch_size,
                        settings.batch_size, val_collate=collate.padded, length=encoded_length)

    def cached_patches(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The vision tower's features (N_tiles, P, Dv) of the batch's tiles through the feature cache (its `keys`
        and per-sample `tiles` name them); None without a cache (stage.cache_vision_features off, or the tower
        trains)."""
        if self.feature_cache is None:  # text-only batches go through it too (see VisionFeatureCache.patch_features)
            return None
        return self.feature_cache.patch_features(batch["keys"], batch["pixel_values"], batch["tiles"])

    def forward_batch(self, batch: dict[str, Any], cached: bool = False) -> CausalLMOutputWithPast:
        """The model on a padded or packed batch; `cached`: the vision features come from the feature cache (when
        stage.cache_vision_features is on; held-out batches bypass it)."""
        patches = self.cached_patches(batch) if cached else None
        return self.model(batch["input_ids"], batch.get("attention_mask"), batch["pixel_values"], batch["labels"],
                          batch["image_slots"], position_ids=batch.get("position_ids"), patches=patches)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.count_batch(batch["num_samples"])
        out = self.forward_batch(batch, cached=True)
        loss = self.guarded(out.loss)
        if self.health.skip_pending:
            return loss
        # the mean over ranks, and the tokens of all of them (one small all-reduce each; every rank logs them)
        self.log("train/loss", out.loss, prog_bar=True, sync_dist=True)
        self.log("train/tokens", (batch["labels"] != IGNORE_INDEX).sum().float(), reduce_fx="sum", sync_dist=True)
        self.health.log_to(self)
        return out.loss

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.within_limit, self.val_losses, self.answers = SampleLimit(self.sample_limit), [], []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        rows = self.within_limit.rows(len(batch["input_ids"]))
        samples = self.within_limit.samples(batch.get("scored", []))
        if not self.held_out_share.mine(batch_idx):
            return
        out = self.forward_batch(batch)
        if rows == len(batch["input_ids"]):
            self.val_losses.append((batch_idx, (out.loss.item(), rows)))
        elif rows:  # the last batch read may hold more than eval.max_samples leaves
            logps, tokens = answer_logprobs(out.logits[:rows], batch["labels"][:rows])  # (rows,), (rows,)
            self.val_losses.append((batch_idx, ((-logps.sum() / tokens.sum().clamp(min=1)).item(), rows)))
        self.score_answers(samples, batch_idx)

    def score_answers(self, samples: list[list[ScoredTurn]], batch_idx: int) -> None:
        """Answer each sample's held-out turns greedily and keep the scored answers, tagged with their batch."""
        turns = [turn for sample in samples for turn in sample]
        if not turns:
            return
        pad = self.bundle.tokenizer.pad_token_id
        for turn, prediction in zip(turns, self.answer(pad_batch([t.prompt for t in turns], pad, left=True)),
                                    strict=True):
            self.answers.append((batch_idx, {"key": turn.key, "images": turn.images, "question": turn.question,
                                             "reference": turn.reference, "prediction": prediction,
                                             "group": turn.group, "scores": score_answer(prediction, turn.reference)}))

    def answer(self, prompt: dict[str, torch.Tensor], max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers for a left-padded prompt batch."""
        tokenizer = self.bundle.tokenizer
        max_new_tokens = max_new_tokens or self.config.eval.max_new_tokens
        if self.position_limit is not None:  # a learned position table ends there (GPT-2's IndexError)
            max_new_tokens = min(max_new_tokens, self.position_limit - prompt["input_ids"].shape[1])
            if max_new_tokens < 1:
                return [""] * len(prompt["input_ids"])
        # blocks compiled for training (trainer.compile) decode eagerly: every new KV-cache length would recompile them
        with eager_decoding(self.config.trainer.compile):
            end_ids = turn_end_ids(tokenizer, self.model.lm.generation_config)
            new = self.model.generate(prompt["input_ids"].to(self.device), prompt["attention_mask"].to(self.device),
                                      prompt["pixel_values"].to(self.device), prompt["image_slots"].to(self.device),
                                      max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id,
                                      **cache_kwargs(self.model.lm))
        return answer_texts(new, tokenizer, end_ids)

    def prediction_metrics(self) -> dict[str, Any]:
        """Answer scores overall and per group, and the count of answers scored."""
        if not self.predictions:
            return {}
        scores = answer_metrics([(p["group"], p["scores"]) for p in self.predictions])
        return scores | {"answers_scored": len(self.predictions)}

    def on_validation_epoch_end(self) -> None:
        share = self.held_out_share
        losses, self.predictions = share.merged(self.val_losses), share.merged(self.answers)
        if losses:  # the mean over batches, each weighted by its rows, as Lightning averages a logged value
            rows = sum(count for _, count in losses)
            self.log("val/loss", sum(loss * count for loss, count in losses) / rows, batch_size=rows,
                     sync_dist=False, rank_zero_only=True)
        if not self.predictions:
            return
        metrics = {k: float(v) for k, v in self.prediction_metrics().items()}
        overall = metrics.pop("exact_match")
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False, rank_zero_only=True)
        self.log("val/exact_match", overall, prog_bar=True, sync_dist=False, rank_zero_only=True)

    def empty_model(self) -> VisionLanguageModel:
        return empty_vlm(self.model.config, self.model.lm.config, self.model.image_token_id)

    def write_export(self, directory: Path, model: VisionLanguageModel) -> Path:
        bundle = VLMBundle(model, self.bundle.tokenizer, self.bundle.processor)
        return export_vlm(directory, bundle, self.stage.name, self.config.tiler, self.export_settings())


def encoded_length(sample: dict[str, Any]) -> int:
    """A decoded conversation's length in tokens (image tokens included)."""
    return len(sample["encoded"].input_ids)


def eager_decoding(blocks_compiled: bool) -> AbstractContextManager:
    """With blocks compiled for training, compiled code runs eagerly inside (torch >= 2.6; older versions recompile,
    with warnings). Only then: the stance reaches all compiled code, flex_attention's kernel too, which would fall
    back to an unfused implementation that materialises every score."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if not blocks_compiled or set_stance is None:
        return contextlib.nullcontext()
    return set_stance("force_eager")


def start_bundle(config: TrainConfig, init_from: Path | None) -> VLMBundle:
    """From a phase 2 export (align -> sft -> dpo), or a new VLM whose ViT comes from a contrastive export."""
    meta = read_meta(init_from) if init_from else None
    if meta is not None and meta.has_llm:
        adopt_export_architecture(config, ignored_architecture(meta.model, to_dict(config.model)), init_from,
                                  "a phase 2 stage keeps its export's architecture; start from a contrastive export "
                                  "to change it")
        bundle = load_vlm(init_from, tiler=config.tiler,
                          gradient_checkpointing=config.model.llm.gradient_checkpointing)
        bundle.model.vision.vit.set_grad_checkpointing(config.model.vision.gradient_checkpointing)
        set_attention(bundle.model, config.model.llm)  # this run's attention, whatever the export's was
        warn_other_than_export(config, meta, init_from)
    else:
        if meta is not None:  # the phase 1 ViT comes with the architecture it was trained with
            asked = to_dict(config.model.vision)
            own = {key: asked[key] for key in VISION_SETTINGS_OF_A_NEW_PROJECTOR}  # this run's, not the export's
            ignored = [item for item in ignored_architecture(meta.model["vision"], asked, "vision.")
                       if item[0].removeprefix("vision.") not in own]
            adopt_export_architecture(config, ignored, init_from, "the ViT keeps the architecture it was trained with")
            vision = dataclasses.replace(model_config_from(meta.model).vision, **own)
            config.model = dataclasses.replace(config.model, vision=vision)
        bundle = new_vlm(config.model, config.tiler)
        if meta is not None:
            load_vision_from_clip(bundle.model.vision, init_from)
    log.info("image tokens per tile: %d; tiles per image: at most %d", bundle.model.tokens_per_tile,
             config.tiler.max_tiles + (1 if config.tiler.max_tiles > 1 and config.tiler.thumbnail else 0))
    return bundle


def warn_other_than_export(config: TrainConfig, meta: ExportMeta, init_from: Path) -> None:
    """A run from a phase 2 export takes its attention and tiler from its own config: say so where that drops what
    the export trained with (a local_global export would go on dense by default, a high-resolution one at one tile);
    a dense export trained on with local_global, or at more tiles, is what the run asked for."""
    trained = meta.model["llm"]
    attention = {key: trained.get(key) for key in ("attention", "sparse")}
    asked = {"attention": config.model.llm.attention, "sparse": to_dict(config.model.llm.sparse)}
    if attention["attention"] == "local_global" and attention != asked:
        sparse = " ".join(f"model.llm.sparse.{k}={v}" for k, v in (attention["sparse"] or {}).items())
        log.warning("%s trained with model.llm.attention=local_global (%s); this run trains with "
                    "model.llm.attention=%s (its own setting): pass the export's to keep it", init_from, sparse,
                    asked["attention"])
    if (tiles := meta.tiler.get("max_tiles")) is not None and tiles > config.tiler.max_tiles:
        log.warning("%s trained with tiler.max_tiles=%d; this run tiles at most %d per image (its own tiler): pass "
                    "tiler.max_tiles=%d, or the tiler preset it trained with, to keep its resolution", init_from,
                    tiles, config.tiler.max_tiles, tiles)


# The model.vision keys a run starting phase 2 from a contrastive export takes from its own config: how it trains the
# ViT, and how its new projector reads it (not what the ViT is); later stages keep the readings their projector learnt.
VISION_SETTINGS_OF_A_NEW_PROJECTOR = ("gradient_checkpointing", "feature_layer", "keep_cls")
# Settings a run applies to the model it continues; every other model key comes from the export it starts from.
RUN_MODEL_SETTINGS = ("vision.gradient_checkpointing", "vision.pretrained", "llm.gradient_checkpointing",
                      "llm.attention", "llm.sparse.", "text.", "clip.")


def adopt_export_architecture(config: TrainConfig, ignored: list[tuple[str, Any, Any]], init_from: Path,
                              why: str) -> None:
    """The export's value for each model key in `ignored` (key, built, asked) goes into `config`, so the run's
    config.json records what it trained; each key set on the command line gets a warning (the preset's own
    defaults differing from the export's need none)."""
    given = command_line_keys()
    values = to_dict(config.model)
    for key, built, asked in ignored:
        *parents, last = key.split(".")
        node = values
        for parent in parents:
            node = node[parent]
        node[last] = built
        if given is None or any(f"model.{key}" == g or f"model.{key}".startswith(f"{g}.") for g in given):
            built_with = "whose export leaves it to the model it names" if built is None else f"built with {built!r}"
            log.warning("model.%s=%r is ignored: this run starts from %s, %s (%s)", key, asked, init_from, built_with,
                        why)
    config.model = load_config(ModelConfig, values, "model.")


def ignored_architecture(built: dict[str, Any], asked: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, the export's value, the run's value) for each model key the run sets differently from the export."""
    found = []
    for key, value in asked.items():
        name = prefix + key
        if name.startswith(RUN_MODEL_SETTINGS) or key not in built or name + "." in RUN_MODEL_SETTINGS:
            continue
        if isinstance(value, dict) and isinstance(built[key], dict):
            found += ignored_architecture(built[key], value, name + ".")
        elif value != built[key]:
            found.append((name, built[key], value))
    return found
