"""Routes as they are learned: a task-by-level heat map (PNG and JSON) at each validation, and a
running count of route changes during training."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np


def plot_routes(routes: dict[str, tuple[int, ...]], num_paths: int, path: Path) -> Path:
    """Write a heat map: one row per prompt, one column per level, cell = chosen sub-pathway."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = sorted(routes)
    table = np.array([routes[p] for p in prompts])
    figure, ax = plt.subplots(figsize=(1.2 * table.shape[1] + 3, 0.35 * len(prompts) + 1.2))
    ax.imshow(table, cmap="tab10", vmin=0, vmax=max(num_paths - 1, 1), aspect="auto")
    for (row, column), value in np.ndenumerate(table):
        ax.text(column, row, str(value), ha="center", va="center", fontsize=8)
    ax.set_yticks(range(len(prompts)), prompts)
    ax.set_xticks(range(table.shape[1]), [f"level {i + 1}" for i in range(table.shape[1])])
    ax.set_title("sub-pathway chosen per level")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


class RoutingHeatmap(L.Callback):
    """After each validation, plot the task prompts' routes into the run folder (``routing/``, PNG and
    JSON) and log the plot to W&B. After each training step, count the (task, level) choices that
    changed since the step before and log the running total as ``train/route_changes``: routes
    that never change were never learned, only drawn at initialisation."""

    def __init__(self) -> None:
        self.previous: dict[str, tuple[int, ...]] | None = None
        self.changes = 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not module.task_prompts:
            return
        routes = module.current_routes()
        if self.previous is not None:
            self.changes += sum(
                a != b for p in routes if p in self.previous for a, b in zip(routes[p], self.previous[p])
            )
        self.previous = routes
        module.log("train/route_changes", float(self.changes))

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not module.task_prompts or not trainer.is_global_zero:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "routing"
        routes = module.current_routes()
        path = plot_routes(routes, module.hparams.num_paths, folder / f"epoch{trainer.current_epoch:04d}.png")
        record = {"step": trainer.global_step, "route_changes": self.changes, "routes": routes}
        path.with_suffix(".json").write_text(json.dumps(record, indent=1))
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="routing", images=[str(path)], step=trainer.global_step)
