"""The reference: MONAI DynUNet with one sigmoid output per task, trained like the prompt model."""

from __future__ import annotations

import torch

from lightning_modules.validation import VolumeValidation
from networks.reference_net import ReferenceNet


class ReferenceModule(VolumeValidation):
    """A standard multi-task U-Net on the same DataModule, loss, optimiser and validation as
    :class:`PromptSegModule` (``configs/reference.yaml``): one output channel per task of the
    registry; each (image, task) pair of a batch is supervised on its own channel, so a data set
    that labels only some tasks trains only those (partial labels).

    Args:
        filters: DynUNet channels from full resolution to 1/32.
        prompts: the tasks, in channel order; default every prompt of the data registry (sorted).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        input_offset: subtracted from the windowed image (see ``networks/prompt_seg_net.py``).
        input_windows: (level, width) in HU of extra input channels (``networks/intensity.py``).
        channels_last: convolution weights in channels-last 3D memory format (faster on CPU).
        cldice_weight: weight of the soft-clDice term on tubular tasks.
        focal_gamma: 0 for Dice + binary cross-entropy; above 0, the cross-entropy is the focal
            loss with this exponent (see ``lightning_modules/losses.py``).
        ce_top_fraction: cross-entropy over each pair's hardest fraction of voxels (1: all; nnU-Net's
            TopK loss uses 0.1), which keeps small structures from collapsing to background.
        ce_balance: raises a present pair's foreground share of its cross-entropy from its voxel
            fraction ``f`` (0, the voxel mean) to one half (1, class-balanced), ``f**(1-b)``-weighted
            between (see ``lightning_modules/losses.py``).
        deep_supervision: coarser decoder levels supervised too (nnU-Net: all but the two
            coarsest), each level's loss weighted half the one above it; 0: the final output only.
        sw_roi: sliding-window edge (voxels) for validation.
        sw_overlap: sliding-window overlap.
        sw_batch_size: windows per forward pass.
    """

    def __init__(
        self,
        filters: tuple[int, ...] = (32, 64, 128, 256, 320, 320),
        prompts: list[str] | None = None,
        lr: float = 2e-4,
        weight_decay: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        input_offset: float = 0.5,
        input_windows: tuple[tuple[float, float], ...] = (),
        channels_last: bool = True,
        cldice_weight: float = 0.5,
        focal_gamma: float = 0.0,
        ce_top_fraction: float = 1.0,
        ce_balance: float = 0.0,
        deep_supervision: int = 0,
        sw_roi: int = 96,
        sw_overlap: float = 0.25,
        sw_batch_size: int = 2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.prompts: list[str] = list(prompts or [])
        self.network: ReferenceNet | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.prompts = self.prompts or sorted(self.tubular)

    def configure_model(self) -> None:
        if self.network is None:
            if not self.prompts:
                raise ValueError("the reference model needs its prompts: give model.prompts or a data registry")
            self.network = ReferenceNet(
                len(self.prompts),
                self.hparams.filters,
                input_offset=self.hparams.input_offset,
                channels_last=self.hparams.channels_last,
                deep_supervision=self.hparams.deep_supervision,
                input_windows=self.hparams.input_windows,
            )
            self.adopt_data_window()

    @property
    def prompt_embeddings(self) -> dict[str, torch.Tensor]:
        """One-hot rows selecting each prompt's output channel."""
        return {p: row for p, row in zip(self.prompts, torch.eye(len(self.prompts)))}

    def embed(self, prompts: list[str]) -> torch.Tensor:
        unknown = sorted(set(prompts) - set(self.prompts))
        if unknown:
            raise ValueError(f"the reference model was not trained on {unknown}")
        table = self.prompt_embeddings
        return torch.stack([table[p] for p in prompts]).to(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        output = self.network(batch["image"], self.embed(batch["prompts"]), batch["image_index"])
        losses = self.supervised_losses(output.logits, batch)
        loss = losses["loss"]
        if output.deep_logits:
            loss = losses["deep_supervised"] = self.deep_supervised_loss(loss, output.deep_logits, batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=len(batch["prompts"]), prog_bar=name == "loss")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.network.parameters(),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["architecture"] = "reference"
        checkpoint["task_prompts"] = list(self.prompts)
        checkpoint["prompt_embeddings"] = self.prompt_embeddings
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.prompts = list(checkpoint["task_prompts"])
        self.tubular.update(checkpoint.get("tubular", {}))
        self.configure_model()
