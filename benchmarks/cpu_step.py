"""The quickstart's training step on CPU, per component, in three settings measured alternately in one
run, as ratios to the first: convolution weights in the default NCDHW format (fp32, the code before
issue #16), in the channels-last 3D format (fp32), and channels-last under bfloat16 autocast (the
quickstart's ``bf16-mixed``).

    python -m benchmarks.cpu_step --config configs/quickstart.yaml [--repeats 3] [--results DIR]

One step is the quickstart's: one 64^3 patch, six prompts (two of them tubular, so soft clDice
runs), Dice + BCE + soft clDice, AdamW. Inputs are random (routes are what fresh routers choose);
every setting sees the same inputs, routes and weights, and its outputs are compared with the first's.
Why it matters: for a 3D convolution of batch 1 and a small input (N*C*D*H <= 20480, e.g. the 1/2- and
1/4-resolution levels of one pair) PyTorch picks its slow native fp32 kernel instead of oneDNN; under
bfloat16 on a CPU with native bfloat16 (AVX512-BF16, AMX) every convolution goes to oneDNN.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import device_name, emit
from export import model_init_args, network_from_config
from lightning_modules.losses import segmentation_loss
from networks.prompt_seg_net import PromptSegNet

COMPONENTS = ("forward", "loss", "backward", "optimizer")


def quickstart_batch(network: PromptSegNet, patch: int, prompts: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 1, patch, patch, patch, generator=generator)
    noise = torch.rand(prompts, 1, patch, patch, patch, generator=generator)
    smooth = torch.nn.functional.avg_pool3d(noise, 9, 1, 4, count_include_pad=False).flatten(1)
    threshold = smooth.quantile(0.98, dim=1, keepdim=True)  # each pair's top 2 % of voxels: every pair present
    return {
        "image": image,
        "embedding": torch.randn(prompts, network.embedding_dim, generator=generator),
        "image_index": torch.zeros(prompts, dtype=torch.long),
        "masks": (smooth > threshold).float().view(prompts, 1, patch, patch, patch),
        "tubular": torch.arange(prompts) < 2,
    }


SETTINGS = {  # name: (memory format, bfloat16 autocast)
    "ncdhw_fp32": (torch.contiguous_format, False),
    "channels_last_fp32": (torch.channels_last_3d, False),
    "channels_last_bf16": (torch.channels_last_3d, True),
}


def timed_step(network: PromptSegNet, optimizer: torch.optim.Optimizer, batch: dict, cldice: float, bf16: bool) -> dict:
    """Seconds of each component of one training step."""
    seconds = {}
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        output = network(batch["image"], batch["embedding"], batch["image_index"])
    seconds["forward"] = time.perf_counter() - start
    start = time.perf_counter()
    loss = segmentation_loss(output.logits.float(), batch["masks"], batch["tubular"], cldice)["loss"]
    seconds["loss"] = time.perf_counter() - start
    start = time.perf_counter()
    loss.backward()
    seconds["backward"] = time.perf_counter() - start
    start = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds["optimizer"] = time.perf_counter() - start
    return seconds


def step_arguments(description: str, argv: list[str] | None, repeats: int) -> argparse.Namespace:
    """The command line of a benchmark of the quickstart's step: config, patch, prompts, repeats, results."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--results", type=Path)
    return parser.parse_args(argv)


def step_setup(args: argparse.Namespace) -> tuple[PromptSegNet, dict, float]:
    """The config's network in training mode without Gumbel noise (every copy takes the same routes),
    one batch, and the config's soft-clDice weight."""
    model = model_init_args(yaml.safe_load(args.config.read_text()) or {})
    torch.manual_seed(0)
    network = network_from_config(args.config).train()
    network.set_routing_schedule(1.0, 0.0)
    return network, quickstart_batch(network, args.patch, args.prompts), float(model.get("cldice_weight", 0.5))


def main(argv: list[str] | None = None) -> None:
    args = step_arguments(__doc__, argv, repeats=3)
    base, batch, cldice = step_setup(args)
    networks = {k: copy.deepcopy(base).to(memory_format=f) for k, (f, _) in SETTINGS.items()}
    optimizers = {k: torch.optim.AdamW(n.parameters(), lr=1e-4) for k, n in networks.items()}
    outputs = {}
    with torch.no_grad():
        for name, network in networks.items():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=SETTINGS[name][1]):
                outputs[name] = network(batch["image"], batch["embedding"], batch["image_index"]).logits.float()
    times: dict[str, dict[str, list[float]]] = {k: {c: [] for c in COMPONENTS} for k in networks}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, network in networks.items():
            seconds = timed_step(network, optimizers[name], batch, cldice, SETTINGS[name][1])
            for component, value in seconds.items():
                if repeat:
                    times[name][component].append(value)
    record = {"device": device_name(torch.device("cpu")), "patch": args.patch, "prompts": args.prompts}
    medians = {k: {c: statistics.median(v) for c, v in t.items()} for k, t in times.items()}
    before = medians["ncdhw_fp32"]
    for name, parts in medians.items():
        speedups = {f"speedup_{c}": round(before[c] / parts[c], 2) for c in COMPONENTS}
        difference = (outputs[name] - outputs["ncdhw_fp32"]).abs().max().item()
        emit(
            record
            | {"setting": name, "step_s": round(sum(parts.values()), 3)}
            | {f"{c}_s": round(v, 3) for c, v in parts.items()}
            | {"speedup_step": round(sum(before.values()) / sum(parts.values()), 2)}
            | speedups
            | {"max_logit_difference": difference},
            args.results,
            "cpu_step",
        )


if __name__ == "__main__":
    main()
