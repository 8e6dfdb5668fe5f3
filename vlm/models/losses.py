"""Losses: open_clip's ClipLoss and SigLipLoss for contrastive stages (gathered across ranks), and the preference
losses of `stage=dpo` (DPO's sigmoid loss, IPO), on log-probabilities of answers. One home, loud failures."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from vlm.config import ClipHeadConfig, ConfigError
from vlm.data.processor import IGNORE_INDEX

log = logging.getLogger(__name__)
PREFERENCE_LOSSES = ("sigmoid", "ipo")
# open_clip's gathering calls torch.distributed.nn.all_gather, which this torch marks deprecated: the warning names a
# library line our users cannot change, twice per rank
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                        category=FutureWarning)


def build_contrastive_loss(config: ClipHeadConfig, rank: int = 0, world_size: int = 1) -> nn.Module:
    """The loss module; call it as loss(**model_outputs, output_dict=True) -> {"contrastive_loss": ...}."""
    if config.loss == "clip":
        return ClipLoss(local_loss=config.local_loss, gather_with_grad=config.gather_with_grad, cache_labels=True,
                        rank=rank, world_size=world_size)
    if config.loss == "siglip":
        if world_size > 1 and rank == 0 and (config.local_loss or config.gather_with_grad):
            log.info("model.clip.local_loss and gather_with_grad apply to loss=clip; SigLIP's loss passes each rank's "
                     "text features around the ranks in turn, scoring every image against the global batch")
        return SigLipLoss(cache_labels=True, rank=rank, world_size=world_size)
    raise ConfigError(f"unknown model.clip.loss {config.loss!r}; choose one of ['clip', 'siglip']")


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, L, V), labels (N, L) with IGNORE_INDEX outside the answer -> (the answer's summed log-probability
    (N,), its token count (N,)). Position t's logits predict token t + 1; only answer tokens count."""
    targets = labels[:, 1:]  # (N, L-1)
    token_logps = -F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                                   reduction="none")  # (N, L-1), 0 where ignored
    return token_logps.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


@dataclass
class PreferenceLoss:
    loss: torch.Tensor  # () what training minimises
    chosen_rewards: torch.Tensor  # (B,) beta * (policy - reference) log-ratio of the chosen answers (no grad)
    rejected_rewards: torch.Tensor  # (B,)
    sft_nll: torch.Tensor  # () mean per-token NLL of the chosen answers under the policy


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                    reference_rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                    beta: float, kind: str = "sigmoid", sft_weight: float = 0.0) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) on summed answer log-probs, each (B,).

    sigmoid: -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)]), log-probs summed over the answer.
    ipo: (h - 1 / (2 beta))^2 with h the same log-ratio difference on log-probs averaged per token, as IPO's authors
    specify (sums would make the squared loss scale with answer length).
    `sft_weight` adds that times the chosen answers' per-token NLL, which keeps their likelihood from drifting down.
    """
    if kind not in PREFERENCE_LOSSES:
        raise ConfigError(f"stage.loss={kind!r} is not valid; choose one of {list(PREFERENCE_LOSSES)}")
    chosen_tokens, rejected_tokens = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
    if kind == "ipo":
        policy_chosen, reference_chosen = policy_chosen / chosen_tokens, reference_chosen / chosen_tokens
        policy_rejected, reference_rejected = policy_rejected / rejected_tokens, reference_rejected / rejected_tokens
    chosen_ratio = policy_chosen - reference_chosen  # (B,)
    rejected_ratio = policy_rejected - reference_rejected
    margin = chosen_ratio - rejected_ratio
    losses = -F.logsigmoid(beta * margin) if kind == "sigmoid" else (margin - 1 / (2 * beta)) ** 2
    sft_nll = -(policy_chosen if kind == "ipo" else policy_chosen / chosen_tokens).mean()
    loss = losses.mean() + sft_weight * sft_nll if sft_weight else losses.mean()
    return PreferenceLoss(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), sft_nll.detach())


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """The figures DPO runs report, each a mean over pairs: rewards/chosen, rejected, margins, accuracy (the share of
    pairs whose chosen answer gets the higher reward)."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean()}
