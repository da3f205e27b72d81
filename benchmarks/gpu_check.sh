#!/usr/bin/env bash
# The GPU check: speed and memory of this project's GRPO and SDPO training steps on models of the
# published Qwen2.5-0.5B, Qwen3-0.6B and Qwen3-1.7B shapes (random weights: nothing to download),
# at the paper's batch of 32 prompts x 8 answers with 128-token prompts and 512-token answers,
# bf16 autocast. Under 8 minutes on one H100; prints one markdown table.
#     bash benchmarks/gpu_check.sh            # needs a CUDA build of torch and one GPU
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
    python benchmarks/bench_step.py --plan gpu --prompts 32 --group 8 --prompt-len 128 \
    --answer-len 512 2>&1 | grep -v -i "warn"
