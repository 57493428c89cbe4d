/*
 * What the CPU kernels share: a float vector type of one register's width, partial loads and stores (of fp32 and of
 * bf16, which is converted on the way in and out), exp, softplus and silu on whole vectors, the
 * strided (B, L, C) tensor they read, and the loop that shares (batch row, 16 channels) blocks out
 * to OpenMP threads.
 *
 * The vector type is GCC/Clang's vector extension, LANES floats: 16 (one register) with AVX-512, 8
 * with AVX/AVX2, 4 elsewhere (SSE, NEON). It must fit one register: the scan carries d_state
 * vectors of state, and 16 lanes split into two AVX2 registers each spilled them and made the scan
 * 5x and the convolution 7x slower than 8 lanes on an AVX2 build. exp, softplus and silu are
 * written here because the kernels need them on vectors, libm only has scalars, and libmvec
 * would tie the kernels to glibc. Build without -ffast-math: the rounding trick in exp2_vec must
 * not be reassociated away.
 */

#ifndef ST_MAMBA_VECTOR_MATH_H
#define ST_MAMBA_VECTOR_MATH_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef float vf_unaligned __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float))));
typedef uint32_t vu __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(LANES * sizeof(uint16_t))));

static const float LOG2E = 1.4426950408889634f;
/* 1.5 * 2^23: adding it rounds a float of magnitude < 2^22 to an integer held in the low mantissa bits. */
static const float ROUND_SHIFT = 12582912.0f;

static inline vf broadcast(float value) { return (vf){} + value; }

