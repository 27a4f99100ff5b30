from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.losses import dice_bce_loss, soft_cl_dice_loss
from metrics.segmentation import cl_dice, dice, topology_precision, topology_sensitivity


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


def test_losses_are_low_for_a_confident_correct_prediction():
    target = torch.zeros(1, 1, 16, 16, 16)
    target[..., 4:12, 6:10, 6:10] = 1
    good = (target * 2 - 1) * 20
    bad = -good
    assert dice_bce_loss(good, target) < 0.05 < dice_bce_loss(bad, target)
    assert soft_cl_dice_loss(good, target) < 0.05 < soft_cl_dice_loss(bad, target)
