"""Evaluate predicted masks against a data set like the paper's tables.

    python evaluate.py --pred outputs/segment --gt data/phantoms/Dataset002_PhantomThorax --output outputs/eval
    python evaluate.py ... --compare outputs/eval_baseline/per_case.csv --name ours --other-name baseline

Every case of ``GT/labelsTr`` needs ``PRED/CASE[_0000]/PROMPT-SLUG.nii.gz`` for every task: missing
case folders or masks are an error naming all of them, unless ``--missing-as-empty`` scores them as
empty predictions (said in a warning line and a note in ``table.md``).

Geometry, in world space: a mask whose affine equals the label map's (origin and spacing within
1e-3 mm, direction cosines within 1e-4) is compared as stored; a mask on the same voxel grid stored
in another axis order or direction (a permutation or flip of axes only, e.g. LPS instead of RAS) is
reordered exactly onto the label map's grid (``nibabel.orientations``); any other difference (a
shift, another spacing, shape or rotation) is refused, never resampled.

Writes ``per_case.csv`` (case, task, present, Dice, clDice, Tsens, Tprec, HD95, NSD, pred_voxels,
pred_ml), ``table.md`` and ``boxplot.png``. Only cases whose ground truth holds the structure
(``present`` 1) enter the means: Dice, clDice, Tsens, Tprec and NSD (at ``--nsd-tolerance`` mm) in
percent, HD95 in mm (lower is better) over the cases with a non-empty prediction, the others counted
as "not found" (their HD95 is NaN, their NSD 0). Cases without the structure (``present`` 0, metrics
left empty) get a second table: per task their number, how many have a non-empty prediction (the
false-positive rate) and the mean predicted volume. With ``--compare`` the other method's
per_case.csv is matched on (case, task): both methods' means and the two-tailed paired t-tests use
the shared pairs only; as in the paper, ``*`` marks the other method where p < 0.05.

``--pool DIR`` pools the evaluations already written in ``DIR/*/per_case.csv`` (one per data set, as
``quickstart.sh`` writes them) into ``DIR/pooled.md``: per task its present cases over every data set
(a task labelled in two data sets, such as the liver, counts the cases of both), mean Dice and clDice,
the absent-structure false positives, and the mean Dice over the tasks.

    python evaluate.py --pool outputs/quickstart/eval
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from scipy import stats

from datamodules.registry import load_registry
from metrics.segmentation import cl_dice, dice, topology_precision, topology_sensitivity
from metrics.surface import hd95, surface_dice
from segment import slug

METRICS = {"Dice": dice, "clDice": cl_dice, "Tsens": topology_sensitivity, "Tprec": topology_precision}
SURFACE_METRICS = ("HD95", "NSD")
ALL_METRICS = (*METRICS, *SURFACE_METRICS)
COLUMNS = ("case", "task", "present", *ALL_METRICS, "pred_voxels", "pred_ml")
NUMERIC_COLUMNS = frozenset(COLUMNS) - {"case", "task"}
ORIGIN_TOLERANCE_MM = 1e-3
SPACING_TOLERANCE_MM = 1e-3
DIRECTION_TOLERANCE = 1e-4
ABSENT_TITLE = "Absent-structure cases (false positives)"
POOLED = "pooled.md"


@dataclass(frozen=True)
class Grid:
    """A volume's voxel grid, read from its header."""

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray


@dataclass
class Case:
    """A ground-truth case and its predicted mask per task (None where missing)."""

    case_id: str
    label_path: Path
    masks: dict[str, Path | None]


@dataclass
class Evaluation:
    rows: list[dict]
    missing: list[str] = field(default_factory=list)


def read_grid(path: Path) -> Grid:
    try:
        image = nib.load(path)
    except Exception as error:
        raise ValueError(f"{path}: cannot be read ({error})") from None
    if len(image.shape) != 3:
        raise ValueError(f"{path}: expected a 3D mask, got {len(image.shape)}D")
    return Grid(path, tuple(image.shape), np.asarray(image.affine, dtype=float))


def read_array(path: Path) -> np.ndarray:
    try:
        return np.asanyarray(nib.load(path).dataobj)
    except Exception as error:
        raise ValueError(f"{path}: cannot be read ({error})") from None


