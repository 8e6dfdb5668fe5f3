"""`python -m vlm.eval checkpoint=EXPORT [data.val=SHARDS]` (or `vlm-eval`): score an export folder on held-out data,
as the stage that made it scores (read from the export; `stage=STAGE` picks another).

contrastive: zero-shot top-1 (when the held-out samples carry labels) and image<->text retrieval R@1.
align / sft: held-out loss, and the model's own answers (greedy) scored against every held-out assistant turn:
exact match, VQA-normalised match and containment, overall and per group (e.g. question type).
dpo: the rewards on held-out preference pairs (against the reference the run started from) and the answers' scores.
Without data.val it scores the synthetic held-out split. Prints the metrics as JSON and writes them to eval.output_dir
(metrics.json), with a line per held-out sample or answer (predictions.jsonl); on stderr it shows the worst-scored
answers, or for a contrastive model its most frequent zero-shot confusions.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Collection
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from vlm.cli import CONFIG_DIR, command_line_keys, preflight, quiet, user_errors
from vlm.config import ConfigError, TilerConfig, TrainConfig, to_train_config
from vlm.data.shards import ShardError, absolute_pattern, list_shards
from vlm.data.sources import resolve_eval
from vlm.exports.format import read_meta, require_export_folder
from vlm.metrics import SCORES
from vlm.training.datamodule import ShardDataModule
from vlm.training.runs import removed_if_left_empty
from vlm.training.stages import STAGES, get_stage
from vlm.training.strategy import runs_on_cpu
from vlm.training.task import EVAL_SCORED_WITH
from vlm.training.trainer import build_eval_trainer, check_scored, validate

log = logging.getLogger("vlm.eval")
TRAINING_ONLY = ("init_from", "resume", "run_name")  # keys of the shared config only a training run reads
GROUPS_FROM_EXPORT = ("stage", "tiler")  # config groups the export records: its own unless given (--help says so)
WORST_SHOWN = 5


def require_checkpoint(config: TrainConfig) -> None:
    if not config.checkpoint:
        raise ConfigError("checkpoint=PATH is required: the export folder of a run (OUTPUT_ROOT/STAGE/RUN/export)")


def evaluate(config: TrainConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Validate the export `config.checkpoint` with its stage's task: (metrics, the answers it scored)."""
    require_checkpoint(config)
    stage = get_stage(config.stage.name)
    meta = read_meta(config.checkpoint)
    made_by = meta.stage
    if meta.has_llm == stage.task.EMBEDS:  # phase 1 and phase 2 models score differently
        raise ConfigError(f"checkpoint={config.checkpoint!r} holds a {made_by!r} model, which stage={stage.name} "
                          f"cannot evaluate; pass stage={made_by}")
    data = resolve_eval(config.data, stage.data, config.output_root)
    config.data.packing = False  # held-out batches are padded: nothing trains, and packing need not be probed
    with quiet("vlm.training.freezing"):  # its "train / frozen" table speaks of training, which this is not
        task = stage.task.from_export(config, stage, Path(config.checkpoint).expanduser(), data)
    datamodule = ShardDataModule(data, task.batching(), config.data)
    trainer = build_eval_trainer(config, task)
    try:
        metrics: dict[str, Any] = validate(trainer, task, datamodule)
    except SystemExit as stop:  # Lightning ends a Ctrl-C with exit code 1, after its own shutdown
        if stop.code != 1 or not trainer.interrupted:
            raise
        log.error("stopped by Ctrl-C before the evaluation finished; nothing was written")
        raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports it: not a finished evaluation
    check_scored(task, metrics, data.val)
    metrics.update(checkpoint=str(Path(config.checkpoint).resolve()), data=absolute_pattern(data.val))
    return metrics, task.predictions


def results_folder(config: TrainConfig) -> Path:
    """eval.output_dir (default: the `eval` folder beside the export), made before the evaluation runs, so a path
    that cannot be a folder fails at once rather than after the work."""
    require_checkpoint(config)
    require_export_folder(config.checkpoint)  # before a folder is made beside it
    out = Path(config.eval.output_dir or Path(config.checkpoint).expanduser().resolve().parent / "eval").expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, or no permission
        raise ConfigError(f"eval.output_dir={str(out)!r} cannot be a folder for the results ({err.strerror})") from None
    return out


