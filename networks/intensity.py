"""Extra intensity windows of the input CT, as fixed (parameter-free) input channels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from datamodules.preprocessing import Preprocessing

SOFT_TISSUE_WINDOW = (40.0, 400.0)  # the abdominal window radiologists read soft tissue in (level, width HU)


class WindowChannels(nn.Module):
    """The windowed image, followed by the same image in further HU windows (one channel each).

    The data arrive in one window, the paper's -900..900 HU mapped to 0..1. There the soft tissues
    lie a few hundredths apart: a hypodense liver tumour (20-30 HU) differs from the enhanced liver
    (70-80 HU) by 0.028, the stomach from its surroundings by less, while air, bone and contrast
    fill the rest of the range and dominate what an untrained network sees. A narrower window (the
    abdominal 400 / 40: -160..240 HU) spreads the same contrast 4.5 times wider; the source channel
    keeps air, lung, bone and contrast apart. The HU are recovered from the source window, which is
    the buffer ``source_window`` (level, width), set from the data's preprocessing in training and
    stored with the weights.

    Args:
        windows: (level, width) in HU of each extra channel, each clipped and scaled to 0..1 as the
            data's own window is (``Preprocessing.window``).
    """

    def __init__(self, windows: Sequence[Sequence[float]]) -> None:
        super().__init__()
        if not windows or any(width <= 0 for _, width in windows):
            raise ValueError(f"input windows must be one or more (level, width) with width > 0, got {windows}")
        self.windows = [Preprocessing(window_level=level, window_width=width) for level, width in windows]
        paper = Preprocessing()  # until ``adopt`` names the data's window
        self.register_buffer("source_window", torch.tensor([paper.window_level, paper.window_width]))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) in the source window -> (B, C * (1 + windows), ...)."""
        level, width = self.source_window.to(image.dtype)
        hu = image * width + (level - width / 2)
        return torch.cat([image, *(window.window(hu).to(image.dtype) for window in self.windows)], dim=1)

    @torch.no_grad()
    def adopt(self, preprocessing: Preprocessing) -> None:
        """Read images windowed by ``preprocessing`` from now on."""
        self.source_window.copy_(torch.tensor([preprocessing.window_level, preprocessing.window_width]))
