"""Pieces of the backbone that have a hand-written backward: against autograd's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from st_mamba import MambaBackbone, MambaConfig, modeling

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def plain_project_and_split(hidden, weight, bias, width):
    return F.linear(hidden, weight, bias).split(width, dim=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("used", ["both", "first", "second"])
def test_project_and_split_gives_autograds_gradients(device, with_bias, used):
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 7, 12, generator=g), torch.randn(10, 12, generator=g)
    bias = torch.randn(10, generator=g) if with_bias else None
    upstream = torch.randn(2, 7, 5, generator=g), torch.randn(2, 7, 5, generator=g)
    picked = {"both": (0, 1), "first": (0,), "second": (1,)}[used]

    def grads(fn):
        leaves = [t.to(device).requires_grad_() for t in (hidden, weight, bias) if t is not None]
        parts = fn(leaves[0], leaves[1], leaves[2] if with_bias else None, 5)
        outputs = [parts[i] for i in picked]
        return [p.detach() for p in parts], torch.autograd.grad(
            outputs, leaves, [upstream[i].to(device) for i in picked]
        )

    (values, expected), (got_values, got) = grads(plain_project_and_split), grads(modeling._ProjectAndSplit.apply)
    for want, have in zip([*values, *expected], [*got_values, *got], strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2), (1,)], ids=["all", "outer", "middle"])
def test_project_and_split_in_unequal_parts(used):
    """Mamba-2's split of in_proj in three parts of different widths (z, xBC, dt), some of them unused."""
    g = torch.Generator().manual_seed(5)
    hidden, weight, bias = (
        torch.randn(2, 6, 8, generator=g),
        torch.randn(12, 8, generator=g),
        torch.randn(12, generator=g),
    )
    upstream = [torch.randn(2, 6, width, generator=g) for width in (5, 4, 3)]

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        parts = fn(*leaves, [5, 4, 3])
        outputs = [parts[i] for i in used]
        return [p.detach() for p in parts], torch.autograd.grad(outputs, leaves, [upstream[i] for i in used])

    (values, expected), (got_values, got) = grads(plain_project_and_split), grads(modeling._ProjectAndSplit.apply)
    for want, have in zip([*values, *expected], [*got_values, *got], strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        MambaConfig(d_model=16, n_layer=2, vocab_size=40, d_state=4, dt_rank=3, bias=True),
        MambaConfig(d_model=16, n_layer=2, vocab_size=40, version=2, d_state=4, headdim=8, bias=True, norm_groups=2),
    ],
    ids=["mamba1", "mamba2"],
)
def test_backbone_gradients_are_the_same_with_the_plain_projection(config, monkeypatch):
    ids = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(4))

    def gradients():
        model = MambaBackbone(config).reset_parameters(seed=0).train()
        model(ids).square().mean().backward()
        return {name: p.grad for name, p in model.named_parameters()}

    expected = gradients()
    monkeypatch.setattr(modeling._ProjectAndSplit, "apply", plain_project_and_split)
    plain = gradients()
    assert expected.keys() == plain.keys()
    for name in expected:
        torch.testing.assert_close(expected[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