def write_results(metrics: dict[str, Any], predictions: list[dict[str, Any]], directory: Path) -> None:
    """metrics.json and predictions.jsonl: one line per answered turn (key, images, question, reference, prediction,
    group, scores), or for a contrastive model per sample (key, caption, caption_rank; with class labels also label,
    prediction, top, correct)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    answers = directory / "predictions.jsonl"
    answers.unlink(missing_ok=True)  # an earlier evaluation's rows in the same folder are not this model's
    if predictions:
        with open(answers, "w") as file:
            for row in predictions:
                file.write(json.dumps(row) + "\n")


def show_worst(predictions: list[dict[str, Any]], count: int = WORST_SHOWN) -> None:
    """The wrong answers with the lowest summed scores, for reading failures rather than only numbers."""
    wrong = [p for p in predictions if p["scores"]["exact_match"] < 1]
    worst = sorted(wrong, key=lambda p: sum(p["scores"][s] for s in SCORES))[:count]
    if not worst:
        many = len(predictions) > 1
        print(f"all {len(predictions)} answers are exact matches" if many else "the answer is an exact match",
              file=sys.stderr)
        return
    heading = f"the {len(worst)} worst-scored of {len(wrong)} wrong answers" if len(wrong) > 1 else "the wrong answer"
    print(f"{heading}:", file=sys.stderr)
    for row in worst:
        scores = ", ".join(f"{s}={row['scores'][s]:.0f}" for s in SCORES)
        print(f"- {row['key']}: Q: {row['question']!r}\n  expected {row['reference']!r}, got {row['prediction']!r} "
              f"({scores})", file=sys.stderr)


def show_confusions(predictions: list[dict[str, Any]], count: int = WORST_SHOWN) -> None:
    """Zero-shot: the most frequent (label, predicted class) mistakes; without labels, the images whose own caption
    ranked lowest among all captions."""
    if any("correct" in p for p in predictions):  # the labelled samples were scored zero-shot
        wrong = Counter((p["label"], p["prediction"]) for p in predictions if p.get("correct") is False)
        if not wrong:
            print(f"all {len(predictions)} zero-shot predictions are right", file=sys.stderr)
            return
        print(f"the most frequent of {wrong.total()} zero-shot mistakes (label -> predicted class):", file=sys.stderr)
        for (label, predicted), times in wrong.most_common(count):
            print(f"- {label!r} -> {predicted!r}: {times}", file=sys.stderr)
        return
    worst = sorted((p for p in predictions if p["caption_rank"] > 0), key=lambda p: p["caption_rank"],
                   reverse=True)[:count]
    if not worst:
        print(f"each of the {len(predictions)} images ranks its own caption first", file=sys.stderr)
        return
    print(f"the {len(worst)} samples whose own caption ranked lowest of {len(predictions)}:", file=sys.stderr)
    for row in worst:
        print(f"- {row['key']}: {row['caption']!r} ranked {row['caption_rank'] + 1}", file=sys.stderr)


def as_trained(config: TrainConfig, given: Collection[str]) -> None:
    """Score as the export's run did: its resolution tier (tiler), a contrastive model's zero-shot prompt templates,
    the stage settings its scores depend on (dpo: stage.beta, stage.loss, stage.sft_weight), how its answers were
    scored (eval.turns, eval.max_new_tokens), the precision it ran in (trainer.precision) and, without data.val, its
    held-out data come from its export, unless given in `given` (the keys set on the command line)."""
    require_checkpoint(config)
    for key in TRAINING_ONLY:
        if key in given:
            raise ConfigError(f"{key}= is a vlm.train setting; vlm.eval scores the export checkpoint= names as it is")
    refuse_several_processes(config)
    meta = read_meta(config.checkpoint)
    if not any(key == "tiler" or key.startswith("tiler.") for key in given):
        config.tiler = TilerConfig(**meta.tiler)
        log.info("tiler: max_tiles=%d, the resolution tier its run trained with (recorded in the export)",
                 config.tiler.max_tiles)
    if meta.templates and "eval.templates" not in given:
        config.eval.templates = list(meta.templates)
        log.info("eval.templates=%s: the zero-shot prompts its run validated with", meta.templates)
    recorded = meta.train_config or {}
    for key in get_stage(config.stage.name).task.SCORED_WITH:
        # None: the run's stage had no such setting (an sft export scored with stage=dpo keeps dpo's defaults)
        value = recorded.get(key)
        if f"stage.{key}" not in given and value is not None:
            log.info("stage.%s=%r, as its run trained (recorded in the export)", key, value)
            setattr(config.stage, key, value)
    for key, value in (recorded.get("eval") or {}).items():  # exports written before it was recorded have none
        if key in EVAL_SCORED_WITH and f"eval.{key}" not in given and value != getattr(config.eval, key):
            log.info("eval.%s=%r, as its run scored its answers (recorded in the export)", key, value)
            setattr(config.eval, key, value)
    adopt_precision(config, (recorded.get("trainer") or {}).get("precision"), given)
    held_out = recorded.get("held_out")
    if config.data.val is None and held_out:
        try:
            list_shards(held_out, "data.val")
        except ShardError as err:
            log.warning("the held-out data its run validated on is gone (%s); scoring on the default held-out data "
                        "instead", err)
            return
        log.info("data.val='%s': the held-out data its run validated on", held_out)
        config.data.val = held_out


def adopt_precision(config: TrainConfig, precision: str | None, given: Collection[str]) -> None:
    """The precision its run trained and validated in, unless given or it cannot run here (fp16 on a CPU): a bf16
    run's answers scored in float32 (or the reverse) can differ from the ones its run logged."""
    if precision is None or "trainer.precision" in given or precision == config.trainer.precision:
        return
    if precision.startswith("16") and runs_on_cpu(config.trainer):
        log.info("trainer.precision=%s, as its run trained, needs a GPU: scoring with trainer.precision=%s",
                 precision, config.trainer.precision)
        return
    log.info("trainer.precision=%s, as its run trained (recorded in the export)", precision)
    config.trainer.precision = precision


