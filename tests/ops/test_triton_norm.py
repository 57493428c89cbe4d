"""Mamba-2's gated RMSNorm on its Triton kernels (``ops/triton_norm.py``) against the PyTorch reference
(``reference.gated_rms_norm_reference``, what ``GatedRMSNorm`` runs off Triton): output and the gradients
of y, z and weight, by dtype; and the dispatcher's choice.

As ``test_triton.py`` (whose device choice, interpreter set-up, tolerances and comparison helpers this
module shares): runs on a CUDA GPU; without one only under ``TRITON_INTERPRET=1``, on CPU tensors with
small shapes; skipped without Triton.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from st_mamba import ops  # noqa: E402
from st_mamba.modeling import GatedRMSNorm  # noqa: E402
from st_mamba.ops import triton_norm  # noqa: E402
from st_mamba.ops.reference import gated_rms_norm_reference  # noqa: E402
from tests.ops.test_triton import (  # noqa: E402  (skips this module too where there is no GPU nor interpreter)
    DEVICE,
    DTYPES,
    INTERPRETED,
    TOLERANCES,
    _grads,
    _leaves,
    assert_close,
)

pytestmark = pytest.mark.cuda

# (batch, length, width, groups): widths and group widths not powers of two (24; 3 groups of 10), two
# groups of 32, many rows to a program (group width 4) and one token.
NORM_SHAPES = [(2, 5, 24, 1), (1, 7, 30, 3), (2, 3, 64, 2), (3, 4, 16, 4), (1, 1, 12, 1)]
if not INTERPRETED:
    # mamba2-130m's width in one group (one row a program), and a wide width in eight groups.
    NORM_SHAPES += [(4, 300, 1536, 1), (2, 257, 2048, 8)]


def _norm_inputs(batch, length, width, dtype, seed, weight_dtype=None):
    """y (contiguous), z (a slice of a wider tensor, as the mixer's slice of in_proj's output) and weight."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, length, width, generator=g).to(DEVICE, dtype)
    wide = torch.randn(batch, length, 2 * width + 3, generator=g).to(DEVICE, dtype)
    z = wide[..., 3 : 3 + width]  # (B, L, Di), row stride 2 Di + 3
    weight = (1.0 + 0.5 * torch.randn(width, generator=g)).to(DEVICE, weight_dtype or dtype)
    return y, z, weight


def _check_norm(inputs, groups, dtype, seed):
    """Output (value and dtype) and the gradients of y, z and weight, against the reference on fp32 copies
    of the same leaves (z's leaf keeps its strides)."""
    (rtol, atol), (grtol, gatol) = TOLERANCES[dtype]
    y, z, weight = inputs
    leaves = _leaves(y, weight)
    z_leaf = z.detach().requires_grad_(True)  # the strided view itself, rows wider apart than its width
    assert z_leaf.stride(-2) > z_leaf.shape[-1]
    out = triton_norm.gated_rms_norm_triton(leaves[0], z_leaf, leaves[1], groups)
    ref_leaves = _leaves(y, z, weight, dtype=torch.float32)
    expected = gated_rms_norm_reference(*ref_leaves, groups)
    assert out.dtype == torch.result_type(y, weight), f"output dtype {out.dtype}"
    assert_close("out", out, expected, rtol, atol)
    grads = _grads([out], [leaves[0], z_leaf, leaves[1]], seed)
    for name, grad, leaf, g_ref in zip(
        ["y", "z", "weight"], grads, [y, z, weight], _grads([expected], ref_leaves, seed), strict=True
    ):
        assert grad.dtype == leaf.dtype, f"grad {name}: dtype {grad.dtype} != {leaf.dtype}"
        assert_close(f"grad {name}", grad, g_ref, grtol, gatol)
    with torch.no_grad():  # the inference path (no autograd node) gives the same output, bit for bit
        inferred = triton_norm.gated_rms_norm_triton(y, z, weight, groups)
    assert inferred.grad_fn is None
    assert torch.equal(inferred, out.detach()), "inference output differs from the autograd path's"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_rms_norm_matches_reference(shape, dtype):
    batch, length, width, groups = shape
    _check_norm(_norm_inputs(batch, length, width, dtype, seed=sum(shape)), groups, dtype, seed=width)


