"""DICOM Segmentation objects (highdicom) of masks predicted on a DICOM CT series.

The masks (on the grid ``segment.py`` read the series onto, with its RAS affine) become a highdicom
:class:`~highdicom.Volume` that is matched onto the source series' own geometry (axis permutations and
flips only, never resampled): each frame lies on a source slice, with that slice's position,
orientation and SOP instance UID, in the source's frame of reference, whatever the series' orientation
(oblique, mirrored, stacked feet first).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.sr.codedict import codes

SERIES_NUMBER = 1000
# Prompt (lower case, words) -> SNOMED CT concept (pydicom's codes.SCT keyword) of the structure.
ANATOMY = {
    "adrenal gland": "AdrenalGland",
    "airway": "AirwayStructure",
    "aorta": "Aorta",
    "bladder": "UrinaryBladderStructure",
    "bone": "Bone",
    "brain": "Brain",
    "colon": "Colon",
    "duodenum": "Duodenum",
    "esophagus": "Esophagus",
    "femur": "Femur",
    "gallbladder": "Gallbladder",
    "heart": "Heart",
    "inferior vena cava": "InferiorVenaCava",
    "kidney": "Kidney",
    "liver": "Liver",
    "lung": "Lung",
    "muscle": "Muscle",
    "pancreas": "Pancreas",
    "portal vein": "PortalVein",
    "prostate": "Prostate",
    "pulmonary artery": "PulmonaryArtery",
    "renal artery": "RenalArtery",
    "rib": "Rib",
    "skull": "Skull",
    "small intestine": "SmallIntestine",
    "spine": "StructureOfVertebralColumn",
    "spleen": "Spleen",
    "sternum": "Sternum",
    "stomach": "Stomach",
    "superior mesenteric artery": "SuperiorMesentericArtery",
    "trachea": "Trachea",
    "urinary bladder": "UrinaryBladderStructure",
    "vertebra": "Vertebra",
    "vertebrae": "Vertebra",
}
# Lesion word -> SNOMED CT morphologic abnormality; the rest of the prompt may name its organ.
LESIONS = {
    "cancer": "Neoplasm",
    "cyst": "Cyst",
    "lesion": "Lesion",
    "mass": "Mass",
    "metastasis": "Metastasis",
    "neoplasm": "Neoplasm",
    "nodule": "Nodule",
    "tumor": "Neoplasm",
    "tumour": "Neoplasm",
}
LATERALITY = {"left": codes.SCT.Left, "right": codes.SCT.Right}


@dataclass(frozen=True)
class SourceSeries:
    """A DICOM series' headers in volume order and its geometry."""

    folder: Path
    datasets: list[pydicom.Dataset]
    geometry: hd.VolumeGeometry


def read_source_series(folder: Path, series_uid: str) -> SourceSeries:
    """The headers (no pixels) of series ``series_uid`` in ``folder``; ValueError unless its slices form
    a regularly spaced volume in patient coordinates, as DICOM-SEG frames need."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    try:
        spacing, positions = hd.spatial.get_series_volume_positions(datasets)
    except (AttributeError, KeyError, ValueError) as error:
        raise ValueError(f"{folder}: DICOM series {series_uid} has no usable slice geometry ({error})") from None
    if spacing is None or positions is None:
        raise ValueError(
            f"{folder}: DICOM series {series_uid} is not a regularly spaced volume; cannot write DICOM-SEG"
        )
    ordered = [datasets[positions.index(i)] for i in range(len(datasets))]
    first = ordered[0]
    geometry = hd.VolumeGeometry.from_attributes(
        image_position=first.ImagePositionPatient,
        image_orientation=first.ImageOrientationPatient,
        rows=first.Rows,
        columns=first.Columns,
        pixel_spacing=first.PixelSpacing,
        spacing_between_slices=spacing,
        number_of_frames=len(ordered),
        coordinate_system="PATIENT",
        frame_of_reference_uid=first.FrameOfReferenceUID,
    )
    return SourceSeries(folder, ordered, geometry)


def segment_codes(prompt: str) -> tuple[hd.sr.CodedConcept, hd.sr.CodedConcept, list, pydicom.sr.coding.Code | None]:
    """(category, type, anatomic regions, laterality) of a prompt: an organ of :data:`ANATOMY` is an
    "Anatomical Structure"; a lesion word of :data:`LESIONS` makes a "Morphologically Abnormal
    Structure" in the organ the other words name; anything else is the generic "Tissue"."""
    words = re.sub(r"[^a-z]+", " ", prompt.lower()).split()
    side = next((LATERALITY[w] for w in words if w in LATERALITY), None)
    lesion = next((LESIONS[w] for w in words if w in LESIONS), None)
    organ = ANATOMY.get(" ".join(w for w in words if w not in LATERALITY and w not in LESIONS))
    if lesion:
        regions = [getattr(codes.SCT, organ)] if organ else []
        return codes.SCT.MorphologicallyAbnormalStructure, getattr(codes.SCT, lesion), regions, side
    if organ:
        return codes.SCT.AnatomicalStructure, getattr(codes.SCT, organ), [], side
    return codes.SCT.Tissue, codes.SCT.Tissue, [], None


def segment_description(
    number: int, prompt: str, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    """A segment labelled with the prompt, coded as :func:`segment_codes` says, made by the algorithm."""
    category, kind, regions, side = segment_codes(prompt)
    description = hd.seg.SegmentDescription(
        number, prompt[:64], category, kind, "AUTOMATIC", algorithm, anatomic_regions=regions or None
    )
    if side is not None:  # laterality modifies the organ: the segmented type, or a lesion's region
        modifier = [hd.sr.CodedConcept.from_code(side)]
        if regions:
            description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = modifier
        else:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = modifier
    return description


def segmentation(
    masks: np.ndarray,
    affine: np.ndarray,
    prompts: Sequence[str],
    source: SourceSeries,
    name: str,
    version: str,
    checkpoint: str,
) -> hd.seg.Segmentation:
    """A BINARY DICOM Segmentation of ``source`` with one segment per prompt from masks (P, ...) on the
    grid of ``affine`` (RAS, as nibabel); ValueError if that grid is not the series' own."""
    first = source.datasets[0]
    volume = hd.Volume(
        np.moveaxis(masks.astype(np.uint8), 0, -1),
        affine,
        "PATIENT",
        first.FrameOfReferenceUID,
        channels={"SegmentNumber": list(range(1, len(prompts) + 1))},
        from_reference_convention="RAS",
    )
    try:
        volume = volume.match_geometry(source.geometry)
    except RuntimeError as error:
        raise ValueError(f"{source.folder}: the masks' grid is not the DICOM series' own ({error})") from None
    algorithm = hd.AlgorithmIdentificationSequence(
        name, codes.DCM.ArtificialIntelligence, version, parameters={"checkpoint": checkpoint}
    )
    return hd.seg.Segmentation(
        source_images=source.datasets,
        pixel_array=volume,
        segmentation_type="BINARY",
        segment_descriptions=[segment_description(i, p, algorithm) for i, p in enumerate(prompts, start=1)],
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=name,
        manufacturer_model_name=name,
        software_versions=version,
        device_serial_number="0",
        series_description=f"{name} segmentation",
    )
