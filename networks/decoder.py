"""The routed decoder: 3D residual blocks with SwinUNETR-style skips and an AP module per level.

Levels run from 1/32 of the input (the bottleneck) up to full resolution. At each of the five
upsampling levels a shared transposed convolution doubles the resolution, a shared residual block
adapts the skip features, and the AP module's chosen sub-pathway, a residual block ``2c -> c``,
fuses the two.

How the paper's sizes come out (``feature_size=48``, ``channels=(192, 192, 192, 48, 48, 48)``,
M = 6, 512-d CLIP prompt embedding): one route's sub-pathways sum to 6.69 M (83 c^2 per level:
27*2c*c + 27*c*c + 2c*c); the shared decoder (bottleneck 4.98 M, skip blocks 4.60 M, transposed
convolutions 0.68 M, routers 0.66 M, head 0.02 M) holds 10.94 M. With the 8.06 M encoder: 60.16 M
whole (paper 60.50 M) and 26.70 M trimmed to one route (paper 26.75 M).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetResBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import nn

from networks.conditioning import LevelModulation
from networks.routing import AutomaticPathway, take_rows


def residual_block(in_channels: int, out_channels: int) -> UnetResBlock:
    """MONAI's 3D residual block (two 3x3x3 convolutions, instance norm) as SwinUNETR uses it."""
    return UnetResBlock(3, in_channels, out_channels, kernel_size=3, stride=1, norm_name="instance")


def upsampling(in_channels: int, out_channels: int) -> nn.Module:
    """A 2x2x2 transposed convolution with stride 2."""
    return get_conv_layer(3, in_channels, out_channels, kernel_size=2, stride=2, conv_only=True, is_transposed=True)


class RoutedDecoder(nn.Module):
    """Decoder whose five upsampling levels each hold an :class:`AutomaticPathway`.

    Args:
        skip_channels: channels of the skip inputs from coarse to fine: the 1/32 bottleneck input,
            then the 1/16, 1/8, 1/4, 1/2 features and the image itself (six entries).
        channels: decoder channels at the bottleneck and at each of the five levels (six entries).
        embedding_dim: size of the prompt embedding.
        num_paths: candidate sub-pathways per level (the paper's M).
        router_hidden_dim: hidden width of each router.
        modulation_dim: size of the prompt conditioning vector that scales and shifts each level's
            features (:class:`LevelModulation`); ``None`` for routing alone (the paper).
    """

    def __init__(
        self,
        skip_channels: Sequence[int],
        channels: Sequence[int],
        embedding_dim: int,
        num_paths: int = 6,
        router_hidden_dim: int = 256,
        modulation_dim: int | None = None,
    ) -> None:
        super().__init__()
        if len(skip_channels) != 6 or len(channels) != 6:
            raise ValueError(
                f"decoder needs 6 skip and 6 decoder channel entries, got {len(skip_channels)} and {len(channels)}"
            )
        if num_paths < 1:
            raise ValueError(f"num_paths must be at least 1, got {num_paths}")
        self.bottleneck = residual_block(skip_channels[0], channels[0])
        self.skips = nn.ModuleList(residual_block(s, c) for s, c in zip(skip_channels[1:], channels[1:]))
        self.ups = nn.ModuleList(upsampling(a, b) for a, b in zip(channels[:-1], channels[1:]))
        self.pathways = nn.ModuleList(
            AutomaticPathway([residual_block(2 * c, c) for _ in range(num_paths)], embedding_dim, router_hidden_dim)
            for c in channels[1:]
        )
        self.modulation = LevelModulation(modulation_dim, channels[1:]) if modulation_dim else None

    @property
    def num_levels(self) -> int:
        return len(self.pathways)

    def router_logits(self, prompt_embedding: torch.Tensor) -> list[torch.Tensor]:
        return [ap.router(prompt_embedding) for ap in self.pathways]

    def route_weights(self, prompt_embedding: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: router logits (N, M) and one-hot weights (N, M)."""
        chosen = [ap.choose(prompt_embedding) for ap in self.pathways]
        return [c[0] for c in chosen], [c[1] for c in chosen]

    def forward(
        self,
        skips: list[torch.Tensor],
        weights: list[torch.Tensor],
        image_index: torch.Tensor,
        conditioning: torch.Tensor | None = None,
        levels: int = 1,
    ) -> list[torch.Tensor]:
        """Decode per (image, prompt) pair; pairs that share a route prefix share its computation.
        Returns the features (N, c, ...) of the finest ``levels`` levels, finest first.

        At each level the pairs are grouped by (image, sub-pathways chosen so far) and every group
        is decoded once. Without level conditioning two pairs of one image on the same prefix have
        identical features there, so the result equals decoding each pair alone, and so do the
        gradients of every convolution. The straight-through route weight a level multiplies its
        output by (1 in value) is the mean of the group's pairs' weights: each router receives the
        mean of the gradients its pairs' outputs would have sent alone (exactly theirs for a pair
        alone on its prefix). With level conditioning the features differ by prompt, so the groups
        also key on the prompt.

        Args:
            skips: six per-image inputs, coarse to fine (see ``skip_channels``).
            weights: per level, one-hot route weights (N, M) for the N pairs.
            image_index: (N,) index of each pair's image in ``skips``.
            conditioning: (N, modulation_dim) prompt conditioning vectors, when modulated.
        """
        keys = [image_index]
        if self.modulation is not None:
            keys.append(torch.unique(conditioning, dim=0, return_inverse=True)[1])
        x = self.bottleneck(skips[0])  # one row per image
        group = image_index  # each pair's row of x
        decoded = []
        for level, (up, skip_block, pathway) in enumerate(zip(self.ups, self.skips, self.pathways)):
            keys.append(weights[level].argmax(dim=-1))
            parent, group, first, membership = _prefix_groups(torch.stack(keys, dim=1), group)
            features = torch.cat(
                [take_rows(up(x), parent), take_rows(skip_block(skips[level + 1]), image_index[first])], 1
            )
            x = pathway(features, _group_mean(weights[level], membership))
            if self.modulation is not None:
                x = self.modulation(level, x, conditioning[first])
            if level >= self.num_levels - levels:
                decoded.append(take_rows(x, group))
        return decoded[::-1]


def _prefix_groups(
    keys: torch.Tensor, previous: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups of the pairs with equal key rows (N, K): each group's row in the previous level
    (``previous`` of its first pair), each pair's group, each group's first pair, and the
    membership matrix (groups, N). Plain comparisons and arg-max, so ONNX can export it."""
    unique_keys, group = torch.unique(keys, dim=0, return_inverse=True)
    membership = group[None, :] == torch.arange(len(unique_keys), device=keys.device)[:, None]
    first = membership.float().argmax(dim=1)  # the first pair of each group
    return previous[first], group, first, membership


def _group_mean(weights: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """Mean weight row (groups, M) of each group's pairs (differentiable to every pair's row)."""
    membership = membership.to(weights.dtype)
    return membership @ weights / membership.sum(dim=1, keepdim=True)
