"""Per-block compilation (``networks/compiled.py``): routing stays eager, values and names unchanged."""

from __future__ import annotations

import pytest
import torch

from networks.compiled import compile_blocks, compiled_blocks
from networks.prompt_seg_net import PromptSegNet
from tests.conftest import TINY_NETWORK

EMBED = 16


def tiny() -> PromptSegNet:
    torch.manual_seed(0)
    network = PromptSegNet(embedding_dim=EMBED, **TINY_NETWORK)
    network.set_routing_schedule(1.0, 0.0)  # no Gumbel noise: eager and compiled take the same routes
    return network


def inductor_unavailable() -> str | None:
    """Why inductor cannot compile on this CPU (no C++ compiler), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:  # any failure: no CPU code generation here
        return f"inductor cannot build CPU kernels here: {error}"
    return None


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_outputs_and_gradients_and_keep_the_parameter_names():
    """The dynamo graphs of every block, with routing in eager Python between them (``aot_eager``:
    the tracing without code generation, on any CPU; about a minute on two cores)."""
    eager, compiled = tiny().train(), tiny().train()
    names = list(compiled.state_dict())
    compile_blocks(compiled, backend="aot_eager")
    assert list(compiled.state_dict()) == names
    assert all(block._compiled_call_impl is not None for block in compiled_blocks(compiled))
    image, prompts = torch.randn(2, 1, 32, 32, 32), torch.randn(5, EMBED)
    image_index = torch.tensor([0, 0, 0, 1, 1])
    for network in (eager, compiled):
        network(image, prompts, image_index).logits.square().mean().backward()
    expected = eager(image, prompts, image_index).logits
    assert torch.allclose(compiled(image, prompts, image_index).logits, expected, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    trimmed = compiled.trimmed(prompts).eval()  # a deep copy runs eager, on its own weights
    assert trimmed.encoder._compiled_call_impl is None
    with torch.no_grad():
        assert torch.allclose(
            trimmed(image, prompts, image_index).logits, eager.eval()(image, prompts, image_index).logits, atol=1e-5
        )


@pytest.mark.slow
@pytest.mark.skipif(inductor_unavailable() is not None, reason=str(inductor_unavailable()))
def test_inductor_compiled_network_matches_eager_on_cpu():
    """Real code generation (inductor, C++ on the CPU) for one image and two routes, inference."""
    network = tiny().eval()
    image, prompts = torch.randn(1, 1, 32, 32, 32), torch.randn(2, EMBED)
    with torch.no_grad():
        expected = network(image, prompts, torch.zeros(2, dtype=torch.long)).logits
        compile_blocks(network, dynamic=False)
        output = network(image, prompts, torch.zeros(2, dtype=torch.long)).logits
    assert torch.allclose(output, expected, atol=1e-4)


def test_module_compile_option_compiles_the_blocks_in_configure_model():
    from lightning_modules.prompt_seg_module import PromptSegModule

    module = PromptSegModule(**TINY_NETWORK, compile=True)
    assert all(block._compiled_call_impl is None for block in compiled_blocks(module.network))
    module.configure_model()
    assert all(block._compiled_call_impl is not None for block in compiled_blocks(module.network))
    module.configure_model()  # again: nothing is compiled twice
    eager = PromptSegModule(**TINY_NETWORK)
    eager.configure_model()
    assert all(block._compiled_call_impl is None for block in compiled_blocks(eager.network))
