"""Benchmark: the H2O KV cache (vlm.generation.h2o) against transformers' DynamicCache, in one process.

Two parts:
1. Speed and memory on a long text prompt (default 4,096 tokens, 256 new tokens, greedy, exactly N new tokens):
   - peak cache bytes: the most keys and values held after any forward pass (a logits processor reads the cache after
     every step). While the prompt is read whole, both caches hold all of it once; that peak is printed apart.
   - peak process memory: resident set size sampled every 2 ms during the call, minus the size before it.
   With --speed-prompt-block N, h2o reads the prompt N tokens per pass, evicting after each (its whole-prompt peak
   then never happens).
   - prefill seconds (call -> first token) and decode tokens/s ((N - 1) / (last token - first token)).
   The sides alternate over the repeats; medians are reported, with h2o / dynamic ratios.
2. Quality at a fixed budget: exact match on held-out questions (the synthetic held-out split, or --val SHARDS), the
   turns decoded as vlm.eval decodes them (ConversationDecoder, greedy, eval.max_new_tokens) but one at a time, scored
   with vlm.metrics. For each budget B (a fraction of each prompt's length), the cache holds B x prompt tokens in all
   (plus the sinks with --sinks-on-top):
   - h2o: `sinks` first tokens, then the rest split evenly between heavy hitters and the recent window, once with each
     ranking of heavy hitters (h2o.ranking: the largest contribution a query drew from the key, the default; the
     largest share of attention one query gave it; the mean per query that read it; summed, the paper's);
   - window: the same `sinks` and a recent-only window for the rest (StreamingLLM);
   plus the full dynamic cache. Writes a PNG of exact match against budget (--plot). By default each prompt is read
   whole and the budget binds from the answer on; --prompt-block 1 reads it a token at a time, evicting after each,
   as the paper evaluates (every prompt token then reads only what the budget keeps); --prompt-block image reads it
   a pass per image. What the answers cost is printed too, against the dynamic cache: the most the cache held at
   once per answer (mean over answers, the prompt's reading included), answer tokens per second (prompt included)
   and the peak process memory over all the answers. --full-cache-layers I ... lets
   those decoder layers keep every key while the others evict: a diagnostic of which layer's eviction costs answers
   ("tokens held" then averages over the layers).

Usage: python benchmarks/kv_cache.py [--export EXPORT_DIR] [--prompt-tokens 4096] [--new-tokens 256]
       [--speed-budget 0.2] [--repeats 3] [--budgets 1.0 0.5 0.2 0.1] [--sinks 4] [--h2o-sinks N] [--sinks-on-top]
       [--ranking contribution|max|mean|sum] [--prompt-block N|image] [--speed-prompt-block N]
       [--full-cache-layers I ...]
       [--max-samples 200] [--plot docs/kv_cache_budget.png|none] [--skip-speed] [--skip-quality] [--threads 1]
Without --export, a random tiny export is built (the quality part then measures nothing useful).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arguments import at_least  # noqa: E402
from decode import Clock  # noqa: E402  (benchmarks/, this script's folder)
from plotting import plot_path, pyplot_or_exit  # noqa: E402

from vlm.cli import compose_config  # noqa: E402
from vlm.config import to_train_config  # noqa: E402
from vlm.data.conversations import ConversationDecoder  # noqa: E402
from vlm.data.processor import pad_batch  # noqa: E402
from vlm.data.shards import build_pipeline, list_shards  # noqa: E402
from vlm.data.sources import resolve_eval  # noqa: E402
from vlm.exports.vlm import export_vlm, load_vlm  # noqa: E402
from vlm.generation.h2o import H2OBudget, H2OCache  # noqa: E402
from vlm.generation.kv_cache import cached_bytes  # noqa: E402
from vlm.generation.options import IMAGE_BLOCKS, RANKINGS, H2OSettings  # noqa: E402
from vlm.metrics import answer_metrics, score_answer  # noqa: E402
from vlm.models.factory import VLMBundle, new_vlm  # noqa: E402

MiB = 2**20
NEVER_EVICT = 2**31  # a recent window no prompt reaches: that layer keeps every key


class CacheBytes(LogitsProcessor):
    """Records the cache's bytes after every forward pass (after H2O's eviction)."""

    def __init__(self, cache: DynamicCache | H2OCache):
        self.cache, self.samples = cache, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.samples.append(cached_bytes(self.cache))
        return scores


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class PeakMemory:
    """Peak resident set size above the starting one, sampled on a thread while the block runs."""

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def added(self) -> int:
        return self.peak - self.start


def split_budget(total: int, sinks: int, ranking: str | None, prompt_block: int | str | None = None,
                 heavy_share: float = 0.5) -> H2OBudget:
    """`total` tokens in all: the sinks, then heavy hitters (ranked by `ranking`) and recent tokens, `heavy_share` of
    them heavy (at least one recent); all recent with `ranking=None` (a recent-only window)."""
    rest = max(1, total - sinks)
    if ranking is None:
        return H2OBudget(heavy=0, recent=rest, sinks=sinks, prompt_block=prompt_block)
    recent = max(1, math.ceil(rest * (1 - heavy_share)))
    return H2OBudget(heavy=rest - recent, recent=recent, sinks=sinks, ranking=ranking, prompt_block=prompt_block)


# ---- 1. speed and memory on a long text prompt ----

def long_prompt(lm, ids: torch.Tensor, new_tokens: int, budget: H2OBudget | None) -> dict[str, float]:
    cache = H2OCache(lm, budget) if budget else DynamicCache()
    recorder, clock = CacheBytes(cache), Clock()
    gc.collect()
    start = time.perf_counter()
    with PeakMemory() as memory:
        if budget is not None and budget.prompt_block is not None:  # the prompt in blocks first, as vlm.chat does
            cache.read_prompt(lm, lm.get_input_embeddings()(ids))
        lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=0, cache=cache, streamer=clock,
                    logits_processor=LogitsProcessorList([recorder]))
    return {"prefill_s": clock.times[0] - start,
            "tokens_per_s": (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]),
            "cache_mib": max(recorder.samples) / MiB,
            "prompt_cache_mib": prompt_peak_keys(ids.shape[1], budget) * cached_bytes(cache)
            / max(1, cache.layers[0].keys.shape[-2]) / MiB,
            "rss_mib": memory.added / MiB}


def prompt_peak_keys(prompt_tokens: int, budget: H2OBudget | None) -> int:
    """Keys held at most while the prompt is read: all of it, or (in blocks) the budget and one block."""
    if budget is None or budget.prompt_block is None:
        return prompt_tokens
    return min(prompt_tokens, budget.total + budget.prompt_block)


def speed(lm, args: argparse.Namespace) -> None:
    ids = torch.randint(3, lm.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    budget = split_budget(round(args.speed_budget * args.prompt_tokens), args.sinks, args.ranking,
                          args.speed_prompt_block)
    reading = "whole" if budget.prompt_block is None else f"in blocks of {budget.prompt_block}"
    print(f"\n== {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens; h2o budget "
          f"{budget.total} tokens ({args.speed_budget:.0%}: {budget.heavy} heavy + {budget.recent} recent + "
          f"{budget.sinks} sinks); h2o reads the prompt {reading}; {args.repeats} repeats, alternating ==", flush=True)
    long_prompt(lm, ids[:, :256], 8, None)  # warm-up
    long_prompt(lm, ids[:, :256], 8, budget)
    runs: dict[str, list[dict[str, float]]] = {"dynamic": [], "h2o": []}
    for repeat in range(args.repeats):
        for side in (("dynamic", "h2o") if repeat % 2 == 0 else ("h2o", "dynamic")):
            runs[side].append(long_prompt(lm, ids, args.new_tokens, budget if side == "h2o" else None))
            print(f"  repeat {repeat + 1} {side}: {runs[side][-1]}", flush=True)
    medians = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    print(f"\n| {'median':<28} | {'dynamic':>10} | {'h2o':>10} | h2o / dynamic |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 12}|---------------|")
    for key, name in (("cache_mib", "peak cache MiB (decoding)"), ("prompt_cache_mib", "peak cache MiB (prompt)"),
                      ("rss_mib", "peak process memory +MiB"), ("prefill_s", "prefill s"),
                      ("tokens_per_s", "decode tokens/s")):
        d, h = medians["dynamic"][key], medians["h2o"][key]
        print(f"| {name:<28} | {d:>10.2f} | {h:>10.2f} | {h / d:>12.3f}x |")


# ---- 2. quality at a fixed budget ----

def held_out_turns(bundle: VLMBundle, val: str | None, max_samples: int) -> list:
    config = to_train_config(compose_config("train", ["stage=sft"] + ([f"data.val='{val}'"] if val else [])))
    data = resolve_eval(config.data, "conversations")
    decoder = ConversationDecoder(bundle.processor, evaluate=True, turns=config.eval.turns,
                                  group_by=config.data.eval_group_by)
    turns = []
    for count, sample in enumerate(build_pipeline(list_shards(data.val, "data.val"), decoder, train=False,
                                                  split_by_node=False)):
        if count >= max_samples:
            break
        turns += sample["scored"]
    print(f"\n== quality: {len(turns)} held-out turns from {data.val} ==", flush=True)
    return turns


@dataclass
class Answered:
    text: str
    peak_cache_bytes: int  # the most the cache held at once, the prompt's reading included
    new_tokens: int


def track_peak_bytes(cache: H2OCache) -> list[int]:
    """A one-item list that keeps the most bytes `cache` held at once: read after each layer takes a pass's keys,
    before H2O evicts."""
    peak = [0]
    for layer in cache.layers:
        def update(*args, _update=layer.update, **kwargs):
            stored = _update(*args, **kwargs)
            peak[0] = max(peak[0], cached_bytes(cache))
            return stored
        layer.update = update
    return peak


def answer(bundle: VLMBundle, turn, budget: H2OBudget | None, max_new_tokens: int,
           full_layers: tuple[int, ...] = ()) -> Answered:
    """Greedy answer to one held-out turn; `budget` None: the dynamic cache. `full_layers`: decoder layers that keep
    every key while the others evict (a diagnostic: which layer's eviction costs the answers)."""
    tokenizer = bundle.tokenizer
    batch = pad_batch([turn.prompt], tokenizer.pad_token_id, left=True)
    cache = DynamicCache() if budget is None else H2OCache(bundle.model.lm, budget)
    peak = [0] if budget is None else track_peak_bytes(cache)
    for index in full_layers if budget else ():
        cache.layers[index].budget = H2OBudget(heavy=0, recent=NEVER_EVICT, sinks=0)
    new = bundle.model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                batch["image_slots"], max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, cache=cache)
    peak_bytes = cached_bytes(cache) if budget is None else peak[0]  # a dynamic cache only grows
    return Answered(tokenizer.decode(new[0], skip_special_tokens=True), peak_bytes, new.shape[1])


