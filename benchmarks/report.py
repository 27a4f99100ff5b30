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
    for size, model in sorted({(r["size"], r["model"]) for r in rows if r["model"] != "SwinUNETR"}):
        points = sorted((r["prompts"], r["seconds"]) for r in rows if r["size"] == size and r["model"] == model)
        ax.plot(*zip(*points), marker="o", label=f"{model} {size}^3")
    for r in rows:
        if r["model"] == "SwinUNETR":
            ax.axhline(r["seconds"], linestyle="--", color="gray", linewidth=0.8)
    ax.set_xlabel("prompts")
    ax.set_ylabel("seconds per volume")
    ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(folder: Path) -> None:
    sections = {
        "params": ["what", "ours_m", "paper_m", "relative_error"],
        "train_step": ["device", "model", "tasks", "patch", "batch", "seconds", "peak_gib", "ratio_time", "ratio_peak"],
        "inference": ["device", "size", "model", "prompts", "seconds", "ratio_to_swinunetr"],
        "dataloader": ["cache", "workers", "patch", "samples_per_second"],
    }
    parts = ["# Benchmark summary\n"]
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
