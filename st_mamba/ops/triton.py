"""Triton kernels for CUDA GPUs: the Mamba-1 selective scan and the depthwise causal convolution.

Nothing here is compiled at install time: Triton compiles each kernel on first use. Both
operations take channels-last tensors exactly as ``reference.py`` documents them, and both accept
**packed** batches: texts laid end to end in one (1, T, ...) sequence with ``cu_seqlens`` (n + 1,)
int32 marking where each starts, the state and the convolution window reset at every start.

Selective scan, forward (``_scan_fwd_kernel``). One program owns ``BLOCK_D`` channels of one
piece of one sequence and walks it token by token, the (N, BLOCK_D) state in registers (each thread
holding all N states of its channels); Triton's software pipeliner loads each token's inputs a
few tokens ahead (cp.async into shared memory). Per token it fuses what mamba-ssm spreads over
several kernels: softplus(dt + bias), exp(dt * A), the state update, the read-out through C, the D
skip and the SiLU(z) gate; only y is written. When there are too few (sequence, channel block)
pairs to fill the GPU, sequences are cut into chunks run side by side: phase 1 gives each chunk's
end state from a zero start, and phase 2 produces the outputs from each chunk's start state, which
it folds from the earlier chunks' end states or, for sequences of many chunks, loads from
``_scan_chunk_starts_kernel`` (one walk over a sequence's chunks between the phases).

Selective scan, backward (``_scan_bwd_kernel``). The forward kernel first re-runs to store the
state before every tile of ``SCAN_BWD_TILE`` tokens (nothing but the inputs is kept from the forward
pass). One program then owns ``BLOCK_D`` channels of one sequence (or chunk) and takes its tiles from
last to first, walking each twice token by token as the forward walks, with no scan across threads:
forward from the tile's checkpoint, writing the state before each token to the program's scratch
slab (global memory, reused tile after tile, so it stays in cache) and taking dz and dC, which need
the state after the token; then backward, reading those states back, with the adjoint
g_t = C_t dy_t + a_{t+1} g_{t+1} carried in registers, for dx, ddt, dB and the sums of dA, dD and
ddt_bias. The adjoint's recurrence is linear like the state's, so long sequences are chunked as in
the forward: phase 1 (``_scan_bwd_carry_kernel``) gives what each chunk passes back to the one before
it from a zero carry, and phase 2 folds the later chunks' into the carry at each chunk's end.

Causal convolution (at most ``CONV_MAX_WIDTH`` taps). Forward, and the backward's dx: one program
per (token block, channel block); the K shifted windows are read straight from the (possibly
strided) input, so the x half of ``in_proj``'s output needs no copy. The backward's first kernel
(dpre, dweight, dbias) walks ``CONV_BWD_TILES`` token blocks a program and sums dweight once.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

LOG2E = math.log2(math.e)

# Launch shapes, from the H200 measurements (benchmarks/bench_encode.py). The scans run one warp per
# program: with one warp the per-token vectors and the state tile share a layout, so no token pays
# for a shuffle through shared memory (read off the SASS: no BAR in the forward loop; the backward
# loops have one per token, where the 16 sums of dB or dC go to their store layout). The backward
# keeps a checkpoint every SCAN_BWD_TILE tokens and a scratch slab of SCAN_BWD_TILE states per
# program. Forward + backward of a mamba-130m layer (128 x 512 tokens, bf16) on the H200: 6.6 ms
# with tiles of 8, 6.9 with 16 (likely because the slabs of the ~1000 programs in flight, 32 KB
# each, then fit in the 60 MB L2); 7.2 with 32 channels a program; slower still with a register
# cap (maxnreg), whose spills cost more than the occupancy it buys.
# The forward takes 128 channels a program (243 registers), or 64 (128 registers) where only 64
# make SCAN_MIN_PROGRAMS programs of whole sequences (``_scan_block``). benchmarks/kernel_dev/tune_scan.py,
# whole-model forward, 65,536 tokens, 64 channels everywhere against 128 (two settings that launch
# 128 at 512 tokens: they differed by up to 4%): mamba-130m at 512 tokens 44.5 against 42.6-44.2 ms,
# at 8K 58.4 against 56.3; mamba-370m at 512 133.0 against 122.8-127.3. At 2K mamba-130m has 32
# sequences, 384 programs of 128 channels, which would be chunked: 55.1 ms, against 52.8 with 64.
# Narrower blocks fill more of the GPU's warp schedulers but lose more than they gain (mamba-130m at
# 2K: 1,536 programs of 32 channels 80.1 ms, 3,072 of 16 81.2, against 53.0; at 8K, whole sequences
# in 32 or 16 channels a program, 234.2 and 142.9 against 56.1 chunked).
SCAN_FWD_BLOCK_D = 128
SCAN_FWD_NARROW_BLOCK_D = 64
SCAN_FWD_WARPS = 1
SCAN_FWD_STAGES = 3
SCAN_BWD_TILE = 8
SCAN_BWD_BLOCK_D = 64
SCAN_BWD_WARPS = 1
# With fewer (sequence, channel block) programs than SCAN_MIN_PROGRAMS, the forward scan cuts the
# sequences into chunks of at least SCAN_MIN_CHUNK tokens, aiming at SCAN_CHUNK_PROGRAMS programs.
# (At 256, mamba-370m at 8K tokens, 8 x 32 = 256 programs, ran unchunked at 199K tok/s; at 512 it
# runs chunked, 334K on the H200. Whole sequences in 768 programs, mamba-130m at 2K, beat chunks.)
SCAN_MIN_PROGRAMS = 512
SCAN_CHUNK_PROGRAMS = 4096
SCAN_MIN_CHUNK = 256
# Sequences of more than SCAN_FOLD_MAX_CHUNKS chunks get their chunks' start states from
# _scan_chunk_starts_kernel; shorter ones fold them in phase 2. On the H200 (benchmarks/kernel_dev/ab_kernels.py,
# whole-model forward): at 32K tokens (128 chunks) the starts kernel took mamba-130m 61.7 -> 57.1 ms
# and mamba-370m 171.8 -> 160.9; at 8K (32 chunks) it was level (56.1 / 56.4, 159.1 / 159.4). With
# no fold loop in phase 2 at all, the whole-sequence kernel compiled to 168 registers instead of 243,
# a change not timed at model level (the scan alone read 0.83x at 128 x 512), so the fold stays.
# (The starts kernel for every chunked sequence, SCAN_FOLD_MAX_CHUNKS = 0, was level at 8K too:
# mamba-130m 57.25 against 57.06 ms, mamba-370m 165.76 against 165.30.)
SCAN_FOLD_MAX_CHUNKS = 32
SCAN_STARTS_BLOCK_D = 32  # channels a program of _scan_chunk_starts_kernel (one warp, a channel a thread)
# The convolution's forward kernel and the backward's dx kernel. The backward's first kernel (dpre,
# dweight, dbias) walks CONV_BWD_TILES blocks of tokens a program. benchmarks/kernel_dev/tune_conv.py on the H200,
# mamba-130m layer at 65,536 tokens: forward 214 us; backward 571 us with 16 blocks, 815 with 8
# (and 885 for the earlier kernel, which summed dweight over each 64-token block it made).
CONV_BLOCK_T = 16
CONV_BLOCK_C = 128
CONV_WARPS = 4
CONV_BWD_BLOCK_T = 16
CONV_BWD_BLOCK_C = 64
CONV_BWD_WARPS = 4
CONV_BWD_TILES = 16
CONV_MAX_WIDTH = 4


# --- shared device helpers ----------------------------------------------------------------------


# FAST (every kernel launched on a GPU; Triton's CPU interpreter has neither intrinsic): the
# special-function unit's log2 (lg2.approx, relative error about 2**-22) and an approximate division,
# where the precise log is a polynomial of some 20 instructions and the precise division a Newton
# iteration. In the forward scan they took a sixth of the loop (438 -> 369 instructions a token).


@triton.jit
def _softplus(u, FAST: tl.constexpr):
    # log(1 + e^u), and u itself where e^u would overflow (the same threshold as torch).
    e = tl.exp(tl.minimum(u, 20.0))
    if FAST:
        log = libdevice.fast_logf(1.0 + e)
    else:
        log = tl.log(1.0 + e)
    return tl.where(u > 20.0, u, log)


@triton.jit
def _sigmoid(u, FAST: tl.constexpr):
    if FAST:
        return libdevice.fast_dividef(1.0, 1.0 + tl.exp(-u))
    return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def _find_segment(offsets_ptr, index, n_segments, STEPS: tl.constexpr):
    """For each entry of ``index``, the segment s with offsets[s] <= index < offsets[s + 1] (bisection)."""
    lo = tl.zeros_like(index)
    hi = lo + n_segments
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        right = tl.load(offsets_ptr + mid) <= index
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _row_start(ptr, batch, stride_b, ALIGNED: tl.constexpr):
    """``ptr`` moved to batch row ``batch``. ALIGNED: the host found the row strides multiples of 16
    elements; saying so lets row loads vectorise (the batch stride is not specialised on). Used by the
    convolutions and by every row of the scans. (History, mamba-130m forward on the H200: on all of the
    forward scan's rows, in its layout before the owned channels, the hint made the chunked scan slower,
    70.1 -> 75.7 ms at 8K; in the owned layout with the prefetch by hand, 1% faster at 512 and 2% slower
    at 8K; with the pipelined loads it was not timed apart.)"""
    offset = batch * stride_b
    if ALIGNED:
        offset = tl.multiple_of(offset, 16)
    return ptr + offset


@triton.jit
def _scan_rows(
    x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, batch, stride_xb, stride_dtb, stride_zb, stride_bb, stride_cb,
    offs_d, offs_n, ALIGNED: tl.constexpr,
):  # fmt: skip
    """The scan inputs' pointers at token 0 of batch row ``batch``: x, dt, z over channels, B and C over states."""
    x_row = _row_start(x_ptr, batch, stride_xb, ALIGNED) + offs_d
    dt_row = _row_start(dt_ptr, batch, stride_dtb, ALIGNED) + offs_d
    z_row = _row_start(z_ptr, batch, stride_zb, ALIGNED) + offs_d
    b_row = _row_start(b_ptr, batch, stride_bb, ALIGNED) + offs_n
    c_row = _row_start(c_ptr, batch, stride_cb, ALIGNED) + offs_n
    return x_row, dt_row, z_row, b_row, c_row


