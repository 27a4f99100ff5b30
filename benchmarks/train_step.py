"""Training-step time and peak memory: this network against MONAI SwinUNETR on the same patch and
batch, in one run, as ratios; then with 1, 2, 4 and 8 distinct tasks in a batch.

    python -m benchmarks.train_step --config configs/paper.yaml --patch 96 --batch 2 [--results DIR]

On CPU the peak is the process's max RSS, which only grows: run one configuration per process
(``--only ours`` / ``--only swinunetr``) for a fair memory comparison there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from monai.networks.nets import SwinUNETR

from benchmarks.common import device_name, emit, timed
from export import network_from_config


def step_function(model, device, patch: int, batch: int, tasks: int | None, precision: torch.dtype):
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda"
    )
    image = torch.rand(batch, 1, patch, patch, patch, device=device)
    target = (torch.rand(batch, 1, patch, patch, patch, device=device) > 0.5).float()
    if tasks is not None:
        embeddings = torch.nn.functional.normalize(torch.randn(tasks, model.embedding_dim, device=device), dim=1)
        prompt = embeddings[torch.arange(batch, device=device) % tasks]

    def step() -> None:
        with torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32):
            logits = model(image, prompt).logits if tasks is not None else model(image)[:, :1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/paper.yaml"))
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--task-mix", type=int, nargs="*", default=[1, 2, 4, 8], help="distinct tasks per batch")
    parser.add_argument("--only", choices=["ours", "swinunetr"], help="measure one model only")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = {"device": device_name(device), "patch": args.patch, "batch": args.batch, "precision": str(precision)}
    measured = {}
    if args.only in (None, "swinunetr"):
        feature = network_from_config(args.config).encoder.feature_size
        reference = SwinUNETR(in_channels=1, out_channels=2, feature_size=feature).to(device)
        measured["swinunetr"] = timed(
            step_function(reference, device, args.patch, args.batch, None, precision), device, repeats=args.repeats
        )
        emit(
            base
            | {
                "model": f"SwinUNETR({feature})",
                "seconds": measured["swinunetr"][0],
                "peak_gib": measured["swinunetr"][1],
            },
            args.results,
            "train_step",
        )
        del reference
    if args.only in (None, "ours"):
        ours = network_from_config(args.config).to(device).train()
        measured["ours"] = timed(
            step_function(ours, device, args.patch, args.batch, 1, precision), device, repeats=args.repeats
        )
        emit(
            base | {"model": "ours", "tasks": 1, "seconds": measured["ours"][0], "peak_gib": measured["ours"][1]},
            args.results,
            "train_step",
        )
        for tasks in [t for t in args.task_mix if 1 < t <= args.batch]:
            seconds, peak = timed(
                step_function(ours, device, args.patch, args.batch, tasks, precision), device, repeats=args.repeats
            )
            emit(
                base | {"model": "ours", "tasks": tasks, "seconds": seconds, "peak_gib": peak},
                args.results,
                "train_step",
            )
    if len(measured) == 2:
        emit(
            base
            | {
                "ratio_time": measured["ours"][0] / measured["swinunetr"][0],
                "ratio_peak": measured["ours"][1] / measured["swinunetr"][1],
            },
            args.results,
            "train_step",
        )


if __name__ == "__main__":
    main()
