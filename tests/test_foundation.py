from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def pins(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        match = re.match(r"^\s*(?:-\s*)?([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s#]+)", line)
        if match:
            found[match.group(1).lower()] = match.group(3)
    return found


def test_requirements_and_environment_agree():
    requirements = pins(Path("requirements.txt").read_text().splitlines())
    environment = yaml.safe_load(Path("environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert requirements and requirements == pins(pip_section)


def test_print_config_resolves_the_quickstart():
    result = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/quickstart.yaml", "--print_config"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load(result.stdout)
    assert config["model"]["init_args"]["num_paths"] == 6 and config["data"]["patch_size"] == 64


def test_paper_config_carries_the_paper_hyper_parameters():
    config = yaml.safe_load(Path("configs/paper.yaml").read_text())
    model, data = config["model"]["init_args"], config["data"]
    assert (model["num_paths"], model["joint_epochs"], model["path_epochs"]) == (6, 3000, 1000)
    assert (model["lr"], model["weight_decay"], model["betas"][0]) == (2e-4, 1e-5, 0.9)
    assert data["spacing_candidates"] == [0.6, 1.0, 1.5] and data["random_spacing_probability"] == 0.1
    assert (data["window_width"], data["window_level"]) == (1800.0, 0.0)
    warmup = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("CosineWarmRestarts"))
    assert warmup["init_args"]["warmup"] == 50


def test_sweep_command_renders_into_arguments_train_py_parses():
    sweep = yaml.safe_load(Path("configs/sweeps/lr_routing.yaml").read_text())
    sample = {"model.lr": 3e-4, "model.temperature_end": 0.3, "model.balance_weight": 0.01}
    args = []
    for part in sweep["command"]:
        if part == "${args}":
            args += [f"--{k}={v}" for k, v in sample.items()]
        elif part not in ("${env}", "${interpreter}", "${program}"):
            args.append(part)
    result = subprocess.run(
        [sys.executable, "train.py", *args, "--print_config"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert yaml.safe_load(result.stdout)["model"]["init_args"]["lr"] == 3e-4


def test_native_bf16_check_agrees_with_the_cpu_flags():
    """quickstart.sh trains in bf16 only where the CPU has bfloat16 instructions (20x slower elsewhere)."""
    from train import cpu_has_native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    line = re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.MULTILINE) if cpuinfo.exists() else None
    if line is None:
        pytest.skip("needs the x86 CPU flags Linux reports in /proc/cpuinfo")
    flags = set(line.group(1).split())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
