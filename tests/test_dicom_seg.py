"""``segment.py --format dicom-seg``: the DICOM Segmentation object read back and compared, frame by frame
and voxel by voxel, with the NIfTI masks of the same run, on an oblique and on a left-right mirrored
series (mirrored output is the bug this looks for).

The masks come from :func:`tests.conftest.threshold_network` (bone and body by HU) so that they are
asymmetric and tied to the image content; everything else is the real ``segment.py`` run.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import segment
from inference import dicom_seg
from inference.api import NAME, VERSION
from tests.conftest import PROMPTS
from tests.test_segment_robustness import ct_volume, files_under, one_error, segment_args, write_nifti

SPACING_MM = 4.0  # the tiny checkpoint's spacing: the masks need no resampling to match the HU


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [k for k in range(3) if k != axis]
    matrix = np.eye(3)
    matrix[[i, i, j, j], [i, j, i, j]] = c, -s, s, c
    return matrix


def phantom() -> np.ndarray:
    """HU (slices, rows, columns): a body with a bone block off-centre in every direction."""
    hu = np.full((12, 18, 20), -1000, np.int16)
    hu[1:11, 2:16, 2:18] = 40
    hu[2:7, 4:8, 11:16] = 700  # bone: towards the last columns, first rows, first slices
    hu[6:10, 10:14, 4:8] = -800  # lung
    return hu


def write_series(folder: Path, hu: np.ndarray, row: np.ndarray, column: np.ndarray, feet_first: bool) -> list[Path]:
    """A CT series, one file per slice (named in shuffled order), with the given direction cosines;
    ``feet_first`` stacks the slices against the normal (row x column)."""
    folder.mkdir(parents=True)
    normal = np.cross(row, column) * (-1 if feet_first else 1)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = []
    for k in range(hu.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "P1", "Phantom^Test", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = (
            "20260101",
            "120000",
            "1",
            "",
            "",
        )
        ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 3, k + 1, "test"
        ds.ImageOrientationPatient = [*map(float, row), *map(float, column)]
        ds.ImagePositionPatient = [float(v) for v in np.array([-30.0, 20.0, 50.0]) + k * SPACING_MM * normal]
        ds.PixelSpacing, ds.SliceThickness = [SPACING_MM, SPACING_MM], SPACING_MM
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (hu[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        path = folder / f"IM{(7 * k) % hu.shape[0]:04d}"  # file names not in slice order
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


SERIES = {  # name: (row direction, column direction, feet first), in LPS patient coordinates
    "oblique": (
        rotation(2, 25) @ rotation(0, 15) @ [1.0, 0, 0],
        rotation(2, 25) @ rotation(0, 15) @ [0, 1.0, 0],
        False,
    ),
    "mirrored": (np.array([-1.0, 0, 0]), np.array([0, 1.0, 0]), True),
}


def expected_frame(mask: np.ndarray, affine: np.ndarray, source: Dataset) -> np.ndarray:
    """The NIfTI mask sampled at the source slice's pixel centres (rows, columns), computed from the DICOM
    attributes by hand: position + column * spacing * row direction + row * spacing * column direction."""
    row_dir, column_dir = np.reshape(source.ImageOrientationPatient, (2, 3))
    rows, columns = np.meshgrid(np.arange(source.Rows), np.arange(source.Columns), indexing="ij")
    spacing = [float(s) for s in source.PixelSpacing]
    lps = (
        np.asarray(source.ImagePositionPatient, float)
        + columns[..., None] * spacing[1] * row_dir
        + rows[..., None] * spacing[0] * column_dir
    )
    voxel = nib.affines.apply_affine(np.linalg.inv(affine), lps * [-1, -1, 1])  # LPS -> RAS -> voxel
    index = np.rint(voxel).astype(int)
    assert np.abs(voxel - index).max() < 1e-3, "the NIfTI grid is not the series' grid"
    return mask[index[..., 0], index[..., 1], index[..., 2]]


@pytest.mark.parametrize("name", SERIES)
def test_segments_land_on_the_source_slices_and_equal_the_nifti_masks(checkpoint, tmp_path, threshold_network, name):
    row, column, feet_first = SERIES[name]
    hu = phantom()
    files = write_series(tmp_path / name, hu, row, column, feet_first)
    out = tmp_path / "out"
    assert segment.main(segment_args(checkpoint, tmp_path / name, out, "--format", "nifti", "dicom-seg")) == 0
    sources = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, files)}
    first = next(iter(sources.values()))
    seg = pydicom.dcmread(out / name / "segmentation.dcm")

    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(
        sources
    )
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(PROMPTS)
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in seg.SegmentSequence] == ["Liver", "Aorta"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (NAME, VERSION) and seg.SoftwareVersions == VERSION

    nifti = [nib.load(out / name / f"{p}.nii.gz") for p in PROMPTS]
    masks = [np.asarray(image.dataobj).astype(bool) for image in nifti]
    found = {(uid, number): np.zeros(hu.shape[1:], bool) for uid in sources for number in (1, 2)}
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose(orientation, first.ImageOrientationPatient, atol=1e-6)
    for pixels, frame in zip(seg.pixel_array.reshape(-1, *hu.shape[1:]), seg.PerFrameFunctionalGroupsSequence):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(position, sources[uid].ImagePositionPatient, atol=1e-3)  # on its source slice
        found[uid, frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber] |= pixels.astype(bool)
    for uid, source in sources.items():
        for number, (mask, image) in enumerate(zip(masks, nifti), start=1):
            assert np.array_equal(found[uid, number], expected_frame(mask, image.affine, source)), (uid, number)

    # and the masks sit on the structures of the source pixels (a mirrored copy would not)
    for number, level in enumerate(threshold_network, start=1):
        truth = np.stack(
            [s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept) > level for s in sources.values()]
        )
        marked = np.stack([found[uid, number] for uid in sources])
        assert truth.any() and 2 * (truth & marked).sum() / (truth.sum() + marked.sum()) > 0.95
        if number == 1:  # the bone block is off-centre: its mirror image misses it
            assert (truth & np.flip(marked, axis=2)).sum() < 0.5 * truth.sum()

    # highdicom reads the same segments back per source instance
    decoded = hd.seg.segread(out / name / "segmentation.dcm").get_pixels_by_source_instance(
        list(sources), segment_numbers=[1, 2]
    )
    assert np.array_equal(
        decoded.astype(bool), np.stack([[found[u, n] for n in (1, 2)] for u in sources]).transpose(0, 2, 3, 1)
    )


def test_dicom_seg_alone_writes_only_the_segmentation_with_the_real_network(checkpoint, tmp_path):
    write_series(tmp_path / "ct", phantom(), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), False)
    assert segment.main(segment_args(checkpoint, tmp_path / "ct", tmp_path / "out", "--format", "dicom-seg")) == 0
    assert files_under(tmp_path / "out") == ["ct", "ct/segmentation.dcm"]
    assert hd.seg.segread(tmp_path / "out" / "ct" / "segmentation.dcm").number_of_segments == 2


def test_dicom_seg_of_non_dicom_input_is_refused_before_any_output(checkpoint, tmp_path, capfd):
    cases = tmp_path / "cases"
    write_series(cases / "dicom", phantom(), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), False)
    image = write_nifti(cases / "ct.nii.gz", ct_volume())
    for source in (image, cases):
        assert segment.main(segment_args(checkpoint, source, tmp_path / "out", "--format", "dicom-seg")) == 2
        error = one_error(capfd.readouterr())
        assert "--format dicom-seg needs DICOM series input" in error and str(image) in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "prompt, category, kind, region, modifier",
    [
        ("liver", "Anatomical Structure", "Liver", None, None),
        ("left kidney", "Anatomical Structure", "Kidney", None, "Left"),
        ("liver tumor", "Morphologically Abnormal Structure", "Neoplasm", "Liver", None),
        ("right lung nodule", "Morphologically Abnormal Structure", "Nodule", "Lung", "Right"),
        ("the spiky bit", "Tissue", "Tissue", None, None),
    ],
)
def test_segment_codes(prompt, category, kind, region, modifier):
    algorithm = hd.AlgorithmIdentificationSequence(NAME, codes.DCM.ArtificialIntelligence, VERSION)
    description = dicom_seg.segment_description(1, prompt, algorithm)
    assert description.SegmentLabel == prompt
    assert description.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == category
    item = description.SegmentedPropertyTypeCodeSequence[0]
    assert item.CodeMeaning == kind
    if region:
        item = description.AnatomicRegionSequence[0]
        assert item.CodeMeaning == region
    sequence = "AnatomicRegionModifierSequence" if region else "SegmentedPropertyTypeModifierCodeSequence"
    assert (item[sequence][0].CodeMeaning if sequence in item else None) == modifier


def test_a_series_with_a_missing_slice_is_refused_before_any_output(checkpoint, tmp_path, capfd):
    files = write_series(tmp_path / "gap", phantom(), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), False)
    files[5].unlink()
    assert segment.main(segment_args(checkpoint, tmp_path / "gap", tmp_path / "out", "--format", "dicom-seg")) == 2
    error = one_error(capfd.readouterr())
    assert str(tmp_path / "gap") in error and "not a regularly spaced volume" in error
    assert not (tmp_path / "out").exists()
