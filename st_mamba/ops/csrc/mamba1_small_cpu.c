/*
 * A whole Mamba-1 backbone (after the embedding lookup) for a small batch, in one call: the query path on
 * CPUs. For a query of a dozen tokens every op of the layer-by-layer forward is small, and the time goes
 * to what surrounds them: some 25 PyTorch ops and two ctypes calls a layer, each with its dispatch,
 * allocation and checks. Here every layer is
 *
 *     h     = residual                                          (B, L, D)
 *     x, z  = rmsnorm(h) @ in_proj                              (B, L, Di) each
 *     x     = silu(causal_conv1d(x))
 *     dt, B, C = x @ x_proj;  dt = dt @ dt_proj                 (the scan adds dt's bias)
 *     y     = selective_scan(x, dt, A, B, C, D, z)
 *     residual = h + y @ out_proj
 *
 * and the final RMSNorm follows. The convolution and the scan are the library's own kernels
 * (causal_conv1d_fwd, selective_scan_fwd); the norms and the matrix products are below. Everything between
 * them stays in fp32 buffers of this call; in a bf16 model the residual stream is rounded to bf16 after every
 * layer, as the layer-by-layer forward rounds it, and the weights are read as bf16.
 *
 * The products are small (rows = tokens). `out = in @ w` reads w (K, N) in panels of GEMM_COLS outputs:
 * panel p holds columns [p GEMM_COLS, (p + 1) GEMM_COLS) of every row k, contiguous (K, GEMM_COLS), the
 * last one padded with zeros. A panel is read from start to end, and each of its vectors serves GEMM_ROWS
 * tokens, each with its input broadcast. (Read in place from the (K, N) matrix, a panel's rows lay N
 * elements apart, 4 KB for in_proj in fp32, all on the same few sets of the L1 cache: that ran 1.7-1.8x slower.)
 */

#include <math.h>
#include <stdlib.h>

#include "kernels.h"

/* The projections' weights are in panels (see `gemm`): in_proj's (2 Di, D) weight as ceil(2 Di / GEMM_COLS)
   panels of (D, GEMM_COLS), and so on; bf16 or fp32 as the model. */
typedef struct {
    const float *norm;      /* (D,): the block's RMSNorm weight */
    const void *in_proj;    /* panels of (D, 2 Di) */
    const float *in_bias;   /* (2 Di,) or NULL */
    const float *conv;      /* (K, Di): the convolution's taps, a row of channels a tap */
    const float *conv_bias; /* (Di,) or NULL */
    const void *x_proj;     /* panels of (Di, R + 2 N) */
    const void *dt_proj;    /* panels of (R, Di) */
    const float *dt_bias;   /* (Di,) */
    const float *A;         /* (Di, N): -exp(A_log) */
    const float *D;         /* (Di,) */
    const void *out_proj;   /* panels of (Di, D) */
    const float *out_bias;  /* (D,) or NULL */
} LayerWeights;

typedef struct {
    int64_t batch, length, d_model, d_inner, d_state, dt_rank, d_conv, n_layer;
    const LayerWeights *layers; /* n_layer of them */
    const float *norm_f;        /* (D,): the final RMSNorm's weight */
    float eps;
    int bf16;                   /* the model's dtype: weights, embeddings and output in bf16 (else fp32) */
    const void *embedded;       /* (B, L, D) contiguous: the token embeddings */
    void *out;                  /* (B, L, D) contiguous: the final norm's output */
    const int32_t *cu_seqlens;  /* (n + 1,) sequence bounds of a packed batch (B = 1), or NULL */
    int64_t n_seqs;             /* n (unused when cu_seqlens is NULL) */
} SmallForwardArgs;

/* Tokens that share each vector of weights. In fp32 on one AMD Zen 4 core, for in_proj of 11 to 64 tokens: 6 rows
   93-102 GFLOP/s (its FMA peak is about 100), 4 rows 52-57, 8 rows 71-103. */
#define GEMM_ROWS 6
#define GEMM_COLS (2 * LANES) /* outputs a program of the product accumulates: two vectors a token */

