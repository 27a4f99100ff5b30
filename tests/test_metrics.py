from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.soft_skeleton import max_pool_soft_skeleton
from lightning_modules.losses import _LINES, _NeighbourhoodMax, dice_bce_loss, soft_cl_dice_loss, soft_skeleton
from metrics.segmentation import cl_dice, dice, topology_precision, topology_sensitivity
from metrics.surface import hd95, surface_dice


def test_dice_hand_computed():
    p = np.zeros((4, 4, 4), bool)
    g = np.zeros((4, 4, 4), bool)
    p[0, 0, :3] = True  # 3 voxels
    g[0, 0, 1:] = True  # 3 voxels, 2 shared
    assert dice(p, g) == pytest.approx(2 * 2 / 6)


def test_empty_cases():
    empty = np.zeros((5, 5, 5), bool)
    full = empty.copy()
    full[2, 2, :] = True
    for metric in (dice, cl_dice, topology_precision, topology_sensitivity):
        assert metric(empty, empty) == 1.0
        assert metric(full, empty) == 0.0
        assert metric(empty, full) == 0.0


def test_topology_metrics_on_a_broken_tube():
    truth = np.zeros((9, 9, 30), bool)
    truth[3:6, 3:6, 2:28] = True
    prediction = truth.copy()
    prediction[:, :, 14:16] = False  # a gap of 2 of 26 slices
    precision = topology_precision(prediction, truth)
    sensitivity = topology_sensitivity(prediction, truth)
    assert precision == 1.0  # the predicted skeleton lies inside the truth
    assert 0.8 < sensitivity < 1.0  # the truth's skeleton is cut at the gap
    assert cl_dice(prediction, truth) == pytest.approx(2 * precision * sensitivity / (precision + sensitivity))


SPACING = (2.0, 1.0, 0.5)  # mm along the array axes


def shifted_cubes() -> tuple[np.ndarray, np.ndarray]:
    """6³ cubes, the second 2 voxels (4 mm) further along axis 0: 152 surface voxels each."""
    a = np.zeros((14, 12, 12), bool)
    a[2:8, 2:8, 2:8] = True
    return a, np.roll(a, 2, axis=0)


def test_hd95_of_shifted_cubes_in_mm():
    """Each cube's leading face (36 of 152 surface voxels, > 5 %) lies 2 voxels = 4 mm from the other
    surface, no surface voxel further: HD95 = 4 mm (2 with the spacing ignored)."""
    a, b = shifted_cubes()
    assert hd95(a, b, SPACING) == pytest.approx(4.0) and hd95(b, a, SPACING) == pytest.approx(4.0)
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    stray = a.copy()
    stray[12, 10, 10] = True  # 1 of 153 surface voxels, 10 mm away: below the 95th percentile
    assert hd95(stray, a, SPACING) == 0.0


def test_nsd_of_shifted_cubes_at_two_tolerances():
    """Per cube: 36 face voxels at 4 mm, a 20-voxel ring at 2 mm (1 voxel along axis 0), the rest at
    most 1 mm: within 2 mm 116 of 152, within 1.9 mm 96 of 152, within 4 mm all."""
    a, b = shifted_cubes()
    assert surface_dice(a, b, SPACING, 2.0) == pytest.approx(116 / 152)
    assert surface_dice(a, b, SPACING, 1.9) == pytest.approx(96 / 152)
    assert surface_dice(a, b, SPACING, 4.0) == pytest.approx(1.0)


def test_surface_metrics_with_empty_masks():
    a, _ = shifted_cubes()
    empty = np.zeros_like(a)
    assert np.isnan(hd95(empty, a, SPACING)) and surface_dice(empty, a, SPACING, 2.0) == 0.0  # not found
    assert np.isnan(hd95(a, empty, SPACING)) and surface_dice(a, empty, SPACING, 2.0) == 0.0
    assert np.isnan(hd95(empty, empty, SPACING)) and np.isnan(surface_dice(empty, empty, SPACING, 2.0))


def test_losses_are_low_for_a_confident_correct_prediction():
    target = torch.zeros(1, 1, 16, 16, 16)
    target[..., 4:12, 6:10, 6:10] = 1
    good = (target * 2 - 1) * 20
    bad = -good
    assert dice_bce_loss(good, target) < 0.05 < dice_bce_loss(bad, target)
    assert soft_cl_dice_loss(good, target) < 0.05 < soft_cl_dice_loss(bad, target)


