"""Seconds per volume with MONAI's sliding window: this network for 1, 10 and 100 prompts, full and
trimmed to the prompts' routes, against SwinUNETR on the same volume, roi and overlap, in one run.

    python -m benchmarks.inference_speed --config configs/paper.yaml --sizes 256 --prompts 1 10 100
        [--compile] [--results DIR]

Prompts are random embeddings: fresh routers give nearly every one its own route (``routes`` in the
record), the costly case; prompts on a shared route prefix share the decoder work up to there. The
full and the trimmed model are timed in turns (full, trimmed, full, ...) so that drift in clocks or
load falls on both alike; ``trimmed_over_full`` is their ratio. The window batch shrinks so that
windows x prompts stays within ``--max-pairs`` (the decoder holds a full-resolution map per route
and window); ``sw_batch_size`` in the record is the one used. ``--compile``: SwinUNETR whole, ours
per block (``networks/compiled.py``); compilation happens in the warm-up (keep ``--warmup`` >= 1).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import SwinUNETR

from benchmarks.common import device_name, emit, timed, timed_alternately
from export import network_from_config
from inference.sliding_window import predict_volume
from networks.compiled import compile_blocks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/paper.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--max-pairs", type=int, default=40, help="cap on windows x prompts per forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (ours per block)")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    ours = network_from_config(args.config).to(device).eval()
    reference = SwinUNETR(in_channels=1, out_channels=2, feature_size=ours.encoder.feature_size).to(device).eval()
    if args.compile:
        reference.compile(dynamic=False)
        compile_blocks(ours)
    base = {"device": device_name(device), "roi": args.roi, "overlap": args.overlap, "compiled": args.compile}
    for size in args.sizes:
        volume = torch.rand(1, 1, size, size, size, device=device)

        def run_reference(volume: torch.Tensor = volume) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=precision, enabled=device.type == "cuda"):
                sliding_window_inference(
                    volume, (args.roi,) * 3, args.sw_batch_size, reference, args.overlap, mode="gaussian"
                )

        reference_seconds, _ = timed(run_reference, device, warmup=args.warmup, repeats=args.repeats)
        emit(
            base
            | {"size": size, "model": "SwinUNETR", "prompts": 1, "sw_batch_size": args.sw_batch_size}
            | {"seconds": reference_seconds},
            args.results,
            "inference",
        )
        one_prompt: dict[str, float] = {}  # each model's time for one prompt
        for count in args.prompts:
            embeddings = torch.nn.functional.normalize(torch.randn(count, ours.embedding_dim, device=device), dim=1)
            models = {"ours": ours, "ours-trimmed": ours.trimmed(embeddings)}  # a deep copy: eager again
            if args.compile:
                compile_blocks(models["ours-trimmed"])
            windows = max(1, min(args.sw_batch_size, args.max_pairs // count))

            def run(network: torch.nn.Module, embeddings: torch.Tensor, windows: int, volume: torch.Tensor) -> None:
                with torch.autocast(device.type, dtype=precision, enabled=device.type == "cuda"):
                    predict_volume(network, volume, embeddings, args.roi, args.overlap, windows)

            seconds = timed_alternately(
                {name: partial(run, network, embeddings, windows, volume) for name, network in models.items()},
                device,
                warmup=args.warmup,
                repeats=args.repeats,
            )
            if count == 1:
                one_prompt = seconds
            routes = len({tuple(r) for r in ours.routes(embeddings).tolist()})
            for name, value in seconds.items():
                record = {"size": size, "model": name, "prompts": count, "routes": routes, "sw_batch_size": windows}
                record |= {"seconds": value, "ratio_to_swinunetr": value / reference_seconds}
                if one_prompt:
                    record["ratio_to_one_prompt"] = value / one_prompt[name]
                if name == "ours-trimmed":
                    record["trimmed_over_full"] = value / seconds["ours"]
                emit(base | record, args.results, "inference")


if __name__ == "__main__":
    main()