def grid_difference(affine: np.ndarray, shape: tuple, reference: np.ndarray, reference_shape: tuple) -> str | None:
    """What differs between two voxel grids beyond the tolerances, or None when they are the same."""
    if tuple(shape) != tuple(reference_shape):
        return f"shape {tuple(shape)} vs {tuple(reference_shape)}"
    spacing, reference_spacing = voxel_sizes(affine), voxel_sizes(reference)
    if not np.allclose(spacing, reference_spacing, rtol=0, atol=SPACING_TOLERANCE_MM):
        return f"spacing {np.round(spacing, 4).tolist()} vs {np.round(reference_spacing, 4).tolist()} mm"
    directions = affine[:3, :3] / np.maximum(spacing, 1e-12)
    reference_directions = reference[:3, :3] / np.maximum(reference_spacing, 1e-12)
    if not np.allclose(directions, reference_directions, rtol=0, atol=DIRECTION_TOLERANCE):
        return "axis directions differ beyond an axis permutation or flip"
    shift = float(np.linalg.norm(affine[:3, 3] - reference[:3, 3]))
    if shift > ORIGIN_TOLERANCE_MM:
        return f"origin {shift:.4g} mm away"
    return None


def reorientation(mask: Grid, truth: Grid) -> np.ndarray | None:
    """None when the mask lies on the label map's grid as stored; the nibabel orientation transform
    onto it when only the axis order or direction differs; otherwise an error."""
    if grid_difference(mask.affine, mask.shape, truth.affine, truth.shape) is None:
        return None
    transform = ornt_transform(io_orientation(mask.affine), io_orientation(truth.affine))
    shape = [0] * 3
    for axis, (target, _) in enumerate(transform):
        shape[int(target)] = mask.shape[axis]
    affine = mask.affine @ inv_ornt_aff(transform, mask.shape)
    difference = grid_difference(affine, tuple(shape), truth.affine, truth.shape)
    if difference is not None:
        raise ValueError(f"{mask.path}: geometry differs from {truth.path} ({difference})")
    return transform


def check_geometry(cases: list[Case]) -> dict[Path, np.ndarray | None]:
    """Every predicted mask's reorientation onto its label map, from the headers alone (fast)."""
    transforms = {}
    for case in cases:
        truth = read_grid(case.label_path)
        for path in filter(None, case.masks.values()):
            transforms[path] = reorientation(read_grid(path), truth)
    return transforms


def predicted_mask(path: Path | None, transform: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """The prediction on the label map's grid (empty where missing)."""
    if path is None:
        return np.zeros(shape, bool)
    array = read_array(path)
    return (array if transform is None else apply_orientation(array, transform)) != 0


def prediction_folder(pred: Path, case_id: str) -> Path | None:
    for name in (case_id, f"{case_id}_0000"):
        if (pred / name).is_dir():
            return pred / name
    return None


def task_labels(gt: Path, meta: dict, registry: Path | None) -> dict[str, tuple[int, ...]]:
    """Prompt -> label values: the registry's tasks for the data set in folder ``gt`` (label unions
    such as liver = liver + liver tumour), else one task per label of ``dataset.json``."""
    if registry is not None:
        for entry in load_registry(registry):
            if entry.path.name == gt.name:
                return {t.prompt: t.label_values for t in entry.tasks}
        raise ValueError(f"registry {registry} has no data set in a folder named {gt.name}")
    if not isinstance(meta.get("labels"), dict):
        raise ValueError(f"{gt / 'dataset.json'} has no 'labels' mapping")
    return {name: (int(v),) for name, v in meta["labels"].items() if name != "background"}


def read_dataset(gt: Path) -> tuple[dict, str]:
    """``dataset.json`` of the nnU-Net folder ``gt`` and its file ending."""
    meta_path = gt / "dataset.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist: --gt must be an nnU-Net data set folder")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_path}: not valid JSON ({error})") from None
    return meta, meta.get("file_ending", ".nii.gz")


