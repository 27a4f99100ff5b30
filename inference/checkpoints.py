"""Loading checkpoints as weights only: Lightning checkpoints of training and trimmed exports.

Every file is read with ``torch.load(weights_only=True)``: a file that needs arbitrary objects
unpickled is refused, never executed. Foreign weights are checked key by key and shape by shape
before loading (as nnU-Net's ``load_pretrained_weights`` does), and the differences are named.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datamodules.files import atomic_write
from networks.prompt_seg_net import PromptSegNet
from networks.reference_net import ReferenceNet

TRIMMED_FORMAT = "prompt-seg-trimmed/1"
NETWORK_ARGS = (
    "feature_size",
    "decoder_channels",
    "num_paths",
    "router_hidden_dim",
    "prompt_head",
    "embedding_dim",
    "encoder_depths",
    "window_size",
)
# absent from older checkpoints: their values there
OPTIONAL_NETWORK_ARGS = {
    "level_conditioning": False,
    "head_hidden": 0,
    "input_offset": 0.0,
    "route_head": False,
    "input_windows": [],
}
TEXT_ARGS = ("text_encoder", "text_encoder_weights", "clip_model", "prompt_template")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and the reason."""


@dataclass
class LoadedModel:
    """A network ready for inference and what travels with it."""

    network: PromptSegNet | ReferenceNet
    network_args: dict
    prompt_embeddings: dict[str, torch.Tensor]
    preprocessing: dict
    text: dict = field(default_factory=dict)
    text_identity: str = ""
    tubular: dict[str, bool] = field(default_factory=dict)
    sw_roi: int = 96


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} refused: it needs arbitrary objects unpickled ({reason})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None
    if not isinstance(checkpoint, dict) or ("state_dict" not in checkpoint):
        raise CheckpointError(f"checkpoint {path} holds no state_dict: not a prompt-seg checkpoint")
    return checkpoint