/* With AVX512-BF16 a bf16 model's products run on its dot-product instruction, which multiplies pairs of bf16
   and adds both products to an fp32 lane: twice the multiplies of an fp32 FMA. Its panels then hold each
   output's weights for inputs k and k + 1 side by side, (ceil(K / 2), GEMM_COLS, 2), and the inputs are
   rounded to bf16 (as the layer-by-layer forward of a bf16 model rounds them). */
#if defined(__AVX512BF16__) && LANES == 16
#define BF16_PAIRS 1
#else
#define BF16_PAIRS 0
#endif

typedef uint16_t vh_unaligned __attribute__((vector_size(LANES * sizeof(uint16_t)), aligned(sizeof(uint16_t))));

/* LANES weights at element `index`, as fp32. */
static inline vf load_weights(const void *w, int64_t index, const int bf16) {
    if (bf16) return (vf)(__builtin_convertvector(*(const vh_unaligned *)((const uint16_t *)w + index), vu) << 16);
    return *(const vf_unaligned *)((const float *)w + index);
}

/* The bf16 nearest to `v` (ties to even, as PyTorch rounds; NaN stays a quiet NaN), as its bits. */
static inline uint16_t bf16_bits(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    if (v != v) return 0x7fc0u;
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* That bf16 as an fp32. */
static inline float round_bf16(float v) { return scalar_bf16(bf16_bits(v)); }

/* Stores rows [t0, t0 + GEMM_ROWS) of columns [n0, n0 + w0 + w1): the sums `acc`, plus bias, plus what
   `out` held when `accumulate`. */
static inline void store_rows(vf acc[GEMM_ROWS][2], int64_t rows, int64_t t0, const float *bias, float *out,
                              int64_t out_stride, int accumulate, int64_t n0, int w0, int w1) {
    for (int r = 0; r < GEMM_ROWS && t0 + r < rows; r++) {
        float *o = out + (t0 + r) * out_stride + n0;
        vf v0 = acc[r][0], v1 = acc[r][1];
        if (bias) {
            v0 += load(bias + n0, w0);
            if (w1 > 0) v1 += load(bias + n0 + LANES, w1);
        }
        if (accumulate) {
            v0 += load(o, w0);
            if (w1 > 0) v1 += load(o + LANES, w1);
        }
        store(o, v0, w0);
        if (w1 > 0) store(o + LANES, v1, w1);
    }
}

/* Columns [n0, n0 + w0 + w1) of out = in @ w (+ bias) (+ out when `accumulate`), for every row, from the
   panel that starts at element `panel` of w. */
static inline __attribute__((always_inline)) void gemm_columns(int64_t rows, int64_t k_size, const float *in,
                                                               int64_t in_stride, const void *w, int64_t panel,
                                                               const float *bias, float *out, int64_t out_stride,
                                                               int accumulate, int64_t n0, int w0, int w1,
                                                               const int bf16) {
    for (int64_t t0 = 0; t0 < rows; t0 += GEMM_ROWS) {
        /* A last block of fewer rows repeats its last row; only the real rows are stored. */
        const float *row[GEMM_ROWS];
        for (int r = 0; r < GEMM_ROWS; r++) row[r] = in + (t0 + r < rows ? t0 + r : rows - 1) * in_stride;
        vf acc[GEMM_ROWS][2] = {};
        for (int64_t k = 0; k < k_size; k++) {
            vf b0 = load_weights(w, panel + k * GEMM_COLS, bf16);
            vf b1 = load_weights(w, panel + k * GEMM_COLS + LANES, bf16);
            for (int r = 0; r < GEMM_ROWS; r++) {
                vf a = broadcast(row[r][k]);
                acc[r][0] += a * b0;
                acc[r][1] += a * b1;
            }
        }
        store_rows(acc, rows, t0, bias, out, out_stride, accumulate, n0, w0, w1);
    }
}

#if BF16_PAIRS
/* gemm_columns for bf16 panels of pairs; `pairs` holds each row's inputs as bf16 pairs, `pair_count` a row. */
static void gemm_columns_pairs(int64_t rows, int64_t pair_count, const uint32_t *pairs, const uint16_t *w,
                               int64_t panel, const float *bias, float *out, int64_t out_stride, int accumulate,
                               int64_t n0, int w0, int w1) {
    for (int64_t t0 = 0; t0 < rows; t0 += GEMM_ROWS) {
        const uint32_t *row[GEMM_ROWS];
        for (int r = 0; r < GEMM_ROWS; r++) row[r] = pairs + (t0 + r < rows ? t0 + r : rows - 1) * pair_count;
        __m512 acc[GEMM_ROWS][2];
        for (int r = 0; r < GEMM_ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int64_t k = 0; k < pair_count; k++) {
            const uint16_t *p = w + panel + k * GEMM_COLS * 2;
            __m512bh b0 = (__m512bh)_mm512_loadu_si512(p), b1 = (__m512bh)_mm512_loadu_si512(p + 2 * LANES);
            for (int r = 0; r < GEMM_ROWS; r++) {
                __m512bh a = (__m512bh)_mm512_set1_epi32((int)row[r][k]);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
            }
        }
        vf sums[GEMM_ROWS][2];
        for (int r = 0; r < GEMM_ROWS; r++) {
            sums[r][0] = (vf)acc[r][0];
            sums[r][1] = (vf)acc[r][1];
        }
        store_rows(sums, rows, t0, bias, out, out_stride, accumulate, n0, w0, w1);
    }
}
#endif

/* out (rows, N) = in (rows, K) @ w (K, N, in panels) (+ bias) (+ out when `accumulate`); in and out are fp32
   rows with the given strides, w is bf16 or fp32. `scratch` holds rows x ceil(K / 2) pairs of bf16 inputs
   (used with BF16_PAIRS). Threads take panels. */
static void gemm(int64_t rows, int64_t k_size, int64_t n_size, const float *in, int64_t in_stride, const void *w,
                 const float *bias, float *out, int64_t out_stride, int accumulate, int bf16, uint32_t *scratch,
                 int n_threads) {
    int64_t blocks = (n_size + GEMM_COLS - 1) / GEMM_COLS, pair_count = (k_size + 1) / 2;
    if (BF16_PAIRS && bf16)
        for (int64_t t = 0; t < rows; t++) {
            /* A row of bf16 inputs in order is its pairs (k even in the low half); an odd K gets a zero. */
            uint16_t *halves = (uint16_t *)(scratch + t * pair_count);
            const float *x = in + t * in_stride;
            for (int64_t k = 0; k < k_size; k += LANES) {
                int width = k_size - k < LANES ? (int)(k_size - k) : LANES;
                store_bf16(halves + k, load(x + k, width), width);
            }
            if (k_size % 2) halves[k_size] = 0;
        }
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t i = 0; i < blocks; i++) {
        int64_t n0 = i * GEMM_COLS, left = n_size - n0;
        int w0 = left < LANES ? (int)left : LANES;
        int w1 = left - LANES <= 0 ? 0 : (left - LANES < LANES ? (int)(left - LANES) : LANES);
#if BF16_PAIRS
        if (bf16) {
            int64_t panel = i * pair_count * 2 * GEMM_COLS;
            gemm_columns_pairs(rows, pair_count, scratch, w, panel, bias, out, out_stride, accumulate, n0, w0, w1);
            continue;
        }
#endif
        int64_t panel = i * k_size * GEMM_COLS;
        if (bf16) gemm_columns(rows, k_size, in, in_stride, w, panel, bias, out, out_stride, accumulate, n0, w0, w1, 1);
        else gemm_columns(rows, k_size, in, in_stride, w, panel, bias, out, out_stride, accumulate, n0, w0, w1, 0);
    }
}

