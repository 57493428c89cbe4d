"""Triton kernels of the Mamba-2 scan (state-space duality, SSD), forward and backward.

A Mamba-2 head decays its whole (P, N) state by one scalar a_t = exp(delta_t A) per token, so inside a
chunk of Q tokens the scan is a masked matrix product, and chunks are joined through their states
(``ops/README.md`` has the recurrence, ``chunked.py`` the same decomposition in PyTorch). With
cum_t = sum_{s <= t} delta_s A over the chunk and u_s = delta_s x_s:

    y_t     = sum_{s <= t} (C_t . B_s) exp(cum_t - cum_s) u_s  +  exp(cum_t) S_start C_t  +  D x_t
    S_end   = exp(cum_last) S_start + sum_s exp(cum_last - cum_s) u_s B_s^T

Forward, three kernels:

1. ``_ssd_chunk_state_kernel``: per (chunk, head), the chunk's end state from a zero start (one
   (P, Q) x (Q, N) product) and its summed log decay cum_last.
2. ``_ssd_state_passing_kernel``: per (sequence, head), a walk over the sequence's chunks that turns
   those end states, in place, into each chunk's start state; it starts from the initial state and
   leaves the final state.
3. ``_ssd_chunk_scan_fwd_kernel``: per (chunk, head), the output: the intra-chunk C . B^T masked by
   the decays, times u, plus C times the decayed start state, plus D x.

Backward. The forward pass keeps only its inputs; the backward re-runs kernels 1 and 2 for the start
states, then runs the same two kernels the other way: kernel 1 with (dy, C) in place of (x, B) gives
what each chunk's outputs send back to its start state, sum_t exp(cum_t) dy_t C_t^T, and kernel 2
walking from the last chunk to the first (from the final state's gradient) gives the gradient of each
chunk's end state, and the initial state's. ``_ssd_chunk_scan_bwd_kernel`` then takes, per (chunk,
group), every other gradient: dx, ddt (through the limit clamp, the softplus and dt_bias), and this
chunk's shares of dA, dD and ddt_bias; dB and dC summed over the group's heads in registers, so that
they are written once, without atomics. Nothing (P, N)-sized per token is ever stored: two transient
(chunks, H, P, N) fp32 buffers per call, (H P N 4 / SSD_CHUNK) bytes a token each.

Packed batches (``cu_seqlens``): each sequence is cut into its own chunks, the first starting at the
sequence's first token, so that no chunk ever holds two sequences and no decay needs resetting inside
a chunk; a sequence's last chunk is short. (The alternative, chunks on a global grid with a per-token
sequence index masking the decays, keeps chunks full but makes every kernel test the index.) A padded
(B, L) batch is read as B packed sequences of L tokens, so both are one code path. The chunk table
(``_Chunks``) is built on the device without a host sync; its length is an upper bound, and chunks
past the real count have no tokens.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from st_mamba.ops.triton import _fast, _needs_grad, _rows, _sigmoid, _softplus

# Tokens a chunk. Larger chunks mean fewer, larger chunk states (the transient buffers above) but
# Q x Q score tiles in registers and Q multiply-adds per token and head in the intra-chunk products.
SSD_CHUNK = 64
SSD_WARPS = 4
# The backward's dB and dC take a kernel of their own, over blocks of SSD_BWD_BLOCK_N states: in the kernel
# of the other gradients their (Q, N) sums over the group's heads took 262 KB of shared memory at d_state 128
# (compiled for sm_90; a Hopper SM has 227 KB), and the launch failed. Both backward kernels keep two
# pipeline stages: with Triton's default three the other gradients' kernel needs 296 KB in fp32 at d_state
# 128; with two it needs 197 KB (fp32) and 123 KB (bf16), the dB/dC kernel 132 KB and 148 KB.
SSD_BWD_BLOCK_N = 64
# The pass over chunk states is a walk along each sequence: its parallelism is (sequences x heads x
# blocks of SSD_PASS_BLOCK_P state rows), each program carrying a (SSD_PASS_BLOCK_P, N) running state.
# At 64 a program of a 64-wide head walks its whole state; 32 and 16 were slower (docs/kernels.md).
SSD_PASS_BLOCK_P = 64
SSD_BWD_STAGES = 2


# --- device helpers ------------------------------------------------------------------------------


@triton.jit
def _chunk_span(chunk_start_ptr, chunk_len_ptr, chunk, CHUNK: tl.constexpr):
    """The chunk's first token (int64), its token offsets (CHUNK,) and which of them are real."""
    t0 = tl.load(chunk_start_ptr + chunk)
    n_valid = tl.load(chunk_len_ptr + chunk)
    offs_q = tl.arange(0, CHUNK)
    return t0, offs_q, offs_q < n_valid


