"""Reading cases into TorchIO subjects, checking them, and caching their preprocessed volumes."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio

from datamodules.files import atomic_write, staged
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
    for _, value, path in case.structure_files:  # the data set's value of each structure
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


def image_geometry(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Voxel counts and spacing (mm) of an image file or DICOM series folder, from its header(s) only
    (a series: its first and last slice)."""
    native: list[str] = []
    try:
        with _native_stderr(native):
            if not path.is_dir():
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(path))
                reader.ReadImageInformation()
                return tuple(reader.GetSize()), tuple(reader.GetSpacing())
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise BadCaseError(f"{path}: folder holds no DICOM series")
            first, last = (sitk.ImageFileReader() for _ in range(2))
            for reader, file in ((first, files[0]), (last, files[-1])):
                reader.SetFileName(file)
                reader.ReadImageInformation()
            step = np.linalg.norm(np.subtract(last.GetOrigin(), first.GetOrigin())) / max(len(files) - 1, 1)
            return (*first.GetSize()[:2], len(files)), (*first.GetSpacing()[:2], float(step) or first.GetSpacing()[2])
    except RuntimeError as error:
        raise _read_error(path, error, "".join(native)) from None


def prepared_shape(size: tuple[int, ...], spacing: tuple[float, ...], target: float) -> tuple[int, ...]:
    """Voxel counts after resampling to the isotropic ``target`` spacing (TorchIO's rule: the extent
    rounded down)."""
    return tuple(int(np.floor(n * s / target)) for n, s in zip(size, spacing))


CACHE_FORMAT = 2
"""Version of the cache entries, part of every key, so an entry of another version is never read (it
is rebuilt beside the old one): 1 was one torch ``.pt`` file per entry, 2 is memory-mappable ``.npy``
image and labels, foreground voxel samples and a JSON header (written last: it marks a whole entry)."""
MAX_LOCATIONS = 10_000  # foreground voxels kept per label value for centring patches
ENTRY_BYTES_PER_VOXEL = 3  # float16 image + uint8 labels


def foreground_locations(
    labels: np.ndarray, limit: int = MAX_LOCATIONS
) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Per label value > 0: a uniform sample of at most ``limit`` of its voxels, (n, 3) int32, and its
    voxel count. One pass over slabs of the volume (Bernoulli thinning, then an exact subsample), so
    no index array of the whole volume is made."""
    counts = np.bincount(labels.ravel(), minlength=256)
    keep = np.minimum(1.0, 2.0 * limit / np.maximum(counts, 1))
    rng = np.random.default_rng(0)
    kept: dict[int, list[np.ndarray]] = {int(v): [] for v in np.flatnonzero(counts[1:]) + 1}
    slab = max(1, 2**22 // max(int(np.prod(labels.shape[1:])), 1))
    for start in range(0, labels.shape[0], slab):
        block = np.asarray(labels[start : start + slab])
        index = np.flatnonzero(block)
        values = block.ravel()[index]
        chosen = rng.random(len(index)) < keep[values]
        index, values = index[chosen], values[chosen]
        voxels = np.stack(np.unravel_index(index, block.shape), axis=1).astype(np.int32)
        voxels[:, 0] += start
        for value in np.unique(values):
            kept[int(value)].append(voxels[values == value])
    locations = {}
    for value, parts in kept.items():
        voxels = np.concatenate(parts)
        if len(voxels) > limit:
            voxels = voxels[np.sort(rng.choice(len(voxels), limit, replace=False))]
        locations[value] = voxels
    return locations, {v: int(counts[v]) for v in kept}


@dataclass
class PreparedVolume:
    """A case after preprocessing: windowed image (1, D, H, W) float16 and labels (D, H, W) uint8
    (memory-mapped when read from the cache: only what is sliced is read), and per label value a
    sample of its voxels (``locations``, (n, 3)) with its voxel count (``counts``)."""

    image: torch.Tensor
    labels: torch.Tensor
    affine: np.ndarray
    spacing: float
    locations: dict[int, np.ndarray] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_arrays(
        cls, image: torch.Tensor, labels: torch.Tensor, affine: np.ndarray, spacing: float
    ) -> PreparedVolume:
        locations, counts = foreground_locations(labels.numpy())
        return cls(image, labels, affine, spacing, locations, counts)

    def foreground_voxel(self, values: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
        """A voxel drawn uniformly from those holding any of ``values`` (None if there are none)."""
        present = [v for v in values if self.counts.get(v)]
        if not present:
            return None
        weights = np.array([self.counts[v] for v in present], dtype=float)
        rows = self.locations[present[rng.choice(len(present), p=weights / weights.sum())]]
        return np.asarray(rows[rng.integers(len(rows))], dtype=np.int64)

    def patch(self, start: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the cube of edge ``size`` at voxel ``start`` (image (1, s, s, s), labels (s, s, s));
        the part outside the volume is zero."""
        image = torch.zeros((self.image.shape[0], size, size, size), dtype=self.image.dtype)
        labels = torch.zeros((size, size, size), dtype=self.labels.dtype)
        source = tuple(slice(max(int(a), 0), min(int(a) + size, n)) for a, n in zip(start, self.labels.shape))
        target = tuple(slice(s.start - int(a), s.stop - int(a)) for s, a in zip(source, start))
        image[(slice(None), *target)] = self.image[(slice(None), *source)]
        labels[target] = self.labels[source]
        return image, labels


