"""Benchmark: local + global sparse attention (model.llm.attention=local_global) vs dense causal SDPA, in one run.

Four measurements, each side by side in this process:
1. forward + backward time of one decoder layer (a 1-layer Llama: attention + MLP, mask building included) at
   sequence lengths from 512 up to --max-length, for dense causal SDPA (transformers' `sdpa`, `is_causal`), the
   local_global pattern through SDPA with a boolean mask, and, on GPUs, through flex_attention with a BlockMask
   (CPUs run `kernel=flex` through SDPA, see vlm.models.attention.flex_runs_on); with peak memory above the start
   (CUDA: the allocator's peak; CPU: the process's resident memory, sampled every millisecond);
2. on GPUs, the attention kernels alone, forward + backward on the same q, k, v: dense causal SDPA (flash) against
   compiled flex_attention with the pattern's cached BlockMask over gathered global keys (the layer adds the same
   projections and MLP to both sides, which dilutes the kernel's gain);
3. the crossover: the first length where a local_global side beats dense;
4. decode KV-cache bytes after N tokens: the same keys and values fed to transformers' DynamicCache layer and to
   vlm's LocalGlobalCache layer, N up to --max-cache.
Repeats alternate the sides and report medians. A PNG plot goes to --plot (none: no plot).

Usage: python benchmarks/attention.py [--max-length 8192] [--max-cache 131072] [--window 1024] [--stride 64]
                                      [--sinks 4] [--repeats 3] [--device cpu|cuda] [--no-flex]
                                      [--kernel-lengths 8192,32768] [--flex-kernel-options JSON ...]
                                      [--plot PATH|none]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention.flex_attention import flex_attention
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arguments import at_least  # noqa: E402
from plotting import plot_path, pyplot_or_exit  # noqa: E402  (benchmarks/, this script's folder)

from vlm.config import LLMConfig, SparseAttentionConfig  # noqa: E402
from vlm.generation.kv_cache import LocalGlobalLayer  # noqa: E402
from vlm.models.attention import (  # noqa: E402
    SparsePattern,
    flex_runs_on,
    gather_globals,
    gathered_block_mask,
    use_attention,
)

WIDTH, HEADS, HEAD_DIM = 512, 8, 64  # one layer of a small LLM (SmolLM2-360M has width 960, 15 heads of 64)


class PeakMemory:
    """Peak memory above the start of a `with` block: CUDA's allocator peak, or resident memory sampled on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def _resident(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._resident() - self._start)
            time.sleep(0.001)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start, self._stop = self._resident(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        else:
            self._stop.set()
            self._thread.join()


def one_layer(attention: str, kernel: str, pattern: SparsePattern, device: torch.device,
              dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=1,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=1 << 18)
    lm = LlamaForCausalLM(config).to(device, dtype)
    # the dense side keeps the defaults: sparse settings it does not read would be warned about as unused
    sparse = SparseAttentionConfig(window=pattern.window, stride=pattern.stride, sinks=pattern.sinks, kernel=kernel) \
        if attention == "local_global" else SparseAttentionConfig()
    use_attention(lm, LLMConfig(name_or_path=None, tokenizer=None, config={}, gradient_checkpointing=False,
                                max_length=8, chat_template=None, attention=attention, sparse=sparse))
    return lm


def step(lm: LlamaForCausalLM, embeds: torch.Tensor) -> None:
    hidden = lm.model(inputs_embeds=embeds).last_hidden_state  # (1, L, D)
    hidden.float().square().mean().backward()
    if embeds.device.type == "cuda":
        torch.cuda.synchronize()


def report_failure(what: str, length: int, err: BaseException, device: torch.device) -> None:
    """Print why a side failed at a length (out of memory, mostly), and hand what it left behind back to the
    allocator, so the next side starts clean."""
    print(f"  {what} at {length}: {str(err).splitlines()[0][:100]}")
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_kernels(lengths: list[int], pattern: SparsePattern, repeats: int, device: torch.device,
                 flex_options: list[dict[str, Any]]) -> None:
    """Prints the median seconds of the attention kernels alone, forward + backward, bf16, one sample of
    HEADS heads. Dense: causal SDPA. Flex: flex_attention compiled for each length, with the cached BlockMask and the
    global keys gathered in front, as `kernel=flex` runs it; once per set of `kernel_options` (block sizes, warps,
    stages) in `flex_options`, to find the fastest for a GPU."""
    compiles = len(lengths) * len(flex_options) + 1
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, compiles)  # one per length, set
    flex = torch.compile(flex_attention, dynamic=False)

    def dense_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def flex_step(options: dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            block_mask = gathered_block_mask(pattern, q.shape[-2], q.device)
            return flex(q, gather_globals(k, pattern.stride), gather_globals(v, pattern.stride), block_mask=block_mask,
                        kernel_options=options or None)
        return run

    flex_sides = {f"local_global flex {json.dumps(options)}" if options else "local_global flex": flex_step(options)
                  for options in flex_options}
    kernels = {"dense sdpa": dense_step, **flex_sides}
    for length in lengths:
        q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for repeat in range(repeats + 1):  # the first round warms up (compiles flex, builds the block mask)
            for name, kernel in kernels.items():
                try:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    kernel(q, k, v).sum().backward()
                    torch.cuda.synchronize()
                    if repeat:
                        times[name].append(time.perf_counter() - start)
                except Exception as err:  # out of memory, or kernel options this GPU cannot run
                    report_failure(f"kernel {name}", length, err, device)
        medians = {name: statistics.median(seconds) for name, seconds in times.items() if seconds}
        dense = medians.get("dense sdpa")
        for name in flex_sides:
            sparse = medians.get(name)
            ratio = f"flex {dense / sparse:5.2f}x dense's speed" if dense and sparse else ""
            print(f"kernels L={length:6d}  dense sdpa {dense * 1e3 if dense else float('nan'):8.2f} ms  {name} "
                  f"{sparse * 1e3 if sparse else float('nan'):8.2f} ms  {ratio}", flush=True)


def time_layers(lengths: list[int], sides: dict[str, LlamaForCausalLM], repeats: int,
                device: torch.device, dtype: torch.dtype) -> dict[str, dict[int, tuple[float, int]]]:
    """{side: {length: (median seconds, peak bytes)}}; a side that fails at a length (memory) is left out there."""
    results: dict[str, dict[int, tuple[float, int]]] = {name: {} for name in sides}
    for length in lengths:
        embeds = torch.randn(1, length, WIDTH, device=device, dtype=dtype, requires_grad=True)
        failed: set[str] = set()  # sides left out at this length: not run (nor reported) again
        for name, lm in sides.items():  # warm-up: compiles flex kernels, builds and caches block masks
            try:
                step(lm, embeds)
            except (RuntimeError, MemoryError) as err:
                failed.add(name)
                report_failure(name, length, err, device)
        times: dict[str, list[float]] = {name: [] for name in sides}
        peaks: dict[str, int] = {name: 0 for name in sides}
        for _ in range(repeats):
            for name, lm in sides.items():
                if name in failed:
                    continue
                try:
                    with PeakMemory(device) as memory:
                        start = time.perf_counter()
                        step(lm, embeds)
                        times[name].append(time.perf_counter() - start)
                    peaks[name] = max(peaks[name], memory.peak)
                except (RuntimeError, MemoryError) as err:
                    failed.add(name)
                    times[name] = []
                    report_failure(name, length, err, device)
        for name in sides:
            if times[name]:
                results[name][length] = (statistics.median(times[name]), peaks[name])
        row = "  ".join(f"{name} {results[name][length][0] * 1e3:8.1f} ms {results[name][length][1] / 2**20:7.1f} MiB"
                        for name in sides if length in results[name])
        print(f"L={length:6d}  {row}", flush=True)
    return results


def kv_bytes(lengths: list[int], pattern: SparsePattern, device: torch.device, dtype: torch.dtype,
             chunk: int = 1024) -> dict[str, dict[int, int]]:
    """Bytes one layer's cache holds after N tokens, fed in chunks of `chunk` as a prefill, then decode steps would."""
    out: dict[str, dict[int, int]] = {"dense": {}, "local_global": {}}
    for name, layer_class in (("dense", DynamicLayer), ("local_global", LocalGlobalLayer)):
        layer = layer_class() if name == "dense" else layer_class(pattern)
        seen = 0
        for length in lengths:
            while seen < length:
                new = min(chunk, length - seen)
                keys = torch.randn(1, HEADS, new, HEAD_DIM, device=device, dtype=dtype)
                layer.update(keys, keys.clone(), kwargs={"position_ids": torch.arange(seen, seen + new)[None]})
                seen += new
            out[name][length] = (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
    return out


def plot(path: Path, timing: dict[str, dict[int, tuple[float, int]]], cache: dict[str, dict[int, int]],
         title: str) -> None:
    plt = pyplot_or_exit(path)
    if plt is None:
        return
    fig, (ax_time, ax_memory, ax_cache) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, rows in timing.items():
        lengths = sorted(rows)
        label = f"{name} (fwd+bwd)"
        ax_time.plot(lengths, [rows[n][0] * 1e3 for n in lengths], marker="o", label=label)
        ax_memory.plot(lengths, [rows[n][1] / 2**20 for n in lengths], marker="o", label=label)
    for ax, what in ((ax_time, "time per layer (ms)"), (ax_memory, "peak memory above start (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=what)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for name, rows in cache.items():
        lengths = sorted(rows)
        ax_cache.plot(lengths, [rows[n] / 2**20 for n in lengths], marker="o", label=name)
    ax_cache.set(xscale="log", yscale="log", xlabel="tokens decoded", ylabel="KV cache per layer (MiB)")
    ax_cache.legend(fontsize=8)
    ax_cache.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"plot: {path}")


def lengths_list(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token counts") from None
    if any(n < 1 for n in lengths):
        raise argparse.ArgumentTypeError(f"{text!r}: every length must be at least 1")
    return lengths


def kernel_options(text: str) -> dict[str, Any]:
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({err.msg})") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object of kernel options")
    return options


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # large buffers back to the OS when freed, so RSS peaks are real
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-length", type=at_least(512), default=8192)
    parser.add_argument("--max-cache", type=at_least(1024), default=131072)
    parser.add_argument("--window", type=at_least(1), default=1024)
    parser.add_argument("--stride", type=at_least(1), default=64)
    parser.add_argument("--sinks", type=at_least(0), default=4)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--no-flex", action="store_true", help="skip the flex_attention side (it compiles first)")
    parser.add_argument("--kernel-lengths", type=lengths_list, default=None,
                        help="comma-separated lengths for the kernels-alone timing on GPUs (each compiles flex once); "
                             "default: every timed length from 8192 up")
    parser.add_argument("--flex-kernel-options", type=kernel_options, action="append", default=None,
                        help="a JSON object of flex_attention kernel_options for the kernels-alone timing, e.g. "
                             "'{\"BLOCK_M\": 64, \"BLOCK_N\": 64, \"num_warps\": 4}'; repeat it to time several "
                             "side by side (default: flex's own choice)")
    parser.add_argument("--plot", type=plot_path, default=Path("docs/attention_benchmark.png"),
                        help="where the PNG goes; none: no plot")
    args = parser.parse_args()
    pyplot_or_exit(args.plot)  # a missing plotting library stops the run now, not after the measuring
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pattern = SparsePattern(args.window, args.stride, args.sinks)
    lengths = [n for n in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072) if n <= args.max_length]
    print(f"one decoder layer: width {WIDTH}, {HEADS} heads of {HEAD_DIM}; pattern window {pattern.window}, stride "
          f"{pattern.stride}, sinks {pattern.sinks}; {device} {dtype}, {args.threads} thread(s)")

    sides = {"dense sdpa": one_layer("dense", "sdpa", pattern, device, dtype),
             "local_global sdpa": one_layer("local_global", "sdpa", pattern, device, dtype)}
    run_flex = not args.no_flex and flex_runs_on(device)
    if run_flex:
        sides["local_global flex"] = one_layer("local_global", "flex", pattern, device, dtype)
    elif not args.no_flex:
        print("kernel=flex runs through SDPA on CPUs (vlm.models.attention.flex_runs_on): no flex side here")
    timing = time_layers(lengths, sides, args.repeats, device, dtype)
    if run_flex:
        time_kernels(args.kernel_lengths or [n for n in lengths if n >= 8192], pattern, args.repeats, device,
                     args.flex_kernel_options or [{}])

    for name in sides:
        if name.startswith("local_global"):
            reference = "dense sdpa"
            both = sorted(set(timing[name]) & set(timing[reference]))
            ratios = {n: timing[reference][n][0] / timing[name][n][0] for n in both}  # > 1: faster than dense
            losing = [n for n in both if ratios[n] <= 1]
            crossover = next((n for n in both if not losing or n > losing[-1]), None)  # wins from here on
            print(f"{name} vs {reference}: crossover {crossover or f'none up to {both[-1]}'}; speed vs dense "
                  + ", ".join(f"{n}: {ratios[n]:.2f}x" for n in both))

    cache_lengths = [n for n in (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072) if n <= args.max_cache]
    cache = kv_bytes(cache_lengths, pattern, device, dtype)
    for n in cache_lengths:
        print(f"KV cache after {n:6d} tokens, per layer: dense {cache['dense'][n] / 2**20:8.2f} MiB  local_global "
              f"{cache['local_global'][n] / 2**20:6.2f} MiB  ratio {cache['local_global'][n] / cache['dense'][n]:.4f}")
    title = (f"local_global (window {pattern.window}, stride {pattern.stride}, sinks {pattern.sinks}) vs dense: one "
             f"layer, width {WIDTH}, {device.type} {str(dtype).removeprefix('torch.')}, {args.threads} thread(s)")
    plot(args.plot, timing, cache, title)


if __name__ == "__main__":
    main()
