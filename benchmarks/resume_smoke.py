"""Training smoke of a config on phantoms: an uninterrupted run against one stopped in phase 2 and
resumed from its ``last.ckpt``, with augmentation and loader workers as the config sets them.

    python -m benchmarks.resume_smoke --config configs/paper.yaml --results RESULTS \\
        [--joint-epochs 2 --path-epochs 2 --stop-epoch 3 --steps-per-epoch 8] [-- extra train.py args]

Each run trains ``joint + path`` epochs of ``steps-per-epoch`` batches (validation once per phase
on one case); the interrupted one stops after epoch ``stop-epoch`` (inside phase 2) and is resumed
with ``--ckpt_path``; a second uninterrupted run measures run-to-run nondeterminism. Prints one JSON
line: wall times, whether the resumed run kept the routes (so trained the phase-2 sub-pathways) of
its stop and of the uninterrupted run, and the largest weight difference between the resumed and
the uninterrupted run beside that between the two uninterrupted runs. Floating-point reductions
that are not bitwise reproducible (GPU atomics; on a CPU, threads beside loader workers) make the
second figure non-zero, and Adam turns 1e-6 gradient differences into weight differences of the
order of the learning rate, so the two figures are compared, not asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import emit
from benchmarks.dataloader import relocated_registry
from inference.checkpoints import load_model, read_checkpoint

REPO = Path(__file__).resolve().parents[1]


def train(folder: Path, args: list[str]) -> float:
    """Run ``train.py fit`` in ``folder`` (the config's relative output paths land there); seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    environment = os.environ | {"WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", *args], cwd=folder, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"error: training in {folder} exited with {result.returncode}")
    return time.perf_counter() - start


def last_checkpoint(folder: Path, config: Path) -> Path:
    """The ``last.ckpt`` the config's checkpoint callback writes, relative to the run folder."""
    callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    dirpath = next(c["init_args"]["dirpath"] for c in callbacks if c["init_args"].get("save_last"))
    return folder / dirpath / "last.ckpt"


def routes(path: Path) -> dict[str, list[int]]:
    """Each task's route in a checkpoint: phase 2 trains exactly these sub-pathways."""
    model = load_model(path)
    prompts = sorted(model.prompt_embeddings)
    chosen = model.network.routes(torch.stack([model.prompt_embeddings[p] for p in prompts]))
    return dict(zip(prompts, chosen.tolist()))


def largest_difference(a: dict, b: dict) -> tuple[float, str]:
    worst, name = 0.0, ""
    for key, value in a["state_dict"].items():
        if value.is_floating_point():
            difference = (value.float() - b["state_dict"][key].float()).abs().max().item()
            if difference > worst:
                worst, name = difference, key
    return worst, name


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs/paper.yaml")
    parser.add_argument("--data-root", type=Path, default=REPO / "data/phantoms", help="make_phantoms.py output")
    parser.add_argument("--joint-epochs", type=int, default=2)
    parser.add_argument("--path-epochs", type=int, default=2)
    parser.add_argument("--stop-epoch", type=int, default=3, help="epochs the interrupted run trains before its stop")
    parser.add_argument("--steps-per-epoch", type=int, default=8)
    parser.add_argument("--results", type=Path, required=True, help="folder for the runs and resume_smoke.jsonl")
    parser.add_argument("extra", nargs="*", help="further train.py arguments (after --)")
    options = parser.parse_args(argv)
    epochs = options.joint_epochs + options.path_epochs
    if not options.joint_epochs < options.stop_epoch < epochs:
        raise SystemExit(
            f"error: --stop-epoch {options.stop_epoch} must lie inside phase 2 ({options.joint_epochs + 1}..{epochs - 1})"
        )
    root = (options.results / "resume_smoke").resolve()
    root.mkdir(parents=True, exist_ok=True)
    registry = relocated_registry(REPO / "configs/data/phantoms.yaml", options.data_root.resolve(), root)
    config = options.config.resolve()
    batch = yaml.safe_load(config.read_text())["data"].get("batch_size", 2)
    common = [
        *("--config", str(config), "--data.registry", str(registry), "--data.cache_dir", str(root / "cache")),
        *("--model.joint_epochs", str(options.joint_epochs), "--model.path_epochs", str(options.path_epochs)),
        *("--data.samples_per_epoch", str(options.steps_per_epoch * batch)),
        *("--trainer.check_val_every_n_epoch", str(max(1, options.joint_epochs))),
        *("--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"),
        *options.extra,
    ]
    straight, again, stopped = root / "straight", root / "again", root / "stopped"
    seconds = {"straight": train(straight, [*common, "--trainer.max_epochs", str(epochs)])}
    seconds["again"] = train(again, [*common, "--trainer.max_epochs", str(epochs)])
    seconds["until_stop"] = train(stopped, [*common, "--trainer.max_epochs", str(options.stop_epoch)])
    stop = last_checkpoint(stopped, config).with_name("stop.ckpt")
    last_checkpoint(stopped, config).rename(stop)
    seconds["resumed"] = train(stopped, [*common, "--trainer.max_epochs", str(epochs), "--ckpt_path", str(stop)])
    a, b, c = (read_checkpoint(last_checkpoint(folder, config)) for folder in (straight, stopped, again))
    difference, tensor = largest_difference(a, b)
    resumed_routes = routes(last_checkpoint(stopped, config))
    record = {
        "benchmark": "resume_smoke",
        "config": str(options.config),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "epochs": epochs,
        "stop_epoch": options.stop_epoch,
        "steps": [a["global_step"], b["global_step"]],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "resumed_kept_the_routes_of_its_stop": resumed_routes == routes(stop),
        "same_routes_as_uninterrupted": resumed_routes == routes(last_checkpoint(straight, config)),
        "max_weight_difference": difference,
        "max_difference_tensor": tensor,
        "run_to_run_max_weight_difference": largest_difference(a, c)[0],
    }
    emit(record, options.results, "resume_smoke")
    return record


if __name__ == "__main__":
    main()
