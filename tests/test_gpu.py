"""GPU checks: skipped cleanly where no CUDA device exists (CI, the CPU development machines)."""

from __future__ import annotations

import pytest
import torch

from networks.prompt_seg_net import PromptSegNet
from tests.conftest import TINY_NETWORK

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_step_and_trimmed_equivalence_on_gpu():
    torch.manual_seed(0)
    network = PromptSegNet(embedding_dim=32, **TINY_NETWORK).cuda()
    image = torch.rand(2, 1, 64, 64, 64, device="cuda")
    prompts = torch.randn(2, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = network(image, prompts).logits
    logits.float().mean().backward()
    shared = [p for n, p in network.named_parameters() if not n.startswith("decoder.pathways.")]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in shared)
    assert all(p.grad.abs().sum() > 0 for p in network.encoder.parameters())
    for pathway in network.pathways:
        ran = [k for k, m in pathway.sub_pathways.items() if m.conv1.conv.weight.grad is not None]
        assert 1 <= len(ran) <= 2 and all(torch.isfinite(p.grad).all() for k in ran for p in pathway.sub_pathways[k].parameters())
    network.eval()
    trimmed = network.trimmed(prompts[:1])
    with torch.no_grad():
        difference = (network(image[:1], prompts[:1]).logits - trimmed(image[:1], prompts[:1]).logits).abs().max()
    assert difference <= 1e-5
