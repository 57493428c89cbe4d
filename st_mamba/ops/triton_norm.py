"""Triton kernels of Mamba-2's gated RMSNorm, forward and backward.

    g   = y * silu(z)                                   per row (token), fp32
    out = g / sqrt(mean(g^2 over its group) + eps) * weight

the mean taken over each of ``groups`` equal slices of the row's Di channels (``reference.gated_rms_norm_reference``
is the specification). PyTorch runs this as some ten elementwise and reduction passes over (T, Di) fp32
copies; here one kernel reads y and z and writes the output, and one backward kernel reads y, z and the
output's gradient and writes dy and dz.

Forward (``_gated_norm_fwd_kernel``): one program owns ``BLOCK_ROWS`` rows of one group, the whole group
slice of each row in registers (the mean needs all of it). z is read through its row stride: the mixer
passes a slice of in_proj's output, which is never copied.

Backward (``_gated_norm_bwd_kernel``): nothing but y and z is kept from the forward; the kernel recomputes
g and the row's 1/rms, which costs one reduction over data it loads anyway. With n = g / rms:

    dn = dout * weight
    dg = (dn - n * mean(dn * n)) / rms                   (over the row's group)
    dy = dg * silu(z),   dz = dg * y * sigmoid(z) (1 + z (1 - sigmoid(z)))
    dweight = sum over rows of dout * n

Each program takes a contiguous range of rows and sums its share of dweight in registers; the (programs,
Di) fp32 shares are summed on the host, so that no atomics are needed and the result does not depend on
the order in which programs finish.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from st_mamba.ops.triton import _fast, _needs_grad, _sigmoid
from st_mamba.ops.triton import _rows as _unit_stride

# Elements of (row, channel) a program holds at once: rows a program = this / the padded group width,
# so that a wide group (mamba2-130m's 1536 channels in one group) is one row a program and a narrow one many.
NORM_BLOCK_ELEMENTS = 4096
# Warps a program: enough that each thread holds about this many values of each live (rows, group) tile (a
# dozen such tiles are live in the backward), so that a wide group (Di = 5120 in one group, 8192 padded)
# spreads over 16 warps instead of spilling; at most 16 warps (512 threads).
NORM_VALUES_PER_THREAD = 16
# The backward's row ranges: at most this many programs a group, each writing one (Di,) share of dweight.
NORM_BWD_PROGRAMS = 256


@triton.jit
def _gated_rows(y_ptr, z_ptr, rows, row_end, col0, offs, group_size, stride_y, stride_z, eps, FAST: tl.constexpr):
    """For (BLOCK_ROWS,) int64 ``rows`` and one group's columns: y, z, sigmoid(z), g = y silu(z) (all
    (BLOCK_ROWS, BLOCK_N) fp32, zero outside), each row's 1/rms (BLOCK_ROWS,), and the mask."""
    mask = (rows < row_end)[:, None] & (offs < group_size)[None, :]
    cols = col0 + offs[None, :]
    y = tl.load(y_ptr + rows[:, None] * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(z, FAST)
    gated = y * z * sig
    rstd = 1.0 / tl.sqrt(tl.sum(gated * gated, axis=1) / group_size + eps)
    return y, z, sig, gated, rstd, mask


@triton.jit
def _gated_norm_fwd_kernel(
    y_ptr, z_ptr, w_ptr, out_ptr, n_rows, width, group_size, stride_y, stride_z, eps,
    FAST: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (row block, group): out = g / rms * weight, written contiguous (rows, Di)."""
    col0 = tl.program_id(1) * group_size
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs = tl.arange(0, BLOCK_N)
    _, _, _, gated, rstd, mask = _gated_rows(
        y_ptr, z_ptr, rows, n_rows, col0, offs, group_size, stride_y, stride_z, eps, FAST
    )
    w = tl.load(w_ptr + col0 + offs, mask=offs < group_size, other=0.0).to(tl.float32)
    out = gated * rstd[:, None] * w[None, :]
    tl.store(out_ptr + rows[:, None] * width + col0 + offs[None, :], out, mask=mask)


@triton.jit
def _gated_norm_bwd_kernel(
    y_ptr, z_ptr, w_ptr, dout_ptr, dy_ptr, dz_ptr, dw_part_ptr,
    n_rows, rows_per_program, width, group_size, stride_y, stride_z, stride_dout, eps,
    FAST: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (row range, group): dy and dz of the range's rows (contiguous (rows, Di), in the dtypes of y and
    z), and the range's share of dweight (fp32) in row ``program_id(0)`` of ``dw_part``."""
    part = tl.program_id(0)
    col0 = tl.program_id(1) * group_size
    offs = tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + col0 + offs, mask=offs < group_size, other=0.0).to(tl.float32)
    row_begin = part.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, n_rows)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(row_begin, row_end, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        y, z, sig, gated, rstd, mask = _gated_rows(
            y_ptr, z_ptr, rows, row_end, col0, offs, group_size, stride_y, stride_z, eps, FAST
        )
        cols = col0 + offs[None, :]
        dout = tl.load(dout_ptr + rows[:, None] * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
        normed = gated * rstd[:, None]  # zero outside the mask, so masked lanes add nothing below
        dw += tl.sum(dout * normed, axis=0)
        dnormed = dout * w[None, :]
        dgated = rstd[:, None] * (dnormed - normed * (tl.sum(dnormed * normed, axis=1) / group_size)[:, None])
        dy = dgated * z * sig
        dz = dgated * y * sig * (1.0 + z * (1.0 - sig))
        tl.store(dy_ptr + rows[:, None] * width + cols, dy, mask=mask)
        tl.store(dz_ptr + rows[:, None] * width + cols, dz, mask=mask)
    tl.store(dw_part_ptr + part.to(tl.int64) * width + col0 + offs, dw, mask=offs < group_size)


# --- host side -----------------------------------------------------------------------------------


def _rows(t: Tensor, width: int) -> Tensor:
    """(..., Di) -> (T, Di) with a unit channel stride: a view for a slice of a wider contiguous tensor."""
    return _unit_stride(t.reshape(-1, width))


def _blocks(group_size: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_N, warps): rows a program, the group's width padded to a power of two, and warps."""
    block_n = triton.next_power_of_2(group_size)
    block_rows = max(1, NORM_BLOCK_ELEMENTS // block_n)
    warps = min(16, max(1, block_rows * block_n // (32 * NORM_VALUES_PER_THREAD)))
    return block_rows, block_n, warps


def _forward(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float) -> Tensor:
    """The output, (..., Di) in the dtype PyTorch gives ``weight * normed.to(y.dtype)``: y's when weight shares it."""
    width = y.shape[-1]
    y_rows, z_rows = _rows(y, width), _rows(z, width)
    n_rows, group_size = y_rows.shape[0], width // groups
    out = torch.empty(n_rows, width, device=y.device, dtype=torch.result_type(y, weight))  # (T, Di)
    if n_rows:
        block_rows, block_n, warps = _blocks(group_size)
        _gated_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows), groups)](
            y_rows, z_rows, weight, out, n_rows, width, group_size, y_rows.stride(0), z_rows.stride(0), eps,
            FAST=_fast(y), BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip
    return out.view(*y.shape[:-1], width)


def _backward(y: Tensor, z: Tensor, weight: Tensor, dout: Tensor, groups: int, eps: float) -> tuple[Tensor, ...]:
    """dy, dz (shapes and dtypes of y and z, contiguous) and dweight (weight's dtype)."""
    width = y.shape[-1]
    y_rows, z_rows, dout_rows = _rows(y, width), _rows(z, width), _rows(dout, width)
    n_rows, group_size = y_rows.shape[0], width // groups
    dy = torch.empty(n_rows, width, device=y.device, dtype=y.dtype)
    dz = torch.empty(n_rows, width, device=y.device, dtype=z.dtype)
    if not n_rows:
        return dy.view(y.shape), dz.view(y.shape), torch.zeros_like(weight)
    block_rows, block_n, warps = _blocks(group_size)
    # Row ranges of whole row blocks, at most NORM_BWD_PROGRAMS of them.
    blocks_per_program = triton.cdiv(triton.cdiv(n_rows, block_rows), NORM_BWD_PROGRAMS)
    rows_per_program = blocks_per_program * block_rows
    n_programs = triton.cdiv(n_rows, rows_per_program)
    dw_part = torch.empty(n_programs, width, device=y.device, dtype=torch.float32)  # every entry written
    _gated_norm_bwd_kernel[(n_programs, groups)](
        y_rows, z_rows, weight, dout_rows, dy, dz, dw_part,
        n_rows, rows_per_program, width, group_size, y_rows.stride(0), z_rows.stride(0), dout_rows.stride(0), eps,
        FAST=_fast(y), BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return dy.view(y.shape), dz.view(y.shape), dw_part.sum(0).to(weight.dtype)


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float) -> Tensor:
        # y and z as given (z a view of in_proj's output, which the convolution's node keeps anyway):
        # the backward recomputes g and 1/rms from them.
        ctx.save_for_backward(y, z, weight)
        ctx.settings = (groups, eps)
        return _forward(y, z, weight, groups, eps)

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:
        y, z, weight = ctx.saved_tensors
        dy, dz, dweight = _backward(y, z, weight, dout, *ctx.settings)
        return dy, dz, dweight, None, None


def _check_inputs(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float) -> None:
    """Clear errors for inputs the kernels cannot read, before any launch."""
    if y.dim() < 1 or y.shape != z.shape:
        raise ValueError(f"y and z must have one shape (..., Di), got y {tuple(y.shape)}, z {tuple(z.shape)}")
    width = y.shape[-1]
    if weight.shape != (width,):
        raise ValueError(f"weight must have shape ({width},) (y's last dim), got {tuple(weight.shape)}")
    if groups < 1 or width % groups:
        raise ValueError(f"groups ({groups}) must be a positive divisor of the width {width}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    for name, t in (("z", z), ("weight", weight)):
        if t.device != y.device:
            raise ValueError(f"{name} is on {t.device}, y on {y.device}: all inputs must be on one device")
    for name, t in (("y", y), ("z", z), ("weight", weight)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def gated_rms_norm_triton(y: Tensor, z: Tensor, weight: Tensor, groups: int = 1, eps: float = 1e-5) -> Tensor:
    """``rmsnorm(y * silu(z)) * weight`` over ``groups`` equal slices of the last dim, on a CUDA GPU; same
    signature, shapes and output dtype as ``reference.gated_rms_norm_reference``.

    y and z are (..., Di) and may be strided views (only their last dim needs a unit stride for no copy to be
    made); weight is (Di,). Gradients reach y, z and weight.
    """
    _check_inputs(y, z, weight, groups, eps)
    weight = weight.contiguous()
    if _needs_grad(y, z, weight):
        return _GatedRMSNorm.apply(y, z, weight, groups, float(eps))
    return _forward(y, z, weight, groups, float(eps))  # inference: the kernel alone, no autograd node
