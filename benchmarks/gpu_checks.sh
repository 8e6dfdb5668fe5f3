#!/bin/bash
# The GPU figures in the README, in one run on one GPU (about 6 minutes on an H200).
#
# Usage, from the repo root, with vlm installed:  bash benchmarks/gpu_checks.sh [OUT_DIR] [CONTRASTIVE_EXPORT]
#   OUT_DIR             logs and plots go here (default: gpu_checks/)
#   CONTRASTIVE_EXPORT  the ViT that align starts from (default: the newest contrastive export under checkpoints/)
#
# 1. benchmarks/decode.py: decode tokens/s and time to first token against LLaVA, bf16;
# 2. benchmarks/attention.py to 128k tokens: one layer's forward + backward time and peak memory, dense SDPA against
#    local_global (sdpa, flex), then the attention kernels alone; KV-cache bytes; then flex's kernel settings side by
#    side at 32k (Hopper's TMA, smaller blocks, more warps);
# 3. align + sft under FSDP with bf16 mixed precision and local_global flex attention (window 24, stride 8).
set -o pipefail
case "$1" in -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" ||
  { echo "gpu_checks.sh measures GPUs, and torch sees none here" >&2; exit 2; }
out=${1:-gpu_checks}
init=${2:-$(ls -d checkpoints/contrastive/*/export 2>/dev/null | sort | tail -n 1)}
if [ -z "$init" ]; then
  echo "no contrastive export under checkpoints/contrastive/: run python -m vlm.train stage=contrastive first," \
       "or pass an export folder as the second argument" >&2
  exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
started=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - started )) s"; }
failed=()  # a step that fails is named at the end (and the exit status says so); the others still run

stamp "decode"
python benchmarks/decode.py --device cuda --dtype bfloat16 --repeats 5 2>&1 | tee "$out/decode.log" || failed+=(decode)
stamp "attention"
plot="$out/attention_benchmark_cuda.png"
python -c "import matplotlib" 2>/dev/null || { echo "no matplotlib here: the figures only, no plot"; plot=none; }
python benchmarks/attention.py --device cuda --max-length 131072 --max-cache 131072 \
  --plot "$plot" 2>&1 | tee "$out/attention.log" || failed+=(attention)
stamp "flex kernel settings at 32k"
python benchmarks/attention.py --device cuda --max-length 32768 --max-cache 1024 --kernel-lengths 32768 --plot none \
  --flex-kernel-options '{}' --flex-kernel-options '{"USE_TMA": true}' \
  --flex-kernel-options '{"BLOCK_M": 64, "BLOCK_N": 64}' --flex-kernel-options '{"num_warps": 8}' \
  2>&1 | tee "$out/flex_settings.log" || failed+=("flex settings")
stamp "align + sft, FSDP, bf16, flex"
sparse="model.llm.attention=local_global model.llm.sparse.window=24 model.llm.sparse.stride=8 model.llm.sparse.kernel=flex"
common="trainer=gpu trainer.strategy=fsdp data.num_workers=4 output_root=$out/runs $sparse"
{ python -m vlm.train stage=align "init_from=$init" $common 2>&1 | tee "$out/align.log" &&
  python -m vlm.train stage=sft $common 2>&1 | tee "$out/sft.log"; } || failed+=("align + sft")
stamp "done"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
