"""Training losses: Dice + binary cross-entropy per (image, prompt) pair, and soft clDice."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over pairs of ``1 - soft Dice`` plus the voxel-mean binary cross-entropy."""
    probability = torch.sigmoid(logits)
    dims = tuple(range(1, logits.dim()))
    intersection = (probability * target).sum(dims)
    soft_dice = (2 * intersection + smooth) / (probability.sum(dims) + target.sum(dims) + smooth)
    return (1 - soft_dice).mean() + F.binary_cross_entropy_with_logits(logits, target)


def _soft_erode(x: torch.Tensor) -> torch.Tensor:
    return -torch.stack(
        [F.max_pool3d(-x, k, 1, p) for k, p in (((3, 1, 1), (1, 0, 0)), ((1, 3, 1), (0, 1, 0)), ((1, 1, 3), (0, 0, 1)))]
    ).amax(0)


def _soft_dilate(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool3d(x, 3, 1, 1)


def soft_skeleton(x: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Differentiable skeleton by iterated soft morphological opening (Shit et al., 2021)."""
    skeleton = F.relu(x - _soft_dilate(_soft_erode(x)))
    for _ in range(iterations):
        x = _soft_erode(x)
        delta = F.relu(x - _soft_dilate(_soft_erode(x)))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton


def soft_cl_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - soft clDice`` averaged over pairs (N, 1, D, H, W)."""
    probability = torch.sigmoid(logits)
    dims = tuple(range(1, logits.dim()))
    skeleton_p, skeleton_g = soft_skeleton(probability), soft_skeleton(target)
    precision = ((skeleton_p * target).sum(dims) + smooth) / (skeleton_p.sum(dims) + smooth)
    sensitivity = ((skeleton_g * probability).sum(dims) + smooth) / (skeleton_g.sum(dims) + smooth)
    return (1 - 2 * precision * sensitivity / (precision + sensitivity)).mean()
