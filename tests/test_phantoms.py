from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from skimage.morphology import skeletonize

from datamodules.phantoms import (
    DATASETS,
    FEW_SHOT_DATASET,
    HU_RANGES,
    PRESETS,
    TUBULAR,
    make_case,
    random_anatomy,
    write_dataset,
)


@pytest.fixture(scope="module")
def case():
    return make_case(seed=3, dataset_id=2, case=1, preset=PRESETS["small"])


def test_same_seed_writes_identical_files(tmp_path):
    digests = []
    for name in ("a", "b"):
        folder = write_dataset(tmp_path / name, FEW_SHOT_DATASET, 1, PRESETS["small"], seed=7, progress=False)
        digests.append(
            [
                hashlib.sha1(np.asanyarray(nib.load(f).dataobj).tobytes()).hexdigest()
                for f in sorted(folder.rglob("*.nii.gz"))
            ]
        )
    assert digests[0] == digests[1] and len(digests[0]) == 2


def test_structures_lie_in_their_hounsfield_ranges(case):
    image, masks, _ = case
    for name in ("liver", "spleen", "lung", "vertebrae", "aorta", "bladder"):
        interior = ndimage.binary_erosion(masks[name], iterations=2)
        if interior.sum() < 20:
            continue
        low, high = HU_RANGES[name]
        median = np.median(image[interior])
        assert low - 30 <= median <= high + 30, f"{name}: median {median} outside {low}..{high}"
    assert image.dtype == np.int16 and image.min() >= -1024


def test_heart_chambers_hold_the_aortas_blood_inside_an_enhanced_wall():
    """The heart's chambers carry the aorta's value of the case (one blood) inside a myocardial wall."""
    for case_index in range(3):
        rng = np.random.default_rng([0, 2, case_index])
        structures = {s.name: s for s in random_anatomy(rng, PRESETS["small"]).structures}
        heart, chambers = structures["heart"], structures["heart chambers"]
        assert chambers.hu == structures["aorta"].hu
        assert HU_RANGES["heart"][0] <= heart.hu <= HU_RANGES["heart"][1]
        assert np.allclose(chambers.shapes[0].centre, heart.shapes[0].centre)
        assert np.all(chambers.shapes[0].radii < heart.shapes[0].radii)
        image, masks, _ = make_case(0, 2, case_index, PRESETS["small"])
        aorta = np.median(image[ndimage.binary_erosion(masks["aorta"], iterations=1)])
        heart_only = masks["heart"] & ~masks["aorta"] & ~masks["pulmonary artery"]
        depth = ndimage.distance_transform_edt(heart_only)
        deep = np.median(image[heart_only & (depth > 0.6 * depth.max())])
        assert abs(deep - aorta) < 40, f"case {case_index}: heart centre {deep} HU, aorta {aorta} HU"


def test_tubular_structures_are_one_component_and_long(case):
    """One connected tree each; the renal arteries are two (left and right leave the aorta apart)."""
    _, masks, _ = case
    for name in TUBULAR:
        labels, count = ndimage.label(masks[name], structure=np.ones((3, 3, 3)))
        assert count == (2 if name == "renal artery" else 1), f"{name} has {count} components"
        skeleton_length = skeletonize(masks[name]).sum()
        diameter = 2 * ndimage.distance_transform_edt(masks[name]).max()
        assert skeleton_length > 4 * diameter, f"{name}: skeleton {skeleton_length} vs diameter {diameter}"


def test_lesions_lie_inside_their_organ():
    for case_index in range(6):
        _, masks, _ = make_case(0, 3, case_index, PRESETS["small"])
        for lesion, organ in (("liver tumor", "liver"), ("lung tumor", "lung")):
            if lesion in masks and masks[lesion].any():
                inside = np.logical_and(masks[lesion], masks[organ]).sum() / masks[lesion].sum()
                assert inside > 0.95


def test_labels_match_dataset_json_and_renal_artery_only_in_few_shot_set(phantom_root):
    for dataset in (*DATASETS, FEW_SHOT_DATASET):
        meta = json.loads((phantom_root / dataset.folder / "dataset.json").read_text())
        assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
        assert meta["numTraining"] == len(list((phantom_root / dataset.folder / "imagesTr").glob("*.nii.gz")))
        label = nib.load(sorted((phantom_root / dataset.folder / "labelsTr").glob("*.nii.gz"))[0])
        assert set(np.unique(np.asanyarray(label.dataobj))) <= set(meta["labels"].values())
        if dataset is not FEW_SHOT_DATASET:
            assert "renal artery" not in meta["labels"]
    assert "renal artery" in json.loads((phantom_root / FEW_SHOT_DATASET.folder / "dataset.json").read_text())["labels"]


def test_nibabel_and_simpleitk_agree_on_geometry(phantom_root):
    path = sorted((phantom_root / DATASETS[0].folder / "imagesTr").glob("*.nii.gz"))[0]
    nifti = nib.load(path)
    itk = sitk.ReadImage(str(path))
    assert tuple(reversed(itk.GetSize())) == nifti.shape[::-1]
    assert np.allclose(itk.GetSpacing(), nifti.header.get_zooms(), atol=1e-4)
    # ITK uses LPS: its origin is the NIfTI origin with x and y negated.
    assert np.allclose(itk.GetOrigin(), nifti.affine[:3, 3] * np.array([-1, -1, 1]), atol=1e-3)


def test_geometry_varies_between_cases():
    affines = [make_case(0, 1, i, PRESETS["small"])[2] for i in range(4)]
    spacings = {tuple(np.round(np.abs(np.diag(a)[:3]), 3)) for a in affines}
    assert len(spacings) == 4
    assert any(np.any(np.diag(a)[:3] < 0) for a in affines), "some affines should not be RAS"
