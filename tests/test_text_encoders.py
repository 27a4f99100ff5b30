from __future__ import annotations

import time

import pytest
import torch

from networks.text_encoders import (
    CT_TEMPLATE,
    EmbeddingTable,
    MiniLMTextEncoder,
    OpenClipTextEncoder,
    PromptEmbedder,
)


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


def test_offline_encoder_semantics(minilm):
    vectors = PromptEmbedder(minilm)(["renal artery", "kidney", "lung"])
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_embedder_caches_each_prompt_once(minilm):
    embedder = PromptEmbedder(minilm, CT_TEMPLATE)
    calls = []
    original = minilm.encode
    minilm.encode = lambda texts: calls.append(texts) or original(texts)
    try:
        embedder(["liver", "liver", "aorta"])
        embedder(["liver"])
    finally:
        minilm.encode = original
    assert calls == [[CT_TEMPLATE.format("aorta"), CT_TEMPLATE.format("liver")]]


def test_empty_prompt_and_bad_template_are_rejected(minilm):
    with pytest.raises(ValueError, match="empty prompt"):
        PromptEmbedder(minilm)([" "])
    with pytest.raises(ValueError, match="template"):
        PromptEmbedder(minilm, "no placeholder")


def test_open_clip_plumbing_with_random_weights():
    encoder = OpenClipTextEncoder("ViT-B-32", pretrained=None)
    vectors = PromptEmbedder(encoder, CT_TEMPLATE)(["liver", "aorta"])
    assert vectors.shape == (2, 512)
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_open_clip_without_hub_fails_fast_with_instructions():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="local weights file"):
        OpenClipTextEncoder("ViT-B-32", pretrained="openai", hub_timeout_s=2.0)
    assert time.monotonic() - start < 15


def test_embedding_table_round_trip_and_identity_mismatch(minilm, tmp_path):
    embedder = PromptEmbedder(minilm, CT_TEMPLATE)
    path = tmp_path / "table.pt"
    embedder.save_table(str(path), ["liver", "aorta"])
    table = EmbeddingTable(str(path), expected_identity=embedder.identity)
    assert torch.allclose(PromptEmbedder(table)(["aorta"]), embedder(["aorta"]))
    with pytest.raises(ValueError, match="was made with"):
        EmbeddingTable(str(path), expected_identity="open_clip/ViT-B-32/openai")
    with pytest.raises(KeyError, match="not in the embedding table"):
        table.encode(["spleen"])


def test_a_module_on_an_embedding_table_takes_its_width_when_none_is_given(tmp_path):
    """``text_encoder: table`` with no ``embedding_dim`` (the default) reads the table's width."""
    from lightning_modules.prompt_seg_module import PromptSegModule
    from tests.conftest import TINY_NETWORK

    path = tmp_path / "table.pt"
    embeddings = torch.nn.functional.normalize(torch.randn(2, 24), dim=1)
    torch.save({"identity": "made by hand", "prompts": ["liver", "aorta"], "embeddings": embeddings}, path)
    module = PromptSegModule(**TINY_NETWORK, text_encoder="table", text_encoder_weights=str(path))
    assert module.hparams.embedding_dim == 24 and module.network.embedding_dim == 24
    assert torch.equal(module.embed(["aorta"]), embeddings[1:])
