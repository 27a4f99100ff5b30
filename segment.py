"""Segment new CT volumes with a trained (or trimmed) checkpoint, one mask per prompt.

    python segment.py --checkpoint CKPT --input PATH --prompt liver --prompt "renal artery" --output DIR

Input: a .nii/.nii.gz/.nrrd/.mha file, a DICOM series folder (found by content, any file names), or
a folder of such cases. Output: ``DIR/CASE/PROMPT-SLUG.nii.gz`` (uint8 0/1) on exactly the input's
grid; CASE drops an nnU-Net ``_0000`` channel suffix. Prompts, inputs and the output folder are all
checked before inference; the files of a case are written under temporary names and renamed together
once all are written, so a failed or interrupted run leaves no partial case.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from scipy import ndimage
from tqdm import tqdm

from datamodules.files import check_writable, staged
from datamodules.preprocessing import Preprocessing
from datamodules.registry import IMAGE_SUFFIXES
from datamodules.volumes import BadCaseError, dicom_series, read_image
from inference.checkpoints import CheckpointError, LoadedModel, load_model
from inference.preview import label_map, save_preview
from inference.sliding_window import predict_volume
from networks.text_encoders import PromptEmbedder, build_text_encoder

SIMILARITY_WARNING = 0.5
CHANNEL_SUFFIX = "_0000"  # nnU-Net's first (CT) channel
# Does it look like CT in Hounsfield units? Thresholds on a sample of at most about 2 M voxels.
NO_AIR_HU = -200.0  # the 0.1st percentile should lie below: every CT holds some air (MR, PET: none)
TOO_DENSE_HU = 4000.0  # the 99.9th percentile should lie below: above cortical bone and contrast
AIR_HU, AIR_FRACTION = -900.0, 0.95  # at most 95 % of the voxels air (or padding outside the scan)
BODY_HU, BODY_FRACTION = (-200.0, 2000.0), 0.01  # at least 1 % soft tissue or bone


class Messages:
    """Warnings and notes on stderr, one line each; warnings are counted for the summary."""

    def __init__(self) -> None:
        self.warnings = 0

    def warn(self, text: str) -> None:
        tqdm.write(f"warning: {text}", file=sys.stderr)
        self.warnings += 1

    @staticmethod
    def note(text: str) -> None:
        tqdm.write(f"note: {text}", file=sys.stderr)


def progress(items: list, description: str) -> tqdm:
    """A progress bar on a terminal, for more than one case; nothing in logs or pipes."""
    return tqdm(items, desc=description, disable=len(items) < 2 or not sys.stderr.isatty())


@dataclass(frozen=True)
class InputCase:
    """One case to segment: its output name, its file or DICOM folder, and the series UID to read."""

    name: str
    path: Path
    series: str | None = None


def slug(prompt: str) -> str:
    """The file name of a prompt's mask (without .nii.gz); ValueError when nothing is left."""
    name = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    if not name:
        raise ValueError(f"--prompt {prompt!r} has no letter or digit to name its mask file")
    return name


def check_prompts(prompts: list[str], label_map: bool) -> None:
    """Every prompt non-empty and with a mask file name of its own."""
    if any(not p.strip() for p in prompts):
        raise ValueError("--prompt must not be empty")
    seen: dict[str, str] = {}
    for prompt in prompts:
        name = slug(prompt)
        if name in seen:
            raise ValueError(f"--prompt {seen[name]!r} and --prompt {prompt!r} would both be written to {name}.nii.gz")
        if label_map and name == "labels":
            raise ValueError(f"--prompt {prompt!r} would be written to labels.nii.gz, the --label-map file")
        seen[name] = prompt


def find_cases(path: Path, series: str | None, messages: Messages) -> list[InputCase]:
    """The cases under ``path``: one file, one DICOM folder, or a folder of files and DICOM folders."""
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_file():
        if series:
            raise ValueError(f"--series applies to DICOM folders; input {path} is a file")
        return [InputCase(case_name(path), path)]
    own = _dicom_case(path, series, messages)
    if own is not None:
        return [own]
    files = [] if series else [f for f in sorted(path.iterdir()) if f.is_file() and f.name.endswith(IMAGE_SUFFIXES)]
    cases = [InputCase(case_name(f), f) for f in files]
    cases += [c for d in sorted(path.iterdir()) if d.is_dir() and (c := _dicom_case(d, series, messages))]
    if not cases:
        what = f"DICOM series {series}" if series else ".nii/.nii.gz/.nrrd/.mha file or DICOM series"
        raise FileNotFoundError(f"input {path} holds no {what}")
    _check_unique_names(cases)
    return cases


