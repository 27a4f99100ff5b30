"""Automatic pathway (AP) module: a prompt router and M candidate sub-pathways (paper, sec. 2.2).

Training uses a hard straight-through Gumbel softmax: the forward value is one-hot, its gradient
reaches the router logits through the soft probabilities. Only the selected candidate runs for each
sample, and the samples that chose the same candidate run as one batched call, so a level costs one
sub-pathway, not M. At inference the route is the argmax of the logits: a function of the prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """Fully connected layers mapping a prompt embedding to logits over ``num_paths`` candidates.

    Args:
        embedding_dim: size of the prompt embedding.
        num_paths: number of candidate sub-pathways (the paper's M).
        hidden_dim: width of the hidden layer.
    """

    def __init__(self, embedding_dim: int, num_paths: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(embedding_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_paths))

    def forward(self, prompt_embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(prompt_embedding)


def route_weights(logits: torch.Tensor, training: bool, temperature: float, noise_scale: float = 1.0) -> torch.Tensor:
    """One-hot path weights (N, M).

    Training: straight-through Gumbel softmax, ``softmax((logits + noise_scale * g) / temperature)``
    with ``g`` Gumbel noise; the forward value is its one-hot argmax, the gradient that of the soft
    probabilities. ``noise_scale`` 1 is the standard estimator; smaller values explore less (the
    hard choice is ``argmax(logits + noise_scale * g)``, which the temperature does not change).
    Otherwise: the one-hot argmax of the logits, no noise.
    """
    if not training:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    gumbel = -torch.empty_like(logits).exponential_().log()
    soft = ((logits + noise_scale * gumbel) / temperature).softmax(dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    return hard - soft.detach() + soft


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along the first dimension. With a gradient, the backward adds each source row's
    gradients slice by slice instead of ``x[index]``'s accumulating ``index_put_``, which took 11 % of
    the quickstart's CPU step: 1.07-1.09x a step (``benchmarks/take_rows.py``; docs/experiments.md,
    fifteenth session)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x[index]
    return _TakeRows.apply(x, index)


class _TakeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        channels_last = grad.dim() == 5 and grad.is_contiguous(memory_format=torch.channels_last_3d)
        source = torch.empty(
            (ctx.rows, *grad.shape[1:]),
            dtype=grad.dtype,
            device=grad.device,
            memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format,
        )
        for row in range(ctx.rows):
            picks = (index == row).nonzero(as_tuple=True)[0]
            if len(picks) == 0:
                source[row].zero_()
            elif len(picks) == 1:
                source[row] = grad[picks[0]]
            else:
                source[row] = grad.index_select(0, picks).sum(dim=0)
        return source, None


def balance_loss(logits: torch.Tensor) -> torch.Tensor:
    """Load-balancing term ``M * sum_k mean_p_k**2``: 1 when usage is uniform, M when collapsed."""
    mean_probability = logits.softmax(dim=-1).mean(dim=0)
    return logits.shape[-1] * (mean_probability**2).sum()


def shared_route_probability(logits: list[torch.Tensor]) -> torch.Tensor:
    """(N, N) probability that two prompts take the same whole route when each level's choice is
    drawn from ``softmax(logits)``: the product over levels of the two distributions' overlap."""
    probability = logits[0].new_ones(logits[0].shape[0], logits[0].shape[0])
    for level in logits:
        q = level.float().softmax(dim=-1)
        probability = probability * (q @ q.T)
    return probability


def route_separation_loss(logits: list[torch.Tensor], masks: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """Keeps prompts with different targets off one whole route.

    For every two pairs of one image, the probability that they share a whole route
    (:func:`shared_route_probability`) weighted by how different their targets are on that image,
    ``1 - Dice(target_a, target_b)`` (0 when both are empty); mean over those pairs. Two prompts
    on one route share every decoder feature and differ only in the head, which cannot give a
    lung tumour its own mask while its route answers "lung".

    Args:
        logits: per level, router logits (N, M) of the N pairs.
        masks: targets (N, 1, D, H, W).
        image_index: (N,) image of each pair.
    """
    flat = masks.flatten(1).float()
    sizes = flat.sum(dim=1)
    total = sizes[:, None] + sizes[None, :]
    overlap = 2 * (flat @ flat.T) / total.clamp_min(1)
    difference = torch.where(total > 0, 1 - overlap, torch.zeros_like(overlap))
    same_image = image_index[:, None] == image_index[None, :]
    pairs = same_image & torch.ones_like(same_image).triu(diagonal=1)
    if not pairs.any():
        return logits[0].sum() * 0.0
    return (difference * shared_route_probability(logits))[pairs].mean()


class AutomaticPathway(nn.Module):
    """A router and ``num_paths`` sub-pathways of identical structure; runs the chosen one per sample.

    Candidates live in a ``ModuleDict`` keyed by their index, so a trimmed copy keeps its indices
    (and the router that produces them) and refuses a route through a removed candidate.

    Args:
        sub_pathways: the M candidate modules (same structure, own parameters).
        embedding_dim: size of the prompt embedding fed to the router.
        router_hidden_dim: hidden width of the router.
    """

    def __init__(self, sub_pathways: list[nn.Module], embedding_dim: int, router_hidden_dim: int = 256) -> None:
        super().__init__()
        self.num_paths = len(sub_pathways)
        self.sub_pathways = nn.ModuleDict({str(k): p for k, p in enumerate(sub_pathways)})
        self.router = Router(embedding_dim, self.num_paths, router_hidden_dim)
        self.temperature = 1.0
        self.noise_scale = 1.0
        self.fixed_routes = False  # argmax routing in training too (phase 2, few-shot)
        self.shared_path: int | None = None  # every sample takes this candidate (a shared start)

    @property
    def kept_paths(self) -> list[int]:
        return sorted(int(k) for k in self.sub_pathways)

    def choose(self, prompt_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits (N, M) and one-hot weights (N, M) for a batch of prompt embeddings."""
        logits = self.router(prompt_embedding)
        if self.shared_path is not None:
            return logits, F.one_hot(
                torch.full_like(logits[:, 0], self.shared_path, dtype=torch.long), self.num_paths
            ).to(logits.dtype)
        return logits, route_weights(
            logits, self.training and not self.fixed_routes, self.temperature, self.noise_scale
        )

    def split_shared_path(self) -> None:
        """End a shared start: every candidate becomes a copy of the shared one (in place, so an
        optimiser keeps its parameters), then the router chooses again."""
        shared = self.sub_pathways[str(self.shared_path)].state_dict()
        for key, candidate in self.sub_pathways.items():
            if key != str(self.shared_path):
                candidate.load_state_dict(shared)
        self.shared_path = None

    def forward(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Run, for each sample, the sub-pathway its one-hot ``weights`` row selects."""
        choice = weights.argmax(dim=-1)
        paths = choice.unique().tolist()
        for path in paths:
            if str(path) not in self.sub_pathways:
                raise ValueError(f"route uses sub-pathway {path}, which trimming removed (kept: {self.kept_paths})")
        scale = weights.gather(1, choice[:, None]).view(-1, *([1] * (features.dim() - 1)))
        if len(paths) == 1:
            return self.sub_pathways[str(paths[0])](features) * scale
        rows = [(choice == path).nonzero(as_tuple=True)[0] for path in paths]
        outputs = [self.sub_pathways[str(p)](take_rows(features, r)) for p, r in zip(paths, rows, strict=True)]
        return take_rows(torch.cat(outputs), torch.cat(rows).argsort()) * scale  # back in sample order

    def keep_only(self, paths: set[int]) -> None:
        """Delete every candidate not in ``paths`` (in place)."""
        for key in [k for k in self.sub_pathways if int(k) not in paths]:
            del self.sub_pathways[key]
