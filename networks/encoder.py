"""The image encoder: MONAI's 3D Swin transformer, exactly as ``SwinUNETR`` builds it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn


class SwinEncoder(nn.Module):
    """3D Swin transformer (Hatamizadeh et al., Swin UNETR) returning five feature maps.

    With ``feature_size=48`` this is ``SwinUNETR(feature_size=48).swinViT`` (8.062 M parameters,
    the paper's 8.06 M): patch 2x2x2, four stages of two blocks, window 7.

    Args:
        in_channels: image channels (1 for CT).
        feature_size: channels after the patch embedding; stage ``i`` has ``feature_size * 2**i``.
        depths: transformer blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window edge in tokens.
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
    ) -> None:
        super().__init__()
        if feature_size % 12 != 0:
            raise ValueError(f"feature_size must be a multiple of 12, got {feature_size}")
        self.feature_size = feature_size
        self.swin = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=(window_size,) * 3,
            patch_size=(2, 2, 2),
            depths=depths,
            num_heads=num_heads,
            spatial_dims=3,
        )

    @property
    def out_channels(self) -> list[int]:
        """Channels of the five outputs, at 1/2, 1/4, 1/8, 1/16 and 1/32 of the input size."""
        return [self.feature_size * 2**i for i in range(5)]

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return list(self.swin(image, normalize=True))
