"""Write the built-in CT phantom data sets (nnU-Net v2 raw layout).

Example: ``python make_phantoms.py --output data/phantoms --preset small --cases 12``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datamodules.phantoms import DATASETS, FEW_SHOT_DATASET, PRESETS, write_dataset
from inference.preview import save_preview


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=Path("data/phantoms"), help="root folder of the data sets")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="size: small (CPU) or full (GPU)")
    parser.add_argument("--cases", type=int, default=12, help="cases per joint data set")
    parser.add_argument("--few-shot-cases", type=int, default=10, help="cases in the renal-artery few-shot set")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed writes identical files")
    parser.add_argument("--force", action="store_true", help="rewrite cases that already exist")
    parser.add_argument("--preview", action="store_true", help="also write a PNG overlay of each case")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cases < 1 or args.few_shot_cases < 1:
        print("error: --cases and --few-shot-cases must be at least 1", file=sys.stderr)
        return 2
    preview = (
        (lambda stem, image, labels: save_preview(stem.with_suffix(".png"), image, labels)) if args.preview else None
    )
    preset = PRESETS[args.preset]
    for dataset in DATASETS:
        write_dataset(args.output, dataset, args.cases, preset, args.seed, args.force, on_case=preview)
    write_dataset(args.output, FEW_SHOT_DATASET, args.few_shot_cases, preset, args.seed, args.force, on_case=preview)
    return 0


if __name__ == "__main__":
    sys.exit(main())
