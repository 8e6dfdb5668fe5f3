"""`python -m vlm.constitution [key=value ...]`: preference pairs from a chat model's own answers.

For each prompt (images + the conversation up to its last user turn) the policy samples an answer; a critic
critiques it under one principle of the constitution, drawn at random, and revises it (`mode=revise`: chosen = the
revision, rejected = the answer; a revision equal to the answer is dropped), or scores `num_samples` answers
(`mode=best_of_n`: the best against the worst; ties are dropped). With `anchors` > 0, that share of the training
answers the critic leaves unchanged is kept too, as conversation samples: `stage=dpo` holds their likelihood up, so
what the policy already answers right does not drift while the pairs move it. Samples go to
OUT/{train,val}/shard-NNNNNN.tar, one shard per `prompts_per_shard` prompts, each written under a temporary name and
renamed into place with its counts beside it; a rerun skips the prompts whose shard is there. OUT/DONE, written
last, tells `stage=dpo` the patterns.

settings.py (the config, the constitution file, the critic) -> pairs.py (prompts -> answers -> judged pairs)
-> output.py (atomic, resumable shards); critics.py: who judges (self, http, synthetic).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from vlm.cli import CONFIG_DIR, preflight, setup_logging, user_errors
from vlm.config import ConfigError, load_config
from vlm.constitution.output import check_resumable, make_split, pair_settings
from vlm.constitution.pairs import Counts, PairMaker
from vlm.constitution.settings import (
    ConstitutionConfig,
    build_critic,
    check_critic,
    load_constitution,
    types_judging_nothing,
)
from vlm.data.preferences import PAIRS_DONE
from vlm.data.shards import absolute_pattern
from vlm.data.sources import pair_sources, resolve
from vlm.data.synthetic import QUESTION_TYPES
from vlm.signals import Terminated, sigterm_interrupts

log = logging.getLogger("vlm.constitution")


def run(config: ConstitutionConfig) -> dict[str, Any]:
    """Write the pairs of every split; returns the summary (also OUT/summary.json)."""
    from vlm.chat import ChatModel

    started = time.time()
    check_critic(config)
    constitution = load_constitution(config.constitution)
    synthetic = config.data.train is None
    if synthetic and (unknown := types_judging_nothing(constitution, set(QUESTION_TYPES))):
        raise ConfigError(f"constitution={config.constitution!r}: principle types {', '.join(unknown)} are no "
                          f"question type of the synthetic data ({', '.join(QUESTION_TYPES)})")
    checkpoint, out = policy_and_output(config)
    data = resolve(config.data, "conversations")
    chat_model = ChatModel.load(checkpoint, device=config.device)
    make = PairMaker(config, chat_model, build_critic(config, chat_model, constitution), constitution)
    # after the model and critic load: a start that fails there leaves no output folder behind
    check_resumable(out, pair_settings(config, checkpoint, data.train, data.val, constitution))
    splits = {"train": (data.train, config.max_train_prompts, config.data.synthetic.num_train if synthetic else None),
              "val": (data.val, config.max_val_prompts, config.data.synthetic.num_val if synthetic else None)}
    patterns, summary = {}, {}
    with sigterm_interrupts():  # a scheduler's kill stops as Ctrl-C does, saying which prompts are kept
        for name, (pattern, limit, total) in splits.items():
            if pattern and limit != 0:
                patterns[name], counts = make_split(name, pattern, limit, out / name, make, config, total)
                summary[name] = vars(counts)
    if not synthetic and (unknown := types_judging_nothing(constitution, make.question_types)):
        log.warning("constitution=%r: principle types %s match no prompt's type (the prompts' types: %s), and a "
                    "principle judges only the types it lists; check their spelling against the records' \"type\"",
                    config.constitution, ", ".join(unknown), ", ".join(sorted(make.question_types)) or "none")
    summary.update(checkpoint=str(checkpoint), critic=config.critic.kind, mode=config.mode,
                   constitution=config.constitution,
                   critic_failed_requests=sum(split["critic_failed"] for split in summary.values()),
                   wall_seconds=round(time.time() - started, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if failed := summary["critic_failed_requests"]:
        log.warning("%d critic requests failed, and the prompts that asked them gave no pair (the warnings above say "
                    "why); rerun the same command to ask them again: the shards that lost prompts are made again, the "
                    "others kept", failed)
    done = {"train": patterns.get("train"), "val": patterns.get("val"),
            "qa_val": absolute_pattern(data.val) if data.val else None,
            "train_pairs": summary.get("train", {}).get("kept"), "checkpoint": str(checkpoint)}
    (out / PAIRS_DONE).write_text(json.dumps(done) + "\n")
    say_what_next(done, summary, out, config.mode)
    return summary


def policy_and_output(config: ConstitutionConfig) -> tuple[Path, Path]:
    """The export whose answers are judged (`checkpoint`, else the newest sft export) and the output folder (`out`,
    else OUTPUT_ROOT/constitution/RUN-CRITIC-MODE), both absolute: OUT/DONE and the export dpo writes record these
    paths, read from wherever stage=dpo and vlm.eval run."""
    from vlm.training.runs import latest_export

    checkpoint = Path(config.checkpoint).expanduser() if config.checkpoint else latest_export(config.output_root,
                                                                                              "sft")
    if checkpoint is None:
        raise ConfigError(f"checkpoint=null and no sft export under {config.output_root!r}: run `python -m vlm.train "
                          f"stage=sft` first, or pass checkpoint=EXPORT_FOLDER")
    checkpoint = checkpoint.absolute()
    out = Path(config.out or Path(config.output_root).expanduser() / "constitution" /
               f"{checkpoint.resolve().parent.name}-{config.critic.kind}-{config.mode}").expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} is a file; give a folder for the preference pairs")
    return checkpoint, out


def say_what_next(done: dict[str, Any], summary: dict[str, Any], out: Path, mode: str) -> None:
    """The stage=dpo command for these pairs, or why none was kept and what to change."""
    train_pairs = done["train_pairs"]
    if train_pairs == 0:
        log.warning("no preference pair was kept from the %d train prompts: %s", summary["train"]["prompts"],
                    why_no_pairs(Counts(**summary["train"]), mode))
    elif train_pairs is not None:
        sources = pair_sources(done)  # what stage=dpo would find by itself as the newest output under output_root
        held_out = f" data.val='{sources.val}'" if sources.val else ""
        log.info("pairs in %s; train on them with: python -m vlm.train stage=dpo init_from=%s data.train='%s'%s",
                 out, done["checkpoint"], sources.train, held_out)


def why_no_pairs(counts: Counts, mode: str) -> str:
    """What most of a split's prompts were dropped for, and what to change: for the warning when none was kept."""
    better_critic = "a stronger critic (critic=http with a larger model)"
    reasons = {
        "dropped_unchanged": "the critic left the answers as they were (the model answers them right, or the critic "
                             "agrees with it); use more prompts (max_train_prompts), "
                             + ("a higher temperature, or " if mode == "best_of_n" else "mode=best_of_n, or ")
                             + better_critic,
        "dropped_tie": "the critic gave every answer of a prompt the same score; raise num_samples or temperature, "
                       f"or use {better_critic}",
        "dropped_unscored": f"the critic's replies held no score (or several); use {better_critic}",
        "dropped_empty": f"the critiques or revisions came back empty; use {better_critic}",
        "dropped_failed": "the critic's requests failed or the prompts could not be asked (see the warnings above)",
        "dropped_markup": "the revisions or answers spelled <image> or a chat control token (see the warnings above); "
                          f"use {better_critic}",
    }
    most = max(reasons, key=lambda name: getattr(counts, name))
    return f"{reasons[most]}. stage=dpo has nothing to learn from here"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="constitution")
def main_hydra(cfg: DictConfig) -> dict[str, Any]:
    with user_errors():
        config = load_config(ConstitutionConfig, cfg)
        setup_logging(config.log_level)
        try:
            summary = run(config)
        except KeyboardInterrupt as stop:  # the shards written so far are whole, and make_split said where they are
            raise SystemExit(143 if isinstance(stop, Terminated) else 130) from None
    print(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    preflight(sys.argv[1:], "constitution")
    main_hydra()


if __name__ == "__main__":
    main()
