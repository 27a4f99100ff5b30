"""Shared fixtures: tiny network settings and a small phantom data set written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from datamodules.phantoms import DATASETS, FEW_SHOT_DATASET, PRESETS, write_dataset

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
