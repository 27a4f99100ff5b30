"""Save the resolved LightningCLI config beside the run and send it to every logger (W&B, CSV)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback


class SaveAndLogConfig(SaveConfigCallback):
    """LightningCLI's config file in the run folder, and the same config as logger hyper-parameters."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})
