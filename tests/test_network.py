from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from export import network_from_config, parameter_counts
from inference.checkpoints import load_model
from networks.head import FOREGROUND_PRIOR
from networks.prompt_seg_net import PromptSegNet, count_parameters, shared_route_groups, standardise
from networks.routing import (
    AutomaticPathway,
    balance_loss,
    route_separation_loss,
    shared_route_probability,
    take_rows,
)
from tests.conftest import TINY_NETWORK, tiny_network_hparams

EMBED = 32


def tiny(**overrides) -> PromptSegNet:
    torch.manual_seed(0)
    return PromptSegNet(embedding_dim=EMBED, **(TINY_NETWORK | overrides))


def save_checkpoint(network: PromptSegNet, path: Path, hparams: dict | None = None) -> Path:
    """``network`` written as a Lightning checkpoint's ``state_dict`` with ``hparams``
    (default: only the input offset the weights were trained with)."""
    state = {f"network.{k}": v for k, v in network.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams or {"input_offset": 0.5}}, path)
    return path


@pytest.mark.parametrize("size", [(32, 32, 32), (40, 36, 50)])
def test_output_shape_matches_input_including_non_multiples_of_32(size):
    net = tiny().eval()
    image = torch.randn(2, 1, *size)
    output = net(image, torch.randn(3, EMBED), torch.tensor([0, 1, 1]))
    assert output.logits.shape == (3, 1, *size)
    assert len(output.router_logits) == 5 and output.router_logits[0].shape == (3, 3)


def test_bad_image_rank_is_rejected():
    with pytest.raises(ValueError, match="image must be"):
        tiny()(torch.randn(1, 32, 32, 32), torch.randn(1, EMBED))


def test_eval_routing_is_deterministic_and_depends_on_the_prompt_only():
    """The sub-pathways that actually run are the prompt's ``routes``, whatever the image."""
    net = tiny().eval()
    prompts = torch.randn(4, EMBED)
    assert torch.equal(net.routes(prompts), net.routes(prompts))
    ran: list[tuple[int, str]] = []
    for level, pathway in enumerate(net.pathways):
        for key, sub_pathway in pathway.sub_pathways.items():
            sub_pathway.register_forward_hook(lambda *_, level=level, key=key: ran.append((level, key)))
    routes_by_image = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        image = torch.randn(1, 1, 32, 32, 32) * seed
        for prompt in prompts:
            ran.clear()
            net(image, prompt[None])
            routes_by_image.append(sorted(ran))
    expected = [sorted((level, str(int(k))) for level, k in enumerate(route)) for route in net.routes(prompts)]
    assert routes_by_image == expected + expected
    assert len({tuple(r) for r in expected}) > 1  # different prompts do take different routes here


def test_gradients_reach_router_and_only_the_selected_sub_pathways():
    net = tiny().train()
    output = net(torch.randn(1, 1, 32, 32, 32), torch.randn(1, EMBED))
    output.logits.mean().backward()
    for pathway in net.pathways:
        assert pathway.router.layers[-1].weight.grad.abs().sum() > 0
        with_grad = [k for k, p in pathway.sub_pathways.items() if p.conv1.conv.weight.grad is not None]
        assert len(with_grad) == 1


def test_grouped_execution_equals_per_sample_execution():
    torch.manual_seed(1)
    pathway = AutomaticPathway([torch.nn.Conv3d(4, 2, 1) for _ in range(3)], EMBED).eval()
    features = torch.randn(6, 4, 5, 5, 5)
    weights = torch.nn.functional.one_hot(torch.tensor([0, 2, 0, 1, 2, 2]), 3).float()
    grouped = pathway(features, weights)
    single = torch.cat([pathway(features[i : i + 1], weights[i : i + 1]) for i in range(6)])
    assert torch.allclose(grouped, single, atol=1e-6)


def _decoder_inputs(net: PromptSegNet, routes: list[list[int]], image_index: list[int]):
    """Random skips of two 64x32x32 images and leaf one-hot route weights (per level, N x M)."""
    torch.manual_seed(2)
    dtype = next(net.parameters()).dtype
    channels = [*net.encoder.out_channels[4::-1], 1]
    skips = [torch.randn(2, c, 64 >> k, 32 >> k, 32 >> k, dtype=dtype) for k, c in zip(range(5, -1, -1), channels)]
    m = net.decoder.pathways[0].num_paths
    weights = [
        torch.nn.functional.one_hot(torch.tensor([r[level] for r in routes]), m).to(dtype).requires_grad_()
        for level in range(5)
    ]
    return skips, weights, torch.tensor(image_index)


