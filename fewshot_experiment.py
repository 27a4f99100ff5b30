"""The paper's Table 3 on the phantom few-shot set: 1-shot and 5-shot adaptation to "renal artery".

    python fewshot_experiment.py --checkpoint outputs/quickstart/checkpoints/last.ckpt --output outputs/table3

Methods, each trained on the same shots and tested on the remaining cases of the few-shot data set:
ours (the joint checkpoint, routed, pruned, encoder frozen, decoder fine-tuned); the same
architecture without AP modules (M = 1) from scratch; MONAI SwinUNETR from scratch. Writes
``table.md`` (mean ± std of Dice, clDice, Tsens, Tprec in percent, ``*`` where a baseline differs
from ours with p < 0.05, two-tailed paired t-test) and ``per_case.csv``. Model and data settings come
from ``--config`` (default: the quickstart's, CPU-sized).
"""

from __future__ import annotations

import argparse
import csv
import sys
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


def data_for(config: dict, registry: str, shots: int, seed: int) -> MultiTaskDataModule:
    settings = {k: v for k, v in config["data"].items() if k not in ("registry", "shots", "prompts_per_image")}
    return MultiTaskDataModule(
        **settings | {"registry": registry, "shots": shots, "prompts_per_image": 1, "seed": seed}
    )


def train(module: L.LightningModule, data: MultiTaskDataModule, epochs: int, root: Path) -> None:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=root,
        enable_progress_bar=False,
    )
    trainer.fit(module, data)


def score(predict, data: MultiTaskDataModule, method: str, shots: int) -> list[dict]:
    rows = []
    for case in data.val_dataloader().dataset:
        probability = predict(case["image"])
        prediction = (probability[0] > 0.5).cpu().numpy()
        truth = np.isin(case["labels"].numpy(), case["label_values"][0])
        rows.append(
            {"method": method, "shots": shots, "case": case["case"], "task": case["prompts"][0]}
            | {m: f(prediction, truth) for m, f in METRICS.items()}
        )
    return rows


def run_setting(args: argparse.Namespace, config: dict, shots: int) -> list[dict]:
    model = model_init_args(config)
    model_config = {k: v for k, v in model.items() if k in NETWORK_KEYS}
    L.seed_everything(args.seed)
    ours = PromptSegModule(
        **model_config,
        num_paths=model["num_paths"],
        lr=args.lr,
        init_checkpoint=str(args.checkpoint),
        finetune_prompt=args.prompt,
        joint_epochs=0,
        path_epochs=0,
    )
    data = data_for(config, args.registry, shots, args.seed)
    train(ours, data, args.epochs, args.output)
    rows = score(
        lambda image: predict_volume(ours.network, image, ours.embed([args.prompt]), ours.hparams.sw_roi),
        data,
        "ours",
        shots,
    )
    L.seed_everything(args.seed)
    sole = PromptSegModule(
        **model_config, num_paths=1, lr=args.lr, balance_weight=0.0, joint_epochs=args.epochs, path_epochs=0
    )
    train(sole, data, args.epochs, args.output)
    rows += score(
        lambda image: predict_volume(sole.network, image, sole.embed([args.prompt]), sole.hparams.sw_roi),
        data,
        "sole-path (M = 1)",
        shots,
    )
    L.seed_everything(args.seed)
    swin = SwinUNETRModule(model["feature_size"], lr=args.lr, sw_roi=model["sw_roi"])
    train(swin, data, args.epochs, args.output)
    rows += score(swin.predict_volume, data, "SwinUNETR", shots)
    return rows


def write_outputs(rows: list[dict], folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "per_case.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    parts = []
    for shots in sorted({r["shots"] for r in rows}):
        subset = [r for r in rows if r["shots"] == shots]
        methods = {m: [r for r in subset if r["method"] == m] for m in dict.fromkeys(r["method"] for r in subset)}
        p_values = {name: paired_p_values(methods["ours"], other) for name, other in methods.items() if name != "ours"}
        parts.append(f"### {shots}-shot\n\n" + markdown_table(methods, p_values))
    text = "\n".join(parts)
    (folder / "table.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="joint-training checkpoint")
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"), help="model and data settings")
    parser.add_argument("--registry", default="configs/data/phantoms_fewshot.yaml", help="the few-shot data set")
    parser.add_argument("--prompt", default="renal artery", help="the unseen prompt")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs for every method")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("outputs/table3"))
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    config = yaml.safe_load(args.config.read_text())
    torch.set_num_threads(torch.get_num_threads())
    rows = [row for shots in args.shots for row in run_setting(args, config, shots)]
    print(write_outputs(rows, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
