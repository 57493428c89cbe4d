/*
 * Depthwise causal convolution over time, channels last, with bias and SiLU fused, forward only,
 * for CPUs: the compiled kernel behind ops/cpu.py (see causal_conv1d_reference). x, the carried
 * state and y are all fp32 or all bf16; weights, bias and the arithmetic are fp32.
 *
 *     y_t = silu(bias + sum_k weight[k] * x_{t - K + 1 + k})      for k = 0 .. K - 1
 *
 * The loop walks time outside and channels inside, LANES channels to a vector, so that x is read in
 * the order it lies in memory (a little faster than walking each channel block down the sequence,
 * where every token is a new, far-away row). The K - 1 rows before x_t were just read and come
 * from cache. Threads take (batch row, span of tokens) items.
 *
 * A packed batch (`cu_seqlens` set, batch 1) holds n sequences end to end (sequence s is tokens
 * cu_seqlens[s] .. cu_seqlens[s + 1] - 1): no sequence reads the tokens of the one before it, and
 * the items are (sequence, span of its tokens).
 */

#include "kernels.h"

/* Tokens per work item: enough items to keep every thread busy, few enough to cost nothing to hand out. */
#define SPAN 32

/* Element offset of input row t of batch row b in x, or (t < start, the first token of the sequence)
   in the carried state; -1 where it is zero. Packed sequences carry no state. */
static int64_t input_row(const ConvArgs *a, int64_t b, int64_t start, int64_t t, const void **data) {
    if (t >= start) {
        *data = a->x.data;
        return seq_offset(a->x, b, t);
    }
    if (a->cu_seqlens) return -1;
    *data = a->initial_state;
    if (!a->initial_state) return -1;
    return (b * (a->width - 1) + a->width - 1 + t) * a->channels;
}

/* y_t for channels [c0, c0 + lanes). Inlined with literal lanes, width and element type, the taps
   unroll and every load is one full vector. */
static inline __attribute__((always_inline)) void conv_channels(const ConvArgs *a, const void *const *rows,
                                                                const int64_t *offsets, int64_t y_index, int64_t c0,
                                                                int lanes, const int64_t width, const int bf16) {
    vf out = a->bias ? load(a->bias + c0, lanes) : broadcast(0.0f);
    for (int64_t k = 0; k < width; k++)
        if (offsets[k] >= 0)
            out += load(a->weight + k * a->channels + c0, lanes) * load_as(rows[k], offsets[k] + c0, lanes, bf16);
    store_as(a->y, y_index + c0, a->silu ? silu_vec(out) : out, lanes, bf16);
}

/* Tokens [start, end) of batch row b, whose sequence begins at token `first`. */
static inline __attribute__((always_inline)) void conv_span(const ConvArgs *a, int64_t b, int64_t first, int64_t start,
                                                            int64_t end, const int64_t width, const int bf16) {
    /* Tap k reads x_{t - K + 1 + k} (k = K - 1 is x_t): element offsets[k] of rows[k]. */
    const void *rows[width];
    int64_t offsets[width];
    for (int64_t t = start; t < end; t++) {
        for (int64_t k = 0; k < width; k++) offsets[k] = input_row(a, b, first, t - width + 1 + k, &rows[k]);
        int64_t y_index = (b * a->length + t) * a->channels;
        int64_t c0 = 0;
        for (; c0 + LANES <= a->channels; c0 += LANES)
            conv_channels(a, rows, offsets, y_index, c0, LANES, width, bf16);
        if (c0 < a->channels) conv_channels(a, rows, offsets, y_index, c0, (int)(a->channels - c0), width, bf16);
    }
}

/* Entry point for ctypes. */
void causal_conv1d_fwd(const ConvArgs *args, int n_threads) {
    /* Items: (batch row or packed sequence, span); a packed batch gives each sequence as many spans as
       the longest needs, and the spans past a shorter one's end are empty. */
    int64_t items = args->batch, longest = args->length;
    if (args->cu_seqlens) {
        items = args->n_seqs;
        longest = 0;
        for (int64_t s = 0; s < items; s++)
            if (args->cu_seqlens[s + 1] - args->cu_seqlens[s] > longest) longest = args->cu_seqlens[s + 1] - args->cu_seqlens[s];
    }
    int64_t spans_per_item = (longest + SPAN - 1) / SPAN;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1) if (n_threads > 1)
    for (int64_t i = 0; i < items * spans_per_item; i++) {
        int64_t item = i / spans_per_item, b = item, first = 0, last = args->length;
        if (args->cu_seqlens) {
            b = 0;
            first = args->cu_seqlens[item];
            last = args->cu_seqlens[item + 1];
        }
        int64_t start = first + (i % spans_per_item) * SPAN;
        int64_t end = start + SPAN < last ? start + SPAN : last;
        if (args->width == 4 && args->bf16) conv_span(args, b, first, start, end, 4, 1); /* every released Mamba */
        else if (args->width == 4) conv_span(args, b, first, start, end, 4, 0);
        else if (args->bf16) conv_span(args, b, first, start, end, args->width, 1);
        else conv_span(args, b, first, start, end, args->width, 0);
    }
}
