"""MONAI SwinUNETR trained from scratch on one task: the few-shot baseline of the paper's Table 3."""

from __future__ import annotations

import lightning as L
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import SwinUNETR

from lightning_modules.losses import dice_bce_loss


class SwinUNETRModule(L.LightningModule):
    """SwinUNETR with one output channel, trained on the first prompt of each sample.

    Args:
        feature_size: SwinUNETR feature size (paper scale: 48).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        sw_roi: sliding-window edge for whole-volume prediction.
    """

    def __init__(self, feature_size: int = 12, lr: float = 2e-4, weight_decay: float = 1e-5, sw_roi: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network = SwinUNETR(in_channels=1, out_channels=1, feature_size=feature_size)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        first = torch.zeros(len(batch["prompts"]), dtype=torch.bool)
        first[[batch["image_index"].tolist().index(i) for i in range(batch["image"].shape[0])]] = True
        loss = dice_bce_loss(self.network(batch["image"]), batch["masks"][first])
        self.log("train/loss", loss, batch_size=batch["image"].shape[0])
        return loss

    @torch.no_grad()
    def predict_volume(self, image: torch.Tensor, overlap: float = 0.25) -> torch.Tensor:
        self.eval()
        roi = (self.hparams.sw_roi,) * 3
        return torch.sigmoid(sliding_window_inference(image, roi, 2, self.network, overlap, mode="gaussian"))[0]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
