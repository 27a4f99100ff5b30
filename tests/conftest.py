"""Shared fixtures: tiny network settings, a tiny random checkpoint, small phantom data sets (once a session)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from datamodules.phantoms import DATASETS, FEW_SHOT_DATASET, PRESETS, write_dataset
from datamodules.preprocessing import Preprocessing
from networks.prompt_seg_net import PromptSegNet

TINY_NETWORK = {
    "feature_size": 12,
    "decoder_channels": (24, 24, 16, 16, 8, 8),
    "num_paths": 3,
    "router_hidden_dim": 16,
    "encoder_depths": (1, 1, 1, 1),
    "window_size": 4,
}


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    for dataset in DATASETS:
        write_dataset(root, dataset, 3, PRESETS["small"], seed=0, progress=False)
    write_dataset(root, FEW_SHOT_DATASET, 3, PRESETS["small"], seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def phantom_registry(phantom_root: Path) -> Path:
    spec = yaml.safe_load(Path("configs/data/phantoms.yaml").read_text())
    for dataset in spec["datasets"]:
        dataset["path"] = str(phantom_root / Path(dataset["path"]).name)
    path = phantom_root / "registry.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="session")
def fewshot_registry(phantom_root: Path) -> Path:
    spec = yaml.safe_load(Path("configs/data/phantoms_fewshot.yaml").read_text())
    spec["datasets"][0]["path"] = str(phantom_root / FEW_SHOT_DATASET.folder)
    path = phantom_root / "fewshot.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


EMBEDDING_DIM = 8
PROMPTS = ("liver", "aorta")


def tiny_network_hparams(**overrides) -> dict:
    """Every ``PromptSegNet`` setting a checkpoint records: the defaults, then ``TINY_NETWORK``, then ``overrides``."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(PromptSegNet).parameters.items()
        if p.default is not inspect.Parameter.empty and name != "in_channels"
    }
    return defaults | TINY_NETWORK | overrides


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A Lightning-style checkpoint of a random tiny network whose text encoder is an embedding table."""
    root = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    hparams = tiny_network_hparams(embedding_dim=EMBEDDING_DIM)
    network = PromptSegNet(**hparams)
    vectors = F.normalize(torch.randn(len(PROMPTS), EMBEDDING_DIM), dim=1)
    table = root / "table.pt"
    torch.save({"identity": "test-table", "prompts": list(PROMPTS), "embeddings": vectors}, table)
    hparams |= {"text_encoder": "table", "text_encoder_weights": str(table), "sw_roi": 64}
    path = root / "tiny.ckpt"
    torch.save(
        {
            "state_dict": {f"network.{k}": v for k, v in network.state_dict().items()},
            "hyper_parameters": hparams,
            "prompt_embeddings": dict(zip(PROMPTS, vectors)),
            "preprocessing": Preprocessing(spacing_candidates=(4.0,)).as_dict(),
            "text_encoder_identity": "test-table",
        },
        path,
    )
    return path


THRESHOLD_HU = (300.0, -400.0)  # per prompt, in order: "liver" marks bone (700 HU), "aorta" the body


@pytest.fixture
def threshold_network(monkeypatch) -> tuple[float, ...]:
    """Replace the network's sliding-window output with a steep sigmoid of the windowed image around
    one HU level per prompt (:data:`THRESHOLD_HU`), so masks follow the image content (asymmetric where
    the image is) and every other step of ``segment.py`` runs as usual."""
    from inference import api

    def predict(network, image, embeddings, *args, **kwargs) -> torch.Tensor:
        window = Preprocessing()
        levels = window.window(torch.tensor(THRESHOLD_HU[: embeddings.shape[0]]))
        return torch.sigmoid((image[0, 0].float() - levels[:, None, None, None]) * 30.0)

    monkeypatch.setattr(api, "predict_volume", predict)
    return THRESHOLD_HU
