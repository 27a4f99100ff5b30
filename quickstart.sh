#!/usr/bin/env bash
# The main job on a fresh machine: install, write the small phantoms, train both phases, export a
# trimmed model, segment held-out phantoms with it and evaluate them. About 11 minutes on 2 CPU cores
# with native bfloat16 (AVX512-BF16) plus about 3 for the install; on 2 AVX2-only cores, in 32-bit,
# 27 min plus the install (measured 2026-12-07; docs/experiments.md, thirty-third session).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --disable-pip-version-check -q -r requirements.txt
python make_phantoms.py --output data/phantoms --preset small --cases 12 --few-shot-cases 8
python make_phantoms.py --output data/phantoms_test --preset small --cases 2 --few-shot-cases 1 --seed 1
# The config trains in bf16-mixed: 3x faster a step than 32-true on a CPU with native bfloat16, 20x
# slower on one without. Train in the precision this CPU runs fast; the recipe is otherwise the same.
precision=$(python -c "import train; print('bf16-mixed' if train.cpu_has_native_bf16() else '32-true')")
echo "quickstart: training in $precision on this CPU"
python train.py fit --config configs/quickstart.yaml --trainer.precision "$precision"
# Segmentation averages 4 shifted grids, half the cost of segment.py's default 8, to keep the whole job
# within 15 minutes (README, "Segmenting a new CT"; docs/experiments.md, twenty-eighth session).
for dataset in Dataset001_PhantomAbdomen Dataset002_PhantomThorax Dataset003_PhantomLesions; do
  prompts=$(python -c "import sys; from datamodules.registry import load_registry as r; print('\n'.join(t.prompt for e in r('configs/data/phantoms_test.yaml') if e.path.name == sys.argv[1] for t in e.tasks))" "$dataset")
  args=()
  while IFS= read -r prompt; do args+=(--prompt "$prompt"); done <<< "$prompts"
  python segment.py --checkpoint outputs/quickstart/checkpoints/trimmed.pt --input "data/phantoms_test/$dataset/imagesTr" \
    "${args[@]}" --output "outputs/quickstart/segment/$dataset" --overlap 0.25 --grid-shifts 4 --overwrite
  python evaluate.py --pred "outputs/quickstart/segment/$dataset" --gt "data/phantoms_test/$dataset" \
    --registry configs/data/phantoms_test.yaml --output "outputs/quickstart/eval/$dataset" --overwrite
done
python evaluate.py --pool outputs/quickstart/eval --overwrite   # every task over the 3 data sets: outputs/quickstart/eval/pooled.md