def refuse_several_processes(config: TrainConfig) -> None:
    """vlm.eval scores on one device in one process: several would each score the whole held-out set and write the
    same files at once."""
    for key in ("devices", "num_nodes"):
        if str(getattr(config.trainer, key)) not in ("1", "auto"):
            raise ConfigError(f"trainer.{key}={getattr(config.trainer, key)!r}: vlm.eval scores an export on one "
                              f"device; run it without trainer.{key} (a training run's validation splits over its "
                              f"DDP ranks)")
    launched = {name: os.environ.get(name, "1") for name in ("WORLD_SIZE", "SLURM_NTASKS")}
    if (several := next((f"{k}={v}" for k, v in launched.items() if v.isdigit() and int(v) > 1), None)):
        raise ConfigError(f"vlm.eval was started as one of several processes ({several}: torchrun or srun), each of "
                          f"which would score the whole held-out set and write the same files; start it as one "
                          f"process")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main_hydra(cfg: DictConfig) -> dict[str, Any]:
    with user_errors():
        config = to_train_config(cfg)
        out = results_folder(config)
        with removed_if_left_empty(out):  # a failed evaluation leaves no empty results folder behind
            as_trained(config, command_line_keys() or set())
            metrics, predictions = evaluate(config)
    write_results(metrics, predictions, out)
    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    embeds = get_stage(config.stage.name).task.EMBEDS
    if predictions:
        (show_confusions if embeds else show_worst)(predictions)
        print(f"metrics and every {'prediction' if embeds else 'answer'}: {out}", file=sys.stderr)
    else:
        print(f"metrics: {out / 'metrics.json'}", file=sys.stderr)
    return metrics


def main() -> None:
    sys.argv[1:] = with_the_exports_stage(sys.argv[1:])
    preflight(sys.argv[1:], "eval")
    main_hydra()


def with_the_exports_stage(args: list[str]) -> list[str]:
    """`args` plus stage=STAGE read from the checkpoint's export when no stage is given: an export knows the stage
    that made it, and stage picks the config group, so it is chosen before Hydra composes."""
    given = dict(a.split("=", 1) for a in args if "=" in a)
    if "stage" in given or not given.get("checkpoint"):
        return args
    try:
        made_by = read_meta(given["checkpoint"].strip("'\"")).stage
    except Exception:  # no export there: the evaluation itself says so, naming the path
        return args
    return [*args, f"stage={made_by}"] if made_by in STAGES else args


if __name__ == "__main__":
    main()
