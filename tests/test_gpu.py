"""GPU checks: skipped cleanly where no CUDA device exists (CI, the CPU development machines)."""

from __future__ import annotations

import pytest
import torch

from networks.prompt_seg_net import PromptSegNet
from tests.conftest import TINY_NETWORK

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gradients(network: PromptSegNet, image: torch.Tensor, prompts: torch.Tensor, bf16: bool) -> dict[str, torch.Tensor]:
    network.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        logits = network(image, prompts).logits
    (logits.float() - 0.5).square().mean().backward()
    return {n: p.grad.detach().clone() for n, p in network.named_parameters() if p.grad is not None}


def test_bf16_training_step_and_trimmed_equivalence_on_gpu():
    torch.manual_seed(0)
    network = PromptSegNet(embedding_dim=32, **TINY_NETWORK).cuda()
    image = torch.rand(2, 1, 64, 64, 64, device="cuda")
    prompts = torch.randn(2, 32, device="cuda")
    network.set_routing_schedule(temperature=1.0, noise_scale=0.0)  # the same routes in both passes
    bf16, fp32 = gradients(network, image, prompts, True), gradients(network, image, prompts, False)
    # every shared parameter and each level's chosen sub-pathways receive a finite, non-zero gradient
    shared = [n for n, _ in network.named_parameters() if not n.startswith("decoder.pathways.") or ".router." in n]
    assert all(n in bf16 and torch.isfinite(bf16[n]).all() for n in shared)
    assert all(bf16[n].abs().sum() > 0 for n in shared if n.endswith("weight"))
    for level in range(network.decoder.num_levels):
        ran = {n.split(".")[4] for n in bf16 if n.startswith(f"decoder.pathways.{level}.sub_pathways.")}
        assert 1 <= len(ran) <= 2
        assert all(bf16[f"decoder.pathways.{level}.sub_pathways.{k}.conv1.conv.weight"].abs().sum() > 0 for k in ran)
    # and the bf16 gradient points where the float32 one does
    flat = lambda grads: torch.cat([grads[n].flatten().float() for n in sorted(fp32)])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(bf16), flat(fp32), dim=0) > 0.9
    network.eval()
    trimmed = network.trimmed(prompts[:1])
    with torch.no_grad():
        difference = (network(image[:1], prompts[:1]).logits - trimmed(image[:1], prompts[:1]).logits).abs().max()
    assert difference <= 1e-5
