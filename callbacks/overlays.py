"""Segmentation overlays of the first validation volume, saved as PNG and logged at each validation."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from inference.preview import save_preview


class SegmentationOverlays(L.Callback):
    """Plots ``module.overlay_sample`` (image, label map, prompts) at each validation, then drops it."""

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        sample = getattr(module, "overlay_sample", None)
        if trainer.sanity_checking or sample is None or not trainer.is_global_zero:
            return
        image, labels, prompts = sample
        module.overlay_sample = None
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "overlays"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch{trainer.current_epoch:04d}.png"
        save_preview(path, image, labels, window=(0.0, 1.0))  # the image is windowed to [0, 1]
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(
                    key="overlays", images=[str(path)], caption=[", ".join(prompts)], step=trainer.global_step
                )