def network_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The network's weights, without the Lightning ``network.`` prefix."""
    state = checkpoint["state_dict"]
    if checkpoint.get("format") == TRIMMED_FORMAT:
        return state
    return {k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")}


def check_state(network: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise a :class:`CheckpointError` naming missing, unexpected and mis-shaped keys."""
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{title} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
        raise CheckpointError(f"checkpoint {source} does not fit this network configuration; " + "; ".join(parts))


def _hparams(checkpoint: dict) -> dict:
    return checkpoint.get("hyper_parameters") or checkpoint.get("network_args") or {}


def load_network_weights(network: PromptSegNet, path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint's weights into ``network`` (trimming it to the stored paths, taking the
    input offset they were trained with) after checking them; return the stored prompt embeddings."""
    checkpoint = read_checkpoint(path)
    network.input_offset = float(_hparams(checkpoint).get("input_offset", OPTIONAL_NETWORK_ARGS["input_offset"]))
    for pathway, kept in zip(network.pathways, checkpoint.get("kept_paths", [])):
        pathway.keep_only(set(kept))
    state = with_prompt_centre(_fit_deep_heads(network, network_state(checkpoint)), network.embedding_dim)
    check_state(network, state, path)
    network.load_state_dict(state)
    return dict(checkpoint.get("prompt_embeddings", {}))


def with_prompt_centre(state: dict[str, torch.Tensor], embedding_dim: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Weights saved before prompt centring existed were trained uncentred: a zero centre."""
    return {f"{prefix}prompt_centre": torch.zeros(embedding_dim)} | state


def _fit_deep_heads(network: PromptSegNet, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Deep-supervision heads are training aids, not part of the segmenting network: a checkpoint's
    are dropped where the network has none, and the network keeps its own where the checkpoint has
    none (few-shot fine-tuning may supervise deep levels that joint training did not)."""
    own = {k: v for k, v in network.state_dict().items() if k.startswith("deep_heads.")}
    state = {k: v for k, v in state.items() if not k.startswith("deep_heads.") or k in own}
    return state | {k: v for k, v in own.items() if k not in state}


def load_reference(path: str | Path, checkpoint: dict) -> LoadedModel:
    """The reference network (``lightning_modules/reference.py``): no text encoder, no routes."""
    prompts, hparams = checkpoint.get("task_prompts"), _hparams(checkpoint)
    if not prompts or "filters" not in hparams:
        raise CheckpointError(f"checkpoint {path} is a reference checkpoint without its prompts or filters")
    offset = float(hparams.get("input_offset", OPTIONAL_NETWORK_ARGS["input_offset"]))
    windows = hparams.get("input_windows", OPTIONAL_NETWORK_ARGS["input_windows"])
    deep = int(hparams.get("deep_supervision", 0))  # its heads are unused at inference, but stored
    network = ReferenceNet(
        len(prompts), tuple(hparams["filters"]), input_offset=offset, deep_supervision=deep, input_windows=windows
    )
    state = network_state(checkpoint)
    check_state(network, state, path)
    network.load_state_dict(state)
    return LoadedModel(
        network.eval(),
        {
            "architecture": "reference",
            "filters": list(hparams["filters"]),
            "input_offset": offset,
            "input_windows": windows,
        },
        dict(checkpoint.get("prompt_embeddings", {})),
        dict(checkpoint.get("preprocessing", {})),
        {},
        "reference",
        dict(checkpoint.get("tubular", {})),
        int(hparams.get("sw_roi", 96)),
    )


def load_model(path: str | Path) -> LoadedModel:
    """Build the network a checkpoint describes and load its weights."""
    checkpoint = read_checkpoint(path)
    if checkpoint.get("architecture") == "reference":
        return load_reference(path, checkpoint)
    hparams = _hparams(checkpoint)
    missing = [k for k in NETWORK_ARGS if k not in hparams]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks network settings {missing}")
    args = {k: hparams[k] for k in NETWORK_ARGS} | {k: hparams.get(k, v) for k, v in OPTIONAL_NETWORK_ARGS.items()}
    network = PromptSegNet(
        1,
        args["embedding_dim"],
        args["feature_size"],
        tuple(args["decoder_channels"]),
        args["num_paths"],
        args["router_hidden_dim"],
        args["prompt_head"],
        tuple(args["encoder_depths"]),
        args["window_size"],
        args["level_conditioning"],
        args["head_hidden"],
        args["input_offset"],
        route_head=args["route_head"],
        input_windows=args["input_windows"],
    )
    embeddings = load_network_weights(network, path)
    return LoadedModel(
        network.eval(),
        args,
        embeddings,
        dict(checkpoint.get("preprocessing", {})),
        {k: hparams.get(k) for k in TEXT_ARGS},
        checkpoint.get("text_encoder_identity", ""),
        dict(checkpoint.get("tubular", {})),
        int(hparams.get("sw_roi", 96)),
    )


def save_trimmed(model: LoadedModel, prompts: list[str], path: str | Path) -> PromptSegNet:
    """Write the network trimmed to ``prompts``' routes with their embeddings; return it."""
    if isinstance(model.network, ReferenceNet):
        raise CheckpointError("the reference network has no routes to trim: use its checkpoint directly")
    missing = [p for p in prompts if p not in model.prompt_embeddings]
    if missing:
        raise CheckpointError(f"no embedding for prompts {missing}; embed them first")
    embeddings = torch.stack([model.prompt_embeddings[p] for p in prompts])
    trimmed = model.network.trimmed(embeddings)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "format": TRIMMED_FORMAT,
        "network_args": model.network_args | model.text | {"sw_roi": model.sw_roi},
        "state_dict": trimmed.state_dict(),
        "kept_paths": [p.kept_paths for p in trimmed.pathways],
        "prompt_embeddings": {p: model.prompt_embeddings[p] for p in prompts},
        "preprocessing": model.preprocessing,
        "text_encoder_identity": model.text_identity,
        "tubular": {p: model.tubular.get(p, False) for p in prompts},
    }
    atomic_write(target, lambda temporary: torch.save(checkpoint, temporary))
    return trimmed