@triton.jit
def _chunk_decays(
    dt_ptr, a_ptr, bias_ptr, head, rows, valid, stride_dt_t, stride_dt_h, dt_min, dt_max,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """For one head over one chunk: dt + bias before the softplus, delta = clamp(softplus(dt + bias)),
    and the running log decay cum_t = sum_{s <= t} delta_s A; all (CHUNK,) fp32, delta = 0 past the chunk."""
    raw = tl.load(dt_ptr + rows * stride_dt_t + head * stride_dt_h, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + head)
    delta = raw
    if SOFTPLUS:
        delta = _softplus(raw, FAST)
    if HAS_LIMIT:
        delta = tl.minimum(tl.maximum(delta, dt_min), dt_max)
    delta = tl.where(valid, delta, 0.0)  # so that the tokens past the chunk leave cum as it is
    cum = tl.cumsum(delta * tl.load(a_ptr + head), axis=0)
    return raw, delta, cum


@triton.jit
def _load_tile(ptr, rows, stride_t, col_offset, offs, width, valid):
    """A (CHUNK, BLOCK) fp32 tile: the given token rows, ``width`` columns from ``col_offset``; zeros outside."""
    mask = valid[:, None] & (offs < width)[None, :]
    return tl.load(ptr + rows[:, None] * stride_t + col_offset + offs[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _state_tile(ptr, index, offs_p, offs_n, headdim, d_state):
    """Pointers and mask of the (BLOCK_P, BLOCK_N) state number ``index`` of a contiguous (..., P, N) tensor."""
    ptrs = ptr + index.to(tl.int64) * headdim * d_state + offs_p[:, None] * d_state + offs_n[None, :]
    return ptrs, (offs_p < headdim)[:, None] & (offs_n < d_state)[None, :]


# --- forward -------------------------------------------------------------------------------------


@triton.jit
def _ssd_chunk_state_kernel(
    v_ptr, k_ptr, dt_ptr, a_ptr, bias_ptr, chunk_start_ptr, chunk_len_ptr, out_ptr, log_decay_ptr,
    n_heads, heads_per_group, headdim, d_state, dt_min, dt_max,
    stride_v_t, stride_v_h, stride_k_t, stride_k_g, stride_dt_t, stride_dt_h,
    REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    FAST: tl.constexpr, DOT: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (chunk, head): sum over the chunk's tokens of w_t v_t k_t^T, a (P, N) state, fp32.

    Forward (v = x, k = B): w_t = exp(cum_last - cum_t) delta_t, the chunk's end state from a zero start;
    also stores cum_last, the chunk's summed log decay. REVERSE (v = dy, k = C): w_t = exp(cum_t), what the
    chunk's outputs send back to its start state.
    """
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    t0, offs_q, valid = _chunk_span(chunk_start_ptr, chunk_len_ptr, chunk, CHUNK)
    rows = t0 + offs_q  # (CHUNK,) int64
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    _, delta, cum = _chunk_decays(
        dt_ptr, a_ptr, bias_ptr, head, rows, valid, stride_dt_t, stride_dt_h, dt_min, dt_max,
        HAS_BIAS, SOFTPLUS, HAS_LIMIT, FAST,
    )  # fmt: skip
    cum_last = tl.sum(delta) * tl.load(a_ptr + head)
    if REVERSE:
        weight = tl.exp(cum)
    else:
        weight = tl.exp(cum_last - cum) * delta
    v = _load_tile(v_ptr, rows, stride_v_t, head * stride_v_h, offs_p, headdim, valid)  # (CHUNK, BLOCK_P)
    k = _load_tile(k_ptr, rows, stride_k_t, (head // heads_per_group) * stride_k_g, offs_n, d_state, valid)
    state = tl.dot(tl.trans(v * weight[:, None]), k, input_precision=DOT)  # (BLOCK_P, BLOCK_N)
    ptrs, mask = _state_tile(out_ptr, chunk * n_heads + head, offs_p, offs_n, headdim, d_state)
    tl.store(ptrs, state, mask=mask)
    if not REVERSE:
        tl.store(log_decay_ptr + chunk * n_heads + head, cum_last)


@triton.jit
def _ssd_state_passing_kernel(
    states_ptr, log_decay_ptr, chunk_off_ptr, init_ptr, last_ptr, n_heads, headdim, d_state,
    REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_LAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (sequence, head, block of BLOCK_P state rows): walk the sequence's chunks, replacing each
    chunk's row of ``states`` by the running state at that chunk, then folding the row in:
    s <- exp(cum_last) s + row.

    Forward: first to last from the initial state; rows in are end states from a zero start, rows out the
    chunks' start states, and the last running state is the final state. REVERSE: last to first from the
    final state's gradient; rows in are what each chunk sends back to its start, rows out the gradients
    of the chunks' end states, and the last running state is the initial state's gradient.
    """
    seq = tl.program_id(0)
    head = tl.program_id(1)
    first = tl.load(chunk_off_ptr + seq)
    count = tl.load(chunk_off_ptr + seq + 1) - first
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    seq_ptrs, mask = _state_tile(init_ptr, seq * n_heads + head, offs_p, offs_n, headdim, d_state)
    if HAS_INIT:
        running = tl.load(seq_ptrs, mask=mask, other=0.0)
    else:
        running = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for i in range(0, count):
        if REVERSE:
            chunk = first + count - 1 - i
        else:
            chunk = first + i
        row_ptrs, _ = _state_tile(states_ptr, chunk * n_heads + head, offs_p, offs_n, headdim, d_state)
        row = tl.load(row_ptrs, mask=mask, other=0.0)
        tl.store(row_ptrs, running, mask=mask)
        running = tl.exp(tl.load(log_decay_ptr + chunk * n_heads + head)) * running + row
    if STORE_LAST:
        last_ptrs, _ = _state_tile(last_ptr, seq * n_heads + head, offs_p, offs_n, headdim, d_state)
        tl.store(last_ptrs, running, mask=mask)


@triton.jit
def _ssd_chunk_scan_fwd_kernel(
    x_ptr, dt_ptr, a_ptr, bias_ptr, b_ptr, c_ptr, d_ptr, states_ptr, chunk_start_ptr, chunk_len_ptr, y_ptr,
    n_heads, heads_per_group, headdim, d_state, dt_min, dt_max,
    stride_x_t, stride_x_h, stride_dt_t, stride_dt_h, stride_b_t, stride_b_g, stride_c_t, stride_c_g,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, FAST: tl.constexpr, DOT: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (chunk, head): y for the chunk's tokens, from its inputs and its start state (``states``)."""
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    t0, offs_q, valid = _chunk_span(chunk_start_ptr, chunk_len_ptr, chunk, CHUNK)
    rows = t0 + offs_q
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    _, delta, cum = _chunk_decays(
        dt_ptr, a_ptr, bias_ptr, head, rows, valid, stride_dt_t, stride_dt_h, dt_min, dt_max,
        HAS_BIAS, SOFTPLUS, HAS_LIMIT, FAST,
    )  # fmt: skip
    group_col = head // heads_per_group
    x = _load_tile(x_ptr, rows, stride_x_t, head * stride_x_h, offs_p, headdim, valid)  # (CHUNK, BLOCK_P)
    Bm = _load_tile(b_ptr, rows, stride_b_t, group_col * stride_b_g, offs_n, d_state, valid)  # (CHUNK, BLOCK_N)
    Cm = _load_tile(c_ptr, rows, stride_c_t, group_col * stride_c_g, offs_n, d_state, valid)
    start_ptrs, state_mask = _state_tile(states_ptr, chunk * n_heads + head, offs_p, offs_n, headdim, d_state)
    start = tl.load(start_ptrs, mask=state_mask, other=0.0)  # (BLOCK_P, BLOCK_N)

    # exp(cum_t - cum_s) for s <= t; the mask goes in before the exponential, whose argument above the
    # diagonal can be large and positive.
    causal = offs_q[:, None] >= offs_q[None, :]
    decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))  # (CHUNK, CHUNK)
    scores = tl.dot(Cm, tl.trans(Bm), input_precision=DOT) * decay  # (CHUNK, CHUNK): [t, s]
    y = tl.dot(scores, x * delta[:, None], input_precision=DOT)  # (CHUNK, BLOCK_P)
    y += tl.exp(cum)[:, None] * tl.dot(Cm, tl.trans(start), input_precision=DOT)
    if HAS_D:
        if D_PER_P:
            y += x * tl.load(d_ptr + head * headdim + offs_p, mask=offs_p < headdim, other=0.0)[None, :]
        else:
            y += x * tl.load(d_ptr + head)
    # y is contiguous (T, H, P).
    y_ptrs = y_ptr + (rows[:, None] * n_heads + head) * headdim + offs_p[None, :]
    tl.store(y_ptrs, y, mask=valid[:, None] & (offs_p < headdim)[None, :])


# --- backward ------------------------------------------------------------------------------------


@triton.jit
def _ssd_chunk_scan_bwd_kernel(
    x_ptr, dt_ptr, a_ptr, bias_ptr, b_ptr, c_ptr, d_ptr, dy_ptr, states_ptr, dstates_ptr,
    chunk_start_ptr, chunk_len_ptr,
    dx_ptr, ddt_ptr, da_ptr, dd_ptr, dbias_ptr,
    n_heads, n_groups, heads_per_group, headdim, d_state, dt_min, dt_max,
    stride_x_t, stride_x_h, stride_dt_t, stride_dt_h, stride_b_t, stride_b_g, stride_c_t, stride_c_g,
    stride_dy_t, stride_dy_h,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, FAST: tl.constexpr, DOT: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (chunk, group): the gradients of x and dt, and the chunk's shares of dA, dD and ddt_bias, for the
    group's heads one after another (dB and dC: ``_ssd_chunk_scan_bwd_bc_kernel``).

    Reads each chunk's start state (``states``) and its end state's gradient (``dstates``). Writes dx and
    ddt (in the dtypes of x and dt) and, per (chunk, head), the shares of dA, dD (per channel) and ddt_bias
    that the host sums.
    """
    chunk = tl.program_id(0)
    group = tl.program_id(1)
    t0, offs_q, valid = _chunk_span(chunk_start_ptr, chunk_len_ptr, chunk, CHUNK)
    rows = t0 + offs_q
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    Bm = _load_tile(b_ptr, rows, stride_b_t, group * stride_b_g, offs_n, d_state, valid)  # (CHUNK, BLOCK_N)
    Cm = _load_tile(c_ptr, rows, stride_c_t, group * stride_c_g, offs_n, d_state, valid)
    CB = tl.dot(Cm, tl.trans(Bm), input_precision=DOT)  # (CHUNK, CHUNK): [t, s], shared by the group's heads
    causal = offs_q[:, None] >= offs_q[None, :]
    for head_in_group in range(0, heads_per_group):
        head = group * heads_per_group + head_in_group
        A = tl.load(a_ptr + head)
        raw, delta, cum = _chunk_decays(
            dt_ptr, a_ptr, bias_ptr, head, rows, valid, stride_dt_t, stride_dt_h, dt_min, dt_max,
            HAS_BIAS, SOFTPLUS, HAS_LIMIT, FAST,
        )  # fmt: skip
        cum_last = tl.sum(delta) * A
        x = _load_tile(x_ptr, rows, stride_x_t, head * stride_x_h, offs_p, headdim, valid)  # (CHUNK, BLOCK_P)
        dy = _load_tile(dy_ptr, rows, stride_dy_t, head * stride_dy_h, offs_p, headdim, valid)
        start_ptrs, state_mask = _state_tile(states_ptr, chunk * n_heads + head, offs_p, offs_n, headdim, d_state)
        start = tl.load(start_ptrs, mask=state_mask, other=0.0)  # (BLOCK_P, BLOCK_N): S_start
        dend_ptrs, _ = _state_tile(dstates_ptr, chunk * n_heads + head, offs_p, offs_n, headdim, d_state)
        dend = tl.load(dend_ptrs, mask=state_mask, other=0.0)  # the gradient of S_end
        u = x * delta[:, None]  # (CHUNK, BLOCK_P)
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        scores = CB * decay  # W[t, s]: y_t = sum_s W[t, s] u_s + ...
        from_start = tl.exp(cum)  # exp(cum_t): how much of S_start reaches token t
        to_end = tl.exp(cum_last - cum)  # exp(cum_last - cum_s): how much of u_s B_s^T reaches S_end

        # u_s reaches y_t (t >= s) through W[t, s], and S_end through to_end_s B_s^T.
        dend_b = tl.dot(Bm, tl.trans(dend), input_precision=DOT)  # (CHUNK, BLOCK_P): dS_end B_s
        du = tl.dot(tl.trans(scores), dy, input_precision=DOT) + to_end[:, None] * dend_b
        dx = du * delta[:, None]
        ddelta = tl.sum(du * x, axis=1)  # through u = delta x; through the decays below
        dscores = tl.dot(dy, tl.trans(u), input_precision=DOT)  # (CHUNK, CHUNK): dy_t . u_s

        # The gradient of each cum_t. W[t, s] grows with cum_t and shrinks with cum_s; the start state's
        # share of y_t grows with cum_t; u_s's share of S_end shrinks with cum_s and, like S_start's
        # share, grows with cum_last.
        through_scores = dscores * scores
        y_from_start = from_start[:, None] * tl.dot(Cm, tl.trans(start), input_precision=DOT)  # (CHUNK, BLOCK_P)
        into_end = to_end * tl.sum(u * dend_b, axis=1)  # (CHUNK,)
        dcum = tl.sum(through_scores, axis=1) - tl.sum(through_scores, axis=0) + tl.sum(dy * y_from_start, axis=1)
        dcum -= into_end
        dcum_last = tl.sum(into_end) + tl.exp(cum_last) * tl.sum(dend * start)
        # cum_t sums the log decays delta_s A of s <= t, cum_last all of them: dlog_decay_s = sum_{t >= s} dcum_t + dcum_last.
        dlog_decay = tl.sum(dcum) - tl.cumsum(dcum, axis=0) + dcum + dcum_last
        dlog_decay = tl.where(valid, dlog_decay, 0.0)
        ddelta += dlog_decay * A
        tl.store(da_ptr + chunk * n_heads + head, tl.sum(dlog_decay * delta))

        # Back through the clamp (whose gradient passes inside the limits, ends included, as torch's
        # does), the softplus and the bias.
        ddt = ddelta
        if HAS_LIMIT:
            before_clamp = raw
            if SOFTPLUS:
                before_clamp = _softplus(raw, FAST)
            ddt = tl.where((before_clamp >= dt_min) & (before_clamp <= dt_max), ddt, 0.0)
        if SOFTPLUS:
            ddt *= _sigmoid(raw, FAST)
        ddt = tl.where(valid, ddt, 0.0)
        if HAS_BIAS:
            tl.store(dbias_ptr + chunk * n_heads + head, tl.sum(ddt))
        if HAS_D:
            if D_PER_P:
                D = tl.load(d_ptr + head * headdim + offs_p, mask=mask_p, other=0.0)[None, :]
            else:
                D = tl.load(d_ptr + head)
            dx += D * dy
            tl.store(dd_ptr + (chunk * n_heads + head) * headdim + offs_p, tl.sum(x * dy, axis=0), mask=mask_p)
        # dx is contiguous (T, H, P), ddt (T, H).
        tl.store(dx_ptr + (rows[:, None] * n_heads + head) * headdim + offs_p[None, :], dx, mask=valid[:, None] & mask_p[None, :])  # fmt: skip
        tl.store(ddt_ptr + rows * n_heads + head, ddt, mask=valid)


@triton.jit
def _ssd_chunk_scan_bwd_bc_kernel(
    x_ptr, dt_ptr, a_ptr, bias_ptr, b_ptr, c_ptr, dy_ptr, states_ptr, dstates_ptr,
    chunk_start_ptr, chunk_len_ptr, db_ptr, dc_ptr,
    n_heads, n_groups, heads_per_group, headdim, d_state, dt_min, dt_max,
    stride_x_t, stride_x_h, stride_dt_t, stride_dt_h, stride_b_t, stride_b_g, stride_c_t, stride_c_g,
    stride_dy_t, stride_dy_h,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, FAST: tl.constexpr, DOT: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (chunk, group, block of BLOCK_N states): dB and dC (fp32), summed over the group's heads.

    C_t reaches y_t through S_start (exp(cum_t) S_start^T) and through W[t, s] = C_t . B_s decay[t, s]; B_s
    reaches y_t (t >= s) through W and S_end through exp(cum_last - cum_s) u_s B_s^T. Each of these is a
    product over the state index alone, so the blocks of states are independent.
    """
    chunk = tl.program_id(0)
    group = tl.program_id(1)
    t0, offs_q, valid = _chunk_span(chunk_start_ptr, chunk_len_ptr, chunk, CHUNK)
    rows = t0 + offs_q
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    Bm = _load_tile(b_ptr, rows, stride_b_t, group * stride_b_g, offs_n, d_state, valid)  # (CHUNK, BLOCK_N)
    Cm = _load_tile(c_ptr, rows, stride_c_t, group * stride_c_g, offs_n, d_state, valid)
    causal = offs_q[:, None] >= offs_q[None, :]
    dB = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
    dC = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
    for head_in_group in range(0, heads_per_group):
        head = group * heads_per_group + head_in_group
        _, delta, cum = _chunk_decays(
            dt_ptr, a_ptr, bias_ptr, head, rows, valid, stride_dt_t, stride_dt_h, dt_min, dt_max,
            HAS_BIAS, SOFTPLUS, HAS_LIMIT, FAST,
        )  # fmt: skip
        cum_last = tl.sum(delta) * tl.load(a_ptr + head)
        x = _load_tile(x_ptr, rows, stride_x_t, head * stride_x_h, offs_p, headdim, valid)  # (CHUNK, BLOCK_P)
        dy = _load_tile(dy_ptr, rows, stride_dy_t, head * stride_dy_h, offs_p, headdim, valid)
        start_ptrs, state_mask = _state_tile(states_ptr, chunk * n_heads + head, offs_p, offs_n, headdim, d_state)
        start = tl.load(start_ptrs, mask=state_mask, other=0.0)  # (BLOCK_P, BLOCK_N) of S_start
        dend_ptrs, _ = _state_tile(dstates_ptr, chunk * n_heads + head, offs_p, offs_n, headdim, d_state)
        dend = tl.load(dend_ptrs, mask=state_mask, other=0.0)  # ... of the gradient of S_end
        u = x * delta[:, None]
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        dCB = tl.dot(dy, tl.trans(u), input_precision=DOT) * decay  # (CHUNK, CHUNK): dW[t, s] decay[t, s]
        dC += tl.dot(dCB, Bm, input_precision=DOT) + tl.exp(cum)[:, None] * tl.dot(dy, start, input_precision=DOT)
        to_end = tl.exp(cum_last - cum)
        dB += tl.dot(tl.trans(dCB), Cm, input_precision=DOT) + to_end[:, None] * tl.dot(u, dend, input_precision=DOT)
    # dB and dC are contiguous (T, G, N).
    bc_ptrs = (rows[:, None] * n_groups + group) * d_state + offs_n[None, :]
    bc_mask = valid[:, None] & (offs_n < d_state)[None, :]
    tl.store(db_ptr + bc_ptrs, dB, mask=bc_mask)
    tl.store(dc_ptr + bc_ptrs, dC, mask=bc_mask)


# --- host side -----------------------------------------------------------------------------------


class _Chunks:
    """Where the sequences and their chunks lie in the (T, ...) token rows.

    A padded (B, L) batch is B sequences of L tokens; a packed one (1, T) the ``cu_seqlens`` segments.
    ``start`` (int64) and ``length`` (int32) give each chunk's first token and token count, ``offsets``
    (n + 1,) int32 where each sequence's chunks begin. Built with device ops only (no host sync): packed,
    the table has an upper bound of rows, ceil(T / Q) + n, the ones past the real chunks empty.
    """

    def __init__(self, batch: int, length: int, cu_seqlens: Tensor | None, chunk: int, device: torch.device):
        self.size = chunk
        if cu_seqlens is None:
            cu_seqlens = torch.arange(batch + 1, device=device, dtype=torch.int64) * length
            self.n_chunks = batch * -(-length // chunk)
        else:
            cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int64)
            self.n_chunks = -(-length // chunk) + cu_seqlens.numel() - 1
        self.n_seq = cu_seqlens.numel() - 1
        per_seq = torch.div(cu_seqlens[1:] - cu_seqlens[:-1] + chunk - 1, chunk, rounding_mode="floor")
        offsets = torch.nn.functional.pad(torch.cumsum(per_seq, 0), (1, 0))  # (n + 1,)
        ids = torch.arange(self.n_chunks, device=device)
        seq = torch.searchsorted(offsets[1:], ids, right=True).clamp_(max=max(self.n_seq - 1, 0))
        start = cu_seqlens[seq] + (ids - offsets[seq]) * chunk
        end = torch.minimum(start + chunk, cu_seqlens[seq + 1])
        real = ids < offsets[-1]
        self.start = torch.where(real, start, 0).contiguous()
        self.length = torch.where(real, end - start, 0).to(torch.int32).contiguous()
        self.offsets = offsets.to(torch.int32).contiguous()


class _Inputs:
    """The scan's inputs as the kernels read them: (T, ...) token rows with unit-stride last dims, fp32
    parameters, and the launch settings."""

    def __init__(self, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state, cu_seqlens):
        batch, length, nheads, headdim = x.shape
        ngroups, d_state = B.shape[2], B.shape[3]
        self.shape, self.dtypes = x.shape, (x.dtype, dt.dtype, B.dtype, C.dtype)
        self.nheads, self.headdim, self.ngroups, self.d_state = nheads, headdim, ngroups, d_state
        tokens = batch * length
        # (B, L, ...) -> (T, ...): a view for the strided slices of in_proj's output the mixer passes.
        self.x = _rows(x.reshape(tokens, nheads, headdim))
        self.dt = dt.reshape(tokens, nheads)
        self.B = _rows(B.reshape(tokens, ngroups, d_state))
        self.C = _rows(C.reshape(tokens, ngroups, d_state))
        self.A = A.float().contiguous()
        self.D = None if D is None else D.float().contiguous()
        self.dt_bias = None if dt_bias is None else dt_bias.float().contiguous()
        self.h0 = None if initial_state is None else initial_state.float().contiguous()
        self.softplus = dt_softplus
        low, high = (float(v) for v in dt_limit)
        self.has_limit = (low, high) != (0.0, math.inf)
        self.dt_min, self.dt_max = low, min(high, 3.0e38)  # a finite bound: the kernels take fp32 scalars
        self.chunks = _Chunks(batch, length, cu_seqlens, SSD_CHUNK, x.device)
        self.block_p = max(16, triton.next_power_of_2(headdim))  # tl.dot wants every side >= 16
        self.block_n = max(16, triton.next_power_of_2(d_state))
        self.common = dict(
            HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=self.has_limit, FAST=_fast(x),
            CHUNK=SSD_CHUNK, BLOCK_P=self.block_p, BLOCK_N=self.block_n, num_warps=SSD_WARPS,
        )  # fmt: skip
        # fp32 inputs get exact fp32 products; 16-bit ones TF32, finer than their own rounding.
        self.dot = "ieee" if x.dtype == torch.float32 else "tf32"

    def new_states(self) -> Tensor:
        """A (chunks, H, P, N) fp32 buffer, one state per chunk and head."""
        return self.x.new_empty(self.chunks.n_chunks, self.nheads, self.headdim, self.d_state, dtype=torch.float32)

    def chunk_sums(self, v: Tensor, k: Tensor, out: Tensor, log_decay: Tensor, reverse: bool) -> None:
        """``_ssd_chunk_state_kernel``: forward, end states from zero (x, B); reverse, (dy, C)."""
        _ssd_chunk_state_kernel[(self.chunks.n_chunks, self.nheads)](
            v, k, self.dt, self.A, _or(self.dt_bias, self.A), self.chunks.start, self.chunks.length, out, log_decay,
            self.nheads, self.nheads // self.ngroups, self.headdim, self.d_state, self.dt_min, self.dt_max,
            v.stride(0), v.stride(1), k.stride(0), k.stride(1), self.dt.stride(0), self.dt.stride(1),
            REVERSE=reverse, DOT=self.dot, **self.common,
        )  # fmt: skip

    def pass_states(self, states: Tensor, log_decay: Tensor, init: Tensor | None, last: Tensor | None, reverse: bool):
        """``_ssd_state_passing_kernel`` over every (sequence, head, block of state rows)."""
        dummy = states.new_empty(0)
        block_p = min(self.block_p, SSD_PASS_BLOCK_P)
        _ssd_state_passing_kernel[(self.chunks.n_seq, self.nheads, triton.cdiv(self.headdim, block_p))](
            states, log_decay, self.chunks.offsets, _or(init, dummy), _or(last, dummy),
            self.nheads, self.headdim, self.d_state,
            REVERSE=reverse, HAS_INIT=init is not None, STORE_LAST=last is not None,
            BLOCK_P=block_p, BLOCK_N=self.block_n, num_warps=SSD_WARPS,
        )  # fmt: skip

    def start_states(self, final: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Each chunk's start state (chunks, H, P, N) and summed log decay (chunks, H); the final states into ``final``."""
        states = self.new_states()
        log_decay = self.x.new_empty(self.chunks.n_chunks, self.nheads, dtype=torch.float32)
        self.chunk_sums(self.x, self.B, states, log_decay, reverse=False)
        self.pass_states(states, log_decay, self.h0, final, reverse=False)
        return states, log_decay

    def param_args(self) -> tuple:
        return (self.x, self.dt, self.A, _or(self.dt_bias, self.A), self.B, self.C, _or(self.D, self.A))

    def stride_args(self) -> tuple:
        return (
            self.x.stride(0), self.x.stride(1), self.dt.stride(0), self.dt.stride(1),
            self.B.stride(0), self.B.stride(1), self.C.stride(0), self.C.stride(1),
        )  # fmt: skip


def _or(t: Tensor | None, stand_in: Tensor) -> Tensor:
    """``t``, or a stand-in pointer for a kernel argument that a constexpr flag leaves unread."""
    return stand_in if t is None else t


def _ssd_forward(inp: _Inputs, return_final: bool) -> tuple[Tensor, Tensor | None]:
    """y (B, L, H, P) in x's dtype and, if asked, the final states (n, H, P, N) fp32."""
    final = None
    if return_final:
        final = inp.x.new_empty(inp.chunks.n_seq, inp.nheads, inp.headdim, inp.d_state, dtype=torch.float32)
    y = inp.x.new_empty(inp.x.shape)  # (T, H, P), contiguous
    if inp.x.shape[0] == 0:  # no tokens: the state passes through unchanged
        if final is not None:
            final.copy_(inp.h0) if inp.h0 is not None else final.zero_()
        return y.view(inp.shape), final
    states, _ = inp.start_states(final)
    _ssd_chunk_scan_fwd_kernel[(inp.chunks.n_chunks, inp.nheads)](
        *inp.param_args(), states, inp.chunks.start, inp.chunks.length, y,
        inp.nheads, inp.nheads // inp.ngroups, inp.headdim, inp.d_state, inp.dt_min, inp.dt_max,
        *inp.stride_args(), HAS_D=inp.D is not None, D_PER_P=inp.D is not None and inp.D.dim() == 2,
        DOT=inp.dot, **inp.common,
    )  # fmt: skip
    return y.view(inp.shape), final


def _ssd_backward(inp: _Inputs, dy: Tensor, dfinal: Tensor | None) -> tuple:
    """Gradients of x, dt, A, B, C, D, dt_bias and the initial state (None where there is no input)."""
    tokens = inp.x.shape[0]
    f32 = dict(device=inp.x.device, dtype=torch.float32)
    if tokens == 0:  # the final state was the initial state: its gradient passes through, the rest are empty
        dh0 = None if inp.h0 is None else (torch.zeros_like(inp.h0) if dfinal is None else dfinal.float().clone())
        zeros = [torch.zeros(t.shape, device=t.device, dtype=t.dtype) for t in (inp.x, inp.dt, inp.B, inp.C)]
        dD = None if inp.D is None else torch.zeros_like(inp.D)
        dbias = None if inp.dt_bias is None else torch.zeros_like(inp.dt_bias)
        shape = inp.shape
        dB, dC = (t.view(*shape[:2], inp.ngroups, inp.d_state) for t in zeros[2:])
        return zeros[0].view(shape), zeros[1].view(shape[:3]), torch.zeros_like(inp.A), dB, dC, dD, dbias, dh0
    dy = _rows(dy.reshape(tokens, inp.nheads, inp.headdim))
    # 1. The start state of every chunk, recomputed (the forward pass kept only its inputs).
    states, log_decay = inp.start_states()
    # 2. The same two kernels the other way: the gradient of every chunk's end state, and the initial state's.
    dstates = inp.new_states()
    inp.chunk_sums(dy, inp.C, dstates, log_decay, reverse=True)
    dh0 = None if inp.h0 is None else torch.empty_like(inp.h0)
    inp.pass_states(dstates, log_decay, None if dfinal is None else dfinal.float().contiguous(), dh0, reverse=True)
    # 3. Everything else, chunk by chunk. Shares of dA, dD, ddt_bias per (chunk, head): zeros, since the
    # empty rows of a packed batch's chunk table write nothing.
    n_chunks = inp.chunks.n_chunks
    dx = inp.x.new_empty(inp.x.shape, dtype=inp.dtypes[0])
    ddt = inp.x.new_empty(tokens, inp.nheads, dtype=inp.dtypes[1])
    dB = torch.empty(tokens, inp.ngroups, inp.d_state, **f32)
    dC = torch.empty(tokens, inp.ngroups, inp.d_state, **f32)
    dA = torch.zeros(n_chunks, inp.nheads, **f32)
    dD = torch.zeros(n_chunks, inp.nheads, inp.headdim, **f32) if inp.D is not None else None
    dbias = torch.zeros(n_chunks, inp.nheads, **f32) if inp.dt_bias is not None else None
    _ssd_chunk_scan_bwd_kernel[(n_chunks, inp.ngroups)](
        *inp.param_args(), dy, states, dstates, inp.chunks.start, inp.chunks.length,
        dx, ddt, dA, _or(dD, dA), _or(dbias, dA),
        inp.nheads, inp.ngroups, inp.nheads // inp.ngroups, inp.headdim, inp.d_state, inp.dt_min, inp.dt_max,
        *inp.stride_args(), dy.stride(0), dy.stride(1),
        HAS_D=inp.D is not None, D_PER_P=inp.D is not None and inp.D.dim() == 2, DOT=inp.dot, **inp.common,
        num_stages=SSD_BWD_STAGES,
    )  # fmt: skip
    block_n = min(inp.block_n, SSD_BWD_BLOCK_N)
    _ssd_chunk_scan_bwd_bc_kernel[(n_chunks, inp.ngroups, triton.cdiv(inp.d_state, block_n))](
        inp.x, inp.dt, inp.A, _or(inp.dt_bias, inp.A), inp.B, inp.C, dy, states, dstates,
        inp.chunks.start, inp.chunks.length, dB, dC,
        inp.nheads, inp.ngroups, inp.nheads // inp.ngroups, inp.headdim, inp.d_state, inp.dt_min, inp.dt_max,
        *inp.stride_args(), dy.stride(0), dy.stride(1),
        DOT=inp.dot, **{**inp.common, "BLOCK_N": block_n}, num_stages=SSD_BWD_STAGES,
    )  # fmt: skip
    shape = inp.shape
    dD_sum = None
    if dD is not None:
        dD_sum = dD.sum(0) if inp.D.dim() == 2 else dD.sum((0, 2))
    return (
        dx.view(shape), ddt.view(shape[:3]), dA.sum(0),
        dB.view(*shape[:2], inp.ngroups, inp.d_state).to(inp.dtypes[2]),
        dC.view(*shape[:2], inp.ngroups, inp.d_state).to(inp.dtypes[3]),
        dD_sum, None if dbias is None else dbias.sum(0), dh0,
    )  # fmt: skip


class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state, return_final, cu_seqlens):
        inp = _Inputs(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state, cu_seqlens)
        y, final = _ssd_forward(inp, return_final)
        # Only the inputs are kept (as views where they were views): the backward recomputes the rest.
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, initial_state, cu_seqlens)
        ctx.settings = (dt_softplus, dt_limit)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, dt_bias, initial_state, cu_seqlens = ctx.saved_tensors
        inp = _Inputs(x, dt, A, B, C, D, dt_bias, *ctx.settings, initial_state, cu_seqlens)
        dx, ddt, dA, dB, dC, dD, dbias, dh0 = _ssd_backward(inp, dy, dfinal)
        return (
            dx, ddt, dA.to(A.dtype), dB, dC, None if D is None else dD.to(D.dtype), None if dt_bias is None else dbias.to(dt_bias.dtype),
            None, None, None if initial_state is None else dh0.to(initial_state.dtype), None, None,
        )  # fmt: skip


def _check_inputs(x, dt, A, B, C, D, dt_bias, initial_state, cu_seqlens) -> None:
    """Clear errors for inputs the kernels cannot read, before any launch."""
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, length, nheads, headdim), got shape {tuple(x.shape)}")
    batch, length, nheads, headdim = x.shape
    if B.dim() != 4 or B.shape[:2] != x.shape[:2] or C.shape != B.shape:
        raise ValueError(
            f"B and C must both be (batch, length, ngroups, d_state) = ({batch}, {length}, G, N); got B "
            f"{tuple(B.shape)}, C {tuple(C.shape)}"
        )
    if nheads % B.shape[2]:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({B.shape[2]})")
    expected = {"dt": (dt, (batch, length, nheads)), "A": (A, (nheads,)), "dt_bias": (dt_bias, (nheads,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"D must have shape ({nheads},) or ({nheads}, {headdim}), got {tuple(D.shape)}")
    n_seq = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"packed input (cu_seqlens given) must have batch size 1, got {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of n + 1 >= 2 offsets, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")  # fmt: skip
        n_seq = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_seq, nheads, headdim, B.shape[3]):
        raise ValueError(
            f"initial_state must have shape {(n_seq, nheads, headdim, B.shape[3])} (one state per sequence), "
            f"got {tuple(initial_state.shape)}"
        )
    # cu_seqlens may lie elsewhere (it is moved, as the Mamba-1 kernels move it).
    tensors = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "dt_bias": dt_bias, "initial_state": initial_state}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: all inputs must be on one device")
    for name in ("x", "dt", "A", "B", "C"):
        if not tensors[name].is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensors[name].dtype}")


def ssd_scan_triton(
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
    """Mamba-2 scan on a CUDA GPU; same signature and shapes as ``ssd_scan_reference``.

    With ``cu_seqlens`` (n + 1,) the batch is packed: x is (1, T, H, P), dt (1, T, H), B and C (1, T, G, N),
    and ``initial_state`` and the final state are (n, H, P, N), one per sequence.
    Gradients reach every tensor input (x, dt, A, B, C, D, dt_bias, initial_state).
    """
    _check_inputs(x, dt, A, B, C, D, dt_bias, initial_state, cu_seqlens)
    args = (x, dt, A, B, C, D, dt_bias, dt_softplus, tuple(dt_limit), initial_state, return_final_state, cu_seqlens)
    if _needs_grad(x, dt, A, B, C, D, dt_bias, initial_state):
        y, final_state = _SSDScan.apply(*args)
    else:  # inference: the kernels alone, nothing kept for a backward
        y, final_state = _ssd_forward(_Inputs(*args[:-2], cu_seqlens), return_final_state)
    return (y, final_state) if return_final_state else y
