"""Triton kernels of the Mamba-2 scan (state-space duality, SSD), forward and backward.

A Mamba-2 head decays its whole (P, N) state by one scalar a_t = exp(delta_t A) per token, so inside a
chunk of Q tokens the scan is a masked matrix product, and chunks are joined through their states
(``ops/README.md`` has the recurrence, ``chunked.py`` the same decomposition in PyTorch). With
cum_t = sum_{s <= t} delta_s A over the chunk and u_s = delta_s x_s:

    y_t     = sum_{s <= t} (C_t . B_s) exp(cum_t - cum_s) u_s  +  exp(cum_t) S_start C_t  +  D x_t
    S_end   = exp(cum_last) S_start + sum_s exp(cum_last - cum_s) u_s B_s^T

Forward of 16-bit inputs, fused: ``_ssd_fused_fwd_kernel``, one program per (sequence, head, block of state
rows), walks the sequence chunk by chunk with the running state in registers: a chunk's output from its
inputs and the running state (the intra-chunk C . B^T masked by the decays, times u; plus C times the decayed
start state; plus D x), then the chunk's tokens folded into the state. No state goes through memory. Too few
sequences to fill the GPU (a few long ones) are cut into segments: a first pass of the same kernel gives each
segment's end state from a zero start, ``_ssd_state_passing_kernel`` turns those into each segment's start
state (and the final state), and a second pass gives the outputs from them.

Forward of fp32 inputs (or with SSD_FUSED off), a walk and the outputs: ``_ssd_state_walk_kernel``, per
(sequence, head, block of state rows), walks the chunks summing each one's tokens into the running state and
storing every chunk's start state; ``_ssd_chunk_scan_fwd_kernel``, per (chunk, head), the chunk's output from
its start state, in parallel.

Backward. The forward pass keeps only its inputs; the backward re-runs the walk for the chunks' start states,
then walks the other way, from the last chunk to the first and the final state's gradient, summing (dy, C) in
place of (x, B): each chunk's outputs send sum_t exp(cum_t) dy_t C_t^T back to its start state, so the walk
leaves the gradient of each chunk's end state, and the initial state's. ``_ssd_chunk_scan_bwd_kernel`` then
takes, per (chunk, block of heads of one group), every other gradient: dx, ddt (through the limit clamp, the
softplus and dt_bias), and this chunk's shares of dA, dD and ddt_bias; ``_ssd_chunk_scan_bwd_bc_kernel`` dB and
dC, summed over a block of the group's heads in registers, each block's share written once, without atomics.
Nothing (P, N)-sized per token is ever stored: two transient (chunks, H, P, N) fp32 buffers per call,
(H P N 4 / SSD_CHUNK) bytes a token each.

Packed batches (``cu_seqlens``): each sequence is cut into its own chunks, the first starting at the
sequence's first token, so that no chunk ever holds two sequences and no decay needs resetting inside
a chunk; a sequence's last chunk is short. (The alternative, chunks on a global grid with a per-token
sequence index masking the decays, keeps chunks full but makes every kernel test the index.) A padded
(B, L) batch is read as B packed sequences of L tokens, so both are one code path. The chunk table
(``_Chunks``) is built on the device without a host sync; its length is an upper bound, and chunks
past the real count have no tokens.
"""

from __future__ import annotations

import functools
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
# The states a step of the dx/ddt kernel's loops over the state index (B, C, the chunk's start state and its end
# state's gradient read a block at a time). Whole mamba2-130m forward + backward at 2K on an H100: 32 states a
# step 268 ms, 64 273, all 128 at once 300 (ptxas: 600, 728 and 988 bytes spilled; 44, 80 and 152 KB of shared
# memory).
SSD_BWD_DX_BLOCK_N = 32
# Heads a program of the backward's kernels (at most: the largest divisor of the heads a group that is not more).
# A program computes its chunk's C . B^T once for its heads, and the dB/dC kernel sums its heads' shares in
# registers; with k blocks of heads a group, the dB/dC kernel writes k (T, G, N) fp32 shares that the host sums.
# Whole mamba2-130m forward + backward on an H100 (docs/kernels.md): with 16-bit products the whole group of 24
# heads a program 5% faster than one head (with fp32 products one head was 4% faster); dB/dC in blocks of 4 or 8
# heads slower than whole groups.
SSD_BWD_HEADS = 1 << 30
SSD_BWD_BC_HEADS = 1 << 30
# The backward's products of 16-bit inputs: 16-bit operands (the states, scores and weighted inputs rounded to the
# inputs' dtype, as the fused forward does) with fp32 sums; off, fp32 operands in TF32. On, the H100 runs the
# mamba2-130m forward + backward 1.3x faster. The dB/dC kernel keeps fp32 products at the blocks where its 16-bit
# ones went wrong (``_low_bc_blocks``).
SSD_BWD_LOW = True
SSD_BWD_WARPS = 4
# The walk over chunks and the pass over segments go along each sequence: their parallelism is (sequences x
# heads x blocks of SSD_PASS_BLOCK_P state rows), each program carrying a (SSD_PASS_BLOCK_P, N) running state.
# At 64 a program of a 64-wide head walks its whole state.
SSD_PASS_BLOCK_P = 64
SSD_BWD_STAGES = 2
# The chunks' start states (the walk-and-outputs forward, and the backward's recomputation) and the gradients of
# their end states (the backward): one walk a (sequence, head, block of SSD_PASS_BLOCK_P rows) that sums each
# chunk's tokens on the way (``_ssd_state_walk_kernel``), SSD_WALK_WARPS warps a program.
SSD_WALK_WARPS = 8
# The forward of 16-bit inputs (unless SSD_FUSED is off: then the walk and the outputs) as one walk a (sequence, head,
# block of SSD_FUSED_BLOCK_P state rows), chunks of SSD_FUSED_CHUNK tokens, the running state in registers
# (``_ssd_fused_fwd_kernel``). With fewer than SSD_FUSED_MIN_WALKS_PER_SM walks for each multiprocessor of the
# GPU (a few long sequences leave most of it idle), sequences are cut into segments of at least
# SSD_FUSED_MIN_SEGMENT tokens, enough of them for SSD_FUSED_SEGMENT_WALKS_PER_SM walks a multiprocessor,
# walked in parallel and joined by the pass over their end states. (An H100, mamba2-130m shape, 65,536 tokens:
# segments for 4 walks a multiprocessor ran 1.19M tok/s at 32K and 1.08M at 16K, for 1 walk 0.88M and 0.87M;
# whole sequences of 8K, 1.5 walks a multiprocessor, 1.17M, and segments for 4 walks there 1.05M.)
SSD_FUSED = True
SSD_FUSED_CHUNK = 32
SSD_FUSED_BLOCK_P = 64
SSD_FUSED_WARPS = 4
SSD_FUSED_STAGES = 1
SSD_FUSED_MIN_WALKS_PER_SM = 1.0
SSD_FUSED_SEGMENT_WALKS_PER_SM = 4.0
SSD_FUSED_MIN_SEGMENT = 512


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
def _operand16(t, like_ptr, EMULATE: tl.constexpr):
    """A product's operand in ``like_ptr``'s 16-bit dtype. EMULATE: rounded to that dtype and back in fp32; bf16
    to nearest even by hand, since the interpreter's cast truncates (a GPU's rounds)."""
    if EMULATE:
        if like_ptr.dtype.element_ty == tl.bfloat16:
            bits = t.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            t = bits.to(tl.float32, bitcast=True)
        else:
            t = t.to(like_ptr.dtype.element_ty).to(tl.float32)
    else:
        t = t.to(like_ptr.dtype.element_ty)
    return t


