"""Parameter counts of a configuration, and trimmed-model export of a checkpoint.

python export.py --config configs/paper.yaml --params
python export.py --checkpoint CKPT --prompt liver --prompt aorta --output trimmed.pt [--onnx trimmed.onnx]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from datamodules.files import check_writable, staged
from inference.checkpoints import NETWORK_ARGS, OPTIONAL_NETWORK_ARGS, CheckpointError, load_model, save_trimmed
from networks.prompt_seg_net import PromptSegNet, count_parameters

NETWORK_KEYS = (  # the embedding size comes from the text encoder
    *(k for k in (*NETWORK_ARGS, *OPTIONAL_NETWORK_ARGS) if k != "embedding_dim"),
    "channels_last",
)
EMBEDDING_DIMS = {"minilm": 384, "open_clip": 512}


def model_init_args(config: dict) -> dict:
    """The model's arguments in a LightningCLI config: ``model.init_args`` (or a bare ``model``)."""
    model = config.get("model") or {}
    return model.get("init_args", model) if isinstance(model, dict) else {}


def network_from_config(path: Path) -> PromptSegNet:
    """Build the network a LightningCLI config describes, with random weights and no text model."""
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    model = model_init_args(yaml.safe_load(path.read_text()) or {})
    kwargs = {k: model[k] for k in NETWORK_KEYS if k in model}
    kwargs["embedding_dim"] = model.get("embedding_dim") or EMBEDDING_DIMS[model.get("text_encoder", "minilm")]
    return PromptSegNet(**kwargs)


def parameter_counts(network: PromptSegNet) -> dict[str, float]:
    """Encoder, whole and one-route-trimmed sizes in millions (text encoder excluded)."""
    trimmed = network.trimmed(torch.zeros(1, network.embedding_dim))
    return {
        "params_encoder": round(count_parameters(network.encoder) / 1e6, 3),
        "params_full": round(count_parameters(network) / 1e6, 3),
        "params_trimmed": round(count_parameters(trimmed) / 1e6, 3),
    }


def export_onnx(network: PromptSegNet, embedding: torch.Tensor, path: Path, patch: int) -> None:
    """Trace the trimmed network for one prompt embedding to ONNX (input: image; embedding baked in)."""

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network
            self.register_buffer("embedding", embedding)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.network(image, self.embedding.expand(image.shape[0], -1)).logits

    torch.onnx.export(Fixed().eval(), (torch.zeros(1, 1, patch, patch, patch),), str(path), dynamo=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="a LightningCLI config (with --params)")
    parser.add_argument("--params", action="store_true", help="print the parameter counts as one JSON line")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to trim")
    parser.add_argument("--prompt", action="append", default=[], help="prompt to keep (repeatable)")
    parser.add_argument("--output", type=Path, help="trimmed checkpoint to write")
    parser.add_argument("--onnx", type=Path, help="also write the network trimmed to the first prompt as ONNX")
    parser.add_argument("--onnx-patch", type=int, default=64, help="input edge of the ONNX graph")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser.parse_args(argv)


def check_targets(args: argparse.Namespace) -> list[Path]:
    """The files to write (.pt, and .onnx if asked), each new or allowed to be replaced, and writable."""
    targets = [t for t in (args.output, args.onnx) if t is not None]
    if len(set(targets)) < len(targets):
        raise ValueError(f"--output and --onnx name the same file {args.output}")
    for flag, target in zip(("--output", "--onnx"), targets):
        if target.is_dir():
            raise ValueError(f"{flag} {target} is a folder; name the file to write")
        if target.exists() and not args.overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
        check_writable(target.parent, flag)
    return targets


def export_trimmed(args: argparse.Namespace) -> dict:
    """Write the trimmed checkpoint (and the ONNX graph) all or none; return the summary."""
    targets = check_targets(args)
    model = load_model(args.checkpoint)
    unknown = [p for p in args.prompt if p not in model.prompt_embeddings]
    if unknown:
        raise ValueError(f"prompts {unknown} have no embedding in {args.checkpoint}")
    with staged(targets) as temporaries:
        trimmed = save_trimmed(model, args.prompt, temporaries[0])
        if args.onnx is not None:
            embedding = model.prompt_embeddings[args.prompt[0]][None]
            try:
                export_onnx(trimmed, embedding, temporaries[1], args.onnx_patch)
            except (RuntimeError, OSError) as error:
                raise ValueError(f"--onnx {args.onnx}: export failed ({error}); nothing was written") from None
    summary = {
        "params_before": count_parameters(model.network) / 1e6,
        "params_after": count_parameters(trimmed) / 1e6,
        "output": str(args.output),
    }
    return summary | ({"onnx": str(args.onnx)} if args.onnx is not None else {})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.params:
            if args.config is None:
                raise ValueError("--params needs --config")
            print(json.dumps(parameter_counts(network_from_config(args.config))))
            return 0
        if args.checkpoint is None or args.output is None or not args.prompt:
            raise ValueError("give --checkpoint, --output and at least one --prompt (or --config with --params)")
        print(json.dumps(export_trimmed(args)))
        return 0
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
