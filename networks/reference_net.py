"""The reference network: MONAI's DynUNet (an nnU-Net-style U-Net) with one sigmoid output per task.

It is the standard way to train one model on many partially labelled tasks without prompts, and
the peer in every results table: it shows what the data allow on the same budget. It answers
only the prompts it was trained on; its "prompt embeddings" are one-hot rows that select an
output channel, so it plugs into the same sliding-window prediction, validation and
``segment.py`` as :class:`networks.prompt_seg_net.PromptSegNet`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet
from torch import nn

from networks.head import prior_bias
from networks.intensity import WindowChannels
from networks.precision import float32_on_small_maps
from networks.prompt_seg_net import NetworkOutput, network_input


class ReferenceNet(nn.Module):
    """DynUNet with ``num_tasks`` output channels; pairs select their channel by a one-hot row.

    Args:
        num_tasks: output channels, one per training prompt.
        filters: channels at the six resolutions, full to 1/32 (nnU-Net: 32, 64, 128, 256, 320, 320).
        in_channels: image channels.
        input_offset: subtracted from the windowed image first (see ``PromptSegNet``).
        channels_last: convolution weights in channels-last 3D memory format (as
            :class:`~networks.prompt_seg_net.PromptSegNet`: same values, faster on CPU).
        deep_supervision: coarser decoder levels (1/2, 1/4, ...) with an output head of their
            own, whose logits training also supervises (nnU-Net's deep supervision; 0: none).
        input_windows: (level, width) in HU of extra input channels (``networks/intensity.py``).
    """

    def __init__(
        self,
        num_tasks: int,
        filters: Sequence[int] = (32, 64, 128, 256, 320, 320),
        in_channels: int = 1,
        input_offset: float = 0.5,
        channels_last: bool = True,
        deep_supervision: int = 0,
        input_windows: Sequence[Sequence[float]] = (),
    ):
        super().__init__()
        if num_tasks < 1 or len(filters) != 6:
            raise ValueError(f"num_tasks >= 1 and six filters required, got {num_tasks} and {list(filters)}")
        self.num_tasks = num_tasks
        self.input_offset = input_offset
        self.window_channels = WindowChannels(input_windows) if input_windows else None
        self.unet = DynUNet(
            3,
            in_channels * (1 + len(input_windows)),
            num_tasks,
            kernel_size=[3] * 6,
            strides=[1, 2, 2, 2, 2, 2],
            upsample_kernel_size=[2] * 5,
            filters=list(filters),
            norm_name="instance",
            res_block=True,
            deep_supervision=deep_supervision > 0,
            deep_supr_num=max(deep_supervision, 1),
        )
        float32_on_small_maps(self.unet)  # oneDNN's bf16 weight gradients on 2-voxel maps: networks/precision.py
        with torch.no_grad():
            for head in [self.unet.output_block, *getattr(self.unet, "deep_supervision_heads", [])]:
                head.conv.conv.bias.fill_(prior_bias())
        if channels_last:
            self.to(memory_format=torch.channels_last_3d)

    def channels(self, prompt_embedding: torch.Tensor) -> torch.Tensor:
        """The output channel each one-hot row selects; anything else is refused."""
        one_hot = prompt_embedding.shape[-1] == self.num_tasks and bool(
            ((prompt_embedding == 0) | (prompt_embedding == 1)).all() and (prompt_embedding.sum(-1) == 1).all()
        )
        if not one_hot:
            raise ValueError("the reference network segments only its training prompts (one-hot task rows)")
        return prompt_embedding.argmax(dim=-1)

    def forward(
        self, image: torch.Tensor, prompt_embedding: torch.Tensor, image_index: torch.Tensor | None = None
    ) -> NetworkOutput:
        """Logits (N, 1, ...) of N (image, task) pairs, as :meth:`PromptSegNet.forward`."""
        if image_index is None:
            image_index = torch.arange(image.shape[0], device=image.device)
        size = image.shape[2:]
        output = self.unet(network_input(image, self.window_channels, self.input_offset))
        output = output[(..., *(slice(0, s) for s in size))]
        channels = self.channels(prompt_embedding).to(image_index.device)
        if output.dim() == 5:  # without deep supervision (or in eval): the final level alone
            output = output[:, None]
        # (B, 1 + coarser levels, tasks, ...), the coarser levels upsampled to full size
        levels = [output[:, k][image_index, channels][:, None] for k in range(output.shape[1])]
        return NetworkOutput(levels[0], [], levels[1:])
