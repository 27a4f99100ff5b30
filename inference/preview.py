"""PNG overlays of labels on a CT volume: the middle slice along each axis."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def label_map(masks: np.ndarray) -> np.ndarray:
    """Integer labels 1..P from P binary masks (P, ...); later masks overwrite earlier ones."""
    labels = np.zeros(masks.shape[1:], np.uint8)
    for value, mask in enumerate(masks, start=1):
        labels[mask.astype(bool)] = value
    return labels


def save_preview(
    path: Path, image: np.ndarray, labels: np.ndarray, window: tuple[float, float] = (-900.0, 900.0)
) -> None:
    """PNG of the middle slice along each axis with the labels overlaid; ``window`` is the grey range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 4))
    for axis, ax in enumerate(axes):
        index = image.shape[axis] // 2
        ax.imshow(
            np.take(image, index, axis=axis).T,
            cmap="gray",
            vmin=window[0],
            vmax=window[1],
            origin="lower",
            aspect="auto",
        )
        overlay = np.ma.masked_equal(np.take(labels, index, axis=axis).T, 0)
        ax.imshow(overlay, cmap="tab20", alpha=0.5, origin="lower", aspect="auto", interpolation="nearest")
        ax.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
