"""The prompt-based segmentation network of Ouyang et al. (MICCAI): Swin encoder + routed decoder."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from networks.conditioning import PromptProjection
from networks.decoder import RoutedDecoder
from networks.encoder import SwinEncoder
from networks.head import PlainHead, PromptConditionedHead
from networks.intensity import WindowChannels
from networks.precision import float32_on_small_maps

DIVISOR = 32  # patch embedding (2) and four patch mergings: the coarsest map is 1/32 of the input
MIN_SIZE = 64  # instance norm needs more than one voxel in the 1/32 map


@dataclass
class NetworkOutput:
    """Logits (N, 1, D, H, W) for N (image, prompt) pairs, the router logits of each level, and in
    training with deep supervision the coarser levels' logits (finest first; at the level's own
    resolution, or at full size where the network upsamples them, as MONAI's DynUNet does)."""

    logits: torch.Tensor
    router_logits: list[torch.Tensor]
    deep_logits: list[torch.Tensor] = field(default_factory=list)


class PromptSegNet(nn.Module):
    """Segments, in a CT patch, whatever each prompt embedding names.

    The encoder runs once per image; the decoder runs the sub-pathways each prompt's route selects,
    once per (image, route prefix): pairs of the same image whose routes agree up to a level share
    the decoder work up to there (in training as at inference), and pairs on one whole route
    differ only in the prompt-conditioned head.
    Inputs of any size are zero-padded up to a multiple of 32 (at least 64) per axis and the output
    is cropped back.

    Each prompt embedding is standardised (zero mean, unit variance over its features, no learned
    parameters) before the routers and the head see it: text encoders return unit-norm vectors whose
    entries are about ``1/sqrt(E)``, which under Adam makes the prompt conditioning learn about
    ``sqrt(E)`` times slower than the rest of the network. Before that, the buffer ``prompt_centre``
    (zeros unless set by :meth:`centre_prompts`) is subtracted: text encoders place all prompts of one
    domain in a narrow cone (MiniLM: "liver" / "liver tumor" cosine 0.64, left / right kidney 0.87), and
    removing the training prompts' mean leaves what tells them apart (0.44 and 0.78). The centre is
    stored with the weights, so an unseen prompt is centred as the training prompts were.

    Args:
        in_channels: image channels.
        embedding_dim: size of the prompt embedding (512 for CLIP ViT-B-32, 384 for MiniLM).
        feature_size: Swin embedding width (paper: 48).
        decoder_channels: bottleneck and five level widths (paper: 192, 192, 192, 48, 48, 48).
        num_paths: candidate sub-pathways per level (paper: M = 6; 1 is the sole-path ablation).
        router_hidden_dim: hidden width of the routers.
        prompt_head: prompt-conditioned output head (True) or a plain shared convolution (False).
        encoder_depths: Swin blocks per stage (paper: 2, 2, 2, 2).
        window_size: Swin attention window (paper: 7).
        level_conditioning: scale and shift every decoder level's features by the prompt (FiLM,
            see ``networks/conditioning.py``); off is the paper's routing-only decoder.
        head_hidden: hidden width of the prompt-generated head (0: one linear 1x1x1 layer).
        input_offset: subtracted from the windowed image (and its zero padding) first. The paper's
            window maps -900..900 HU to 0..1, putting soft tissue near 0.52, where bfloat16 resolves
            only about 3.5 HU; centred near 0 it resolves 0.1 HU, so soft-tissue contrast survives
            mixed-precision training. 0 is the uncentred input of checkpoints made before it.
        deep_supervision: coarser decoder levels (1/2, 1/4, ...) with a prompt-conditioned head of
            their own whose logits, at the level's resolution, training also supervises (nnU-Net's
            deep supervision; 0: none, the paper). The heads run in training only.
        route_head: generate the head's weights from the prompt conditioning and the route (one
            one-hot of M per level) together, so each sub-pathway on a route adds its own term to the
            read-out of that route's features; without it, two look-alike prompts on different
            routes ("liver", "liver tumor") can get only nearly the same read-out. At 1080 phantom
            steps it did not stop the liver tumour's read-out from collapsing (docs/experiments.md, Sixth session).
        channels_last: keep the convolution weights in channels-last 3D memory format, so every
            convolution runs (and returns) channels-last: the same network and values, but
            oneDNN's CPU kernels for the few-channel full-resolution levels run several times faster
            (``benchmarks/cpu_step.py``).
        input_windows: (level, width) in HU of extra input channels, the image re-windowed
            (``networks/intensity.py``); empty: the one window of the data (the paper).
    """

    def __init__(
        self,
        in_channels: int = 1,
        embedding_dim: int = 512,
        feature_size: int = 48,
        decoder_channels: Sequence[int] = (192, 192, 192, 48, 48, 48),
        num_paths: int = 6,
        router_hidden_dim: int = 256,
        prompt_head: bool = True,
        encoder_depths: Sequence[int] = (2, 2, 2, 2),
        window_size: int = 7,
        level_conditioning: bool = False,
        head_hidden: int = 0,
        input_offset: float = 0.5,
        deep_supervision: int = 0,
        channels_last: bool = True,
        route_head: bool = False,
        input_windows: Sequence[Sequence[float]] = (),
    ) -> None:
        super().__init__()
        if head_hidden < 0 or (head_hidden and not prompt_head):
            raise ValueError(f"head_hidden must be 0, or positive with prompt_head, got {head_hidden}")
        if not 0 <= deep_supervision < len(decoder_channels) - 1:
            raise ValueError(f"deep_supervision must lie in 0..{len(decoder_channels) - 2}, got {deep_supervision}")
        self.embedding_dim = embedding_dim
        self.input_offset = input_offset
        self.register_buffer("prompt_centre", torch.zeros(embedding_dim))
        self.window_channels = WindowChannels(input_windows) if input_windows else None
        in_channels *= 1 + len(input_windows)
        self.encoder = SwinEncoder(in_channels, feature_size, encoder_depths, window_size=window_size)
        encoder_channels = self.encoder.out_channels
        skip_channels = [encoder_channels[4], *encoder_channels[3::-1], in_channels]
        self.projection = PromptProjection(embedding_dim) if level_conditioning or head_hidden else None
        conditioning_dim = self.projection.dim if self.projection is not None else embedding_dim
        self.decoder = RoutedDecoder(
            skip_channels,
            decoder_channels,
            embedding_dim,
            num_paths,
            router_hidden_dim,
            conditioning_dim if level_conditioning else None,
        )

        def head(channels: int, hidden: int = 0, route_dim: int = 0) -> nn.Module:
            if prompt_head:
                return PromptConditionedHead(channels, conditioning_dim + route_dim, hidden)
            return PlainHead(channels, conditioning_dim)

        self.route_head = route_head
        route_dim = len(self.decoder.pathways) * num_paths if route_head else 0
        self.head = head(decoder_channels[-1], head_hidden, route_dim)
        self.deep_heads = nn.ModuleList(
            head(c) for c in decoder_channels[-2 : -2 - deep_supervision : -1]
        )  # 1/2, 1/4..
        float32_on_small_maps(self)  # oneDNN's bf16 weight gradients on 2-voxel maps: networks/precision.py
        if channels_last:
            self.to(memory_format=torch.channels_last_3d)

    @property
    def pathways(self) -> nn.ModuleList:
        return self.decoder.pathways

    def set_routing_schedule(self, temperature: float, noise_scale: float) -> None:
        """Gumbel-softmax temperature and noise scale of every router."""
        for pathway in self.pathways:
            pathway.temperature = temperature
            pathway.noise_scale = noise_scale

    @torch.no_grad()
    def centre_prompts(self, prompt_embeddings: torch.Tensor) -> None:
        """Subtract the mean of these (training) prompt embeddings (P, E) from every prompt from now on."""
        if prompt_embeddings.dim() != 2 or prompt_embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"prompt embeddings must be (P, {self.embedding_dim}), got {tuple(prompt_embeddings.shape)}"
            )
        self.prompt_centre.copy_(prompt_embeddings.mean(dim=0))

    def condition(self, prompt_embedding: torch.Tensor) -> torch.Tensor:
        """What routers and heads read: the prompt embedding less the centre, standardised."""
        return standardise(prompt_embedding - self.prompt_centre.to(prompt_embedding.dtype))

    @torch.no_grad()
    def routes(self, prompt_embedding: torch.Tensor) -> torch.Tensor:
        """Inference routes (P, levels): the argmax of each level's router logits, no noise."""
        logits = self.decoder.router_logits(self.condition(prompt_embedding))
        return torch.stack([level.argmax(dim=-1) for level in logits], dim=1)

    def forward(
        self,
        image: torch.Tensor,
        prompt_embedding: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> NetworkOutput:
        """Logits for N (image, prompt) pairs.

        Args:
            image: (B, C, D, H, W).
            prompt_embedding: (N, E), one row per pair.
            image_index: (N,) index into ``image`` of each pair; default ``arange(B)`` (N == B).
        """
        if image.dim() != 5:
            raise ValueError(f"image must be (B, C, D, H, W), got shape {tuple(image.shape)}")
        if image_index is None:
            if prompt_embedding.shape[0] != image.shape[0]:
                raise ValueError("give image_index when the prompts do not pair one-to-one with images")
            image_index = torch.arange(image.shape[0], device=image.device)
        prompt_embedding = self.condition(prompt_embedding)
        size = image.shape[2:]
        padded = network_input(image, self.window_channels, self.input_offset)
        hidden = self.encoder(padded)
        skips = [hidden[4], hidden[3], hidden[2], hidden[1], hidden[0], padded]
        router_logits, weights = self.decoder.route_weights(prompt_embedding)
        conditioning = self.projection(prompt_embedding) if self.projection is not None else prompt_embedding
        deep_heads = list(self.deep_heads) if self.training else []
        features = self.decoder(skips, weights, image_index, conditioning, levels=1 + len(deep_heads))
        head_input = conditioning
        if self.route_head:
            head_input = torch.cat([conditioning, *(w.to(conditioning.dtype) for w in weights)], dim=1)
        logits = self.head(features[0], head_input)
        deep_logits = [
            head(level, conditioning)[(..., *(slice(0, -(-s // 2**k)) for s in size))]
            for k, (head, level) in enumerate(zip(deep_heads, features[1:]), start=1)
        ]
        return NetworkOutput(logits[(..., *(slice(0, s) for s in size))], router_logits, deep_logits)

    def trimmed(self, prompt_embedding: torch.Tensor) -> PromptSegNet:
        """A standalone copy holding only the sub-pathways on the routes of these prompts."""
        routes = self.routes(prompt_embedding)
        trimmed = copy.deepcopy(self)
        for level, pathway in enumerate(trimmed.pathways):
            pathway.keep_only(set(routes[:, level].tolist()))
        return trimmed.eval()


def standardise(prompt_embedding: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit variance over the features of each embedding (layer norm, no parameters)."""
    return F.layer_norm(prompt_embedding, prompt_embedding.shape[-1:])


def network_input(image: torch.Tensor, window_channels: WindowChannels | None, input_offset: float) -> torch.Tensor:
    """What the first layer reads: the extra windows' channels (if any) beside the image, zero-padded
    to sides of a multiple of 32 (at least 64), less the input offset."""
    if window_channels is not None:
        image = window_channels(image)
    return _pad_to_multiple(image, DIVISOR, MIN_SIZE) - input_offset


def _pad_to_multiple(image: torch.Tensor, divisor: int, minimum: int) -> torch.Tensor:
    pads: list[int] = []
    for size in reversed(image.shape[2:]):
        pads += [0, max(size + (-size) % divisor, minimum) - size]
    return F.pad(image, pads) if any(pads) else image


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shared_route_groups(routes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Groups of two or more prompts whose whole routes are identical."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for prompt, route in routes.items():
        groups.setdefault(tuple(route), []).append(prompt)
    return [sorted(g) for g in groups.values() if len(g) > 1]
