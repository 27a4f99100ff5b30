"""Output heads: prompt-generated 1x1x1 convolutions, or a plain shared one for the ablation."""

from __future__ import annotations

import math

import torch
from torch import nn

FOREGROUND_PRIOR = 0.1  # initial foreground probability of every voxel (RetinaNet-style prior)


def prior_bias(prior: float = FOREGROUND_PRIOR) -> float:
    """The logit whose sigmoid is ``prior``: starting there, the loss need not first unlearn 0.5."""
    return math.log(prior / (1 - prior))


class PromptConditionedHead(nn.Module):
    """Convolutions to one logit whose weights and biases are generated from the prompt.

    With ``hidden`` 0, a 1x1x1 convolution (a linear read-out of the decoder features); with
    ``hidden`` > 0, two 1x1x1 convolutions with a ReLU between (``in_channels -> hidden -> 1``), so
    each prompt draws its own non-linear boundary in feature space, as the dynamic heads of
    CLIP-driven universal models do. Two prompts that share a whole route share every decoder
    feature; this head still gives each its own mask. The final bias starts at the logit of a 10 %
    foreground prior for every prompt.

    Args:
        in_channels: decoder channels at full resolution.
        embedding_dim: size of the (conditioning) vector the weights are generated from.
        hidden: width of the hidden layer; 0 for a single linear layer.
    """

    def __init__(self, in_channels: int, embedding_dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.in_channels, self.hidden = in_channels, hidden
        # generated per prompt: [first weights (c x h), first biases (h),] last weights and bias
        self.sizes = [in_channels + 1] if hidden == 0 else [in_channels * hidden, hidden, hidden + 1]
        self.generator = nn.Linear(embedding_dim, sum(self.sizes))
        with torch.no_grad():
            self.generator.weight[-1].zero_()
            self.generator.bias[-1] = prior_bias()

    def forward(self, features: torch.Tensor, prompt_embedding: torch.Tensor) -> torch.Tensor:
        params = self.generator(prompt_embedding).to(features.dtype)
        if self.hidden:
            w1, b1, params = params.split(self.sizes, dim=1)
            w1 = w1.view(-1, self.in_channels, self.hidden)
            hidden = torch.einsum("nc...,nch->nh...", features, w1) + b1.view(*b1.shape, 1, 1, 1)
            features = torch.relu(hidden)
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
