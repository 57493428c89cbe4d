"""The one place that picks a backend for the scans and the causal convolution.

``selective_scan`` (Mamba-1), ``ssd_scan`` (Mamba-2) and ``causal_conv1d`` each choose, per call,
in one visible ``if`` chain:

1. ``mamba_ssm`` / ``causal_conv1d`` CUDA kernels: CUDA tensors, packages importable, and the
   call is one they support (mamba-ssm's Mamba-1 scan takes no initial state).
2. ``cpu``: the compiled CPU kernels (``ops/cpu.py``) for the Mamba-1 scan and the causal
   convolution, on CPU when no gradient is needed.
3. ``chunked``: pure PyTorch (``ops/chunked.py``), any device, differentiable.

Ahead of all of these on CUDA tensors comes ``triton``: the Triton kernels (``ops/triton.py``) for the
Mamba-1 scan and the causal convolution, and (``ops/triton_ssd.py``) for the Mamba-2 scan, forward and
backward, used whenever Triton is importable (PyTorch's CUDA wheels bring it): it needs no compiled
extension and reads the channels-last layout as it is, where mamba-ssm wants (B, D, L) copies
(``SSD_TRITON_BY_DEFAULT = False`` sends Mamba-2 on CUDA back to mamba_ssm / chunked). With the Mamba-1
kernels the model forward measured 2.6-3.3x transformers + mamba-ssm on an H200, with the Mamba-2 ones
3.5x the PyTorch chunked scan (docs/benchmarks.md); ``benchmarks/bench_encode.py`` also times the two
backends op by op where mamba-ssm is installed. The Mamba-2 kernels' design (chunk decomposition, what
the backward recomputes, packing) is in docs/kernels.md. ``triton`` (all three operations) and
``cpu`` read packed batches (``cu_seqlens``) in one pass (``cpu``: the convolution only without states
in or out); every other backend runs a packed batch one sequence at a time. On CPU the Mamba-2 scan
runs ``chunked`` unless a backend is forced (``ST_MAMBA_BACKEND=triton`` under ``TRITON_INTERPRET=1``
is how the tests reach the Triton kernels without a GPU).
``gated_rms_norm`` (Mamba-2's output norm) runs its fused Triton kernel (``ops/triton_norm.py``) wherever
``ssd_scan`` runs the Triton kernels, and the PyTorch reference elsewhere.
``linear`` (the mixers' projections) has two paths: oneDNN's matmul (``cpu``) for fp32 CPU tensors
when no gradient is needed and no other backend is forced, else ``F.linear``.
``use_backend("reference")`` (or ``ST_MAMBA_BACKEND=reference``) forces one backend, for tests and
benchmarks. Each (operation, backend, device) choice is logged once at INFO level.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from st_mamba.ops import cpu as _cpu
from st_mamba.ops.chunked import causal_conv1d_torch, selective_scan_chunked, ssd_scan_chunked
from st_mamba.ops.reference import (
    causal_conv1d_reference,
    gated_rms_norm_reference,
    selective_scan_reference,
    ssd_scan_reference,
)

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_ssm_selective_scan
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _mamba_ssm_chunk_scan
except ImportError:
    _mamba_ssm_selective_scan = _mamba_ssm_chunk_scan = None
try:
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_cuda
except ImportError:
    _causal_conv1d_cuda = None
try:
    from st_mamba.ops import triton as _triton
    from st_mamba.ops import triton_norm as _triton_norm
    from st_mamba.ops import triton_ssd as _triton_ssd
except ImportError:  # no Triton (CPU-only installs): the CUDA paths below take over
    _triton = _triton_ssd = _triton_norm = None

logger = logging.getLogger(__name__)

BACKENDS = ("triton", "mamba_ssm", "cpu", "chunked", "reference")
# Mamba-2 on CUDA takes the Triton SSD kernels (tests/ops/test_triton_ssd.py passes on sm_90 and under the
# interpreter); False keeps mamba_ssm / chunked for Mamba-2 on CUDA unless ``triton`` is forced.
SSD_TRITON_BY_DEFAULT = True
_forced: str | None = os.environ.get("ST_MAMBA_BACKEND") or None
_announced: set[tuple[str, str, str]] = set()


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force one backend inside the block (None restores automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _announce(op: str, backend: str, device: torch.device) -> str:
    key = (op, backend, device.type)
    if key not in _announced:
        _announced.add(key)
        logger.info("st_mamba: %s runs on the %r backend (%s)", op, backend, device.type)
    return backend


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _ssd_on_triton(device: torch.device) -> bool:
    """Whether Mamba-2's scan and gated norm take their Triton kernels on ``device``: when ``triton`` is forced
    (on CPU tensors too, under ``TRITON_INTERPRET=1``), or on CUDA unless ``SSD_TRITON_BY_DEFAULT`` is off."""
    return _triton_ssd is not None and (
        _forced == "triton" or (_forced is None and device.type == "cuda" and SSD_TRITON_BY_DEFAULT)
    )


def packs_in_one_pass(device: torch.device, version: int) -> bool:
    """Whether a packed batch (``cu_seqlens``) runs in one pass here, at inference: Mamba-1 and Mamba-2 on
    the Triton kernels (CUDA; Mamba-2 unless ``SSD_TRITON_BY_DEFAULT`` is off), Mamba-1
    also on the compiled CPU kernels."""
    if device.type == "cuda":
        return _ssd_on_triton(device) if version == 2 else _triton is not None and _forced in (None, "triton")
    return on_cpu_kernels(device, version)


def on_cpu_kernels(device: torch.device, version: int) -> bool:
    """Whether inference of a Mamba-``version`` model on ``device`` runs on the compiled CPU library: Mamba-1, CPU
    tensors, no other backend forced, the library built. Then packed batches run in one pass, and a small
    batch runs its whole backbone in one call (``cpu.mamba1_forward_small``)."""
    return version == 1 and device.type == "cpu" and _forced in (None, "cpu") and _cpu.available()


def _one_sequence_at_a_time(
    op, cu_seqlens: Tensor, packed: list[Tensor | None], initial_state: Tensor | None, return_final_state: bool
) -> Tensor | tuple[Tensor, Tensor]:
    """Run ``op(pieces, state)`` on each packed sequence and join the outputs along time (dim 1)."""
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        pieces = [None if t is None else t[:, start:end] for t in packed]
        out = op(pieces, None if initial_state is None else initial_state[i : i + 1])
        outputs.append(out[0] if return_final_state else out)
        if return_final_state:
            finals.append(out[1])
    y = torch.cat(outputs, dim=1)
    return (y, torch.cat(finals, dim=0)) if return_final_state else y


def selective_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan. Shapes: see ``reference.selective_scan_reference``.

    ``cu_seqlens`` (n + 1,) int32 marks a packed batch: x, dt, z (1, T, Di), B, C (1, T, N), states (n, Di, N).
    """
    args = (x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, return_final_state)
    backend = _forced
    if backend is None and x.is_cuda and _triton is not None:
        backend = "triton"
    if backend is None:
        if x.is_cuda and _mamba_ssm_selective_scan is not None and initial_state is None:
            backend = "mamba_ssm"
        elif x.device.type == "cpu" and _cpu.available() and not _needs_grad(x, dt, A, B, C, D, z, dt_bias):
            backend = "cpu"
        else:
            backend = "chunked"
    _announce("selective_scan", backend, x.device)
    if backend == "triton":
        return _triton.selective_scan_triton(*args, cu_seqlens=cu_seqlens)
    if backend == "cpu":
        return _cpu.selective_scan_cpu(*args, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        with use_backend(backend):
            return _one_sequence_at_a_time(
                lambda p, h: selective_scan(p[0], p[1], A, p[2], p[3], D, p[4], dt_bias, dt_softplus, h, return_final_state),
                cu_seqlens, [x, dt, B, C, z], initial_state, return_final_state,
            )  # fmt: skip
    if backend == "mamba_ssm":
        out = _mamba_ssm_selective_scan(
            x.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D,
            z=None if z is None else z.transpose(1, 2), delta_bias=dt_bias, delta_softplus=dt_softplus,
            return_last_state=return_final_state,
        )  # fmt: skip
        if return_final_state:
            return out[0].transpose(1, 2), out[1]
        return out.transpose(1, 2)
    if backend == "reference":
        return selective_scan_reference(*args)
    return selective_scan_chunked(*args)


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2 scan. Shapes: see ``reference.ssd_scan_reference``; ``cu_seqlens`` as in ``selective_scan``
    (x (1, T, H, P), dt (1, T, H), B and C (1, T, G, N), states (n, H, P, N))."""
    args = (x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state, return_final_state)
    backend = _forced
    if backend is None and _ssd_on_triton(x.device):
        backend = "triton"
    if backend == "triton" and _triton_ssd is None:  # forced without Triton installed
        backend = None
    if backend is None or backend == "cpu":  # no compiled CPU kernel for Mamba-2
        backend = "mamba_ssm" if x.is_cuda and _mamba_ssm_chunk_scan is not None else "chunked"
    _announce("ssd_scan", backend, x.device)
    if backend == "triton":
        return _triton_ssd.ssd_scan_triton(*args, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        with use_backend(backend):
            return _one_sequence_at_a_time(
                lambda p, h: ssd_scan(p[0], p[1], A, p[2], p[3], D, dt_bias, dt_softplus, dt_limit, h, return_final_state),
                cu_seqlens, [x, dt, B, C], initial_state, return_final_state,
            )  # fmt: skip
    if backend == "mamba_ssm":
        return _mamba_ssm_chunk_scan(
            x, dt, A, B, C, chunk_size=256, D=D, dt_bias=dt_bias, initial_states=initial_state,
            dt_softplus=dt_softplus, dt_limit=tuple(dt_limit), return_final_states=return_final_state,
        )  # fmt: skip
    if backend == "reference":
        return ssd_scan_reference(*args)
    return ssd_scan_chunked(*args)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_state: Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Depthwise causal convolution, channels last. Shapes: see ``reference.causal_conv1d_reference``.

    ``cu_seqlens`` (n + 1,) int32 marks a packed batch: x (1, T, C), states (n, K - 1, C).
    """
    args = (x, weight, bias, initial_state, activation, return_final_state)
    backend = _forced
    if backend is None and x.is_cuda and _triton is not None and weight.shape[1] <= _triton.CONV_MAX_WIDTH:
        backend = "triton"
    if backend is None:
        if x.is_cuda and _causal_conv1d_cuda is not None:
            backend = "mamba_ssm"
        elif x.device.type == "cpu" and _cpu.available() and not _needs_grad(x, weight, bias, initial_state):
            backend = "cpu"
        else:
            backend = "chunked"
    _announce("causal_conv1d", backend, x.device)
    if backend == "triton":
        return _triton.causal_conv1d_triton(*args, cu_seqlens=cu_seqlens)
    if backend == "cpu" and (cu_seqlens is None or (initial_state is None and not return_final_state)):
        return _cpu.causal_conv1d_cpu(*args, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        with use_backend(backend):
            return _one_sequence_at_a_time(
                lambda p, h: causal_conv1d(p[0], weight, bias, h, activation, return_final_state),
                cu_seqlens, [x], initial_state, return_final_state,
            )  # fmt: skip
    if backend == "mamba_ssm":
        # causal-conv1d reads channels-last (B, C, L) views, which is what a transpose of (B, L, C) is.
        out = _causal_conv1d_cuda(
            x.transpose(1, 2), weight, bias,
            initial_states=None if initial_state is None else initial_state.transpose(1, 2),
            return_final_states=return_final_state, activation=activation,
        )  # fmt: skip
        if return_final_state:
            return out[0].transpose(1, 2), out[1].transpose(1, 2)
        return out.transpose(1, 2)
    if backend == "reference":
        return causal_conv1d_reference(*args)
    return causal_conv1d_torch(*args)


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, groups: int = 1, eps: float = 1e-5) -> Tensor:
    """Mamba-2's output norm, ``rmsnorm(y * silu(z)) * weight`` over ``groups`` slices. Shapes: see
    ``reference.gated_rms_norm_reference``.

    ``triton`` (one fused kernel, ``ops/triton_norm.py``) wherever ``ssd_scan`` takes its Triton kernels: on
    CUDA unless ``SSD_TRITON_BY_DEFAULT`` is off or another backend is forced (and on CPU tensors when ``triton`` is forced, under
    ``TRITON_INTERPRET=1``); the PyTorch reference everywhere else.
    """
    fused = _triton_norm is not None and _ssd_on_triton(y.device)
    _announce("gated_rms_norm", "triton" if fused else "torch", y.device)
    if fused:
        return _triton_norm.gated_rms_norm_triton(y, z, weight, groups, eps)
    return gated_rms_norm_reference(y, z, weight, groups, eps)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """``F.linear``, or oneDNN's matmul (``cpu.linear_onednn``) for fp32 and bf16 CPU inference; plus ``residual``.

    On CUDA, ``residual + x @ weight.T`` is one GEMM that adds the residual (cuBLAS with beta = 1;
    fp32 accumulate, one rounding) instead of a second kernel that reads both tensors again.
    ``residual`` is consumed: where no autograd graph is recorded, the GEMM accumulates into its
    memory (``addmm_``), which spares the copy of it that ``addmm`` makes first.
    """
    if residual is not None:
        fused = x.is_cuda and bias is None and residual.dtype == x.dtype == weight.dtype
        if fused and not torch.is_autocast_enabled(x.device.type):
            _announce("linear", "torch", x.device)
            rows, width = x.reshape(-1, x.shape[-1]), residual.shape[-1]
            if not torch.is_grad_enabled() and residual.is_contiguous():
                return residual.view(-1, width).addmm_(rows, weight.T).view(residual.shape)
            return torch.addmm(residual.reshape(-1, width), rows, weight.T).view(residual.shape)
        return residual + linear(x, weight, bias)
    onednn = (
        _forced in (None, "cpu")
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and _cpu.onednn_supports(x.dtype)
        and not _needs_grad(x, weight, bias)
    )
    _announce("linear", "cpu" if onednn else "torch", x.device)
    return _cpu.linear_onednn(x, weight, bias) if onednn else F.linear(x, weight, bias)


__all__ = [
    "BACKENDS",
    "causal_conv1d",
    "gated_rms_norm",
    "linear",
    "packs_in_one_pass",
    "selective_scan",
    "ssd_scan",
    "use_backend",
]
