/*
 * Mamba-1 selective scan, forward only, for CPUs: the compiled kernel behind ops/cpu.py. The inputs
 * that run along the sequence (x, dt, z, B, C) and the output y are fp32 or bf16; the arithmetic
 * and the state are fp32 either way.
 *
 * For every batch row b and channel d, with N states per channel (see ops/README.md):
 *
 *     delta_t = softplus(dt_t + dt_bias)        (dt_t + dt_bias when softplus is off)
 *     h_t     = exp(delta_t * A) * h_{t-1} + delta_t * x_t * B_t
 *     y_t     = (<h_t, C_t> + D * x_t) * silu(z_t)
 *
 * Layout of the work: LANES neighbouring channels (16 with AVX-512, vector_math.h) share one
 * vector, a block. A block's N states are carried in registers while it walks a tile of tokens, and
 * in a small buffer from one tile to the next, so the (B, L, Di, N) tensor of the textbook form never
 * exists. Up to GROUP_BLOCKS neighbouring blocks walk the sequence together, tile after tile, so that
 * a tile's rows are read from memory once for the whole group. Groups of (batch row, blocks) are
 * independent and are shared out to OpenMP threads.
 *
 * A packed batch (`cu_seqlens` set, batch 1) holds n sequences end to end: sequence s is tokens
 * cu_seqlens[s] .. cu_seqlens[s + 1] - 1, starts from its own state (row s of initial_state) and
 * leaves its own final state; the groups are then (sequence, blocks).
 */

#include "kernels.h"

/* Tokens a block walks before the next block of its group takes over: the group's rows of x, dt, z, B and C
   for one tile (64 tokens x 128 channels: 16 KB an input in bf16) are read from memory once and then
   served from cache to every block of the group. Walking a whole long sequence block by block instead
   read each row once per block: on a packed batch of 9,682 tokens that ran at half the speed. */
#define TILE_TOKENS 64
#define GROUP_BLOCKS 8 /* blocks of LANES channels that walk a tile one after the other */

/*
 * Tokens [t0, t1) of batch row b for channels [d0, d0 + width): the state h (d_state vectors) comes in
 * and goes out through `h_io`; `A_log2` is A x log2(e); token t's B and C are fp32 at
 * B[(t - t0) * b_stride] and C[(t - t0) * c_stride]. Inlined with a literal d_state (16, the released
 * Mamba-1 models) the state loop unrolls; with a run-time d_state the same code serves any N. About 11
 * multiply-class vector instructions per state and token, most of them the exp; B and C enter them as
 * broadcasts from memory. `bf16` (a literal too) picks the element type of x, dt, z and y.
 */
static inline __attribute__((always_inline)) void scan_tile(const ScanArgs *a, int64_t b, int64_t d0, int width,
                                                            int64_t t0, int64_t t1, vf *restrict h_io,
                                                            const vf *restrict A_log2, const float *restrict B,
                                                            const float *restrict C, int64_t b_stride, int64_t c_stride,
                                                            const int64_t d_state, const int bf16) {
    vf h[d_state];
    for (int64_t n = 0; n < d_state; n++) h[n] = h_io[n];
    vf D = a->D ? load(a->D + d0, width) : broadcast(0.0f);
    vf dt_bias = a->dt_bias ? load(a->dt_bias + d0, width) : broadcast(0.0f);
    int64_t y_row = b * a->length * a->d_inner + d0;

    for (int64_t t = t0; t < t1; t++) {
        vf delta = seq_load(a->dt, b, t, d0, width, bf16) + dt_bias;
        if (a->dt_softplus) delta = softplus_vec(delta);
        vf x = seq_load(a->x, b, t, d0, width, bf16);
        vf delta_x = delta * x;
        const float *B_t = B + (t - t0) * b_stride, *C_t = C + (t - t0) * c_stride;
        vf out = D * x;
#pragma GCC unroll 16
        for (int64_t n = 0; n < d_state; n++) {
            h[n] = exp2_vec(delta * A_log2[n]) * h[n] + delta_x * B_t[n];
            out += h[n] * C_t[n];
        }
        if (a->z.data) out *= silu_vec(seq_load(a->z, b, t, d0, width, bf16));
        store_as(a->y, y_row + t * a->d_inner, out, width, bf16);
    }
    for (int64_t n = 0; n < d_state; n++) h_io[n] = h[n];
}

/* Channels in the block that starts at channel d0: LANES, or fewer in the last block. */
static inline int block_width(const ScanArgs *a, int64_t d0) { return a->d_inner - d0 < LANES ? (int)(a->d_inner - d0) : LANES; }

/* Prefetches elements [c0, c1) of row (b, t) into the cache, one request per cache line. */
static inline void prefetch_row(Seq s, int64_t b, int64_t t, int64_t c0, int64_t c1, const int bf16) {
    const char *row = (const char *)s.data + (seq_offset(s, b, t)) * (bf16 ? 2 : 4);
    for (int64_t byte = c0 * (bf16 ? 2 : 4); byte < c1 * (bf16 ? 2 : 4); byte += 64) __builtin_prefetch(row + byte, 0, 3);
}

/*
 * Sequence `item` for blocks [first, first + count) of LANES channels (count <= GROUP_BLOCKS): block j's
 * A (times log2 e) and state sit in A_log2[j] and h[j] while the group walks the sequence one tile at a
 * time, every block of the group in turn.
 */