def find_cases(pred: Path, gt: Path, ending: str, tasks: list[str]) -> tuple[list[Case], list[str]]:
    """Every labelled case with its mask path per task, and what is missing: ``CASE (no folder)`` or
    ``FOLDER/SLUG.nii.gz``."""
    if not pred.is_dir():
        raise FileNotFoundError(f"--pred {pred} is not a folder")
    label_paths = sorted((gt / "labelsTr").glob(f"*{ending}"))
    if not label_paths:
        raise FileNotFoundError(f"{gt / 'labelsTr'} holds no *{ending} label map")
    cases, missing = [], []
    for label_path in label_paths:
        case_id = label_path.name[: -len(ending)]
        folder = prediction_folder(pred, case_id)
        if folder is None:
            missing.append(f"{case_id} (no folder)")
            cases.append(Case(case_id, label_path, dict.fromkeys(tasks)))
            continue
        paths = {task: folder / f"{slug(task)}.nii.gz" for task in tasks}
        missing += [f"{folder.name}/{path.name}" for path in paths.values() if not path.is_file()]
        cases.append(Case(case_id, label_path, {t: p if p.is_file() else None for t, p in paths.items()}))
    return cases, missing


def score(prediction: np.ndarray, truth: np.ndarray, affine: np.ndarray, nsd_tolerance: float) -> dict:
    """Metrics of one (case, task); a structure absent from the ground truth gets NaN metrics."""
    spacing = voxel_sizes(affine)
    voxels = int(prediction.sum())
    row = {
        "present": int(truth.any()),
        "pred_voxels": voxels,
        "pred_ml": round(voxels * abs(np.linalg.det(affine[:3, :3])) / 1000, 6),
    }
    if not row["present"]:
        return row | dict.fromkeys(ALL_METRICS, math.nan)
    overlap = {m: f(prediction, truth) for m, f in METRICS.items()}
    surface = {"HD95": hd95(prediction, truth, spacing), "NSD": surface_dice(prediction, truth, spacing, nsd_tolerance)}
    return row | overlap | surface


def evaluate(
    pred: Path, gt: Path, registry: Path | None = None, missing_as_empty: bool = False, nsd_tolerance: float = 2.0
) -> Evaluation:
    """One row per (case, task) of the ground truth; see the module docstring."""
    meta, ending = read_dataset(gt)
    labels = task_labels(gt, meta, registry)
    cases, missing = find_cases(pred, gt, ending, list(labels))
    if all(path is None for case in cases for path in case.masks.values()):
        raise ValueError(f"--pred {pred} holds no predicted mask for a case and task of {gt}")
    if missing and not missing_as_empty:
        count = sum(path is None for case in cases for path in case.masks.values())
        raise ValueError(
            f"{pred}: {count} of {len(cases) * len(labels)} predicted masks missing: {', '.join(missing)}"
            " (pass --missing-as-empty to score them as empty predictions)"
        )
    transforms = check_geometry(cases)
    rows = []
    for case in cases:
        truth_map, affine = read_array(case.label_path), read_grid(case.label_path).affine
        for task, path in case.masks.items():
            truth = np.isin(truth_map, labels[task])
            prediction = predicted_mask(path, transforms.get(path), truth.shape)
            rows.append({"case": case.case_id, "task": task} | score(prediction, truth, affine, nsd_tolerance))
    return Evaluation(rows, missing)


def is_present(row: dict) -> bool:
    """Whether the ground truth holds the structure (rows without a ``present`` column: yes)."""
    return row.get("present", 1) != 0


def csv_value(row: dict, column: str) -> object:
    return "" if column in ALL_METRICS and not is_present(row) else row.get(column, "")


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: csv_value(r, c) for c in COLUMNS} for r in rows)


def parse_value(text: str | None, column: str, where: str) -> float:
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: {column} {text!r} is not a number") from None


