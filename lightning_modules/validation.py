"""Whole-volume validation shared by every model trained here: the same scores, the same logs."""

from __future__ import annotations

from collections import defaultdict

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from inference.preview import label_map
from inference.sliding_window import predict_volume
from lightning_modules.losses import segmentation_loss
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
    """Sliding-window validation of whole preprocessed volumes, every task of each case, and what
    every model trained here takes from its DataModule: the tasks' tubular flags at ``setup`` and the
    preprocessing stored in each checkpoint.

    Subclasses provide ``network`` (called as ``network(image, prompt_embedding, image_index)``),
    ``embed(prompts)`` and the hyper-parameters ``sw_roi``, ``sw_overlap`` and ``sw_batch_size``.
    Logged per prompt and as the mean over prompts: ``val/dice`` and ``val/cldice`` over the cases
    that hold the structure, ``val/fp_rate`` over the cases that do not. "Absent and predicted
    absent" is never a Dice of 1: a lesion that is never found scores 0 however often it is absent.
    """

    validation_prompt_chunk = 8  # prompts whose full-volume probabilities are held at once

    def __init__(self) -> None:
        super().__init__()
        self.validation_scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.overlay_sample: tuple | None = None  # first validation volume and its label map, for the overlays
        self.tubular: dict[str, bool] = {}
        self.skipped_steps = 0

    def embed(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def datamodule(self) -> L.LightningDataModule | None:
        return getattr(self.trainer, "datamodule", None) if self._trainer else None

    def setup(self, stage: str) -> None:
        if self.datamodule is not None:
            self.datamodule.setup(stage)
            self.tubular = {t.prompt: t.tubular for t in self.datamodule.tasks}
            self.adopt_data_window()

    def adopt_data_window(self) -> None:
        """Extra input windows (``networks/intensity.py``) are computed from the data's own window."""
        window_channels = getattr(getattr(self, "network", None), "window_channels", None)
        if window_channels is not None and self.datamodule is not None:
            window_channels.adopt(self.datamodule.preprocessing)

    def supervised_losses(self, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """The training loss terms and their sum ``loss`` (``losses.segmentation_loss``) with this
        module's ``cldice_weight``, ``focal_gamma``, ``ce_top_fraction`` and ``ce_balance``, and the
        batch's ``pair_weights`` where it has them."""
        hparams = self.hparams
        return segmentation_loss(
            logits.float(),  # sums over a patch's voxels in float32 also under bf16 autocast
            batch["masks"],
            batch["tubular"].bool(),
            hparams.cldice_weight,
            hparams.focal_gamma,
            hparams.ce_top_fraction,
            hparams.ce_balance,
            batch.get("pair_weights"),
        )

    def deep_supervised_loss(self, loss: torch.Tensor, deep_logits: list[torch.Tensor], batch: dict) -> torch.Tensor:
        """The final level's ``loss`` and each coarser level's, weighted 1, 1/2, 1/4, ... and normalised
        (nnU-Net's deep supervision; ``deep_logits`` finest first). Logits coarser than the masks are
        scored against the masks averaged down to their size (each voxel's foreground fraction)."""
        weights = [0.5**level for level in range(len(deep_logits) + 1)]
        deep = []
        for logits in deep_logits:
            masks = batch["masks"]
            if masks.shape[2:] != logits.shape[2:]:
                masks = F.adaptive_avg_pool3d(masks.float(), logits.shape[2:])
            deep.append(self.supervised_losses(logits, batch | {"masks": masks})["loss"])
        return sum(w * term for w, term in zip(weights, [loss, *deep])) / sum(weights)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip an update whose gradients are not all finite: bf16 training has no loss scaler to
        do it, and one NaN reaching AdamW would make every weight NaN. The gradients are dropped
        and the step counted (``train/skipped_steps``)."""
        gradients = [p.grad for p in self.parameters() if p.grad is not None]
        if gradients and not torch.stack([g.isfinite().all() for g in gradients]).all():
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tubular"] = dict(self.tubular)
        if self.datamodule is not None:
            checkpoint["preprocessing"] = self.datamodule.preprocessing.as_dict()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Predict ``validation_prompt_chunk`` prompts at a time, stitched on the CPU, and score
        each against its mask made from the label map just then. The batch may arrive on the
        accelerator (DDP's forward moves it there), so NumPy reads host copies."""
        image, labels = batch["image"].to(self.device), batch["labels"].cpu().numpy()
        chunk = self.validation_prompt_chunk
        for start in range(0, len(batch["prompts"]), chunk):
            prompts = batch["prompts"][start : start + chunk]
            probabilities = predict_volume(
                self.network,
                image,
                self.embed(prompts),
                self.hparams.sw_roi,
                self.hparams.sw_overlap,
                self.hparams.sw_batch_size,
                device=torch.device("cpu"),
            )
            if batch_idx == 0 and start == 0:  # the overlay's label map: one byte a voxel
                self.overlay_sample = (
                    batch["image"][0, 0].cpu().numpy(),
                    label_map(probabilities.numpy() > 0.5),
                    prompts,
                )
            self._score_chunk(probabilities > 0.5, labels, batch, start)
            del probabilities  # freed before the next chunk is predicted

    def _score_chunk(self, masks: torch.Tensor, labels: np.ndarray, batch: dict, start: int) -> None:
        """Score the predicted masks of tasks ``start, start + 1, ...`` against the label map."""
        for offset, mask in enumerate(masks):
            task = start + offset
            truth = np.isin(labels, batch["label_values"][task])
            scores = validation_scores(mask.numpy(), truth, bool(batch["tubular"][task]))
            for metric, value in scores.items():
                self.validation_scores[metric][batch["prompts"][task]].append(value)

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