def _dicom_case(folder: Path, series: str | None, messages: Messages) -> InputCase | None:
    """The folder's DICOM series as a case (``series``, or the one with the most slices), if any."""
    if not any(
        f.is_file() and not f.name.startswith(".") and not f.name.endswith(IMAGE_SUFFIXES) for f in folder.iterdir()
    ):
        return None
    found = dicom_series(folder)
    name = folder.resolve().name
    if series:
        return InputCase(name, folder, series) if series in found else None
    if not found:
        return None
    chosen = max(sorted(found), key=found.__getitem__)
    if len(found) > 1:
        listing = ", ".join(f"{uid} ({count} slices)" for uid, count in sorted(found.items()))
        messages.note(
            f"{folder} holds {len(found)} DICOM series: {listing}; using {chosen}, the one with the most slices "
            "(choose with --series UID)"
        )
    return InputCase(name, folder, chosen)


def _check_unique_names(cases: list[InputCase]) -> None:
    first: dict[str, Path] = {}
    for case in cases:
        if case.name in first:
            raise ValueError(f"inputs {first[case.name]} and {case.path} would both be written to case {case.name}")
        first[case.name] = case.path


def case_name(path: Path) -> str:
    """The file name without its image suffix and without an nnU-Net ``_0000`` channel suffix."""
    name = path.stem
    for suffix in IMAGE_SUFFIXES:
        if path.name.endswith(suffix):
            name = path.name[: -len(suffix)]
            break
    return name.removesuffix(CHANNEL_SUFFIX) or name


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


def prompt_embeddings(model: LoadedModel, prompts: list[str], messages: Messages) -> torch.Tensor:
    """Stored embeddings, or the checkpoint's text encoder for new prompts (warning when far)."""
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
                messages.warn(f"prompt {prompt!r} is far from every training prompt (cosine {similarity:.2f})")
            model.prompt_embeddings[prompt] = vector
    return torch.stack([model.prompt_embeddings[p] for p in prompts])