static inline __attribute__((always_inline)) void scan_group(const ScanArgs *a, int64_t item, int64_t first,
                                                             int64_t count, const int64_t d_state, const int bf16) {
    /* Batch row b, tokens [start, end); `item` also indexes the states. */
    int64_t b = item, start = 0, end = a->length;
    if (a->cu_seqlens) {
        b = 0;
        start = a->cu_seqlens[item];
        end = a->cu_seqlens[item + 1];
    }
    vf A_log2[GROUP_BLOCKS][d_state], h[GROUP_BLOCKS][d_state];
    float B_wide[bf16 ? TILE_TOKENS * d_state : 1], C_wide[bf16 ? TILE_TOKENS * d_state : 1];
    for (int64_t j = 0; j < count; j++) {
        int64_t d0 = (first + j) * LANES;
        int width = block_width(a, d0);
        for (int64_t n = 0; n < d_state; n++) {
            h[j][n] = broadcast(0.0f);
            A_log2[j][n] = broadcast(0.0f);
            for (int lane = 0; lane < width; lane++) {
                int64_t channel = d0 + lane;
                A_log2[j][n][lane] = a->A[channel * d_state + n] * LOG2E; /* exp(delta A) = 2^(delta A log2 e) */
                if (a->initial_state) h[j][n][lane] = a->initial_state[(item * a->d_inner + channel) * d_state + n];
            }
        }
    }
    int64_t d_first = first * LANES, d_end = (first + count) * LANES < a->d_inner ? (first + count) * LANES : a->d_inner;
    for (int64_t t0 = start; t0 < end; t0 += TILE_TOKENS) {
        int64_t t1 = end - t0 < TILE_TOKENS ? end : t0 + TILE_TOKENS;
        /* Ask for the next tile's rows now: a walk down a tile touches a new page every few tokens, where
           the hardware's prefetchers stop, so its misses would otherwise come one after the other. */
        int64_t next_end = end - t1 < TILE_TOKENS ? end : t1 + TILE_TOKENS;
        for (int64_t t = t1; t < next_end; t++) {
            prefetch_row(a->x, b, t, d_first, d_end, bf16);
            prefetch_row(a->dt, b, t, d_first, d_end, bf16);
            if (a->z.data) prefetch_row(a->z, b, t, d_first, d_end, bf16);
            prefetch_row(a->B, b, t, 0, d_state, bf16);
            prefetch_row(a->C, b, t, 0, d_state, bf16);
        }
        /* fp32 B and C are read in place; bf16 ones are widened once a tile for the whole group. */
        const float *B = (const float *)a->B.data + seq_offset(a->B, b, t0);
        const float *C = (const float *)a->C.data + seq_offset(a->C, b, t0);
        int64_t b_stride = a->B.time_stride, c_stride = a->C.time_stride;
        if (bf16) {
            for (int64_t t = t0; t < t1; t++)
                for (int64_t n = 0; n < d_state; n++) {
                    B_wide[(t - t0) * d_state + n] = seq_scalar(a->B, b, t, n, 1);
                    C_wide[(t - t0) * d_state + n] = seq_scalar(a->C, b, t, n, 1);
                }
            B = B_wide;
            C = C_wide;
            b_stride = c_stride = d_state;
        }
        for (int64_t j = 0; j < count; j++) {
            int64_t d0 = (first + j) * LANES;
            int width = block_width(a, d0);
            if (width == LANES) scan_tile(a, b, d0, LANES, t0, t1, h[j], A_log2[j], B, C, b_stride, c_stride, d_state, bf16);
            else scan_tile(a, b, d0, width, t0, t1, h[j], A_log2[j], B, C, b_stride, c_stride, d_state, bf16);
        }
    }
    if (a->final_state) {
        for (int64_t j = 0; j < count; j++) {
            int64_t d0 = (first + j) * LANES;
            int width = block_width(a, d0);
            for (int64_t n = 0; n < d_state; n++)
                for (int lane = 0; lane < width; lane++)
                    a->final_state[(item * a->d_inner + d0 + lane) * d_state + n] = h[j][n][lane];
        }
    }
}

/* Literal arguments let the compiler specialise the inlined body: N = 16 and the element type. */
static void scan_group_n16(const ScanArgs *a, int64_t item, int64_t first, int64_t count) {
    scan_group(a, item, first, count, 16, 0);
}

static void scan_group_n16_bf16(const ScanArgs *a, int64_t item, int64_t first, int64_t count) {
    scan_group(a, item, first, count, 16, 1);
}

static void scan_group_any_n(const ScanArgs *a, int64_t item, int64_t first, int64_t count) {
    if (a->bf16) scan_group(a, item, first, count, a->d_state, 1);
    else scan_group(a, item, first, count, a->d_state, 0);
}

/* Entry point for ctypes. The (sequence, group of blocks) units are independent and shared out to
   OpenMP threads; n_threads 1 runs them on the calling thread without entering a parallel region. */
void selective_scan_fwd(const ScanArgs *args, int n_threads) {
    void (*group)(const ScanArgs *, int64_t, int64_t, int64_t) = scan_group_any_n;
    if (args->d_state == 16) group = args->bf16 ? scan_group_n16_bf16 : scan_group_n16;
    int64_t items = args->cu_seqlens ? args->n_seqs : args->batch;
    int64_t blocks = (args->d_inner + LANES - 1) / LANES;
    int64_t groups = (blocks + GROUP_BLOCKS - 1) / GROUP_BLOCKS;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1) if (n_threads > 1)
    for (int64_t i = 0; i < items * groups; i++) {
        int64_t first = (i % groups) * GROUP_BLOCKS;
        group(args, i / groups, first, blocks - first < GROUP_BLOCKS ? blocks - first : GROUP_BLOCKS);
    }
}
