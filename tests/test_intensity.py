"""Extra intensity windows as input channels (``networks/intensity.py``)."""

from __future__ import annotations

import pytest
import torch

from datamodules.preprocessing import Preprocessing
from inference.checkpoints import load_model, save_trimmed
from networks.intensity import SOFT_TISSUE_WINDOW, WindowChannels
from networks.prompt_seg_net import PromptSegNet
from tests.conftest import tiny_network_hparams

EMBED = 32


def windowed(hu: list[float], level: float = 0.0, width: float = 1800.0) -> torch.Tensor:
    """HU values as the preprocessing windows them, shaped (1, 1, len)."""
    return ((torch.tensor(hu) - (level - width / 2)) / width).clamp(0, 1).view(1, 1, -1)


def test_soft_tissue_channel_against_hand_computed_values():
    channels = WindowChannels([SOFT_TISSUE_WINDOW])(windowed([-500.0, -160.0, 40.0, 75.0, 240.0, 300.0]))
    assert channels.shape == (1, 2, 6)
    assert torch.allclose(channels[0, 0], windowed([-500.0, -160.0, 40.0, 75.0, 240.0, 300.0])[0, 0])
    # -160..240 HU to 0..1: 40 HU is the middle, 75 HU is 235/400, the rest clipped
    assert torch.allclose(channels[0, 1], torch.tensor([0.0, 0.0, 0.5, 0.5875, 1.0, 1.0]), atol=1e-5)


def test_a_liver_tumour_contrast_is_spread_by_the_width_ratio():
    channels = WindowChannels([SOFT_TISSUE_WINDOW])(windowed([25.0, 75.0]))
    source, soft = (channels[0, c, 1] - channels[0, c, 0] for c in (0, 1))
    assert torch.isclose(soft / source, torch.tensor(1800.0 / 400.0), rtol=1e-4)


def test_the_extra_channel_reads_hu_through_the_adopted_source_window():
    hu = [-100.0, 0.0, 60.0, 200.0]
    windows = WindowChannels([SOFT_TISSUE_WINDOW])
    paper = windows(windowed(hu))[0, 1]
    windows.adopt(Preprocessing(window_level=100.0, window_width=1000.0))
    assert torch.equal(windows.source_window, torch.tensor([100.0, 1000.0]))
    assert torch.allclose(windows(windowed(hu, 100.0, 1000.0))[0, 1], paper, atol=1e-5)


@pytest.mark.parametrize("windows", [[], [(40.0, 0.0)], [(40.0, -400.0)]])
def test_bad_windows_are_refused(windows):
    with pytest.raises(ValueError, match="input windows"):
        WindowChannels(windows)


def test_a_network_with_windows_reads_two_channels_and_round_trips_through_its_files(tmp_path):
    hparams = tiny_network_hparams(embedding_dim=EMBED, input_windows=[SOFT_TISSUE_WINDOW])
    torch.manual_seed(0)
    network = PromptSegNet(**hparams).eval()
    network.window_channels.adopt(Preprocessing(window_level=50.0, window_width=1500.0))
    assert network.encoder.swin.patch_embed.proj.in_channels == 2
    image, prompts = torch.rand(1, 1, 40, 36, 50), torch.randn(2, EMBED)
    expected = network(image, prompts, torch.tensor([0, 0])).logits
    assert expected.shape == (2, 1, 40, 36, 50)
    state = {f"network.{k}": v for k, v in network.state_dict().items()}
    embeddings = {"a": prompts[0], "b": prompts[1]}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "prompt_embeddings": embeddings}, tmp_path / "w.ckpt")
    loaded = load_model(tmp_path / "w.ckpt")
    assert torch.equal(loaded.network.window_channels.source_window, torch.tensor([50.0, 1500.0]))
    assert torch.allclose(loaded.network(image, prompts, torch.tensor([0, 0])).logits, expected, atol=1e-5)
    save_trimmed(loaded, ["a", "b"], tmp_path / "trimmed.pt")
    trimmed = load_model(tmp_path / "trimmed.pt")
    assert trimmed.network_args["input_windows"] == [SOFT_TISSUE_WINDOW]
    assert torch.allclose(trimmed.network(image, prompts, torch.tensor([0, 0])).logits, expected, atol=1e-5)


def test_a_checkpoint_without_windows_loads_with_one_channel(checkpoint):
    network = load_model(checkpoint).network
    assert network.window_channels is None and network.encoder.swin.patch_embed.proj.in_channels == 1


def test_the_reference_network_takes_the_same_windows_and_round_trips(tmp_path):
    from networks.reference_net import ReferenceNet

    torch.manual_seed(0)
    network = ReferenceNet(2, (4, 4, 8, 8, 16, 16), input_windows=[SOFT_TISSUE_WINDOW]).eval()
    assert network.unet.input_block.conv1.conv.in_channels == 2
    image = torch.rand(1, 1, 40, 36, 33)
    expected = network(image, torch.eye(2), torch.tensor([0, 0])).logits
    hparams = {"filters": [4, 4, 8, 8, 16, 16], "input_offset": 0.5, "input_windows": [SOFT_TISSUE_WINDOW]}
    state = {f"network.{k}": v for k, v in network.state_dict().items()}
    checkpoint = {"state_dict": state, "hyper_parameters": hparams, "architecture": "reference"}
    torch.save(checkpoint | {"task_prompts": ["a", "b"]}, tmp_path / "reference.ckpt")
    loaded = load_model(tmp_path / "reference.ckpt").network
    assert torch.allclose(loaded(image, torch.eye(2), torch.tensor([0, 0])).logits, expected, atol=1e-5)
