"""A/B of the Triton kernels' alignment hint (``st_mamba.ops.triton._aligned``), in one process on one GPU.

The mamba-130m shape, bf16, random weights, 65,536 tokens per batch in rows of 512, 8,192 and 32,768
tokens: forward milliseconds (best of two rounds of median-of-7 CUDA-event timings) with the hint as
the host computes it, and with the hint forced off. Which kernels take the hint is up to
``ops/triton.py``; docs/kernels.md says what each version measured.

    python benchmarks/kernel_dev/ab_aligned.py
"""

from __future__ import annotations

import torch
from ab_kernels import TOKENS, best_of_two  # this script's folder, first on sys.path

from st_mamba import MambaBackbone, MambaConfig
from st_mamba.ops import triton as triton_ops


def main() -> None:
    config = MambaConfig(d_model=768, n_layer=24, vocab_size=50280, d_state=16)
    model = MambaBackbone(config).reset_parameters(seed=0).cuda().to(torch.bfloat16).eval()
    computed = triton_ops._aligned
    settings = {"hint as computed": computed, "hint off": lambda *tensors: False}
    print(f"{torch.cuda.get_device_name()}, mamba-130m shape, bf16, {TOKENS:,} tokens a batch")
    for length in (512, 8192, 32768):
        ids = torch.randint(0, 50000, (TOKENS // length, length), device="cuda")

        def forward(aligned, ids=ids):
            def step():
                triton_ops._aligned = aligned
                with torch.inference_mode():
                    model(ids)

            return step

        best = best_of_two(settings, forward, 7)
        triton_ops._aligned = computed
        cells = [f"{name} {ms:.2f} ms ({TOKENS / ms / 1e3:,.2f}M tok/s)" for name, ms in best.items()]
        print(f"L={length}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
