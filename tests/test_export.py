from __future__ import annotations

import numpy as np
import onnxruntime
import torch

from export import export_onnx
from networks.prompt_seg_net import PromptSegNet
from tests.conftest import TINY_NETWORK


def test_onnx_export_of_the_trimmed_network_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    embedding = torch.randn(1, 32)
    trimmed = PromptSegNet(embedding_dim=32, **TINY_NETWORK).eval().trimmed(embedding)
    export_onnx(trimmed, embedding, tmp_path / "net.onnx", patch=64)
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"))
    image = torch.rand(1, 1, 64, 64, 64)
    exported = session.run(None, {session.get_inputs()[0].name: image.numpy()})[0]
    with torch.no_grad():
        reference = trimmed(image, embedding).logits.numpy()
    assert np.abs(exported - reference).max() <= 1e-4
