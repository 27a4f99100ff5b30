"""CT phantoms with known ground truth, written as nnU-Net v2 raw data sets.

Each case is a torso in Hounsfield units: fat and soft tissue, lungs, organs, a vertebral column,
contrast-filled vessel trees (aorta with its branches, pulmonary arteries), an airway tree with air
inside and soft-tissue walls, and lesions that are absent in some cases. Anatomy is defined in
millimetres in a patient frame and sampled on each case's own voxel grid, so spacing, orientation
and rotation vary freely. Partial volume comes from the signed distance to each surface (the
occupancy of a voxel is ``clip(0.5 - sdf / spacing, 0, 1)``, the limit of supersampling across the
edge); then a slight blur and Gaussian noise.

Labels are the voxels whose centre lies inside a structure. Tubes are also labelled along their
rasterised centre line, so a vessel thinner than a voxel stays one connected component, as an
annotator would draw it.

Four data sets share the anatomy but label different subsets (partial labels, as in multi-data-set
training); the renal arteries appear in every image but are labelled only in the few-shot set.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.interpolate import CubicSpline
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from datamodules.files import atomic_write

HU_AIR = -1000.0


@dataclass(frozen=True)
class PhantomPreset:
    """Field of view (x, y, z) in mm and the ranges voxel spacing is drawn from."""

    fov_mm: tuple[float, float, float]
    in_plane_mm: tuple[float, float]
    slice_mm: tuple[float, float]


PRESETS = {
    "small": PhantomPreset((144.0, 120.0, 160.0), (0.6, 1.0), (2.0, 5.0)),
    "full": PhantomPreset((384.0, 320.0, 384.0), (0.8, 1.0), (1.0, 5.0)),
}


@dataclass(frozen=True)
class PhantomDataset:
    """One nnU-Net data set: its id, name and the structures it labels (in painting order)."""

    dataset_id: int
    name: str
    structures: tuple[str, ...]

    @property
    def folder(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"


DATASETS = (
    PhantomDataset(1, "PhantomAbdomen", ("liver", "spleen", "left kidney", "right kidney", "stomach", "bladder")),
    PhantomDataset(2, "PhantomThorax", ("lung", "heart", "vertebrae", "aorta", "pulmonary artery", "airway")),
    PhantomDataset(3, "PhantomLesions", ("liver", "liver tumor", "lung", "lung tumor", "superior mesenteric artery")),
)
FEW_SHOT_DATASET = PhantomDataset(4, "PhantomRenalArtery", ("renal artery",))
# fat capsule widths, times the case's scale (about 4 and 3 mm in the small preset)
FAT_CAPSULE_MM = {"left kidney": 5.0, "right kidney": 5.0, "bladder": 4.0}
HEART_CHAMBER_FRACTION = 0.7  # the chambers' radii over the heart's: a wall of 30 % of each radius
AIRWAY_ATTEMPTS = 50  # bronchial trees drawn at most to find one clear of the aorta and pulmonary arteries
TUBULAR = ("aorta", "pulmonary artery", "airway", "superior mesenteric artery", "renal artery")

# Hounsfield units each structure is painted with, as (low, high) to draw from per case.
# The vessels are contrast-filled (aorta 250-350 HU), so the phantom is a contrast-enhanced scan in
# the arterial to corticomedullary phase. The kidneys, which receive about a quarter of the cardiac
# output, enhance with it: renal cortical enhancement of 195-217 HU over the unenhanced 30-50 HU was
# measured while the renal artery enhanced by 240-288 HU (Eur J Radiol 2007;63(3):420-6); the
# phantom's homogeneous kidney (cortex and medulla together) takes 150-220 HU. Urine is near water
# (0 HU by the definition of the scale). Perirenal fat (inside Gerota's fascia) and perivesical fat
# surround the kidneys and the bladder (``FAT_CAPSULE_MM``), as in every abdominal CT. The heart's
# chambers hold the blood the aorta receives, painted with the aorta's value of the case; its wall is
# enhanced myocardium: normal left-ventricular myocardium measured 79-104 HU (regional means) in
# contrast-enhanced 320-row CT (Normal perfusion of the left ventricular myocardium using 320-MDCT).
# The liver takes about three quarters of its blood from the portal vein and enhances little in this
# phase: its arterial enhancement was 28.5 % of its portal-venous enhancement in controls (arterial
# enhancement fraction, AJR 2011, PMID 21940575), and portal-venous hepatic enhancement of at least
# 50 HU is the usual target (Heiken et al., Radiology 1995), so the phantom liver takes its unenhanced
# 55-65 HU plus about 15: 70-80 HU. The spleen enhances early, heterogeneously (arciform) in the arterial
# phase: enhancing splenic areas measured 72-90 HU (means, arterial-phase CT of cirrhotic patients,
# "Patterns of splenic arterial enhancement on computed tomography are related to changes in portal
# venous pressure"); the phantom spleen is homogeneous at 70-90 HU (unenhanced it is 40-60 HU, 5-10
# below the liver: Rabushka et al., RadioGraphics 1994). Hypovascular liver tumours stay near their
# unenhanced values.
HU_RANGES: dict[str, tuple[float, float]] = {
    "fat": (-120.0, -80.0),
    "soft tissue": (30.0, 50.0),
    "lung": (-870.0, -830.0),
    "heart": (80.0, 105.0),  # myocardium; the chambers take the aorta's value
    "liver": (70.0, 80.0),
    "liver tumor": (20.0, 30.0),
    "spleen": (70.0, 90.0),
    "left kidney": (150.0, 220.0),
    "right kidney": (150.0, 220.0),
    "stomach": (20.0, 30.0),
    "bladder": (0.0, 15.0),
    "lung tumor": (30.0, 45.0),
    "vertebrae": (500.0, 900.0),
    "aorta": (250.0, 350.0),
    "superior mesenteric artery": (250.0, 350.0),
    "renal artery": (250.0, 350.0),
    "pulmonary artery": (180.0, 250.0),
    "airway wall": (30.0, 50.0),
    "airway": (HU_AIR, HU_AIR),
}


# ----------------------------------------------------------------------------- geometry
@dataclass
class Grid:
    """A voxel grid and the map from voxel indices to patient coordinates (mm)."""

    shape: tuple[int, int, int]
    to_patient: np.ndarray  # 4x4: voxel index -> patient mm (affine, then the case's rotation)
    spacing: np.ndarray

    def coordinates(self, box: tuple[slice, ...]) -> np.ndarray:
        """Patient coordinates (3, ...) of the voxels in ``box``."""
        index = np.stack(np.meshgrid(*(np.arange(s.start, s.stop) for s in box), indexing="ij"))
        flat = index.reshape(3, -1).astype(np.float32)
        points = self.to_patient[:3, :3].astype(np.float32) @ flat + self.to_patient[:3, 3:4].astype(np.float32)
        return points.reshape(3, *index.shape[1:])

    def box(self, low: np.ndarray, high: np.ndarray) -> tuple[slice, ...] | None:
        """Voxel slices covering the patient-space box [low, high], or None outside the grid."""
        corners = np.array(np.meshgrid(*zip(low, high), indexing="ij")).reshape(3, -1)
        index = np.linalg.inv(self.to_patient) @ np.vstack([corners, np.ones((1, 8))])
        start = np.maximum(np.floor(index[:3].min(axis=1)) - 1, 0).astype(int)
        stop = np.minimum(np.ceil(index[:3].max(axis=1)) + 2, self.shape).astype(int)
        if np.any(stop <= start):
            return None
        return tuple(slice(a, b) for a, b in zip(start, stop))


@dataclass
class Ellipsoid:
    centre: np.ndarray
    radii: np.ndarray

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.centre - self.radii, self.centre + self.radii

    def sdf(self, p: np.ndarray) -> np.ndarray:
        q = (p - self.centre[:, None, None, None]) / self.radii[:, None, None, None]
        return (np.sqrt((q**2).sum(axis=0)) - 1.0) * self.radii.min()


@dataclass
class Tube:
    """A chain of segments with a radius per point (a vessel or an airway branch)."""

    points: np.ndarray  # (K, 3)
    radii: np.ndarray  # (K,)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.radii.max()
        return self.points.min(axis=0) - r, self.points.max(axis=0) + r

    def sdf(self, p: np.ndarray) -> np.ndarray:
        best = np.full(p.shape[1:], np.inf, dtype=np.float32)
        for a, b, ra, rb in zip(self.points[:-1], self.points[1:], self.radii[:-1], self.radii[1:]):
            ab = (b - a).astype(np.float32)
            ap = p - a[:, None, None, None].astype(np.float32)
            t = np.clip(np.tensordot(ab, ap, axes=1) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
            closest = ap - t[None] * ab[:, None, None, None]
            distance = np.sqrt((closest**2).sum(axis=0)) - (ra + t * (rb - ra))
            np.minimum(best, distance, out=best)
        return best

    def centre_line(self, step_mm: float) -> np.ndarray:
        samples = []
        for a, b in zip(self.points[:-1], self.points[1:]):
            n = max(int(np.ceil(np.linalg.norm(b - a) / step_mm)), 1)
            samples.append(a + (b - a) * np.linspace(0.0, 1.0, n + 1)[:, None])
        return np.concatenate(samples)


Shape = Ellipsoid | Tube


@dataclass
class Structure:
    """A named set of shapes painted with one HU value (plus an optional wall)."""

    name: str
    shapes: list[Shape]
    hu: float
    wall_mm: float = 0.0
    wall_hu: float = 0.0
    tubular: bool = False


# ----------------------------------------------------------------------------- anatomy
@dataclass
class Anatomy:
    """A random torso: structures in painting order, in patient mm."""

    structures: list[Structure] = field(default_factory=list)

    def add(self, structure: Structure) -> None:
        self.structures.append(structure)


def _smooth_curve(control: np.ndarray, samples: int = 24) -> np.ndarray:
    t = np.linspace(0.0, 1.0, len(control))
    return CubicSpline(t, control, axis=0)(np.linspace(0.0, 1.0, samples))


def _branch_tree(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    length: float,
    radius: float,
    generations: int,
) -> list[Tube]:
    """A binary tree of slightly curved tubes, radius and length shrinking by generation."""
    direction = direction / np.linalg.norm(direction)
    bend = rng.normal(0.0, 0.12, 3)
    middle = start + direction * length / 2 + bend * length / 2
    end = start + direction * length
    curve = _smooth_curve(np.stack([start, middle, end]), samples=8)
    tubes = [Tube(curve, np.linspace(radius, radius * 0.85, len(curve)))]
    if generations > 1:
        normal = np.cross(direction, rng.normal(size=3))
        normal /= np.linalg.norm(normal)
        for sign in (-1.0, 1.0):
            angle = np.deg2rad(rng.uniform(25.0, 40.0)) * sign
            child = Rotation.from_rotvec(normal * angle).apply(direction)
            tubes += _branch_tree(rng, end, child, length * 0.75, radius * 0.75, generations - 1)
    return tubes


def random_anatomy(rng: np.random.Generator, preset: PhantomPreset) -> Anatomy:
    """Draw one torso. Axes: x to the patient's left, y posterior, z superior (LPS-like patient frame)."""
    half = np.array(preset.fov_mm) / 2 * rng.uniform(0.9, 1.0, 3) * np.array([0.92, 0.85, 1.0])
    scale = half.min() / 60.0  # 0.77-0.85 for the small preset (its shortest half-axis, y, is 46-51 mm)

    def hu(name: str) -> float:
        return float(rng.uniform(*HU_RANGES[name]))

    def at(x: float, y: float, z: float) -> np.ndarray:
        return (np.array([x, y, z]) + rng.normal(0.0, 0.03, 3)) * half

    def radii(x: float, y: float, z: float) -> np.ndarray:
        return np.array([x, y, z]) * half * rng.uniform(0.85, 1.15, 3)

    anatomy = Anatomy()
    body = Ellipsoid(np.zeros(3), np.array([half[0], half[1], half[2] * 3]))
    fat_hu = hu("fat")
    anatomy.add(Structure("fat", [body], fat_hu))

    def organ(name: str, shape: Ellipsoid) -> Structure:
        """An organ painted with its HU, inside a fat capsule where real anatomy has one."""
        return Structure(name, [shape], hu(name), wall_mm=FAT_CAPSULE_MM.get(name, 0.0) * scale, wall_hu=fat_hu)

    inner = Ellipsoid(np.zeros(3), body.radii - np.array([6.0, 6.0, 0.0]) * scale)
    anatomy.add(Structure("soft tissue", [inner], hu("soft tissue")))
    lungs = [Ellipsoid(at(s * 0.45, 0.05, 0.55), radii(0.36, 0.6, 0.42)) for s in (-1, 1)]
    anatomy.add(Structure("lung", lungs, hu("lung")))
    heart = Ellipsoid(at(0.12, -0.3, 0.25), radii(0.28, 0.3, 0.22))
    anatomy.add(Structure("heart", [heart], hu("heart")))
    # unlabelled, inside the heart's mask; painted with the aorta's value once the aorta is drawn
    chambers = Structure("heart chambers", [Ellipsoid(heart.centre, heart.radii * HEART_CHAMBER_FRACTION)], np.nan)
    anatomy.add(chambers)
    liver = Ellipsoid(at(-0.45, -0.05, -0.12), radii(0.42, 0.55, 0.26))
    anatomy.add(Structure("liver", [liver], hu("liver")))
    anatomy.add(Structure("spleen", [Ellipsoid(at(0.58, 0.25, -0.05), radii(0.16, 0.22, 0.16))], hu("spleen")))
    anatomy.add(Structure("stomach", [Ellipsoid(at(0.3, -0.35, -0.12), radii(0.22, 0.2, 0.16))], hu("stomach")))
    kidneys = {
        "right kidney": Ellipsoid(at(-0.42, 0.45, -0.42), radii(0.13, 0.14, 0.2)),
        "left kidney": Ellipsoid(at(0.42, 0.45, -0.38), radii(0.13, 0.14, 0.2)),
    }
    for name, kidney in kidneys.items():
        anatomy.add(organ(name, kidney))
    anatomy.add(organ("bladder", Ellipsoid(at(0.0, -0.3, -0.86), radii(0.22, 0.2, 0.1))))
    spine_x, spine_y = rng.normal(0.0, 0.02) * half[0], 0.72 * half[1]
    vertebrae = [
        Ellipsoid(np.array([spine_x, spine_y, z]), np.array([0.13 * half[0], 0.13 * half[1], 0.05 * half[2]]))
        for z in np.arange(-0.95, 0.96, 0.125) * half[2]
    ]
    anatomy.add(Structure("vertebrae", vertebrae, hu("vertebrae")))
    _add_lesions(rng, anatomy, liver, lungs, hu)
    chambers.hu = _add_vessels(rng, anatomy, half, heart, kidneys, hu)
    vessels = [tube for s in anatomy.structures if s.name in ("aorta", "pulmonary artery") for tube in s.shapes]
    _add_airway(rng, anatomy, half, scale, hu, vessels)
    return anatomy


