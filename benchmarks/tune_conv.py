"""Launch shapes of the Triton causal convolution, timed on this GPU: (tokens, channels) a program, warps.

The convolution is flat over tokens (65,536 a batch at any length), so one length stands for all.
For each candidate the forward kernel, then the two backward kernels, run with that shape on
mamba-130m and mamba-370m layer inputs (bf16; x the strided half of the in_proj output, as in the
model), the candidates alternating round by round (``ab_kernels.best_of_two``). The backward is timed
as forward + backward minus the forward. The shipped constants are the first row.

    python benchmarks/tune_conv.py
"""

from __future__ import annotations

import sys

import torch
from ab_kernels import LAYERS, TOKENS, best_of_two, conv_inputs  # benchmarks/ is first on sys.path

from st_mamba.ops import triton as kernels

CANDIDATES = [(32, 128, 4), (16, 128, 4), (64, 128, 4), (32, 256, 4), (32, 256, 8), (64, 256, 8), (64, 64, 4), (128, 128, 8)]  # fmt: skip


def use(block_t: int, block_c: int, warps: int) -> None:
    kernels.CONV_BLOCK_T, kernels.CONV_BLOCK_C, kernels.CONV_WARPS = block_t, block_c, warps
    kernels.CONV_BWD_BLOCK_T, kernels.CONV_BWD_BLOCK_C, kernels.CONV_BWD_WARPS = block_t, block_c, warps


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("tune_conv.py needs a CUDA GPU")
    shipped = (kernels.CONV_BLOCK_T, kernels.CONV_BLOCK_C, kernels.CONV_WARPS)
    shipped_bwd = (kernels.CONV_BWD_BLOCK_T, kernels.CONV_BWD_BLOCK_C, kernels.CONV_BWD_WARPS)
    candidates = list(dict.fromkeys([shipped, shipped_bwd, *CANDIDATES]))
    print(f"{torch.cuda.get_device_name()}: shipped forward {shipped}, backward {shipped_bwd}", flush=True)
    rows = []
    for shape, (d_inner, _, _) in LAYERS.items():
        *args, dy = conv_inputs(TOKENS // 512, 512, d_inner)
        leaves = [t.detach().requires_grad_() for t in args]
        settings = {c: c for c in candidates}

        def forward(c, args=args):
            use(*c)
            return lambda: kernels.causal_conv1d_triton(*args)

        def train(c, leaves=leaves, dy=dy):
            use(*c)
            return lambda: torch.autograd.grad(kernels.causal_conv1d_triton(*leaves), leaves, dy)

        with torch.inference_mode():
            fwd = best_of_two(settings, forward, 9)
        both = best_of_two(settings, train, 7)
        gigabytes = 2 * TOKENS * d_inner * 2 / 1e9  # x read, y written, bf16
        for c in candidates:
            rows.append((shape, c, fwd[c], both[c] - fwd[c], gigabytes / fwd[c]))
    use(*shipped)
    kernels.CONV_BWD_BLOCK_T, kernels.CONV_BWD_BLOCK_C, kernels.CONV_BWD_WARPS = shipped_bwd
    print(f"\n{'layer':<6} {'tokens x channels, warps':<26} {'forward us':>11} {'backward us':>12} {'fwd TB/s':>9}")
    for shape, (bt, bc, w), f, b, rate in rows:
        print(f"{shape:<6} {f'{bt} x {bc}, {w}':<26} {f * 1e3:>11.0f} {b * 1e3:>12.0f} {rate:>9.2f}")


if __name__ == "__main__":
    main()