def test_route_prefix_sharing_equals_decoding_each_pair_alone():
    """Pairs 0-2 share image 0 and the prefix (1, 2), pairs 0 and 1 the whole route; pair 3 has the
    same route on image 1. Outputs and every convolution's gradient equal per-pair decoding; each
    route weight gets the mean gradient of the pairs sharing its prefix (its own when alone)."""
    net = tiny().train().double()  # float64: the comparison is of the computation, not of rounding
    routes = [[1, 2, 0, 1, 2], [1, 2, 0, 1, 2], [1, 2, 2, 0, 1], [1, 2, 0, 1, 2]]
    skips, weights, image_index = _decoder_inputs(net, routes, [0, 0, 0, 1])
    probe = torch.randn(4, 8, 64, 32, 32, dtype=torch.float64)  # a loss that differs per pair
    shared = net.decoder(skips, weights, image_index)[0]
    (shared * probe).sum().backward()
    shared_grads = {n: p.grad.clone() for n, p in net.decoder.named_parameters() if p.grad is not None}
    shared_weight_grads = [w.grad.clone() for w in weights]
    net.zero_grad()
    alone, alone_weight_grads = [], [torch.zeros_like(w) for w in weights]
    for pair in range(4):
        single = [w.detach()[pair : pair + 1].requires_grad_() for w in weights]
        output = net.decoder(skips, single, image_index[pair : pair + 1])[0]
        (output * probe[pair : pair + 1]).sum().backward()
        alone.append(output.detach())
        for level, w in enumerate(single):
            alone_weight_grads[level][pair] = w.grad[0]
    assert torch.allclose(shared, torch.cat(alone), atol=1e-10)
    for name, grad in shared_grads.items():
        reference = dict(net.decoder.named_parameters())[name].grad
        assert torch.allclose(grad, reference, atol=1e-8, rtol=1e-8), name
    groups_per_level = [[[0, 1, 2], [3]], [[0, 1, 2], [3]], [[0, 1], [2], [3]], [[0, 1], [2], [3]], [[0, 1], [2], [3]]]
    for level, groups in enumerate(groups_per_level):
        for group in groups:
            mean = alone_weight_grads[level][group].mean(0)
            for pair in group:
                assert torch.allclose(shared_weight_grads[level][pair], mean, atol=1e-8, rtol=1e-8)
    assert not torch.allclose(alone_weight_grads[2][0], alone_weight_grads[2][2])  # the test can tell


def test_route_prefix_sharing_runs_each_sub_pathway_once_per_group():
    net = tiny().train()
    calls: list[tuple[int, int]] = []
    for level, pathway in enumerate(net.pathways):
        for sub_pathway in pathway.sub_pathways.values():
            sub_pathway.register_forward_hook(lambda _m, args, _o, level=level: calls.append((level, len(args[0]))))
    routes = [[1, 2, 0, 1, 2], [1, 2, 0, 1, 2], [1, 2, 2, 0, 1], [1, 2, 0, 1, 2]]
    skips, weights, image_index = _decoder_inputs(net, routes, [0, 0, 0, 0])
    net.decoder(skips, weights, image_index)
    assert sorted(calls) == [(0, 1), (1, 1), (2, 1), (2, 1), (3, 1), (3, 1), (4, 1), (4, 1)]


def test_channels_last_network_gives_the_same_output_and_gradients():
    contiguous, channels_last = tiny(channels_last=False).train(), tiny(channels_last=True).train()
    for net in (contiguous, channels_last):
        net.set_routing_schedule(1.0, 0.0)
    conv = channels_last.decoder.pathways[0].sub_pathways["0"].conv1.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    image, prompts = torch.randn(1, 1, 32, 32, 32), torch.randn(3, EMBED)
    outputs = [net(image, prompts, torch.zeros(3, dtype=torch.long)).logits for net in (contiguous, channels_last)]
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    for output in outputs:
        output.square().mean().backward()
    for (name, a), b in zip(contiguous.named_parameters(), channels_last.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:  # float32 sums in another order: compared to the gradient's scale
            assert (a.grad - b.grad).abs().max() <= 1e-3 * a.grad.abs().max(), name


def test_balance_loss_is_one_when_uniform_and_m_when_collapsed():
    assert balance_loss(torch.zeros(8, 4)).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[100.0, 0, 0, 0]]).repeat(8, 1)
    assert balance_loss(collapsed).item() == pytest.approx(4.0, rel=1e-4)


