"""At the end of fit, export the best (or last) checkpoint trimmed to the training prompts."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from inference.checkpoints import load_model, save_trimmed
from networks.prompt_seg_net import count_parameters


class PruningExport(L.Callback):
    """Writes ``trimmed.pt`` (weights only) beside the checkpoints, holding the sub-pathways the
    given prompts route through.

    Args:
        prompts: prompts to keep; default all the prompts the model was trained on.
        filename: name of the exported file in the checkpoint folder.
    """

    def __init__(self, prompts: list[str] | None = None, filename: str = "trimmed.pt") -> None:
        self.prompts = prompts
        self.filename = filename
        self.exported: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        source = checkpoint.best_model_path or checkpoint.last_model_path if checkpoint else ""
        if not source or not trainer.is_global_zero:
            return
        model = load_model(source)
        prompts = self.prompts or module.task_prompts
        self.exported = Path(source).parent / self.filename
        trimmed = save_trimmed(model, prompts, self.exported)
        print(
            f"exported {self.exported}: {count_parameters(model.network) / 1e6:.2f} M -> "
            f"{count_parameters(trimmed) / 1e6:.2f} M parameters for {len(prompts)} prompts"
        )
