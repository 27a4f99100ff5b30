"""Surface metrics in mm on binary 3D masks, through MONAI: HD95 and NSD (issue #15).

``hd95``: the 95th-percentile symmetric Hausdorff distance between the two masks' surfaces (voxels
of a mask with a 6-neighbour outside it), the larger of the two directed 95th percentiles
(``monai.metrics.compute_hausdorff_distance(..., percentile=95)``). Lower is better.
``surface_dice``: normalised surface Dice, the share of both surfaces' voxels lying within
``tolerance`` mm of the other surface (``monai.metrics.compute_surface_dice``, voxel counts, no
sub-voxel areas). Distances use ``spacing``, the voxel sides in mm along the array axes.

Empty masks: HD95 is NaN whenever either mask is empty (no distance exists; a structure present in
the ground truth but predicted empty is "not found"). NSD is 0 when exactly one mask is empty and
NaN when both are.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice


def _batch(mask: np.ndarray) -> torch.Tensor:
    """[B = 1, C = 1, X, Y, Z] boolean tensor, MONAI's one-hot layout for one foreground class."""
    return torch.as_tensor(np.asarray(mask, dtype=bool))[None, None]


def hd95(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm; NaN when either mask is empty."""
    if not np.any(prediction) or not np.any(truth):
        return float("nan")
    with warnings.catch_warnings():  # MONAI's own deprecated-argument notice
        warnings.simplefilter("ignore", FutureWarning)
        distance = compute_hausdorff_distance(
            _batch(prediction), _batch(truth), include_background=True, percentile=95, spacing=list(map(float, spacing))
        )
    return float(distance[0, 0])


def surface_dice(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance: float) -> float:
    """Normalised surface Dice at ``tolerance`` mm; 0 when exactly one mask is empty, NaN when both are."""
    found, present = bool(np.any(prediction)), bool(np.any(truth))
    if not found or not present:
        return float("nan") if not found and not present else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        nsd = compute_surface_dice(
            _batch(prediction),
            _batch(truth),
            class_thresholds=[float(tolerance)],
            include_background=True,
            spacing=list(map(float, spacing)),
        )
    return float(nsd[0, 0])
