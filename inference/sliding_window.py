"""Whole-volume prediction for several prompts with MONAI's sliding window."""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference

from networks.prompt_seg_net import PromptSegNet


@torch.no_grad()
def predict_volume(
    network: PromptSegNet,
    image: torch.Tensor,
    prompt_embedding: torch.Tensor,
    roi_size: int,
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Foreground probabilities (P, D, H, W) of ``image`` (1, 1, D, H, W) for P prompt embeddings.

    The encoder runs once per window for all prompts; prompts sharing a route share the decoder
    (see :class:`PromptSegNet`). Windows blend with Gaussian weights. ``device`` is where the
    stitched output lives (the CPU for large volumes); ``sw_device`` where windows run. ``progress``
    shows MONAI's progress bar over the window batches.
    """
    network.eval()
    num_prompts = prompt_embedding.shape[0]
    embedding = prompt_embedding.to(sw_device or image.device)

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        index = torch.arange(windows.shape[0], device=windows.device).repeat_interleave(num_prompts)
        logits = network(windows, embedding.repeat(windows.shape[0], 1), index).logits
        return logits.view(windows.shape[0], num_prompts, *windows.shape[2:]).float()

    logits = sliding_window_inference(
        image,
        roi_size=(roi_size,) * 3,
        sw_batch_size=sw_batch_size,
        predictor=predictor,
        overlap=overlap,
        mode="gaussian",
        sw_device=sw_device,
        device=device,
        progress=progress,
    )
    return torch.sigmoid(logits[0])
