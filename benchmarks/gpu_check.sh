#!/usr/bin/env bash
# The GPU check: speed and memory of this project's GRPO and SDPO training steps on models of the
# published Qwen2.5-0.5B, Qwen3-0.6B, 1.7B and 4B shapes (random weights: nothing to download),
# 128-token prompts and 512-token answers, bf16 autocast, one timed step per row.
#     bash benchmarks/gpu_check.sh           # the three shapes at the paper's batch, 32 x 8 (< 8 min)
#     bash benchmarks/gpu_check.sh memory    # the memory options at the 0.6B shape (~3 min)
#     bash benchmarks/gpu_check.sh lora      # LoRA rank 32 at 1.7B and 4B, and 1.7B with 8-bit
#                                            # AdamW and a bf16 teacher (needs bitsandbytes)
# Needs a CUDA build of torch and one GPU; prints one markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
plan=gpu
[ "${1:-}" = memory ] && plan=gpu-memory
[ "${1:-}" = lora ] && plan=gpu-lora
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
    python benchmarks/bench_step.py --plan $plan --prompts 32 --group 8 --prompt-len 128 \
    --answer-len 512 2>&1 | grep -v -i "warn"
