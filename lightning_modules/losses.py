"""Training losses: Dice + binary cross-entropy per (image, prompt) pair, and soft clDice."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    smooth: float = 1.0,
    focal_gamma: float = 0.0,
    ce_top_fraction: float = 1.0,
    ce_balance: float = 0.0,
    pair_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft Dice over the pairs whose target holds the structure, plus the voxel-mean binary
    cross-entropy over every pair. Both are means over pairs, weighted by ``pair_weights`` (N,)
    where given (``TaskPriorities``), else plain.

    A pair with an empty target (a lesion absent from the case, a structure outside the patch)
    takes no Dice term: its smoothed Dice ``smooth / (sum p + smooth)`` would push every voxel of
    that prompt towards 0 about five orders of magnitude harder than the Dice of a present, still
    missed small structure pulls its few voxels up, and the prompt would learn never to answer.
    The cross-entropy keeps empty pairs empty.

    With ``focal_gamma`` > 0 the cross-entropy is the focal loss (Lin et al., 2017): each voxel's
    term is weighted by ``(1 - p_t) ** focal_gamma``, ``p_t`` the probability of its true class.

    With ``ce_top_fraction`` < 1 the cross-entropy of each pair is the mean over its hardest
    ``ce_top_fraction`` of voxels (the "TopK" loss nnU-Net offers beside Dice + CE): a structure
    of 150 voxels in a 64^3 patch whose prompt has collapsed to "nothing here" keeps its voxels
    among the hardest, and their pull grows by ``1 / ce_top_fraction`` against the easy background.

    With ``ce_balance`` = b > 0 the foreground voxels of a pair whose target holds the structure carry
    the share ``f**(1-b) / (f**(1-b) + (1-f)**(1-b))`` of its cross-entropy, ``f`` their fraction of
    the patch: b = 0 is the voxel mean (share ``f``), b = 1 the class-balanced mean (half each, as HED
    weighs its thin edges), b = 0.5 between (a 150-voxel tumour in a 64^3 patch: 2.3 % instead of
    0.06 % or 50 %). The structure's gradient, ``p - 1`` per logit, does not vanish where the sigmoid
    saturates near 0, so a prompt that has collapsed to "nothing here" is still pulled up inside its
    structure, which the Dice term (whose gradient carries the sigmoid's slope) cannot do. Empty pairs
    keep the plain mean.
    """
    if not 0.0 < ce_top_fraction <= 1.0:
        raise ValueError(f"ce_top_fraction must lie in (0, 1], got {ce_top_fraction}")
    if not 0.0 <= ce_balance <= 1.0:
        raise ValueError(f"ce_balance must lie in [0, 1], got {ce_balance}")
    if ce_balance > 0 and (focal_gamma > 0 or ce_top_fraction < 1.0):
        raise ValueError("ce_balance replaces the voxel mean: use it without focal_gamma or ce_top_fraction")
    probability = torch.sigmoid(logits)
    dims = tuple(range(1, logits.dim()))
    present = target.sum(dims) > 0
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if focal_gamma > 0:
        p_true = probability * target + (1 - probability) * (1 - target)
        cross_entropy = (1 - p_true).pow(focal_gamma) * cross_entropy
    pair_cross_entropy = (
        balanced_mean(cross_entropy, target, ce_balance)
        if ce_balance > 0
        else hardest_mean(cross_entropy, ce_top_fraction)
    )
    weights = torch.ones_like(pair_cross_entropy) if pair_weights is None else pair_weights.to(logits.device)
    cross_entropy = weighted_mean(pair_cross_entropy, weights)
    if not present.any():
        return cross_entropy
    soft_dice = pair_soft_dice(probability[present], target[present], smooth)
    return weighted_mean(1 - soft_dice, weights[present]) + cross_entropy


