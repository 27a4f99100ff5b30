"""Segment new CT volumes with a trained (or trimmed) checkpoint, one mask per prompt.

    python segment.py --checkpoint CKPT --input PATH --prompt liver --prompt "renal artery" --output DIR

Input: a .nii/.nii.gz/.nrrd/.mha file, a DICOM series folder (found by content, any file names), or
a folder of such cases. Output: ``DIR/CASE/PROMPT-SLUG.nii.gz`` (uint8 0/1) on exactly the input's
grid; CASE drops an nnU-Net ``_0000`` channel suffix. ``--format dicom-seg`` writes
``DIR/CASE/segmentation.dcm`` (DICOM input only), ``--save-probabilities`` ``PROMPT-SLUG.prob.nii.gz``,
``--statistics`` ``statistics.csv`` per case and ``DIR/statistics.csv`` for a folder of cases.
Each mask thresholds the mean probability of ``--grid-shifts`` (default 8) predictions on grids shifted
by half a voxel from one another, brought back onto the input's grid.
Prompts, inputs and the output folder are all checked before inference; the files of a case are
written under temporary names and renamed together once all are written, so a failed or interrupted
run leaves no partial case. The work is done by :class:`inference.api.Segmenter`.
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
from tqdm import tqdm

from datamodules.files import atomic_write, check_writable, staged
from datamodules.registry import IMAGE_SUFFIXES
from datamodules.volumes import BadCaseError, dicom_series, read_image
from inference import dicom_seg, statistics
from inference.api import NAME, VERSION, Segmenter, check_prompt_list, check_settings, ct_problems
from inference.checkpoints import CheckpointError
from inference.preview import label_map, save_preview

CHANNEL_SUFFIX = "_0000"  # nnU-Net's first (CT) channel
FORMATS = ("nifti", "dicom-seg")


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
    """Every prompt non-empty, given once (``check_prompt_list``) and with a mask file name of its own."""
    check_prompt_list(prompts)
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


def check_formats(cases: list[InputCase], formats: list[str]) -> None:
    """``--format dicom-seg`` needs every case to be a DICOM series (its source images)."""
    other = next((c for c in cases if c.series is None), None) if "dicom-seg" in formats else None
    if other is not None:
        raise ValueError(f"--format dicom-seg needs DICOM series input; {other.path} is not a DICOM series folder")


def is_folder_run(cases: list[InputCase], args: argparse.Namespace) -> bool:
    """Whether ``--input`` is a folder of cases (not one file or one DICOM series)."""
    return args.input.is_dir() and not (len(cases) == 1 and cases[0].path == args.input)


def segment_case(segmenter: Segmenter, image: tio.ScalarImage, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A case's inference: masks (P, ...) bool and probabilities (P, ...) float16 on the input grid."""
    return segmenter.predict_arrays(image, prompts)


def output_files(folder: Path, prompts: list[str], args: argparse.Namespace) -> list[Path]:
    """Every file a case's run writes: masks, probabilities, DICOM-SEG, statistics, label map and legend,
    preview."""
    files = [folder / f"{slug(p)}.nii.gz" for p in prompts] if "nifti" in args.format else []
    if args.save_probabilities:
        files += [folder / f"{slug(p)}.prob.nii.gz" for p in prompts]
    if "dicom-seg" in args.format:
        files.append(folder / "segmentation.dcm")
    if args.statistics:
        files.append(folder / "statistics.csv")
    if args.label_map:
        files += [folder / "labels.nii.gz", folder / "labels.json"]
    if args.preview:
        files.append(folder / "preview.png")
    return files


def _nifti_writer(array: np.ndarray, affine: np.ndarray) -> Callable[[Path], None]:
    return lambda path: nib.save(nib.Nifti1Image(array, affine), path)


def case_writers(
    case: InputCase,
    masks: np.ndarray,
    probabilities: np.ndarray,
    image: tio.ScalarImage,
    args: argparse.Namespace,
) -> list[Callable[[Path], None]]:
    """Writers in the order of :func:`output_files`; the DICOM-SEG object and statistics are made first."""
    prompts = args.prompt
    writers = [_nifti_writer(m.astype(np.uint8), image.affine) for m in masks] if "nifti" in args.format else []
    if args.save_probabilities:  # float16 values; NIfTI has no 16-bit float type, so stored as float32
        writers += [_nifti_writer(q.astype(np.float32), image.affine) for q in probabilities]
    if "dicom-seg" in args.format:
        source = dicom_seg.read_source_series(case.path, case.series)
        seg = dicom_seg.segmentation(masks, image.affine, prompts, source, NAME, VERSION, args.checkpoint.name)
        writers.append(seg.save_as)
    if args.statistics:
        rows = statistics.case_statistics(prompts, masks, image.data[0].numpy(), image.affine)
        writers.append(lambda path: statistics.write_csv(path, rows))
    labels = label_map(masks) if args.label_map or args.preview else None  # later prompts overwrite earlier ones
    if args.label_map:
        legend = json.dumps({prompt: value for value, prompt in enumerate(prompts, start=1)}, indent=2)
        writers += [_nifti_writer(labels, image.affine), lambda path: path.write_text(legend)]
    if args.preview:
        writers.append(lambda path: save_preview(path, image.data[0].numpy(), labels))
    return writers


