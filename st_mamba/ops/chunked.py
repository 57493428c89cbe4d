"""Pure-PyTorch fast paths: run on any device, differentiable by autograd.

- ``selective_scan_chunked`` (Mamba-1): a blocked scan. The sequence is cut into ``nc`` chunks of
  ``T`` tokens. Pass 1 runs all chunks side by side from a zero state to get each chunk's local
  end state; pass 2 walks the ``nc`` chunk ends to get every chunk's true start state; pass 3
  reruns all chunks side by side from their start states and reads the outputs. That is
  ``2 T + nc`` small steps instead of ``L``, and never a (B, L, Di, N) tensor at once.
- ``ssd_scan_chunked`` (Mamba-2): the state-space-duality form. A Mamba-2 head has one scalar
  decay per token, so within a chunk the scan is a masked matrix product, and chunks are joined
  through their states.
- ``causal_conv1d_torch``: the depthwise causal convolution as ``K`` shifted multiply-adds on
  channels-last tensors (no transposes), in place into one output buffer.

Shapes and symbols: see ``ops/README.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from st_mamba.ops.reference import _discretise_dt


def _default_chunk(length: int) -> int:
    """Chunk length that minimises ``2 T + L / T`` small steps."""
    return max(1, min(length, math.ceil(math.sqrt(length / 2))))


def _pad_time(t: Tensor, length: int) -> Tensor:
    """Right-pad dim 1 with zeros to ``length``; dt = 0 there leaves the state unchanged."""
    if t.shape[1] == length:
        return t
    pad = [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]
    return F.pad(t, pad)


def selective_scan_chunked(
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
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan; same signature and shapes as ``selective_scan_reference``."""
    dtype = x.dtype
    batch, length, d_inner = x.shape
    d_state = A.shape[1]
    A = A.float()
    xf = x.float()
    dt = _discretise_dt(dt, dt_bias, dt_softplus)  # (B, L, Di)
    chunk = chunk_size or _default_chunk(length)
    n_chunks = -(-length // chunk)
    padded = n_chunks * chunk

    def time_major(t: Tensor) -> Tensor:  # (B, L, F) -> (T, B, nc, F): one contiguous slab per step
        return _pad_time(t, padded).view(batch, n_chunks, chunk, -1).permute(2, 0, 1, 3).contiguous()

    dt_c, dtx_c = time_major(dt), time_major(dt * xf)  # (T, B, nc, Di)
    B_c, C_c = time_major(B.float()), time_major(C.float())  # (T, B, nc, N)

    def step(h: Tensor, t: int) -> Tensor:
        decay = torch.exp(dt_c[t, ..., None] * A)  # (B, nc, Di, N)
        return decay * h + dtx_c[t, ..., None] * B_c[t, :, :, None, :]

    # Pass 1: every chunk from a zero state, side by side -> local end states.
    start = xf.new_zeros(batch, d_inner, d_state) if initial_state is None else initial_state.float()
    if n_chunks > 1:
        local_end = xf.new_zeros(batch, n_chunks, d_inner, d_state)
        for t in range(chunk):
            local_end = step(local_end, t)
        chunk_decay = torch.exp(dt_c.sum(0)[..., None] * A)  # (B, nc, Di, N)
        # Pass 2: walk the chunk ends to get each chunk's true start state.
        starts = []
        for c in range(n_chunks):
            starts.append(start)
            start = chunk_decay[:, c] * start + local_end[:, c]
        h = torch.stack(starts, dim=1)  # (B, nc, Di, N)
        final_state = start
    else:
        h = start[:, None]
    # Pass 3: rerun all chunks from their start states and read the outputs.
    ys = []
    for t in range(chunk):
        h = step(h, t)
        ys.append(torch.einsum("bcdn,bcn->bcd", h, C_c[t]))
    if n_chunks == 1:
        final_state = h[:, 0]
    y = torch.stack(ys, dim=2).reshape(batch, padded, d_inner)[:, :length]  # (B, L, Di)
    if D is not None:
        y = y + xf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, final_state) if return_final_state else y


def _segment_sum(log_decay: Tensor) -> Tensor:
    """(..., T) per-step log decays -> (..., T, T) with [t, s] = sum(log_decay[s+1 : t+1]), -inf for s > t."""
    chunk = log_decay.shape[-1]
    cum = torch.cumsum(log_decay, dim=-1)
    seg = cum[..., :, None] - cum[..., None, :]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=log_decay.device).tril()
    return seg.masked_fill(~causal, -math.inf)