@triton.jit
def _mm(a, b, like_ptr, DOT: tl.constexpr, LOW: tl.constexpr, EMULATE: tl.constexpr):
    """a @ b, summed in fp32: of fp32 operands (``DOT``), or LOW: of operands rounded to ``like_ptr``'s 16-bit dtype
    (EMULATE as in ``_operand16``)."""
    if LOW:
        return tl.dot(_operand16(a, like_ptr, EMULATE), _operand16(b, like_ptr, EMULATE), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT)


@triton.jit
def _state_tile(ptr, index, offs_p, offs_n, headdim, d_state):
    """Pointers and mask of the (BLOCK_P, BLOCK_N) state number ``index`` of a contiguous (..., P, N) tensor."""
    ptrs = ptr + index.to(tl.int64) * headdim * d_state + offs_p[:, None] * d_state + offs_n[None, :]
    return ptrs, (offs_p < headdim)[:, None] & (offs_n < d_state)[None, :]


@triton.jit
def _first_state(init_ptr, index, offs_p, offs_n, headdim, d_state, HAS_INIT: tl.constexpr):
    """A walk's running state at its start: state number ``index`` of ``init`` (HAS_INIT), else zeros; fp32."""
    ptrs, mask = _state_tile(init_ptr, index, offs_p, offs_n, headdim, d_state)
    if HAS_INIT:
        return tl.load(ptrs, mask=mask, other=0.0)
    return tl.zeros((offs_p.shape[0], offs_n.shape[0]), dtype=tl.float32)


@triton.jit
def _store_state(ptr, index, state, offs_p, offs_n, headdim, d_state):
    """``state`` into state number ``index`` of a contiguous (..., P, N) tensor."""
    ptrs, mask = _state_tile(ptr, index, offs_p, offs_n, headdim, d_state)
    tl.store(ptrs, state, mask=mask)


# --- forward -------------------------------------------------------------------------------------


@triton.jit
def _ssd_state_passing_kernel(
    states_ptr, log_decay_ptr, span_off_ptr, init_ptr, last_ptr, n_heads, headdim, d_state,
    HAS_INIT: tl.constexpr, STORE_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (sequence, head, block of BLOCK_P state rows): walk the sequence's segments (the fused forward's),
    from the initial state, replacing each segment's row of ``states``, its end state from a zero start, by the
    running state, its start state, then folding the row in: s <- exp(log decay) s + row. The last running
    state is the sequence's final state."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    first = tl.load(span_off_ptr + seq)
    count = tl.load(span_off_ptr + seq + 1) - first
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    running = _first_state(init_ptr, seq * n_heads + head, offs_p, offs_n, headdim, d_state, HAS_INIT)
    for span in range(first, first + count):
        row_ptrs, mask = _state_tile(states_ptr, span * n_heads + head, offs_p, offs_n, headdim, d_state)
        row = tl.load(row_ptrs, mask=mask, other=0.0)
        tl.store(row_ptrs, running, mask=mask)
        running = tl.exp(tl.load(log_decay_ptr + span * n_heads + head)) * running + row
    if STORE_LAST:
        _store_state(last_ptr, seq * n_heads + head, running, offs_p, offs_n, headdim, d_state)