@triton.jit
def _chunk_span(
    chunk_id, cu_ptr, chunk_off_ptr, seqlen, n_seq, chunk, chunks_per_seq,
    VARLEN: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):  # fmt: skip
    """Where chunk ``chunk_id`` (numbered over the whole batch) lies.

    Returns its sequence, that sequence's batch row (int64; 0 when packed), first token, end token, first
    chunk and last chunk, and the chunk's own first and end token.
    """
    if VARLEN:
        seq = _find_segment(chunk_off_ptr, chunk_id, n_seq, SEARCH_STEPS)
        first_chunk = tl.load(chunk_off_ptr + seq)
        last_chunk = tl.load(chunk_off_ptr + seq + 1) - 1
        start = tl.load(cu_ptr + seq)
        end = tl.load(cu_ptr + seq + 1)
        batch = tl.zeros_like(seq).to(tl.int64)
    else:
        seq = chunk_id // chunks_per_seq
        first_chunk = seq * chunks_per_seq
        last_chunk = first_chunk + chunks_per_seq - 1
        start = 0
        end = seqlen
        batch = seq.to(tl.int64)  # batch * stride passes 2**31 elements in large padded batches
    t_begin = start + (chunk_id - first_chunk) * chunk
    t_end = tl.minimum(t_begin + chunk, end)
    return seq, batch, start, end, first_chunk, last_chunk, t_begin, t_end


def _search_steps(n: int, varlen: bool) -> int:
    """Bisection steps that find any of ``n`` segments, rounded up to a multiple of 4 (extra steps change nothing).

    A constexpr: each distinct value is a separate compile, so it is 1 for padded batches, where no search runs.
    """
    return 4 * -(-max(1, int(n).bit_length()) // 4) if varlen else 1


# Integer arguments that change with the batch's shape. Triton otherwise compiles a kernel once per
# combination of "== 1" and "divisible by 16" over its integer arguments: training on batches of
# varying length and size then meets a new combination, and a compile of a second or more, every few
# steps (seen on the H200: 750 distillation steps in 240 s, against 9 steps/s once compiled).
_SHAPE_ARGS = ("seqlen", "n_seq", "n_tokens", "chunk", "chunks_per_seq", "ckpt_every",
               "stride_xb", "stride_dtb", "stride_zb", "stride_bb", "stride_cb", "stride_yb", "stride_dyb", "stride_h0s")  # fmt: skip


def _jit(fn):
    """``triton.jit`` that does not specialise on the ``_SHAPE_ARGS`` among the kernel's arguments."""
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[name for name in names if name in _SHAPE_ARGS])


# --- selective scan: forward --------------------------------------------------------------------


