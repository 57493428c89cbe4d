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


def test_gpu_streaming_memory_stays_flat_with_length(tokenizer_dir):
    """A document 32 chunks long, streamed, peaks at most at twice the memory of a one-chunk document."""
    from st_mamba import from_config
    from tests.conftest import tiny_config

    chunk = 1024
    model = from_config(tiny_config(1, d_model=256), tokenizer_dir, seed=0, max_seq_length=None, chunk_size=chunk,
                        device="cuda")  # fmt: skip
    encoder = model[0].eval()

    def peak_above_weights(length: int) -> int:
        generator = torch.Generator(device="cuda").manual_seed(length)
        ids = torch.randint(1, 400, (1, length), device="cuda", generator=generator)
        features = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.inference_mode():
            encoder(features)["sentence_embedding"].sum().item()
        return torch.cuda.max_memory_allocated() - before

    peak_above_weights(chunk)  # warm-up: kernels compiled, allocator primed
    one_pass = peak_above_weights(chunk)
    streamed = peak_above_weights(32 * chunk)
    assert streamed <= 2 * one_pass, (
        f"{32 * chunk} tokens streamed peak at {streamed:,} B, one {chunk}-token pass at {one_pass:,} B"
    )


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_linear_adds_the_residual_in_the_gemm(dtype, tolerance):
    """ops.linear(..., residual=...) on CUDA (one addmm; addmm_ into the residual without autograd) against
    fp64 ``residual + y @ W.T``: values and gradients."""
    from st_mamba import ops

    g = torch.Generator().manual_seed(21)
    y, residual, weight = (torch.randn(*shape, generator=g) for shape in ((3, 37, 96), (3, 37, 40), (40, 96)))
    dout = torch.randn(3, 37, 40, generator=g)
    leaves = [t.to("cuda", dtype).requires_grad_() for t in (y, residual, weight)]
    out = ops.linear(leaves[0], leaves[2], None, leaves[1])
    grads = torch.autograd.grad(out, leaves, dout.to("cuda", dtype))
    exact = [t.double().requires_grad_() for t in (y, residual, weight)]
    expected = exact[1] + torch.nn.functional.linear(exact[0], exact[2])
    expected_grads = torch.autograd.grad(expected, exact, dout.double())
    assert out.dtype == dtype and out.shape == expected.shape
    with torch.no_grad():  # inference: the sum is written into the residual's memory
        residual_in = residual.to("cuda", dtype)
        in_place = ops.linear(y.to("cuda", dtype), weight.to("cuda", dtype), None, residual_in)
    assert in_place.data_ptr() == residual_in.data_ptr()
    pairs = [("out", out, expected), ("out, no grad", in_place, expected)]
    pairs += zip(("dy", "dresidual", "dweight"), grads, expected_grads, strict=True)
    for name, got, want in pairs:
        error = ((got.double().cpu() - want.detach()).abs().max() / want.detach().abs().max()).item()
        assert error <= tolerance, f"{name}: relative error {error:.3g} in {dtype}"
