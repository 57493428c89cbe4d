/*
 * Depthwise causal convolution over time, channels last, with bias and SiLU fused, forward only,
 * fp32, for CPUs: the compiled kernel behind ops/cpu.py (see causal_conv1d_reference).
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
    const float *initial_state;             /* (B, K - 1, C) contiguous: the inputs before x; NULL for zeros */
    float *y;                               /* (B, L, C) contiguous */
} ConvArgs;

/* The input row at time t of batch row b (t < 0 reads the carried state), or NULL where it is zero. */
static const float *input_row(const ConvArgs *a, int64_t b, int64_t t) {
    if (t >= 0) return seq_at(a->x, b, t);
    if (!a->initial_state) return NULL;
    return a->initial_state + (b * (a->width - 1) + a->width - 1 + t) * a->channels;
}

/* y_t for channels [c0, c0 + lanes). Inlined with literal lanes and width, the taps unroll and
   every load is one full vector. */
static inline __attribute__((always_inline)) void conv_channels(const ConvArgs *a, const float *const *rows, float *y,
                                                                int64_t c0, int lanes, const int64_t width) {
    vf out = a->bias ? load(a->bias + c0, lanes) : broadcast(0.0f);
    for (int64_t k = 0; k < width; k++)
        if (rows[k]) out += load(a->weight + k * a->channels + c0, lanes) * load(rows[k] + c0, lanes);
    store(y + c0, a->silu ? silu_vec(out) : out, lanes);
}

static inline __attribute__((always_inline)) void conv_span(const ConvArgs *a, int64_t b, int64_t start, int64_t end,
                                                            const int64_t width) {
    const float *rows[width]; /* rows[k]: x_{t - K + 1 + k}; rows[K - 1] is x_t */
    for (int64_t t = start; t < end; t++) {
        for (int64_t k = 0; k < width; k++) rows[k] = input_row(a, b, t - width + 1 + k);
        float *y = a->y + (b * a->length + t) * a->channels;
        int64_t c0 = 0;
        for (; c0 + LANES <= a->channels; c0 += LANES) conv_channels(a, rows, y, c0, LANES, width);
        if (c0 < a->channels) conv_channels(a, rows, y, c0, (int)(a->channels - c0), width);
    }
}

/* Entry point for ctypes. */
void causal_conv1d_fwd(const ConvArgs *args, int n_threads) {
    int64_t spans_per_row = (args->length + SPAN - 1) / SPAN;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < args->batch * spans_per_row; i++) {
        int64_t b = i / spans_per_row, start = (i % spans_per_row) * SPAN;
        int64_t end = start + SPAN < args->length ? start + SPAN : args->length;
        if (args->width == 4) conv_span(args, b, start, end, 4); /* every released Mamba */
        else conv_span(args, b, start, end, args->width);
    }
}
