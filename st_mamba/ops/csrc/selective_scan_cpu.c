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
 * vector. The N states of those channels are carried while the loop walks the whole sequence, so
 * every input is read once and the (B, L, Di, N) tensor of the textbook form never exists. Blocks
 * of (batch row, LANES channels) are independent and are shared out to OpenMP threads.
 *
 * A packed batch (`cu_seqlens` set, batch 1) holds n sequences end to end: sequence s is tokens
 * cu_seqlens[s] .. cu_seqlens[s + 1] - 1, starts from its own state (row s of initial_state) and
 * leaves its own final state; the blocks are then (sequence, LANES channels).
 */

#include "vector_math.h"

typedef struct {
    int64_t batch, length, d_inner, d_state;
    Seq x, dt, z, B, C;      /* z.data may be NULL: no gate */
    const float *A;          /* (Di, N) contiguous */
    const float *D;          /* (Di,) or NULL */
    const float *dt_bias;    /* (Di,) or NULL */
    int dt_softplus;
    int bf16;                /* x, dt, z, B, C and y hold bf16 (else fp32) */
    const float *initial_state; /* (B, Di, N) contiguous, or NULL for zeros; (n, Di, N) when packed */
    void *y;                 /* (B, L, Di) contiguous */
    float *final_state;      /* (B, Di, N) contiguous, or NULL; (n, Di, N) when packed */
    const int32_t *cu_seqlens; /* (n + 1,) sequence bounds of a packed batch (B = 1), or NULL */
    int64_t n_seqs;          /* n: the number of packed sequences (unused when cu_seqlens is NULL) */
} ScanArgs;

/*
 * The whole sequence `item` (a batch row, or a packed sequence) for channels [d0, d0 + width). Inlined with a literal
 * d_state (16, the released Mamba-1 models) the state loop unrolls; with a run-time d_state the
 * same code serves any N. About 11 multiply-class vector instructions per state and token, most
 * of them the exp: the loop runs near that bound. `bf16` (a literal too) picks the element type.
 */
static inline __attribute__((always_inline)) void scan_block(const ScanArgs *a, int64_t item, int64_t d0, int width,
                                                             const int64_t d_state, const int bf16) {
    /* Batch row b, tokens [start, end); `item` also indexes the states. */
    int64_t b = item, start = 0, end = a->length;
    if (a->cu_seqlens) {
        b = 0;
        start = a->cu_seqlens[item];
        end = a->cu_seqlens[item + 1];
    }
    vf h[d_state], A_log2[d_state];
    float B_wide[d_state], C_wide[d_state]; /* one token's B and C, when they arrive as bf16 */
    for (int64_t n = 0; n < d_state; n++) {
        h[n] = broadcast(0.0f);
        A_log2[n] = broadcast(0.0f);
        for (int lane = 0; lane < width; lane++) {
            int64_t channel = d0 + lane;
            A_log2[n][lane] = a->A[channel * d_state + n] * LOG2E; /* exp(delta A) = 2^(delta A log2 e) */
            if (a->initial_state) h[n][lane] = a->initial_state[(item * a->d_inner + channel) * d_state + n];
        }
    }
    vf D = a->D ? load(a->D + d0, width) : broadcast(0.0f);
    vf dt_bias = a->dt_bias ? load(a->dt_bias + d0, width) : broadcast(0.0f);
    int64_t y_row = b * a->length * a->d_inner + d0;

    for (int64_t t = start; t < end; t++) {
        vf delta = seq_load(a->dt, b, t, d0, width, bf16) + dt_bias;
        if (a->dt_softplus) delta = softplus_vec(delta);
        vf x = seq_load(a->x, b, t, d0, width, bf16);
        vf delta_x = delta * x;
        /* fp32 B and C are read in place; bf16 ones are widened into B_wide and C_wide first. */
        const float *B = B_wide, *C = C_wide;
        if (bf16) {
            for (int64_t n = 0; n < d_state; n++) {
                B_wide[n] = seq_scalar(a->B, b, t, n, 1);
                C_wide[n] = seq_scalar(a->C, b, t, n, 1);
            }
        } else {
            B = (const float *)a->B.data + seq_offset(a->B, b, t);
            C = (const float *)a->C.data + seq_offset(a->C, b, t);
        }
        vf out = D * x;
#pragma GCC unroll 16
        for (int64_t n = 0; n < d_state; n++) {
            h[n] = exp2_vec(delta * A_log2[n]) * h[n] + delta_x * B[n];
            out += h[n] * C[n];
        }
        if (a->z.data) out *= silu_vec(seq_load(a->z, b, t, d0, width, bf16));
        store_as(a->y, y_row + t * a->d_inner, out, width, bf16);
    }

    if (a->final_state) {
        for (int64_t n = 0; n < d_state; n++)
            for (int lane = 0; lane < width; lane++)
                a->final_state[(item * a->d_inner + d0 + lane) * d_state + n] = h[n][lane];
    }
}

/* Literal arguments let the compiler specialise the inlined body: N = 16, a full vector of channels,
   and the element type. */
static void scan_block_n16(const void *args, int64_t item, int64_t d0, int width) {
    if (width == LANES) scan_block(args, item, d0, LANES, 16, 0);
    else scan_block(args, item, d0, width, 16, 0);
}

static void scan_block_n16_bf16(const void *args, int64_t item, int64_t d0, int width) {
    if (width == LANES) scan_block(args, item, d0, LANES, 16, 1);
    else scan_block(args, item, d0, width, 16, 1);
}

static void scan_block_any_n(const void *args, int64_t item, int64_t d0, int width) {
    const ScanArgs *a = args;
    if (a->bf16) scan_block(a, item, d0, width, a->d_state, 1);
    else scan_block(a, item, d0, width, a->d_state, 0);
}

/* Entry point for ctypes. */
void selective_scan_fwd(const ScanArgs *args, int n_threads) {
    BlockFn block = scan_block_any_n;
    if (args->d_state == 16) block = args->bf16 ? scan_block_n16_bf16 : scan_block_n16;
    for_each_block(block, args, args->cu_seqlens ? args->n_seqs : args->batch, args->d_inner, n_threads);
}