@pytest.mark.parametrize("route_head", [False, True])
def test_trimmed_network_matches_full_network_and_refuses_other_routes(route_head):
    net = tiny(route_head=route_head).eval()
    prompts = torch.randn(8, EMBED)
    routes = net.routes(prompts)
    keep = prompts[:1]
    trimmed = net.trimmed(keep)
    assert count_parameters(trimmed) < count_parameters(net)
    image = torch.randn(1, 1, 40, 40, 40)
    difference = (net(image, keep).logits - trimmed(image, keep).logits).abs().max()
    assert difference <= 1e-5
    other = [i for i in range(8) if any(routes[i, lvl] != routes[0, lvl] for lvl in range(5))]
    assert other, "random router should give some prompt another route"
    with pytest.raises(ValueError, match="trimming removed"):
        trimmed(image, prompts[other[0] : other[0] + 1])


def test_prompts_sharing_a_route_still_get_their_own_mask():
    net = tiny(num_paths=1).eval()
    prompts = torch.randn(2, EMBED)
    assert shared_route_groups(
        {"a": tuple(net.routes(prompts)[0].tolist()), "b": tuple(net.routes(prompts)[1].tolist())}
    )
    logits = net(torch.randn(1, 1, 32, 32, 32), prompts, torch.tensor([0, 0])).logits
    assert not torch.allclose(logits[0], logits[1])


def test_plain_head_ablation_gives_the_same_mask_for_a_shared_route():
    net = tiny(num_paths=1, prompt_head=False).eval()
    logits = net(torch.randn(1, 1, 32, 32, 32), torch.randn(2, EMBED), torch.tensor([0, 0])).logits
    assert torch.allclose(logits[0], logits[1])


def test_paper_configuration_reproduces_the_paper_sizes_within_two_percent(tmp_path):
    counts = parameter_counts(network_from_config(__import__("pathlib").Path("configs/paper.yaml")))
    assert counts["params_encoder"] == pytest.approx(8.06, rel=0.02)
    assert counts["params_full"] == pytest.approx(60.50, rel=0.02)
    assert counts["params_trimmed"] == pytest.approx(26.75, rel=0.02)


def test_export_params_command_prints_one_json_line(capsys):
    from export import main

    assert main(["--config", "configs/paper.yaml", "--params"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("{") and "params_full" in line and "\n" not in line


def test_routing_noise_scale_controls_exploration():
    from networks.routing import route_weights

    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, 0.0]]).repeat(2000, 1)
    greedy = route_weights(logits, training=True, temperature=1.0, noise_scale=0.0)
    noisy = route_weights(logits, training=True, temperature=1.0, noise_scale=1.0)
    assert torch.equal(greedy.argmax(1), torch.zeros(2000, dtype=torch.long))
    share = (noisy.argmax(1) == 0).float().mean().item()
    expected = torch.softmax(logits[0], 0)[0].item()  # Gumbel-max samples the softmax
    assert share == pytest.approx(expected, abs=0.03)
    assert torch.allclose(noisy.sum(1), torch.ones(2000))


def test_prompt_embeddings_are_standardised_so_their_scale_does_not_matter():
    network = tiny().eval()
    image, prompt = torch.rand(1, 1, 64, 64, 64), torch.randn(2, EMBED)
    with torch.no_grad():
        reference = network(image, prompt, torch.zeros(2, dtype=torch.long)).logits
        rescaled = network(image, 7.0 * prompt + 0.5, torch.zeros(2, dtype=torch.long)).logits
    assert torch.allclose(reference, rescaled, atol=1e-4)
    assert torch.equal(network.routes(prompt), network.routes(7.0 * prompt + 0.5))


@pytest.mark.parametrize("prompt_head", [True, False])
def test_heads_start_at_the_foreground_prior(prompt_head):
    network = tiny(prompt_head=prompt_head)
    features = torch.zeros(3, TINY_NETWORK["decoder_channels"][-1], 8, 8, 8)
    probability = torch.sigmoid(network.head(features, torch.randn(3, EMBED)))
    assert probability.shape == (3, 1, 8, 8, 8)
    assert torch.allclose(probability, torch.full_like(probability, FOREGROUND_PRIOR), atol=1e-6)


