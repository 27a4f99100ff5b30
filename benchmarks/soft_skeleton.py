"""The soft skeleton of soft clDice, as the clDice authors write it (``F.max_pool3d``) against this
repository's (``lightning_modules.losses``: shifted maxima), timed side by side in one run.

    python -m benchmarks.soft_skeleton [--pairs 3] [--size 64] [--repeats 3] [--results DIR]

Input: ``pairs`` blurred random masks of ``size``^3 as probabilities (the quickstart's tubular pairs
of one patch). Reported: median seconds of the forward, the backward and a no-grad forward (the
target's skeleton), their ratios, and the largest difference of values and gradients.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import device_name, emit
from lightning_modules.losses import soft_skeleton


def max_pool_soft_skeleton(x: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Soft skeleton by iterated soft opening with ``F.max_pool3d`` (Shit et al., 2021)."""

    def erode(v: torch.Tensor) -> torch.Tensor:
        windows = (((3, 1, 1), (1, 0, 0)), ((1, 3, 1), (0, 1, 0)), ((1, 1, 3), (0, 0, 1)))
        return -torch.stack([F.max_pool3d(-v, k, 1, p) for k, p in windows]).amax(0)

    skeleton = F.relu(x - F.max_pool3d(erode(x), 3, 1, 1))
    for _ in range(iterations):
        x = erode(x)
        delta = F.relu(x - F.max_pool3d(erode(x), 3, 1, 1))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton


def timed_skeleton(skeleton: Callable, probability: torch.Tensor, weights: torch.Tensor) -> dict:
    """Seconds of a forward, its backward and a no-grad forward; the output and the input's gradient."""
    x = probability.clone().requires_grad_()
    start = time.perf_counter()
    out = skeleton(x)
    middle = time.perf_counter()
    (out * weights).sum().backward()
    end = time.perf_counter()
    with torch.no_grad():
        skeleton(probability)
    return {
        "forward": middle - start,
        "backward": end - middle,
        "no_grad": time.perf_counter() - end,
        "out": out,
        "grad": x.grad,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    shape = (args.pairs, 1, args.size, args.size, args.size)
    probability = F.avg_pool3d(torch.rand(shape, generator=generator), 5, 1, 2, count_include_pad=False)
    probability = (probability - probability.amin()) / (probability.amax() - probability.amin())
    weights = torch.rand(shape, generator=generator)
    skeletons = {"max_pool": max_pool_soft_skeleton, "shifted": soft_skeleton}
    runs = {name: [] for name in skeletons}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, skeleton in skeletons.items():
            run = timed_skeleton(skeleton, probability, weights)
            if repeat:
                runs[name].append(run)
    medians = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("forward", "backward", "no_grad")}
        for n, rs in runs.items()
    }
    before, after = medians["max_pool"], medians["shifted"]
    record = {"device": device_name(torch.device("cpu")), "pairs": args.pairs, "size": args.size}
    record |= {f"{name}_{k}_s": round(v, 4) for name, m in medians.items() for k, v in m.items()}
    record |= {f"speedup_{k}": round(before[k] / after[k], 2) for k in before}
    record["speedup_forward_backward"] = round(
        (before["forward"] + before["backward"]) / (after["forward"] + after["backward"]), 2
    )
    record["max_value_difference"] = (runs["max_pool"][-1]["out"] - runs["shifted"][-1]["out"]).abs().max().item()
    record["max_grad_difference"] = (runs["max_pool"][-1]["grad"] - runs["shifted"][-1]["grad"]).abs().max().item()
    emit(record, args.results, "soft_skeleton")
    return record


if __name__ == "__main__":
    main()
