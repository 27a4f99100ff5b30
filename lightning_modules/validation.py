"""Whole-volume validation shared by every model trained here: the same scores, the same logs."""

from __future__ import annotations

from collections import defaultdict

import lightning as L
import numpy as np
import torch

from inference.sliding_window import predict_volume
from metrics.segmentation import cl_dice, dice


def validation_scores(prediction: np.ndarray, truth: np.ndarray, tubular: bool) -> dict[str, float]:
    """Dice (and clDice for tubes) where the structure is present; where it is absent, whether
    anything was predicted (``fp_rate``: 1 for a false positive, 0 for a correctly empty mask)."""
    if not truth.any():
        return {"fp_rate": float(prediction.any())}
    scores = {"dice": dice(prediction, truth)}
    if tubular:
        scores["cldice"] = cl_dice(prediction, truth)
    return scores


class VolumeValidation(L.LightningModule):
    """Sliding-window validation of whole preprocessed volumes, every task of each case.

    Subclasses provide ``network`` (called as ``network(image, prompt_embedding, image_index)``),
    ``embed(prompts)`` and the hyper-parameters ``sw_roi``, ``sw_overlap`` and ``sw_batch_size``.
    Logged per prompt and as the mean over prompts: ``val/dice`` and ``val/cldice`` over the cases
    that hold the structure, ``val/fp_rate`` over the cases that do not. "Absent and predicted
    absent" is never a Dice of 1: a lesion that is never found scores 0 however often it is absent.
    """

    def __init__(self) -> None:
        super().__init__()
        self.validation_scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.overlay_sample: tuple | None = None  # first validation volume, for the overlay callback

    def embed(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        probabilities = predict_volume(
            self.network,
            batch["image"].to(self.device),
            self.embed(batch["prompts"]),
            self.hparams.sw_roi,
            self.hparams.sw_overlap,
            self.hparams.sw_batch_size,
        )
        if batch_idx == 0:
            self.overlay_sample = (batch["image"][0, 0].cpu().numpy(), probabilities.cpu().numpy(), batch["prompts"])
        for prompt, probability, mask, tubular in zip(
            batch["prompts"], probabilities, batch["masks"], batch["tubular"]
        ):
            prediction, truth = (probability > 0.5).cpu().numpy(), mask[0].bool().cpu().numpy()
            for metric, value in validation_scores(prediction, truth, bool(tubular)).items():
                self.validation_scores[metric][prompt].append(value)

    def on_validation_epoch_end(self) -> None:
        """Log the means over every rank's cases: each rank validates some cases, every rank logs
        the same values, so the best checkpoint is chosen on all of them."""
        for metric, per_prompt in sorted(self.gathered_scores().items()):
            means = {p: float(np.mean(v)) for p, v in sorted(per_prompt.items())}
            for prompt, value in means.items():
                self.log(f"val/{metric}/{prompt}", value)
            self.log(f"val/mean_{metric}", float(np.mean(list(means.values()))), prog_bar=metric == "dice")
        self.validation_scores.clear()

    def gathered_scores(self) -> dict[str, dict[str, list[float]]]:
        """This epoch's scores of every rank (per metric, per prompt, one value per case)."""
        local = {metric: dict(per_prompt) for metric, per_prompt in self.validation_scores.items()}
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return local
        every_rank: list[dict] = [{} for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(every_rank, local)
        merged: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for scores in every_rank:
            for metric, per_prompt in scores.items():
                for prompt, values in per_prompt.items():
                    merged[metric][prompt] += values
        return merged
