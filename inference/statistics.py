"""Per-structure statistics of masks on their image's grid: size, HU inside the mask, bounding box in mm."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

AXES = ("x", "y", "z")
BBOX_COLUMNS = tuple(f"bbox_{end}_{axis}_mm" for end in ("min", "max") for axis in AXES)
COLUMNS = ("prompt", "voxels", "volume_ml", "hu_mean", "hu_std", *BBOX_COLUMNS)


def mask_statistics(prompt: str, mask: np.ndarray, hu: np.ndarray, affine: np.ndarray) -> dict[str, object]:
    """One row of :data:`COLUMNS` for a mask on the grid of ``hu`` (original values) with ``affine``.

    ``volume_ml``: voxels x the voxel volume (|det| of the affine's 3x3 part) / 1000; ``hu_mean`` and
    ``hu_std`` (population, ddof 0) over the voxels inside the mask; the bounding box: the smallest and
    largest world coordinates of the centres of the mask's voxels, in mm, RAS+ like the NIfTI affine
    (x grows towards the patient's right, y anterior, z superior). An empty mask leaves the HU and box
    columns empty.
    """
    inside = mask.astype(bool)
    voxels = int(inside.sum())
    row: dict[str, object] = dict.fromkeys(COLUMNS, "")
    row |= {"prompt": prompt, "voxels": voxels}
    row["volume_ml"] = round(voxels * abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0, 6)
    if voxels:
        values = hu[inside].astype(np.float64)
        row |= {"hu_mean": round(float(values.mean()), 3), "hu_std": round(float(values.std()), 3)}
        world = nib.affines.apply_affine(affine, np.argwhere(inside))
        for axis, low, high in zip(AXES, world.min(axis=0), world.max(axis=0)):
            row |= {f"bbox_min_{axis}_mm": round(float(low), 3), f"bbox_max_{axis}_mm": round(float(high), 3)}
    return row


def case_statistics(
    prompts: Sequence[str], masks: np.ndarray, hu: np.ndarray, affine: np.ndarray
) -> list[dict[str, object]]:
    """One row per prompt for masks (P, ...) on ``hu``'s grid."""
    return [mask_statistics(prompt, mask, hu, affine) for prompt, mask in zip(prompts, masks)]


def write_csv(path: Path, rows: Sequence[dict[str, object]], columns: Sequence[str] = COLUMNS) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def gather(cases: dict[str, Path]) -> list[dict[str, object]]:
    """The rows of every case's statistics.csv (case name -> file), with a leading ``case`` column."""
    rows = []
    for case, path in cases.items():
        with path.open(newline="") as file:
            rows += [{"case": case} | row for row in csv.DictReader(file)]
    return rows