def test_level_conditioning_starts_as_the_identity_and_separates_prompts_on_one_route():
    net = tiny(level_conditioning=True, head_hidden=4).eval()
    modulation = net.decoder.modulation
    features = torch.randn(2, 24, 4, 4, 4)
    assert torch.equal(modulation(0, features, torch.randn(2, 128)), features)
    with torch.no_grad():
        for generator in modulation.generators:
            generator.weight.normal_()
    for pathway in net.pathways:  # one route for every prompt
        pathway.keep_only({0})
        with torch.no_grad():
            pathway.router.layers[-1].bias.copy_(torch.tensor([100.0, 0.0, 0.0]))
    prompts = torch.randn(2, EMBED)
    image = torch.randn(1, 1, 32, 32, 32)
    assert torch.equal(net.routes(prompts)[0], net.routes(prompts)[1])
    together = net(image, prompts, torch.tensor([0, 0])).logits
    alone = torch.cat([net(image, p[None]).logits for p in prompts])
    assert torch.allclose(together, alone, atol=1e-5)  # shared-route decoding keeps prompts apart
    assert not torch.allclose(together[0], together[1], atol=1e-3)


def test_hidden_head_matches_a_hand_computed_two_layer_read_out():
    from networks.head import PromptConditionedHead

    torch.manual_seed(0)
    head = PromptConditionedHead(3, 5, hidden=2)
    features, embedding = torch.randn(1, 3, 2, 2, 2), torch.randn(1, 5)
    params = head.generator(embedding)[0]
    w1, b1, w2, b2 = params[:6].view(3, 2), params[6:8], params[8:10], params[10]
    hidden = torch.relu(torch.einsum("cxyz,ch->hxyz", features[0], w1) + b1.view(2, 1, 1, 1))
    expected = torch.einsum("hxyz,h->xyz", hidden, w2) + b2
    assert torch.allclose(head(features, embedding)[0, 0], expected, atol=1e-6)
    assert abs(torch.sigmoid(params[10]).item() - FOREGROUND_PRIOR) < 1e-6


def test_reference_network_selects_one_output_channel_per_task():
    from networks.reference_net import ReferenceNet

    torch.manual_seed(0)
    net = ReferenceNet(3, (4, 4, 8, 8, 16, 16)).eval()
    image = torch.randn(2, 1, 40, 36, 33)
    padded = torch.nn.functional.pad(image, (0, 31, 0, 28, 0, 24)) - net.input_offset
    every = net.unet(padded)[..., :40, :36, :33]
    output = net(image, torch.eye(3)[[2, 0, 1]], torch.tensor([0, 1, 1]))
    assert output.logits.shape == (3, 1, 40, 36, 33)
    for pair, (image_index, channel) in enumerate([(0, 2), (1, 0), (1, 1)]):
        assert torch.allclose(output.logits[pair, 0], every[image_index, channel], atol=1e-5)
    with pytest.raises(ValueError, match="only its training prompts"):
        net(image[:1], torch.randn(1, 3))


def test_input_offset_centres_the_window_and_older_checkpoints_load_uncentred(checkpoint, tmp_path):
    from inference.checkpoints import load_model

    centred, uncentred = tiny(input_offset=0.5).eval(), tiny(input_offset=0.0).eval()
    uncentred.load_state_dict(centred.state_dict())
    image, prompt = torch.rand(1, 1, 64, 64, 64), torch.randn(1, EMBED)
    assert torch.allclose(centred(image, prompt).logits, uncentred(image - 0.5, prompt).logits, atol=1e-5)
    assert load_model(checkpoint).network.input_offset == 0.5  # written with today's default
    older = torch.load(checkpoint, weights_only=True)
    del older["hyper_parameters"]["input_offset"]
    torch.save(older, tmp_path / "older.ckpt")
    assert load_model(tmp_path / "older.ckpt").network.input_offset == 0.0


