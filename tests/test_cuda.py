"""The whole encoder on a CUDA GPU against the CPU fp32 reference (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from st_mamba.ops import use_backend
from tests.conftest import random_texts

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_gpu_embeddings_match_cpu_reference(tiny_model, dtype, tolerance):
    texts = random_texts(8, seed=11, max_words=120)
    with use_backend("reference"):
        expected = tiny_model.encode(texts, convert_to_tensor=True, device="cpu")
    tiny_model.to("cuda", dtype=dtype)
    actual = tiny_model.encode(texts, convert_to_tensor=True, device="cuda").float().cpu()
    error = (actual - expected).abs().max().item()
    assert error <= tolerance, f"max abs error {error:.3g} in {dtype}"


def test_gpu_streaming_equals_one_pass(tiny_model):
    texts = random_texts(4, seed=12, max_words=200)
    tiny_model.to("cuda")
    one_pass = tiny_model.encode(texts, convert_to_tensor=True, device="cuda")
    tiny_model[0].chunk_size = 32
    streamed = tiny_model.encode(texts, convert_to_tensor=True, device="cuda")
    assert (one_pass - streamed).abs().max().item() <= 1e-4
