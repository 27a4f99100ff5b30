"""Reading cases into TorchIO subjects, checking them, and caching their preprocessed volumes."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio

from datamodules.files import atomic_write
from datamodules.preprocessing import Preprocessing
from datamodules.registry import Case


class BadCaseError(ValueError):
    """A case that cannot be used, with the file and the fault in its message."""


sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on stderr for every folder without DICOM


@contextmanager
def _native_stderr(sink: list[str]) -> Iterator[None]:
    """Capture what C++ code (ITK, MetaIO, GDCM) prints on file descriptor 2 into ``sink``."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            sink.append(capture.read().decode(errors="replace"))


def dicom_series(folder: Path) -> dict[str, int]:
    """The DICOM series in ``folder`` (found by content, whatever the file names): UID -> slice files."""
    with _native_stderr([]):
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        return {uid: len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}


def _read_sitk(path: Path, series: str | None = None) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(str(path), series) if series else reader.GetGDCMSeriesFileNames(str(path))
        if not files:
            raise BadCaseError(f"{path}: folder holds no DICOM series" + (f" {series}" if series else ""))
        reader.SetFileNames(files)
        return reader.Execute()
    return sitk.ReadImage(str(path))


def _read_error(path: Path, error: RuntimeError, native: str) -> BadCaseError:
    """One line on why ITK could not read ``path``: its own last words, or what the C++ reader printed."""
    reason = str(error).strip().splitlines()[-1].removeprefix("Reason: ")
    printed = " ".join(native.split())
    if "No such file or directory" in reason and path.exists():  # MetaIO's errno on a truncated file
        reason = "truncated or damaged file" + (f": {printed}" if printed else "")
    return BadCaseError(f"{path}: cannot be read ({reason or printed or type(error).__name__})")


def _all_finite(path: Path, image: sitk.Image) -> bool:
    """ITK's NIfTI reader turns NaN into 0 and pads a truncated file, so NIfTI files are read through
    nibabel as well (which raises on truncation)."""
    if path.name.endswith((".nii", ".nii.gz")):
        try:
            data = np.asanyarray(nib.load(path).dataobj)
        except (EOFError, OSError, ValueError, zlib.error) as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise BadCaseError(f"{path}: cannot be read (truncated or damaged file: {reason})") from None
        return bool(np.isfinite(data).all())
    return bool(np.isfinite(sitk.GetArrayViewFromImage(image)).all())


def read_image(path: Path, series: str | None = None) -> tio.ScalarImage:
    """A CT image from .nii/.nii.gz/.nrrd/.mha or a DICOM series folder (``series``: its UID, when the
    folder holds several), checked: one 3D volume of finite values. Read through SimpleITK (TorchIO
    would silently turn NaN into 0)."""
    if not path.exists():
        raise BadCaseError(f"{path}: file does not exist")
    native: list[str] = []
    try:
        with _native_stderr(native):
            image = _read_sitk(path, series)
    except RuntimeError as error:
        raise _read_error(path, error, "".join(native)) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise BadCaseError(
            f"{path}: expected a 3D image, got {image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} component(s)"
        )
    if min(image.GetSize()) < 2:
        raise BadCaseError(f"{path}: expected a 3D image, got shape {image.GetSize()}")
    if not _all_finite(path, image):
        raise BadCaseError(f"{path}: contains NaN or infinite voxels")
    tensor, affine = tio.io.sitk_to_nib(image)
    return tio.ScalarImage(tensor=torch.as_tensor(tensor), affine=affine)


def read_labels(case: Case, known_values: set[int], reference: tio.ScalarImage) -> tio.LabelMap:
    """The case's label map (TotalSegmentator files are merged), checked against the image."""
    if case.label_map is not None:
        labels = _read_label_file(case.label_map)
        _check_geometry(case.label_map, labels, reference)
        values = set(torch.unique(labels.data).tolist())
        if not values <= known_values:
            raise BadCaseError(
                f"{case.label_map}: label values {sorted(values - known_values)} are not in the label map"
            )
        return labels
    merged = torch.zeros_like(reference.data, dtype=torch.uint8)
    for value, (_, path) in enumerate(case.structure_files, start=1):
        mask = _read_label_file(path)
        _check_geometry(path, mask, reference)
        merged[mask.data > 0] = value
    return tio.LabelMap(tensor=merged, affine=reference.affine)


def _read_label_file(path: Path) -> tio.LabelMap:
    if not path.exists():
        raise BadCaseError(f"{path}: file does not exist")
    try:
        labels = tio.LabelMap(path)
        labels.load()
    except Exception as error:
        raise BadCaseError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None
    return labels