def _inside_point(rng: np.random.Generator, organ: Ellipsoid, depth: float) -> np.ndarray:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    return organ.centre + direction * organ.radii * rng.uniform(0.0, depth)


def _add_lesions(rng, anatomy: Anatomy, liver: Ellipsoid, lungs: list[Ellipsoid], hu) -> None:
    if rng.random() < 0.7:
        tumors = []
        for _ in range(rng.integers(1, 3)):
            radius = liver.radii.min() * rng.uniform(0.2, 0.35)
            tumors.append(Ellipsoid(_inside_point(rng, liver, 0.45), np.full(3, radius) * rng.uniform(0.85, 1.15, 3)))
        anatomy.add(Structure("liver tumor", tumors, hu("liver tumor")))
    if rng.random() < 0.7:
        lung = lungs[rng.integers(0, 2)]
        radius = lung.radii.min() * rng.uniform(0.15, 0.3)
        anatomy.add(
            Structure("lung tumor", [Ellipsoid(_inside_point(rng, lung, 0.45), np.full(3, radius))], hu("lung tumor"))
        )


def _add_vessels(rng, anatomy: Anatomy, half, heart: Ellipsoid, kidneys: dict[str, Ellipsoid], hu) -> float:
    """Aorta with its branches and the pulmonary arteries; returns the aorta's HU (arterial blood)."""
    jitter = lambda: rng.normal(0.0, 0.02, 3) * half  # noqa: E731
    x0 = heart.centre[0] * 0.3
    # ascending anterior, the arch to the left of the trachea and over the left main bronchus, then down
    # beside the spine (left of it, as the trachea and bronchi must stay clear of the aorta's wall)
    control = np.array(
        [
            heart.centre + np.array([0.0, 0.0, 0.1 * half[2]]),
            [x0, -0.25 * half[1], 0.6 * half[2]],
            [0.2 * half[0], -0.2 * half[1], 0.82 * half[2]],
            [0.3 * half[0], 0.05 * half[1], 0.88 * half[2]],
            [0.27 * half[0], 0.35 * half[1], 0.7 * half[2]],
            [0.2 * half[0], 0.45 * half[1], 0.4 * half[2]],
            [0.08 * half[0], 0.45 * half[1], -0.1 * half[2]],
            [0.02 * half[0], 0.42 * half[1], -0.7 * half[2]],
        ]
    )
    control[1:] += np.stack([jitter() for _ in range(len(control) - 1)])
    aorta_line = _smooth_curve(control, 32)
    aorta_radius = 0.09 * half[0] * rng.uniform(0.9, 1.1)
    arterial_blood = hu("aorta")
    anatomy.add(
        Structure("aorta", [Tube(aorta_line, np.full(len(aorta_line), aorta_radius))], arterial_blood, tubular=True)
    )

    def branch_from_aorta(z_fraction: float, target: np.ndarray) -> Tube:
        origin = aorta_line[np.argmin(np.abs(aorta_line[:, 2] - z_fraction * half[2]))]
        middle = (origin + target) / 2 + jitter() * 0.5
        line = _smooth_curve(np.stack([origin, middle, target]), 12)
        return Tube(line, np.full(len(line), rng.uniform(1.1, 1.5)))

    sma_target = np.array([0.05 * half[0], -0.35 * half[1], -0.55 * half[2]]) + jitter()
    anatomy.add(
        Structure(
            "superior mesenteric artery",
            [branch_from_aorta(-0.2, sma_target)],
            hu("superior mesenteric artery"),
            tubular=True,
        )
    )
    renal = [
        branch_from_aorta(k.centre[2] / half[2], k.centre - np.sign(k.centre[0]) * np.array([k.radii[0] * 0.5, 0, 0]))
        for k in kidneys.values()
    ]
    anatomy.add(Structure("renal artery", renal, hu("renal artery"), tubular=True))

    trunk_start = heart.centre + np.array([-0.05 * half[0], -0.05 * half[1], 0.15 * half[2]])
    trunk_end = trunk_start + np.array([0.0, 0.15 * half[1], 0.12 * half[2]]) + jitter()
    trunk_radius = 0.07 * half[0]
    pulmonary = [Tube(np.stack([trunk_start, trunk_end]), np.full(2, trunk_radius))]
    for side in (-1.0, 1.0):
        direction = np.array([side, -0.1, 0.1]) + rng.normal(0.0, 0.1, 3)
        pulmonary += _branch_tree(rng, trunk_end, direction, 0.28 * half[0], trunk_radius * 0.75, generations=3)
    anatomy.add(Structure("pulmonary artery", pulmonary, hu("pulmonary artery"), tubular=True))
    return arterial_blood


