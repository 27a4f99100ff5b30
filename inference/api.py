"""Segmentation from Python: load a checkpoint once, segment images for prompts, get nibabel images back.

    from inference.api import Segmenter

    segmenter = Segmenter("outputs/quickstart/checkpoints/trimmed.pt", device="cpu")
    masks = segmenter.segment("scan.nii.gz", ["liver", "aorta"])  # {prompt: uint8 nibabel image}

``segment.py`` is a command-line shell over :class:`Segmenter`: the same checks, the checkpoint's own
preprocessing, MONAI's Gaussian sliding window and the same thresholding rule (:func:`binarize`).
"""

from __future__ import annotations

import sys
import tomllib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from scipy import ndimage

from datamodules.preprocessing import Preprocessing, grid_offsets
from datamodules.volumes import BadCaseError, read_image
from inference.checkpoints import CheckpointError, LoadedModel, load_model
from inference.sliding_window import predict_volume
from networks.text_encoders import PromptEmbedder, build_text_encoder

NAME = "prompt-seg"
VERSION: str = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]
SIMILARITY_WARNING = 0.5
# Does it look like CT in Hounsfield units? Thresholds on a sample of at most about 2 M voxels.
NO_AIR_HU = -200.0  # the 0.1st percentile should lie below: every CT holds some air (MR, PET: none)
TOO_DENSE_HU = 4000.0  # the 99.9th percentile should lie below: above cortical bone and contrast
AIR_HU, AIR_FRACTION = -900.0, 0.95  # at most 95 % of the voxels air (or padding outside the scan)
BODY_HU, BODY_FRACTION = (-200.0, 2000.0), 0.01  # at least 1 % soft tissue or bone

ImageLike = nib.spatialimages.SpatialImage | tio.ScalarImage | str | Path


class SegmentationWarning(UserWarning):
    """An input that is segmented but probably badly: not CT, or a prompt far from the training prompts."""


def _warn(text: str) -> None:
    warnings.warn(text, SegmentationWarning, stacklevel=3)