def read_csv(path: Path) -> list[dict]:
    """A per_case.csv: ``case`` and ``task`` required, numbers parsed, empty cells NaN."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for column in ("case", "task"):
        if column not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no '{column}' column")
    return [
        {k: parse_value(v, k, f"{path}, line {line}") if k in NUMERIC_COLUMNS else v for k, v in row.items()}
        for line, row in enumerate(reader, start=2)
    ]


def shared_pairs(ours: list[dict], other: list[dict], other_path: Path) -> tuple[list[dict], list[dict]]:
    """Both methods' rows on the (case, task) pairs both have, in the same order; the other method's
    ``present`` comes from ours (the same ground truth)."""
    index = {(r["case"], r["task"]): r for r in other}
    ours_shared = [r for r in ours if (r["case"], r["task"]) in index]
    if not ours_shared:
        raise ValueError(f"{other_path}: no (case, task) pair in common with this evaluation")
    other_shared = [index[(r["case"], r["task"])] | {"present": r["present"]} for r in ours_shared]
    return ours_shared, other_shared


def paired_p_values(ours: list[dict], other: list[dict]) -> dict[tuple[str, str], float]:
    """Two-tailed paired t-test p-value per (task, metric) over the (case, task) pairs both methods
    have, whose structure is present and whose values are finite in both."""
    index = {(r["case"], r["task"]): r for r in other}
    p_values = {}
    for task in sorted({r["task"] for r in ours}):
        pairs = [(r, index[(r["case"], task)]) for r in ours if r["task"] == task and (r["case"], task) in index]
        pairs = [(a, b) for a, b in pairs if is_present(a)]
        for metric in ALL_METRICS:
            values = np.array([[a.get(metric, math.nan), b.get(metric, math.nan)] for a, b in pairs], float)
            values = values.reshape(-1, 2)[np.isfinite(values.reshape(-1, 2)).all(axis=1)]
            if len(values) > 1 and np.any(values[:, 0] != values[:, 1]):
                p_values[(task, metric)] = float(stats.ttest_rel(values[:, 0], values[:, 1]).pvalue)
    return p_values


def present_values(rows: list[dict], task: str, metric: str) -> np.ndarray:
    """The metric over the task's present cases, NaN where undefined (HD95 of a case not found)."""
    return np.array([r[metric] for r in rows if r["task"] == task and is_present(r) and metric in r], float)


def summary_cell(rows: list[dict], task: str, metric: str) -> str:
    """Mean ± std over the task's present cases (percent; HD95 in mm over the found ones)."""
    values = present_values(rows, task, metric)
    not_found = int(np.isnan(values).sum()) if metric == "HD95" else 0
    values = values[np.isfinite(values)] * (1 if metric == "HD95" else 100)
    text = f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}" if len(values) else "-"
    return text + (f" ({not_found} not found)" if not_found else "")


