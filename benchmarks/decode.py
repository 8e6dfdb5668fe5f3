"""Benchmark: decode speed and time to first token, vlm's VisionLanguageModel vs transformers' LLaVA, in one run.

Both sides get the same sizes, built with random weights (nothing is downloaded):
- vision: our timm ViT (model.vision width/depth/heads, image size, patch size) vs a CLIPVisionModel with the same
  width, depth, heads, MLP width (4x), patch and image size, GELU;
- projector: our mlp2x_gelu vs LLaVA's 2-layer GELU projector, both vision width -> LLM width -> LLM width;
- LLM: the same LlamaConfig on both sides (HF LlamaForCausalLM);
- prompt: the same ids: one image (reduction "none" on our side, so both spend `(S/patch)^2` image tokens; LLaVA's
  "default" strategy also drops CLS) plus the same text tokens.
Decoding is greedy through each model's own `generate` with the KV cache, forced to exactly N new tokens
(min_new_tokens = max_new_tokens). A streamer timestamps every token: time to first token (TTFT) is call -> first new
token (vision encoder + prefill + one step); decode tokens/s is (N - 1) / (last - first). Each measurement is repeated
with the two sides alternating, and medians are reported. Ratios > 1.0 mean ours is faster.

Usage: python benchmarks/decode.py [--preset tiny|small] [--new-tokens 64] [--text-tokens 32] [--repeats 9]
                                   [--device cpu|cuda] [--dtype float32|bfloat16] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arguments import at_least  # noqa: E402  (benchmarks/, this script's folder)
from llava_twin import llava_twin  # noqa: E402

from vlm.cli import CONFIG_DIR  # noqa: E402
from vlm.config import ModelConfig  # noqa: E402
from vlm.models.vlm import VisionLanguageModel  # noqa: E402

VOCAB = 1024
IMAGE_TOKEN_ID = VOCAB - 1
EOS_ID, PAD_ID = 2, 0

# "tiny" is configs/model/tiny.yaml (what the tests and the synthetic run use); "small" is a few times larger, so the
# per-token work is less dominated by Python overhead.
PRESETS = {
    "tiny": {},
    "small": {
        "vision": {"image_size": 224, "patch_size": 16, "width": 384, "depth": 6, "heads": 6},
        "llm": {"config": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
                           "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 1024}},
    },
}


class Clock(BaseStreamer):
    """Timestamps each batch of new tokens; the first put() is the prompt."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def model_config(preset: str) -> ModelConfig:
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONFIG_DIR / "model" / "tiny.yaml"),
                             PRESETS[preset], {"projector": {"reduction": "none"},
                              "vision": {"feature_layer": -1, "global_pool": None}})  # a CLS token, as LLaVA's ViT
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def build_ours(config: ModelConfig) -> VisionLanguageModel:
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **config.llm.config))
    return VisionLanguageModel(config, lm, IMAGE_TOKEN_ID)


def measure(generate, new_tokens: int) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s) of one greedy generation of exactly `new_tokens` tokens."""
    clock = Clock()
    start = time.perf_counter()
    generate(streamer=clock, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
             eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    assert len(clock.times) == new_tokens, f"expected {new_tokens} tokens, got {len(clock.times)}"
    return clock.times[0] - start, (new_tokens - 1) / (clock.times[-1] - clock.times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--new-tokens", type=at_least(2), default=64)
    parser.add_argument("--text-tokens", type=at_least(0), default=32,
                        help="text tokens in the prompt besides the image")
    parser.add_argument("--repeats", type=at_least(1), default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=at_least(1), default=1,
                        help="torch intra-op threads (default 1: steady ratios on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    config = model_config(args.preset)
    ours = build_ours(config).to(device, dtype).eval()
    theirs = llava_twin(ours).to(device, dtype).eval()
    image_tokens = ours.tokens_per_tile
    text = torch.randint(3, VOCAB - 1, (1, args.text_tokens))
    ids = torch.cat([text[:, :4], torch.full((1, image_tokens), IMAGE_TOKEN_ID), text[:, 4:]], dim=1).to(device)
    mask = torch.ones_like(ids)
    pixels = torch.randn(1, 3, config.vision.image_size, config.vision.image_size, device=device, dtype=dtype)

    def params(model: torch.nn.Module) -> str:
        return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"

    vit = f"{ours.vision.width}x{len(ours.vision.vit.blocks)} @ {config.vision.image_size}px/{config.vision.patch_size}"
    print(f"preset {args.preset} on {device} ({args.dtype}, {torch.get_num_threads()} threads): ViT {vit}, "
          f"Llama {config.llm.config['hidden_size']}x{config.llm.config['num_hidden_layers']}; prompt {ids.shape[1]} "
          f"tokens ({image_tokens} image); {args.new_tokens} new tokens; params ours {params(ours)}, "
          f"LLaVA {params(theirs)}")

    sides = {
        "ours": lambda **kw: ours.generate(ids, mask, pixels, **kw),
        "llava": lambda **kw: theirs.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kw),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    with torch.inference_mode():
        for generate in sides.values():  # warm-up: allocator, kernels, lazy init
            measure(generate, min(8, args.new_tokens))
        for repeat in range(args.repeats):
            order = list(sides.items()) if repeat % 2 == 0 else list(sides.items())[::-1]
            for name, generate in order:
                results[name].append(measure(generate, args.new_tokens))

    summary = {}
    for name, runs in results.items():
        ttft, tps = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        best_ttft, best_tps = min(r[0] for r in runs), max(r[1] for r in runs)
        summary[name] = (ttft, tps, best_ttft, best_tps)
        print(f"{name:>6}: TTFT {ttft * 1000:8.1f} ms   decode {tps:8.1f} tokens/s   (median of {len(runs)}; best "
              f"{best_ttft * 1000:.1f} ms, {best_tps:.1f} tokens/s)")
    ours_, llava = summary["ours"], summary["llava"]
    print(f"ratio ours/LLaVA (median): decode {ours_[1] / llava[1]:.2f}x, TTFT {llava[0] / ours_[0]:.2f}x;  "
          f"(best): decode {ours_[3] / llava[3]:.2f}x, TTFT {llava[2] / ours_[2]:.2f}x  (> 1.0: ours is faster)")


if __name__ == "__main__":
    main()
