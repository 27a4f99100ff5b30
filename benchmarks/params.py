"""Parameter counts of a configuration against the paper's (8.06 M, 60.50 M, 26.75 M).

python -m benchmarks.params --config configs/paper.yaml [--results DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import emit
from export import network_from_config, parameter_counts

PAPER = {"params_encoder": 8.06, "params_full": 60.50, "params_trimmed": 26.75}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/paper.yaml"))
    parser.add_argument("--results", type=Path)
    args = parser.parse_args(argv)
    counts = parameter_counts(network_from_config(args.config))
    for key, paper in PAPER.items():
        emit(
            {"what": key, "ours_m": counts[key], "paper_m": paper, "relative_error": counts[key] / paper - 1},
            args.results,
            "params",
        )


if __name__ == "__main__":
    main()
