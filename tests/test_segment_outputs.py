"""``segment.py --save-probabilities`` and ``--statistics``, the progress and summary lines, and the Python API
(``inference/api.py``) with the README's example run as written."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

import segment
from datamodules.preprocessing import Preprocessing
from datamodules.volumes import BadCaseError
from inference.api import Segmenter, binarize
from inference.statistics import COLUMNS, mask_statistics
from tests.conftest import PROMPTS
from tests.test_segment_robustness import ct_volume, files_under, one_error, segment_args, write_nifti

VOXEL_ML = 4.0**3 / 1000  # write_nifti's 4 mm voxels


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


# --- probabilities ---------------------------------------------------------------------------------


def test_binarize_thresholds_the_float16_values_it_returns():
    """float16 steps are 2**-11 above 0.5: 0.50012 rounds to 0.5 (background), 0.50025 to 0.50049."""
    probabilities = torch.tensor([0.5, 0.50012, 0.50025, 0.49995, 0.6, 0.4, 0.0, 1.0])
    rounded, masks = binarize(probabilities)
    assert rounded.dtype == np.float16 and masks.tolist() == [False, False, True, False, True, False, False, True]
    assert np.array_equal(masks, rounded.astype(np.float32) > 0.5)


def test_probabilities_thresholded_at_one_half_are_the_masks(checkpoint, tmp_path, threshold_network):
    image = write_nifti(tmp_path / "ct.nii.gz", ct_volume())
    out = tmp_path / "out"
    assert segment.main(segment_args(checkpoint, image, out, "--save-probabilities")) == 0
    assert files_under(out / "ct") == ["aorta.nii.gz", "aorta.prob.nii.gz", "liver.nii.gz", "liver.prob.nii.gz"]
    for prompt in PROMPTS:
        mask, probability = nib.load(out / "ct" / f"{prompt}.nii.gz"), nib.load(out / "ct" / f"{prompt}.prob.nii.gz")
        values = np.asarray(probability.dataobj)
        assert probability.shape == mask.shape == nib.load(image).shape
        assert np.array_equal(probability.affine, nib.load(image).affine)
        assert np.array_equal(values.astype(np.float16).astype(values.dtype), values)  # float16 values
        assert 0 <= values.min() and values.max() <= 1 and 0 < (values > 0.5).sum() < values.size
        assert np.array_equal(values > 0.5, np.asarray(mask.dataobj).astype(bool))


# --- shifted grids --------------------------------------------------------------------------------


def rod_image(start: int) -> tuple[tio.ScalarImage, np.ndarray]:
    """A 1 mm image of soft tissue with a 5 x 5 mm bone rod (700 HU) along z, ``start`` mm into a 4 mm voxel."""
    hu = np.full((48, 48, 24), 40.0, np.float32)
    hu[:2], hu[:, :2] = -1000.0, -1000.0  # some air, as in CT
    hu[20 + start : 25 + start, 20:25, :] = 700.0
    return tio.ScalarImage(tensor=torch.from_numpy(hu)[None], affine=np.eye(4)), hu > 300.0


@pytest.mark.parametrize("start", range(4))
def test_shifted_grids_place_edges_between_the_coarse_voxel_centres(checkpoint, threshold_network, start):
    # "liver" marks > 300 HU; the checkpoint predicts on a 4 mm grid. A 5 mm rod covers one or two 4 mm
    # voxel centres per axis depending on where it lies, so one grid's mask is too thin or too wide; the mean
    # of eight grids a half voxel apart follows the rod's edges more closely wherever it lies.
    image, rod = rod_image(start)

    def dice(grid_shifts: int) -> float:
        segmenter = Segmenter(checkpoint, "cpu", overlap=0.25, grid_shifts=grid_shifts)
        mask = segmenter.predict_arrays(image, ["liver"])[0][0]
        return 2 * (mask & rod).sum() / (mask.sum() + rod.sum())

    one, eight = dice(1), dice(8)
    assert eight > one + 0.05 and eight > 0.85, (one, eight)


def test_restoring_each_prompt_alone_equals_restoring_them_together():
    # predict_arrays resamples one prompt's map at a time to bound its memory: the result must not change
    original = tio.ScalarImage(tensor=torch.zeros(1, 21, 17, 13), affine=np.diag([1.0, 1.5, 2.0, 1.0]))
    coarse, affine = torch.rand(3, 8, 7, 6, generator=torch.Generator().manual_seed(0)), np.eye(4)
    affine[:3, :3], affine[:3, 3] = np.diag([3.0, 3.0, 4.0]), [0.4, -0.6, 0.3]
    together = Preprocessing.restore(coarse, affine, original)
    alone = torch.cat([Preprocessing.restore(channel[None], affine, original) for channel in coarse])
    assert together.shape == (3, 21, 17, 13) and together.std() > 0.1
    assert torch.equal(together, alone)


def test_grid_shifts_must_be_one_two_four_or_eight(checkpoint, tmp_path, capfd):
    image = write_nifti(tmp_path / "ct.nii.gz", ct_volume())
    assert segment.main(segment_args(checkpoint, image, tmp_path / "out", "--grid-shifts", "3")) == 2
    assert "--grid-shifts must be 1, 2, 4 or 8, got 3" in one_error(capfd.readouterr())
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--grid-shifts"):
        Segmenter(checkpoint, "cpu", grid_shifts=0)


# --- statistics ----------------------------------------------------------------------------------


def test_statistics_of_a_hand_computed_mask():
    """2 x 1.5 x 3 mm voxels (9 mm³), x mirrored; a 3 x 4 x 2 box of 24 voxels = 216 mm³ = 0.216 ml,
    half at 10 HU and half at 30 HU: mean 20, standard deviation 10."""
    affine = np.array([[-2.0, 0, 0, 100], [0, 1.5, 0, -50], [0, 0, 3, 20], [0, 0, 0, 1]])
    hu = np.full((8, 7, 6), -1000.0)
    mask = np.zeros(hu.shape, bool)
    mask[2:5, 1:5, 3:5] = True
    hu[2:5, 1:5, 3] = 10
    hu[2:5, 1:5, 4] = 30
    row = mask_statistics("box", mask, hu, affine)
    assert (row["prompt"], row["voxels"]) == ("box", 24)
    assert row["volume_ml"] == pytest.approx(0.216) and row["hu_mean"] == 20 and row["hu_std"] == 10
    # x = 100 - 2 i for i in 2..4; y = -50 + 1.5 j for j in 1..4; z = 20 + 3 k for k in 3..4
    assert [row[c] for c in COLUMNS[5:]] == [92, -48.5, 29, 96, -44, 32]
    empty = mask_statistics("nothing", np.zeros(hu.shape, bool), hu, affine)
    assert empty["voxels"] == 0 and empty["volume_ml"] == 0 and empty["hu_mean"] == "" and empty["bbox_min_x_mm"] == ""


def test_statistics_csv_per_case_and_for_the_folder(checkpoint, tmp_path, capfd, threshold_network):
    """ "liver" marks the bone block (700 HU), "aorta" everything above -400 HU: the body less the lung."""
    cases = tmp_path / "cases"
    write_nifti(cases / "a.nii.gz", ct_volume())
    write_nifti(cases / "b_0000.nii.gz", ct_volume((24, 20, 12)))
    out = tmp_path / "out"
    assert segment.main(segment_args(checkpoint, cases, out, "--statistics")) == 0
    captured = capfd.readouterr()
    assert re.fullmatch(
        r"done: 2 case\(s\), 2 prompt\(s\), [\d.]+ s, 0 warning\(s\); output in \S+", captured.out.strip()
    )
    assert "\r" not in captured.err and "it/s" not in captured.err  # no progress bar off a terminal
    for case, slices in (("a", 16), ("b", 12)):
        rows = {r["prompt"]: r for r in read_csv(out / case / "statistics.csv")}
        bone, body, lung = 3 * 4 * slices, 16 * 14 * slices, 5 * 8 * (slices - 4)  # see ct_volume
        liver, aorta = rows["liver"], rows["aorta"]
        assert int(liver["voxels"]) == bone and float(liver["volume_ml"]) == pytest.approx(bone * VOXEL_ML)
        assert float(liver["hu_mean"]) == 700 and float(liver["hu_std"]) == 0
        # bone: x indices 14..16, y 8..11, z all slices, 4 mm voxels from the origin
        box = [float(liver[c]) for c in COLUMNS[5:]]
        assert box == [56, 32, 0, 64, 44, 4 * (slices - 1)]
        assert int(aorta["voxels"]) == body - lung
        assert float(aorta["volume_ml"]) == pytest.approx((body - lung) * VOXEL_ML)
        assert float(aorta["hu_mean"]) == pytest.approx(
            (bone * 700 + (body - lung - bone) * 40) / (body - lung), abs=1e-3
        )
        assert int(liver["voxels"]) == int(np.asarray(nib.load(out / case / "liver.nii.gz").dataobj).sum())
    gathered = read_csv(out / "statistics.csv")
    assert [(r["case"], r["prompt"]) for r in gathered] == [
        ("a", "liver"),
        ("a", "aorta"),
        ("b", "liver"),
        ("b", "aorta"),
    ]
    assert [{k: v for k, v in r.items() if k != "case"} for r in gathered[:2]] == read_csv(out / "a" / "statistics.csv")
    assert segment.main(segment_args(checkpoint, cases, out, "--statistics")) == 2  # outputs exist
    assert "exists" in one_error(capfd.readouterr())
    assert segment.main(segment_args(checkpoint, cases, out, "--statistics", "--skip-existing")) == 0
    assert read_csv(out / "statistics.csv") == gathered


def test_a_single_image_gets_no_folder_statistics(checkpoint, tmp_path):
    image = write_nifti(tmp_path / "ct.nii.gz", ct_volume())
    assert segment.main(segment_args(checkpoint, image, tmp_path / "out", "--statistics", prompts=("liver",))) == 0
    assert files_under(tmp_path / "out") == ["ct", "ct/liver.nii.gz", "ct/statistics.csv"]


# --- Python API ------------------------------------------------------------------------------------


def readme_example() -> str:
    """The first ```python block after the README's "### Python API" heading."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("### Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / "outputs" / "quickstart" / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, tmp_path / "outputs" / "quickstart" / "checkpoints" / "trimmed.pt")
    write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    assert nib.load(tmp_path / "liver.nii.gz").shape == ct_volume().shape
    assert len(capsys.readouterr().out.split()) == 2


def test_api_and_command_line_give_the_same_masks(checkpoint, tmp_path):
    image = write_nifti(tmp_path / "ct.nii.gz", ct_volume())
    assert segment.main(segment_args(checkpoint, image, tmp_path / "out", "--save-probabilities")) == 0
    prediction = Segmenter(checkpoint, "cpu").predict(nib.load(image), list(PROMPTS))
    for prompt in PROMPTS:
        for result, suffix in ((prediction.masks, ".nii.gz"), (prediction.probabilities, ".prob.nii.gz")):
            written = nib.load(tmp_path / "out" / "ct" / f"{prompt}{suffix}")
            assert np.array_equal(np.asarray(result[prompt].dataobj), np.asarray(written.dataobj))
            assert np.array_equal(result[prompt].affine, written.affine)


def test_api_checks_its_input(checkpoint):
    segmenter = Segmenter(checkpoint, "cpu")
    volume = ct_volume().astype(np.float32)
    volume[0, 0, 0] = np.nan
    with pytest.raises(BadCaseError, match="NaN"):
        segmenter.segment(nib.Nifti1Image(volume, np.eye(4)), ["liver"])
    with pytest.raises(BadCaseError, match="3D"):
        segmenter.segment(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), ["liver"])
    with pytest.raises(ValueError, match="'spleen'"):  # the table's UnknownPromptError
        segmenter.segment(nib.Nifti1Image(ct_volume(), np.eye(4)), ["spleen"])
    with pytest.raises(ValueError, match="more than once"):
        segmenter.segment(nib.Nifti1Image(ct_volume(), np.eye(4)), ["liver", "liver"])
    with pytest.raises(ValueError, match="--overlap"):
        Segmenter(checkpoint, "cpu", overlap=1.0)