def test_route_separation_against_a_hand_computed_case():
    """Two levels of two paths. Pairs 0 and 1 share a whole route with probability 0.5 and their
    targets overlap with Dice 2*2/(4+2): 0.5 * (1 - 2/3). Pair 2 never shares their route. Mean
    over the three pairs of the image: 1/18. On different images nothing is compared."""
    level_1 = torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]]).clamp_min(1e-12).log()
    level_2 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).clamp_min(1e-12).log()
    assert torch.allclose(shared_route_probability([level_1, level_2])[0, 1], torch.tensor(0.5))
    masks = torch.zeros(3, 1, 2, 2, 2)
    masks[0, 0, 0] = 1  # 4 voxels
    masks[1, 0, 0, 0] = 1  # 2 of them
    one_image = route_separation_loss([level_1, level_2], masks, torch.zeros(3, dtype=torch.long))
    assert one_image.item() == pytest.approx(1 / 18, abs=1e-6)
    assert route_separation_loss([level_1, level_2], masks, torch.arange(3)).item() == 0.0
    same_target = masks[[0, 0, 2]]  # pairs 0 and 1 now have one target: no pull apart
    assert route_separation_loss([level_1, level_2], same_target, torch.zeros(3, dtype=torch.long)).item() < 1e-6


def test_route_separation_gradient_pulls_routes_of_different_targets_apart():
    logits = [
        torch.zeros(2, 3, requires_grad=True),
        torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True),
    ]
    masks = torch.zeros(2, 1, 2, 2, 2)
    masks[0, 0, 0], masks[1, 0, 1] = 1, 1  # disjoint targets
    route_separation_loss(logits, masks, torch.zeros(2, dtype=torch.long)).backward()
    step = [level - 0.1 * level.grad for level in logits]
    assert shared_route_probability(step)[0, 1] < shared_route_probability(logits)[0, 1]


def test_reference_deep_supervision_adds_full_size_coarse_outputs_in_training_only():
    from networks.reference_net import ReferenceNet

    torch.manual_seed(0)
    network = ReferenceNet(4, (4, 4, 8, 8, 16, 16), deep_supervision=2)
    image, rows, index = torch.rand(1, 1, 40, 64, 64), torch.eye(4)[[1, 3]], torch.tensor([0, 0])
    trained = network(image, rows, index)
    assert trained.logits.shape == (2, 1, 40, 64, 64)
    assert [tuple(d.shape) for d in trained.deep_logits] == [(2, 1, 40, 64, 64)] * 2
    assert not torch.allclose(trained.deep_logits[0], trained.logits)
    inferred = network.eval()(image, rows, index)
    assert inferred.deep_logits == [] and torch.allclose(inferred.logits, trained.logits, atol=1e-5)


def test_deep_supervision_heads_read_their_own_decoder_levels_in_training_only():
    """Two heads (1/2 and 1/4): logits per pair at their level's resolution (the input's 40 rows
    padded to 64, cropped back to 20 and 10) in training, none at inference; a loss on the 1/4
    head's logits reaches the sub-pathways up to the 1/4 level and not the finer ones."""
    net = tiny(deep_supervision=2).train()
    net.set_routing_schedule(temperature=1.0, noise_scale=0.0)  # training takes the inference routes
    image, prompts, index = torch.rand(1, 1, 40, 64, 64), torch.randn(2, EMBED), torch.tensor([0, 0])
    trained = net(image, prompts, index)
    assert [tuple(d.shape) for d in trained.deep_logits] == [(2, 1, 20, 32, 32), (2, 1, 10, 16, 16)]
    assert not torch.allclose(trained.deep_logits[0][0], trained.deep_logits[0][1])  # conditioned on the prompt
    trained.deep_logits[1].sum().backward()
    moved = [
        any(p.grad is not None and p.grad.abs().sum() > 0 for p in pathway.parameters()) for pathway in net.pathways
    ]
    assert moved == [True, True, True, False, False]
    assert net.head.generator.weight.grad is None and net.deep_heads[0].generator.weight.grad is None
    assert net.deep_heads[1].generator.weight.grad.abs().sum() > 0
    inferred = net.eval()(image, prompts, index)
    assert inferred.deep_logits == [] and torch.allclose(inferred.logits, trained.logits, atol=1e-5)
    with pytest.raises(ValueError, match="deep_supervision"):
        tiny(deep_supervision=5)