/* Lane-wise a where mask is set, else b. */
static inline vf select_vec(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* max and min that return a when a is NaN, so that NaN propagates. */
static inline vf max_vec(vf a, vf b) { return select_vec(a < b, b, a); }
static inline vf min_vec(vf a, vf b) { return select_vec(a > b, b, a); }

/* Reads `width` <= LANES floats; lanes past `width` are 0. */
static inline vf load(const float *p, int width) {
    if (width == LANES) return *(const vf_unaligned *)p;
    vf v = {};
    memcpy(&v, p, (size_t)width * sizeof(float));
    return v;
}

static inline void store(float *p, vf v, int width) {
    if (width == LANES) {
        *(vf_unaligned *)p = v;
        return;
    }
    memcpy(p, &v, (size_t)width * sizeof(float));
}

/* bf16 is the top half of an fp32: widening is a shift, exact. */
static inline vf load_bf16(const uint16_t *p, int width) {
    vh half = {};
    memcpy(&half, p, (size_t)width * sizeof(uint16_t));
    return (vf)(__builtin_convertvector(half, vu) << 16);
}

static inline float scalar_bf16(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* Rounds to the nearest bf16, ties to even (as PyTorch does); NaN stays a quiet NaN. */
static inline void store_bf16(uint16_t *p, vf v, int width) {
    vu bits = (vu)v;
    vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    vu nan = (vu)(v != v);
    rounded = (nan & 0x7fc0u) | (~nan & rounded);
    vh half = __builtin_convertvector(rounded, vh);
    memcpy(p, &half, (size_t)width * sizeof(uint16_t));
}

/*
 * 2^f for |f| <= 1/2: 1 + ln(2) f + c2 f^2 + ... + c5 f^5, the first two terms those of 2^f and
 * c2..c5 fitted for the least worst relative error (Lawson's reweighted least squares); 1.9e-7
 * evaluated in fp32. The constant is exactly 1 so that decays close to 1 (slow channels, small
 * dt) carry no bias: a relative bias of 1e-7 per token would compound over thousands of tokens.
 */
static inline vf exp2_fraction(vf f) {
    vf p = broadcast(1.3300234e-3f);
    p = p * f + 9.6696997e-3f;
    p = p * f + 5.5505600e-2f;
    p = p * f + 2.4022281e-1f;
    p = p * f + 0.69314718f;
    return p * f + 1.0f;
}

/* 2^w = 2^n * 2^f with n the integer nearest to w and |f| <= 1/2. */
static inline vf exp2_vec(vf w) {
#ifdef __AVX512F__
    /* One instruction rounds, one scales by 2^n with IEEE underflow to 0 and overflow to inf. */
    vf n = (vf)_mm512_roundscale_ps((__m512)w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return (vf)_mm512_scalef_ps((__m512)exp2_fraction(w - n), (__m512)n);
#else
    /* Clamped so that n + 127 stays a valid exponent: below -125.5 the result is about 1e-38
       instead of 0; above 127 the float range ends. */
    w = min_vec(max_vec(w, broadcast(-125.5f)), broadcast(127.0f));
    vf shifted = w + ROUND_SHIFT;
    vf n = shifted - ROUND_SHIFT;
    vi exponent = ((vi)shifted - (vi)broadcast(ROUND_SHIFT)) << 23;
    return (vf)((vi)exp2_fraction(w - n) + exponent);
#endif
}

static inline vf exp_vec(vf v) { return exp2_vec(v * LOG2E); }

/*
 * softplus(u) = max(u, 0) + log1p(exp(-|u|)), and log1p(q) = 2 atanh(s) with s = q / (2 + q)
 * <= 1/3, summed as an odd series to s^15 (relative error below 2e-9). Unlike
 * log(1 + exp(u)), this keeps full relative precision for u << 0, where dt is small.
 */
static inline vf softplus_vec(vf u) {
    vf abs_u = (vf)((vi)u & 0x7fffffff);
    vf q = exp_vec(-abs_u);
    vf s = q / (2.0f + q);
    vf s2 = s * s;
    vf series = broadcast(1.0f / 15.0f);
    series = series * s2 + 1.0f / 13.0f;
    series = series * s2 + 1.0f / 11.0f;
    series = series * s2 + 1.0f / 9.0f;
    series = series * s2 + 1.0f / 7.0f;
    series = series * s2 + 1.0f / 5.0f;
    series = series * s2 + 1.0f / 3.0f;
    series = series * s2 + 1.0f;
    return max_vec(u, broadcast(0.0f)) + 2.0f * s * series;
}

static inline vf silu_vec(vf z) { return z / (1.0f + exp_vec(-z)); }

/*
 * One (batch, length, channels) tensor: base pointer and strides in elements; channels have stride 1.
 * Its elements are fp32, or bf16 where the kernel's `bf16` flag says so: the accessors below take
 * that flag as an argument, so that each kernel, inlined with a literal flag, is compiled once for
 * fp32 and once for bf16 with no test in its inner loop.
 */
typedef struct {
    const void *data;
    int64_t batch_stride;
    int64_t time_stride;
} Seq;

static inline int64_t seq_offset(Seq s, int64_t b, int64_t t) { return b * s.batch_stride + t * s.time_stride; }

/* `width` values at element `index` of fp32 data, or of bf16 data when `bf16` is set, as fp32. */
static inline vf load_as(const void *data, int64_t index, int width, const int bf16) {
    if (bf16) return load_bf16((const uint16_t *)data + index, width);
    return load((const float *)data + index, width);
}

/* Channels [c0, c0 + width) of row (b, t), as fp32. */
static inline vf seq_load(Seq s, int64_t b, int64_t t, int64_t c0, int width, const int bf16) {
    return load_as(s.data, seq_offset(s, b, t) + c0, width, bf16);
}

/* Channel c of row (b, t), as fp32. */
static inline float seq_scalar(Seq s, int64_t b, int64_t t, int64_t c, const int bf16) {
    int64_t offset = seq_offset(s, b, t) + c;
    if (bf16) return scalar_bf16(((const uint16_t *)s.data)[offset]);
    return ((const float *)s.data)[offset];
}

/* Writes `width` values at element `index` of an output of fp32, or of bf16 (rounded) when `bf16` is set. */
static inline void store_as(void *out, int64_t index, vf v, int width, const int bf16) {
    if (bf16) store_bf16((uint16_t *)out + index, v, width);
    else store((float *)out + index, v, width);
}

/* Work on the whole of sequence `item` (a batch row or a packed sequence) for channels [c0, c0 + width),
   width <= LANES. */
typedef void (*BlockFn)(const void *args, int64_t item, int64_t c0, int width);

/* Runs `block` on every (sequence, LANES channels) block; blocks are independent. n_threads 1 runs
   them on the calling thread without entering a parallel region. */
static void for_each_block(BlockFn block, const void *args, int64_t items, int64_t channels, int n_threads) {
    int64_t blocks_per_item = (channels + LANES - 1) / LANES;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1) if (n_threads > 1)
    for (int64_t i = 0; i < items * blocks_per_item; i++) {
        int64_t item = i / blocks_per_item, c0 = (i % blocks_per_item) * LANES;
        block(args, item, c0, channels - c0 < LANES ? (int)(channels - c0) : LANES);
    }
}

#endif
