"""Plain ``nn.Module``s: Swin encoder, automatic-pathway decoder, prompt head, text encoders."""

from networks.prompt_seg_net import PromptSegNet

__all__ = ["PromptSegNet"]