@triton.jit
def _ssd_state_walk_kernel(
    v_ptr, k_ptr, dt_ptr, a_ptr, bias_ptr, chunk_start_ptr, chunk_len_ptr, chunk_off_ptr, init_ptr, states_ptr,
    last_ptr, n_seq, n_table, n_heads, heads_per_group, headdim, d_state, dt_min, dt_max,
    stride_v_t, stride_v_h, stride_k_t, stride_k_g, stride_dt_t, stride_dt_h,
    REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_LAST: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, FAST: tl.constexpr, DOT: tl.constexpr, LOW: tl.constexpr,
    EMULATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (sequence, head, block of BLOCK_P state rows): a walk over the sequence's chunks with the running
    state in registers: each chunk's row of ``states`` gets the running state, then the chunk's own sum
    sum_t w_t v_t k_t^T (one (P, Q) x (Q, N) product) folds in, s <- exp(cum_last) s + sum.

    Forward (v = x, k = B, w_t = exp(cum_last - cum_t) delta_t), first chunk to last from the initial state:
    rows are the chunks' start states, the last running state the final state. REVERSE (v = dy, k = C,
    w_t = exp(cum_t)), last to first from the final state's gradient: rows are the gradients of the chunks'
    end states, the last running state the initial state's gradient. LOW: 16-bit operands (v as it is, w k
    rounded to v's dtype) with fp32 sums, EMULATE as in ``_operand16``; otherwise fp32 operands (``DOT``).
    """
    seq = tl.program_id(0)
    head = tl.program_id(1)
    first = tl.load(chunk_off_ptr + seq)
    count = tl.load(chunk_off_ptr + seq + 1) - first
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    A = tl.load(a_ptr + head)
    k_col = (head // heads_per_group) * stride_k_g
    running = _first_state(init_ptr, seq * n_heads + head, offs_p, offs_n, headdim, d_state, HAS_INIT)
    for i in range(0, count):
        if REVERSE:
            chunk = first + count - 1 - i
        else:
            chunk = first + i
        t0, offs_q, valid = _chunk_span(chunk_start_ptr, chunk_len_ptr, chunk, CHUNK)
        rows = t0 + offs_q
        _, delta, cum = _chunk_decays(
            dt_ptr, a_ptr, bias_ptr, head, rows, valid, stride_dt_t, stride_dt_h, dt_min, dt_max,
            HAS_BIAS, SOFTPLUS, HAS_LIMIT, FAST,
        )  # fmt: skip
        cum_last = tl.sum(delta) * A
        if REVERSE:
            weight = tl.where(valid, tl.exp(cum), 0.0)
        else:
            weight = tl.exp(cum_last - cum) * delta
        v = _load_tile(v_ptr, rows, stride_v_t, head * stride_v_h, offs_p, headdim, valid)  # (CHUNK, BLOCK_P)
        k = _load_tile(k_ptr, rows, stride_k_t, k_col, offs_n, d_state, valid) * weight[:, None]
        # Rounded before the transpose, not through ``_mm`` (which rounds the transposed tile): on sm_90 that order
        # compiles to 141 registers, the other to 182.
        if LOW:  # v's own values back in its dtype: only w k is rounded
            v = _operand16(v, v_ptr, EMULATE)
            k = _operand16(k, v_ptr, EMULATE)
        _store_state(states_ptr, chunk * n_heads + head, running, offs_p, offs_n, headdim, d_state)
        running = tl.exp(cum_last) * running + tl.dot(tl.trans(v), k, input_precision=DOT)
    if STORE_LAST:
        _store_state(last_ptr, seq * n_heads + head, running, offs_p, offs_n, headdim, d_state)
    # A packed batch's table ends in empty rows (its length is a bound). The chunk kernels mask everything a
    # chunk without tokens gives, but they do load its rows: zeros rather than whatever memory held.
    if seq == n_seq - 1:
        for chunk in range(tl.load(chunk_off_ptr + n_seq), n_table):
            _store_state(states_ptr, chunk * n_heads + head, tl.zeros_like(running), offs_p, offs_n, headdim, d_state)


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


@triton.jit
def _ssd_fused_fwd_kernel(
    x_ptr, dt_ptr, a_ptr, bias_ptr, b_ptr, c_ptr, d_ptr, span_start_ptr, span_len_ptr, init_ptr, y_ptr,
    last_ptr, log_decay_ptr, seq_len, n_heads, heads_per_group, headdim, d_state, dt_min, dt_max,
    stride_x_t, stride_x_h, stride_dt_t, stride_dt_h, stride_b_t, stride_b_g, stride_c_t, stride_c_g,
    TABLE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_Y: tl.constexpr, STORE_LAST: tl.constexpr,
    STORE_DECAY: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, FAST: tl.constexpr, EMULATE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (span of tokens, head, block of BLOCK_P state rows): the forward of 16-bit inputs over the span,
    chunk after chunk. A span is a sequence, or a segment of one (TABLE: the spans' first tokens and lengths;
    else span i is tokens [i seq_len, (i + 1) seq_len)).

    The running state stays in registers: each chunk's output takes it as its start state, then the chunk
    folds its own tokens in, S <- exp(cum_last) S + sum_s exp(cum_last - cum_s) u_s B_s^T. No state goes
    through memory but the span's start state (HAS_INIT), its end state (STORE_LAST) and summed log decay
    (STORE_DECAY); without STORE_Y only the state is walked. The products take 16-bit operands in x's dtype (x
    and C as they are; the scores, delta B and the start state rounded, once each) and sum in fp32. EMULATE
    (Triton's interpreter, whose 16-bit products are wrong): the operands rounded, then multiplied in fp32.
    """
    span = tl.program_id(0)
    head = tl.program_id(1)
    if TABLE:
        first = tl.load(span_start_ptr + span)
        end = first + tl.load(span_len_ptr + span)
    else:
        first = span.to(tl.int64) * seq_len
        end = first + seq_len
    offs_q = tl.arange(0, CHUNK)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    b_col = (head // heads_per_group) * stride_b_g
    c_col = (head // heads_per_group) * stride_c_g
    A = tl.load(a_ptr + head)
    running = _first_state(init_ptr, span * n_heads + head, offs_p, offs_n, headdim, d_state, HAS_INIT)
    if HAS_D:
        if D_PER_P:
            D = tl.load(d_ptr + head * headdim + offs_p, mask=mask_p, other=0.0)[None, :]
        else:
            D = tl.load(d_ptr + head)
    causal = offs_q[:, None] >= offs_q[None, :]
    total_log_decay = 0.0
    for i in range(0, tl.cdiv(end - first, CHUNK)):
        rows = first + i * CHUNK + offs_q  # (CHUNK,) int64
        valid = rows < end
        _, delta, cum = _chunk_decays(
            dt_ptr, a_ptr, bias_ptr, head, rows, valid, stride_dt_t, stride_dt_h, dt_min, dt_max,
            HAS_BIAS, SOFTPLUS, HAS_LIMIT, FAST,
        )  # fmt: skip
        x = _load_tile(x_ptr, rows, stride_x_t, head * stride_x_h, offs_p, headdim, valid)  # (CHUNK, BLOCK_P)
        Bm = _load_tile(b_ptr, rows, stride_b_t, b_col, offs_n, d_state, valid)  # (CHUNK, BLOCK_N)
        xo = _operand16(x, x_ptr, EMULATE)  # x's own values: rounding is the identity
        if STORE_Y:
            Cm = _operand16(_load_tile(c_ptr, rows, stride_c_t, c_col, offs_n, d_state, valid), x_ptr, EMULATE)
            # Inside the chunk: (C B^T masked by exp(cum_t - cum_s), s <= t) delta_s x_s; the mask goes in
            # before the exponential, whose argument above the diagonal can be large and positive. delta joins
            # the scores, so that x enters the product as it is and only the scores are rounded.
            decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
            CB = tl.dot(Cm, tl.trans(_operand16(Bm, x_ptr, EMULATE)), input_precision="ieee")  # (CHUNK, CHUNK)
            scores = _operand16(CB * decay * delta[None, :], x_ptr, EMULATE)
            y = tl.dot(scores, xo, input_precision="ieee")
            # From the start state, and the skip.
            start = _operand16(running, x_ptr, EMULATE)
            y += tl.exp(cum)[:, None] * tl.dot(Cm, tl.trans(start), input_precision="ieee")
            if HAS_D:
                y += x * D
            y_mask = valid[:, None] & mask_p[None, :]
            tl.store(y_ptr + (rows[:, None] * n_heads + head) * headdim + offs_p[None, :], y, mask=y_mask)

        # The chunk's tokens into the state, the weights on B's side.
        cum_last = tl.sum(delta) * A
        weighted_b = _operand16(Bm * (tl.exp(cum_last - cum) * delta)[:, None], x_ptr, EMULATE)  # 0 past the span
        running = tl.exp(cum_last) * running + tl.dot(tl.trans(xo), weighted_b, input_precision="ieee")
        total_log_decay += cum_last
    if STORE_LAST:
        _store_state(last_ptr, span * n_heads + head, running, offs_p, offs_n, headdim, d_state)
    if STORE_DECAY:
        if tl.program_id(2) == 0:
            tl.store(log_decay_ptr + span * n_heads + head, total_log_decay)


# --- backward ------------------------------------------------------------------------------------


@triton.jit
def _ssd_chunk_scan_bwd_kernel(
    x_ptr, dt_ptr, a_ptr, bias_ptr, b_ptr, c_ptr, d_ptr, dy_ptr, states_ptr, dstates_ptr,
    chunk_start_ptr, chunk_len_ptr,
    dx_ptr, ddt_ptr, da_ptr, dd_ptr, dbias_ptr,
    n_heads, n_groups, heads_per_group, heads_a_program, headdim, d_state, dt_min, dt_max,
    stride_x_t, stride_x_h, stride_dt_t, stride_dt_h, stride_b_t, stride_b_g, stride_c_t, stride_c_g,
    stride_dy_t, stride_dy_h,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, FAST: tl.constexpr, DOT: tl.constexpr, LOW: tl.constexpr, EMULATE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (chunk, block of ``heads_a_program`` heads of one group): the gradients of x and dt, and the chunk's
    shares of dA, dD and ddt_bias, for the block's heads one after another (dB and dC:
    ``_ssd_chunk_scan_bwd_bc_kernel``).

    Reads each chunk's start state (``states``) and its end state's gradient (``dstates``). Writes dx and
    ddt (in the dtypes of x and dt) and, per (chunk, head), the shares of dA, dD (per channel) and ddt_bias
    that the host sums.
    """
    chunk = tl.program_id(0)
    first_head = tl.program_id(1) * heads_a_program
    group = first_head // heads_per_group
    t0, offs_q, valid = _chunk_span(chunk_start_ptr, chunk_len_ptr, chunk, CHUNK)
    rows = t0 + offs_q
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < headdim
    # The products over the state index go a block of BLOCK_N states at a time: B, C and the states are read
    # a block at a time and never held whole.
    CB = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)  # [t, s] = C_t . B_s, shared by the block's heads
    for n0 in range(0, d_state, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        Bm = _load_tile(b_ptr, rows, stride_b_t, group * stride_b_g, offs_n, d_state, valid)  # (CHUNK, BLOCK_N)
        Cm = _load_tile(c_ptr, rows, stride_c_t, group * stride_c_g, offs_n, d_state, valid)
        CB += _mm(Cm, tl.trans(Bm), x_ptr, DOT, LOW, EMULATE)
    causal = offs_q[:, None] >= offs_q[None, :]
    for head in range(first_head, first_head + heads_a_program):
        A = tl.load(a_ptr + head)
        raw, delta, cum = _chunk_decays(
            dt_ptr, a_ptr, bias_ptr, head, rows, valid, stride_dt_t, stride_dt_h, dt_min, dt_max,
            HAS_BIAS, SOFTPLUS, HAS_LIMIT, FAST,
        )  # fmt: skip
        cum_last = tl.sum(delta) * A
        x = _load_tile(x_ptr, rows, stride_x_t, head * stride_x_h, offs_p, headdim, valid)  # (CHUNK, BLOCK_P)
        dy = _load_tile(dy_ptr, rows, stride_dy_t, head * stride_dy_h, offs_p, headdim, valid)
        # Through the chunk's ends: dend_b[s] = dS_end B_s, c_start[t] = S_start C_t (CHUNK, BLOCK_P), and the
        # sum of dS_end * S_start.
        dend_b = tl.zeros((CHUNK, BLOCK_P), dtype=tl.float32)
        c_start = tl.zeros((CHUNK, BLOCK_P), dtype=tl.float32)
        end_start = 0.0
        for n0 in range(0, d_state, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            Bm = _load_tile(b_ptr, rows, stride_b_t, group * stride_b_g, offs_n, d_state, valid)
            Cm = _load_tile(c_ptr, rows, stride_c_t, group * stride_c_g, offs_n, d_state, valid)
            start_ptrs, state_mask = _state_tile(states_ptr, chunk * n_heads + head, offs_p, offs_n, headdim, d_state)
            start = tl.load(start_ptrs, mask=state_mask, other=0.0)  # (BLOCK_P, BLOCK_N) of S_start
            dend_ptrs, _ = _state_tile(dstates_ptr, chunk * n_heads + head, offs_p, offs_n, headdim, d_state)
            dend = tl.load(dend_ptrs, mask=state_mask, other=0.0)  # ... of the gradient of S_end
            dend_b += _mm(Bm, tl.trans(dend), x_ptr, DOT, LOW, EMULATE)
            c_start += _mm(Cm, tl.trans(start), x_ptr, DOT, LOW, EMULATE)
            end_start += tl.sum(dend * start)
        u = x * delta[:, None]  # (CHUNK, BLOCK_P)
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        scores = CB * decay  # W[t, s]: y_t = sum_s W[t, s] u_s + ...
        from_start = tl.exp(cum)  # exp(cum_t): how much of S_start reaches token t
        to_end = tl.exp(cum_last - cum)  # exp(cum_last - cum_s): how much of u_s B_s^T reaches S_end

        # u_s reaches y_t (t >= s) through W[t, s], and S_end through to_end_s B_s^T.
        du = _mm(tl.trans(scores), dy, x_ptr, DOT, LOW, EMULATE) + to_end[:, None] * dend_b
        dx = du * delta[:, None]
        ddelta = tl.sum(du * x, axis=1)  # through u = delta x; through the decays below
        dscores = _mm(dy, tl.trans(u), x_ptr, DOT, LOW, EMULATE)  # (CHUNK, CHUNK): dy_t . u_s

        # The gradient of each cum_t. W[t, s] grows with cum_t and shrinks with cum_s; the start state's
        # share of y_t grows with cum_t; u_s's share of S_end shrinks with cum_s and, like S_start's
        # share, grows with cum_last.
        through_scores = dscores * scores
        y_from_start = from_start[:, None] * c_start  # (CHUNK, BLOCK_P)
        into_end = to_end * tl.sum(u * dend_b, axis=1)  # (CHUNK,)
        dcum = tl.sum(through_scores, axis=1) - tl.sum(through_scores, axis=0) + tl.sum(dy * y_from_start, axis=1)
        dcum -= into_end
        dcum_last = tl.sum(into_end) + tl.exp(cum_last) * end_start
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
    n_tokens, n_heads, n_groups, heads_per_group, heads_a_program, headdim, d_state, dt_min, dt_max,
    stride_x_t, stride_x_h, stride_dt_t, stride_dt_h, stride_b_t, stride_b_g, stride_c_t, stride_c_g,
    stride_dy_t, stride_dy_h,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, FAST: tl.constexpr, DOT: tl.constexpr,
    LOW: tl.constexpr, EMULATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (chunk, block of ``heads_a_program`` heads of one group, block of BLOCK_N states): the block's shares
    of dB and dC (fp32), summed over its heads. With k blocks of heads a group, ``db`` and ``dc`` are (k, T, G, N):
    block i writes [i], and the host sums them.

    C_t reaches y_t through S_start (exp(cum_t) S_start^T) and through W[t, s] = C_t . B_s decay[t, s]; B_s
    reaches y_t (t >= s) through W and S_end through exp(cum_last - cum_s) u_s B_s^T. Each of these is a
    product over the state index alone, so the blocks of states are independent.
    """
    chunk = tl.program_id(0)
    first_head = tl.program_id(1) * heads_a_program
    group = first_head // heads_per_group
    share = first_head % heads_per_group // heads_a_program  # which of the group's blocks of heads
    t0, offs_q, valid = _chunk_span(chunk_start_ptr, chunk_len_ptr, chunk, CHUNK)
    rows = t0 + offs_q
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    Bm = _load_tile(b_ptr, rows, stride_b_t, group * stride_b_g, offs_n, d_state, valid)  # (CHUNK, BLOCK_N)
    Cm = _load_tile(c_ptr, rows, stride_c_t, group * stride_c_g, offs_n, d_state, valid)
    causal = offs_q[:, None] >= offs_q[None, :]
    dB = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
    dC = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
    for head in range(first_head, first_head + heads_a_program):
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
        dCB = _mm(dy, tl.trans(u), x_ptr, DOT, LOW, EMULATE) * decay  # (CHUNK, CHUNK): dW[t, s] decay[t, s]
        dC += _mm(dCB, Bm, x_ptr, DOT, LOW, EMULATE)
        dC += tl.exp(cum)[:, None] * _mm(dy, start, x_ptr, DOT, LOW, EMULATE)
        to_end = tl.exp(cum_last - cum)
        dB += _mm(tl.trans(dCB), Cm, x_ptr, DOT, LOW, EMULATE)
        dB += to_end[:, None] * _mm(u, dend, x_ptr, DOT, LOW, EMULATE)
    # dB and dC are contiguous (k, T, G, N).
    bc_ptrs = ((share * n_tokens + rows[:, None]) * n_groups + group) * d_state + offs_n[None, :]
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
        self.heads_per_group = nheads // ngroups
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
        self.batch, self.length = batch, length
        self.cu_seqlens = None if cu_seqlens is None else cu_seqlens.to(device=x.device, dtype=torch.int64)
        self.n_seq = batch if cu_seqlens is None else cu_seqlens.numel() - 1
        self._chunks = None
        self.block_p = max(16, triton.next_power_of_2(headdim))  # tl.dot wants every side >= 16
        self.block_n = max(16, triton.next_power_of_2(d_state))
        self.common = dict(
            HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=self.has_limit, FAST=_fast(x),
            CHUNK=SSD_CHUNK, BLOCK_P=self.block_p, BLOCK_N=self.block_n, num_warps=SSD_WARPS,
        )  # fmt: skip
        # fp32 inputs get exact fp32 products; 16-bit ones TF32, finer than their own rounding.
        self.dot = "ieee" if x.dtype == torch.float32 else "tf32"

    @property
    def chunks(self) -> _Chunks:
        """The chunk table of the walk-and-outputs forward and of the backward (the fused forward needs none)."""
        if self._chunks is None:
            self._chunks = _Chunks(self.batch, self.length, self.cu_seqlens, SSD_CHUNK, self.x.device)
        return self._chunks

    @property
    def backward_products(self) -> dict:
        """How the backward's chunk kernels multiply (``_mm``): SSD_BWD_LOW for 16-bit inputs, else ``dot``."""
        low = SSD_BWD_LOW and self.dtypes[0] in (torch.float16, torch.bfloat16)
        return dict(DOT=self.dot, LOW=low, EMULATE=not self.common["FAST"])

    def new_states(self) -> Tensor:
        """A (chunks, H, P, N) fp32 buffer, one state per chunk and head."""
        return self.x.new_empty(self.chunks.n_chunks, self.nheads, self.headdim, self.d_state, dtype=torch.float32)

    def pass_states(self, states: Tensor, log_decay: Tensor, table: _Chunks, last: Tensor | None) -> None:
        """``_ssd_state_passing_kernel`` over every (sequence, head, block of state rows): ``states`` and
        ``log_decay`` hold a row for each row of ``table``, the fused forward's segments."""
        block_p = min(self.block_p, SSD_PASS_BLOCK_P)
        _ssd_state_passing_kernel[(table.n_seq, self.nheads, triton.cdiv(self.headdim, block_p))](
            states, log_decay, table.offsets, _or(self.h0, states), _or(last, states), self.nheads, self.headdim,
            self.d_state, HAS_INIT=self.h0 is not None, STORE_LAST=last is not None,
            BLOCK_P=block_p, BLOCK_N=self.block_n, num_warps=SSD_WARPS,
        )  # fmt: skip

    def walk(self, v: Tensor, k: Tensor, init: Tensor | None, last: Tensor | None, reverse: bool) -> Tensor:
        """``_ssd_state_walk_kernel``: forward (x, B), each chunk's start state; reverse (dy, C), the gradient of
        each chunk's end state; (chunks, H, P, N) fp32. The last running state goes into ``last``."""
        states = self.new_states()
        block_p = min(self.block_p, SSD_PASS_BLOCK_P)
        low = v.dtype in (torch.float16, torch.bfloat16)
        _ssd_state_walk_kernel[(self.n_seq, self.nheads, triton.cdiv(self.headdim, block_p))](
            v, k, self.dt, self.A, _or(self.dt_bias, self.A), self.chunks.start, self.chunks.length,
            self.chunks.offsets, _or(init, self.A), states, _or(last, self.A), self.n_seq, self.chunks.n_chunks,
            self.nheads, self.heads_per_group, self.headdim, self.d_state, self.dt_min, self.dt_max,
            v.stride(0), v.stride(1), k.stride(0), k.stride(1), self.dt.stride(0), self.dt.stride(1),
            REVERSE=reverse, HAS_INIT=init is not None, STORE_LAST=last is not None,
            DOT="ieee" if low and not self.common["FAST"] else self.dot, LOW=low, EMULATE=not self.common["FAST"],
            **{**self.common, "BLOCK_P": block_p, "num_warps": SSD_WALK_WARPS},
        )  # fmt: skip
        return states

    def start_states(self, final: Tensor | None = None) -> Tensor:
        """Each chunk's start state (chunks, H, P, N); the final states into ``final``."""
        return self.walk(self.x, self.B, self.h0, final, reverse=False)

    def end_state_gradients(self, dy: Tensor, dfinal: Tensor | None, dh0: Tensor | None) -> Tensor:
        """The gradient of each chunk's end state (chunks, H, P, N), from dy and the final state's gradient
        ``dfinal``; the initial state's gradient into ``dh0``."""
        return self.walk(dy, self.C, dfinal, dh0, reverse=True)

    def param_args(self) -> tuple:
        return (self.x, self.dt, self.A, _or(self.dt_bias, self.A), self.B, self.C, _or(self.D, self.A))

    def stride_args(self) -> tuple:
        return (
            self.x.stride(0), self.x.stride(1), self.dt.stride(0), self.dt.stride(1),
            self.B.stride(0), self.B.stride(1), self.C.stride(0), self.C.stride(1),
        )  # fmt: skip


def _heads_a_program(heads_per_group: int, most: int) -> int:
    """The largest divisor of ``heads_per_group`` that is at most ``most`` (and at least 1)."""
    return max(h for h in range(1, min(heads_per_group, max(most, 1)) + 1) if heads_per_group % h == 0)


def _low_bc_blocks(block_p: int, block_n: int) -> bool:
    """Whether the dB/dC kernel may take 16-bit operands at these blocks of head channels and states: only at
    blocks where they measured right on Hopper (32 x 16, and 64 x 64, the blocks of real checkpoints). At 64 x 16
    and 64 x 32 they came out wrong or the launch faulted (docs/kernels.md); other blocks are untried."""
    return block_p <= 32 or (block_p == 64 and block_n == 64)


def _or(t: Tensor | None, stand_in: Tensor) -> Tensor:
    """``t``, or a stand-in pointer for a kernel argument that a constexpr flag leaves unread."""
    return stand_in if t is None else t


def _fused_forward(inp: _Inputs) -> bool:
    """Whether the forward runs fused (``_ssd_fused_fwd_kernel``): for 16-bit inputs, unless SSD_FUSED is off.
    In fp32, products without tensor cores need more registers than a program has."""
    return SSD_FUSED and inp.dtypes[0] in (torch.float16, torch.bfloat16)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """The GPU's streaming multiprocessors; 1 for CPU tensors (Triton's interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _segment_tokens(inp: _Inputs, block_p: int) -> int | None:
    """Tokens a segment when the fused forward cuts sequences into segments, or None when it walks them whole:
    None when whole sequences give SSD_FUSED_MIN_WALKS_PER_SM walks a multiprocessor; else the longest segments,
    a multiple of SSD_FUSED_CHUNK and at least SSD_FUSED_MIN_SEGMENT, that give SSD_FUSED_SEGMENT_WALKS_PER_SM
    walks a multiprocessor, or None when they would be no shorter than the sequences. Host arithmetic only: no
    device sync."""
    rows = inp.nheads * triton.cdiv(inp.headdim, block_p)  # walks a span
    multiprocessors = _multiprocessors(inp.x.device)
    if inp.n_seq * rows >= SSD_FUSED_MIN_WALKS_PER_SM * multiprocessors:
        return None
    wanted = max(SSD_FUSED_SEGMENT_WALKS_PER_SM, SSD_FUSED_MIN_WALKS_PER_SM) * multiprocessors
    longest = inp.length  # padded: every sequence; packed: the whole pack, a bound
    segment = int(inp.batch * inp.length * rows / wanted) // SSD_FUSED_CHUNK * SSD_FUSED_CHUNK
    segment = max(segment, SSD_FUSED_MIN_SEGMENT)
    return None if segment >= longest else segment


def _ssd_fused_forward(inp: _Inputs, y: Tensor, final: Tensor | None) -> None:
    """y (T, H, P) and the final states, if asked, through ``_ssd_fused_fwd_kernel``. Whole sequences: one
    launch. Segments (``_segment_tokens``): each segment's end state from a zero start and its summed log decay
    (a walk without outputs), the pass over them per sequence for each segment's start state
    (``_ssd_state_passing_kernel``, which leaves the final states), then the outputs of every segment from
    its start state."""
    block_p = min(inp.block_p, SSD_FUSED_BLOCK_P)
    segment = _segment_tokens(inp, block_p)
    launch = functools.partial(_launch_fused, inp, y, block_p)
    if segment is None:
        if inp.cu_seqlens is None:
            launch(inp.n_seq, None, None, inp.h0, final, None, store_y=True)
        else:
            starts, ends = inp.cu_seqlens[:-1], inp.cu_seqlens[1:]
            launch(inp.n_seq, starts, ends - starts, inp.h0, final, None, store_y=True)
        return
    table = _Chunks(inp.batch, inp.length, inp.cu_seqlens, segment, inp.x.device)
    states = inp.x.new_empty(table.n_chunks, inp.nheads, inp.headdim, inp.d_state, dtype=torch.float32)
    log_decay = inp.x.new_empty(table.n_chunks, inp.nheads, dtype=torch.float32)
    launch(table.n_chunks, table.start, table.length, None, states, log_decay, store_y=False)
    inp.pass_states(states, log_decay, table, final)
    launch(table.n_chunks, table.start, table.length, states, None, None, store_y=True)


def _launch_fused(inp, y, block_p, n_spans, starts, lengths, init, last, log_decay, store_y) -> None:
    """One ``_ssd_fused_fwd_kernel`` launch over ``n_spans`` spans (a table of ``starts`` and ``lengths``, or
    padded sequences of ``inp.length`` tokens)."""
    _ssd_fused_fwd_kernel[(n_spans, inp.nheads, triton.cdiv(inp.headdim, block_p))](
        *inp.param_args(), _or(starts, inp.A), _or(lengths, inp.A), _or(init, inp.A), y, _or(last, inp.A),
        _or(log_decay, inp.A), inp.length, inp.nheads, inp.heads_per_group, inp.headdim, inp.d_state,
        inp.dt_min, inp.dt_max, *inp.stride_args(),
        TABLE=starts is not None, HAS_INIT=init is not None, STORE_Y=store_y, STORE_LAST=last is not None,
        STORE_DECAY=log_decay is not None, HAS_D=inp.D is not None, D_PER_P=inp.D is not None and inp.D.dim() == 2,
        EMULATE=not inp.common["FAST"],
        **{**inp.common, "CHUNK": SSD_FUSED_CHUNK, "BLOCK_P": block_p, "num_warps": SSD_FUSED_WARPS},
        num_stages=SSD_FUSED_STAGES,
    )  # fmt: skip


def _ssd_forward(inp: _Inputs, return_final: bool) -> tuple[Tensor, Tensor | None]:
    """y (B, L, H, P) in x's dtype and, if asked, the final states (n, H, P, N) fp32."""
    final = None
    if return_final:
        final = inp.x.new_empty(inp.n_seq, inp.nheads, inp.headdim, inp.d_state, dtype=torch.float32)
    y = inp.x.new_empty(inp.x.shape)  # (T, H, P), contiguous
    if inp.x.shape[0] == 0:  # no tokens: the state passes through unchanged
        if final is not None:
            final.copy_(inp.h0) if inp.h0 is not None else final.zero_()
        return y.view(inp.shape), final
    if _fused_forward(inp):
        _ssd_fused_forward(inp, y, final)
        return y.view(inp.shape), final
    states = inp.start_states(final)
    _ssd_chunk_scan_fwd_kernel[(inp.chunks.n_chunks, inp.nheads)](
        *inp.param_args(), states, inp.chunks.start, inp.chunks.length, y,
        inp.nheads, inp.heads_per_group, inp.headdim, inp.d_state, inp.dt_min, inp.dt_max,
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
    states = inp.start_states()
    # 2. The same walk the other way: the gradient of every chunk's end state, and the initial state's.
    dh0 = None if inp.h0 is None else torch.empty_like(inp.h0)
    dstates = inp.end_state_gradients(dy, None if dfinal is None else dfinal.float().contiguous(), dh0)
    # 3. Everything else, chunk by chunk. Shares of dA, dD, ddt_bias per (chunk, head): zeros, since the
    # empty rows of a packed batch's chunk table write nothing.
    n_chunks = inp.chunks.n_chunks
    heads_per_group = inp.heads_per_group
    heads, bc_heads = (_heads_a_program(heads_per_group, most) for most in (SSD_BWD_HEADS, SSD_BWD_BC_HEADS))
    shares = heads_per_group // bc_heads
    dx = inp.x.new_empty(inp.x.shape, dtype=inp.dtypes[0])
    ddt = inp.x.new_empty(tokens, inp.nheads, dtype=inp.dtypes[1])
    dB = torch.empty(shares, tokens, inp.ngroups, inp.d_state, **f32)
    dC = torch.empty(shares, tokens, inp.ngroups, inp.d_state, **f32)
    dA = torch.zeros(n_chunks, inp.nheads, **f32)
    dD = torch.zeros(n_chunks, inp.nheads, inp.headdim, **f32) if inp.D is not None else None
    dbias = torch.zeros(n_chunks, inp.nheads, **f32) if inp.dt_bias is not None else None
    _ssd_chunk_scan_bwd_kernel[(n_chunks, inp.nheads // heads)](
        *inp.param_args(), dy, states, dstates, inp.chunks.start, inp.chunks.length,
        dx, ddt, dA, _or(dD, dA), _or(dbias, dA),
        inp.nheads, inp.ngroups, heads_per_group, heads, inp.headdim, inp.d_state, inp.dt_min, inp.dt_max,
        *inp.stride_args(), dy.stride(0), dy.stride(1),
        HAS_D=inp.D is not None, D_PER_P=inp.D is not None and inp.D.dim() == 2, **inp.backward_products,
        **{**inp.common, "BLOCK_N": min(inp.block_n, SSD_BWD_DX_BLOCK_N), "num_warps": SSD_BWD_WARPS},
        num_stages=SSD_BWD_STAGES,
    )  # fmt: skip
    block_n = min(inp.block_n, SSD_BWD_BLOCK_N)
    products = inp.backward_products
    if products["LOW"] and not _low_bc_blocks(inp.block_p, block_n):
        products = {**products, "LOW": False}
    _ssd_chunk_scan_bwd_bc_kernel[(n_chunks, inp.nheads // bc_heads, triton.cdiv(inp.d_state, block_n))](
        inp.x, inp.dt, inp.A, _or(inp.dt_bias, inp.A), inp.B, inp.C, dy, states, dstates,
        inp.chunks.start, inp.chunks.length, dB, dC,
        tokens, inp.nheads, inp.ngroups, heads_per_group, bc_heads, inp.headdim, inp.d_state, inp.dt_min, inp.dt_max,
        *inp.stride_args(), dy.stride(0), dy.stride(1),
        **products, **{**inp.common, "BLOCK_N": block_n, "num_warps": SSD_BWD_WARPS},
        num_stages=SSD_BWD_STAGES,
    )  # fmt: skip
    dB, dC = (t[0] if shares == 1 else t.sum(0) for t in (dB, dC))
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
