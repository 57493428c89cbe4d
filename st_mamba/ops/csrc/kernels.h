/*
 * The argument structs of the compiled CPU kernels and their entry points, shared by the kernels'
 * files and by the fused small-batch forward (mamba1_small_cpu.c). ops/cpu.py mirrors the structs
 * with ctypes: field order and types must match.
 */

#ifndef ST_MAMBA_KERNELS_H
#define ST_MAMBA_KERNELS_H

#include "vector_math.h"

typedef struct {
    int64_t batch, length, channels, width; /* width: K, the kernel size */
    Seq x;                                  /* (B, L, C) */
    const float *weight;                    /* (K, C) contiguous: the transpose of the module's (C, K) */
    const float *bias;                      /* (C,) or NULL */
    int silu;
    int bf16;                               /* x, the carried state and y hold bf16 (else fp32) */
    const void *initial_state;              /* (B, K - 1, C) contiguous: the inputs before x; NULL for zeros */
    void *y;                                /* (B, L, C) contiguous */
    const int32_t *cu_seqlens;              /* (n + 1,) sequence bounds of a packed batch (B = 1), or NULL */
    int64_t n_seqs;                         /* n (unused when cu_seqlens is NULL) */
} ConvArgs;

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

void causal_conv1d_fwd(const ConvArgs *args, int n_threads);
void selective_scan_fwd(const ScanArgs *args, int n_threads);

#endif