def ssd_scan_chunked(
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
    chunk_size: int = 64,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2 scan; same signature and shapes as ``ssd_scan_reference``."""
    dtype = x.dtype
    batch, length, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    chunk = max(1, min(chunk_size, length))
    n_chunks = -(-length // chunk)
    padded = n_chunks * chunk
    dt = _discretise_dt(dt, dt_bias, dt_softplus, dt_limit)  # (B, L, H)
    xf = x.float()

    def chunked(t: Tensor) -> Tensor:  # (B, L, ...) -> (B, nc, T, ...)
        return _pad_time(t, padded).reshape(batch, n_chunks, chunk, *t.shape[2:])

    x_c = chunked(xf * dt[..., None])  # (B, nc, T, H, P): dt folded into the input
    B_c = chunked(B.float().repeat_interleave(heads_per_group, dim=2))  # (B, nc, T, H, N)
    C_c = chunked(C.float().repeat_interleave(heads_per_group, dim=2))
    log_decay = chunked(dt * A.float()).permute(0, 1, 3, 2)  # (B, nc, H, T)
    cum = torch.cumsum(log_decay, dim=-1)  # (B, nc, H, T)

    # 1. Within each chunk: a causal, decay-weighted "attention" C_t . B_s.
    weights = torch.exp(_segment_sum(log_decay))  # (B, nc, H, T, T)
    scores = torch.einsum("bcthn,bcshn->bchts", C_c, B_c) * weights
    y = torch.einsum("bchts,bcshp->bcthp", scores, x_c)  # (B, nc, T, H, P)

    # 2. Each chunk's end state from a zero start.
    to_end = torch.exp(cum[..., -1:] - cum)  # (B, nc, H, T)
    local_end = torch.einsum("bcshn,bchs,bcshp->bchpn", B_c, to_end, x_c)  # (B, nc, H, P, N)

    # 3. Walk the chunk ends: the state entering each chunk.
    state = x.new_zeros(batch, nheads, headdim, B.shape[-1], dtype=torch.float32)
    if initial_state is not None:
        state = initial_state.float()
    chunk_decay = torch.exp(cum[..., -1])  # (B, nc, H)
    starts = []
    for c in range(n_chunks):
        starts.append(state)
        state = chunk_decay[:, c, :, None, None] * state + local_end[:, c]
    starts = torch.stack(starts, dim=1)  # (B, nc, H, P, N)

    # 4. What the entering state contributes to each token.
    y = y + torch.einsum("bcthn,bchpn,bcht->bcthp", C_c, starts, torch.exp(cum))
    y = y.reshape(batch, padded, nheads, headdim)[:, :length]
    if D is not None:
        D = D.float()
        y = y + xf * (D[:, None] if D.dim() == 1 else D)
    y = y.to(dtype)
    return (y, state) if return_final_state else y


def causal_conv1d_torch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_state: Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Depthwise causal convolution; same signature and shapes as ``causal_conv1d_reference``.

    One output buffer, updated in place by one multiply-add per tap: on CPU every extra
    (B, L, C) temporary costs about as much as the arithmetic.
    """
    length = x.shape[1]
    width = weight.shape[1]
    weight = weight.to(x.dtype)
    # Without a carried state the inputs before the first token are zeros, and their taps are skipped.
    inputs = x if initial_state is None else torch.cat([initial_state.to(x.dtype), x], dim=1)  # (B, P + L, C)
    past = inputs.shape[1] - length  # P: 0, or K - 1 carried inputs
    if bias is None:
        y = x * weight[:, width - 1]
    else:
        y = torch.addcmul(bias.to(x.dtype), x, weight[:, width - 1])
    for shift in range(1, width):  # the tap that reads the input `shift` tokens back
        first = max(shift - past, 0)  # the first output that has such an input
        if first < length:
            y[:, first:].addcmul_(inputs[:, past + first - shift : past + length - shift], weight[:, width - 1 - shift])
    if activation == "silu":
        y = F.silu(y, inplace=not torch.is_grad_enabled())  # in place only where autograd keeps no copy of y
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r}")
    if return_final_state:
        return y, conv_final_state(x, initial_state, width)
    return y


def conv_final_state(x: Tensor, initial_state: Tensor | None, width: int) -> Tensor:
    """The last K - 1 inputs (B, K - 1, C), in the dtype of x: the convolution's state for the next chunk.

    A text shorter than K - 1 tokens reaches back into ``initial_state`` (zeros if None).
    """
    length = x.shape[1]
    recent = x[:, length - min(length, width - 1) :]
    missing = width - 1 - recent.shape[1]
    if missing == 0:
        return recent
    if initial_state is None:
        return F.pad(recent, (0, 0, missing, 0))
    return torch.cat([initial_state[:, initial_state.shape[1] - missing :].to(x.dtype), recent], dim=1)
