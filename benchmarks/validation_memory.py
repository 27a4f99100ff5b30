"""Peak memory of the validation path on one large volume: the real ``VolumeValidation.validation_step``
(prompts scored ``validation_prompt_chunk`` at a time, stitched on the CPU, each task's mask made from
the label map when it is scored) with a cheap stand-in for the network (a 1x1x1 convolution plus a
per-prompt bias), since the point is stitching and mask memory, not the network.

    python -m benchmarks.validation_memory [--size 512 512 300] [--prompts 100] [--device cuda] [--results DIR]

Prints the peak (process max RSS above the start-up baseline on CPU; also the CUDA allocator peak on a
GPU) beside the analytic bound of the code as written: image (float32) and labels (uint8) of V
voxels, the overlay's uint8 label map, and two float32 chunks of C prompts x V voxels (the stitching
accumulator and its sigmoid); a scored chunk is freed before the next is predicted.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from benchmarks.common import device_name, emit
from lightning_modules.validation import VolumeValidation


class CheapNetwork(nn.Module):
    """Stands in for the network: ``network(windows, embedding, index).logits`` shaped as the real
    one's (windows x prompts, 1, ...), an affine map of the window plus a per-prompt bias."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.bias = nn.Linear(embedding_dim, 1)

    def forward(self, windows: torch.Tensor, embedding: torch.Tensor, index: torch.Tensor) -> SimpleNamespace:
        bias = self.bias(embedding).view(windows.shape[0], -1, 1, 1, 1) - 2.0
        return SimpleNamespace(logits=torch.add(bias, windows, alpha=4.0).view(len(index), 1, *windows.shape[2:]))


class CheapValidation(VolumeValidation):
    """The shared validation with the cheap network and fixed random prompt embeddings."""

    def __init__(self, sw_roi: int, sw_overlap: float, sw_batch_size: int, embedding_dim: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network = CheapNetwork(embedding_dim)

    def embed(self, prompts: list[str]) -> torch.Tensor:
        rows = [
            torch.randn(self.hparams.embedding_dim, generator=torch.Generator().manual_seed(len(p))) for p in prompts
        ]
        return torch.stack(rows).to(self.device)


def synthetic_batch(size: tuple[int, int, int], prompts: int) -> dict:
    """What ``ValidationVolumes`` yields: one structure per prompt, a slab of the volume each."""
    labels = torch.zeros(size, dtype=torch.uint8)
    for task, start in enumerate(torch.linspace(0, size[0], prompts + 1).long()[:-1].tolist()):
        labels[start : start + max(size[0] // prompts, 1), size[1] // 4 : -size[1] // 4] = 1 + task % 255
    return {
        "image": (labels.float() / 255)[None, None],
        "labels": labels,
        "label_values": [(1 + task % 255,) for task in range(prompts)],
        "prompts": [f"structure {task}" for task in range(prompts)],
        "tubular": torch.zeros(prompts, dtype=torch.bool),  # clDice's skeletons are not what is measured
        "case": "synthetic",
    }


def analytic_bound(voxels: int, prompts: int, chunk: int, window_voxels: int, sw_batch: int) -> int:
    """Bytes at the peak (the sigmoid of a chunk's stitched logits) of the code as written."""
    prompts_at_once = min(chunk, prompts)
    base = voxels * (4 + 1 + 1) + 2 * 4 * sw_batch * prompts_at_once * window_voxels  # image, labels, overlay, windows
    return base + 2 * 4 * prompts_at_once * voxels  # the float32 accumulator and its sigmoid


def _status(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> bool:
    """Reset the max-RSS mark to the current RSS (Linux ``clear_refs``); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--roi", type=int, default=96, help="sliding-window edge (paper config: 96)")
    parser.add_argument("--overlap", type=float, default=0.0, help="paper config: 0.5 (the same memory, 3x the time)")
    parser.add_argument("--sw-batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args(argv)
    if min(args.size) < 1 or args.prompts < 1 or args.roi < 1:
        parser.error("--size, --prompts and --roi must be positive")
    device = torch.device(args.device)
    module = CheapValidation(args.roi, args.overlap, args.sw_batch).to(device)
    with torch.no_grad():  # warm-up: lazy imports and allocator pools are not validation memory
        module.validation_step(synthetic_batch((32, 32, 32), 2), 0)
    module.validation_scores.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline, reset = _status("VmRSS"), _reset_peak()  # before the volume: the bound counts it
    batch = synthetic_batch(tuple(args.size), args.prompts)
    start = time.perf_counter()
    with torch.no_grad():
        module.validation_step(batch, 0)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    voxels = math.prod(args.size)
    chunk = module.validation_prompt_chunk
    bound = analytic_bound(voxels, args.prompts, chunk, args.roi**3, args.sw_batch)
    scored = sum(len(v) for v in module.validation_scores["dice"].values())
    record = {
        "device": device_name(device),
        "size": args.size,
        "prompts": args.prompts,
        "chunk": module.validation_prompt_chunk,
        "roi": args.roi,
        "overlap": args.overlap,
        "seconds": round(seconds, 1),
        "baseline_rss_gib": round(baseline / 2**30, 3),
        "peak_rss_gib": round(peak / 2**30, 3),
        "validation_rss_gib": round((peak - baseline) / 2**30, 3) if reset else None,
        "bound_gib": round(bound / 2**30, 3),
        "cuda_peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "scored_prompts": scored,
    }
    emit(record, args.results, "validation_memory")
    grew = f"{record['validation_rss_gib']} GiB above" if reset else f"{record['peak_rss_gib']} GiB max RSS, with"
    print(
        f"validation of {'x'.join(map(str, args.size))} voxels, {args.prompts} prompts: {grew} the "
        f"{record['baseline_rss_gib']} GiB start; analytic bound {record['bound_gib']} GiB; {record['seconds']} s"
    )
    return record


if __name__ == "__main__":
    main()
