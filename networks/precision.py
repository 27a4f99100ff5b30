"""Blocks kept in float32 under CPU bfloat16 autocast.

On CPUs with native bfloat16 (AVX512-BF16), oneDNN 3.12 (PyTorch 2.14) computes the bfloat16 weight
gradient of a 3x3x3 convolution with padding 1 wrongly when a side of its input is 2 voxels
(``jit_bf16:avx512_core_bf16`` backward weights): relative errors from 1 to infinity, while its forward
and its input gradient are right, and sides of 1, 3 and 4 are right. A 64^3 patch has a 2^3 map at
1/32 of its size, where the decoder's bottleneck (and the reference U-Net's) convolves. Those blocks
run in float32 when CPU autocast is on: the same values, exact gradients, at a negligible cost on a
2^3 map. ``tests/test_network.py`` checks the gradients against float32. Scope: the 2-voxel maps of
a 64^3 patch; a patch whose other levels have a side of 2 (a 32^3 patch at 1/16) is not covered.
"""

from __future__ import annotations

import torch
from torch import nn

_FLOAT32_CLASSES: dict[type, type] = {}


def float32_on_cpu(block: nn.Module) -> nn.Module:
    """Make ``block`` run in float32 whenever CPU autocast is on (in place; returns it).

    Its class becomes a subclass whose ``forward`` leaves autocast and casts floating inputs to
    float32, so parameter names, state dicts and every other use of the block are unchanged.
    """
    base = type(block)
    if base not in _FLOAT32_CLASSES.values():
        if base not in _FLOAT32_CLASSES:
            _FLOAT32_CLASSES[base] = type(f"Float32OnCpu{base.__name__}", (base,), {"forward": _float32_forward(base)})
        block.__class__ = _FLOAT32_CLASSES[base]
    return block


def _float32_forward(base: type):
    def forward(self, *inputs: torch.Tensor):
        if not torch.is_autocast_enabled("cpu"):
            return base.forward(self, *inputs)
        with torch.autocast("cpu", enabled=False):
            return base.forward(self, *(x.float() if x.is_floating_point() else x for x in inputs))

    return forward