class VolumeCache:
    """Preprocesses each case once per spacing and keeps the result on disk, memory-mapped on reading.

    The key holds the cache format, the preprocessing parameters, the spacing and the source files'
    sizes and modification times (and label values), so changing any of them writes a new entry. An
    entry is ``STEM.image.npy``, ``STEM.labels.npy``, ``STEM.locations.npy`` and ``STEM.json``
    (format, shape, affine, foreground counts); one whose header does not match its arrays is rebuilt.

    Args:
        folder: where the cached volumes live.
        preprocessing: the shared preprocessing.
        enabled: when False, every load preprocesses from the source files and nothing is written.
        thin_values: a data set's name to the label values its volumes hand to ``Preprocessing.prepare``
            as thin structures (part of the key when ``thin_occupancy`` is on).
    """

    def __init__(
        self,
        folder: str | Path,
        preprocessing: Preprocessing,
        enabled: bool = True,
        thin_values: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.preprocessing = preprocessing
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self.checked: dict[str, list[float]] = self._read_manifest()
        self._keys: dict[tuple[Case, float], str] = {}
        self.thin_values = dict(thin_values or {})

    @staticmethod
    def _stamp(case: Case) -> list:
        files = [(None, case.image), *([(None, case.label_map)] if case.label_map else [])]
        files += [(value, path) for _, value, path in case.structure_files]
        return [(str(p), p.stat().st_size, p.stat().st_mtime_ns, v) for v, p in files if p.exists()]

    def _thin(self, case: Case) -> tuple[int, ...]:
        return self.thin_values.get(case.dataset, ()) if self.preprocessing.thin_occupancy else ()

    def key(self, case: Case, spacing: float) -> str:
        """The entry's key, computed once per (case, spacing) in a process."""
        if (case, spacing) not in self._keys:
            payload = [CACHE_FORMAT, self.preprocessing.as_dict(), spacing, self._stamp(case), self._thin(case)]
            digest = hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
            self._keys[case, spacing] = digest
        return self._keys[case, spacing]

    def stem(self, case: Case, spacing: float) -> Path:
        return self.folder / f"{case.dataset}-{case.case_id}-{self.key(case, spacing)}"

    def has(self, case: Case, spacing: float) -> bool:
        """Whether the cache holds this case at ``spacing`` (always False when disabled)."""
        return self.enabled and self.stem(case, spacing).with_suffix(".json").is_file()

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

    # ------------------------------------------------------------------ entries
    def load(
        self, case: Case, spacing: float, known_values: set[int], subject: tio.Subject | None = None
    ) -> PreparedVolume:
        """The case at ``spacing``, memory-mapped from the cache or preprocessed now (from ``subject``
        if already read) and stored."""
        stem = self.stem(case, spacing)
        if self.enabled and (volume := self._read(stem, spacing)) is not None:
            self.hits += 1
            return volume
        self.misses += 1
        prepared = self.preprocessing.prepare(subject or read_case(case, known_values), spacing, self._thin(case))
        volume = PreparedVolume.from_arrays(
            prepared["image"].data.half(), prepared["label"].data[0].to(torch.uint8), prepared["image"].affine, spacing
        )
        if self.enabled:
            self._write(stem, volume)
        return volume

    @staticmethod
    def _files(stem: Path) -> list[Path]:
        return [stem.with_name(f"{stem.name}.{part}.npy") for part in ("image", "labels", "locations")]

    def _read(self, stem: Path, spacing: float) -> PreparedVolume | None:
        """The entry at ``stem``, memory-mapped; None when absent, damaged, or not of this format."""
        try:
            header = json.loads(stem.with_suffix(".json").read_text())
            image, labels, locations = (np.load(f, mmap_mode="c") for f in self._files(stem))
            shape, rows = tuple(header["shape"]), header["rows"]
            if (
                header["format"] != CACHE_FORMAT
                or (image.dtype, labels.dtype, image.shape, labels.shape) != (np.float16, np.uint8, (1, *shape), shape)
                or len(locations) != sum(rows)
            ):
                return None
            ends = np.cumsum(rows, dtype=int)
            parts = {v: locations[e - n : e] for v, n, e in zip(header["values"], rows, ends)}
            counts = dict(zip(header["values"], header["counts"]))
            affine = np.asarray(header["affine"], dtype=float)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return PreparedVolume(torch.from_numpy(image), torch.from_numpy(labels), affine, spacing, parts, counts)

    def _write(self, stem: Path, volume: PreparedVolume) -> None:
        """Write the entry's files under temporary names and rename them together, the header last
        (DDP ranks may fill one entry at once; readers never see part of one)."""
        values = sorted(volume.locations)
        header = {
            "format": CACHE_FORMAT,
            "shape": list(volume.labels.shape),
            "affine": np.asarray(volume.affine).tolist(),
            "values": values,
            "counts": [volume.counts[v] for v in values],
            "rows": [len(volume.locations[v]) for v in values],
        }
        locations = np.concatenate([volume.locations[v] for v in values]) if values else np.zeros((0, 3), np.int32)
        arrays = (volume.image.numpy(), volume.labels.numpy(), locations)
        with staged([*self._files(stem), stem.with_suffix(".json")]) as temporaries:
            for temporary, array in zip(temporaries, arrays):
                with temporary.open("wb") as handle:
                    np.save(handle, array)
            temporaries[-1].write_text(json.dumps(header))


def entry_bytes(shape: tuple[int, ...]) -> int:
    """Bytes on disk of one cache entry's image and labels at this prepared shape (its foreground
    samples add at most ``12 * MAX_LOCATIONS`` bytes per label value)."""
    return ENTRY_BYTES_PER_VOXEL * int(np.prod(shape))