def pair_soft_dice(probability: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice of each pair (N,) of probabilities and targets (N, 1, D, H, W)."""
    dims = tuple(range(1, probability.dim()))
    return (2 * (probability * target).sum(dims) + smooth) / (probability.sum(dims) + target.sum(dims) + smooth)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(weights * values) / sum(weights)`` over the pairs."""
    return (weights * values).sum() / weights.sum()


def hardest_mean(voxel_losses: torch.Tensor, fraction: float) -> torch.Tensor:
    """Each pair's mean (N,) over its ``fraction`` largest voxel losses (all voxels when ``fraction`` is 1)."""
    flat = voxel_losses.flatten(1)
    if fraction >= 1.0:
        return flat.mean(1)
    k = max(1, int(round(fraction * flat.shape[1])))
    return flat.topk(k, dim=1, sorted=False).values.mean(1)


def balanced_mean(voxel_losses: torch.Tensor, target: torch.Tensor, balance: float = 1.0) -> torch.Tensor:
    """Each pair's (N,) ``s`` times its foreground voxels' mean loss plus ``1 - s`` times its
    background voxels', ``s = f**(1-balance) / (f**(1-balance) + (1-f)**(1-balance))`` with ``f`` the
    foreground fraction, where the target holds both classes; the plain voxel mean where it holds one."""
    dims = tuple(range(1, target.dim()))
    foreground, voxels = target.sum(dims, keepdim=True), target[0].numel()
    both = (foreground > 0) & (foreground < voxels)
    background = voxels - foreground
    weight_f, weight_b = (foreground / voxels) ** (1 - balance), (background / voxels) ** (1 - balance)
    share = weight_f / (weight_f + weight_b).clamp(min=1e-12)
    balanced = target * share / foreground.clamp(min=1) + (1 - target) * (1 - share) / background.clamp(min=1)
    return (voxel_losses * torch.where(both, balanced, 1.0 / voxels)).sum(dims)


# A voxel's neighbours along each axis (depth, height, width), in max pooling's scan order.
_LINES = (
    ((-1, 0, 0), (0, 0, 0), (1, 0, 0)),
    ((0, -1, 0), (0, 0, 0), (0, 1, 0)),
    ((0, 0, -1), (0, 0, 0), (0, 0, 1)),
)


class _NeighbourhoodMax(torch.autograd.Function):
    """Max of each voxel of (N, C, D, H, W) and its neighbours along the given 3-voxel lines, the
    border padded with -inf: for one line, what ``F.max_pool3d`` computes with that window; for the
    three lines, the max of the three poolings. PyTorch's CPU max pooling runs one channel at a time,
    unvectorised: for one-channel 64^3 masks shifted maxima are several times faster. The gradient
    goes where max pooling and ``amax`` send it: within a line to the first offset that holds the
    maximum, and shared evenly between lines that tie."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lines: tuple[tuple[tuple[int, int, int], ...], ...]) -> torch.Tensor:
        padded = F.pad(x, (1, 1, 1, 1, 1, 1), value=float("-inf"))
        line_maxima = []
        for line in lines:
            line_max = _shifted(padded, line[0], x.shape)
            for offset in line[1:]:
                line_max = torch.maximum(line_max, _shifted(padded, offset, x.shape))
            line_maxima.append(line_max)
        out = line_maxima[0]
        for line_max in line_maxima[1:]:
            out = torch.maximum(out, line_max)
        ctx.save_for_backward(padded, out, *line_maxima)
        ctx.lines = lines
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        padded, out, *line_maxima = ctx.saved_tensors
        ties = [line_max == out for line_max in line_maxima]
        if len(ties) > 1:
            grad = grad / torch.stack(ties).sum(0)
        grad_padded = torch.zeros_like(padded)
        for line, tie in zip(ctx.lines, ties, strict=True):
            unclaimed = tie
            for offset in line:
                winner = unclaimed & (_shifted(padded, offset, out.shape) == out)
                unclaimed = unclaimed & ~winner
                _shifted(grad_padded, offset, out.shape).add_(grad * winner)
        return _shifted(grad_padded, (0, 0, 0), out.shape), None


def _shifted(padded: torch.Tensor, offset: tuple[int, int, int], shape: torch.Size) -> torch.Tensor:
    """The view of a 1-voxel-padded volume that holds each voxel's neighbour at ``offset``."""
    (dz, dy, dx), (depth, height, width) = offset, shape[-3:]
    return padded[..., 1 + dz : 1 + dz + depth, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]


def _soft_erode(x: torch.Tensor) -> torch.Tensor:
    """Min over each voxel's 6-neighbourhood: the min of its three 3-voxel lines."""
    return -_NeighbourhoodMax.apply(-x, _LINES)


def _soft_dilate(x: torch.Tensor) -> torch.Tensor:
    """Max over the 3x3x3 cube, as three separable 3-voxel lines: width, height, then depth, so that
    the gradient reaches the cube's first maximum in max pooling's (depth, height, width) scan order."""
    for line in reversed(_LINES):
        x = _NeighbourhoodMax.apply(x, (line,))
    return x


def soft_skeleton(x: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Differentiable skeleton by iterated soft morphological opening (Shit et al., 2021)."""
    skeleton = F.relu(x - _soft_dilate(_soft_erode(x)))
    for _ in range(iterations):
        x = _soft_erode(x)
        delta = F.relu(x - _soft_dilate(_soft_erode(x)))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton


def soft_cl_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, pair_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``1 - soft clDice`` averaged (weighted by ``pair_weights`` where given) over the pairs
    (N, 1, D, H, W) whose target is not empty (empty pairs: 0, as for the Dice term)."""
    present = target.sum(tuple(range(1, target.dim()))) > 0
    if not present.any():
        return logits.sum() * 0.0
    weights = torch.ones(len(logits), device=logits.device) if pair_weights is None else pair_weights.to(logits.device)
    probability, target = torch.sigmoid(logits[present]), target[present]
    dims = tuple(range(1, logits.dim()))
    skeleton_p, skeleton_g = soft_skeleton(probability), soft_skeleton(target)
    precision = ((skeleton_p * target).sum(dims) + smooth) / (skeleton_p.sum(dims) + smooth)
    sensitivity = ((skeleton_g * probability).sum(dims) + smooth) / (skeleton_g.sum(dims) + smooth)
    return weighted_mean(1 - 2 * precision * sensitivity / (precision + sensitivity), weights[present])


def segmentation_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    tubular: torch.Tensor,
    cldice_weight: float,
    focal_gamma: float = 0.0,
    ce_top_fraction: float = 1.0,
    ce_balance: float = 0.0,
    pair_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Dice + BCE (focal with ``focal_gamma`` > 0, over the hardest ``ce_top_fraction`` of voxels,
    with the foreground's share raised by ``ce_balance``) on every pair, plus ``cldice_weight`` times soft clDice on
    the tubular pairs; every term a mean over pairs weighted by ``pair_weights`` where given.

    Returns the terms (``dice_bce``, ``soft_cldice`` when any pair is tubular) and their sum ``loss``.
    """
    terms = {
        "dice_bce": dice_bce_loss(
            logits,
            masks,
            focal_gamma=focal_gamma,
            ce_top_fraction=ce_top_fraction,
            ce_balance=ce_balance,
            pair_weights=pair_weights,
        )
    }
    loss = terms["dice_bce"]
    if cldice_weight > 0 and tubular.any():
        weights = None if pair_weights is None else pair_weights[tubular]
        terms["soft_cldice"] = soft_cl_dice_loss(logits[tubular], masks[tubular], pair_weights=weights)
        loss = loss + cldice_weight * terms["soft_cldice"]
    return terms | {"loss": loss}
