"""Output heads: a prompt-conditioned 1x1x1 convolution, or a plain one for the ablation."""

from __future__ import annotations

import math

import torch
from torch import nn

FOREGROUND_PRIOR = 0.1  # initial foreground probability of every voxel (RetinaNet-style prior)


def prior_bias(prior: float = FOREGROUND_PRIOR) -> float:
    """The logit whose sigmoid is ``prior``: starting there, the loss need not first unlearn 0.5."""
    return math.log(prior / (1 - prior))


class PromptConditionedHead(nn.Module):
    """A 1x1x1 convolution to one logit whose weights and bias are generated from the prompt.

    Two prompts that share a whole route share every decoder feature; this head still gives each
    its own mask. The generated bias starts at the logit of a 10 % foreground prior for every prompt.

    Args:
        in_channels: decoder channels at full resolution.
        embedding_dim: size of the prompt embedding.
    """

    def __init__(self, in_channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.generator = nn.Linear(embedding_dim, in_channels + 1)
        with torch.no_grad():
            self.generator.weight[-1].zero_()
            self.generator.bias[-1] = prior_bias()

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
        with torch.no_grad():
            self.conv.bias.fill_(prior_bias())

    def forward(self, features: torch.Tensor, prompt_embedding: torch.Tensor) -> torch.Tensor:
        return self.conv(features)
