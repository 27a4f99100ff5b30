"""The paper's Table 3 on the phantom few-shot set: 1-shot and 5-shot adaptation to "renal artery".

    python fewshot_experiment.py --checkpoint outputs/quickstart/checkpoints/last.ckpt --output outputs/table3

Methods, each trained on the same shots and tested on the remaining cases of the few-shot data set:
ours (the joint checkpoint, routed, pruned, encoder frozen, decoder fine-tuned); the same
architecture without AP modules (M = 1) from scratch; MONAI SwinUNETR from scratch. Writes
``table.md`` (mean ± std of Dice, clDice, Tsens, Tprec in percent, ``*`` where a baseline differs
from ours with p < 0.05, two-tailed paired t-test, and the steps each method trained) and
``per_case.csv``. Model and data settings come from ``--config`` (default: the quickstart's, CPU-sized).

Budget: ``--epochs`` for every method, or ``--until-plateau``: every method trains until its mean
validation Dice stops improving (checked every ``--check-every`` epochs, stopped after ``--patience``
checks without a new best, at most ``--max-epochs``; a model from scratch trains at least
``--min-epochs``, so that it is not stopped before it starts to segment) and is tested with its best weights. Those
validation cases come from a separate phantom draw, never from the test cases:

    python make_phantoms.py --output data/phantoms_fewshot_val --preset small --cases 1 --few-shot-cases 3 --seed 2
    python fewshot_experiment.py --checkpoint ... --until-plateau --validation-registry configs/data/phantoms_fewshot_val.yaml
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml

from datamodules.multitask import MultiTaskDataModule
from evaluate import METRICS, markdown_table, paired_p_values
from export import model_init_args
from inference.sliding_window import predict_volume
from lightning_modules.baseline import SwinUNETRModule
from lightning_modules.prompt_seg_module import PromptSegModule
from metrics.segmentation import dice

NETWORK_KEYS = (
    "feature_size",
    "decoder_channels",
    "router_hidden_dim",
    "level_conditioning",
    "head_hidden",
    "encoder_depths",
    "window_size",
    "text_encoder",
    "sw_roi",
)


def data_for(config: dict, registry: str, seed: int, **split) -> MultiTaskDataModule:
    """The config's data settings on ``registry``, one prompt per image, split by ``split``
    (``shots=...`` or ``validation_fraction=...``)."""
    # the weights name the config's registry; the modules trained here keep no running task Dice
    ignored = ("registry", "shots", "prompts_per_image", "dataset_weights", "priority_sampling")
    settings = {k: v for k, v in config["data"].items() if k not in ignored}
    return MultiTaskDataModule(**settings | {"registry": registry, "prompts_per_image": 1, "seed": seed} | split)


class ValidationPlateau(L.Callback):
    """Every ``every`` epochs scores ``predict`` on ``volumes`` (mean Dice), keeps the best weights and
    stops training after ``patience`` checks without a new best. ``history`` holds (step, Dice)."""

    def __init__(self, predict: Callable, volumes: list[dict], every: int, patience: int) -> None:
        self.predict, self.volumes, self.every, self.patience = predict, volumes, every, patience
        self.history: list[tuple[int, float]] = []
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_dice, self.best_step, self.checks_without_best = -1.0, 0, 0

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every:
            return
        modes = {m: m.training for m in module.modules()}
        with torch.no_grad():
            mean_dice = float(np.mean([dice(predicted_mask(self.predict, v), truth(v)) for v in self.volumes]))
        for m, training in modes.items():
            m.train(training)
        self.history.append((trainer.global_step, mean_dice))
        if mean_dice > self.best_dice:
            self.best_dice, self.best_step, self.checks_without_best = mean_dice, trainer.global_step, 0
            self.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            self.checks_without_best += 1
        # also withdraws a stop signalled before ``min_epochs`` once the model improves again
        trainer.should_stop = self.checks_without_best >= self.patience


def predicted_mask(predict: Callable, volume: dict) -> np.ndarray:
    """The prediction of a volume's first task, thresholded at 0.5."""
    return (predict(volume["image"])[0] > 0.5).cpu().numpy()


def truth(volume: dict) -> np.ndarray:
    """The first task's mask of a validation volume."""
    return np.isin(volume["labels"].numpy(), volume["label_values"][0])


def from_checkpoint(module: L.LightningModule) -> bool:
    """Whether the module starts from trained weights (ours) rather than from scratch."""
    return bool(getattr(module.hparams, "init_checkpoint", None))


def train(
    module: L.LightningModule, data: MultiTaskDataModule, args: argparse.Namespace, predict: Callable, validation: list
) -> dict:
    """Train for ``args.epochs``, or until the validation plateau; returns the steps it took."""
    plateau = ValidationPlateau(predict, validation, args.check_every, args.patience) if args.until_plateau else None
    trainer = L.Trainer(
        max_epochs=args.max_epochs if plateau else args.epochs,
        min_epochs=args.min_epochs if plateau and not from_checkpoint(module) else None,
        accelerator="auto",
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=args.output,
        enable_progress_bar=False,
        callbacks=[plateau] if plateau else [],
    )
    trainer.fit(module, data)
    if plateau is None:
        return {"steps": trainer.global_step, "best_step": None, "validation": None}
    module.load_state_dict(plateau.best_state)
    return {"steps": trainer.global_step, "best_step": plateau.best_step, "validation": plateau.history}