def test_deep_supervision_heads_are_left_out_at_inference_and_added_for_fine_tuning(tmp_path):
    from inference.checkpoints import load_network_weights

    trained = tiny(deep_supervision=2)
    plain = tiny()
    torch.manual_seed(1)
    plain.head.generator.bias.data.normal_()  # differs from the trained head before loading
    load_network_weights(plain, save_checkpoint(trained, tmp_path / "deep.ckpt"))
    assert torch.equal(plain.head.generator.bias, trained.head.generator.bias)
    assert not any(k.startswith("deep_heads.") for k in plain.state_dict())
    fine_tuned = tiny(deep_supervision=1)
    own_head = fine_tuned.deep_heads[0].generator.weight.clone()
    load_network_weights(fine_tuned, save_checkpoint(tiny(), tmp_path / "plain.ckpt"))
    assert torch.equal(fine_tuned.deep_heads[0].generator.weight, own_head)


def test_route_head_generates_the_read_out_from_the_prompt_and_its_route():
    """With ``route_head`` the head reads the standardised prompt followed by one one-hot per level,
    and another route's one-hots give the same prompt another read-out of the same features."""
    net = tiny(route_head=True).eval()
    prompts = torch.randn(2, EMBED)
    seen = {}
    net.head.register_forward_hook(lambda _, args, out: seen.update(features=args[0], input=args[1], logits=out))
    net(torch.randn(1, 1, 32, 32, 32), prompts, torch.tensor([0, 0]))
    routes = net.routes(prompts)
    one_hots = torch.cat([F.one_hot(routes[:, level], 3).float() for level in range(5)], dim=1)
    assert torch.equal(seen["input"][:, EMBED:], one_hots)
    assert torch.allclose(seen["input"][:, :EMBED], standardise(prompts))
    rerouted = torch.cat([seen["input"][:, :EMBED], one_hots.roll(1, dims=1)], dim=1)
    logits = seen["logits"]  # kept: the hook records the call below too
    assert not torch.allclose(net.head(seen["features"], rerouted), logits)


def test_route_head_checkpoint_round_trip(tmp_path):
    """A checkpoint trained with ``route_head`` loads with it and gives the same logits."""
    net = tiny(route_head=True).eval()
    hparams = tiny_network_hparams(embedding_dim=EMBED, route_head=True)
    loaded = load_model(save_checkpoint(net, tmp_path / "route_head.ckpt", hparams)).network
    assert loaded.route_head
    image, prompt = torch.randn(1, 1, 32, 32, 32), torch.randn(1, EMBED)
    assert torch.allclose(loaded(image, prompt).logits, net(image, prompt).logits, atol=1e-5)


