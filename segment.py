"""Segment new CT volumes with a trained (or trimmed) checkpoint, one mask per prompt.

    python segment.py --checkpoint CKPT --input PATH --prompt liver --prompt "renal artery" --output DIR

Input: a .nii/.nii.gz/.nrrd/.mha file, a DICOM series folder, or a folder of such cases. Output:
``DIR/CASE/PROMPT-SLUG.nii.gz`` (uint8 0/1) on exactly the input's grid. Files are written under a
temporary name and renamed, so an interrupted run leaves no partial mask.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from scipy import ndimage
from tqdm import tqdm

from datamodules.files import atomic_write
from datamodules.preprocessing import Preprocessing
from datamodules.registry import IMAGE_SUFFIXES
from datamodules.volumes import BadCaseError, read_image
from inference.checkpoints import CheckpointError, LoadedModel, load_model
from inference.preview import label_map, save_preview
from inference.sliding_window import predict_volume
from networks.text_encoders import PromptEmbedder, build_text_encoder

SIMILARITY_WARNING = 0.5


def slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")


def find_cases(path: Path) -> list[tuple[str, Path]]:
    """(case name, image path) pairs: one file, one DICOM folder, or a folder of either."""
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_file():
        return [(_case_name(path), path)]
    if any(f.suffix.lower() == ".dcm" for f in path.iterdir() if f.is_file()):
        return [(path.name, path)]
    cases = [(_case_name(f), f) for f in sorted(path.iterdir()) if f.is_file() and f.name.endswith(IMAGE_SUFFIXES)]
    cases += [(d.name, d) for d in sorted(path.iterdir()) if d.is_dir() and any(d.glob("*.dcm"))]
    if not cases:
        raise FileNotFoundError(f"input {path} holds no .nii/.nii.gz/.nrrd/.mha file or DICOM series")
    return cases


def _case_name(path: Path) -> str:
    for suffix in IMAGE_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def prompt_embeddings(model: LoadedModel, prompts: list[str]) -> torch.Tensor:
    """Stored embeddings, or the checkpoint's text encoder for new prompts (warning when far)."""
    missing = [p for p in prompts if p not in model.prompt_embeddings]
    if missing:
        encoder = build_text_encoder(
            model.text["text_encoder"],
            model.text.get("text_encoder_weights"),
            model.text.get("clip_model") or "ViT-B-32",
        )
        embedder = PromptEmbedder(encoder, model.text.get("prompt_template") or "{}")
        if model.text_identity and embedder.identity != model.text_identity:
            raise CheckpointError(
                f"text encoder {embedder.identity!r} differs from the checkpoint's {model.text_identity!r}"
            )
        known = torch.stack(list(model.prompt_embeddings.values()))
        for prompt, vector in zip(missing, embedder(missing)):
            similarity = float((known @ vector).max())
            if similarity < SIMILARITY_WARNING:
                warnings.warn(
                    f"prompt {prompt!r} is far from every training prompt (cosine {similarity:.2f})", stacklevel=2
                )
            model.prompt_embeddings[prompt] = vector
    return torch.stack([model.prompt_embeddings[p] for p in prompts])


def segment_case(
    model: LoadedModel, image: tio.ScalarImage, embeddings: torch.Tensor, args: argparse.Namespace
) -> np.ndarray:
    """Binary masks (P, ...) on the input grid; on GPU out-of-memory, retried with one window a batch."""
    preprocessing = Preprocessing(**model.preprocessing)
    spacing = preprocessing.closest_spacing(tuple(float(s) for s in image.spacing))
    prepared = preprocessing.prepare(tio.Subject(image=image), spacing)["image"]
    device = torch.device(args.device)
    model.network.to(device)

    def predict(sw_batch_size: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return predict_volume(
                model.network,
                prepared.data[None].to(device),
                embeddings.to(device),
                args.roi,
                args.overlap,
                sw_batch_size,
                sw_device=device,
                device=torch.device("cpu"),
            )

    try:
        probabilities = predict(args.sw_batch_size)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        print(f"GPU out of memory: retrying with 1 window a batch (was {args.sw_batch_size})", file=sys.stderr)
        probabilities = predict(1)
    masks = (Preprocessing.restore(probabilities.cpu(), prepared.affine, image) > 0.5).numpy()
    if args.largest_component:
        masks = np.stack([largest_component(m) for m in masks])
    return masks


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component (clean-up for organs)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count < 2:
        return mask
    sizes = ndimage.sum_labels(mask, labels, range(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def _save(array: np.ndarray, affine: np.ndarray, target: Path) -> None:
    atomic_write(target, lambda temporary: nib.save(nib.Nifti1Image(array, affine), temporary))


def write_outputs(
    folder: Path, masks: np.ndarray, prompts: list[str], image: tio.ScalarImage, args: argparse.Namespace
) -> None:
    """One uint8 mask per prompt; optionally a label map with a JSON legend and a PNG preview."""
    folder.mkdir(parents=True, exist_ok=True)
    for prompt, mask in zip(prompts, masks):
        _save(mask.astype(np.uint8), image.affine, folder / f"{slug(prompt)}.nii.gz")
    if args.label_map or args.preview:
        labels = label_map(masks)  # later prompts overwrite earlier ones
    if args.label_map:
        _save(labels, image.affine, folder / "labels.nii.gz")
        legend = {prompt: value for value, prompt in enumerate(prompts, start=1)}
        (folder / "labels.json").write_text(json.dumps(legend, indent=2))
    if args.preview:
        save_preview(folder / "preview.png", image.data[0].numpy(), labels)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="Lightning checkpoint or trimmed export")
    parser.add_argument("--input", type=Path, required=True, help="image file, DICOM series folder, or folder of cases")
    parser.add_argument("--prompt", action="append", required=True, help="what to segment (repeatable)")
    parser.add_argument("--output", type=Path, required=True, help="output folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    parser.add_argument(
        "--roi", type=int, default=None, help="sliding-window edge; default the validation window of training"
    )
    parser.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward pass")
    parser.add_argument("--largest-component", action="store_true", help="keep each mask's largest connected component")
    parser.add_argument("--label-map", action="store_true", help="also write labels.nii.gz with a labels.json legend")
    parser.add_argument("--preview", action="store_true", help="also write preview.png (axial, coronal, sagittal)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing masks")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if not 0.0 <= args.overlap < 1.0:
        raise ValueError(f"--overlap must lie in [0, 1), got {args.overlap}")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"--device {args.device} is not available ({error})") from None
    if any(not p.strip() for p in args.prompt):
        raise ValueError("--prompt must not be empty")
    model = load_model(args.checkpoint)
    args.roi = args.roi or model.sw_roi
    cases = find_cases(args.input)
    targets = [args.output / name / f"{slug(p)}.nii.gz" for name, _ in cases for p in args.prompt]
    existing = [t for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace outputs")
    embeddings = prompt_embeddings(model, args.prompt)
    images = {name: read_image(path) for name, path in cases}  # read all first: no output for bad input
    for name, image in tqdm(images.items(), desc="cases", disable=len(images) < 2):
        masks = segment_case(model, image, embeddings, args)
        write_outputs(args.output / name, masks, args.prompt, image, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (CheckpointError, BadCaseError, ValueError, FileNotFoundError, FileExistsError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
