"""Packed batches (texts end to end with ``cu_seqlens``) give the same embeddings as padded ones."""

from __future__ import annotations

import pytest
import torch

from st_mamba import MambaBackbone
from tests.conftest import random_texts, tiny_config

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pad_and_pack(lengths: list[int], vocab_size: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    padded = torch.randint(1, vocab_size, (len(lengths), longest), generator=g)
    keep = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    packed = padded[keep][None]  # (1, T)
    cu_seqlens = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    return padded.to(device), packed.to(device), cu_seqlens.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version", [1, 2], ids=["mamba1", "mamba2"])
def test_backbone_packed_equals_padded(version, device):
    torch.manual_seed(0)
    backbone = MambaBackbone(tiny_config(version)).reset_parameters(seed=0).to(device)
    lengths = [7, 1, 30, 12, 3]
    padded, packed, cu_seqlens = _pad_and_pack(lengths, 400, device, seed=1)
    with torch.no_grad():
        hidden_padded = backbone(padded)  # (B, L, D)
        hidden_packed = backbone(packed, cu_seqlens=cu_seqlens)[0]  # (T, D)
    eos = torch.tensor(lengths, device=device) - 1
    expected = hidden_padded[torch.arange(len(lengths), device=device), eos]
    actual = hidden_packed[cu_seqlens[1:].long() - 1]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # And every token, not only the last one.
    keep = torch.arange(max(lengths), device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    torch.testing.assert_close(hidden_packed, hidden_padded[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_backbone_packed_state_carries_per_text(device):
    """Final states of a packed batch equal each text's own final state (what streaming relies on)."""
    backbone = MambaBackbone(tiny_config(1)).reset_parameters(seed=0).to(device)
    lengths = [5, 2, 9]
    padded, packed, cu_seqlens = _pad_and_pack(lengths, 400, device, seed=2)
    with torch.no_grad():
        _, packed_state = backbone(packed, return_state=True, cu_seqlens=cu_seqlens)
        for i, length in enumerate(lengths):
            _, own_state = backbone(padded[i : i + 1, :length], return_state=True)
            for layer, (mine, theirs) in enumerate(zip(own_state, packed_state, strict=True)):
                torch.testing.assert_close(theirs.ssm[i : i + 1], mine.ssm, msg=f"layer {layer} ssm")
                torch.testing.assert_close(theirs.conv[i : i + 1], mine.conv, msg=f"layer {layer} conv")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_encode_packed_equals_padded_on_gpu(tokenizer_dir, dtype):
    """model.encode packs on the GPU; the padded batches (what preprocess gives with autograd on) agree."""
    pytest.importorskip("triton")
    from st_mamba import from_config

    model = from_config(tiny_config(1), tokenizer_dir, seed=0, max_seq_length=256, device="cuda")
    model.to(dtype).eval()  # preprocess packs at inference only (encode switches to eval mode itself)
    texts = random_texts(40, seed=3)
    encoder = model[0]
    with torch.inference_mode():  # as in encode
        assert "cu_seqlens" in encoder.preprocess(texts[:3])
    packed = model.encode(texts, batch_size=16, convert_to_tensor=True)
    padded = []
    for start in range(0, len(texts), 16):
        features = {k: v.to("cuda") for k, v in encoder.preprocess(texts[start : start + 16]).items()}
        assert "cu_seqlens" not in features
        with torch.inference_mode():
            padded.append(torch.nn.functional.normalize(encoder(features)["sentence_embedding"].float(), dim=-1))
    padded = torch.cat(padded)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(packed.float(), padded.float(), rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encode_on_gpu_pins_no_memory_per_batch(tokenizer_dir, monkeypatch):
    """Batches reach the GPU through the encoder's one pinned buffer: no pin_memory() per batch."""
    pytest.importorskip("triton")
    from st_mamba import from_config

    model = from_config(tiny_config(1), tokenizer_dir, seed=0, max_seq_length=256, device="cuda")
    texts = random_texts(40, seed=5)
    expected = model.encode(texts, batch_size=8, convert_to_tensor=True)
    calls = []
    real_pin = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: calls.append(1) or real_pin(self, *a))
    again = model.encode(texts, batch_size=8, convert_to_tensor=True)
    assert calls == []
    torch.testing.assert_close(again, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", ["scan", "conv"])
def test_triton_inference_path_equals_the_autograd_one(op):
    """Without gradients the Triton ops skip their autograd node; the outputs are the same."""
    pytest.importorskip("triton")
    from st_mamba.ops import triton as triton_ops

    g = torch.Generator().manual_seed(8)
    lengths = [5, 1, 40, 9]
    cu_seqlens = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to("cuda", torch.int32)
    T, Di, N = sum(lengths), 64, 16
    x = torch.randn(1, T, Di, generator=g).cuda().requires_grad_()
    if op == "conv":
        weight, bias = torch.randn(Di, 4, generator=g).cuda(), torch.randn(Di, generator=g).cuda()
        with_grad = triton_ops.causal_conv1d_triton(x, weight, bias, cu_seqlens=cu_seqlens)
        with torch.no_grad():
            without = triton_ops.causal_conv1d_triton(x, weight, bias, cu_seqlens=cu_seqlens)
    else:
        dt, z = (torch.randn(1, T, Di, generator=g).cuda() for _ in range(2))
        B, C = (torch.randn(1, T, N, generator=g).cuda() for _ in range(2))
        A, D = -torch.rand(Di, N, generator=g).cuda(), torch.randn(Di, generator=g).cuda()
        args = (x, dt, A, B, C, D, z, torch.randn(Di, generator=g).cuda(), True)
        with_grad = triton_ops.selective_scan_triton(*args, cu_seqlens=cu_seqlens)
        with torch.no_grad():
            without = triton_ops.selective_scan_triton(*args, cu_seqlens=cu_seqlens)
    assert with_grad.grad_fn is not None and without.grad_fn is None
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)