def held_per_layer(budget: H2OBudget | None, prompt_tokens: int, layers: int, full_layers: tuple[int, ...]) -> float:
    """Keys a layer holds after the prompt, averaged over the layers (`full_layers` hold the whole prompt)."""
    if budget is None:
        return prompt_tokens
    return (budget.total * (layers - len(full_layers)) + prompt_tokens * len(full_layers)) / layers


def quality(bundle: VLMBundle, args: argparse.Namespace) -> dict[str, dict[float, float]]:
    turns = held_out_turns(bundle, args.val, args.max_samples)
    lengths = [len(t.prompt.input_ids) for t in turns]
    print(f"prompt tokens: min {min(lengths)}, median {statistics.median(lengths)}, max {max(lengths)}")
    max_new = to_train_config(compose_config("train", ["stage=sft"])).eval.max_new_tokens
    layers = bundle.model.lm.config.num_hidden_layers
    if any(not 0 <= index < layers for index in args.full_cache_layers):
        raise SystemExit(f"--full-cache-layers {args.full_cache_layers}: this LLM has layers 0-{layers - 1}")
    rankings = {f"h2o-{r}": r for r in args.rankings}  # h2o with each heavy-hitter ranking; the window has none
    methods = [("dynamic", 1.0)] + [(m, b) for b in args.budgets for m in (*rankings, "window")]
    results: dict[str, dict[float, float]] = {m: {} for m in ("dynamic", *rankings, "window")}
    costs: dict[tuple[str, float], dict[str, float]] = {}
    answer(bundle, turns[0], None, max_new)  # warm-up: the first call's allocations are no method's cost
    for method, fraction in methods:
        started, scored, held, answers = time.perf_counter(), [], [], []
        ranking = rankings.get(method)
        with PeakMemory() as memory:
            for turn in turns:
                total = round(fraction * len(turn.prompt.input_ids)) + (args.sinks if args.sinks_on_top else 0)
                sinks = args.h2o_sinks if ranking else args.sinks
                budget = None if method == "dynamic" else split_budget(total, sinks, ranking, args.prompt_block,
                                                                         args.heavy_share)
                held.append(held_per_layer(budget, len(turn.prompt.input_ids), layers, args.full_cache_layers))
                answers.append(answer(bundle, turn, budget, max_new, args.full_cache_layers))
                scored.append((turn.group, score_answer(answers[-1].text, turn.reference)))
        seconds = time.perf_counter() - started
        costs[method, fraction] = {"cache_kib": statistics.mean(a.peak_cache_bytes for a in answers) / 1024,
                                   "tokens_per_s": sum(a.new_tokens for a in answers) / seconds,
                                   "rss_mib": memory.added / MiB}
        metrics = answer_metrics(scored)
        results[method][fraction] = metrics["exact_match"]
        groups = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items() if k.startswith("exact_match/"))
        print(f"  {method:<16} budget {fraction:>4.0%} (mean {statistics.mean(held):.1f} tokens held): exact match "
              f"{metrics['exact_match']:.3f} ({groups}) in {seconds:.0f} s", flush=True)
    full = results["dynamic"][1.0]
    ranked = list(rankings)  # in the order given: the first is compared
    first = ranked[0]
    labels = " | ".join(ranking_label(rankings[m]) for m in ranked)
    print(f"\n| budget (of the prompt) | {labels} | recent-only window | {first} / full ({full:.3f}) | "
          f"{first} - window |")
    print("|---" * (len(ranked) + 4) + "|")
    for fraction in args.budgets:
        kept, window = [results[m][fraction] for m in ranked], results["window"][fraction]
        print(f"| {fraction:.0%} | {' | '.join(f'{v:.3f}' for v in kept)} | {window:.3f} | "
              f"{kept[0] / full if full else float('nan'):.3f} | {kept[0] - window:+.3f} |")
    print_costs(costs)
    return results


