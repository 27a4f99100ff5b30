"""Segmentation overlays of the first validation volume, saved as PNG and logged at each validation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np

from inference.preview import save_preview


class SegmentationOverlays(L.Callback):
    """Plots ``module.overlay_sample`` (image, probabilities, prompts) as one label map per validation."""

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        sample = getattr(module, "overlay_sample", None)
        if trainer.sanity_checking or sample is None or not trainer.is_global_zero:
            return
        image, probabilities, prompts = sample
        labels = np.zeros(probabilities.shape[1:], np.uint8)
        for value, probability in enumerate(probabilities, start=1):
            labels[probability > 0.5] = value
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "overlays"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch{trainer.current_epoch:04d}.png"
        save_preview(path, (image * 1800.0 - 900.0), labels)  # windowed [0, 1] back to HU for display
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(
                    key="overlays", images=[str(path)], caption=[", ".join(prompts)], step=trainer.global_step
                )
