"""Compiled execution that keeps routing in eager Python: ``torch.compile`` per fixed-structure block.

The routed decoder's control flow (grouping pairs by route prefix, choosing a sub-pathway per
group) depends on the prompts' routes, which a whole-network graph would have to guard on or break
at. Compiling instead each block whose structure never changes (the Swin encoder, the bottleneck,
the skip blocks and every candidate sub-pathway) leaves that control flow in eager Python and fuses
the work inside the blocks: instance norms, activations, window attention.
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

from networks.prompt_seg_net import PromptSegNet

RECOMPILE_LIMIT = 64  # graphs per code object: every residual block shares MONAI's one ``forward``


def compiled_blocks(network: PromptSegNet) -> list[nn.Module]:
    """The blocks :func:`compile_blocks` compiles: encoder, bottleneck, skip blocks, sub-pathways."""
    decoder = network.decoder
    sub_pathways = [block for pathway in decoder.pathways for block in pathway.sub_pathways.values()]
    return [network.encoder, decoder.bottleneck, *decoder.skips, *sub_pathways]


def compile_blocks(
    network: PromptSegNet, dynamic: bool | None = None, backend: str = "inductor", mode: str | None = None
) -> PromptSegNet:
    """Compile the fixed-structure blocks of ``network`` in place (``nn.Module.compile``); returns it.

    Parameter names, state dicts and checkpoints are unchanged; a deep copy (``trimmed``) is eager
    again and can be compiled in turn. Blocks of one structure and input shape share a graph. A
    sub-pathway's batch is the number of route-prefix groups that chose it, which changes with the
    routes: ``dynamic=None`` (default) compiles a shape statically first and makes a dimension
    dynamic once it changes, a bounded number of graphs even under Gumbel noise; ``False`` compiles
    every new shape (fastest kernels, suits fixed routes). All residual blocks share one Python
    ``forward``, whose graphs dynamo caps at ``recompile_limit``: it is raised to
    :data:`RECOMPILE_LIMIT` (process-wide).
    """
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    for block in compiled_blocks(network):
        if block._compiled_call_impl is None:  # not compiled yet (a second call changes nothing)
            block.compile(dynamic=dynamic, backend=backend, mode=mode)
    return network