def print_costs(costs: dict[tuple[str, float], dict[str, float]]) -> None:
    """What each method's answers cost against the dynamic cache's: the peak cache per answer (mean), answer tokens
    per second (the prompt's reading included: these answers are a few tokens) and the peak process memory."""
    base = costs["dynamic", 1.0]
    print("\n| method, budget | peak cache KiB per answer (mean) | x dynamic | answer tokens/s | x dynamic | "
          "peak process memory +MiB |")
    print("|---|---|---|---|---|---|")
    for (method, fraction), cost in costs.items():
        print(f"| {method} {fraction:.0%} | {cost['cache_kib']:.1f} | {cost['cache_kib'] / base['cache_kib']:.3f} | "
              f"{cost['tokens_per_s']:.1f} | {cost['tokens_per_s'] / base['tokens_per_s']:.3f} | "
              f"{cost['rss_mib']:.1f} |")


RANKING_PLOT_LABELS = {"contribution": ("largest contribution", "D"), "max": ("largest attention", "o"),
                       "mean": ("mean attention", "v"), "sum": ("summed attention (paper)", "^")}  # what, marker


def default_mark(ranking: str) -> str:
    return " (default)" if ranking == H2OSettings.ranking else ""


def ranking_label(ranking: str) -> str:
    return f"h2o, {ranking} ranking{' (paper)' if ranking == 'sum' else ''}{default_mark(ranking)}"