def test_prompt_centre_is_subtracted_before_standardising_and_travels_with_the_weights(tmp_path):
    centred, plain = tiny().eval(), tiny().eval()
    training_prompts = torch.randn(3, EMBED) + 2.0  # a shared component, as text encoders give
    centred.centre_prompts(training_prompts)
    assert torch.allclose(centred.prompt_centre, training_prompts.mean(dim=0))
    image, prompt = torch.rand(1, 1, 64, 64, 64), torch.randn(2, EMBED)
    with torch.no_grad():
        expected = plain(image, prompt - training_prompts.mean(dim=0), torch.zeros(2, dtype=torch.long)).logits
        assert torch.allclose(centred(image, prompt, torch.zeros(2, dtype=torch.long)).logits, expected, atol=1e-5)
        assert not torch.allclose(plain(image, prompt, torch.zeros(2, dtype=torch.long)).logits, expected, atol=1e-3)
    assert torch.equal(centred.routes(prompt), plain.routes(prompt - training_prompts.mean(dim=0)))
    assert torch.equal(centred.trimmed(prompt).prompt_centre, centred.prompt_centre)
    hparams = tiny_network_hparams(embedding_dim=EMBED)
    loaded = load_model(save_checkpoint(centred, tmp_path / "centred.ckpt", hparams)).network
    assert torch.equal(loaded.prompt_centre, centred.prompt_centre)
    older = torch.load(tmp_path / "centred.ckpt", weights_only=True)
    del older["state_dict"]["network.prompt_centre"]  # weights saved before centring existed
    torch.save(older, tmp_path / "older.ckpt")
    assert torch.equal(load_model(tmp_path / "older.ckpt").network.prompt_centre, torch.zeros(EMBED))
    with pytest.raises(ValueError, match=rf"\(P, {EMBED}\)"):
        centred.centre_prompts(torch.randn(3, EMBED + 1))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_take_rows_equals_indexing_in_values_gradients_and_layout(memory_format):
    """Rows taken twice, once and never (row 1): the same values and gradients as ``x[index]``."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6, 7, dtype=torch.float64).to(memory_format=memory_format).requires_grad_()
    index = torch.tensor([2, 0, 2, 3, 2])
    upstream = torch.randn(5, 3, 5, 6, 7, dtype=torch.float64).to(memory_format=memory_format)
    taken = take_rows(x, index)
    (expected_grad,) = torch.autograd.grad(x[index], x, upstream)
    (grad,) = torch.autograd.grad(taken, x, upstream)
    assert torch.equal(taken, x[index])
    assert torch.allclose(grad, expected_grad) and not grad[1].any()
    assert torch.allclose(grad[2], upstream[0] + upstream[2] + upstream[4])
    assert grad.is_contiguous(memory_format=memory_format) and taken.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("side", [(2, 2, 2), (2, 4, 4), (4, 2, 3)])
def test_a_convolution_over_a_2_voxel_side_has_float32_gradients_under_cpu_bf16_autocast(side):
    """oneDNN's bf16 weight gradient of a 3x3x3 convolution over a side of 2 is wrong on AVX512-BF16
    CPUs (networks/precision.py); the guarded convolution computes exactly what it computes in float32."""
    from networks.decoder import residual_block
    from networks.precision import float32_on_small_maps

    torch.manual_seed(0)
    conv = float32_on_small_maps(nn.Conv3d(16, 8, 3, padding=1)).to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 16, *side).to(memory_format=torch.channels_last_3d)
    upstream = torch.randn(1, 8, *side)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x.bfloat16())  # a bf16 input, as from the layer before
    assert out.dtype == torch.float32
    grads = torch.autograd.grad((out * upstream).sum(), [conv.weight, conv.bias])
    expected = torch.autograd.grad((conv(x.bfloat16().float()) * upstream).sum(), [conv.weight, conv.bias])
    for autocast, exact in zip(grads, expected, strict=True):
        assert torch.allclose(autocast, exact, rtol=1e-5, atol=1e-6)
    guarded_block = float32_on_small_maps(residual_block(16, 8))
    assert list(guarded_block.state_dict()) == list(residual_block(16, 8).state_dict())  # names unchanged


def test_convolutions_off_2_voxel_maps_and_1x1x1_convolutions_keep_bf16_under_cpu_autocast():
    from networks.precision import float32_on_small_maps

    guarded = float32_on_small_maps(nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.Conv3d(4, 4, 1)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert guarded[0](torch.randn(1, 4, 3, 4, 4)).dtype == torch.bfloat16  # no side of 2
        assert guarded[0](torch.randn(1, 4, 2, 4, 4)).dtype == torch.float32
        assert guarded[1](torch.randn(1, 4, 2, 2, 2)).dtype == torch.bfloat16  # 1x1x1: right in bf16
    assert guarded[0](torch.randn(1, 4, 2, 2, 2)).dtype == torch.float32  # autocast off: unchanged


@pytest.mark.parametrize("size", [(64, 64, 64), (96, 64, 128)])
def test_every_convolution_on_a_2_voxel_map_runs_in_float32_under_cpu_bf16_autocast(size):
    """A 64-voxel side is 2 voxels at 1/32 (the bottlenecks): every 3x3x3 convolution there runs in
    float32 and every other one in bf16, in both networks."""
    from networks.reference_net import ReferenceNet

    network = PromptSegNet(**TINY_NETWORK)
    reference = ReferenceNet(3, (4, 4, 8, 8, 16, 16))
    seen: list[tuple[tuple[int, ...], torch.dtype]] = []
    for module in [*network.modules(), *reference.modules()]:
        if isinstance(module, nn.Conv3d) and max(module.kernel_size) > 1:
            module.register_forward_hook(lambda m, i, o: seen.append((tuple(i[0].shape[2:]), o.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        network(
            torch.rand(1, 1, *size),
            torch.randn(2, network.embedding_dim),
            torch.zeros(2, dtype=torch.long),
        )
        reference(
            torch.rand(1, 1, *size),
            F.one_hot(torch.tensor([0, 2]), 3).float(),
            torch.zeros(2, dtype=torch.long),
        )
    on_2_voxels = [dtype for side, dtype in seen if 2 in side]
    elsewhere = [dtype for side, dtype in seen if 2 not in side]
    assert len(on_2_voxels) >= 3 and set(on_2_voxels) == {torch.float32}
    assert elsewhere and set(elsewhere) == {torch.bfloat16}