def test_gated_rms_norm_many_row_ranges(monkeypatch):
    """More row blocks than backward programs: each program sums dweight over several blocks of rows."""
    monkeypatch.setattr(triton_norm, "NORM_BLOCK_ELEMENTS", 16)  # 2 rows a block at group width 8
    monkeypatch.setattr(triton_norm, "NORM_BWD_PROGRAMS", 3)
    _check_norm(_norm_inputs(2, 13, 16, torch.float32, seed=5), 2, torch.float32, seed=6)


def test_gated_rms_norm_fp32_weight_on_bf16_activations():
    """Under autocast the weight stays fp32 while y and z are bf16: the output is fp32, as the reference's."""
    _check_norm(_norm_inputs(2, 6, 20, torch.bfloat16, seed=3, weight_dtype=torch.float32), 2, torch.bfloat16, 4)


@pytest.mark.parametrize("batch,length", [(0, 5), (2, 0)])
def test_gated_rms_norm_zero_rows(batch, length):
    y, z, weight = (t.requires_grad_(True) for t in _leaves(*_norm_inputs(batch, length, 12, torch.float32, 0)))
    out = triton_norm.gated_rms_norm_triton(y, z, weight, 2)
    assert out.shape == (batch, length, 12)
    dy, dz, dweight = torch.autograd.grad(out.sum(), [y, z, weight])
    assert dy.shape == dz.shape == (batch, length, 12)
    assert torch.equal(dweight, torch.zeros_like(weight))


def test_gated_rms_norm_reads_the_slice_in_place():
    """The mixer's z, a slice of in_proj's (B, L, W) output, reaches the kernel as a view: no copy."""
    y, z, _ = _norm_inputs(2, 5, 24, torch.float32, 0)
    assert triton_norm._rows(z, 24).data_ptr() == z.data_ptr()
    assert triton_norm._rows(y, 24).data_ptr() == y.data_ptr()


def test_gated_rms_norm_rejects_bad_inputs():
    y, z, weight = _norm_inputs(1, 3, 12, torch.float32, 0)
    with pytest.raises(ValueError, match="groups"):
        triton_norm.gated_rms_norm_triton(y, z, weight, groups=5)
    with pytest.raises(ValueError, match="weight must have shape"):
        triton_norm.gated_rms_norm_triton(y, z, weight[:6], groups=1)
    with pytest.raises(ValueError, match="one shape"):
        triton_norm.gated_rms_norm_triton(y, z[..., :6], weight, groups=1)
    with pytest.raises(TypeError, match="floating-point"):
        triton_norm.gated_rms_norm_triton(y, z.to(torch.int32), weight, groups=1)


@pytest.mark.parametrize("by_default", [False, True], ids=["forced only", "by default"])
def test_dispatch_follows_the_ssd_kernels(by_default, monkeypatch, caplog):
    """``GatedRMSNorm`` runs the Triton kernel where the Mamba-2 scan runs on Triton (forced, or on CUDA
    unless ``SSD_TRITON_BY_DEFAULT`` is off), PyTorch elsewhere; both give one output."""
    monkeypatch.setattr(ops, "_announced", set())
    monkeypatch.setattr(ops, "_forced", None)
    monkeypatch.setattr(ops, "SSD_TRITON_BY_DEFAULT", by_default)
    norm = GatedRMSNorm(24, groups=2).to(DEVICE)
    y, z, _ = _norm_inputs(2, 5, 24, torch.float32, 1)
    with caplog.at_level("INFO", logger="st_mamba.ops"):
        default = norm(y, z)
        with ops.use_backend("triton"):
            forced = norm(y, z)
    default_backend = "triton" if DEVICE == "cuda" and by_default else "torch"
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"gated_rms_norm runs on the '{default_backend}' backend" in m for m in messages)
    assert any("gated_rms_norm runs on the 'triton' backend" in m for m in messages)
    assert_close("out", forced, default, 1e-5, 1e-5)
