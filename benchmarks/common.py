"""Timing, memory and output helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import platform
import resource
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3) -> tuple[float, float]:
    """Median seconds per call and peak memory in GiB (CUDA allocator peak, or process max RSS on CPU)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return sorted(times)[len(times) // 2], peak


def timed_alternately(
    steps: dict[str, Callable[[], object]], device: torch.device, warmup: int = 1, repeats: int = 3
) -> dict[str, float]:
    """Median seconds per call of each step, measured in turns (A, B, A, B, ...) so that drift in
    clocks, temperature or machine load falls on every step alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def emit(record: dict, results: Path | None, name: str) -> None:
    """Print one JSON line and append it to RESULTS/name.jsonl."""
    record = {"date": date.today().isoformat(), **record}
    line = json.dumps(record)
    print(line, flush=True)
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        with (results / f"{name}.jsonl").open("a") as handle:
            handle.write(line + "\n")
