"""Where a GPU forward spends its time, and the rates of the units the scan leans on (one CUDA GPU).

1. Unit rates: a Triton kernel of independent chains of ``exp2`` (one FMUL and one MUFU.EX2 each on
   NVIDIA GPUs), and one of FMAs, over enough one-warp programs to fill the card: operations per ms.
2. ``torch.profiler`` over one forward (inference mode) and one forward + backward of a backbone with
   random weights (bf16, 65,536 tokens a batch, 128 x 512 by default; each of ``--lengths`` in turn):
   GPU time by kernel, largest first.

    python benchmarks/kernel_dev/profile_gpu.py [--model 130m|370m|mamba2-130m|mamba2-370m] [--lengths 512,2048] [--forward-only]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile

from st_mamba import MambaBackbone, MambaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for bench_encode's shapes and timer
from bench_encode import MODELS, time_cuda  # noqa: E402

TOKENS = 65536


@triton.jit
def _chains(x_ptr, y_ptr, ROUNDS: tl.constexpr, EXP2: tl.constexpr):
    offsets = tl.program_id(0) * 256 + tl.arange(0, 256)  # one warp: 8 independent chains a thread
    v = tl.load(x_ptr + offsets)
    for _ in range(ROUNDS):
        if EXP2:
            v = tl.exp2(v * -0.5)  # stays in (0, 1]
        else:
            v = v * 0.999 + 0.001
    tl.store(y_ptr + offsets, v)


def unit_rates() -> None:
    programs = torch.cuda.get_device_properties(0).multi_processor_count * 32 * 4
    x = torch.rand(programs * 256, device="cuda")
    y = torch.empty_like(x)
    for name, exp2, rounds in [("exp2 (FMUL + MUFU.EX2)", True, 256), ("FMA", False, 1024)]:
        launch = lambda rounds=rounds, exp2=exp2: _chains[(programs,)](x, y, ROUNDS=rounds, EXP2=exp2, num_warps=1)  # noqa: E731
        ms = time_cuda(launch, 9)
        print(f"{name}: {x.numel() * rounds / ms / 1e9:.2f} G per ms", flush=True)


def kernel_times(model: torch.nn.Module, ids: torch.Tensor, backward: bool, top: int = 14) -> None:
    def step():
        if backward:
            model.train().zero_grad(set_to_none=True)
            model(ids).float().square().mean().backward()
        else:
            with torch.inference_mode():
                model.eval()(ids)

    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / 1e3
    print(f"\n{'forward + backward' if backward else 'forward'}: {total:.2f} ms of GPU time", flush=True)
    print("| ms | calls | kernel |\n|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"| {e.self_device_time_total / 1e3:.2f} | {e.count} | {e.key[:90]} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="130m", choices=["130m", "370m", "mamba2-130m", "mamba2-370m"])
    p.add_argument("--lengths", default="512", help="tokens a sequence, comma-separated")
    p.add_argument("--forward-only", action="store_true", help="leave out the forward + backward profiles")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_gpu.py needs a CUDA GPU")
    print(torch.cuda.get_device_name(), flush=True)
    unit_rates()
    shape = a.model if a.model.startswith("mamba2") else f"mamba-{a.model}"
    config = MambaConfig(**MODELS[f"st-{shape}"][1])
    model = MambaBackbone(config).reset_parameters(seed=0).cuda().to(torch.bfloat16)
    for length in map(int, a.lengths.split(",")):
        ids = torch.randint(0, 50000, (TOKENS // length, length), device="cuda")
        print(f"\n{shape} shape, bf16, {TOKENS // length} x {length} tokens")
        for backward in (False,) if a.forward_only else (False, True):
            kernel_times(model, ids, backward)


if __name__ == "__main__":
    main()