def _add_airway(rng, anatomy: Anatomy, half, scale, hu, vessels: list[Tube]) -> None:
    """Trachea and bronchial tree with air inside a soft-tissue wall.

    Bronchi run beside the pulmonary arteries, never through them: a tree whose wall would touch
    ``vessels`` is redrawn, from generators spawned off ``rng`` so that the case's later draws stay
    as they are (up to ``AIRWAY_ATTEMPTS`` trees; then the one farthest from the vessels).
    """
    wall = 1.5 * scale
    best, best_gap = None, -np.inf
    for generator in [rng, *rng.spawn(AIRWAY_ATTEMPTS - 1)]:
        tubes = _airway_tree(generator, half, scale)
        gap = surface_gap(tubes, vessels) - wall
        if gap > best_gap:
            best, best_gap = tubes, gap
        if gap > 0:
            break
    anatomy.add(Structure("airway", best, HU_AIR, wall_mm=wall, wall_hu=hu("airway wall"), tubular=True))


def _airway_tree(rng: np.random.Generator, half, scale) -> list[Tube]:
    top = np.array([0.0, -0.05 * half[1], 1.2 * half[2]])
    carina = np.array([0.0, 0.05 * half[1], 0.68 * half[2]]) + rng.normal(0.0, 0.02, 3) * half
    radius = 6.0 * scale * rng.uniform(0.9, 1.1)
    tubes = [Tube(np.stack([top, carina]), np.full(2, radius))]
    for side in (-1.0, 1.0):
        direction = np.array([side, 0.15, -0.8]) + rng.normal(0.0, 0.08, 3)
        tubes += _branch_tree(rng, carina, direction, 0.3 * half[2], radius * 0.8, generations=3)
    return tubes


