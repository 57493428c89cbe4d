"""Whole Mamba-2 model time under the SSD kernels' settings (one CUDA GPU).

A mamba2-130m-shaped backbone (random weights, bf16, 65,536 tokens a batch) runs its forward (and,
with ``--backward``, forward + backward) under each setting of the ``st_mamba.ops.triton_ssd``
constants below, the settings alternating round by round (``ab_kernels.best_of_two``); "default" is
the library's. Each setting's output is also compared with the default's (max abs difference of the
final hidden states; with ``--backward``, of the parameters' gradients too), so a setting that breaks the scan
shows.

    python benchmarks/kernel_dev/tune_ssd.py [--lengths 512,2048,8192] [--settings 'a;b']
        [--backward [--bwd-lengths 512] [--bwd-settings 'a;b']]
"""

from __future__ import annotations

import argparse
import sys

import torch
from ab_kernels import TOKENS, best_of_two  # this script's folder, first on sys.path

from st_mamba import MambaBackbone, MambaConfig
from st_mamba.ops import triton_ssd as kernels

PASS_SETTINGS = {
    "default": {},
    "walk 8 warps -> 4": {"SSD_WALK_WARPS": 4},
    "walk rows 32": {"SSD_PASS_BLOCK_P": 32},
    "walk rows 16": {"SSD_PASS_BLOCK_P": 16},
}
FORWARD_SETTINGS = {
    "default": {},
    "walk and outputs": {"SSD_FUSED": False},
    "fused, whole sequences": {"SSD_FUSED_MIN_WALKS_PER_SM": 0},
    "fused, segments for 1 walk a SM": {"SSD_FUSED_SEGMENT_WALKS_PER_SM": 1.0},
    "fused, segments for 8 walks a SM": {"SSD_FUSED_SEGMENT_WALKS_PER_SM": 8.0},
    "fused, segments below 4 walks a SM": {"SSD_FUSED_MIN_WALKS_PER_SM": 4.0},
    "fused, 2 stages": {"SSD_FUSED_STAGES": 2},
    "fused, chunk 16": {"SSD_FUSED_CHUNK": 16},
    "fused, chunk 64": {"SSD_FUSED_CHUNK": 64},
}
BACKWARD_SETTINGS = {
    **PASS_SETTINGS,
    "bwd one head": {"SSD_BWD_HEADS": 1},
    "bwd 4 heads": {"SSD_BWD_HEADS": 4},
    "bwd dB/dC 4 heads": {"SSD_BWD_BC_HEADS": 4},
    "bwd dB/dC 8 heads": {"SSD_BWD_BC_HEADS": 8},
    "bwd fp32 products": {"SSD_BWD_LOW": False},
    "bwd one head, fp32 products": {"SSD_BWD_HEADS": 1, "SSD_BWD_LOW": False},
    "bwd 8 warps": {"SSD_BWD_WARPS": 8},
    "bwd dx states whole": {"SSD_BWD_DX_BLOCK_N": 1 << 30},
    "bwd dx states by 32": {"SSD_BWD_DX_BLOCK_N": 32},
    "bwd dx states by 64": {"SSD_BWD_DX_BLOCK_N": 64},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="512,2048,8192")
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--bwd-lengths", default=None, help="lengths timed with --backward (default: --lengths)")
    p.add_argument(
        "--settings", default=None, help="names of FORWARD_SETTINGS to time, separated by ';' (default: all)"
    )
    p.add_argument(
        "--bwd-settings", default=None, help="names of BACKWARD_SETTINGS to time, separated by ';' (default: all)"
    )
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_ssd.py needs a CUDA GPU")
    forward_settings = FORWARD_SETTINGS
    if a.settings:
        forward_settings = {"default": {}, **{n: FORWARD_SETTINGS[n] for n in a.settings.split(";")}}
    backward_settings = BACKWARD_SETTINGS
    if a.bwd_settings:
        backward_settings = {"default": {}, **{n: BACKWARD_SETTINGS[n] for n in a.bwd_settings.split(";")}}
    names = {name for s in (*FORWARD_SETTINGS.values(), *BACKWARD_SETTINGS.values()) for name in s}
    library = {name: getattr(kernels, name) for name in names}

    def apply(setting: dict) -> None:
        for name, value in {**library, **setting}.items():
            setattr(kernels, name, value)

    config = MambaConfig(d_model=768, n_layer=24, vocab_size=50280, version=2, d_state=128, headdim=64)
    model = MambaBackbone(config).reset_parameters(seed=0).cuda().to(torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}: mamba2-130m shape, ms per {TOKENS:,} tokens (K tok/s)", flush=True)
    for length in map(int, a.lengths.split(",")):
        ids = torch.randint(0, 50000, (TOKENS // length, length), device="cuda")

        def forward(setting: dict, ids=ids):
            def step():
                apply(setting)
                with torch.inference_mode():
                    return model(ids)

            return step

        reference = forward({})().float()
        errors = {name: (forward(s)().float() - reference).abs().max().item() for name, s in forward_settings.items()}
        times = best_of_two(forward_settings, forward, 7)
        cells = ", ".join(f"{n} {ms:.2f} ({TOKENS / ms:,.0f}K, max diff {errors[n]:.2g})" for n, ms in times.items())
        print(f"forward L={length}: {cells}", flush=True)
        if a.backward and (a.bwd_lengths is None or str(length) in a.bwd_lengths.split(",")):

            def train_step(setting: dict, ids=ids):
                def step():
                    apply(setting)
                    model(ids).float().square().mean().backward()

                return step

            def gradients(setting: dict) -> torch.Tensor:
                model.zero_grad(set_to_none=True)
                train_step(setting)()
                return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])

            reference = gradients({})
            errors = {name: (gradients(s) - reference).abs().max().item() for name, s in backward_settings.items()}
            del reference
            times = best_of_two(backward_settings, train_step, 3)
            cells = ", ".join(
                f"{n} {ms:.2f} ({TOKENS / ms:,.0f}K, max grad diff {errors[n]:.2g})" for n, ms in times.items()
            )
            print(f"forward+backward L={length}: {cells}", flush=True)
            model.zero_grad(set_to_none=True)
    apply({})


if __name__ == "__main__":
    main()
