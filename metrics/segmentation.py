"""Overlap and topology metrics on binary masks (numpy or torch, any dimension).

clDice follows Shit et al. (CVPR 2021), with S the skeleton from scikit-image:
topology precision ``Tprec = |S(P) & G| / |S(P)|``, topology sensitivity
``Tsens = |S(G) & P| / |S(G)|``, ``clDice = 2 Tprec Tsens / (Tprec + Tsens)``.

Empty cases: when prediction and ground truth are both empty every metric is 1; when exactly one
is empty every metric is 0. The 1 for "absent and predicted absent" must never enter a task's mean:
``evaluate.py`` scores only cases whose ground truth holds the structure and reports the cases
without it separately, as false positives (the share of them with a non-empty prediction).
Surface metrics in mm (HD95, NSD) are in ``metrics/surface.py``.
"""

from __future__ import annotations

import numpy as np
from skimage.morphology import skeletonize


def _as_bool(mask) -> np.ndarray:
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool)


def dice(prediction, truth) -> float:
    p, g = _as_bool(prediction), _as_bool(truth)
    total = p.sum() + g.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(p, g).sum() / total)


def _covered_fraction(skeleton_of: np.ndarray, other: np.ndarray) -> float:
    skeleton = skeletonize(skeleton_of) if skeleton_of.any() else skeleton_of
    if not skeleton.any():  # a mask too thin to keep a skeleton: use the mask itself
        skeleton = skeleton_of
    return float(np.logical_and(skeleton, other).sum() / skeleton.sum())


def _empty_case(p: np.ndarray, g: np.ndarray) -> float | None:
    if not p.any() and not g.any():
        return 1.0
    if not p.any() or not g.any():
        return 0.0
    return None


def topology_precision(prediction, truth) -> float:
    p, g = _as_bool(prediction), _as_bool(truth)
    empty = _empty_case(p, g)
    return empty if empty is not None else _covered_fraction(p, g)


def topology_sensitivity(prediction, truth) -> float:
    p, g = _as_bool(prediction), _as_bool(truth)
    empty = _empty_case(p, g)
    return empty if empty is not None else _covered_fraction(g, p)


def cl_dice(prediction, truth) -> float:
    precision = topology_precision(prediction, truth)
    sensitivity = topology_sensitivity(prediction, truth)
    if precision + sensitivity == 0:
        return 0.0
    return 2.0 * precision * sensitivity / (precision + sensitivity)