def segment_case(
    model: LoadedModel, image: tio.ScalarImage, embeddings: torch.Tensor, args: argparse.Namespace
) -> np.ndarray:
    """Binary masks (P, ...) on the input grid; on GPU out-of-memory, retried with one window a batch."""
    preprocessing = Preprocessing(**model.preprocessing)
    spacing = preprocessing.closest_spacing(tuple(float(s) for s in image.spacing))
    prepared = preprocessing.prepare(tio.Subject(image=image), spacing)["image"]
    device = torch.device(args.device)
    model.network.to(device)

    def predict(sw_batch_size: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return predict_volume(
                model.network,
                prepared.data[None].to(device),
                embeddings.to(device),
                args.roi,
                args.overlap,
                sw_batch_size,
                sw_device=device,
                device=torch.device("cpu"),
            )

    try:
        probabilities = predict(args.sw_batch_size)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        print(f"GPU out of memory: retrying with 1 window a batch (was {args.sw_batch_size})", file=sys.stderr)
        probabilities = predict(1)
    masks = (Preprocessing.restore(probabilities.cpu(), prepared.affine, image) > 0.5).numpy()
    if args.largest_component:
        masks = np.stack([largest_component(m) for m in masks])
    return masks


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component (clean-up for organs)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count < 2:
        return mask
    sizes = ndimage.sum_labels(mask, labels, range(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def output_files(folder: Path, prompts: list[str], args: argparse.Namespace) -> list[Path]:
    """Every file a case's run writes: one mask per prompt, the label map and legend, the preview."""
    files = [folder / f"{slug(p)}.nii.gz" for p in prompts]
    if args.label_map:
        files += [folder / "labels.nii.gz", folder / "labels.json"]
    if args.preview:
        files.append(folder / "preview.png")
    return files


def _nifti_writer(array: np.ndarray, affine: np.ndarray) -> Callable[[Path], None]:
    return lambda path: nib.save(nib.Nifti1Image(array, affine), path)


def case_writers(
    masks: np.ndarray, prompts: list[str], image: tio.ScalarImage, args: argparse.Namespace
) -> list[Callable[[Path], None]]:
    """Writers in the order of :func:`output_files`."""
    writers = [_nifti_writer(mask.astype(np.uint8), image.affine) for mask in masks]
    labels = label_map(masks) if args.label_map or args.preview else None  # later prompts overwrite earlier ones
    if args.label_map:
        legend = json.dumps({prompt: value for value, prompt in enumerate(prompts, start=1)}, indent=2)
        writers += [_nifti_writer(labels, image.affine), lambda path: path.write_text(legend)]
    if args.preview:
        writers.append(lambda path: save_preview(path, image.data[0].numpy(), labels))
    return writers


def write_outputs(
    folder: Path, masks: np.ndarray, prompts: list[str], image: tio.ScalarImage, args: argparse.Namespace
) -> None:
    """Write a case's files all or none: on failure nothing of the case is left, folders made included."""
    with staged(output_files(folder, prompts, args)) as temporaries:
        for temporary, write in zip(temporaries, case_writers(masks, prompts, image, args)):
            write(temporary)


def plan_outputs(cases: list[InputCase], args: argparse.Namespace) -> tuple[list[InputCase], list[InputCase]]:
    """(cases to run, cases skipped because all their outputs exist); existing outputs need a flag."""
    check_writable(args.output, "--output")
    todo, skipped = [], []
    for case in cases:
        files = output_files(args.output / case.name, args.prompt, args)
        blocking = [p for p in (args.output, args.output / case.name) if p.exists() and not p.is_dir()]
        blocking += [f for f in files if f.is_dir()]
        if blocking:
            raise ValueError(
                f"--output: {blocking[0]} is in the way ({'a folder' if blocking[0].is_dir() else 'a file'})"
            )
        present = [f for f in files if f.exists()]
        if args.skip_existing and len(present) == len(files):
            skipped.append(case)
            continue
        if present and not args.overwrite:
            raise FileExistsError(
                f"{present[0]} exists; pass --overwrite to replace outputs or --skip-existing to skip finished cases"
            )
        todo.append(case)
    return todo, skipped


def check_inputs(cases: list[InputCase], messages: Messages) -> dict[str, tio.ScalarImage]:
    """Read every case once before any output (bad input fails here, by file); warn where it does not
    look like CT. Only a lone case's image is kept, so a folder run holds one volume at a time."""
    kept = {}
    for case in progress(cases, "checking inputs"):
        image = read_image(case.path, case.series)
        problems = ct_problems(image.data[0].numpy())
        if problems:
            messages.warn(f"{case.path}: does not look like CT ({'; '.join(problems)})")
        if len(cases) == 1:
            kept[case.name] = image
    return kept


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="Lightning checkpoint or trimmed export")
    parser.add_argument("--input", type=Path, required=True, help="image file, DICOM series folder, or folder of cases")
    parser.add_argument("--prompt", action="append", required=True, help="what to segment (repeatable)")
    parser.add_argument("--output", type=Path, required=True, help="output folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    parser.add_argument(
        "--roi", type=int, default=None, help="sliding-window edge; default the validation window of training"
    )
    parser.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward pass")
    parser.add_argument("--largest-component", action="store_true", help="keep each mask's largest connected component")
    parser.add_argument("--label-map", action="store_true", help="also write labels.nii.gz with a labels.json legend")
    parser.add_argument("--preview", action="store_true", help="also write preview.png (axial, coronal, sagittal)")
    parser.add_argument("--series", help="DICOM series instance UID to read where a folder holds several")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--skip-existing", action="store_true", help="skip cases whose every output exists (resume a folder run)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, messages: Messages) -> str:
    """Segment every case; return the summary line."""
    started = time.monotonic()
    if not 0.0 <= args.overlap < 1.0:
        raise ValueError(f"--overlap must lie in [0, 1), got {args.overlap}")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"--device {args.device} is not available ({error})") from None
    check_prompts(args.prompt, args.label_map)
    cases, skipped = plan_outputs(find_cases(args.input, args.series, messages), args)
    model = load_model(args.checkpoint)
    args.roi = args.roi or model.sw_roi
    embeddings = prompt_embeddings(model, args.prompt, messages)
    images = check_inputs(cases, messages)
    for done, case in enumerate(progress(cases, "cases")):
        image = images.pop(case.name) if case.name in images else read_image(case.path, case.series)
        masks = segment_case(model, image, embeddings, args)
        try:
            write_outputs(args.output / case.name, masks, args.prompt, image, args)
        except OSError as error:
            raise OSError(write_failure(args.output, case, done, error)) from None
    seconds = time.monotonic() - started
    skip_note = f", {len(skipped)} skipped (outputs exist)" if skipped else ""
    return (
        f"done: {len(cases)} case(s){skip_note}, {len(args.prompt)} prompt(s), {seconds:.1f} s, "
        f"{messages.warnings} warning(s); output in {args.output}"
    )


def write_failure(output: Path, case: InputCase, done: int, error: OSError) -> str:
    """One line on a failed write: which case, why, and what is left."""
    left = f"; the {done} case(s) before it are complete (resume with --skip-existing)" if done else ""
    return f"cannot write case {case.name} to {output / case.name} ({error.strerror or error}); nothing of it was kept{left}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    messages = Messages()
    try:
        summary = run(args, messages)
    except (CheckpointError, BadCaseError, ValueError, OSError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
