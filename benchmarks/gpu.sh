#!/usr/bin/env bash
# One command for a GPU machine that has PyTorch but may lack our other packages and any network:
#   bash benchmarks/gpu.sh RESULTS_DIR [WHEELS_DIR]
# Installs what is missing from WHEELS_DIR (pip download -r requirements.txt -d WHEELS_DIR, minus
# torch), runs every benchmark inside about 8 minutes, writes JSON lines, summary.md and plots.
set -uo pipefail
results=${1:?usage: benchmarks/gpu.sh RESULTS_DIR [WHEELS_DIR]}
wheels=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$results"
if [ -n "$wheels" ]; then
  grep -vE '^(torch|torchvision)==' requirements.txt > "$results/requirements-gpu.txt"
  python -m pip install -q --no-index --find-links "$wheels" -r "$results/requirements-gpu.txt" 2>&1 | tail -3
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$results/device.txt" 2>&1
python -m benchmarks.params --results "$results"
timeout 150 python -m benchmarks.train_step --config configs/paper.yaml --patch 96 --batch 2 --task-mix 1 2 --results "$results"
timeout 60 python -m benchmarks.train_step --config configs/paper.yaml --patch 96 --batch 8 --task-mix 1 2 4 8 --only ours --results "$results"
timeout 180 python -m benchmarks.inference_speed --config configs/paper.yaml --sizes 128 256 --prompts 1 2 5 10 20 --roi 96 --overlap 0.5 --sw-batch-size 4 --repeats 2 --results "$results"
python make_phantoms.py --output data/phantoms --preset small --cases 4 --few-shot-cases 2 > /dev/null 2>&1
timeout 60 python -m benchmarks.dataloader --patch 96 --batches 6 --results "$results"
python -m benchmarks.report "$results"
