"""3D convolutions kept in float32 under CPU bfloat16 autocast where oneDNN's bfloat16 is wrong.

On CPUs with native bfloat16 (AVX512-BF16), oneDNN 3.12 (PyTorch 2.14) computes the bfloat16 weight
gradient of a 3x3x3 convolution with padding 1 wrongly when a side of its input is 2 voxels
(``jit_bf16:avx512_core_bf16`` backward weights): relative errors from 1 to infinity, while its forward
and its input gradient are right, and sides of 1, 3 and 4 are right (docs/experiments.md, "Fifteenth session").
Both networks pad their input to sides that are multiples of 32 and at least 64, so a side of 2 occurs
at 1/32 of a 64-voxel side: in the decoder's bottleneck and in the reference U-Net's second bottleneck
convolution (a 2 x 4 x 4 map fails as well). The rule sits at the convolution, where the fault lies,
and is driven by shape: every 3D convolution with a kernel side above 1 runs in float32 whenever CPU
autocast is on and a side of its input is 2 (exact gradients, at a negligible cost on maps that
small); every other call is untouched, whichever block it belongs to. ``tests/test_network.py`` checks
the gradients against float32.
"""

from __future__ import annotations

import torch
from torch import nn

BF16_FAILING_SIDE = 2


class Float32OnSmallMapsConv3d(nn.Conv3d):
    """``nn.Conv3d`` that leaves CPU autocast for an input with a side of :data:`BF16_FAILING_SIDE`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu") and BF16_FAILING_SIDE in x.shape[2:]:
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def float32_on_small_maps(network: nn.Module) -> nn.Module:
    """Give every ``nn.Conv3d`` of ``network`` with a kernel side above 1 the float32 rule above
    (in place; returns it). Parameter names, state dicts and checkpoints are unchanged."""
    for module in network.modules():
        if type(module) is nn.Conv3d and max(module.kernel_size) > 1:
            module.__class__ = Float32OnSmallMapsConv3d
    return network