def score(predict, data: MultiTaskDataModule, method: str, shots: int) -> list[dict]:
    rows = []
    for case in data.val_dataloader().dataset:
        prediction = predicted_mask(predict, case)
        rows.append(
            {"method": method, "shots": shots, "case": case["case"], "task": case["prompts"][0]}
            | {m: f(prediction, truth(case)) for m, f in METRICS.items()}
        )
    return rows


def methods(args: argparse.Namespace, config: dict) -> list[tuple[str, Callable[[], L.LightningModule]]]:
    """Table 3's methods by name, each a builder of a fresh module."""
    model = model_init_args(config)
    network = {k: v for k, v in model.items() if k in NETWORK_KEYS}
    epochs = args.max_epochs if args.until_plateau else args.epochs
    return [
        (
            "ours",
            lambda: PromptSegModule(
                **network,
                num_paths=model["num_paths"],
                lr=args.lr,
                init_checkpoint=str(args.checkpoint),
                finetune_prompt=args.prompt,
                joint_epochs=0,
                path_epochs=0,
            ),
        ),
        (
            "sole-path (M = 1)",
            lambda: PromptSegModule(
                **network, num_paths=1, lr=args.lr, balance_weight=0.0, joint_epochs=epochs, path_epochs=0
            ),
        ),
        ("SwinUNETR", lambda: SwinUNETRModule(model["feature_size"], lr=args.lr, sw_roi=model["sw_roi"])),
    ]


def predictor(module: L.LightningModule, prompt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Whole-volume probabilities (1, ...) of ``prompt`` (SwinUNETR has one output and no prompt)."""
    if isinstance(module, SwinUNETRModule):
        return module.predict_volume
    return lambda image: predict_volume(module.network, image, module.embed([prompt]), module.hparams.sw_roi)


def run_setting(
    args: argparse.Namespace, config: dict, shots: int, validation: list[dict]
) -> tuple[list[dict], list[dict]]:
    """Per-case test rows and each method's training budget for one shot count."""
    data = data_for(config, args.registry, args.seed, shots=shots)
    rows, budgets = [], []
    for name, build in methods(args, config):
        L.seed_everything(args.seed)
        module = build()
        predict = predictor(module, args.prompt)
        budgets.append({"method": name, "shots": shots} | train(module, data, args, predict, validation))
        rows += score(predict, data, name, shots)
    return rows, budgets


def validation_volumes(config: dict, registry: str, seed: int) -> list[dict]:
    """Every case of ``registry`` as a validation volume."""
    data = data_for(config, registry, seed, validation_fraction=1.0)
    data.setup("fit")
    return list(data.val_dataloader().dataset)


def write_outputs(rows: list[dict], budgets: list[dict], folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "per_case.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "training.json").write_text(json.dumps(budgets, indent=1))
    parts = []
    for shots in sorted({r["shots"] for r in rows}):
        subset = [r for r in rows if r["shots"] == shots]
        methods = {m: [r for r in subset if r["method"] == m] for m in dict.fromkeys(r["method"] for r in subset)}
        p_values = {name: paired_p_values(methods["ours"], other) for name, other in methods.items() if name != "ours"}
        parts.append(f"### {shots}-shot\n\n" + markdown_table(methods, p_values))
        parts.append(budget_table([b for b in budgets if b["shots"] == shots]))
    text = "\n".join(parts)
    (folder / "table.md").write_text(text)
    return text


def budget_table(budgets: list[dict]) -> str:
    """Steps each method trained and, under ``--until-plateau``, the step and Dice of its best validation."""
    lines = ["| Method | steps trained | best validation Dice | at step |", "|---|---|---|---|"]
    for b in budgets:
        best = max(b["validation"], key=lambda h: h[1]) if b["validation"] else None
        cells = (f"{100 * best[1]:.2f}", str(best[0])) if best else ("-", "-")
        lines.append(f"| {b['method']} | {b['steps']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="joint-training checkpoint")
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"), help="model and data settings")
    parser.add_argument("--registry", default="configs/data/phantoms_fewshot.yaml", help="the few-shot data set")
    parser.add_argument("--prompt", default="renal artery", help="the unseen prompt")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--epochs", type=int, default=4, help="training epochs for every method")
    parser.add_argument(
        "--until-plateau", action="store_true", help="train each method until validation stops improving"
    )
    parser.add_argument("--validation-registry", help="cases that detect the plateau (not the test cases)")
    parser.add_argument("--check-every", type=int, default=2, help="epochs between validations (--until-plateau)")
    parser.add_argument("--patience", type=int, default=5, help="validations without a new best before stopping")
    parser.add_argument(
        "--min-epochs", type=int, default=20, help="epochs before a plateau may stop a model from scratch"
    )
    parser.add_argument("--max-epochs", type=int, default=60, help="epoch cap under --until-plateau")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("outputs/table3"))
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    if args.until_plateau and not args.validation_registry:
        print("error: --until-plateau needs --validation-registry (cases apart from the test cases)", file=sys.stderr)
        return 2
    config = yaml.safe_load(args.config.read_text())
    validation = validation_volumes(config, args.validation_registry, args.seed) if args.until_plateau else []
    rows, budgets = [], []
    for shots in args.shots:
        setting_rows, setting_budgets = run_setting(args, config, shots, validation)
        rows += setting_rows
        budgets += setting_budgets
    print(write_outputs(rows, budgets, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
