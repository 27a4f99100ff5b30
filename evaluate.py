"""Evaluate predicted masks against a data set like the paper's tables.

    python evaluate.py --pred outputs/segment --gt data/phantoms/Dataset002_PhantomThorax --output outputs/eval
    python evaluate.py ... --compare outputs/eval_baseline/per_case.csv --name ours --other-name baseline

Writes ``per_case.csv`` (case, task, Dice, clDice, Tsens, Tprec), ``table.md`` (mean and standard
deviation per task, in percent, the paper's layout) and ``boxplot.png``. With ``--compare`` the
table gains the other method's rows and a two-tailed paired t-test per task and metric over the
shared cases; as in the paper, ``*`` marks the other method where p < 0.05.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import stats

from datamodules.registry import load_registry
from metrics.segmentation import cl_dice, dice, topology_precision, topology_sensitivity
from segment import slug

METRICS = {"Dice": dice, "clDice": cl_dice, "Tsens": topology_sensitivity, "Tprec": topology_precision}


def read_mask(path: Path) -> np.ndarray:
    try:
        image = nib.load(path)
        array = np.asanyarray(image.dataobj)
    except Exception as error:
        raise ValueError(f"{path}: cannot be read ({error})") from None
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D mask, got {array.ndim}D")
    return array


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
    return {name: (int(v),) for name, v in meta["labels"].items() if name != "background"}


def evaluate(pred: Path, gt: Path, registry: Path | None = None) -> list[dict]:
    """One row per (case, task): every metric in [0, 1]."""
    meta_path = gt / "dataset.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist: --gt must be an nnU-Net data set folder")
    meta = json.loads(meta_path.read_text())
    ending = meta.get("file_ending", ".nii.gz")
    labels = task_labels(gt, meta, registry)
    rows = []
    for label_path in sorted((gt / "labelsTr").glob(f"*{ending}")):
        case_id = label_path.name[: -len(ending)]
        folder = prediction_folder(pred, case_id)
        if folder is None:
            continue
        truth_map = read_mask(label_path)
        for task, value in labels.items():
            mask_path = folder / f"{slug(task)}.nii.gz"
            if not mask_path.is_file():
                continue
            prediction = read_mask(mask_path).astype(bool)
            if prediction.shape != truth_map.shape:
                raise ValueError(f"{mask_path}: shape {prediction.shape} differs from {label_path} {truth_map.shape}")
            truth = np.isin(truth_map, value)
            rows.append({"case": case_id, "task": task} | {m: f(prediction, truth) for m, f in METRICS.items()})
    if not rows:
        raise ValueError(f"no predicted mask in {pred} matches a case and label of {gt}")
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "task", *METRICS])
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with path.open() as handle:
        return [{k: (float(v) if k in METRICS else v) for k, v in row.items()} for row in csv.DictReader(handle)]


def paired_p_values(ours: list[dict], other: list[dict]) -> dict[tuple[str, str], float]:
    """Two-tailed paired t-test p-value per (task, metric) over the cases both methods have."""
    index = {(r["case"], r["task"]): r for r in other}
    p_values = {}
    for task in sorted({r["task"] for r in ours}):
        pairs = [(r, index[(r["case"], task)]) for r in ours if r["task"] == task and (r["case"], task) in index]
        for metric in METRICS:
            a = np.array([p[0][metric] for p in pairs])
            b = np.array([p[1][metric] for p in pairs])
            if len(pairs) > 1 and np.any(a != b):
                p_values[(task, metric)] = float(stats.ttest_rel(a, b).pvalue)
    return p_values


def markdown_table(
    methods: dict[str, list[dict]], p_values: dict[str, dict[tuple[str, str], float]] | None = None
) -> str:
    """Rows: metric x method; columns: tasks; cells: mean ± std in percent. ``p_values[method]``
    holds the p-values of that method against the first one, per (task, metric): ``*`` for p < 0.05."""
    tasks = sorted({r["task"] for rows in methods.values() for r in rows})
    lines = ["| Metric | Method | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for metric in METRICS:
        for name, rows in methods.items():
            cells = []
            for task in tasks:
                values = np.array([r[metric] for r in rows if r["task"] == task]) * 100
                star = "*" if (p_values or {}).get(name, {}).get((task, metric), 1.0) < 0.05 else ""
                cells.append(
                    f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}{star}"
                    if len(values)
                    else "-"
                )
            lines.append(f"| {metric} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def box_plot(methods: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for rows in methods.values() for r in rows})
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 0.4 * len(tasks) + 2), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes, METRICS):
        handles = []
        for offset, rows in enumerate(methods.values()):
            data = [[r[metric] for r in rows if r["task"] == t] or [np.nan] for t in tasks]
            positions = np.arange(len(tasks)) + offset * 0.35
            boxes = ax.boxplot(data, positions=positions, widths=0.3, vert=False, patch_artist=True)
            for box in boxes["boxes"]:
                box.set_facecolor(colours[offset % len(colours)])
            handles.append(boxes["boxes"][0])
        ax.set_yticks(np.arange(len(tasks)), tasks)
        ax.set_title(metric)
        ax.set_xlim(0, 1)
    axes[0].legend(handles, list(methods), fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=Path, required=True, help="segment.py output folder (CASE/PROMPT-SLUG.nii.gz)")
    parser.add_argument("--gt", type=Path, required=True, help="nnU-Net data set folder with dataset.json and labelsTr")
    parser.add_argument("--output", type=Path, required=True, help="folder for per_case.csv, table.md, boxplot.png")
    parser.add_argument("--registry", type=Path, help="data registry whose tasks define each prompt's labels")
    parser.add_argument("--compare", type=Path, help="another method's per_case.csv for paired t-tests")
    parser.add_argument("--name", default="ours", help="this method's name in the table")
    parser.add_argument("--other-name", default="other", help="the compared method's name")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if (args.output / "per_case.csv").exists() and not args.overwrite:
            raise FileExistsError(f"{args.output / 'per_case.csv'} exists; pass --overwrite to replace it")
        rows = evaluate(args.pred, args.gt, args.registry)
        methods = {args.name: rows}
        p_values = None
        if args.compare:
            methods[args.other_name] = read_csv(args.compare)
            p_values = {args.other_name: paired_p_values(rows, methods[args.other_name])}
        args.output.mkdir(parents=True, exist_ok=True)
        write_csv(rows, args.output / "per_case.csv")
        table = markdown_table(methods, p_values)
        (args.output / "table.md").write_text(table)
        box_plot(methods, args.output / "boxplot.png")
        print(table)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
