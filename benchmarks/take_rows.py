"""The quickstart's training step with the decoder's row gathers as ``networks.routing.take_rows``
against PyTorch's indexing ``x[index]``, timed in turns in one run.

    python -m benchmarks.take_rows [--config configs/quickstart.yaml] [--patch 64] [--prompts 6]
                                   [--repeats 10] [--results DIR]

The routed decoder gathers feature rows per route-prefix group (``up(x)[parent]``, the skip rows,
each sub-pathway's groups, each pair's final features). The backward of ``x[index]`` is an
accumulating ``index_put_``; ``take_rows`` adds each source row's gradients slice by slice instead.
One step is ``benchmarks.cpu_step``'s (bf16 autocast, channels-last): one patch, six prompts, Dice +
BCE + soft clDice, AdamW. Both networks start from the same weights and see the same batch; the
indexing arm swaps ``x[index]`` in for ``take_rows`` in ``networks.decoder`` and ``networks.routing``.
Reported: median step seconds of each, their ratio, and the largest difference between the two
networks' gradients after their first step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

import networks.decoder
import networks.routing
from benchmarks.common import device_name, emit, timed_alternately
from benchmarks.cpu_step import step_arguments, step_setup, timed_step
from lightning_modules.losses import segmentation_loss
from networks.prompt_seg_net import PromptSegNet

GATHERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "take_rows": networks.routing.take_rows,
    "indexing": lambda x, index: x[index],
}


@contextmanager
def gathering(gather: str) -> Iterator[None]:
    """The decoder's row gathers done by ``gather`` inside the block."""
    networks.decoder.take_rows = networks.routing.take_rows = GATHERS[gather]
    try:
        yield
    finally:
        networks.decoder.take_rows = networks.routing.take_rows = GATHERS["take_rows"]


def gradients(network: PromptSegNet, batch: dict, cldice: float) -> list[torch.Tensor]:
    """Every parameter's gradient of one bf16 forward and loss (zeros where a parameter gets none)."""
    parameters = list(network.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = network(batch["image"], batch["embedding"], batch["image_index"])
    loss = segmentation_loss(output.logits.float(), batch["masks"], batch["tubular"], cldice)["loss"]
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads, strict=True)]


def main(argv: list[str] | None = None) -> dict:
    args = step_arguments(__doc__, argv, repeats=10)
    base, batch, cldice = step_setup(args)
    arms = {name: copy.deepcopy(base) for name in GATHERS}
    optimizers = {name: torch.optim.AdamW(n.parameters(), lr=1e-4) for name, n in arms.items()}
    grads = {}
    for name, network in arms.items():
        with gathering(name):
            grads[name] = gradients(network, batch, cldice)
    difference = max((a - b).abs().max().item() for a, b in zip(*grads.values(), strict=True))
    scale = max(g.abs().max().item() for g in grads["indexing"])

    def step(name: str) -> None:
        with gathering(name):
            timed_step(arms[name], optimizers[name], batch, cldice, bf16=True)

    steps = {name: (lambda name=name: step(name)) for name in GATHERS}
    medians = timed_alternately(steps, torch.device("cpu"), warmup=1, repeats=args.repeats)
    record = {
        "device": device_name(torch.device("cpu")),
        "patch": args.patch,
        "prompts": args.prompts,
        "take_rows_step_s": round(medians["take_rows"], 3),
        "indexing_step_s": round(medians["indexing"], 3),
        "speedup_step": round(medians["indexing"] / medians["take_rows"], 3),
        "max_grad_difference": difference,
        "max_grad": scale,
    }
    emit(record, args.results, "take_rows")
    return record


if __name__ == "__main__":
    main()