def surface_gap(tubes: list[Tube], others: list[Tube], step_mm: float = 0.25) -> float:
    """Smallest distance (mm) between the surfaces of two sets of tubes, negative where they overlap
    (exact up to ``step_mm`` where they are closer than their two widest radii; farther apart, a
    positive lower bound)."""
    points, radii = _sampled_axis(tubes, step_mm)
    other_points, other_radii = _sampled_axis(others, step_mm)
    reach = float(radii.max() + other_radii.max())
    other_tree = cKDTree(other_points)
    near = cKDTree(points).sparse_distance_matrix(other_tree, reach, output_type="ndarray")
    if len(near) == 0:
        return float(other_tree.query(points)[0].min()) - reach
    return float((near["v"] - radii[near["i"]] - other_radii[near["j"]]).min())


def _sampled_axis(tubes: list[Tube], step_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Points along every tube's axis, ``step_mm`` apart, and the tube's radius at each."""
    points, radii = [], []
    for tube in tubes:
        for a, b, ra, rb in zip(tube.points[:-1], tube.points[1:], tube.radii[:-1], tube.radii[1:]):
            t = np.linspace(0.0, 1.0, max(int(np.ceil(np.linalg.norm(b - a) / step_mm)), 1) + 1)
            points.append(a + (b - a) * t[:, None])
            radii.append(ra + (rb - ra) * t)
    return np.concatenate(points), np.concatenate(radii)


# ----------------------------------------------------------------------------- rendering
def random_grid(rng: np.random.Generator, preset: PhantomPreset) -> tuple[Grid, np.ndarray]:
    """A grid of random spacing and orientation, and its NIfTI affine (voxel -> RAS mm)."""
    in_plane = rng.uniform(*preset.in_plane_mm)
    spacing = np.array([in_plane, in_plane, rng.uniform(*preset.slice_mm)])
    shape = tuple(int(np.ceil(f / s)) for f, s in zip(preset.fov_mm, spacing))
    flips = np.where(rng.random(3) < np.array([0.5, 0.5, 0.2]), -1.0, 1.0)
    affine = np.diag([*(spacing * flips), 1.0])
    affine[:3, 3] = -flips * spacing * (np.array(shape) - 1) / 2 + rng.normal(0.0, 20.0, 3)
    # Patient frame (x left, y posterior, z superior) is RAS with x and y negated; the anatomy is
    # also rotated slightly and centred on the grid's centre.
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    rotation = Rotation.from_euler("zyx", rng.normal(0.0, [6.0, 3.0, 3.0]), degrees=True).as_matrix()
    ras_to_patient = np.eye(4)
    ras_to_patient[:3, :3] = rotation @ np.diag([-1.0, -1.0, 1.0])
    ras_to_patient[:3, 3] = -ras_to_patient[:3, :3] @ centre
    return Grid(shape, ras_to_patient @ affine, spacing), affine


def render(anatomy: Anatomy, grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The HU image (int16) and one boolean mask per structure.

    A structure's wall (airway wall, fat capsule) is painted over what lies there, and those
    voxels leave the masks of the structures painted before it.
    """
    image = np.full(grid.shape, HU_AIR, dtype=np.float32)
    masks: dict[str, np.ndarray] = {}
    edge = float(grid.spacing.mean())
    for structure in anatomy.structures:
        mask = np.zeros(grid.shape, dtype=bool)
        for shape in structure.shapes:
            covered = _paint_shape(image, mask, grid, shape, structure, edge)
            if covered is not None:
                box, wall = covered
                for earlier in masks.values():
                    earlier[box] &= ~wall
            if isinstance(shape, Tube):
                _mark_centre_line(mask, grid, shape)
        masks[structure.name] = mask
    image = gaussian_filter(image, sigma=0.6 * edge / grid.spacing)
    image += rng.normal(0.0, rng.uniform(10.0, 40.0), grid.shape).astype(np.float32)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16), masks


