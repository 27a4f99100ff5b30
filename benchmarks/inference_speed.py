"""Seconds per volume with MONAI's sliding window: this network for 1..20 prompts (full and trimmed)
against SwinUNETR on the same volume, roi and overlap, in one run.

    python -m benchmarks.inference_speed --config configs/paper.yaml --sizes 128 256 --prompts 1 2 5 10 20 [--results DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import SwinUNETR

from benchmarks.common import device_name, emit, timed
from export import network_from_config
from inference.sliding_window import predict_volume


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/paper.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours = network_from_config(args.config).to(device).eval()
    reference = SwinUNETR(in_channels=1, out_channels=2, feature_size=ours.encoder.feature_size).to(device).eval()
    base = {
        "device": device_name(device),
        "roi": args.roi,
        "overlap": args.overlap,
        "sw_batch_size": args.sw_batch_size,
    }
    for size in args.sizes:
        volume = torch.rand(1, 1, size, size, size, device=device)

        def run_reference(volume: torch.Tensor = volume) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=precision, enabled=device.type == "cuda"):
                sliding_window_inference(
                    volume, (args.roi,) * 3, args.sw_batch_size, reference, args.overlap, mode="gaussian"
                )

        reference_seconds, _ = timed(run_reference, device, repeats=args.repeats)
        emit(
            base | {"size": size, "model": "SwinUNETR", "prompts": 1, "seconds": reference_seconds},
            args.results,
            "inference",
        )
        for count in args.prompts:
            embeddings = torch.nn.functional.normalize(torch.randn(count, ours.embedding_dim, device=device), dim=1)
            for name, network in (("ours", ours), ("ours-trimmed", ours.trimmed(embeddings))):

                def run_ours(network=network, embeddings=embeddings, volume=volume) -> None:
                    with torch.autocast(device.type, dtype=precision, enabled=device.type == "cuda"):
                        predict_volume(network, volume, embeddings, args.roi, args.overlap, args.sw_batch_size)

                seconds, _ = timed(run_ours, device, repeats=args.repeats)
                emit(
                    base
                    | {
                        "size": size,
                        "model": name,
                        "prompts": count,
                        "seconds": seconds,
                        "ratio_to_swinunetr": seconds / reference_seconds,
                    },
                    args.results,
                    "inference",
                )


if __name__ == "__main__":
    main()
