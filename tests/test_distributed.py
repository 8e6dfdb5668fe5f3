"""Distributed training on CPU: the contrastive loss sees the global batch, and a 2-process DDP run finishes.

Two gloo processes stand in for two GPUs; nothing here needs a GPU.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from preference_data import write_pairs
from safetensors.torch import load_file
from tiny import TINY, make_task, tiny_config

from vlm.data import synthetic
from vlm.models.clip import CLIPModel
from vlm.models.losses import build_contrastive_loss

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
PER_RANK = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(config) -> dict:
    """8 decoded synthetic samples: ranks take halves of this, the reference run takes all of it."""
    task = make_task(config)
    decode = task.batching().decode
    samples = [decode(s) for s in synthetic.caption_samples(WORLD * PER_RANK, seed=5, image_size=64)]
    return task.batching().collate(samples)


def _loss_and_grads(model: CLIPModel, loss_fn, pixels, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = loss_fn(**model(pixels, ids), output_dict=True)["contrastive_loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


HEADS = {
    "clip": ["model.clip.loss=clip", "model.clip.local_loss=false"],
    "clip-local_loss": ["model.clip.loss=clip", "model.clip.local_loss=true"],
    "siglip": ["model.clip.loss=siglip"],
}
# The conv stem's BatchNorm normalises with each rank's own batch statistics on CPUs (torch's SyncBatchNorm needs
# GPUs; build_trainer turns it on there), which no loss can make equal to one process; this test is about the loss.
PLAIN_STEM = ["model.vision.conv_stem=false"]
# a window narrower than a packed row, so the pattern is really sparse
LOCAL_GLOBAL = ["model.llm.attention=local_global", "model.llm.sparse.window=8", "model.llm.sparse.stride=4",
                "model.llm.sparse.sinks=1"]


def _count_samples_on_ranks(rank: int, out: Path) -> None:
    """Rank 0 reads clean shards; rank 1 skips `bad` of every 10 samples it reads."""
    from vlm.training.health import DataHealth, TooManyBadSamples

    def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(values)
        return values

    results = {}
    for bad in (1, 2):
        health = DataHealth(max_skip_rate=0.05, max_nonfinite_steps=3, min_samples=40)
        stopped_at = None
        for batch in range(6):
            try:
                health.count_batch(10 - bad * rank, bad * rank, sum_over_ranks)
            except TooManyBadSamples as error:
                stopped_at = (batch, str(error))
                break
        results[bad] = {"stopped_at": stopped_at, "local": [health.seen, health.skipped]}
    resumed = DataHealth(max_skip_rate=0.05, max_nonfinite_steps=3)
    resumed.restore(100, 7, rank)
    resumed.count_batch(10 - rank, rank, sum_over_ranks)
    results["resumed"] = [resumed.total_seen, resumed.total_skipped]
    (out / f"health-rank{rank}.json").write_text(json.dumps(results))


def _share_held_out_batches(rank: int, out: Path) -> None:
    """Each rank scores its share of 5 held-out batches, two items each; every rank gets all of them back."""
    from vlm.training.held_out import HeldOutShare

    share = HeldOutShare(rank, WORLD)
    mine = [batch for batch in range(5) if share.mine(batch)]
    merged = share.merged([(batch, f"batch {batch} item {item}") for batch in mine for item in range(2)])
    (out / f"held-out-rank{rank}.json").write_text(json.dumps({"mine": mine, "merged": merged}))


def _rank_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for name, head in HEADS.items():
            config = tiny_config(*TINY, *PLAIN_STEM, *head)
            batch = _global_batch(config)
            batch["pixels"] = batch["pixels"].double()
            torch.manual_seed(0)
            # same seed, same weights on every rank (DDP broadcasts them at start); float64 so that the 1e-5 bound
            # tests the gathering, not float32 rounding (about 6e-6 on gradients of size 25 here)
            model = CLIPModel(config.model).double()
            # the reference: one process, the whole batch
            reference_loss, reference_grads = _loss_and_grads(model, build_contrastive_loss(config.model.clip),
                                                              batch["pixels"], batch["ids"])
            mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            loss, grads = _loss_and_grads(model, build_contrastive_loss(config.model.clip, rank, WORLD),
                                          batch["pixels"][mine], batch["ids"][mine])
            # the control: each rank alone on its half, negatives from its own samples only (no gathering)
            _, alone = _loss_and_grads(model, build_contrastive_loss(config.model.clip),
                                       batch["pixels"][mine], batch["ids"][mine])
            for grad in [*grads.values(), *alone.values()]:  # what DDP does to gradients: average them over ranks
                dist.all_reduce(grad)
                grad /= WORLD
            mean_loss = loss.clone()
            dist.all_reduce(mean_loss)
            mean_loss /= WORLD
            torch.save({"loss": loss.item(), "mean_loss": mean_loss.item(), "reference_loss": reference_loss.item(),
                        "grad_error": max((grads[n] - g).abs().max().item() for n, g in reference_grads.items()
                                          if n in grads),
                        "control_error": max((alone[n] - g).abs().max().item() for n, g in reference_grads.items()),
                        "missing": sorted(set(reference_grads) ^ set(grads)),
                        "grad_scale": max(g.abs().max().item() for g in reference_grads.values())},
                       Path(out) / f"{name}-rank{rank}.pt")
        _count_samples_on_ranks(rank, Path(out))
        _share_held_out_batches(rank, Path(out))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pair of gloo processes computes every loss head and the sample counts (start-up dominates, so they share
    it)."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("head", list(HEADS))
def test_two_ranks_match_one_process_on_the_concatenated_batch(two_rank_results, head):
    """2 gloo ranks, each with half of an 8-sample batch, against 1 process with all 8.

    The math. With gather_with_grad, every rank all-gathers image and text features with autograd, so each rank
    scores its samples against the negatives of the whole global batch.
    - clip, local_loss=false: every rank builds the full (8 x 8) logits, so its loss *is* the global loss L.
      Backward through the gather sums the gradient each rank sends to a rank's features (all-gather's backward is
      a reduce-scatter), so rank r's raw parameter gradient is WORLD * dL/dθ restricted to its own samples. DDP then
      averages over ranks: (1/WORLD) * sum_r WORLD * dL/dθ|_r = dL/dθ, the 1-process gradient.
    - clip, local_loss=true, and siglip: rank r scores only its own rows (4 x 8 logits; siglip passes text features
      round the ranks), its loss L_r is the mean over its samples, and L = mean_r L_r. Rank r's raw gradient is
      d(sum_k L_k)/dθ through its own samples, and the DDP average is (1/WORLD) * d(sum_k L_k)/dθ = dL/dθ again.
    So: DDP-averaged gradients always equal the 1-process gradients, and the loss equals the 1-process loss (every
    rank's own for local_loss=false, the mean over ranks otherwise), within 1e-5.
    """
    results = [torch.load(two_rank_results / f"{head}-rank{r}.pt") for r in range(WORLD)]
    for r, result in enumerate(results):
        assert not result["missing"], result["missing"]
        assert result["grad_scale"] > 1e-4, "the gradients under test are all zero"
        assert result["grad_error"] < 1e-5, f"rank {r}: gradients differ from 1 process by {result['grad_error']}"
        assert result["control_error"] > 1e-3  # without the gather they would differ: the test can tell
        assert abs(result["mean_loss"] - result["reference_loss"]) < 1e-5
        if head == "clip":
            assert abs(result["loss"] - result["reference_loss"]) < 1e-5, f"rank {r} does not see the global loss"
    if head != "clip":
        assert abs(results[0]["loss"] - results[1]["loss"]) > 1e-6  # each rank scored its own rows


def _args(tmp_path: Path, *extra: str, cache: Path | None = None) -> list[str]:
    return [*TINY, "data.synthetic.num_train=64", "data.synthetic.num_val=16", "data.synthetic.samples_per_shard=16",
            f"data.synthetic.cache_dir={cache or tmp_path / 'synthetic'}", "data.num_workers=0", "stage.batch_size=8",
            "stage.warmup_steps=2", "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1",
            f"output_root={tmp_path / 'runs'}", *extra]


def _train_two_ranks(tmp_path: Path, *extra: str, cache: Path | None = None) -> str:
    """`python -m vlm.train` on 2 CPU processes (Lightning re-launches the command for rank 1); returns its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "vlm.train", *_args(tmp_path, "trainer.devices=2", "trainer.accelerator=cpu", *extra,
                                                   cache=cache)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    return output


# 32-true: FSDP on CPU ranks runs in full precision (trainer.precision=auto picks it there), and DDP must match it
CONTRASTIVE_RUN = ["stage=contrastive", "stage.max_steps=6", "trainer.checkpoint_every_n_steps=3",
                   "trainer.precision=32-true", "eval.batch_size=4"]  # 4 held-out batches: 2 for each rank


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 6-step contrastive run under DDP on 2 CPU processes: (its run folder, its output)."""
    root = tmp_path_factory.mktemp("ddp")
    output = _train_two_ranks(root, *CONTRASTIVE_RUN, "trainer.strategy=ddp", "run_name=ddp")
    return root / "runs" / "contrastive" / "ddp", output


@pytest.mark.slow
def test_two_process_ddp_training_run_finishes(ddp_run):
    """`python -m vlm.train trainer.strategy=ddp trainer.devices=2` on the CPU: Lightning re-launches the command
    for rank 1, both ranks write to one run folder, the run finishes, and rank 0 writes metrics and the export."""
    run, output = ddp_run
    assert "Starting with 2 processes" in output or "MEMBER: 2/2" in output
    # rank 1 runs the command again: it must not tell the start-up a second time, nor repeat library warnings
    assert output.count("parameters by part") == 1 and output.count("stage contrastive ->") == 1, output
    assert "FutureWarning" not in output, output
    assert [p.name for p in run.parent.iterdir()] == ["ddp"], "ranks wrote to different run folders"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["samples_skipped"] == 0
    assert metrics["samples_seen"] == 2 * 6 * 8, "metrics.json must count the samples of both ranks"
    assert (run / "export" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["step00000003.ckpt", "step00000006.ckpt"]


@pytest.mark.slow
def test_two_nodes_train_what_two_devices_train(ddp_run, tmp_path):
    """`trainer.num_nodes=2 trainer.devices=1`, one process per "node" started as a cluster launcher starts them
    (NODE_RANK, MASTER_ADDR, MASTER_PORT): the shards split by node as they split by device, so the run ends at
    the weights of the 2-device run."""
    cache = ddp_run[0].parent.parent.parent / "synthetic"
    port = str(free_port())
    args = _args(tmp_path, *CONTRASTIVE_RUN, "trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=1",
                 "trainer.num_nodes=2", "run_name=nodes", cache=cache)
    nodes = [subprocess.Popen([sys.executable, "-m", "vlm.train", *args], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "NODE_RANK": str(rank),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for rank in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "MEMBER: 2/2" in outputs[1]
    run = tmp_path / "runs" / "contrastive" / "nodes"
    assert json.loads((run / "metrics.json").read_text())["samples_seen"] == 2 * 6 * 8
    assert _largest_difference(run, ddp_run[0]) == 0.0


def _largest_difference(run: Path, other: Path) -> float:
    from safetensors.torch import load_file

    mine, theirs = (load_file(str(r / "export" / "model.safetensors")) for r in (run, other))
    assert mine.keys() == theirs.keys()
    return max((mine[k].float() - theirs[k].float()).abs().max().item() for k in mine)


@pytest.mark.slow
def test_fsdp_trains_what_ddp_trains(ddp_run, tmp_path):
    """`trainer.strategy=fsdp` shards every transformer block over the 2 ranks, and 6 steps of it end at DDP's weights.

    That needs gradients reduced across ranks, the clipping norm taken over all shards (torch's `clip_grad_norm_`
    on one shard would see part of it) and the export gathered from both ranks. The control, the same run without
    clipping, shows the comparison can tell: clipping is active at these steps.
    """
    cache = ddp_run[0].parent.parent.parent / "synthetic"  # the same data
    output = _train_two_ranks(tmp_path, *CONTRASTIVE_RUN, "trainer.strategy=fsdp", "run_name=fsdp", cache=cache)
    units = re.search(r"FSDP \(FULL_SHARD\): (\d+) units over 2 ranks", output)
    assert units and int(units[1]) >= 4, output  # the root, 2 ViT blocks and the text block, at least
    _train_two_ranks(tmp_path, *CONTRASTIVE_RUN, "trainer.strategy=fsdp", "trainer.gradient_clip_val=0",
                     "run_name=unclipped", cache=cache)
    runs = tmp_path / "runs" / "contrastive"
    metrics = json.loads((runs / "fsdp" / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["samples_seen"] == 2 * 6 * 8
    fsdp_gap = _largest_difference(runs / "fsdp", ddp_run[0])
    control_gap = _largest_difference(runs / "unclipped", ddp_run[0])
    assert fsdp_gap < 1e-3 < control_gap, (fsdp_gap, control_gap)
    # and the sharded run carries on from its last checkpoint (Lightning's FSDP resume loads tensors lazily)
    output = _train_two_ranks(tmp_path, *CONTRASTIVE_RUN, "stage.max_steps=9", "trainer.strategy=fsdp",
                              "run_name=fsdp", "resume=auto", cache=cache)
    assert "from step00000006.ckpt" in output, output
    resumed = json.loads((runs / "fsdp" / "metrics.json").read_text())
    assert resumed["global_step"] == 9
    assert resumed["samples_seen"] == 2 * 9 * 8, "the checkpoint's totals are counted once, not once per rank"


@pytest.mark.slow
def test_a_resumed_two_rank_run_draws_each_ranks_own_dropout(tmp_path):
    """Ranks draw dropout differently (packed rows of other widths), so each resumes from its own generator state: a
    run resumed at step 4 (an epoch's end) ends at the uninterrupted run's weights exactly."""
    run = ["stage=sft", "init_from=null", "stage.max_steps=8", "trainer.checkpoint_every_n_steps=4",
           "trainer.strategy=ddp", "trainer.precision=32-true", "+model.llm.config.attention_dropout=0.1",
           "eval.max_samples=4", "run_name=sft", f"stage.feature_cache_dir={tmp_path / 'features'}"]
    _train_two_ranks(tmp_path, *run)
    folder = tmp_path / "runs" / "sft" / "sft"
    whole = load_file(folder / "export" / "model.safetensors")
    (folder / "checkpoints" / "step00000008.ckpt").unlink()  # as if killed after step 4's save
    output = _train_two_ranks(tmp_path, *run, "resume=auto")
    assert "from step00000004.ckpt" in output, output
    resumed = load_file(folder / "export" / "model.safetensors")
    assert max((whole[name] - resumed[name]).abs().max().item() for name in whole) == 0


PHASE2_FSDP = ["trainer.strategy=fsdp", "data.synthetic.num_train=32", "eval.batch_size=8",
               "trainer.checkpoint_every_n_steps=2"]


def _assert_export_is_the_final_checkpoint(run: Path, step: int, attention: str) -> None:
    """The export is written from the weights gathered off both ranks: it must hold exactly the final checkpoint's
    tensors, and record the attention it trained with."""
    from vlm.exports.vlm import load_vlm

    checkpoint = torch.load(run / "checkpoints" / f"step{step:08d}.ckpt", map_location="cpu", weights_only=False)
    trained = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    loaded = load_vlm(run / "export")
    assert loaded.model.config.llm.attention == attention
    exported = loaded.model.state_dict()  # as inference loads it (tied weights written once)
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in exported)


@pytest.mark.slow
def test_fsdp_runs_align_sft_and_dpo_and_resumes(tmp_path):
    """Phase 2 and 3 under FSDP with the defaults: align, then sft from its export (packed batches, the frozen ViT's
    features cached), then dpo from that export with precomputed reference log-probs (computed where FSDP's weights
    are whole, each rank a share), continued with `resume=auto` from the table it saved. Rank 1's dpo shard is
    text-only: every rank still runs the ViT's blocks at every step, as FSDP needs."""
    phase2 = [*PHASE2_FSDP, f"stage.feature_cache_dir={tmp_path / 'features'}"]
    _train_two_ranks(tmp_path, "stage=align", "init_from=null", "stage.max_steps=2", *phase2)
    _train_two_ranks(tmp_path, "stage=sft", "stage.max_steps=4", "run_name=sft", *phase2)
    run = tmp_path / "runs" / "sft" / "sft"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and "exact_match" in metrics
    _assert_export_is_the_final_checkpoint(run, 4, "dense")

    for shard in range(2):  # a shard per rank
        write_pairs(tmp_path / "pairs" / f"train-{shard}.tar", 8, images=shard == 0)  # rank 1's text-only
    dpo = ["stage=dpo", "run_name=dpo", "stage.precompute_reference=true", "stage.batch_size=4", *PHASE2_FSDP,
           f"data.train={tmp_path / 'pairs' / 'train-{0..1}.tar'}",
           f"data.val={write_pairs(tmp_path / 'pairs' / 'val.tar', 4, images=False)}"]
    output = _train_two_ranks(tmp_path, "stage.max_steps=2", *dpo)
    # 3 batches: train-0's 8 pairs with images, train-1's 8 text-only ones, the 4 held-out ones, text-only. Rank 0
    # computes the first and the third (12 pairs), rank 1 the second and then the third again to keep pace; both
    # hold all 20
    assert "reference log-probs of 20 pairs precomputed" in output, output
    assert "(12 of them on rank 0 of 2)" in output and "(8 of them on rank 1 of 2)" in output, output
    with open(tmp_path / "runs" / "dpo" / "dpo" / "logs" / "metrics.csv") as file:
        first = next(row for row in csv.DictReader(file) if row.get("train/margin"))
    assert abs(float(first["train/margin"])) < 1e-5  # at step 0 the policy is the reference the ranks computed
    output = _train_two_ranks(tmp_path, "stage.max_steps=4", "resume=auto", *dpo)
    assert "from step00000002.ckpt" in output and "precomputed" not in output, output
    metrics = json.loads((tmp_path / "runs" / "dpo" / "dpo" / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["pairs_scored"] == 4


@pytest.mark.slow
def test_fsdp_trains_and_exports_sparse_attention(tmp_path):
    """Local-window + global-stride attention takes the same FSDP path: a new phase 2 model trained on both ranks
    and exported from their gathered weights."""
    _train_two_ranks(tmp_path, "stage=sft", "init_from=null", "stage.max_steps=2", "run_name=sparse", *PHASE2_FSDP,
                     f"stage.feature_cache_dir={tmp_path / 'features'}", *LOCAL_GLOBAL)
    _assert_export_is_the_final_checkpoint(tmp_path / "runs" / "sft" / "sparse", 2, "local_global")


NONFINITE_SCRIPT = """
import json, os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
torch.set_num_threads(1)
from test_bad_data import COMMON, PoisonAndWatch, train
from tiny import tiny_config
watch = PoisonAndWatch({{2}})
metrics, _ = train(tiny_config(*COMMON, *{args!r}), watch)
rank = int(os.environ.get("LOCAL_RANK", 0))
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"rank": rank, "changed": watch.changed, "step": metrics["global_step"]}}, f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_nonfinite_loss_skips_the_step_on_both_ranks(tmp_path, strategy):
    """One rank's NaN loss skips that step on every rank (they agree through an all-reduce) and the run goes on.

    Lightning refuses a None loss with several ranks, and DDP needs every rank to run backward, so a skipped step
    must still backpropagate (a zero) and then leave the optimizer no gradients. Run as a script, since Lightning's
    DDP launcher re-runs the command line for rank 1.
    """
    script = tmp_path / "nonfinite.py"
    args = [*TINY, *_args(tmp_path, "stage.max_steps=5", "trainer.checkpoint_every_n_steps=1000",
                          "run_name=nan", f"trainer.strategy={strategy}", "trainer.devices=2",
                          "trainer.accelerator=cpu")]
    script.write_text(NONFINITE_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), args=args,
                                              out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=300)
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    # rank 1 may end after rank 0; its output pipes keep subprocess.run waiting until it has
    ranks = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1], output
    for r in ranks:
        assert r["step"] == 5
        assert r["changed"] == {"0": True, "1": True, "2": False, "3": True, "4": True}  # step 2 changed nothing
    assert "non-finite loss at step 2" in output


@pytest.mark.parametrize("stage", ["contrastive", "sft"])
def test_an_export_from_gathered_weights_equals_the_live_models(tmp_path, stage):
    """Under FSDP rank 0 exports from the full state dict every rank gathered: rebuilt into a fresh, differently
    initialised model, it must write exactly the tensors the live model writes."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    task = make_task(tiny_config(stage=stage), classnames=["a", "b"])
    live = load_file(str(task.export(tmp_path / "live") / "model.safetensors"))
    weights = {name: value.clone() for name, value in task.state_dict().items()}
    shifted = next(name for name in live if ("vision" in name or "visual" in name) and live[name].is_floating_point())
    weights[f"model.{shifted}"] += 1.0  # the export must come from these weights, not from the live model
    exported = load_file(str(task.export(tmp_path / "gathered", weights) / "model.safetensors"))
    assert live.keys() == exported.keys()
    assert torch.equal(exported[shifted], live[shifted] + 1.0)
    assert all(torch.equal(live[name], exported[name]) for name in live if name != shifted)


@pytest.mark.slow
def test_fewer_shards_than_ranks_is_one_clear_line(tmp_path):
    """1 shard for 2 ranks: the run stops at once with the numbers and the fix (exit 2), no traceback, no hang."""
    pattern = synthetic.write_split("captions", tmp_path / "one", num=16, seed=0, image_size=64, samples_per_shard=16)
    result = subprocess.run(
        [sys.executable, "-m", "vlm.train", *_args(tmp_path, "stage.max_steps=2", "trainer.strategy=ddp",
                                                   "trainer.devices=2", "trainer.accelerator=cpu",
                                                   f"data.train='{pattern}'")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "has 1 shards for 2 ranks" in output and "data.resampled=true" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_a_rank_whose_shard_is_unreadable_stops_the_run_with_its_own_error_alone(tmp_path):
    """Rank 1's shard holds nothing readable: its error names the data, and rank 0, whose collective then fails,
    says one line instead of a traceback that would bury it."""
    synthetic.write_split("captions", tmp_path / "data", num=16, seed=0, image_size=64, samples_per_shard=16)
    (tmp_path / "data" / "shard-000001.tar").write_bytes(b"not a tar file" * 100)
    pattern = str(tmp_path / "data" / "shard-{000000..000001}.tar")
    result = subprocess.run(
        [sys.executable, "-m", "vlm.train", *_args(tmp_path, "stage=contrastive", "stage.max_steps=4",
                                                   "trainer.strategy=ddp", "trainer.devices=2",
                                                   "trainer.accelerator=cpu", f"data.train='{pattern}'")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "gave no training batch" in output, output[-3000:]
    assert "another rank ended the run" in output and "Traceback" not in output, output[-3000:]


@pytest.mark.slow
def test_the_skip_rate_limit_reads_every_ranks_samples(two_rank_results):
    """`data.max_skip_rate` is decided on the counts summed over ranks, so every rank stops at the same batch or none
    does: a rank whose own shards are 10% bad must not stop a run that is 5% bad overall (the limit), and a run that
    is 10% bad overall stops on both ranks at once. A resumed run's totals count once, not once per rank."""
    ranks = [json.loads((two_rank_results / f"health-rank{rank}.json").read_text()) for rank in range(WORLD)]
    for rank in ranks:
        assert rank["1"]["stopped_at"] is None  # 6 of 120 samples bad, 5%
        assert rank["2"]["stopped_at"][0] == 1  # 4 of 40 bad at the second batch, 10%
        assert rank["2"]["stopped_at"][1].startswith("4 of 40 samples (10.0%) could not be decoded")
        assert rank["resumed"] == [100 + 20, 7 + 1]
    assert ranks[1]["1"]["local"] == [60, 6]  # rank 1 alone: 10% bad, over the limit


@pytest.mark.slow
def test_ranks_score_their_own_held_out_batches_and_all_get_every_score_in_order(two_rank_results):
    """Under DDP rank r scores held-out batches r, r + 2, ...; merged, every rank holds every batch's items in batch
    order, each batch's items in their own order."""
    ranks = [json.loads((two_rank_results / f"held-out-rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert [rank["mine"] for rank in ranks] == [[0, 2, 4], [1, 3]]
    expected = [f"batch {batch} item {item}" for batch in range(5) for item in range(2)]
    assert ranks[0]["merged"] == ranks[1]["merged"] == expected


@pytest.mark.parametrize(("strategy", "ranks"), [("ddp", WORLD), ("fsdp", 1)])
def test_held_out_batches_are_shared_out_under_ddp_and_scored_by_every_rank_under_fsdp(strategy, ranks):
    """DDP ranks score every n-th held-out batch, so validating on n devices takes 1/n of the time; FSDP ranks score
    every batch, since a sharded forward needs all of them at each step."""
    import lightning.pytorch as pl

    from vlm.training.held_out import HeldOutShare
    from vlm.training.strategy import build_strategy

    config = tiny_config(f"trainer.strategy={strategy}", "trainer.accelerator=cpu")
    trainer = pl.Trainer(strategy=build_strategy(config.trainer, CLIPModel(config.model)), devices=WORLD,
                         accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    share = HeldOutShare.of(trainer)
    assert (share.rank, share.ranks) == (0, ranks)
    assert [batch for batch in range(5) if share.mine(batch)] == list(range(0, 5, ranks))


def _evaluate_alone(tmp_path: Path, export: Path, stage: str) -> dict:
    """`python -m vlm.eval` on the export in one process, with the runs' held-out batch size."""
    out = tmp_path / f"eval-{stage}"
    result = subprocess.run([sys.executable, "-m", "vlm.eval", f"stage={stage}", f"checkpoint={export}",
                             "eval.batch_size=4", "data.num_workers=0", f"eval.output_dir={out}"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def _assert_same_scores(run_metrics: dict, alone: dict, scored: str) -> None:
    assert run_metrics[scored] == alone[scored] >= 16, (run_metrics, alone)  # 16 held-out samples, all scored
    for name, value in alone.items():
        if isinstance(value, float) and name in run_metrics:  # within float noise: the loss's kernels differ
            assert abs(run_metrics[name] - value) <= 1e-4 * abs(value), (name, run_metrics[name], value)


@pytest.mark.slow
def test_a_ddp_runs_held_out_scores_are_one_processes(ddp_run, tmp_path):
    """Two ranks each rank the embeddings of half the held-out batches; merged, the zero-shot and retrieval scores
    are those `vlm.eval` computes in one process on the export."""
    run, _ = ddp_run
    metrics = json.loads((run / "metrics.json").read_text())
    _assert_same_scores(metrics, _evaluate_alone(tmp_path, run / "export", "contrastive"), "samples_scored")
    assert "zero_shot_top1" in metrics


@pytest.mark.slow
def test_a_ddp_sft_runs_answers_are_one_processes(tmp_path):
    """Two ranks each answer half the held-out batches: the run's exact match, answer count and loss are those
    `vlm.eval` computes in one process on the export."""
    _train_two_ranks(tmp_path, "stage=sft", "init_from=null", "stage.max_steps=2", "trainer.strategy=ddp",
                     "trainer.precision=32-true", "eval.batch_size=4", "run_name=sft",
                     f"stage.feature_cache_dir={tmp_path / 'features'}")
    run = tmp_path / "runs" / "sft" / "sft"
    metrics = json.loads((run / "metrics.json").read_text())
    _assert_same_scores(metrics, _evaluate_alone(tmp_path, run / "export", "sft"), "answers_scored")
    assert {"exact_match", "loss"} <= metrics.keys()