def test_soft_skeleton_equals_the_max_pooling_one_values_and_gradients():
    """Equal on a binary tube (plateaus), a blurred one (distinct values) and that in bf16 (ties):
    with ties the gradient goes where max pooling sends it (its window's first maximum)."""
    generator = torch.Generator().manual_seed(0)
    tube = torch.zeros(2, 1, 12, 14, 16)
    tube[0, 0, 2:10, 5:9, 6:10] = 1
    tube[1, 0, 6, 2:12, 3:13] = 1
    blurred = torch.nn.functional.avg_pool3d(tube + 0.3 * torch.rand(tube.shape, generator=generator), 3, 1, 1)
    weights = torch.rand(tube.shape, generator=generator)
    for volume in (tube, blurred, blurred.to(torch.bfloat16).float()):
        ours, theirs = volume.clone().requires_grad_(), volume.clone().requires_grad_()
        skeleton, reference = soft_skeleton(ours), max_pool_soft_skeleton(theirs)
        assert torch.equal(skeleton, reference) and skeleton.sum() > 0
        (skeleton * weights).sum().backward()
        (reference * weights).sum().backward()
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-5) and ours.grad.abs().sum() > 0


@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (0, 1, 2)])
def test_neighbourhood_max_is_max_pooling_along_lines_with_its_gradient(axes):
    volume = torch.rand(2, 1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    lines = tuple(_LINES[axis] for axis in axes)
    assert torch.autograd.gradcheck(lambda v: _NeighbourhoodMax.apply(v, lines), (volume,))
    windows = [tuple(3 if a == axis else 1 for a in range(3)) for axis in axes]
    poolings = [torch.nn.functional.max_pool3d(volume, w, 1, tuple(k // 2 for k in w)) for w in windows]
    assert torch.equal(_NeighbourhoodMax.apply(volume, lines), torch.stack(poolings).amax(0))


def test_empty_targets_take_cross_entropy_only_hand_computed():
    """p = 0.5 everywhere, 32 voxels a pair; pair 0 holds one foreground voxel, pair 1 none."""
    logits = torch.zeros(2, 1, 2, 4, 4, requires_grad=True)
    target = torch.zeros(2, 1, 2, 4, 4)
    target[0, 0, 1, 1, 1] = 1
    dice_term = 1 - (2 * 0.5 + 1) / (32 * 0.5 + 1 + 1)  # pair 0 only
    expected = dice_term + math.log(2)
    assert dice_bce_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert dice_bce_loss(logits, torch.zeros_like(target)).item() == pytest.approx(math.log(2), rel=1e-6)
    focal = dice_bce_loss(logits, torch.zeros_like(target), focal_gamma=2.0).item()
    assert focal == pytest.approx(0.25 * math.log(2), rel=1e-6)  # (1 - p_t)^2 = 0.25
    empty_cl = soft_cl_dice_loss(logits, torch.zeros_like(target))
    assert empty_cl.item() == 0.0 and empty_cl.requires_grad
    # The empty pair's logits get only the cross-entropy gradient: sigmoid(0) / voxels.
    dice_bce_loss(logits, target).backward()
    assert torch.allclose(logits.grad[1], torch.full_like(logits.grad[1], 0.5 / 64))


def two_of_eight_missed(pairs: int) -> tuple[torch.Tensor, torch.Tensor, float, float, float, float]:
    """``pairs`` pairs of 8 voxels, all at p = sigmoid(-2); in the first, two voxels are foreground.
    Returns logits, target, p, the first pair's Dice term, and the CE of a missed foreground and of a
    kept background voxel."""
    logits = torch.full((pairs, 1, 2, 2, 2), -2.0)
    target = torch.zeros_like(logits)
    target[0, 0, 0, 0, :] = 1
    p = 1 / (1 + math.exp(2.0))
    dice_term = 1 - (2 * 2 * p + 1) / (8 * p + 2 + 1)
    return logits, target, p, dice_term, -math.log(p), -math.log(1 - p)


def test_top_fraction_cross_entropy_averages_each_pairs_hardest_voxels_hand_computed():
    """One pair of 8 voxels, all predicted background at p = sigmoid(-2); two are foreground.
    The hardest quarter (2 voxels) is exactly the two missed foreground voxels."""
    logits, target, _, dice_term, missed, kept = two_of_eight_missed(pairs=1)
    assert dice_bce_loss(logits, target).item() == pytest.approx(dice_term + (2 * missed + 6 * kept) / 8, rel=1e-6)
    assert dice_bce_loss(logits, target, ce_top_fraction=0.25).item() == pytest.approx(dice_term + missed, rel=1e-6)
    with pytest.raises(ValueError, match="ce_top_fraction"):
        dice_bce_loss(logits, target, ce_top_fraction=0.0)


def test_balanced_cross_entropy_gives_a_pairs_foreground_half_its_term_hand_computed():
    """Pair 0: 8 voxels at p = sigmoid(-2), two foreground; pair 1: the same logits, no foreground.
    Balanced, pair 0's CE is (missed + kept) / 2 and pair 1's the plain mean. A foreground voxel's
    CE gradient is (p - 1) * 0.5 / 2 voxels / 2 pairs, twice the plain (p - 1) / 16 voxels; a
    background voxel's p * 0.5 / 6 / 2 (the Dice gradients are the same in both)."""
    logits, target, p, dice_term, missed, kept = two_of_eight_missed(pairs=2)
    logits.requires_grad_(True)
    balanced = dice_bce_loss(logits, target, ce_balance=1.0)
    assert balanced.item() == pytest.approx(dice_term + ((missed + kept) / 2 + kept) / 2, rel=1e-6)
    difference = (
        torch.autograd.grad(balanced, logits)[0] - torch.autograd.grad(dice_bce_loss(logits, target), logits)[0]
    )
    assert difference[0, 0, 0, 0, 0].item() == pytest.approx((p - 1) / 8 - (p - 1) / 16, rel=1e-5)
    assert difference[0, 0, 1, 1, 1].item() == pytest.approx(p / 24 - p / 16, rel=1e-5)
    assert difference[1].abs().max().item() < 1e-9  # the empty pair keeps the plain mean
    with pytest.raises(ValueError, match="ce_balance"):
        dice_bce_loss(logits, target, ce_balance=1.0, focal_gamma=2.0)


def test_partial_balance_gives_the_foreground_a_share_between_its_fraction_and_half_hand_computed():
    """One pair of 8 voxels, two foreground (f = 1/4) at CE ``missed``, six background at ``kept``.
    b = 0.5: the foreground's share is sqrt(1/4) / (sqrt(1/4) + sqrt(3/4)) = 1 / (1 + sqrt 3);
    b = 0 equals the plain mean; b outside [0, 1] is refused."""
    logits, target, _, dice_term, missed, kept = two_of_eight_missed(pairs=1)
    share = 1 / (1 + math.sqrt(3))
    half = dice_bce_loss(logits, target, ce_balance=0.5).item()
    assert half == pytest.approx(dice_term + share * missed + (1 - share) * kept, rel=1e-6)
    assert dice_bce_loss(logits, target, ce_balance=0.0).item() == pytest.approx(
        dice_bce_loss(logits, target).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="ce_balance must lie in"):
        dice_bce_loss(logits, target, ce_balance=1.5)


def test_pair_weights_weigh_each_pairs_terms_hand_computed():
    """Pair 0 holds two foreground voxels of 8, pair 1 none, both at p = sigmoid(-2). Weights 3 : 1
    make the cross-entropy (3 * pair 0's + pair 1's) / 4; the Dice term, pair 0's alone, is unchanged;
    equal weights are the plain mean. Soft clDice over two present pairs: (l0 + 3 * l1) / 4."""
    logits, target, _, dice_term, missed, kept = two_of_eight_missed(pairs=2)
    weighted = dice_bce_loss(logits, target, pair_weights=torch.tensor([3.0, 1.0])).item()
    assert weighted == pytest.approx(dice_term + (3 * (2 * missed + 6 * kept) / 8 + kept) / 4, rel=1e-6)
    equal = dice_bce_loss(logits, target, pair_weights=torch.tensor([2.0, 2.0])).item()
    assert equal == pytest.approx(dice_bce_loss(logits, target).item(), rel=1e-6)
    tubes = torch.zeros(2, 1, 8, 8, 8)
    tubes[0, 0, 2:6, 3:5, 3:5], tubes[1, 0, 1:7, 4, 2:6] = 1, 1
    tube_logits = torch.randn(tubes.shape, generator=torch.Generator().manual_seed(0))
    each = [soft_cl_dice_loss(tube_logits[i : i + 1], tubes[i : i + 1]).item() for i in range(2)]
    assert each[0] != pytest.approx(each[1])
    cl = soft_cl_dice_loss(tube_logits, tubes, pair_weights=torch.tensor([1.0, 3.0])).item()
    assert cl == pytest.approx((each[0] + 3 * each[1]) / 4, rel=1e-5)