def _check_geometry(path: Path, labels: tio.Image, image: tio.ScalarImage) -> None:
    if labels.data.shape != image.data.shape:
        raise BadCaseError(
            f"{path}: shape {tuple(labels.data.shape[1:])} differs from the image's {tuple(image.data.shape[1:])}"
        )
    if not np.allclose(labels.affine, image.affine, atol=1e-3):
        raise BadCaseError(f"{path}: geometry (affine) differs from the image's")


def read_case(case: Case, known_values: set[int]) -> tio.Subject:
    image = read_image(case.image)
    return tio.Subject(image=image, label=read_labels(case, known_values, image))


@dataclass
class PreparedVolume:
    """A case after preprocessing: windowed image (1, D, H, W) float16, labels (D, H, W) uint8."""

    image: torch.Tensor
    labels: torch.Tensor
    affine: np.ndarray
    spacing: float


class VolumeCache:
    """Preprocesses each case once per spacing and keeps the result on disk.

    The key holds the preprocessing parameters, the spacing and the source files' sizes and
    modification times, so changing any of them writes a new entry.

    Args:
        folder: where the cached volumes live.
        preprocessing: the shared preprocessing.
        enabled: when False, every load preprocesses from the source files and nothing is written.
    """

    def __init__(self, folder: str | Path, preprocessing: Preprocessing, enabled: bool = True) -> None:
        self.folder = Path(folder)
        self.preprocessing = preprocessing
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self.checked: dict[str, list[float]] = self._read_manifest()

    @staticmethod
    def _stamp(case: Case) -> list:
        files = [case.image, *([case.label_map] if case.label_map else []), *(p for _, p in case.structure_files)]
        return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()]

    def key(self, case: Case, spacing: float) -> str:
        payload = json.dumps([self.preprocessing.as_dict(), spacing, self._stamp(case)], sort_keys=True, default=str)
        return hashlib.sha1(payload.encode()).hexdigest()[:20]

    # ------------------------------------------------------------------ manifest of checked cases
    @property
    def manifest(self) -> Path:
        return self.folder / "manifest.json"

    def _read_manifest(self) -> dict[str, list[float]]:
        if not self.enabled or not self.manifest.is_file():
            return {}
        try:
            return dict(json.loads(self.manifest.read_text()))
        except (ValueError, TypeError):
            return {}  # a damaged manifest only costs a re-read of the sources

    def _source_key(self, case: Case, known_values: set[int]) -> str:
        payload = json.dumps([self._stamp(case), sorted(known_values)], default=str)
        return hashlib.sha1(payload.encode()).hexdigest()[:20]

    def checked_spacing(self, case: Case, known_values: set[int]) -> tuple[float, ...] | None:
        """The voxel spacing of a case already read and found good, if its source files (size,
        modification time) and the known label values are unchanged since."""
        spacing = self.checked.get(self._source_key(case, known_values))
        return tuple(spacing) if spacing else None

    def remember(self, case: Case, known_values: set[int], spacing: tuple[float, ...]) -> None:
        self.checked[self._source_key(case, known_values)] = list(spacing)

    def save_manifest(self) -> None:
        if self.enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.checked, indent=0, sort_keys=True)
            atomic_write(self.manifest, lambda temporary: temporary.write_text(text))

    def load(
        self, case: Case, spacing: float, known_values: set[int], subject: tio.Subject | None = None
    ) -> PreparedVolume:
        """The case at ``spacing``, from the cache or preprocessed now (from ``subject`` if already read)."""
        path = self.folder / f"{case.dataset}-{case.case_id}-{self.key(case, spacing)}.pt"
        if self.enabled and path.is_file():
            self.hits += 1
            stored = torch.load(path, map_location="cpu", weights_only=True)
            return PreparedVolume(stored["image"], stored["labels"], stored["affine"].numpy(), spacing)
        self.misses += 1
        prepared = self.preprocessing.prepare(subject or read_case(case, known_values), spacing)
        volume = PreparedVolume(
            prepared["image"].data.half(), prepared["label"].data[0].to(torch.uint8), prepared["image"].affine, spacing
        )
        if not self.enabled:
            return volume
        self.folder.mkdir(parents=True, exist_ok=True)
        stored = {"image": volume.image, "labels": volume.labels, "affine": torch.from_numpy(np.asarray(volume.affine))}
        atomic_write(path, lambda temporary: torch.save(stored, temporary))  # DDP ranks may fill one entry at once
        return volume