def _paint_shape(
    image, mask, grid: Grid, shape: Shape, structure: Structure, edge: float
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Paint one shape (and its wall) into ``image`` and ``mask``; return the wall's voxels, if any."""
    low, high = shape.bounds()
    box = grid.box(low - structure.wall_mm - edge, high + structure.wall_mm + edge)
    if box is None:
        return None
    sdf = shape.sdf(grid.coordinates(box))
    region = image[box]
    wall_voxels = None
    if structure.wall_mm > 0:
        wall = np.clip(0.5 - (sdf - structure.wall_mm) / edge, 0.0, 1.0)
        region += wall * (structure.wall_hu - region)
        wall_voxels = (box, (sdf >= 0) & (sdf < structure.wall_mm))
    occupancy = np.clip(0.5 - sdf / edge, 0.0, 1.0)
    region += occupancy * (structure.hu - region)
    mask[box] |= sdf < 0
    return wall_voxels


def _mark_centre_line(mask: np.ndarray, grid: Grid, tube: Tube) -> None:
    points = tube.centre_line(step_mm=0.4 * float(grid.spacing.min()))
    index = np.linalg.inv(grid.to_patient) @ np.vstack([points.T, np.ones((1, len(points)))])
    voxels = np.round(index[:3]).astype(int)
    inside = np.all((voxels >= 0) & (voxels < np.array(grid.shape)[:, None]), axis=0)
    mask[tuple(voxels[:, inside])] = True


def label_map(masks: dict[str, np.ndarray], structures: tuple[str, ...]) -> np.ndarray:
    """Integer labels 1..K in the order given; later structures overwrite earlier (a tumour its organ)."""
    labels = np.zeros(next(iter(masks.values())).shape, dtype=np.uint8)
    for value, name in enumerate(structures, start=1):
        if name in masks:
            labels[masks[name]] = value
    return labels


# ----------------------------------------------------------------------------- data sets
def case_rng(seed: int, dataset_id: int, case: int) -> np.random.Generator:
    return np.random.default_rng([seed, dataset_id, case])


def make_case(seed: int, dataset_id: int, case: int, preset: PhantomPreset):
    """Image (int16 HU), masks per structure and NIfTI affine of one case, deterministic in its seed."""
    rng = case_rng(seed, dataset_id, case)
    anatomy = random_anatomy(rng, preset)
    grid, affine = random_grid(rng, preset)
    image, masks = render(anatomy, grid, rng)
    return image, masks, affine


def dataset_json(dataset: PhantomDataset, num_cases: int) -> dict:
    labels = {"background": 0} | {name: i for i, name in enumerate(dataset.structures, start=1)}
    return {
        "name": dataset.folder,
        "description": "CT phantom (prompt-seg built-in data)",
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
    }


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    atomic_write(path, lambda temporary: nib.save(image, temporary))


def write_dataset(
    root: Path,
    dataset: PhantomDataset,
    num_cases: int,
    preset: PhantomPreset,
    seed: int,
    force: bool = False,
    progress: bool = True,
    on_case: Callable[[Path, np.ndarray, np.ndarray], None] | None = None,
) -> Path:
    """Write one data set in the nnU-Net v2 raw layout; cases already written are kept unless ``force``."""
    folder = root / dataset.folder
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(dataset_json(dataset, num_cases), indent=2))
    for case in tqdm(range(num_cases), desc=dataset.folder, disable=not progress):
        name = f"case_{case:03d}"
        image_path = folder / "imagesTr" / f"{name}_0000.nii.gz"
        label_path = folder / "labelsTr" / f"{name}.nii.gz"
        if image_path.exists() and label_path.exists() and not force:
            continue
        image, masks, affine = make_case(seed, dataset.dataset_id, case, preset)
        labels = label_map(masks, dataset.structures)
        write_nifti(image_path, image, affine)
        write_nifti(label_path, labels, affine)
        if on_case is not None:
            on_case(folder / name, image, labels)
    return folder
