#!/usr/bin/env bash
# One command for a GPU machine that has PyTorch but may lack our other packages and any network:
#   bash benchmarks/gpu.sh RESULTS_DIR [WHEELS_DIR] [TABLE]
# Installs the wheels in WHEELS_DIR beside the image's packages (what a PyTorch GPU image lacks, 59 MB:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d WHEELS_DIR \
#     monai==1.6.1 torchio==1.2.1 deprecated jsonargparse==4.53.0 docstring-parser typeshed-client \
#     importlib_resources omegaconf==2.4.0 antlr4-python3-runtime nibabel==5.4.2 SimpleITK==2.5.7 \
#     pydicom==3.0.2 pynrrd==1.1.3
# ), runs every benchmark within about 8 minutes (each step is cut at its own limit and at the
# 8-minute deadline; its records up to then are kept), writes JSON lines, summary.md and plots.
# cpu_step is CPU-only and not run here.
set -uo pipefail
results=${1:?usage: benchmarks/gpu.sh RESULTS_DIR [WHEELS_DIR] [TABLE]}
wheels=${2:-}
table=${3:-}
cd "$(dirname "$0")/.."
mkdir -p "$results"
if [ -n "$wheels" ]; then
  site=$(mktemp -d)
  python -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl 2>&1 | tail -3
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + 465))  # the report runs after it
step() {  # step LIMIT_SECONDS COMMAND...: run with the smaller of LIMIT and the time left
  local limit=$1 left=$((deadline - SECONDS))
  shift
  ((left < limit)) && limit=$left
  if ((limit < 10)); then echo "skipped (deadline): $*" | tee -a "$results/skipped.txt"; return; fi
  echo "== $* (limit ${limit}s)"
  timeout "$limit" "$@" || echo "exit $? after at most ${limit}s: $*" | tee -a "$results/skipped.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$results/device.txt" 2>&1
paper=(--config configs/paper.yaml)
step 45 python -m benchmarks.params "${paper[@]}" --results "$results"
# training step, 96^3, batch 2, bf16: SwinUNETR(48) at one prompt; ours at 1/4/8 prompts per image
step 90 python -m benchmarks.train_step "${paper[@]}" --patch 96 --batch 2 --prompts 1 4 8 --results "$results"
python make_phantoms.py --output data/phantoms --preset small --cases 4 --few-shot-cases 2 > /dev/null 2>&1
# configs/paper.yaml as written (augmentation, 8 workers, DDP strategy, bf16) for 3 short epochs (1 joint,
# 2 path), uninterrupted twice and stopped in phase 2 then resumed; CLIP's architecture with random
# weights unless TABLE (an embedding table of the phantom prompts, PromptEmbedder.save_table) is given
text=(--model.text_encoder_weights null)
[ -n "$table" ] && text=(--model.text_encoder table --model.text_encoder_weights "$(realpath "$table")" --model.embedding_dim null)
step 150 python -m benchmarks.resume_smoke "${paper[@]}" --joint-epochs 1 --path-epochs 2 --stop-epoch 2 \
  --steps-per-epoch 4 --results "$results" -- "${text[@]}"
# sliding window 256^3: 1 and 10 prompts, full and trimmed timed in turns
step 100 python -m benchmarks.inference_speed "${paper[@]}" --sizes 256 --prompts 1 10 --repeats 2 --results "$results"
step 45 python -m benchmarks.dataloader --patch 96 --batches 6 --results "$results"
# what time is left: 100 prompts on 128^3 (about 60x one prompt's decoder work when the 100 routes
# differ), then compiled (SwinUNETR whole, ours per block; compilation in the warm-up steps)
step 60 python -m benchmarks.inference_speed "${paper[@]}" --sizes 128 --prompts 1 100 --repeats 1 --results "$results"
step 210 python -m benchmarks.train_step "${paper[@]}" --patch 96 --batch 2 --prompts 1 4 8 --compile --results "$results"
python -m benchmarks.report "$results"
