/*
 * Depthwise causal convolution over time, channels last, with bias and SiLU fused, forward only,
 * for CPUs: the compiled kernel behind ops/cpu.py (see causal_conv1d_reference). x and y are fp32
 * or bf16; weights, bias, the carried state and the arithmetic are fp32.
 *
 *     y_t = silu(bias + sum_k weight[k] * x_{t - K + 1 + k})      for k = 0 .. K - 1
 *
 * The loop walks time outside and channels inside, 16 channels to a vector, so that x is read in
 * the order it lies in memory (a little faster than walking each channel block down the sequence,
 * where every token is a new, far-away row). The K - 1 rows before x_t were just read and come
 * from cache. Threads take (batch row, span of tokens) items.
 */

#include "vector_math.h"

/* Tokens per work item: enough items to keep every thread busy, few enough to cost nothing to hand out. */
#define SPAN 32

typedef struct {
    int64_t batch, length, channels, width; /* width: K, the kernel size */
    Seq x;                                  /* (B, L, C) */
    const float *weight;                    /* (K, C) contiguous: the transpose of the module's (C, K) */
    const float *bias;                      /* (C,) or NULL */
    int silu;
    int bf16;                               /* x and y hold bf16 (else fp32) */
    const float *initial_state;             /* (B, K - 1, C) contiguous, fp32: the inputs before x; NULL for zeros */
    void *y;                                /* (B, L, C) contiguous */
} ConvArgs;

/* Where the taps read: row (b, t) of x, a row of the carried state (t < 0), or nothing (zeros). */
typedef struct {
    const void *data; /* the row's first channel, or NULL for zeros */
    int bf16;         /* a row of x in bf16; the carried state is always fp32 */
} Row;

static Row input_row(const ConvArgs *a, int64_t b, int64_t t) {
    if (t >= 0) {
        int64_t offset = seq_offset(a->x, b, t);
        if (a->bf16) return (Row){(const uint16_t *)a->x.data + offset, 1};
        return (Row){(const float *)a->x.data + offset, 0};
    }
    if (!a->initial_state) return (Row){NULL, 0};
    return (Row){a->initial_state + (b * (a->width - 1) + a->width - 1 + t) * a->channels, 0};
}

static inline vf row_load(Row row, int64_t c0, int lanes) {
    if (row.bf16) return load_bf16((const uint16_t *)row.data + c0, lanes);
    return load((const float *)row.data + c0, lanes);
}

/* y_t for channels [c0, c0 + lanes). Inlined with literal lanes, width and output type, the taps
   unroll and every load is one full vector. */
static inline __attribute__((always_inline)) void conv_channels(const ConvArgs *a, const Row *rows, int64_t y_index,
                                                                int64_t c0, int lanes, const int64_t width,
                                                                const int bf16) {
    vf out = a->bias ? load(a->bias + c0, lanes) : broadcast(0.0f);
    for (int64_t k = 0; k < width; k++)
        if (rows[k].data) out += load(a->weight + k * a->channels + c0, lanes) * row_load(rows[k], c0, lanes);
    store_as(a->y, y_index + c0, a->silu ? silu_vec(out) : out, lanes, bf16);
}

static inline __attribute__((always_inline)) void conv_span(const ConvArgs *a, int64_t b, int64_t start, int64_t end,
                                                            const int64_t width, const int bf16) {
    Row rows[width]; /* rows[k]: x_{t - K + 1 + k}; rows[K - 1] is x_t */
    for (int64_t t = start; t < end; t++) {
        for (int64_t k = 0; k < width; k++) rows[k] = input_row(a, b, t - width + 1 + k);
        int64_t y_index = (b * a->length + t) * a->channels;
        int64_t c0 = 0;
        for (; c0 + LANES <= a->channels; c0 += LANES) conv_channels(a, rows, y_index, c0, LANES, width, bf16);
        if (c0 < a->channels) conv_channels(a, rows, y_index, c0, (int)(a->channels - c0), width, bf16);
    }
}

/* Entry point for ctypes. */
void causal_conv1d_fwd(const ConvArgs *args, int n_threads) {
    int64_t spans_per_row = (args->length + SPAN - 1) / SPAN;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < args->batch * spans_per_row; i++) {
        int64_t b = i / spans_per_row, start = (i % spans_per_row) * SPAN;
        int64_t end = start + SPAN < args->length ? start + SPAN : args->length;
        if (args->width == 4 && args->bf16) conv_span(args, b, start, end, 4, 1); /* every released Mamba */
        else if (args->width == 4) conv_span(args, b, start, end, 4, 0);
        else if (args->bf16) conv_span(args, b, start, end, args->width, 1);
        else conv_span(args, b, start, end, args->width, 0);
    }
}