def markdown_table(
    methods: dict[str, list[dict]], p_values: dict[str, dict[tuple[str, str], float]] | None = None
) -> str:
    """Rows: metric x method, then the number of cases holding the structure; columns: tasks.
    ``p_values[method]`` holds the p-values of that method against the first one, per (task,
    metric): ``*`` for p < 0.05."""
    tasks = sorted({r["task"] for rows in methods.values() for r in rows})
    metrics = [m for m in ALL_METRICS if any(m in r for rows in methods.values() for r in rows)]
    lines = ["| Metric | Method | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for metric in metrics:
        for name, rows in methods.items():
            stars = ["*" if (p_values or {}).get(name, {}).get((t, metric), 1.0) < 0.05 else "" for t in tasks]
            cells = [summary_cell(rows, t, metric) + star for t, star in zip(tasks, stars)]
            lines.append(f"| {metric} | {name} | " + " | ".join(cells) + " |")
    for name, rows in methods.items():
        counts = [sum(r["task"] == t and is_present(r) for r in rows) for t in tasks]
        lines.append(f"| cases | {name} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines) + "\n"


def absent_cells(rows: list[dict]) -> str:
    """Count, non-empty predictions, false-positive rate and mean predicted ml of absent cases."""
    voxels = np.array([r.get("pred_voxels", math.nan) for r in rows], float)
    if not len(rows) or np.isnan(voxels).any():
        return f"{len(rows)} | - | - | -"
    positives = int((voxels > 0).sum())
    volume = float(np.mean([r.get("pred_ml", math.nan) for r in rows]))
    return f"{len(rows)} | {positives} | {100 * positives / len(rows):.1f} % | {volume:.2f}"


def absent_table(methods: dict[str, list[dict]]) -> str:
    """Per task with cases whose ground truth lacks the structure: how often each method predicts it."""
    tasks = sorted({r["task"] for rows in methods.values() for r in rows if not is_present(r)})
    if not tasks:
        return "No case lacks a structure.\n"
    lines = [
        "| Task | Method | GT-absent cases | predicted non-empty | false-positive rate | predicted ml (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for task in tasks:
        for name, rows in methods.items():
            absent = [r for r in rows if r["task"] == task and not is_present(r)]
            lines.append(f"| {task} | {name} | {absent_cells(absent)} |")
    return "\n".join(lines) + "\n"


def report(
    methods: dict[str, list[dict]],
    p_values: dict[str, dict[tuple[str, str], float]] | None,
    nsd_tolerance: float,
    missing: list[str],
) -> str:
    """table.md: the metrics of present structures, the absent-structure table, notes."""
    legend = (
        f"Cases whose ground truth holds the structure only. Dice, clDice, Tsens, Tprec and NSD (tolerance"
        f" {nsd_tolerance:g} mm): mean ± std in percent; HD95: mean ± std in mm, lower is better, over the"
        ' cases with a non-empty prediction (the others are "not found", their NSD 0).'
    )
    if p_values:
        legend += " `*`: p < 0.05, two-tailed paired t-test against the first method on the shared cases."
    text = markdown_table(methods, p_values) + "\n" + legend + f"\n\n### {ABSENT_TITLE}\n\n" + absent_table(methods)
    if missing:
        text += f"\nNote: missing predictions scored as empty masks (--missing-as-empty): {', '.join(missing)}\n"
    return text


def pooled_rows(folder: Path) -> list[dict]:
    """Every ``FOLDER/*/per_case.csv``'s rows, each case renamed ``SUBFOLDER/CASE`` so that data sets
    with the same case names stay apart."""
    paths = sorted(folder.glob("*/per_case.csv"))
    if not paths:
        raise FileNotFoundError(f"--pool {folder}: no */per_case.csv in it (run evaluate.py per data set first)")
    return [row | {"case": f"{path.parent.name}/{row['case']}"} for path in paths for row in read_csv(path)]


def pooled_report(rows: list[dict]) -> str:
    """pooled.md: per task over every data set, the present cases' Dice and clDice (mean ± std in
    percent), the absent cases' false positives; then the mean Dice over the tasks with present cases."""
    tasks = sorted({r["task"] for r in rows})
    lines = [
        "| Task | cases | Dice | clDice | GT-absent cases | predicted non-empty | false-positive rate | predicted ml (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    task_means = []
    for task in tasks:
        present = present_values(rows, task, "Dice")
        absent = [r for r in rows if r["task"] == task and not is_present(r)]
        cells = [str(len(present)), summary_cell(rows, task, "Dice"), summary_cell(rows, task, "clDice")]
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {absent_cells(absent)} |")
        if len(present):
            task_means.append(100 * float(np.mean(present)))
    mean = f"{np.mean(task_means):.2f}" if task_means else "-"
    return "\n".join(lines) + f"\n\nMean Dice over the {len(task_means)} tasks with present cases: {mean}\n"


def box_plot(methods: dict[str, list[dict]]) -> bytes:
    """PNG of per-task box plots of the present cases: 0..1 metrics side by side, HD95 on its own
    mm axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for rows in methods.values() for r in rows})
    metrics = [m for m in ALL_METRICS if any(m in r for rows in methods.values() for r in rows)]
    metrics.sort(key=lambda m: m == "HD95")  # the 0..1 axes side by side, the mm axis last
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 0.4 * len(tasks) + 2), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        handles = []
        for offset, rows in enumerate(methods.values()):
            data = [finite(r.get(metric, math.nan) for r in rows if r["task"] == t and is_present(r)) for t in tasks]
            positions = np.arange(len(tasks)) + offset * 0.35
            boxes = ax.boxplot(data, positions=positions, widths=0.3, orientation="horizontal", patch_artist=True)
            for box in boxes["boxes"]:
                box.set_facecolor(colours[offset % len(colours)])
            handles.append(boxes["boxes"][0])
        ax.set_yticks(np.arange(len(tasks)), tasks)
        ax.set_title("HD95 (mm, lower is better)" if metric == "HD95" else metric)
        if metric == "HD95":
            ax.set_xlim(left=0)
        else:
            ax.set_xlim(0, 1)
    np.atleast_1d(axes)[0].legend(handles, list(methods), fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def finite(values) -> list[float]:
    """The finite values, or one NaN (an empty box) when there are none."""
    kept = [float(v) for v in values if math.isfinite(float(v))]
    return kept or [math.nan]


class OneLineParser(argparse.ArgumentParser):
    """Argument errors become one ``error:`` line and exit code 2, like every other failure."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=Path, help="segment.py output folder (CASE/PROMPT-SLUG.nii.gz)")
    parser.add_argument("--gt", type=Path, help="nnU-Net data set folder with dataset.json and labelsTr")
    parser.add_argument("--output", type=Path, help="folder for per_case.csv, table.md, boxplot.png")
    parser.add_argument("--registry", type=Path, help="data registry whose tasks define each prompt's labels")
    parser.add_argument("--compare", type=Path, help="another method's per_case.csv for paired t-tests")
    parser.add_argument("--name", default="ours", help="this method's name in the table")
    parser.add_argument("--other-name", default="other", help="the compared method's name")
    parser.add_argument("--nsd-tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    parser.add_argument(
        "--missing-as-empty", action="store_true", help="score missing cases and masks as empty predictions"
    )
    parser.add_argument("--pool", type=Path, help="pool DIR/*/per_case.csv into DIR/pooled.md (no --pred/--gt)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    if args.pool:
        if args.pred or args.gt or args.output or args.compare:
            raise ValueError("--pool reads existing evaluations: give it without --pred, --gt, --output and --compare")
        if (args.pool / POOLED).exists() and not args.overwrite:
            raise FileExistsError(f"{args.pool / POOLED} exists; pass --overwrite to replace it")
        return
    missing = [f"--{name}" for name in ("pred", "gt", "output") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --pool DIR)")
    if not (math.isfinite(args.nsd_tolerance) and args.nsd_tolerance >= 0):
        raise ValueError(f"--nsd-tolerance must be a finite number of mm >= 0, got {args.nsd_tolerance}")
    if args.compare and args.name == args.other_name:
        raise ValueError(f"--name and --other-name are both {args.name!r}")
    if args.output.exists() and not args.output.is_dir():
        raise FileExistsError(f"--output {args.output} is a file")
    if (args.output / "per_case.csv").exists() and not args.overwrite:
        raise FileExistsError(f"{args.output / 'per_case.csv'} exists; pass --overwrite to replace it")


def write_outputs(folder: Path, rows: list[dict], table: str, plot: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(rows, folder / "per_case.csv")
    (folder / "table.md").write_text(table)
    (folder / "boxplot.png").write_bytes(plot)


def main(argv: list[str] | None = None) -> int:
    """Every check (arguments, files, geometry, the compared CSV) runs before the output folder is made."""
    try:
        args = parse_args(argv)
        check_arguments(args)
        if args.pool:
            table = pooled_report(pooled_rows(args.pool))
            (args.pool / POOLED).write_text(table)
            print(table)
            return 0
        other = read_csv(args.compare) if args.compare else None
        result = evaluate(args.pred, args.gt, args.registry, args.missing_as_empty, args.nsd_tolerance)
        methods, p_values, shared_note = {args.name: result.rows}, None, ""
        if other is not None:
            ours, theirs = shared_pairs(result.rows, other, args.compare)
            methods = {args.name: ours, args.other_name: theirs}
            p_values = {args.other_name: paired_p_values(ours, theirs)}
            shared_note = (
                f"compared with {args.other_name} on {len({r['case'] for r in ours})} shared cases"
                f" ({len(ours)} of {len(result.rows)} case-task pairs of ours, {len(theirs)} of {len(other)} of theirs)"
            )
        table = report(methods, p_values, args.nsd_tolerance, result.missing)
        plot = box_plot(methods)
        write_outputs(args.output, result.rows, table, plot)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result.missing:
        print(f"warning: missing predictions scored as empty masks: {', '.join(result.missing)}", file=sys.stderr)
    if shared_note:
        print(shared_note)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