def write_outputs(
    case: InputCase, masks: np.ndarray, probabilities: np.ndarray, image: tio.ScalarImage, args: argparse.Namespace
) -> None:
    """Write a case's files all or none: on failure nothing of the case is left, folders made included."""
    folder = args.output / case.name
    writers = case_writers(case, masks, probabilities, image, args)
    with staged(output_files(folder, args.prompt, args)) as temporaries:
        for temporary, write in zip(temporaries, writers):
            write(temporary)


def plan_outputs(cases: list[InputCase], args: argparse.Namespace) -> tuple[list[InputCase], list[InputCase]]:
    """(cases to run, cases skipped because all their outputs exist); existing outputs need a flag."""
    check_writable(args.output, "--output")
    gathered = args.output / "statistics.csv"
    if args.statistics and is_folder_run(cases, args) and gathered.exists():
        if gathered.is_dir():
            raise ValueError(f"--output: {gathered} is in the way (a folder)")
        if not (args.overwrite or args.skip_existing):
            raise FileExistsError(f"{gathered} exists; pass --overwrite to replace outputs")
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


def check_inputs(cases: list[InputCase], messages: Messages, args: argparse.Namespace) -> dict[str, tio.ScalarImage]:
    """Read every case once before any output (bad input fails here, by file); warn where it does not
    look like CT; for DICOM-SEG, check each series' slice geometry. Only a lone case's image is kept,
    so a folder run holds one volume at a time."""
    kept = {}
    for case in progress(cases, "checking inputs"):
        image = read_image(case.path, case.series)
        problems = ct_problems(image.data[0].numpy())
        if problems:
            messages.warn(f"{case.path}: does not look like CT ({'; '.join(problems)})")
        if "dicom-seg" in args.format:
            dicom_seg.read_source_series(case.path, case.series)
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
    parser.add_argument(
        "--grid-shifts",
        type=int,
        default=8,
        help="average 1, 2, 4 or 8 predictions on grids shifted by half a voxel (default 8; each costs one prediction)",
    )
    parser.add_argument(
        "--format",
        nargs="+",
        choices=FORMATS,
        default=["nifti"],
        help="mask output: nifti (PROMPT.nii.gz), dicom-seg (segmentation.dcm, DICOM input only), or both",
    )
    parser.add_argument(
        "--save-probabilities", action="store_true", help="also write PROMPT.prob.nii.gz (float16 values)"
    )
    parser.add_argument(
        "--statistics", action="store_true", help="also write statistics.csv (voxels, ml, HU, bounding box)"
    )
    parser.add_argument("--largest-component", action="store_true", help="keep each mask's largest connected component")
    parser.add_argument("--label-map", action="store_true", help="also write labels.nii.gz with a labels.json legend")
    parser.add_argument("--preview", action="store_true", help="also write preview.png (axial, coronal, sagittal)")
    parser.add_argument("--series", help="DICOM series instance UID to read where a folder holds several")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--skip-existing", action="store_true", help="skip cases whose every output exists (resume a folder run)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    args.format = list(dict.fromkeys(args.format))
    return args


def run(args: argparse.Namespace, messages: Messages) -> str:
    """Segment every case; return the summary line."""
    started = time.monotonic()
    check_settings(args.device, args.overlap, args.grid_shifts)
    check_prompts(args.prompt, args.label_map)
    found = find_cases(args.input, args.series, messages)
    check_formats(found, args.format)
    cases, skipped = plan_outputs(found, args)
    segmenter = Segmenter(
        args.checkpoint,
        args.device,
        overlap=args.overlap,
        roi=args.roi,
        sw_batch_size=args.sw_batch_size,
        largest_component=args.largest_component,
        grid_shifts=args.grid_shifts,
        progress=sys.stderr.isatty(),
        warn=messages.warn,
    )
    segmenter.embeddings(args.prompt)
    images = check_inputs(cases, messages, args)
    for done, case in enumerate(progress(cases, "cases")):
        image = images.pop(case.name) if case.name in images else read_image(case.path, case.series)
        masks, probabilities = segment_case(segmenter, image, args.prompt)
        try:
            write_outputs(case, masks, probabilities, image, args)
        except OSError as error:
            raise OSError(write_failure(args.output, case, done, error)) from None
    if args.statistics and is_folder_run(found, args):
        rows = statistics.gather({c.name: args.output / c.name / "statistics.csv" for c in found})
        columns = ("case", *statistics.COLUMNS)
        atomic_write(args.output / "statistics.csv", lambda path: statistics.write_csv(path, rows, columns))
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
