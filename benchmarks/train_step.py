"""Training-step time, peak memory, FLOPs and achieved TFLOP/s: this network with 1, 4 and 8 prompts per
image against MONAI SwinUNETR at one prompt, on the same patch and batch, in one run, as ratios.

    python -m benchmarks.train_step --config configs/paper.yaml --patch 96 --batch 2 [--prompts 1 4 8]
        [--compile] [--task-mix 2 4] [--only ours|swinunetr] [--results DIR]

Each image is paired with P prompts (N = batch x P pairs, ``image_index`` repeating each image).
``distinct``: a random embedding per pair, so routes differ; ``shared``: the P prompts of an image are
one embedding, so they share its whole route and the decoder work along it (only the head runs per
pair). ``--task-mix``: one prompt per image, T distinct embeddings in the batch (the old sweep).
Gumbel noise is off, so every step takes the routes the fresh routers choose. FLOPs are torch's
counter (``torch.utils.flop_counter``) over one eager forward + backward; TFLOP/s divides them by
the median step. ``--compile``: SwinUNETR whole, ours per block (``networks/compiled.py``), compile
time excluded (warm-up steps).

On CPU the peak is the process's max RSS, which only grows: run one configuration per process
(``--only ours`` / ``--only swinunetr``) for a fair memory comparison there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from monai.networks.nets import SwinUNETR
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import device_name, emit, timed
from export import network_from_config
from networks.compiled import compile_blocks

Step = Callable[[], None]


def step_function(
    model: torch.nn.Module,
    device: torch.device,
    image: torch.Tensor,
    precision: torch.dtype,
    prompts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Step:
    """One AdamW step of BCE on random targets; ``prompts`` (embeddings (N, E), image_index (N,)) for
    ours, ``None`` for SwinUNETR (its first output channel)."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda"
    )
    pairs = image.shape[0] if prompts is None else prompts[1].shape[0]
    target = (torch.rand(pairs, 1, *image.shape[2:], device=device) > 0.5).float()

    def step() -> None:
        with torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32):
            logits = model(image)[:, :1] if prompts is None else model(image, *prompts).logits
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def count_flops(step: Step) -> int:
    """FLOPs of one step (forward and backward; the optimizer's elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def prompt_inputs(
    embedding_dim: int, device: torch.device, batch: int, per_image: int, kind: str, tasks: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (N, E) and image_index (N,) for ``kind`` distinct / shared / task-mix."""
    image_index = torch.arange(batch, device=device).repeat_interleave(per_image)
    rows = {"distinct": torch.arange(len(image_index), device=device), "shared": image_index}.get(kind)
    if rows is None:  # task-mix: one prompt per image, ``tasks`` embeddings in the batch
        rows = torch.arange(batch, device=device) % tasks
    embeddings = torch.nn.functional.normalize(torch.randn(int(rows.max()) + 1, embedding_dim, device=device), dim=1)
    return embeddings[rows], image_index


def measured(step: Step, flops: int, device: torch.device, repeats: int, compiled: bool) -> dict:
    seconds, peak = timed(step, device, warmup=3 if compiled else 1, repeats=repeats)
    return {"seconds": seconds, "peak_gib": peak, "gflop": flops / 1e9, "tflops": flops / seconds / 1e12}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/paper.yaml"))
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 4, 8], help="prompts per image")
    parser.add_argument("--task-mix", type=int, nargs="*", default=[], help="distinct tasks per batch, one prompt each")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (ours per block)")
    parser.add_argument("--only", choices=["ours", "swinunetr"], help="measure one model only")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = {
        "device": device_name(device),
        "patch": args.patch,
        "batch": args.batch,
        "precision": str(precision),
        "compiled": args.compile,
    }
    torch.manual_seed(0)
    image = torch.rand(args.batch, 1, args.patch, args.patch, args.patch, device=device)
    reference: dict | None = None
    if args.only in (None, "swinunetr"):
        feature = network_from_config(args.config).encoder.feature_size
        swin = SwinUNETR(in_channels=1, out_channels=2, feature_size=feature).to(device)
        step = step_function(swin, device, image, precision)
        flops = count_flops(step)
        if args.compile:
            swin.compile(dynamic=False)
        reference = measured(step, flops, device, args.repeats, args.compile)
        record = {"model": f"SwinUNETR({feature})", "prompts_per_image": 1, "pairs": args.batch} | reference
        emit(base | record, args.results, "train_step")
        del swin, step
    if args.only in (None, "ours"):
        ours = network_from_config(args.config).to(device).train()
        ours.set_routing_schedule(1.0, 0.0)  # no Gumbel noise: the same routes (and shapes) every step
        cases = [(p, "distinct", 1) for p in args.prompts]
        cases += [(p, "shared", 1) for p in args.prompts if p > 1]
        cases += [(1, "task-mix", t) for t in args.task_mix if 1 < t <= args.batch]
        flops = []
        for per_image, kind, tasks in cases:  # FLOPs first, all eager; each case gets a fresh optimizer
            inputs = prompt_inputs(ours.embedding_dim, device, args.batch, per_image, kind, tasks)
            routes = len({tuple(r) for r in ours.routes(inputs[0]).tolist()})
            flops.append((inputs, count_flops(step_function(ours, device, image, precision, inputs)), routes))
        if args.compile:
            compile_blocks(ours)
        for (per_image, kind, tasks), (inputs, count, routes) in zip(cases, flops):
            step = step_function(ours, device, image, precision, inputs)
            result = measured(step, count, device, args.repeats, args.compile)
            del step
            if reference is not None:
                result |= {
                    "ratio_time": result["seconds"] / reference["seconds"],
                    "ratio_peak": result["peak_gib"] / reference["peak_gib"],
                }
            record = {"model": "ours", "prompts_per_image": per_image, "prompts": kind, "routes": routes}
            record |= {"pairs": args.batch * per_image} | ({"tasks": tasks} if kind == "task-mix" else {})
            emit(base | record | result, args.results, "train_step")


if __name__ == "__main__":
    main()
