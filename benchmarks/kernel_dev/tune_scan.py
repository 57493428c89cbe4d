"""Whole-model forward time under the forward scan's launch settings (one CUDA GPU).

The scan alone, timed apart, moves by 10% or more from call to call (its inputs come cold from
memory, where in the model the convolution has just written them to L2), so this times what the
settings are for: a backbone's forward (random weights, bf16, 65,536 tokens a batch), the settings
alternating round by round (``ab_kernels.best_of_two``). Settings are the ``st_mamba.ops.triton``
constants named below; "default" is the library's.

    python benchmarks/kernel_dev/tune_scan.py [--lengths 512,2048,8192,32768]
"""

from __future__ import annotations

import argparse
import sys

import torch
from ab_kernels import LAYERS, TOKENS, best_of_two  # this script's folder, first on sys.path

from st_mamba import MambaBackbone, MambaConfig
from st_mamba.ops import triton as kernels

SETTINGS = {
    "default": {},
    "64 channels": {"SCAN_FWD_BLOCK_D": 64},
    "128 channels": {"SCAN_FWD_NARROW_BLOCK_D": 128},
    "chunks for 2048 programs": {"SCAN_CHUNK_PROGRAMS": 2048},
    "chunks for 8192 programs": {"SCAN_CHUNK_PROGRAMS": 8192},
    "chunk starts whenever chunked": {"SCAN_FOLD_MAX_CHUNKS": 0},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="512,2048,8192,32768")
    p.add_argument("--models", default="130m,370m")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_scan.py needs a CUDA GPU")
    library = {name: getattr(kernels, name) for setting in SETTINGS.values() for name in setting}
    print(f"{torch.cuda.get_device_name()}: forward ms per {TOKENS:,} tokens (K tok/s)", flush=True)
    print("| model | L | " + " | ".join(SETTINGS) + " |")
    print("|---|---|" + "---|" * len(SETTINGS))
    for shape in a.models.split(","):
        _, n_layer, d_model = LAYERS[shape]
        config = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50280, d_state=16)
        model = MambaBackbone(config).reset_parameters(seed=0).cuda().to(torch.bfloat16).eval()
        for length in map(int, a.lengths.split(",")):
            ids = torch.randint(0, 50000, (TOKENS // length, length), device="cuda")

            def forward(setting: dict, ids=ids, model=model):
                def step():
                    for name, value in {**library, **setting}.items():
                        setattr(kernels, name, value)
                    with torch.inference_mode():
                        model(ids)

                return step

            times = best_of_two(SETTINGS, forward, 7)
            cells = " | ".join(f"{ms:.2f} ({TOKENS / ms:,.0f}K)" for ms in times.values())
            print(f"| mamba-{shape} | {length} | {cells} |", flush=True)
        for name, value in library.items():
            setattr(kernels, name, value)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
