"""Launch shapes of the Triton causal convolution, timed on this GPU.

Two sets of constants: (tokens, channels) a program and warps of the forward kernel, which the
backward's second kernel (dx) shares; and (tokens, channels, warps, token blocks a program) of the
backward's first kernel (dpre, dweight, dbias). Each candidate is timed with the other set as
shipped, on mamba-130m and mamba-370m layer inputs (bf16, 65,536 tokens; x the strided half of the
in_proj output, as in the model), the candidates alternating round by round
(``ab_kernels.best_of_two``). The convolution is flat over tokens, so one length (512) stands for
all. The backward is timed as forward + backward minus the forward. The shipped pair is the first row.

    python benchmarks/kernel_dev/tune_conv.py
"""

from __future__ import annotations

import sys

import torch
from ab_kernels import LAYERS, TOKENS, best_of_two, conv_inputs  # this script's folder, first on sys.path

from st_mamba.ops import triton as kernels

FORWARD = [(32, 128, 4), (16, 128, 4), (64, 128, 4), (32, 256, 4), (32, 64, 4), (64, 64, 4)]
BACKWARD = [(16, 64, 4, 8), (16, 64, 4, 16), (16, 64, 4, 4), (32, 64, 4, 4), (16, 128, 4, 8), (16, 64, 2, 8), (8, 128, 4, 8)]  # fmt: skip


def shipped() -> tuple[tuple, tuple]:
    return (
        (kernels.CONV_BLOCK_T, kernels.CONV_BLOCK_C, kernels.CONV_WARPS),
        (kernels.CONV_BWD_BLOCK_T, kernels.CONV_BWD_BLOCK_C, kernels.CONV_BWD_WARPS, kernels.CONV_BWD_TILES),
    )


def use(forward: tuple, backward: tuple) -> None:
    kernels.CONV_BLOCK_T, kernels.CONV_BLOCK_C, kernels.CONV_WARPS = forward
    kernels.CONV_BWD_BLOCK_T, kernels.CONV_BWD_BLOCK_C, kernels.CONV_BWD_WARPS, kernels.CONV_BWD_TILES = backward


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("tune_conv.py needs a CUDA GPU")
    fwd0, bwd0 = shipped()
    pairs = list(dict.fromkeys([(fwd0, bwd0), *((f, bwd0) for f in FORWARD), *((fwd0, b) for b in BACKWARD)]))
    print(f"{torch.cuda.get_device_name()}: shipped forward {fwd0}, backward {bwd0}", flush=True)
    rows = []
    for shape, (d_inner, _, _) in LAYERS.items():
        *args, dy = conv_inputs(TOKENS // 512, 512, d_inner)
        leaves = [t.detach().requires_grad_() for t in args]
        settings = {pair: pair for pair in pairs}

        def forward(pair, args=args):
            use(*pair)
            return lambda: kernels.causal_conv1d_triton(*args)

        def train(pair, leaves=leaves, dy=dy):
            use(*pair)
            return lambda: torch.autograd.grad(kernels.causal_conv1d_triton(*leaves), leaves, dy)

        with torch.inference_mode():
            fwd = best_of_two(settings, forward, 9)
        both = best_of_two(settings, train, 7)
        for pair in pairs:
            rows.append((shape, pair, fwd[pair], both[pair] - fwd[pair]))
    use(fwd0, bwd0)
    print(f"\n{'layer':<6} {'forward, dx (T x C, warps)':<27} {'dpre, dweight (T x C, warps, blocks)':<37} "
          f"{'forward us':>10} {'backward us':>11}")  # fmt: skip
    for shape, ((ft, fc, fw), (bt, bc, bw, tiles)), f, b in rows:
        print(
            f"{shape:<6} {f'{ft} x {fc}, {fw}':<27} {f'{bt} x {bc}, {bw}, {tiles}':<37} {f * 1e3:>10.0f} {b * 1e3:>11.0f}"
        )


if __name__ == "__main__":
    main()