/* out = weight * (x / rms(x)) row by row, in fp32; with `bf16` the two products are rounded to bf16 as
   the model's RMSNorm rounds them in a bf16 model. */
static void rms_norm(int64_t rows, int64_t width, const float *in, const float *weight, float eps, int bf16,
                     float *out) {
    for (int64_t t = 0; t < rows; t++) {
        const float *x = in + t * width;
        float *o = out + t * width;
        float squares = 0.0f;
        for (int64_t c = 0; c < width; c++) squares += x[c] * x[c];
        float scale = 1.0f / sqrtf(squares / (float)width + eps);
        for (int64_t c = 0; c < width; c++)
            o[c] = bf16 ? round_bf16(weight[c] * round_bf16(x[c] * scale)) : weight[c] * (x[c] * scale);
    }
}

/* Entry point for ctypes: 0, or -1 when the buffers could not be allocated (nothing written). */
int mamba1_forward_small(const SmallForwardArgs *a, int n_threads) {
    const int64_t rows = a->batch * a->length, D = a->d_model, Di = a->d_inner, N = a->d_state, R = a->dt_rank;
    if (rows == 0) return 0;
    const int64_t xz_width = 2 * Di, dbc_width = R + 2 * N, widest_input = D > Di ? D : Di;
    /* fp32 buffers, then the bf16 pairs of a product's input (4 bytes a pair, as many as an fp32 row holds) */
    float *buffer = malloc(sizeof(float) * (size_t)(rows * (2 * D + xz_width + 3 * Di + dbc_width + widest_input)));
    if (!buffer) return -1;
    float *residual = buffer, *normed = residual + rows * D, *xz = normed + rows * D, *xc = xz + rows * xz_width;
    float *dbc = xc + rows * Di, *dt = dbc + rows * dbc_width, *y = dt + rows * Di;
    uint32_t *pairs = (uint32_t *)(y + rows * Di);

    for (int64_t i = 0; i < rows * D; i++)
        residual[i] = a->bf16 ? scalar_bf16(((const uint16_t *)a->embedded)[i]) : ((const float *)a->embedded)[i];
    ConvArgs conv = {
        .batch = a->batch, .length = a->length, .channels = Di, .width = a->d_conv,
        .x = {xz, a->length * xz_width, xz_width}, .silu = 1, .bf16 = 0, .initial_state = NULL, .y = xc,
        .cu_seqlens = a->cu_seqlens, .n_seqs = a->n_seqs,
    };
    ScanArgs scan = {
        .batch = a->batch, .length = a->length, .d_inner = Di, .d_state = N,
        .x = {xc, a->length * Di, Di}, .dt = {dt, a->length * Di, Di}, .z = {xz + Di, a->length * xz_width, xz_width},
        .B = {dbc + R, a->length * dbc_width, dbc_width}, .C = {dbc + R + N, a->length * dbc_width, dbc_width},
        .dt_softplus = 1, .bf16 = 0, .initial_state = NULL, .y = y, .final_state = NULL,
        .cu_seqlens = a->cu_seqlens, .n_seqs = a->n_seqs,
    };
    for (int64_t l = 0; l < a->n_layer; l++) {
        const LayerWeights *w = &a->layers[l];
        rms_norm(rows, D, residual, w->norm, a->eps, a->bf16, normed);
        gemm(rows, D, xz_width, normed, D, w->in_proj, w->in_bias, xz, xz_width, 0, a->bf16, pairs, n_threads);
        conv.weight = w->conv;
        conv.bias = w->conv_bias;
        causal_conv1d_fwd(&conv, n_threads);
        gemm(rows, Di, dbc_width, xc, Di, w->x_proj, NULL, dbc, dbc_width, 0, a->bf16, pairs, n_threads);
        gemm(rows, R, Di, dbc, dbc_width, w->dt_proj, NULL, dt, Di, 0, a->bf16, pairs, n_threads);
        scan.A = w->A;
        scan.D = w->D;
        scan.dt_bias = w->dt_bias;
        selective_scan_fwd(&scan, n_threads);
        gemm(rows, Di, D, y, Di, w->out_proj, w->out_bias, residual, D, 1, a->bf16, pairs, n_threads);
        if (a->bf16)
            for (int64_t i = 0; i < rows * D; i++) residual[i] = round_bf16(residual[i]);
    }
    rms_norm(rows, D, residual, a->norm_f, a->eps, a->bf16, normed);
    for (int64_t i = 0; i < rows * D; i++) {
        if (a->bf16) ((uint16_t *)a->out)[i] = bf16_bits(normed[i]);
        else ((float *)a->out)[i] = normed[i];
    }
    free(buffer);
    return 0;
}

/* Entry point for ctypes: the width of the projections' panels in this build. */
int mamba1_small_panel_width(void) { return GEMM_COLS; }

/* Entry point for ctypes: 1 where a bf16 model's panels hold pairs of inputs (BF16_PAIRS), else 0. */
int mamba1_small_bf16_pairs(void) { return BF16_PAIRS; }
