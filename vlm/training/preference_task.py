"""`stage=dpo`: preference optimisation of a phase 2 model on (prompt, chosen, rejected) pairs, against a frozen
reference: by default a copy of the starting model; with `stage.precompute_reference=true`, its log-probs computed
in one pass before the first step and kept in memory (and in checkpoints) instead of a second model. Checkpoints never
hold the copy: a resumed run builds it again from the export it started from.

Each pair's images go through the vision tower once: the chosen and rejected rows share the features, and so does
the reference while the vision tower is frozen (the default). Log-probs are summed over the answer tokens only.
Conversation samples mixed into the training shards are anchors: their answers' NLL, times `stage.anchor_weight`,
joins the loss, so what the policy already answers right stays put while the pairs move it.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from vlm.config import ConfigError, StageConfig, TrainConfig
from vlm.data.preferences import PreferenceCollator, PreferenceDecoder, refuse_conversations_only
from vlm.data.sources import DataSources
from vlm.exports.format import read_meta
from vlm.exports.vlm import load_vlm
from vlm.models.factory import VLMBundle
from vlm.models.losses import PreferenceLoss, preference_loss, reward_metrics
from vlm.models.vlm import VisionLanguageModel
from vlm.training.freezing import disable_dropout, keep_batch_norm_statistics
from vlm.training.reference import Reference, pair_logps, recorded_reference
from vlm.training.strategy import run_with_whole_weights
from vlm.training.task import Batching, Stage
from vlm.training.vlm_task import VLMTask, start_bundle

log = logging.getLogger(__name__)

PREFERENCE_SETTINGS = ("beta", "loss", "sft_weight", "anchor_weight", "precompute_reference", "disable_dropout")


def require_preference_settings(settings: StageConfig) -> None:
    """A stage that trains on preferences needs every key of PREFERENCE_SETTINGS (null in the other stages' files)."""
    missing = [key for key in PREFERENCE_SETTINGS if getattr(settings, key) is None]
    if missing:
        raise ConfigError(f"stage {settings.name!r} trains on preferences and needs stage.{missing[0]} (see "
                          f"configs/stage/dpo.yaml)")


class PreferenceTask(VLMTask):
    # the rewards and the loss on held-out pairs; train_vision: whether the reference reads its own image features
    SCORED_WITH = ("beta", "loss", "sft_weight", "train_vision")
    STARTS_FRESH = False  # preferences between a model's answers say nothing to random weights
    READS_PREFERENCES = True

    def __init__(self, config: TrainConfig, stage: Stage, bundle: VLMBundle, reference: VisionLanguageModel | None,
                 reference_source: str | None):
        super().__init__(config, stage, bundle)
        settings = config.stage
        require_preference_settings(settings)
        self.reference = Reference(reference, reference_source)  # a frozen copy, or precomputed log-probs
        if settings.disable_dropout and (zeroed := disable_dropout(self.model)):
            log.info("dropout off in the policy (%d rates; stage.disable_dropout=false keeps them)", zeroed)
        self.val_rewards: list[tuple[int, tuple[torch.Tensor, torch.Tensor]]] = []  # (batch index, (chosen, rejected))
        self.batches_trained, self.pairs_trained = 0, 0  # this session's: none of them pairs is worth a warning

    @classmethod
    def create(cls, config: TrainConfig, stage: Stage, init_from: Path | None, data: DataSources) -> PreferenceTask:
        """The policy from a phase 2 export (by default the one whose answers the pairs are, else the newest sft
        one); the reference is its frozen copy."""
        if init_from is None:
            raise ConfigError(f"stage={stage.name} learns from a chat model's own answers and cannot start from fresh "
                              f"weights: pass init_from=PATH (an sft or align export) or init_from=auto")
        if not (meta := read_meta(init_from)).has_llm:
            raise ConfigError(f"init_from={str(init_from)!r} is a {meta.stage!r} export; stage="
                              f"{stage.name} starts from a chat model (an align or sft export)")
        if data.train:
            refuse_conversations_only(data.train)
        if config.stage.reference:
            log.warning("stage.reference=%r is read by vlm.eval only: this run's reference is the export it starts "
                        "from, %s", config.stage.reference, init_from)
        bundle = start_bundle(config, init_from)
        reference = None if config.stage.precompute_reference else copy.deepcopy(bundle.model)
        return cls(config, stage, bundle, reference, str(init_from.absolute()))

    @classmethod
    def from_export(cls, config: TrainConfig, stage: Stage, directory: Path, data: DataSources) -> PreferenceTask:
        """For vlm.eval: the reference is stage.reference, else the export the run started from (recorded)."""
        source = recorded_reference(config.stage.reference, directory)
        reference = load_vlm(source, tiler=config.tiler).model
        return cls(config, stage, load_vlm(directory, tiler=config.tiler), reference, source)

    def batching(self) -> Batching:
        processor, settings = self.bundle.processor, self.config.eval
        held_out = PreferenceDecoder(processor, evaluate=True, turns=settings.turns,
                                     group_by=self.config.data.eval_group_by)
        return Batching(PreferenceDecoder(processor, group_by=self.config.data.eval_group_by), held_out,
                        PreferenceCollator(self.bundle.tokenizer.pad_token_id), self.config.stage.batch_size,
                        settings.batch_size)

    def train(self, mode: bool = True) -> PreferenceTask:
        """With stage.disable_dropout, the policy's BatchNorm layers (the tiny ViT's conv stem, when stage.train_vision
        trains it) also run as in eval mode: batch statistics would make its log-probs differ from the reference's."""
        super().train(mode)
        if mode and self.config.stage.disable_dropout:
            keep_batch_norm_statistics(self.model)
        return self

    def on_train_start(self) -> None:
        # after any resume's restore (under FSDP that follows on_fit_start): a resumed run has the table already
        if self.reference.model is None and not self.reference.table:
            urls = self.trainer.datamodule.train_urls + self.trainer.datamodule.val_urls
            # the precision the steps run in (the policy's log-probs must match the reference's at step 0), and
            # under FSDP inside the root's forward, where its weights are whole
            with self.trainer.precision_plugin.val_step_context():
                run_with_whole_weights(self.trainer, self, lambda: self.reference.precompute(
                    self, urls, self.trainer.global_rank, self.trainer.world_size))
        super().on_train_start()  # then each part's training mode, whatever the pass left

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["reference_logps"] = self.reference.table
        self.reference.leave_out_model(checkpoint, "reference.")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.reference.table = checkpoint.get("reference_logps", {})

    # ---- the loss ----

    def pair_loss(self, pairs: dict[str, Any]) -> PreferenceLoss:
        pixels = pairs["pixel_values"]
        # a trained tower is no longer the reference's: the reference reads its own features, also when validating
        vision_trains = "vision" in self.trainable
        # training with the tower frozen: each pair's features computed once, reused in later epochs
        patches = self.cached_patches(pairs) if torch.is_grad_enabled() else None
        if patches is None:  # on no tiles too: under FSDP every rank must run the tower's blocks
            with torch.set_grad_enabled(vision_trains and torch.is_grad_enabled()):
                patches = self.model.vision.patch_features(pixels)  # (N_tiles, P, Dv): once per pair
        logps, tokens = pair_logps(self.model, pairs, patches)
        reference = self.reference.pair_logps(pairs, None if vision_trains else patches.detach())
        half = len(logps) // 2
        settings = self.config.stage
        return preference_loss(logps[:half], logps[half:], reference[:half], reference[half:], tokens[:half],
                               tokens[half:], settings.beta, settings.loss, settings.sft_weight)

    # ---- training and validation ----

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, PreferenceLoss | None, torch.Tensor | None]:
        """(what training minimises, the pairs' loss terms, the anchors' mean answer NLL): the preference loss of the
        batch's pairs plus `stage.anchor_weight` times the NLL of its anchors' answers (either may be absent)."""
        pairs, anchors = batch["pairs"], batch["anchors"]
        result = self.pair_loss(pairs) if pairs else None
        anchor_nll = self.forward_batch(anchors, cached=True).loss if anchors else None
        terms = [result.loss] if result else []
        if anchor_nll is not None:
            terms.append(self.config.stage.anchor_weight * anchor_nll)
        return torch.stack(terms).sum(), result, anchor_nll

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pairs, anchors = batch["pairs"], batch["anchors"]
        self.count_batch((len(pairs["keys"]) if pairs else 0) + (anchors["num_samples"] if anchors else 0))
        self.batches_trained += 1
        self.pairs_trained += len(pairs["keys"]) if pairs else 0
        total, result, anchor_nll = self.training_loss(batch)
        loss = self.guarded(total)
        if self.health.skip_pending:
            return loss
        self.log("train/loss", total, prog_bar=True, sync_dist=True)  # the mean over ranks
        # a rank's batch may hold no anchors or no pairs, so these are its own (a collective needs every rank)
        if anchor_nll is not None:
            self.log("train/anchor_nll", anchor_nll)
        if result is not None:
            metrics = reward_metrics(result.chosen_rewards, result.rejected_rewards)
            self.log_dict({f"train/{k}": v for k, v in metrics.items()} | {"train/sft_nll": result.sft_nll})
            self.log("train/margin", metrics["rewards/margins"], prog_bar=True)
        self.health.log_to(self)
        return loss

    def on_train_end(self) -> None:
        if self.batches_trained and not self.pairs_trained:
            log.warning("stage=%s trained %d batches without a single preference pair: data.train held only "
                        "conversation samples, which train as anchors (their answers' NLL). Preference shards hold "
                        "`chosen` and `rejected` (vlm.constitution or data_scripts/preferences_to_shards.py)",
                        self.stage.name, self.batches_trained)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.val_rewards = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        samples = self.within_limit.samples(batch["scored"])  # counted on every rank, as every batch is
        pairs = batch["pairs"]
        if not self.held_out_share.mine(batch_idx):
            return
        if pairs:
            result = self.pair_loss(pairs)
            self.val_rewards.append((batch_idx, (result.chosen_rewards.cpu(), result.rejected_rewards.cpu())))
            self.val_losses.append((batch_idx, (result.loss.item(), len(pairs["keys"]))))
        self.score_answers(samples, batch_idx)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        rewards = self.held_out_share.merged(self.val_rewards)
        if rewards:
            chosen, rejected = (torch.cat(r)[:self.sample_limit] for r in zip(*rewards, strict=True))
            metrics = reward_metrics(chosen, rejected) | {"pairs_scored": torch.tensor(float(len(chosen)))}
            self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False, rank_zero_only=True)

    def export_settings(self) -> dict[str, Any]:
        return super().export_settings() | {"reference": self.reference.source}
