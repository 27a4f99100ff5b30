"""Training samples per second from the DataModule, cached and uncached, per loader worker, and what
that extrapolates to on a GPU node.

    python -m benchmarks.dataloader --patch 64 --batches 5                       # small phantoms, 0/1/2 workers
    python make_phantoms.py --preset full --cases 2 --few-shot-cases 1 --output data/phantoms_full
    python -m benchmarks.dataloader --data-root data/phantoms_full --spacings 0.6 1.0 1.5 --patch 96 \\
        --workers 1 2 4 --modes cached --batches 20 --random-spacing 0              # the `full` preset

Each measurement is one JSON line (samples/s in all and per worker); the last line takes the
per-worker rate of the fewest workers measured (each has a core of its own there) times
``--node-workers`` and compares it with the GPU step's need (``--gpu-need``, samples/s: 2 samples
per 0.134 s on an H200). Worker counts above the machine's cores measure contention, not scaling.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk
import yaml

from benchmarks.common import emit
from datamodules.multitask import MultiTaskDataModule


def samples_per_second(data: MultiTaskDataModule, batches: int) -> float:
    loader = iter(data.train_dataloader())
    next(loader)  # worker start-up
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * data.batch_size / (time.perf_counter() - start)


def relocated_registry(registry: Path, root: Path, folder: Path) -> Path:
    """A copy of ``registry`` whose data sets live under ``root`` (same folder names)."""
    if not registry.is_file():
        raise SystemExit(f"error: --registry {registry}: file does not exist")
    spec = yaml.safe_load(registry.read_text())
    for dataset in spec["datasets"]:
        dataset["path"] = str(root / Path(dataset["path"]).name)
        if not Path(dataset["path"]).is_dir():
            raise SystemExit(
                f"error: --data-root {root}: no folder {Path(dataset['path']).name} (run make_phantoms.py)"
            )
    path = folder / "registry.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=Path("configs/data/phantoms.yaml"))
    parser.add_argument("--data-root", type=Path, help="folder holding the registry's data sets (e.g. the full preset)")
    parser.add_argument("--spacings", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--random-spacing", type=float, default=0.1, help="share of samples at a random spacing")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompts-per-image", type=int, default=4)
    parser.add_argument("--batches", type=int, default=10, help="batches timed per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", choices=["cached", "uncached"], default=["cached", "uncached"])
    parser.add_argument("--no-augment", action="store_true", help="leave out the paper's augmentation")
    parser.add_argument("--cache-dir", type=Path, help="reuse this cache (default: a new one, removed after)")
    parser.add_argument("--node-workers", type=int, default=8, help="loader workers of the GPU node extrapolated to")
    parser.add_argument("--gpu-need", type=float, default=2 / 0.134, help="samples/s the GPU step consumes")
    parser.add_argument(
        "--itk-threads", type=int, default=1, help="ITK threads per process (augmentation); 1: a worker uses one core"
    )
    parser.add_argument("--results", type=Path)
    args = parser.parse_args(argv)
    if min(args.workers) < 0 or args.batches < 1 or args.itk_threads < 1:
        parser.error("--workers must be >= 0, --batches and --itk-threads >= 1")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.itk_threads)  # forked workers inherit it
    scratch = Path(tempfile.mkdtemp(prefix="prompt-seg-loader-"))
    registry = relocated_registry(args.registry, args.data_root, scratch) if args.data_root else args.registry
    cache = args.cache_dir or scratch / "cache"
    records = []
    try:
        for mode in args.modes:
            for workers in args.workers:
                data = MultiTaskDataModule(
                    registry=str(registry),
                    cache_dir=str(cache),
                    use_cache=mode == "cached",
                    spacing_candidates=tuple(args.spacings),
                    random_spacing_probability=args.random_spacing,
                    patch_size=args.patch,
                    batch_size=args.batch,
                    prompts_per_image=args.prompts_per_image,
                    samples_per_epoch=args.batch * (args.batches + 1),
                    augment=not args.no_augment,
                    num_workers=workers,
                )
                data.setup()  # with the cache on, the first start fills it at each case's closest spacing
                rate = samples_per_second(data, args.batches)
                record = {
                    "cache": mode == "cached",
                    "workers": workers,
                    "patch": args.patch,
                    "augment": not args.no_augment,
                    "itk_threads": args.itk_threads,
                    "samples_per_second": round(rate, 2),
                    "per_worker": round(rate / max(workers, 1), 2),
                }
                emit(record, args.results, "dataloader")
                records.append(record)
        measured = [r for r in records if r["cache"] and r["workers"] > 0] or records
        fewest = min(measured, key=lambda r: r["workers"])
        node = fewest["per_worker"] * args.node_workers
        summary = {
            "extrapolation": f"{args.node_workers} workers",
            "cores": os.cpu_count(),
            "per_worker": fewest["per_worker"],
            "from_workers": fewest["workers"],
            "node_samples_per_second": round(node, 1),
            "gpu_need": round(args.gpu_need, 1),
            "outruns_gpu": node >= args.gpu_need,
            "note": f"{os.cpu_count()} cores here: rates above {max((os.cpu_count() or 1) - 1, 1)} worker(s) "
            "measure contention, not scaling",
        }
        emit(summary, args.results, "dataloader")
        records.append(summary)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return records


if __name__ == "__main__":
    main()
