"""ops.weight_cache: a derived tensor is made once per weight and version, and forgotten with the weight."""

from __future__ import annotations

import gc

import torch

from st_mamba.ops import weight_cache


def test_made_once_until_the_weight_changes():
    weight = torch.nn.Parameter(torch.randn(4, 3))
    calls = []

    def negate(w: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return -w.detach()

    first = weight_cache.cached(weight, "neg", negate)
    assert weight_cache.cached(weight, "neg", negate) is first and len(calls) == 1
    with torch.no_grad():
        weight.add_(1.0)  # bumps the version counter
    again = weight_cache.cached(weight, "neg", negate)
    assert len(calls) == 2 and torch.equal(again, -weight.detach())
    weight.data = torch.randn(4, 3)  # new storage
    assert torch.equal(weight_cache.cached(weight, "neg", negate), -weight.detach()) and len(calls) == 3
    assert weight_cache.cached(weight, "other kind", torch.Tensor.clone) is not first


def test_entries_go_with_their_weight():
    weight = torch.randn(5)
    weight_cache.cached(weight, "twice", lambda w: 2 * w)
    keys = [key for key in weight_cache._entries if key[0] == id(weight)]
    assert len(keys) == 1
    del weight
    gc.collect()
    assert keys[0] not in weight_cache._entries


def test_inference_tensors_are_not_cached():
    with torch.inference_mode():
        weight = torch.randn(3)
    assert torch.equal(weight_cache.cached(weight, "neg", torch.neg), -weight)
    assert not [key for key in weight_cache._entries if key[0] == id(weight)]


def test_views_are_kept_under_the_weight_they_view():
    """A view made anew at every call (the convolution's weight[:, 0, :]) hits the same entry."""
    weight = torch.nn.Parameter(torch.randn(6, 1, 4))
    calls = []

    def taps(w: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return w.detach().t().contiguous()

    first = weight_cache.cached(weight[:, 0, :], "taps", taps)
    assert weight_cache.cached(weight[:, 0, :], "taps", taps) is first and len(calls) == 1
    assert weight_cache.cached(weight[:3, 0, :], "taps", taps).shape == (4, 3)  # another view, its own entry
    with torch.no_grad():
        weight.mul_(2.0)
    assert torch.equal(weight_cache.cached(weight[:, 0, :], "taps", taps), 2 * first)