@_jit
def _scan_fwd_kernel(
    x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, y_ptr,
    h0_ptr, hfinal_ptr, chunk_state_ptr, chunk_dtsum_ptr, ckpt_ptr, cu_ptr, chunk_off_ptr, tile_off_ptr,
    seqlen, n_seq, d_inner, d_state, chunk, chunks_per_seq, ckpt_every,
    stride_xb, stride_xt, stride_dtb, stride_dtt, stride_zb, stride_zt,
    stride_bb, stride_bt, stride_cb, stride_ct, stride_yb, stride_yt,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, VARLEN: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    PHASE: tl.constexpr, STARTS: tl.constexpr, STORE_Y: tl.constexpr, STORE_CKPT: tl.constexpr,
    ALIGNED: tl.constexpr, FAST: tl.constexpr, STAGES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    D_PER_THREAD: tl.constexpr,
):  # fmt: skip
    """PHASE 1: a chunk's end state from zero (and its summed dt). PHASE 2: outputs and/or checkpoints."""
    chunk_id = tl.program_id(0)  # global chunk index: also the row of chunk_state / chunk_dtsum
    if VARLEN:
        if chunk_id >= tl.load(chunk_off_ptr + n_seq):  # the grid is an upper bound on the chunk count
            return
    seq, batch, start, end, first_chunk, last_chunk, t_begin, t_end = _chunk_span(
        chunk_id, cu_ptr, chunk_off_ptr, seqlen, n_seq, chunk, chunks_per_seq, VARLEN, SEARCH_STEPS
    )
    pid_d = tl.program_id(1)
    if PHASE == 1:
        if t_end == end:  # the last chunk's end state is nobody's start state
            return

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_nd = (offs_n[:, None] < d_state) & mask_d[None, :]
    # Each thread owns D_PER_THREAD whole channels: all N of their states, so the read-out sums over N
    # in-thread and the per-channel work (softplus, gate) is done once. Triton lays the (N, BLOCK_D)
    # tile out after its loads; left alone it reads A's rows 16 bytes a thread and spreads N over two
    # threads (a shuffle per channel and token, softplus twice). Saying the channel offsets run in
    # pieces of D_PER_THREAD gives the owned layout; with B and C hinted aligned (below), 345 instead
    # of 369 instructions a token (sm_90, `benchmarks/kernel_dev/ptx_loads.py --loops`), and a mamba-130m
    # layer's scan 1,117 -> 1,040 us at 128 x 512 tokens (H200).
    offs_dt = tl.max_contiguous(offs_d, D_PER_THREAD)
    # A arrives transposed, (N, Di), so that it loads in the layout of the state tile.
    A2 = tl.load(a_ptr + offs_n[:, None] * d_inner + offs_dt[None, :], mask=mask_nd, other=0.0) * 1.4426950408889634
    if HAS_D:
        D = tl.load(d_ptr + offs_d, mask=mask_d, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    state_offs = offs_n[:, None] * d_inner + offs_dt[None, :]  # a (N, Di) slab of chunk_state / ckpt

    h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if PHASE == 2:
        if STARTS:  # _scan_chunk_starts_kernel left each chunk's start state in its row of chunk_state
            h = tl.load(chunk_state_ptr + chunk_id.to(tl.int64) * d_inner * d_state + state_offs, mask=mask_nd, other=0.0)  # fmt: skip
        else:  # fold the earlier chunks' end states (none for whole sequences)
            if HAS_H0:
                h = tl.load(h0_ptr + seq * d_inner * d_state + offs_d[None, :] * d_state + offs_n[:, None], mask=mask_nd, other=0.0)  # fmt: skip
            for prev in range(first_chunk, chunk_id):
                dtsum = tl.load(chunk_dtsum_ptr + prev * d_inner + offs_d, mask=mask_d, other=0.0)
                local_end = tl.load(chunk_state_ptr + prev * d_inner * d_state + state_offs, mask=mask_nd, other=0.0)
                h = tl.exp2(A2 * dtsum[None, :]) * h + local_end
    dtsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if STORE_CKPT:
        if VARLEN:
            ckpt_base = tl.load(tile_off_ptr + seq)
        else:
            ckpt_base = seq * tl.cdiv(seqlen, ckpt_every)

    # Every thread reads all of B_t and C_t: with the rows' alignment known, two 128-bit loads each (bf16).
    x_row, dt_row, z_row, b_row, c_row = _scan_rows(
        x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, batch, stride_xb, stride_dtb, stride_zb, stride_bb, stride_cb,
        offs_d, offs_n, ALIGNED,
    )  # fmt: skip
    y_row = _row_start(y_ptr, batch, stride_yb, ALIGNED) + offs_d
    mask_n = offs_n < d_state
    # Token t's inputs are loaded at the top of its iteration and Triton's software pipeliner issues
    # them SCAN_FWD_STAGES - 1 tokens ahead (cp.async into shared memory). At 64 channels a program,
    # a prefetch by hand into registers, one token ahead, held 168 registers a thread; this takes 128
    # (16 one-warp programs an SM instead of 12), and a mamba-130m forward at 2K tokens went from
    # 55.8 to 52.8 ms on the H200 (128 x 512: 45.2 -> 44.8).
    t_begin = t_begin.to(tl.int64)  # row offsets can pass 2**31 elements in long packed batches
    t_end = t_end.to(tl.int64)
    for t in tl.range(t_begin, t_end, num_stages=STAGES):
        x = tl.load(x_row + t * stride_xt, mask=mask_d, other=0.0).to(tl.float32)
        dt = tl.load(dt_row + t * stride_dtt, mask=mask_d, other=0.0).to(tl.float32)
        Bt = tl.load(b_row + t * stride_bt, mask=mask_n, other=0.0).to(tl.float32)
        if STORE_Y:
            Ct = tl.load(c_row + t * stride_ct, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_row + t * stride_zt, mask=mask_d, other=0.0).to(tl.float32)
        if STORE_CKPT:
            if (t - start) % ckpt_every == 0:
                tile = ckpt_base + (t - start) // ckpt_every
                tl.store(ckpt_ptr + tile * d_inner * d_state + state_offs, h, mask=mask_nd)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = _softplus(dt, FAST)
        if PHASE == 1:
            dtsum += dt
        # Zero-order hold for A, Euler for B (as in the reference).
        h = tl.exp2(A2 * dt[None, :]) * h + Bt[:, None] * (dt * x)[None, :]
        if STORE_Y:
            y = tl.sum(h * Ct[:, None], axis=0)
            if HAS_D:
                y += D * x
            if HAS_Z:
                y *= z * _sigmoid(z, FAST)
            tl.store(y_row + t * stride_yt, y, mask=mask_d)

    if PHASE == 1:
        tl.store(chunk_state_ptr + chunk_id * d_inner * d_state + state_offs, h, mask=mask_nd)
        tl.store(chunk_dtsum_ptr + chunk_id * d_inner + offs_d, dtsum, mask=mask_d)
    if STORE_FINAL:
        if t_end == end:
            tl.store(hfinal_ptr + seq * d_inner * d_state + offs_d[None, :] * d_state + offs_n[:, None], h, mask=mask_nd)  # fmt: skip


@_jit
def _scan_chunk_starts_kernel(
    a_ptr, h0_ptr, chunk_state_ptr, chunk_dtsum_ptr, chunk_off_ptr, n_seq, d_inner, d_state, chunks_per_seq,
    HAS_H0: tl.constexpr, VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Between the two phases of a chunked forward scan: each chunk's start state, over its end state.

    One program walks the chunks of one sequence for BLOCK_D channels. The first starts from the
    initial state (or zero); each next one from the start before it decayed over that chunk
    (exp(A x the chunk's summed dt)) plus that chunk's end state from a zero start (phase 1). Every
    row of chunk_state is read once and then overwritten with the chunk's start state, which phase 2
    loads. (Phase 2 used to fold all earlier chunks' end states itself: for a sequence of K chunks,
    K (K - 1) / 2 folds where this takes K - 1; 8,128 for a 32K-token sequence in 256-token chunks.)
    """
    seq = tl.program_id(0)
    if VARLEN:
        first = tl.load(chunk_off_ptr + seq)
        last = tl.load(chunk_off_ptr + seq + 1) - 1  # first - 1 for an empty sequence: nothing to do
    else:
        first = seq * chunks_per_seq
        last = first + chunks_per_seq - 1
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_nd = (offs_n[:, None] < d_state) & mask_d[None, :]
    A2 = tl.load(a_ptr + offs_n[:, None] * d_inner + offs_d[None, :], mask=mask_nd, other=0.0) * 1.4426950408889634
    state_offs = offs_n[:, None] * d_inner + offs_d[None, :]
    h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + seq * d_inner * d_state + offs_d[None, :] * d_state + offs_n[:, None], mask=mask_nd, other=0.0)  # fmt: skip
    # The loads do not wait on the state: Triton's pipeliner issues them two chunks ahead (rows that
    # no store of this walk has reached), so a step costs the decay's FMA rather than a round trip.
    first_64 = first.to(tl.int64)  # rows of chunk_state can pass 2**31 elements in long packed batches
    for c in tl.range(first, last, num_stages=3):
        row = chunk_state_ptr + (first_64 + (c - first)) * d_inner * d_state + state_offs
        dtsum = tl.load(chunk_dtsum_ptr + c * d_inner + offs_d, mask=mask_d, other=0.0)
        local_end = tl.load(row, mask=mask_nd, other=0.0)
        tl.store(row, h, mask=mask_nd)
        h = tl.exp2(A2 * dtsum[None, :]) * h + local_end
    if last >= first:
        tl.store(chunk_state_ptr + last.to(tl.int64) * d_inner * d_state + state_offs, h, mask=mask_nd)


# --- selective scan: backward -------------------------------------------------------------------


@_jit
def _scan_bwd_carry_kernel(
    dt_ptr, z_ptr, c_ptr, a_ptr, bias_ptr, dy_ptr, chunk_carry_ptr, chunk_dtsum_ptr, cu_ptr, chunk_off_ptr,
    seqlen, n_seq, d_inner, d_state, chunk, chunks_per_seq,
    stride_dtb, stride_dtt, stride_zb, stride_zt, stride_cb, stride_ct, stride_dyb, stride_dyt,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, FAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Phase 1 of a chunked backward: what each chunk passes back to the chunk before it from a zero carry.

    That is a_first g_first, with g_t = C_t dy_t + a_{t+1} g_{t+1} over the chunk and g = 0 after it;
    a carry G arriving from after the chunk adds exp(A * sum dt) G to it, so the summed dt is stored too.
    """
    chunk_id = tl.program_id(0)
    if VARLEN:
        if chunk_id >= tl.load(chunk_off_ptr + n_seq):
            return
    seq, batch, start, end, first_chunk, last_chunk, t_begin, t_end = _chunk_span(
        chunk_id, cu_ptr, chunk_off_ptr, seqlen, n_seq, chunk, chunks_per_seq, VARLEN, SEARCH_STEPS
    )
    if t_begin == start:  # what the first chunk passes back is dh0, which phase 2 finds
        return

    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_nd = mask_n[:, None] & mask_d[None, :]
    A2 = tl.load(a_ptr + offs_n[:, None] * d_inner + offs_d[None, :], mask=mask_nd, other=0.0) * 1.4426950408889634
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)

    dt_row = dt_ptr + batch * stride_dtb + offs_d
    z_row = z_ptr + batch * stride_zb + offs_d
    c_row = c_ptr + batch * stride_cb + offs_n
    dy_row = dy_ptr + batch * stride_dyb + offs_d
    carry = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dtsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # Token t - 1's inputs are loaded while token t is computed.
    t_last = t_end.to(tl.int64) - 1  # row offsets can pass 2**31 elements in long packed batches
    dt_next = tl.load(dt_row + t_last * stride_dtt, mask=mask_d, other=0.0)
    c_next = tl.load(c_row + t_last * stride_ct, mask=mask_n, other=0.0)
    dy_next = tl.load(dy_row + t_last * stride_dyt, mask=mask_d, other=0.0)
    if HAS_Z:
        z_next = tl.load(z_row + t_last * stride_zt, mask=mask_d, other=0.0)
    for back in range(0, t_end - t_begin):
        t = t_last - back
        dt = dt_next.to(tl.float32)
        Ct = c_next.to(tl.float32)
        dy = dy_next.to(tl.float32)
        if HAS_Z:
            z = z_next.to(tl.float32)
        t1 = t - 1
        more = t1 >= t_begin
        dt_next = tl.load(dt_row + t1 * stride_dtt, mask=mask_d & more, other=0.0)
        c_next = tl.load(c_row + t1 * stride_ct, mask=mask_n & more, other=0.0)
        dy_next = tl.load(dy_row + t1 * stride_dyt, mask=mask_d & more, other=0.0)
        if HAS_Z:
            z_next = tl.load(z_row + t1 * stride_zt, mask=mask_d & more, other=0.0)

        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = _softplus(dt, FAST)
        if HAS_Z:
            dy = dy * z * _sigmoid(z, FAST)  # the gradient reaching y before the gate
        dtsum += dt
        carry = tl.exp2(A2 * dt[None, :]) * (carry + Ct[:, None] * dy[None, :])

    state_offs = chunk_id * d_inner * d_state + offs_n[:, None] * d_inner + offs_d[None, :]
    tl.store(chunk_carry_ptr + state_offs, carry, mask=mask_nd)
    tl.store(chunk_dtsum_ptr + chunk_id * d_inner + offs_d, dtsum, mask=mask_d)


@triton.jit
def _load_row(row, t, step, mask, EVEN: tl.constexpr):
    """Row ``t`` of a (T, width) operand; ``mask`` (the width's tail) only where the block overhangs it."""
    if EVEN:
        v = tl.load(row + t * step)
    else:
        v = tl.load(row + t * step, mask=mask, other=0.0)
    return v


@triton.jit
def _token_inputs(
    rows, steps, t, mask_d, mask_n, HAS_Z: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr
):  # fmt: skip
    """Token t's x, dt, B, C, dy and z as stored (t must lie inside the tensor); z is dy's stand-in without HAS_Z."""
    x = _load_row(rows[0], t, steps[0], mask_d, EVEN_D)
    dt = _load_row(rows[1], t, steps[1], mask_d, EVEN_D)
    b = _load_row(rows[2], t, steps[2], mask_n, EVEN_N)
    c = _load_row(rows[3], t, steps[3], mask_n, EVEN_N)
    dy = _load_row(rows[4], t, steps[4], mask_d, EVEN_D)
    z = dy
    if HAS_Z:
        z = _load_row(rows[5], t, steps[5], mask_d, EVEN_D)
    return x, dt, b, c, dy, z


@_jit
def _scan_bwd_kernel(
    x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, dy_ptr, dhfinal_ptr,
    ckpt_ptr, chunk_carry_ptr, chunk_dtsum_ptr, scratch_ptr, cu_ptr, chunk_off_ptr, tile_off_ptr,
    dx_ptr, ddt_ptr, dz_ptr, db_ptr, dc_ptr, da_ptr, dd_ptr, dbias_ptr, dh0_ptr,
    seqlen, n_seq, n_tokens, d_inner, d_state, chunk, chunks_per_seq,
    stride_xb, stride_xt, stride_dtb, stride_dtt, stride_zb, stride_zt,
    stride_bb, stride_bt, stride_cb, stride_ct, stride_dyb, stride_dyt,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_DHFINAL: tl.constexpr, VARLEN: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    FAST: tl.constexpr, ALIGNED: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_D channels of one chunk of one sequence, its tiles of TILE tokens from last to first.

    Writes dx, ddt, dz (in the dtypes of x, dt, z), this channel block's share of every token's dB and
    dC, and this chunk's share of dA, dD and ddt_bias; the first chunk of a sequence writes its dh0.
    """
    chunk_id = tl.program_id(0)
    pid_d = tl.program_id(1)
    if VARLEN:
        if chunk_id >= tl.load(chunk_off_ptr + n_seq):
            return
    seq, batch, start, end, first_chunk, last_chunk, t_begin, t_end = _chunk_span(
        chunk_id, cu_ptr, chunk_off_ptr, seqlen, n_seq, chunk, chunks_per_seq, VARLEN, SEARCH_STEPS
    )

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_nd = mask_n[:, None] & mask_d[None, :]
    # The (N, BLOCK_D) tiles lie as in the forward kernel (N down the tile, so that sums over N stay
    # in-thread). A2 = A log2(e): the decays are exp2(A2 dt), and ddt's sum over N is taken against A2.
    A2 = tl.load(a_ptr + offs_n[:, None] * d_inner + offs_d[None, :], mask=mask_nd, other=0.0) * 1.4426950408889634
    if HAS_D:
        D = tl.load(d_ptr + offs_d, mask=mask_d, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    seq_state_offs = seq * d_inner * d_state + offs_d[None, :] * d_state + offs_n[:, None]  # in (n, Di, N) tensors

    # carry = a_{t+1} g_{t+1}: the adjoint that reaches token t from the token after it. After the
    # chunk's last token it is dh_final carried back through the later chunks: each adds what it
    # passes back from a zero carry (phase 1) to the carry it received, decayed by exp(A * its summed dt).
    if HAS_DHFINAL:
        carry = tl.load(dhfinal_ptr + seq_state_offs, mask=mask_nd, other=0.0)
    else:
        carry = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for i in range(0, last_chunk - chunk_id):
        later = last_chunk - i
        dtsum = tl.load(chunk_dtsum_ptr + later * d_inner + offs_d, mask=mask_d, other=0.0)
        passed = tl.load(chunk_carry_ptr + later * d_inner * d_state + offs_n[:, None] * d_inner + offs_d[None, :], mask=mask_nd, other=0.0)  # fmt: skip
        carry = tl.exp2(A2 * dtsum[None, :]) * carry + passed
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    # This program's scratch holds the state before each token of the tile in hand: (TILE, N, BLOCK_D),
    # channels contiguous like the state tile's other loads (A, the checkpoints): a layout of N
    # contiguous makes Triton lay the tile out along N and convert it through shared memory per token.
    slot_size = BLOCK_N * BLOCK_D
    program = chunk_id * tl.num_programs(1) + pid_d
    scratch = scratch_ptr + program.to(tl.int64) * (TILE * slot_size) + offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]  # fmt: skip
    if VARLEN:
        ckpt_base = tl.load(tile_off_ptr + seq)
    else:
        ckpt_base = seq * tl.cdiv(seqlen, TILE)
    ckpt_offs = offs_n[:, None] * d_inner + offs_d[None, :]

    x_row, dt_row, z_row, b_row, c_row = _scan_rows(
        x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, batch, stride_xb, stride_dtb, stride_zb, stride_bb, stride_cb,
        offs_d, offs_n, ALIGNED,
    )  # fmt: skip
    dy_row = _row_start(dy_ptr, batch, stride_dyb, ALIGNED) + offs_d
    rows = (x_row, dt_row, b_row, c_row, dy_row, z_row)
    steps = (stride_xt, stride_dtt, stride_bt, stride_ct, stride_dyt, stride_zt)
    out_row = batch * seqlen  # row of the contiguous (rows, Di) gradients, and of the (blocks, rows, N) dB, dC shares
    db_row = db_ptr + pid_d.to(tl.int64) * n_tokens * d_state + offs_n
    dc_row = dc_ptr + pid_d.to(tl.int64) * n_tokens * d_state + offs_n
    first_tile = (t_begin - start) // TILE  # chunks hold whole tiles (the host makes chunk a multiple of TILE)
    n_tiles = tl.cdiv(t_end - t_begin, TILE)
    for tile_step in range(0, n_tiles):
        tile = first_tile + n_tiles - 1 - tile_step
        tile_begin = (start + tile * TILE).to(tl.int64)
        tile_end = tl.minimum(tile_begin + TILE, t_end)
        h = tl.load(ckpt_ptr + (ckpt_base + tile).to(tl.int64) * d_inner * d_state + ckpt_offs, mask=mask_nd, other=0.0)  # fmt: skip

        # 1. Forward over the tile from its checkpoint. It stores the state before each token, and
        # takes the gradients that need the state after it: dz (through y) and dC.
        # Triton picks which thread holds which element, so the thread that reads a state back need
        # not be the one that wrote it: a barrier orders the two walks' scratch accesses.
        tl.debug_barrier()
        # Each walk loads the next token's inputs while it computes this one's; the index is clamped
        # into the tile (the last load repeats) rather than masked, which spares zeroing registers.
        x_next, dt_next, b_next, c_next, dy_next, z_next = _token_inputs(rows, steps, tile_begin, mask_d, mask_n, HAS_Z, EVEN_D, EVEN_N)  # fmt: skip
        for t in range(tile_begin, tile_end):
            x = x_next.to(tl.float32)
            dt = dt_next.to(tl.float32)
            Bt = b_next.to(tl.float32)
            Ct = c_next.to(tl.float32)
            dy = dy_next.to(tl.float32)
            if HAS_Z:
                z = z_next.to(tl.float32)
            x_next, dt_next, b_next, c_next, dy_next, z_next = _token_inputs(
                rows, steps, tl.minimum(t + 1, tile_end - 1), mask_d, mask_n, HAS_Z, EVEN_D, EVEN_N
            )  # fmt: skip

            tl.store(scratch + (t - tile_begin) * slot_size, h)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = _softplus(dt, FAST)
            h = tl.exp2(A2 * dt[None, :]) * h + Bt[:, None] * (dt * x)[None, :]
            dy_ssm = dy  # the gradient reaching y before the gate
            if HAS_Z:
                gate = _sigmoid(z, FAST)
                dy_ssm = dy * z * gate
                y = tl.sum(h * Ct[:, None], axis=0)
                if HAS_D:
                    y += D * x
                tl.store(dz_ptr + (out_row + t) * d_inner + offs_d, dy * y * gate * (1.0 + z * (1.0 - gate)), mask=mask_d)  # fmt: skip
            # dC_t sums h_t dy_t over all channels: this block stores its channels' share.
            tl.store(dc_row + (out_row + t) * d_state, tl.sum(h * dy_ssm[None, :], axis=1), mask=mask_n)
        tl.debug_barrier()

        # 2. Backward over the tile, reading the state before each token back.
        t_last = tile_end - 1
        x_next, dt_next, b_next, c_next, dy_next, z_next = _token_inputs(rows, steps, t_last, mask_d, mask_n, HAS_Z, EVEN_D, EVEN_N)  # fmt: skip
        for back in range(0, tile_end - tile_begin):
            t = t_last - back
            x = x_next.to(tl.float32)
            dt_raw = dt_next.to(tl.float32)
            Bt = b_next.to(tl.float32)
            Ct = c_next.to(tl.float32)
            dy = dy_next.to(tl.float32)
            if HAS_Z:
                z = z_next.to(tl.float32)
            x_next, dt_next, b_next, c_next, dy_next, z_next = _token_inputs(
                rows, steps, tl.maximum(t - 1, tile_begin), mask_d, mask_n, HAS_Z, EVEN_D, EVEN_N
            )  # fmt: skip
            h_prev = tl.load(scratch + (t - tile_begin) * slot_size)

            if HAS_BIAS:
                dt_raw = dt_raw + bias
            dt = dt_raw
            if SOFTPLUS:
                dt = _softplus(dt_raw, FAST)
            dy_ssm = dy
            if HAS_Z:
                dy_ssm = dy * z * _sigmoid(z, FAST)
            g = carry + Ct[:, None] * dy_ssm[None, :]  # the adjoint of h_t
            g_b = tl.sum(g * Bt[:, None], axis=0)  # (BLOCK_D,)
            tl.store(db_row + (out_row + t) * d_state, tl.sum(g * (dt * x)[None, :], axis=1), mask=mask_n)
            carry = g * tl.exp2(A2 * dt[None, :])  # a_t g_t, for token t - 1
            g_decay = carry * h_prev  # g_t a_t h_{t-1}: what the decay of this step did to the loss
            dA_acc += g_decay * dt[None, :]
            ddt = g_b * x + tl.sum(g_decay * A2, axis=0) * 0.6931471805599453  # A = A2 ln 2
            dx = g_b * dt
            if HAS_D:
                dx += D * dy_ssm
                dD_acc += dy_ssm * x
            if SOFTPLUS:
                ddt *= _sigmoid(dt_raw, FAST)
            if HAS_BIAS:
                dbias_acc += ddt
            out = (out_row + t) * d_inner + offs_d
            tl.store(dx_ptr + out, dx, mask=mask_d)
            tl.store(ddt_ptr + out, ddt, mask=mask_d)

    if HAS_H0:
        if t_begin == start:
            tl.store(dh0_ptr + seq_state_offs, carry, mask=mask_nd)
    tl.store(da_ptr + chunk_id * d_inner * d_state + offs_d[None, :] * d_state + offs_n[:, None], dA_acc, mask=mask_nd)
    if HAS_D:
        tl.store(dd_ptr + chunk_id * d_inner + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + chunk_id * d_inner + offs_d, dbias_acc, mask=mask_d)


# --- selective scan: host side ------------------------------------------------------------------


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Packing:
    """Where each sequence lives: uniform (B, L) batch rows, or packed segments of one row."""

    def __init__(self, x: Tensor, cu_seqlens: Tensor | None) -> None:
        self.varlen = cu_seqlens is not None
        if self.varlen:
            if x.shape[0] != 1:
                raise ValueError(f"packed input (cu_seqlens given) must have batch size 1, got {x.shape[0]}")
            self.cu_seqlens = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()
            self.n_seq = self.cu_seqlens.numel() - 1
        else:
            self.cu_seqlens = None
            self.n_seq = x.shape[0]
        self.seqlen = x.shape[1]

    @functools.cached_property
    def lengths(self) -> Tensor:
        """(n,) int32 tokens of each packed sequence; computed when asked for (one launch fewer per call)."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def segment_offsets(self, block: int) -> Tensor | None:
        """(n + 1,) int32: where each sequence's first piece of ``block`` tokens is numbered (packed only)."""
        if not self.varlen:
            return None
        counts = torch.div(self.lengths + block - 1, block, rounding_mode="floor")
        return torch.nn.functional.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))

    def pieces(self, block: int) -> tuple[int, int]:
        """(grid size, pieces per sequence) for cutting every sequence into pieces of ``block`` tokens.

        Packed: an upper bound on the number of pieces (programs past the real count return at once).
        """
        if self.varlen:
            return -(-self.seqlen // block) + self.n_seq, 0
        per_seq = max(1, -(-self.seqlen // block))
        return self.n_seq * per_seq, per_seq


def _scan_chunk(packing: _Packing, n_dblocks: int) -> int:
    """Chunk length: whole sequences when (sequence, channel block) pairs already fill the GPU."""
    whole = max(1, packing.seqlen)
    if packing.n_seq * n_dblocks >= SCAN_MIN_PROGRAMS:
        return whole
    tokens = packing.seqlen if packing.varlen else packing.seqlen * packing.n_seq
    chunk = max(SCAN_MIN_CHUNK, triton.next_power_of_2(max(1, tokens * n_dblocks // SCAN_CHUNK_PROGRAMS)))
    return min(chunk, whole)


def _scan_block(packing: _Packing, d_inner: int) -> int:
    """Channels a forward-scan program: SCAN_FWD_BLOCK_D, or SCAN_FWD_NARROW_BLOCK_D where only the
    narrower blocks make enough programs to run whole sequences unchunked (mamba-130m at 2K tokens)."""
    wide = min(SCAN_FWD_BLOCK_D, triton.next_power_of_2(d_inner))
    narrow = min(SCAN_FWD_NARROW_BLOCK_D, wide)
    if packing.n_seq * triton.cdiv(d_inner, wide) < SCAN_MIN_PROGRAMS <= packing.n_seq * triton.cdiv(d_inner, narrow):
        return narrow
    return wide


def _aligned(x: Tensor) -> bool:
    """Whether the batch and time strides of the (B, L, C) tensor are multiples of 16 elements.

    True for every real model (C a multiple of 16); the kernels then tell the compiler so about the batch
    stride they do not specialise on (``_row_start``): one 128-bit load where eight 16-bit loads were
    (bf16); the convolution went 373 -> 230 us a mamba-130m layer at 128 x 512 tokens on the H200.
    """
    return x.stride(0) % 16 == 0 and x.stride(1) % 16 == 0


def _channels_per_thread(block_d: int, warps: int) -> int:
    """The forward scan's layout hint: the channels each thread owns whole, or ``block_d`` (no hint) where
    that would be one channel, a layout Triton then builds with shuffles (354 instructions a token for
    32 channels on one warp, against 218 without the hint; sm_90)."""
    per_thread = block_d // (32 * warps)
    return per_thread if per_thread >= 2 else block_d


def _fast(x: Tensor) -> bool:
    """The kernels' FAST math: on a GPU; not in Triton's interpreter, which runs them on CPU tensors."""
    return x.device.type == "cuda"


def _rows(t: Tensor) -> Tensor:
    """The tensor with a unit stride along its last dim (a view when it already has one)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _scan_forward_pass(
    x, dt, z, B, C, A, D, dt_bias, softplus, h0, packing: _Packing, y=None, hfinal=None, ckpt=None, ckpt_every=1
):  # fmt: skip
    """Run phase 1 (if chunked) and phase 2 of the forward kernel; fills y / hfinal / ckpt when given."""
    d_inner, d_state = A.shape
    block_d = _scan_block(packing, d_inner)
    block_n = triton.next_power_of_2(d_state)
    n_dblocks = triton.cdiv(d_inner, block_d)
    chunk = _scan_chunk(packing, n_dblocks)
    n_chunks, chunks_per_seq = packing.pieces(chunk)
    chunked = chunk < packing.seqlen
    chunk_off = packing.segment_offsets(chunk)
    tile_off = packing.segment_offsets(ckpt_every) if ckpt is not None else None
    dummy = x.new_empty(0, dtype=torch.float32)
    chunk_state = x.new_empty(n_chunks, d_state, d_inner, dtype=torch.float32) if chunked else dummy
    chunk_dtsum = x.new_empty(n_chunks, d_inner, dtype=torch.float32) if chunked else dummy
    y_arg = y if y is not None else x
    strides = (
        x.stride(0), x.stride(1), dt.stride(0), dt.stride(1),
        (z if z is not None else x).stride(0), (z if z is not None else x).stride(1),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1), y_arg.stride(0), y_arg.stride(1),
    )  # fmt: skip
    common = dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus,
        HAS_H0=h0 is not None, VARLEN=packing.varlen, SEARCH_STEPS=_search_steps(packing.n_seq, packing.varlen),
        ALIGNED=all(_aligned(t) for t in (x, dt, z, B, C, y) if t is not None), FAST=_fast(x),
        STAGES=SCAN_FWD_STAGES, BLOCK_D=block_d, BLOCK_N=block_n,
        D_PER_THREAD=_channels_per_thread(block_d, SCAN_FWD_WARPS), num_warps=SCAN_FWD_WARPS,
    )  # fmt: skip
    A_t = A.T.contiguous()  # (N, Di): loads in the layout of the state tile
    pointers = (
        x, dt, z if z is not None else x, B, C, A_t, D if D is not None else A,
        dt_bias if dt_bias is not None else A, y_arg, h0 if h0 is not None else dummy, hfinal if hfinal is not None else dummy, chunk_state, chunk_dtsum,
        ckpt if ckpt is not None else dummy, packing.cu_seqlens if packing.varlen else dummy,
        chunk_off if chunk_off is not None else dummy, tile_off if tile_off is not None else dummy,
    )  # fmt: skip
    sizes = (packing.seqlen, packing.n_seq, d_inner, d_state, chunk, chunks_per_seq, ckpt_every)
    grid = (n_chunks, n_dblocks)
    # Phase 2 folds the earlier chunks' end states itself (K (K - 1) / 2 folds for a sequence of K
    # chunks) unless a sequence may have more than SCAN_FOLD_MAX_CHUNKS: then a launch of its own
    # turns them into start states in K - 1 steps.
    starts = chunked and -(-packing.seqlen // chunk) > SCAN_FOLD_MAX_CHUNKS
    if chunked:
        _scan_fwd_kernel[grid](
            *pointers, *sizes, *strides, STORE_FINAL=False, PHASE=1, STARTS=False, STORE_Y=False, STORE_CKPT=False,
            **common,
        )  # fmt: skip
    if starts:
        _scan_chunk_starts_kernel[(packing.n_seq, triton.cdiv(d_inner, SCAN_STARTS_BLOCK_D))](
            A_t, h0 if h0 is not None else dummy, chunk_state, chunk_dtsum, chunk_off if chunk_off is not None else dummy,
            packing.n_seq, d_inner, d_state, chunks_per_seq, HAS_H0=h0 is not None, VARLEN=packing.varlen,
            BLOCK_D=SCAN_STARTS_BLOCK_D, BLOCK_N=block_n, num_warps=1,
        )  # fmt: skip
    _scan_fwd_kernel[grid](
        *pointers, *sizes, *strides, STORE_FINAL=hfinal is not None, PHASE=2, STARTS=starts, STORE_Y=y is not None,
        STORE_CKPT=ckpt is not None, **common,
    )  # fmt: skip


def _scan_inference(x, dt, A, B, C, D, z, dt_bias, softplus, h0, return_final, cu_seqlens):
    """The forward scan, (y, final state or None), and the inputs as the kernels read them (for the backward)."""
    x, dt, B, C = _rows(x), _rows(dt), _rows(B), _rows(C)
    z = None if z is None else _rows(z)
    A = A.float().contiguous()
    D = None if D is None else D.float().contiguous()
    dt_bias = None if dt_bias is None else dt_bias.float().contiguous()
    h0 = None if h0 is None else h0.float().contiguous()
    packing = _Packing(x, cu_seqlens)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    hfinal = None
    if return_final:  # empty sequences launch nothing: their final state is their initial state
        hfinal = h0.clone() if h0 is not None else x.new_zeros(packing.n_seq, *A.shape, dtype=torch.float32)
    _scan_forward_pass(x, dt, z, B, C, A, D, dt_bias, softplus, h0, packing, y=y, hfinal=hfinal)
    return y, hfinal, (x, dt, A, B, C, D, z, dt_bias, h0)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, softplus, h0, return_final, cu_seqlens):
        ctx.dtypes = [None if t is None else t.dtype for t in (A, D, dt_bias, h0)]
        y, hfinal, read = _scan_inference(x, dt, A, B, C, D, z, dt_bias, softplus, h0, return_final, cu_seqlens)
        ctx.save_for_backward(*read, cu_seqlens)
        ctx.softplus = softplus
        return y, hfinal

    @staticmethod
    def backward(ctx, dy, dhfinal):
        x, dt, A, B, C, D, z, dt_bias, h0, cu_seqlens = ctx.saved_tensors
        packing = _Packing(x, cu_seqlens)
        d_inner, d_state = A.shape
        tile = SCAN_BWD_TILE
        # 1. The forward pass kept nothing but its inputs: re-run it to store the state before every tile.
        tile_off = packing.segment_offsets(tile)
        ckpt = x.new_empty(packing.pieces(tile)[0], d_state, d_inner, dtype=torch.float32)
        _scan_forward_pass(x, dt, z, B, C, A, D, dt_bias, ctx.softplus, h0, packing, ckpt=ckpt, ckpt_every=tile)

        # 2. Chunks as in the forward pass, made of whole tiles (a chunk starts at a checkpoint).
        block_d = min(SCAN_BWD_BLOCK_D, triton.next_power_of_2(d_inner))
        block_n = triton.next_power_of_2(d_state)
        n_dblocks = triton.cdiv(d_inner, block_d)
        chunk = -(-_scan_chunk(packing, n_dblocks) // tile) * tile
        n_chunks, chunks_per_seq = packing.pieces(chunk)
        chunked = chunk < packing.seqlen
        chunk_off = packing.segment_offsets(chunk)
        grid = (n_chunks, n_dblocks)

        dy = _rows(dy)
        f32 = dict(device=x.device, dtype=torch.float32)
        dummy = x.new_empty(0, dtype=torch.float32)
        zz = z if z is not None else x
        A_t = A.T.contiguous()  # (N, Di): loads in the layout of the state tile, as in the forward pass
        bias_arg = dt_bias if dt_bias is not None else A
        cu = packing.cu_seqlens if packing.varlen else dummy
        chunk_off_arg = chunk_off if chunk_off is not None else dummy
        common = dict(
            HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=ctx.softplus, VARLEN=packing.varlen,
            SEARCH_STEPS=_search_steps(packing.n_seq, packing.varlen), FAST=_fast(x), BLOCK_D=block_d,
            BLOCK_N=block_n, num_warps=SCAN_BWD_WARPS,
        )  # fmt: skip
        chunk_carry = x.new_empty(n_chunks, d_state, d_inner, dtype=torch.float32) if chunked else dummy
        chunk_dtsum = x.new_empty(n_chunks, d_inner, dtype=torch.float32) if chunked else dummy
        if chunked:
            _scan_bwd_carry_kernel[grid](
                dt, zz, C, A_t, bias_arg, dy, chunk_carry, chunk_dtsum, cu, chunk_off_arg,
                packing.seqlen, packing.n_seq, d_inner, d_state, chunk, chunks_per_seq,
                dt.stride(0), dt.stride(1), zz.stride(0), zz.stride(1), C.stride(0), C.stride(1),
                dy.stride(0), dy.stride(1), **common,
            )  # fmt: skip

        # 3. The backward walk. Each program reuses one scratch slab, the (TILE, N, BLOCK_D) fp32 states of
        # the tile in hand, tile after tile: TILE x d_inner x N x 4 bytes per sequence (or chunk). The
        # checkpoints take N x 4 / TILE bytes per channel and token; keeping every token's state instead
        # would take N x 4, 32 times a bf16 activation at N = 16.
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        ddt = torch.empty(x.shape, device=x.device, dtype=dt.dtype)
        dz = torch.empty(x.shape, device=x.device, dtype=z.dtype) if z is not None else None
        # dB_t and dC_t sum over all channels. Each channel block stores its share of every token's sums
        # and the host adds the shares (n_blocks x rows x N x 8 bytes for the two, transient): the sums
        # come out the same on every run, where atomics would add in a different order each time.
        n_rows = x.shape[0] * x.shape[1]
        dB = torch.empty(n_dblocks, n_rows, d_state, **f32)
        dC = torch.empty(n_dblocks, n_rows, d_state, **f32)
        # One row per chunk; zeros, since programs past a packed batch's real chunk count write nothing.
        dA = torch.zeros(n_chunks, d_inner, d_state, **f32)
        dD = torch.zeros(n_chunks, d_inner, **f32) if D is not None else None
        dbias = torch.zeros(n_chunks, d_inner, **f32) if dt_bias is not None else None
        dh0 = None
        if h0 is not None:  # kept as is for empty sequences, whose final state is their initial state
            dh0 = (
                dhfinal.float().clone() if dhfinal is not None else torch.zeros(packing.n_seq, d_inner, d_state, **f32)
            )
        scratch = torch.empty(n_chunks * n_dblocks * tile * block_n * block_d, **f32)
        _scan_bwd_kernel[grid](
            x, dt, zz, B, C, A_t, D if D is not None else A, bias_arg, dy,
            dhfinal.float().contiguous() if dhfinal is not None else dummy,
            ckpt, chunk_carry, chunk_dtsum, scratch, cu, chunk_off_arg, tile_off if tile_off is not None else dummy,
            dx, ddt, dz if dz is not None else dummy, dB, dC, dA, dD if dD is not None else dummy,
            dbias if dbias is not None else dummy, dh0 if dh0 is not None else dummy,
            packing.seqlen, packing.n_seq, n_rows, d_inner, d_state, chunk, chunks_per_seq,
            x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), zz.stride(0), zz.stride(1),
            B.stride(0), B.stride(1), C.stride(0), C.stride(1), dy.stride(0), dy.stride(1),
            HAS_D=D is not None, HAS_H0=h0 is not None, HAS_DHFINAL=dhfinal is not None, TILE=tile,
            ALIGNED=all(_aligned(t) for t in (x, dt, zz, B, C, dy)), EVEN_D=d_inner % block_d == 0,
            EVEN_N=d_state == block_n, **common,
        )  # fmt: skip
        dtype_A, dtype_D, dtype_bias, dtype_h0 = ctx.dtypes
        return (
            dx, ddt, dA.sum(0).to(dtype_A), dB.sum(0).view(B.shape).to(B.dtype), dC.sum(0).view(C.shape).to(C.dtype),
            None if dD is None else dD.sum(0).to(dtype_D), dz, None if dbias is None else dbias.sum(0).to(dtype_bias),
            None, None if dh0 is None else dh0.to(dtype_h0), None, None,
        )  # fmt: skip


def selective_scan_triton(
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
    """Mamba-1 selective scan on a CUDA GPU; same signature and shapes as ``selective_scan_reference``.

    With ``cu_seqlens`` (n + 1,) the batch is packed: x, dt, z are (1, T, Di), B and C (1, T, N), and
    ``initial_state`` and the final state are (n, Di, N), one per sequence.
    Gradients reach every tensor input (x, dt, A, B, C, D, z, dt_bias, initial_state).
    """
    args = (x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, return_final_state, cu_seqlens)
    if _needs_grad(x, dt, A, B, C, D, z, dt_bias, initial_state):
        y, final_state = _SelectiveScan.apply(*args)
    else:  # inference: the kernels alone, without an autograd node's host-side cost
        y, final_state, _ = _scan_inference(*args)
    return (y, final_state) if return_final_state else y


# --- causal convolution -------------------------------------------------------------------------


@triton.jit
def _conv_position(tok, cu_ptr, seqlen, n_seq, VARLEN: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """(sequence, batch row, time index within that row, position within the sequence) of each token."""
    if VARLEN:
        seq = _find_segment(cu_ptr, tok, n_seq, SEARCH_STEPS)
        seq_start = tl.load(cu_ptr + seq)
        seq_len = tl.load(cu_ptr + seq + 1) - seq_start
        return seq, tl.zeros_like(tok), tok, tok - seq_start, seq_len
    seq = tok // seqlen
    pos = tok - seq * seqlen
    return seq, seq, pos, pos, tl.zeros_like(tok) + seqlen


@triton.jit
def _conv_window(
    x_ptr, h0_ptr, seq, batch, time, pos, tok_mask, offs_c, mask_c,
    stride_xb, stride_xt, stride_h0s, stride_h0k, k: tl.constexpr,
    HAS_H0: tl.constexpr, WIDTH: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Tap k of the window, (BLOCK_T, BLOCK_C) fp32: the input ``WIDTH - 1 - k`` tokens back (from the
    initial state before the start)."""
    back = WIDTH - 1 - k
    src = pos - back
    inside = tok_mask & (src >= 0)
    rows = _row_start(x_ptr, batch.to(tl.int64), stride_xb, ALIGNED) + (time - back).to(tl.int64) * stride_xt
    x = tl.load(rows[:, None] + offs_c[None, :], mask=inside[:, None] & mask_c[None, :], other=0.0)
    x = x.to(tl.float32)
    if HAS_H0:
        before = tok_mask & (src < 0)
        h0_rows = seq.to(tl.int64) * stride_h0s + (src + WIDTH - 1).to(tl.int64) * stride_h0k
        x += tl.load(h0_ptr + h0_rows[:, None] + offs_c[None, :], mask=before[:, None] & mask_c[None, :], other=0.0).to(tl.float32)  # fmt: skip
    return x


@triton.jit
def _conv_weight(w_ptr, offs_c, mask_c, stride_wc, stride_wk, k: tl.constexpr, WIDTH: tl.constexpr):
    """Tap k's weights, (BLOCK_C,) fp32; zeros for the taps a narrower convolution does not have."""
    if k < WIDTH:
        return tl.load(w_ptr + offs_c * stride_wc + k * stride_wk, mask=mask_c, other=0.0).to(tl.float32)
    return tl.zeros(offs_c.shape, dtype=tl.float32)


@_jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, h0_ptr, y_ptr, cu_ptr,
    n_tokens, seqlen, channels, n_seq,
    stride_xb, stride_xt, stride_wc, stride_wk, stride_h0s, stride_h0k,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SILU: tl.constexpr,
    VARLEN: tl.constexpr, SEARCH_STEPS: tl.constexpr, ALIGNED: tl.constexpr, FAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tok_mask = tok < n_tokens
    mask_c = offs_c < channels
    seq, batch, time, pos, _ = _conv_position(tok, cu_ptr, seqlen, n_seq, VARLEN, SEARCH_STEPS)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        x = _conv_window(
            x_ptr, h0_ptr, seq, batch, time, pos, tok_mask, offs_c, mask_c,
            stride_xb, stride_xt, stride_h0s, stride_h0k, k, HAS_H0, WIDTH, ALIGNED,
        )  # fmt: skip
        acc += x * _conv_weight(w_ptr, offs_c, mask_c, stride_wc, stride_wk, k, WIDTH)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * _sigmoid(acc, FAST)
    out = tok.to(tl.int64)[:, None] * channels + offs_c[None, :]
    tl.store(y_ptr + out, acc, mask=tok_mask[:, None] & mask_c[None, :])


@triton.jit
def _conv_tap(
    x_ptr, h0_ptr, seq, batch, time, pos, tok_mask, offs_c, mask_c, stride_xb, stride_xt, stride_h0s, stride_h0k,
    k: tl.constexpr, HAS_H0: tl.constexpr, WIDTH: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """``_conv_window`` for taps k < WIDTH; zeros for the taps a narrower convolution does not have."""
    if k < WIDTH:
        return _conv_window(
            x_ptr, h0_ptr, seq, batch, time, pos, tok_mask, offs_c, mask_c,
            stride_xb, stride_xt, stride_h0s, stride_h0k, k, HAS_H0, WIDTH, ALIGNED,
        )  # fmt: skip
    return tl.zeros((BLOCK_T, offs_c.shape[0]), dtype=tl.float32)


@_jit
def _conv_bwd_pre_kernel(
    x_ptr, w_ptr, bias_ptr, h0_ptr, dy_ptr, dpre_ptr, dw_ptr, dbias_ptr, cu_ptr,
    n_tokens, seqlen, channels, n_seq,
    stride_xb, stride_xt, stride_wc, stride_wk, stride_h0s, stride_h0k,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SILU: tl.constexpr,
    VARLEN: tl.constexpr, SEARCH_STEPS: tl.constexpr, ALIGNED: tl.constexpr, FAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr,
):  # fmt: skip
    """dpre = dy * silu'(pre) over TILES blocks of BLOCK_T tokens, and their share of dweight (WIDTH, C)
    and dbias (C,). The products for dweight are summed elementwise in registers, tile after tile, and
    over the tokens once at the end: a sum across the warps (shared memory, barriers) costs more than
    a tile's arithmetic. At most 4 taps (every Mamba checkpoint has d_conv = 4)."""
    pid_t = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    # Loop-invariant loads first (Triton does not hoist them out of the loop).
    w0 = _conv_weight(w_ptr, offs_c, mask_c, stride_wc, stride_wk, 0, WIDTH)
    w1 = _conv_weight(w_ptr, offs_c, mask_c, stride_wc, stride_wk, 1, WIDTH)
    w2 = _conv_weight(w_ptr, offs_c, mask_c, stride_wc, stride_wk, 2, WIDTH)
    w3 = _conv_weight(w_ptr, offs_c, mask_c, stride_wc, stride_wk, 3, WIDTH)
    bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    acc0 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    acc1, acc2, acc3, acc_bias = acc0, acc0, acc0, acc0
    for i in range(TILES):
        tok = (pid_t * TILES + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        tok_mask = tok < n_tokens
        mask = tok_mask[:, None] & mask_c[None, :]
        seq, batch, time, pos, _ = _conv_position(tok, cu_ptr, seqlen, n_seq, VARLEN, SEARCH_STEPS)
        window = (x_ptr, h0_ptr, seq, batch, time, pos, tok_mask, offs_c, mask_c,
                  stride_xb, stride_xt, stride_h0s, stride_h0k)  # fmt: skip
        x0 = _conv_tap(*window, 0, HAS_H0, WIDTH, ALIGNED, BLOCK_T)
        x1 = _conv_tap(*window, 1, HAS_H0, WIDTH, ALIGNED, BLOCK_T)
        x2 = _conv_tap(*window, 2, HAS_H0, WIDTH, ALIGNED, BLOCK_T)
        x3 = _conv_tap(*window, 3, HAS_H0, WIDTH, ALIGNED, BLOCK_T)
        pre = x0 * w0[None, :] + x1 * w1[None, :] + x2 * w2[None, :] + x3 * w3[None, :] + bias[None, :]
        flat = tok.to(tl.int64)[:, None] * channels + offs_c[None, :]
        dpre = tl.load(dy_ptr + flat, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            sig = _sigmoid(pre, FAST)
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
        tl.store(dpre_ptr + flat, dpre, mask=mask)
        acc0 += x0 * dpre
        acc1 += x1 * dpre
        acc2 += x2 * dpre
        acc3 += x3 * dpre
        acc_bias += dpre
    dw = dw_ptr + pid_t * WIDTH * channels + offs_c
    tl.store(dw, tl.sum(acc0, axis=0), mask=mask_c)
    if WIDTH > 1:
        tl.store(dw + channels, tl.sum(acc1, axis=0), mask=mask_c)
    if WIDTH > 2:
        tl.store(dw + 2 * channels, tl.sum(acc2, axis=0), mask=mask_c)
    if WIDTH > 3:
        tl.store(dw + 3 * channels, tl.sum(acc3, axis=0), mask=mask_c)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_t * channels + offs_c, tl.sum(acc_bias, axis=0), mask=mask_c)


@_jit
def _conv_bwd_input_kernel(
    dpre_ptr, w_ptr, dx_ptr, cu_ptr, n_tokens, seqlen, channels, n_seq, stride_wc, stride_wk,
    WIDTH: tl.constexpr, VARLEN: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dx_t = sum_k w_k dpre_{t + WIDTH - 1 - k}, over the taps that stay inside the sequence."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tok_mask = tok < n_tokens
    mask_c = offs_c < channels
    _, _, _, pos, seq_len = _conv_position(tok, cu_ptr, seqlen, n_seq, VARLEN, SEARCH_STEPS)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        ahead = WIDTH - 1 - k
        inside = tok_mask & (pos + ahead < seq_len)
        flat = (tok + ahead).to(tl.int64)[:, None] * channels + offs_c[None, :]
        dpre = tl.load(dpre_ptr + flat, mask=inside[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_c * stride_wc + k * stride_wk, mask=mask_c, other=0.0).to(tl.float32)
        acc += dpre * w[None, :]
    tl.store(dx_ptr + tok.to(tl.int64)[:, None] * channels + offs_c[None, :], acc, mask=tok_mask[:, None] & mask_c[None, :])  # fmt: skip


def _conv_launch(x: Tensor, block_t: int, block_c: int) -> tuple[int, tuple[int, int]]:
    n_tokens = x.shape[0] * x.shape[1]
    return n_tokens, (triton.cdiv(n_tokens, block_t), triton.cdiv(x.shape[2], block_c))


def _sequence_starts(packing: _Packing, device: torch.device) -> tuple[Tensor, Tensor]:
    """(n,) first token row of each sequence in the flattened (B * L) order, and (n,) lengths."""
    if packing.varlen:
        return packing.cu_seqlens[:-1].long(), packing.lengths.long()
    starts = torch.arange(packing.n_seq, device=device) * packing.seqlen
    return starts, torch.full_like(starts, packing.seqlen)


def _conv_inference(x, weight, bias, h0, activation, cu_seqlens):
    """The convolution's forward, y (the kernels alone)."""
    packing = _Packing(x, cu_seqlens)
    h0 = None if h0 is None else _rows(h0)
    n_tokens, grid = _conv_launch(x, CONV_BLOCK_T, CONV_BLOCK_C)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dummy = x.new_empty(0)
    h0_arg = h0 if h0 is not None else x
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, h0_arg, y,
        packing.cu_seqlens if packing.varlen else dummy,
        n_tokens, packing.seqlen, x.shape[2], packing.n_seq,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        h0_arg.stride(0) if h0 is not None else 0, h0_arg.stride(1) if h0 is not None else 0,
        WIDTH=weight.shape[1], HAS_BIAS=bias is not None, HAS_H0=h0 is not None, SILU=activation == "silu",
        VARLEN=packing.varlen, SEARCH_STEPS=_search_steps(packing.n_seq, packing.varlen), ALIGNED=_aligned(x),
        FAST=_fast(x), BLOCK_T=CONV_BLOCK_T, BLOCK_C=CONV_BLOCK_C, num_warps=CONV_WARPS,
    )  # fmt: skip
    return y


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, h0, activation, cu_seqlens):
        y = _conv_inference(x, weight, bias, h0, activation, cu_seqlens)
        ctx.save_for_backward(x, weight, bias, None if h0 is None else _rows(h0), cu_seqlens)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, h0, cu_seqlens = ctx.saved_tensors
        packing = _Packing(x, cu_seqlens)
        n_tokens, grid = _conv_launch(x, CONV_BWD_BLOCK_T * CONV_BWD_TILES, CONV_BWD_BLOCK_C)
        channels, width = weight.shape
        dy = dy.contiguous()
        f32 = dict(device=x.device, dtype=torch.float32)
        # dpre makes its round trip through memory in the input's dtype (dweight and dbias are summed
        # from the fp32 values in registers), and dx is written in it: in bf16 a mamba-130m layer at
        # 65,536 tokens moves 1.0 GB instead of 2.2 GB (fp32 dpre, fp32 dx, then a cast).
        dpre = torch.empty(n_tokens, channels, device=x.device, dtype=x.dtype)
        dw_part = torch.empty(grid[0], width, channels, **f32)
        dbias_part = torch.empty(grid[0], channels, **f32) if bias is not None else dw_part
        dummy = x.new_empty(0)
        h0_arg = h0 if h0 is not None else x
        cu = packing.cu_seqlens if packing.varlen else dummy
        search_steps = _search_steps(packing.n_seq, packing.varlen)
        _conv_bwd_pre_kernel[grid](
            x, weight, bias if bias is not None else weight, h0_arg, dy, dpre, dw_part, dbias_part, cu,
            n_tokens, packing.seqlen, channels, packing.n_seq,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            h0_arg.stride(0) if h0 is not None else 0, h0_arg.stride(1) if h0 is not None else 0,
            WIDTH=width, HAS_BIAS=bias is not None, HAS_H0=h0 is not None, SILU=ctx.activation == "silu",
            VARLEN=packing.varlen, SEARCH_STEPS=search_steps, ALIGNED=_aligned(x), FAST=_fast(x),
            BLOCK_T=CONV_BWD_BLOCK_T, BLOCK_C=CONV_BWD_BLOCK_C, TILES=CONV_BWD_TILES, num_warps=CONV_BWD_WARPS,
        )  # fmt: skip
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        _, grid = _conv_launch(x, CONV_BLOCK_T, CONV_BLOCK_C)
        _conv_bwd_input_kernel[grid](
            dpre, weight, dx, cu, n_tokens, packing.seqlen, channels, packing.n_seq, weight.stride(0),
            weight.stride(1), WIDTH=width, VARLEN=packing.varlen, SEARCH_STEPS=search_steps,
            BLOCK_T=CONV_BLOCK_T, BLOCK_C=CONV_BLOCK_C, num_warps=CONV_WARPS,
        )  # fmt: skip
        dh0 = None
        if h0 is not None:
            # Initial-state slot j stands for position j - (K - 1): it meets dpre at positions j - k.
            starts, lengths = _sequence_starts(packing, x.device)
            dh0 = torch.zeros(packing.n_seq, width - 1, channels, **f32)
            for j in range(width - 1):
                for k in range(j + 1):
                    reach = j - k
                    rows = (starts + reach).clamp(max=n_tokens - 1)
                    valid = (reach < lengths).to(torch.float32)[:, None]
                    dh0[:, j] += dpre[rows].float() * valid * weight[:, k].float()
            dh0 = dh0.to(h0.dtype)
        dbias = dbias_part.sum(0).to(bias.dtype) if bias is not None else None
        dweight = dw_part.sum(0).T.to(weight.dtype)
        return dx, dweight, dbias, dh0, None, None


def _conv_final_state(x: Tensor, h0: Tensor | None, width: int, packing: _Packing) -> Tensor:
    """The last K - 1 inputs of each sequence (reaching into the initial state for short ones)."""
    starts, lengths = _sequence_starts(packing, x.device)
    # Slot j holds position length - (K - 1) + j of its sequence.
    pos = lengths[:, None] - (width - 1) + torch.arange(width - 1, device=x.device)[None, :]  # (n, K - 1)
    if packing.varlen:
        batch, time = torch.zeros_like(pos), starts[:, None] + pos
    else:
        batch, time = torch.arange(packing.n_seq, device=x.device)[:, None].expand_as(pos), pos
    from_x = x[batch, time.clamp(min=0, max=max(x.shape[1] - 1, 0))]  # (n, K - 1, C)
    from_x = from_x * (pos >= 0)[..., None].to(x.dtype)
    if h0 is None:
        return from_x
    slot = (pos + width - 1).clamp(min=0, max=width - 2)
    from_h0 = torch.gather(h0, 1, slot[..., None].expand(-1, -1, x.shape[2])).to(x.dtype)
    return torch.where((pos >= 0)[..., None], from_x, from_h0)


def causal_conv1d_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_state: Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Depthwise causal convolution on a CUDA GPU; same signature and shapes as ``causal_conv1d_reference``.

    ``x`` may be a strided view (only its channel dim needs a unit stride). With ``cu_seqlens`` the
    batch is packed: x is (1, T, C), ``initial_state`` and the final state (n, K - 1, C).
    """
    if activation not in (None, "silu"):
        raise ValueError(f"unsupported activation {activation!r}")
    if weight.shape[1] > CONV_MAX_WIDTH:
        raise ValueError(f"the Triton convolution takes at most {CONV_MAX_WIDTH} taps, not {weight.shape[1]}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if _needs_grad(x, weight, bias, initial_state):
        y = _CausalConv1d.apply(x, weight, bias, initial_state, activation, cu_seqlens)
    else:  # inference: the kernel alone, without an autograd node's host-side cost
        y = _conv_inference(x, weight, bias, initial_state, activation, cu_seqlens)
    if not return_final_state:
        return y
    return y, _conv_final_state(x, initial_state, weight.shape[1], _Packing(x, cu_seqlens))
