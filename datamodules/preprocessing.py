"""The one preprocessing path: reorientation, the paper's spacing rule, the HU window, and its inverse.

Training, validation, ``segment.py`` and evaluation all call :class:`Preprocessing` with the
parameters stored in the checkpoint, so a model never meets an input prepared differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchio as tio

FILLED = 0.9  # occupancy of a coarse voxel lying inside a structure (its thick parts)


@dataclass(frozen=True)
class Preprocessing:
    """Paper (sec. 3.2): spacings 0.6, 1.0, 1.5 mm; 90 % closest, 10 % random; window 1800 / 0.

    The image's own spacing is the geometric mean of its three voxel sides; the closest candidate
    is the nearest in log scale.

    Args:
        spacing_candidates: isotropic target spacings in mm.
        random_spacing_probability: chance of a uniformly random candidate instead of the closest.
        window_level: HU at the window's centre.
        window_width: HU covered by the window; values outside are clipped, the rest scaled to [0, 1].
        antialias: Gaussian-smooth the image along every axis it is downsampled on before resampling
            (TorchIO's ``antialias``), so a coarser voxel holds the average of the finer ones beneath it,
            as a scan reconstructed at that spacing would, instead of a point sample of them: noise
            falls and thin vessels break into fewer pieces, but edges blur against the labels, which
            are resampled nearest either way (docs/experiments.md, twenty-fifth session: not in the shipped configs).
        thin_occupancy: 0 resamples every label nearest. Above 0, a background voxel of the coarser grid
            also takes a thin structure's label (the label values ``prepare`` is given: the data's
            tubular tasks) where that structure fills at least this share of it, measured as its
            antialiased mask, and no voxel next to it is filled (>= 0.9): thick parts, such as an
            aorta's rim, stay as nearest sampling made them. Nearest sampling keeps a vessel one or
            two voxels wide only where a voxel's centre falls inside it; a 2.6 mm vessel on a 2 mm
            grid then scores at most 0.64 Dice against its full-resolution mask, at most 0.72 with
            0.2 here (docs/experiments.md, twenty-sixth session); averaged over segment.py's 8 shifted
            grids, at most 0.84 with 0.2 and 0.89 with 0.25 (thirty-third session).
    """

    spacing_candidates: tuple[float, ...] = (0.6, 1.0, 1.5)
    random_spacing_probability: float = 0.1
    window_level: float = 0.0
    window_width: float = 1800.0
    antialias: bool = False
    thin_occupancy: float = 0.0

    def __post_init__(self) -> None:
        if not self.spacing_candidates or min(self.spacing_candidates) <= 0:
            raise ValueError(f"spacing_candidates must be positive, got {self.spacing_candidates}")
        if not 0.0 <= self.random_spacing_probability <= 1.0:
            raise ValueError("random_spacing_probability must lie in [0, 1]")
        if self.window_width <= 0:
            raise ValueError(f"window_width must be positive, got {self.window_width}")
        if not 0.0 <= self.thin_occupancy < 1.0:
            raise ValueError(f"thin_occupancy must lie in [0, 1), got {self.thin_occupancy}")
        object.__setattr__(self, "spacing_candidates", tuple(float(s) for s in self.spacing_candidates))

    def as_dict(self) -> dict:
        return asdict(self)

    def closest_spacing(self, image_spacing: tuple[float, ...]) -> float:
        own = float(np.exp(np.mean(np.log(image_spacing))))
        return min(self.spacing_candidates, key=lambda c: abs(np.log(c / own)))

    def sample_spacing(self, image_spacing: tuple[float, ...], rng: np.random.Generator) -> float:
        if rng.random() < self.random_spacing_probability:
            return float(rng.choice(self.spacing_candidates))
        return self.closest_spacing(image_spacing)

    def window(self, hu: torch.Tensor) -> torch.Tensor:
        low = self.window_level - self.window_width / 2
        return ((hu.float() - low) / self.window_width).clamp_(0.0, 1.0)

    def prepare(
        self, subject: tio.Subject, spacing: float, thin_values: Sequence[int] = (), shift: Sequence[float] = (0, 0, 0)
    ) -> tio.Subject:
        """Reorient to RAS, resample to ``spacing`` (image trilinear, antialiased if set; labels nearest,
        widened by ``thin_occupancy`` for ``thin_values``), window. ``shift`` moves the grid by that
        fraction of a voxel along each axis (:func:`shifted_grid`)."""
        canonical = tio.ToCanonical()(subject)
        target = shifted_grid(canonical.get_first_image(), spacing, shift) if any(shift) else spacing
        prepared = tio.Resample(target, antialias=self.antialias)(canonical)
        if self.thin_occupancy and thin_values and "label" in prepared:
            self._widen_thin_labels(canonical["label"], prepared["label"], thin_values)
        for image in prepared.get_images(intensity_only=True):
            image.set_data(self.window(image.data))
        return prepared

    def _widen_thin_labels(self, fine: tio.LabelMap, coarse: tio.LabelMap, values: Sequence[int]) -> None:
        """Give each background voxel of ``coarse`` the thin structure filling ``thin_occupancy`` of it,
        except next to a voxel the structure fills (a thick part's rim stays as nearest made it)."""
        labels = coarse.data.clone()
        background = labels == 0
        for value in sorted(values):
            mask = tio.ScalarImage(tensor=(fine.data == value).float(), affine=fine.affine)
            occupancy = tio.Resample(coarse, antialias=True)(mask).data
            filled = (occupancy >= FILLED).float()[None]
            thick = torch.nn.functional.max_pool3d(filled, 3, stride=1, padding=1)[0] > 0
            labels[background & (occupancy >= self.thin_occupancy) & ~thick] = value
        coarse.set_data(labels)

    @staticmethod
    def restore(prediction: torch.Tensor, prepared_affine: np.ndarray, original: tio.Image) -> torch.Tensor:
        """Resample a prepared-grid map (C, D, H, W) back onto the original image's grid (linear)."""
        image = tio.ScalarImage(tensor=prediction.float(), affine=prepared_affine)
        return tio.Resample(original, image_interpolation="linear")(image).data


def shifted_grid(image: tio.Image, spacing: float, shift: Sequence[float]) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) of TorchIO's ``spacing`` grid for ``image`` (as many whole voxels as fit, centred
    on the image), moved by ``shift`` voxels along its axes."""
    old_spacing = np.asarray(image.spacing, dtype=float)
    size = np.asarray(image.spatial_shape)
    shape = np.maximum(np.floor(size * old_spacing / spacing), 1).astype(int)
    direction = image.affine[:3, :3] / old_spacing
    centre = image.affine[:3, :3] @ ((size - 1) / 2) + image.affine[:3, 3]
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = centre + affine[:3, :3] @ (np.asarray(shift, dtype=float) - (shape - 1) / 2)
    return tuple(int(n) for n in shape), affine


def grid_offsets(count: int) -> list[tuple[float, float, float]]:
    """``count`` (1, 2, 4 or 8) grid shifts spread over one voxel: the corners of a cube a half voxel
    wide around the unshifted grid (all 8, the two of one diagonal, or the 4 of a tetrahedron)."""
    corners = {
        1: [(0, 0, 0)],
        2: [(-1, -1, -1), (1, 1, 1)],
        4: [(1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)],
        8: [(i, j, k) for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)],
    }
    if count not in corners:
        raise ValueError(f"--grid-shifts must be 1, 2, 4 or 8, got {count}")
    return [tuple(c / 4 for c in corner) for corner in corners[count]]