def plot(results: dict[str, dict[float, float]], path: Path, sinks: int, on_top: bool,
         prompt_block: int | str | None, full_layers: tuple[int, ...] = ()) -> None:
    plt = pyplot_or_exit(path)
    if plt is None:
        return
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    lines = [(f"h2o-{r}", f"H2O, heavy hitters by {RANKING_PLOT_LABELS[r][0]}{default_mark(r)}",
              RANKING_PLOT_LABELS[r][1]) for r in RANKINGS]
    for method, label, marker in (*lines, ("window", "recent-only window (StreamingLLM)", "s")):
        if method not in results:
            continue
        budgets = sorted(results[method])
        axes.plot([100 * b for b in budgets], [results[method][b] for b in budgets], marker=marker, label=label)
    axes.axhline(results["dynamic"][1.0], color="grey", linestyle="--", label="full cache (dynamic)")
    axes.set_xscale("log")
    ticks = sorted(results["window"])
    axes.set_xticks([100 * b for b in ticks], [f"{b:.0%}" for b in ticks])
    axes.set_xticks([], minor=True)  # a log axis labels its minor ticks ("3 x 10^1") when few major ones show
    axes.set_xlabel(f"KV cache budget, share of the prompt ({sinks} sinks {'on top' if on_top else 'included'})")
    axes.set_ylabel("held-out exact match")
    reading = f"{prompt_block} token(s) a pass, evicting after each"
    if prompt_block is None:
        reading = "whole, then evicted"
    elif prompt_block == IMAGE_BLOCKS:
        reading = "a pass per image, evicting after each; the rest with the answer"
    kept = ""
    if full_layers:
        layers = ", ".join(map(str, full_layers))
        kept = f"; layers {layers} keep every key" if len(full_layers) > 1 else f"; layer {layers} keeps every key"
    axes.set_title(f"prompt read {reading}{kept}", fontsize=9)
    axes.set_ylim(0, 1.02)
    axes.legend(loc="best", fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    print(f"plot: {path}")


def prompt_block(value: str) -> int | str:
    """--prompt-block: a token count, or "image"."""
    return value if value == IMAGE_BLOCKS else int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", type=Path, help="an sft export folder (default: a random tiny one)")
    parser.add_argument("--val", help="held-out shards (default: the synthetic held-out split)")
    parser.add_argument("--prompt-tokens", type=at_least(1), default=4096)
    parser.add_argument("--new-tokens", type=at_least(2), default=256)
    parser.add_argument("--speed-budget", type=float, default=0.2)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    parser.add_argument("--heavy-share", type=float, default=0.5,
                        help="share of h2o's budget after the sinks kept as heavy hitters (the rest: recent tokens)")
    parser.add_argument("--sinks", type=at_least(0), default=4, help="sinks of the recent-only window (and of h2o)")
    parser.add_argument("--h2o-sinks", type=at_least(0), help="h2o's sinks in the quality part (default: --sinks)")
    parser.add_argument("--sinks-on-top", action="store_true",
                        help="quality part: a budget B holds B x prompt tokens plus the sinks, as generation.h2o's "
                             "defaults do (heavy 0.1 + recent 0.1 + 4 sinks); by default the sinks count within B")
    parser.add_argument("--prompt-block", type=prompt_block,
                        help="quality part: read each prompt this many tokens at a time, evicting after each (1: the "
                             "paper's evaluation, where every prompt token reads only what the budget keeps), or "
                             "'image': a pass per image, ending with its last token, the words after the last image "
                             "read with the answer's first step; by default the prompt is read whole and the budget "
                             "binds from the answer on")
    parser.add_argument("--speed-prompt-block", type=at_least(1),
                        help="speed part: h2o reads the long prompt this many tokens at a time, evicting after each, "
                             "so its memory stays within the budget + the block while the prompt is read")
    parser.add_argument("--rankings", choices=RANKINGS, nargs="+", default=list(RANKINGS),
                        help="quality part: the heavy-hitter rankings h2o runs with (the first one is compared with "
                             "the window and the full cache)")
    parser.add_argument("--ranking", choices=RANKINGS, default=H2OSettings.ranking,
                        help="how h2o ranks heavy hitters in the speed part (the quality part runs each)")
    parser.add_argument("--full-cache-layers", type=int, nargs="+", default=(),
                        help="quality part, a diagnostic: these decoder layers (from 0) keep every key while the "
                             "others evict, to see which layer's eviction costs the answers")
    parser.add_argument("--max-samples", type=at_least(1), default=200,
                        help="held-out samples (each has several turns)")
    parser.add_argument("--plot", type=plot_path, default=Path("docs/kv_cache_budget.png"),
                        help="where the PNG goes; none: no plot")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--threads", type=at_least(1), default=1)
    args = parser.parse_args()
    if args.full_cache_layers and args.prompt_block is not None:  # one mask serves every layer of a pass
        parser.error("--full-cache-layers needs the prompt read whole (no --prompt-block): a pass of several tokens "
                     "is masked once for all layers, which then must hold the same number of keys")
    pyplot_or_exit(args.plot)  # a missing plotting library stops the run now, not after the measuring
    args.h2o_sinks = args.sinks if args.h2o_sinks is None else args.h2o_sinks
    args.full_cache_layers = tuple(args.full_cache_layers)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="vlm-bench-kv-cache-") as scratch:  # the random export, if any
        if args.export is None:
            config = to_train_config(compose_config("train", ["stage=sft"]))
            args.export = export_vlm(Path(scratch) / "export", new_vlm(config.model, config.tiler), "sft",
                                     config.tiler)
            print("no --export: a random tiny export, removed at the end")
        measure(load_vlm(args.export), args)


def measure(bundle: VLMBundle, args: argparse.Namespace) -> None:
    lm = bundle.model.lm
    print(f"model: {args.export} (LLM: {lm.config.num_hidden_layers} layers, width {lm.config.hidden_size}, "
          f"{lm.config.num_key_value_heads} key-value heads); torch threads {args.threads}")
    with torch.inference_mode():
        if not args.skip_speed:
            speed(lm, args)
        if not args.skip_quality:
            plot(quality(bundle, args), args.plot, args.sinks, args.sinks_on_top, args.prompt_block,
                 args.full_cache_layers)


if __name__ == "__main__":
    main()
