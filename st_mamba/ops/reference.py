"""Sequential fp32 references: the specification that every fast path is tested against.

They loop over time one token at a time, exactly as the recurrences are written in
``ops/README.md``. They are slow on purpose: nothing here is clever, so that they are easy to
check by eye. Every function returns outputs in the input dtype and states in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _discretise_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit=(0.0, float("inf"))) -> Tensor:
    """dt -> softplus(dt + bias), clamped to dt_limit; in fp32."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    return dt


def selective_scan_reference(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan, one token at a time, in fp32.

    Args:
        x: (B, L, Di) input of the scan (after the convolution).
        dt: (B, L, Di) step size before ``dt_bias`` and softplus.
        A: (Di, N) state matrix (diagonal per channel; negative real).
        B: (B, L, N) input matrix, shared by all channels.
        C: (B, L, N) output matrix, shared by all channels.
        D: (Di,) skip connection.
        z: (B, L, Di) gate: the output is multiplied by ``silu(z)``.
        dt_bias: (Di,) added to dt before the softplus.
        dt_softplus: apply softplus to dt.
        initial_state: (B, Di, N) state before the first token; zeros if None.
        return_final_state: also return the (B, Di, N) state after the last token.

    Returns:
        y: (B, L, Di) in the dtype of x; and the final state in fp32 if asked.
    """
    dtype = x.dtype
    batch, length, d_inner = x.shape
    x, B, C, A = x.float(), B.float(), C.float(), A.float()
    dt = _discretise_dt(dt, dt_bias, dt_softplus)
    h = x.new_zeros(batch, d_inner, A.shape[1]) if initial_state is None else initial_state.float()
    ys = []
    for t in range(length):
        # Zero-order hold for A (exact for a constant input over the step), Euler for B.
        decay = torch.exp(dt[:, t, :, None] * A)  # (B, Di, N)
        h = decay * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(batch, 0, d_inner)  # (B, L, Di)
    if D is not None:
        y = y + x * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, h) if return_final_state else y


def ssd_scan_reference(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2 scan (state space duality form), one token at a time, in fp32.

    Args:
        x: (B, L, H, P) input of the scan.
        dt: (B, L, H) step size before ``dt_bias`` and softplus.
        A: (H,) one negative real decay rate per head.
        B: (B, L, G, N) input matrix; head h uses group ``h // (H / G)``.
        C: (B, L, G, N) output matrix.
        D: (H,) or (H, P) skip connection.
        dt_bias: (H,) added to dt before the softplus.
        dt_softplus: apply softplus to dt.
        dt_limit: clamp dt to this range after the softplus.
        initial_state: (B, H, P, N) state before the first token; zeros if None.
        return_final_state: also return the (B, H, P, N) state after the last token.

    Returns:
        y: (B, L, H, P) in the dtype of x; and the final state in fp32 if asked.
    """
    dtype = x.dtype
    batch, length, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    x, A = x.float(), A.float()
    B = B.float().repeat_interleave(heads_per_group, dim=2)  # (B, L, H, N)
    C = C.float().repeat_interleave(heads_per_group, dim=2)
    dt = _discretise_dt(dt, dt_bias, dt_softplus, dt_limit)
    h = x.new_zeros(batch, nheads, headdim, B.shape[-1]) if initial_state is None else initial_state.float()
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (B, H, 1, 1)
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(batch, 0, nheads, headdim)  # (B, L, H, P)
    if D is not None:
        D = D.float()
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    y = y.to(dtype)
    return (y, h) if return_final_state else y


def causal_conv1d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_state: Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Depthwise causal convolution over time, channels last.

    Args:
        x: (B, L, C) input.
        weight: (C, K) one filter per channel; ``weight[:, -1]`` multiplies the current token.
        bias: (C,).
        initial_state: (B, K - 1, C) the K - 1 inputs before the first token; zeros if None.
        activation: "silu" or None.
        return_final_state: also return the (B, K - 1, C) last inputs, for the next chunk.

    Returns:
        y: (B, L, C) in the dtype of x; and the final state in the dtype of x if asked.
    """
    dtype = x.dtype
    batch, length, channels = x.shape
    width = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, width - 1, channels)
    padded = torch.cat([initial_state.to(dtype), x], dim=1).float()  # (B, K - 1 + L, C)
    y = x.new_zeros(batch, length, channels, dtype=torch.float32)
    for t in range(length):
        window = padded[:, t : t + width]  # (B, K, C)
        y[:, t] = (window * weight.float().T).sum(dim=1)
    if bias is not None:
        y = y + bias.float()
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r}")
    y = y.to(dtype)
    if return_final_state:
        return y, padded[:, padded.shape[1] - (width - 1) :].to(dtype)
    return y


def gated_rms_norm_reference(y: Tensor, z: Tensor, weight: Tensor, groups: int = 1, eps: float = 1e-5) -> Tensor:
    """Mamba-2's output norm, ``rmsnorm(y * silu(z)) * weight``, the mean square taken over each of ``groups``
    equal slices of the last dim; in fp32.

    Args:
        y: (..., Di) the scan's output.
        z: (..., Di) the gate.
        weight: (Di,) scale.
        groups: how many equal slices of Di are normalised apart (``norm_groups``).
        eps: added to the mean square.

    Returns:
        (..., Di) in the dtype of ``weight * y``: y's when weight shares it.
    """
    gated = y.float() * F.silu(z.float())
    grouped = gated.unflatten(-1, (groups, -1))  # (..., G, Di / G)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return weight * grouped.flatten(-2).to(y.dtype)
