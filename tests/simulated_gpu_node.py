"""Run ``train.py`` on this CPU as its loader workers would see a GPU node.

``python tests/simulated_gpu_node.py fit --config ...`` makes ``torch.cuda`` report one available
device in every process forked from this one (the loader workers) and raise there on every CUDA
state call, as it does in a worker forked from a process that has initialised CUDA ("Cannot
re-initialize CUDA in forked subprocess"). The training process itself keeps the real ``torch.cuda``
(no GPU), so the run must be told ``--trainer.accelerator cpu``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

CUDA_STATE_CALLS = ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all", "init", "_lazy_init")
FORK_ERROR = "Cannot re-initialize CUDA in forked subprocess"


def simulate_gpu_node() -> None:
    """Patch ``torch.cuda`` so that processes forked from this one see a GPU node's worker."""
    parent = os.getpid()

    def in_children(original: Callable, replacement: Callable) -> Callable:
        # a new function object per name: torch.compile's trace rules key on identity
        return lambda *args, **kwargs: (original if os.getpid() == parent else replacement)(*args, **kwargs)

    def fork_error(*args, **kwargs):
        raise RuntimeError(FORK_ERROR)

    torch.cuda.is_available = in_children(torch.cuda.is_available, lambda: True)
    torch.cuda.device_count = in_children(torch.cuda.device_count, lambda: 1)
    for name in CUDA_STATE_CALLS:
        setattr(torch.cuda, name, in_children(getattr(torch.cuda, name), fork_error))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    simulate_gpu_node()
    from train import main

    main(sys.argv[1:])
