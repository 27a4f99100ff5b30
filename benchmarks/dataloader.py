"""Training samples per second from the DataModule on the phantoms, with and without the cache, at
0, 1 and 2 workers.

    python -m benchmarks.dataloader --registry configs/data/phantoms.yaml --patch 96 [--results DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit
from datamodules.multitask import MultiTaskDataModule


def samples_per_second(data: MultiTaskDataModule, batches: int) -> float:
    loader = iter(data.train_dataloader())
    next(loader)  # worker start-up
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * data.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="configs/data/phantoms.yaml")
    parser.add_argument("--spacings", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results", type=Path)
    args = parser.parse_args(argv)
    for cached in (True, False):
        for workers in args.workers:
            folder = Path(tempfile.mkdtemp(prefix="prompt-seg-cache-"))
            data = MultiTaskDataModule(
                registry=args.registry,
                cache_dir=str(folder),
                use_cache=cached,
                spacing_candidates=tuple(args.spacings),
                patch_size=args.patch,
                batch_size=args.batch,
                samples_per_epoch=args.batch * (args.batches + 1),
                num_workers=workers,
            )
            data.setup()  # with the cache on, this fills it at each case's closest spacing
            rate = samples_per_second(data, args.batches)
            emit(
                {"cache": cached, "workers": workers, "patch": args.patch, "samples_per_second": rate},
                args.results,
                "dataloader",
            )
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
