"""Output heads: a prompt-conditioned 1x1x1 convolution, or a plain one for the ablation."""

from __future__ import annotations

import torch
from torch import nn


class PromptConditionedHead(nn.Module):
    """A 1x1x1 convolution to one logit whose weights and bias are generated from the prompt.

    Two prompts that share a whole route share every decoder feature; this head still gives each
    its own mask.

    Args:
        in_channels: decoder channels at full resolution.
        embedding_dim: size of the prompt embedding.
    """

    def __init__(self, in_channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.generator = nn.Linear(embedding_dim, in_channels + 1)

    def forward(self, features: torch.Tensor, prompt_embedding: torch.Tensor) -> torch.Tensor:
        params = self.generator(prompt_embedding).to(features.dtype)
        weight, bias = params[:, :-1], params[:, -1]
        logits = torch.einsum("nc...,nc->n...", features, weight) + bias.view(-1, 1, 1, 1)
        return logits.unsqueeze(1)


class PlainHead(nn.Module):
    """A shared 1x1x1 convolution to one logit; the prompt reaches the mask through the route only."""

    def __init__(self, in_channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, 1, kernel_size=1)

    def forward(self, features: torch.Tensor, prompt_embedding: torch.Tensor) -> torch.Tensor:
        return self.conv(features)
