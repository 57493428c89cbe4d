"""The pure-PyTorch fast paths against the sequential references: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch

from st_mamba.ops.chunked import causal_conv1d_torch, selective_scan_chunked, ssd_scan_chunked
from st_mamba.ops.reference import causal_conv1d_reference, selective_scan_reference, ssd_scan_reference


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5):
    """Compare and name the tensor that differs (with its worst error)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if not actual.numel():
        return
    error = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())  # atol is relative to the tensor's largest entry
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol * scale), f"{name}: max abs error {error:.3g}"


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def _grads(outputs, inputs, seed):
    """Backpropagate a fixed random cotangent through every output; return all input gradients."""
    generator = torch.Generator().manual_seed(seed)
    total = sum((out * torch.randn(out.shape, generator=generator)).sum() for out in outputs)
    return torch.autograd.grad(total, [t for t in inputs if t is not None])


@pytest.mark.parametrize("batch,length,chunk", [(1, 1, None), (2, 37, None), (3, 64, 8), (2, 50, 7), (1, 130, 200)])
@pytest.mark.parametrize("with_state", [False, True])
def test_selective_scan_chunked_matches_reference(batch, length, chunk, with_state):
    g = torch.Generator().manual_seed(batch * 1000 + length)
    d_inner, d_state = 12, 5
    x = torch.randn(batch, length, d_inner, generator=g)
    dt = torch.randn(batch, length, d_inner, generator=g)
    A = -torch.rand(d_inner, d_state, generator=g) * 4
    B = torch.randn(batch, length, d_state, generator=g)
    C = torch.randn(batch, length, d_state, generator=g)
    D, dt_bias = torch.randn(d_inner, generator=g), torch.randn(d_inner, generator=g)
    z = torch.randn(batch, length, d_inner, generator=g)
    h0 = torch.randn(batch, d_inner, d_state, generator=g) if with_state else None
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]

    leaves_ref = _leaves(x, dt, A, B, C, D, z, dt_bias, h0)
    leaves_fast = _leaves(x, dt, A, B, C, D, z, dt_bias, h0)
    kw = dict(dt_softplus=True, return_final_state=True)
    y_ref, h_ref = selective_scan_reference(*leaves_ref[:-1], initial_state=leaves_ref[-1], **kw)
    y, h = selective_scan_chunked(*leaves_fast[:-1], initial_state=leaves_fast[-1], chunk_size=chunk, **kw)
    assert_close("y", y, y_ref)
    assert_close("final_state", h, h_ref)
    present = [n for n, t in zip(names, leaves_ref, strict=True) if t is not None]
    for name, g_fast, g_ref in zip(
        present, _grads([y, h], leaves_fast, 1), _grads([y_ref, h_ref], leaves_ref, 1), strict=True
    ):
        assert_close(f"grad {name}", g_fast, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch,length,chunk", [(1, 1, 64), (2, 37, 8), (2, 64, 16), (1, 100, 64)])
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("with_state", [False, True])
def test_ssd_scan_chunked_matches_reference(batch, length, chunk, ngroups, with_state):
    g = torch.Generator().manual_seed(batch * 1000 + length + ngroups)
    nheads, headdim, d_state = 4, 3, 5
    x = torch.randn(batch, length, nheads, headdim, generator=g)
    dt = torch.randn(batch, length, nheads, generator=g)
    A = -torch.rand(nheads, generator=g) * 4
    B = torch.randn(batch, length, ngroups, d_state, generator=g)
    C = torch.randn(batch, length, ngroups, d_state, generator=g)
    D, dt_bias = torch.randn(nheads, generator=g), torch.randn(nheads, generator=g)
    h0 = torch.randn(batch, nheads, headdim, d_state, generator=g) if with_state else None
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"]

    leaves_ref = _leaves(x, dt, A, B, C, D, dt_bias, h0)
    leaves_fast = _leaves(x, dt, A, B, C, D, dt_bias, h0)
    kw = dict(dt_softplus=True, dt_limit=(0.0, float("inf")), return_final_state=True)
    r_x, r_dt, r_A, r_B, r_C, r_D, r_bias, r_h0 = leaves_ref
    f_x, f_dt, f_A, f_B, f_C, f_D, f_bias, f_h0 = leaves_fast
    y_ref, h_ref = ssd_scan_reference(r_x, r_dt, r_A, r_B, r_C, r_D, r_bias, initial_state=r_h0, **kw)
    y, h = ssd_scan_chunked(f_x, f_dt, f_A, f_B, f_C, f_D, f_bias, initial_state=f_h0, chunk_size=chunk, **kw)
    assert_close("y", y, y_ref)
    assert_close("final_state", h, h_ref)
    present = [n for n, t in zip(names, leaves_ref, strict=True) if t is not None]
    for name, g_fast, g_ref in zip(
        present, _grads([y, h], leaves_fast, 2), _grads([y_ref, h_ref], leaves_ref, 2), strict=True
    ):
        assert_close(f"grad {name}", g_fast, g_ref, rtol=1e-4, atol=1e-4)


def test_ssd_dt_limit_is_applied():
    g = torch.Generator().manual_seed(3)
    x, dt = torch.randn(1, 20, 2, 3, generator=g), torch.randn(1, 20, 2, generator=g) * 3
    A, B, C = -torch.rand(2, generator=g), torch.randn(1, 20, 1, 4, generator=g), torch.randn(1, 20, 1, 4, generator=g)
    limited = ssd_scan_chunked(x, dt, A, B, C, dt_softplus=True, dt_limit=(0.1, 0.5), chunk_size=8)
    assert_close("y", limited, ssd_scan_reference(x, dt, A, B, C, dt_softplus=True, dt_limit=(0.1, 0.5)))
    assert not torch.allclose(limited, ssd_scan_chunked(x, dt, A, B, C, dt_softplus=True, chunk_size=8))


@pytest.mark.parametrize("length", [1, 3, 17])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv1d_matches_reference(length, with_state):
    g = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, 6, generator=g)
    weight, bias = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    state = torch.randn(2, 3, 6, generator=g) if with_state else None
    leaves_ref, leaves_fast = _leaves(x, weight, bias, state), _leaves(x, weight, bias, state)
    y_ref, s_ref = causal_conv1d_reference(*leaves_ref, activation="silu", return_final_state=True)
    y, s = causal_conv1d_torch(*leaves_fast, activation="silu", return_final_state=True)
    assert_close("y", y, y_ref)
    assert_close("final_state", s, s_ref)
    names = [n for n, t in zip(["x", "weight", "bias", "initial_state"], leaves_ref, strict=True) if t is not None]
    for name, g_fast, g_ref in zip(
        names, _grads([y, s], leaves_fast, 3), _grads([y_ref, s_ref], leaves_ref, 3), strict=True
    ):
        assert_close(f"grad {name}", g_fast, g_ref)


def test_scan_in_chunks_with_carried_state_equals_one_pass():
    """The property that streaming long documents relies on."""
    g = torch.Generator().manual_seed(7)
    x, dt = torch.randn(2, 90, 8, generator=g), torch.randn(2, 90, 8, generator=g)
    A, B, C = -torch.rand(8, 4, generator=g), torch.randn(2, 90, 4, generator=g), torch.randn(2, 90, 4, generator=g)
    whole, h_whole = selective_scan_chunked(x, dt, A, B, C, dt_softplus=True, return_final_state=True)
    state, parts = None, []
    for start in range(0, 90, 25):
        sl = slice(start, start + 25)
        y, state = selective_scan_chunked(
            x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], dt_softplus=True, initial_state=state, return_final_state=True
        )
        parts.append(y)
    assert_close("y", torch.cat(parts, 1), whole)
    assert_close("final_state", state, h_whole)