def check_settings(device: str, overlap: float, grid_shifts: int = 8) -> None:
    """ValueError unless ``overlap`` lies in [0, 1), ``grid_shifts`` is 1, 2, 4 or 8 and ``device`` exists."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"--overlap must lie in [0, 1), got {overlap}")
    grid_offsets(grid_shifts)
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"--device {device} is not available ({error})") from None


def check_prompt_list(prompts: Sequence[str]) -> None:
    """ValueError on no prompt, an empty prompt or a repeated one."""
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("--prompt must not be empty")
    repeated = sorted({p for p in prompts if list(prompts).count(p) > 1})
    if repeated:
        raise ValueError(f"--prompt {repeated[0]!r} is given more than once")


def ct_problems(hu: np.ndarray) -> list[str]:
    """Why an image does not look like CT in Hounsfield units (empty when it does)."""
    flat = hu.reshape(-1)
    sample = flat[:: max(1, flat.size // 2_000_000)].astype(np.float32)
    low, high = np.quantile(sample, [0.001, 0.999])
    air = float(np.mean(sample < AIR_HU))
    body = float(np.mean((sample >= BODY_HU[0]) & (sample <= BODY_HU[1])))
    problems = []
    if low > NO_AIR_HU:
        problems.append(f"no air: 0.1st percentile {low:.0f} HU > {NO_AIR_HU:.0f}")
    if high > TOO_DENSE_HU:
        problems.append(f"99.9th percentile {high:.0f} HU > {TOO_DENSE_HU:.0f}")
    if air > AIR_FRACTION:
        problems.append(f"{air:.0%} of voxels below {AIR_HU:.0f} HU (air)")
    if body < BODY_FRACTION:
        problems.append(f"no body: {body:.1%} of voxels within {BODY_HU[0]:.0f}..{BODY_HU[1]:.0f} HU")
    return problems


def as_image(image: ImageLike, series: str | None = None) -> tio.ScalarImage:
    """A checked CT image (one 3D volume of finite values) from a path (file or DICOM series folder,
    ``series`` its UID where it holds several), a nibabel image or a TorchIO image."""
    if isinstance(image, str | Path):
        return read_image(Path(image), series)
    if isinstance(image, tio.ScalarImage):
        data, affine = image.data, image.affine
    else:
        data, affine = torch.as_tensor(np.asanyarray(image.dataobj))[None], image.affine
    if data.ndim != 4 or data.shape[0] != 1 or min(data.shape[1:]) < 2:
        raise BadCaseError(f"image: expected one 3D volume, got shape {tuple(data.shape[1:])}")
    if not torch.isfinite(data).all():
        raise BadCaseError("image: contains NaN or infinite voxels")
    return tio.ScalarImage(tensor=data, affine=affine)


def binarize(probabilities: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(float16 probabilities, masks): the probabilities are rounded to float16 first and the masks are
    ``mask = probability_float16 > 0.5``, so thresholding a saved probability map at 0.5 (strictly
    greater) gives exactly the masks: a value rounded to 0.5 itself is background."""
    rounded = probabilities.to(torch.float16).numpy()
    return rounded, rounded > np.float16(0.5)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component (clean-up for organs)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count < 2:
        return mask
    sizes = ndimage.sum_labels(mask, labels, range(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


@dataclass
class Prediction:
    """Per prompt, the mask (uint8 0/1) and the foreground probability on the input's grid. The
    probabilities hold float16 values stored as float32 (NIfTI has no 16-bit float);
    ``probability > 0.5`` equals the mask unless ``largest_component`` removed parts of it."""

    masks: dict[str, nib.Nifti1Image]
    probabilities: dict[str, nib.Nifti1Image]


class Segmenter:
    """A checkpoint loaded once (training checkpoint or trimmed export, weights only) for many images.

    Args:
        checkpoint: the checkpoint file.
        device: ``cpu`` or ``cuda[:N]``; default CUDA where available.
        overlap: sliding-window overlap in [0, 1).
        roi: sliding-window edge; default the validation window of training.
        sw_batch_size: windows per forward pass (on GPU out-of-memory, retried with 1).
        largest_component: keep each mask's largest connected component.
        grid_shifts: predict on 1, 2, 4 or 8 grids shifted by half a voxel from one another and average the
            probabilities back on the input's grid, so edges and thin vessels are placed between a coarse
            grid's voxel centres (docs/experiments.md, twenty-eighth session); each grid costs one full prediction.
        progress: a progress bar over the window batches (on stderr).
        warn: called with each warning line; default :class:`SegmentationWarning` via ``warnings``.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        device: str | None = None,
        *,
        overlap: float = 0.5,
        roi: int | None = None,
        sw_batch_size: int = 2,
        largest_component: bool = False,
        grid_shifts: int = 8,
        progress: bool = False,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_settings(str(self.device), overlap, grid_shifts)
        self.checkpoint = Path(checkpoint)
        self.model: LoadedModel = load_model(self.checkpoint)
        self.overlap, self.roi, self.sw_batch_size = overlap, roi or self.model.sw_roi, sw_batch_size
        self.largest_component, self.progress, self.warn = largest_component, progress, warn or _warn
        self.grid_shifts = grid_shifts

    def embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """The prompts' embeddings (P, E): stored ones, or the checkpoint's text encoder for new prompts
        (warned about when far from every training prompt); CheckpointError when it has none."""
        check_prompt_list(prompts)
        model = self.model
        missing = [p for p in prompts if p not in model.prompt_embeddings]
        if missing and not model.text.get("text_encoder"):
            known = ", ".join(sorted(model.prompt_embeddings))
            raise CheckpointError(f"this model segments only its training prompts ({known}); not {missing}")
        if missing:
            encoder = build_text_encoder(
                model.text["text_encoder"],
                model.text.get("text_encoder_weights"),
                model.text.get("clip_model") or "ViT-B-32",
            )
            embedder = PromptEmbedder(encoder, model.text.get("prompt_template") or "{}")
            if model.text_identity and embedder.identity != model.text_identity:
                raise CheckpointError(
                    f"text encoder {embedder.identity!r} differs from the checkpoint's {model.text_identity!r}"
                )
            known = torch.stack(list(model.prompt_embeddings.values()))
            for prompt, vector in zip(missing, embedder(missing)):
                similarity = float((known @ vector).max())
                if similarity < SIMILARITY_WARNING:
                    self.warn(f"prompt {prompt!r} is far from every training prompt (cosine {similarity:.2f})")
                model.prompt_embeddings[prompt] = vector
        return torch.stack([model.prompt_embeddings[p] for p in prompts])

    def predict_arrays(self, image: tio.ScalarImage, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(masks (P, ...) bool, probabilities (P, ...) float16) on ``image``'s grid (see :func:`binarize`):
        the mean of the probabilities predicted on each shifted grid, resampled back. Each prompt's map is
        resampled and summed on its own, so at most one input-grid float32 array exists beside the sum: the
        input-sized arrays peak at about 7 bytes per voxel and prompt (sum, float16 copy, mask)."""
        embeddings = self.embeddings(prompts)
        preprocessing = Preprocessing(**self.model.preprocessing)
        spacing = preprocessing.closest_spacing(tuple(float(s) for s in image.spacing))
        shifts = grid_offsets(self.grid_shifts)
        mean = torch.zeros(len(prompts), *image.spatial_shape)
        for shift in shifts:
            prepared = preprocessing.prepare(tio.Subject(image=image), spacing, shift=shift)["image"]
            for total, probability in zip(mean, self._predict_prepared(prepared, embeddings)):
                total += Preprocessing.restore(probability[None], prepared.affine, image)[0]
        rounded, masks = binarize(mean.div_(len(shifts)))
        if self.largest_component:
            masks = np.stack([largest_component(m) for m in masks])
        return masks, rounded

    def _predict_prepared(self, prepared: tio.ScalarImage, embeddings: torch.Tensor) -> torch.Tensor:
        """Probabilities (P, ...) on the prepared grid; on GPU out-of-memory, retried with one window a batch."""
        network = self.model.network.to(self.device)

        def predict(sw_batch_size: int) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                return predict_volume(
                    network,
                    prepared.data[None].to(self.device),
                    embeddings.to(self.device),
                    self.roi,
                    self.overlap,
                    sw_batch_size,
                    sw_device=self.device,
                    device=torch.device("cpu"),
                    progress=self.progress,
                )

        try:
            return predict(self.sw_batch_size).cpu()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"GPU out of memory: retrying with 1 window a batch (was {self.sw_batch_size})", file=sys.stderr)
            return predict(1).cpu()

    def predict(self, image: ImageLike, prompts: Sequence[str], series: str | None = None) -> Prediction:
        """Masks and probabilities of ``image`` (a path, DICOM folder, nibabel or TorchIO image) per prompt;
        warns when the image does not look like CT."""
        checked = as_image(image, series)
        problems = ct_problems(checked.data[0].numpy())
        if problems:
            name = image if isinstance(image, str | Path) else "image"
            self.warn(f"{name}: does not look like CT ({'; '.join(problems)})")
        masks, probabilities = self.predict_arrays(checked, prompts)
        return Prediction(
            {p: nib.Nifti1Image(m.astype(np.uint8), checked.affine) for p, m in zip(prompts, masks)},
            {p: nib.Nifti1Image(q.astype(np.float32), checked.affine) for p, q in zip(prompts, probabilities)},
        )

    def segment(
        self, image: ImageLike, prompts: Sequence[str], series: str | None = None
    ) -> dict[str, nib.Nifti1Image]:
        """One uint8 mask per prompt, a nibabel image on the input's grid (see :meth:`predict`)."""
        return self.predict(image, prompts, series).masks
