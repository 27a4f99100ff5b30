"""Turn the benchmark JSON lines of a results folder into summary.md and PNG plots.

python -m benchmarks.report RESULTS_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read(folder: Path, name: str) -> list[dict]:
    path = folder / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_inference(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4))
    lines = sorted({(r["size"], r["model"], r.get("compiled", False)) for r in rows if r["model"] != "SwinUNETR"})
    for size, model, compiled in lines:
        points = sorted(
            (r["prompts"], r["seconds"])
            for r in rows
            if (r["size"], r["model"], r.get("compiled", False)) == (size, model, compiled)
        )
        ax.plot(*zip(*points), marker="o", label=f"{model}{' compiled' if compiled else ''} {size}^3")
    for r in rows:
        if r["model"] == "SwinUNETR":
            ax.axhline(r["seconds"], linestyle="--", color="gray", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("prompts")
    ax.set_ylabel("seconds per volume")
    ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def goals(train: list[dict], inference: list[dict]) -> list[dict]:
    """Issue 16's targets against the latest matching records (inference: the largest size measured)."""
    rows: list[dict] = []

    def add(goal: str, compiled: bool, record: dict | None, key: str, target: str = "") -> None:
        if record is not None and key in record:
            rows.append({"goal": goal, "compiled": compiled, "value": record[key], "target": target})

    def last(records: list[dict], **match) -> dict | None:
        """The matching record of the largest size; of those, the latest (``max`` keeps the first)."""
        found = [r for r in records if all(r.get(k, False if k == "compiled" else None) == v for k, v in match.items())]
        return max(found, key=lambda r: r.get("size", 0), default=None)

    train, inference = train[::-1], inference[::-1]  # latest first
    for compiled in (False, True):
        ours = {"model": "ours", "prompts": "distinct", "compiled": compiled}
        add(
            "train step, 1 prompt/image / SwinUNETR",
            compiled,
            last(train, prompts_per_image=1, **ours),
            "ratio_time",
            "<= 1.0",
        )
        four = last(train, prompts_per_image=4, **ours)
        add("train step, 4 prompts/image / SwinUNETR at 1", compiled, four, "ratio_time", "<= 1.5")
        add("train step, 4 prompts/image, TFLOP/s", compiled, four, "tflops", ">= 10 % of peak")
        one = last(inference, model="ours", prompts=1, compiled=compiled)
        add(
            f"sliding window {one and one['size']}^3, 1 prompt / SwinUNETR",
            compiled,
            one,
            "ratio_to_swinunetr",
            "<= 1.0",
        )
        for count, target in ((10, "<= 2"), (100, "<= 10")):
            many = last(inference, model="ours", prompts=count, compiled=compiled)
            add(
                f"sliding window {many and many['size']}^3, {count} prompts / 1",
                compiled,
                many,
                "ratio_to_one_prompt",
                target,
            )
        trimmed = [r for r in inference if "trimmed_over_full" in r and r.get("compiled", False) == compiled]
        add(
            "trimmed / full, worst",
            compiled,
            max(trimmed, key=lambda r: r["trimmed_over_full"], default=None),
            "trimmed_over_full",
            "<= 1.0",
        )
    return rows


def main(folder: Path) -> None:
    sections = {
        "params": ["what", "ours_m", "paper_m", "relative_error"],
        "train_step": [
            "device",
            "model",
            "compiled",
            "prompts_per_image",
            "prompts",
            "tasks",
            "routes",
            "pairs",
            "seconds",
            "peak_gib",
            "gflop",
            "tflops",
            "ratio_time",
            "ratio_peak",
        ],
        "inference": [
            "device",
            "size",
            "model",
            "compiled",
            "prompts",
            "routes",
            "sw_batch_size",
            "seconds",
            "ratio_to_swinunetr",
            "ratio_to_one_prompt",
            "trimmed_over_full",
        ],
        "cpu_step": [
            "device",
            "format",
            "patch",
            "prompts",
            "step_s",
            "forward_s",
            "loss_s",
            "backward_s",
            "optimizer_s",
            "speedup_step",
        ],
        "dataloader": [
            "cache",
            "workers",
            "patch",
            "samples_per_second",
            "per_worker",
            "extrapolation",
            "node_samples_per_second",
            "gpu_need",
            "outruns_gpu",
        ],
        "validation_memory": [
            "device",
            "size",
            "prompts",
            "seconds",
            "validation_rss_gib",
            "bound_gib",
            "bound_without_held_chunks_gib",
            "cuda_peak_gib",
        ],
        "resume_smoke": [
            "device",
            "config",
            "steps",
            "seconds",
            "resumed_kept_the_routes_of_its_stop",
            "same_routes_as_uninterrupted",
            "max_weight_difference",
            "run_to_run_max_weight_difference",
        ],
    }
    parts = ["# Benchmark summary\n"]
    targets = goals(read(folder, "train_step"), read(folder, "inference"))
    if targets:
        parts += ["## goals (issue 16)\n", table(targets, ["goal", "compiled", "value", "target"]), ""]
    for name, keys in sections.items():
        rows = read(folder, name)
        if rows:
            parts += [f"## {name} ({rows[0].get('date', '')})\n", table(rows, keys), ""]
    inference = read(folder, "inference")
    if inference:
        plot_inference(inference, folder / "inference.png")
        parts.append("![inference](inference.png)\n")
    (folder / "summary.md").write_text("\n".join(parts))
    print((folder / "summary.md").read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
