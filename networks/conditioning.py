"""Prompt conditioning beyond the route: per-level feature modulation and a prompt-generated head.

The paper conditions the decoder on the prompt only through the route (and, here, a 1x1x1 head).
Prompts that embed alike ("left kidney" / "right kidney", "lung" / "lung tumor") then share most
of their sub-pathways and ask nearly identical features for different masks. Two additions, both
switchable (``PromptSegNet(level_conditioning=..., head_hidden=...)``) and small next to the
paper's parameter budget:

* :class:`LevelModulation` (FiLM, Perez et al. 2018): after each AP module, the features of a pair
  are scaled and shifted per channel by amounts generated from its prompt. It starts as the
  identity, so a network without it and one with it begin alike.
* :class:`PromptProjection`: one shared layer mapping the standardised prompt embedding to a
  smaller conditioning vector that every generator reads (keeps the added parameters small).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

CONDITIONING_DIM = 128


class PromptProjection(nn.Module):
    """Standardised prompt embedding (N, E) -> conditioning vector (N, ``dim``), one shared layer."""

    def __init__(self, embedding_dim: int, dim: int = CONDITIONING_DIM) -> None:
        super().__init__()
        self.dim = dim
        self.layers = nn.Sequential(nn.Linear(embedding_dim, dim), nn.GELU())

    def forward(self, prompt_embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(prompt_embedding)


class LevelModulation(nn.Module):
    """Per-channel scale and shift of each decoder level's features, generated from the prompt.

    ``x * (1 + gamma) + beta`` with ``(gamma, beta)`` a linear function of the conditioning vector,
    initialised to zero (the identity).

    Args:
        conditioning_dim: size of the conditioning vector.
        channels: decoder channels of each level.
    """

    def __init__(self, conditioning_dim: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.generators = nn.ModuleList(nn.Linear(conditioning_dim, 2 * c) for c in channels)
        for generator in self.generators:
            nn.init.zeros_(generator.weight)
            nn.init.zeros_(generator.bias)

    def forward(self, level: int, features: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.generators[level](conditioning).to(features.dtype).chunk(2, dim=1)
        shape = (*gamma.shape, *([1] * (features.dim() - 2)))
        return features * (1 + gamma.view(shape)) + beta.view(shape)
