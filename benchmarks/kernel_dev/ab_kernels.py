"""A/B of the Triton kernels: an earlier revision's ``st_mamba/ops/triton.py`` against the working tree's.

Both versions are loaded into one process on one GPU (the base from ``git show REV:...`` into a
temporary module), the same inputs go to both, and the rounds alternate so that clock drift hits
both alike. Timed (CUDA events, median of several runs after warm-ups, best of two rounds):

1. the selective scan alone, forward and forward + backward, on mamba-130m and mamba-370m layer
   shapes (bf16; x contiguous, z and B, C strided views as the model hands them over);
2. the causal convolution (+ SiLU) alone, forward and forward + backward, on the same layer shapes
   (x the strided half of the in_proj output, as in the model);
3. the residual add after the output projection: ``F.linear`` then ``+``, against one ``addmm`` (what
   ``ops.linear(..., residual=...)`` runs in training) and ``addmm_`` into the residual (in inference);
   not a revision's code, three ways of doing the same sum;
4. whole backbones (random weights, bf16, 65,536 tokens a batch): forward at several lengths,
   forward + backward at 512, the dispatcher pointed at each version in turn (the model code is the
   working tree's on both sides; only the kernels differ).

    python benchmarks/kernel_dev/ab_kernels.py --base 5c52040
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import st_mamba.ops as ops
from st_mamba import MambaBackbone, MambaConfig
from st_mamba.ops import triton as current

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for bench_encode's timer
from bench_encode import time_cuda  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOKENS = 65536
LAYERS = {"130m": (1536, 24, 768), "370m": (2048, 48, 1024)}  # d_inner, n_layer, d_model


def load_revision(rev: str):
    """``st_mamba/ops/triton.py`` as it was at ``rev`` (or the file at that path), imported as a module of its own."""
    if Path(rev).is_file():  # a copy made where the history is (a device's checkout may not have the commit)
        source, rev = Path(rev).read_text(), Path(rev).stem
    else:
        source = subprocess.run(["git", "show", f"{rev}:st_mamba/ops/triton.py"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / f"triton_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "CONV_MAX_WIDTH"):  # the dispatcher reads it; older convolutions took any width
        module.CONV_MAX_WIDTH = 1 << 30
    return module


def scan_inputs(batch: int, length: int, d_inner: int, d_state: int = 16, rank: int = 48) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(0)
    xz = torch.randn(batch, length, 2 * d_inner, device="cuda", dtype=torch.bfloat16, generator=g)
    x, z = xz[..., :d_inner].contiguous(), xz[..., d_inner:]
    dt = (torch.randn(batch, length, d_inner, device="cuda", generator=g) * 0.5 - 4).to(torch.bfloat16)
    x_dbl = torch.randn(batch, length, rank + 2 * d_state, device="cuda", dtype=torch.bfloat16, generator=g)
    B, C = x_dbl[..., rank : rank + d_state], x_dbl[..., rank + d_state :]
    A = -torch.arange(1, d_state + 1, device="cuda", dtype=torch.float32).repeat(d_inner, 1)
    D = torch.ones(d_inner, device="cuda")
    dt_bias = torch.log(torch.expm1(torch.rand(d_inner, device="cuda", generator=g) * 0.099 + 0.001))
    return x, dt, A, B, C, D, z, dt_bias


def conv_inputs(batch: int, length: int, d_inner: int, width: int = 4) -> tuple:
    """x (the strided first half of an in_proj output), weight, bias, and an upstream gradient."""
    g = torch.Generator(device="cuda").manual_seed(1)
    xz = torch.randn(batch, length, 2 * d_inner, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = torch.randn(d_inner, width, device="cuda", dtype=torch.bfloat16, generator=g) * 0.5
    bias = torch.randn(d_inner, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    dy = torch.randn(batch, length, d_inner, device="cuda", dtype=torch.bfloat16, generator=g)
    return xz[..., :d_inner], weight, bias, dy


def residual_paths(d_inner: int, d_model: int) -> dict:
    """The output projection plus the residual: added by a second kernel, in an addmm, in an addmm_."""
    g = torch.Generator(device="cuda").manual_seed(2)
    y = torch.randn(TOKENS, d_inner, device="cuda", dtype=torch.bfloat16, generator=g)
    residual = torch.randn(TOKENS, d_model, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = torch.randn(d_model, d_inner, device="cuda", dtype=torch.bfloat16, generator=g) * d_inner**-0.5
    return {
        "add apart": lambda: residual + F.linear(y, weight),
        "addmm": lambda: torch.addmm(residual, y, weight.T),
        "addmm_": lambda: residual.addmm_(y, weight.T),  # the sum grows call by call: timing only
    }


def best_of_two(settings: dict, make_step, reps: int) -> dict[str, float]:
    """Milliseconds of ``make_step(setting)()`` for each named setting: the best of two rounds of
    ``time_cuda``, the settings alternating so that clock drift hits them all alike."""
    best: dict[str, float] = {}
    for _ in range(2):
        for name, setting in settings.items():
            best[name] = min(best.get(name, float("inf")), time_cuda(make_step(setting), reps))
    return best


def report(what: str, times: dict[str, float], tokens: int | None = None) -> None:
    base, new = times["base"], times["working tree"]
    rate = f" ({tokens / base:,.0f}K -> {tokens / new:,.0f}K tok/s)" if tokens else ""  # tokens per ms = K tok/s
    print(f"{what}: {base:.3f} -> {new:.3f} ms, {base / new:.3f}x{rate}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="HEAD", help="git revision whose kernels are the baseline, or a triton.py file")
    p.add_argument("--lengths", default="512,2048,8192,32768")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ab_kernels.py needs a CUDA GPU")
    versions = {"base": load_revision(a.base), "working tree": current}
    print(f"{torch.cuda.get_device_name()}: kernels of {a.base} -> the working tree", flush=True)

    for shape, (d_inner, _, _) in LAYERS.items():
        for length in (512, 8192):
            args = scan_inputs(TOKENS // length, length, d_inner)
            with torch.inference_mode():
                times = best_of_two(versions, lambda m, args=args: lambda: m.selective_scan_triton(*args, True), 9)
            report(f"scan forward, mamba-{shape} layer, {TOKENS // length} x {length}", times)
            leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in args]

            def train_step(module, leaves=leaves):
                return lambda: module.selective_scan_triton(*leaves, True).float().square().mean().backward()

            report(f"scan forward + backward, mamba-{shape} layer, {TOKENS // length} x {length}",
                   best_of_two(versions, train_step, 5))  # fmt: skip

    for shape, (d_inner, _, _) in LAYERS.items():
        for length in (512, 8192):
            *args, dy = conv_inputs(TOKENS // length, length, d_inner)
            with torch.inference_mode():
                times = best_of_two(versions, lambda m, args=args: lambda: m.causal_conv1d_triton(*args), 9)
            report(f"conv forward, mamba-{shape} layer, {TOKENS // length} x {length}", times)
            leaves = [t.detach().requires_grad_() for t in args]

            def conv_step(module, leaves=leaves, dy=dy):
                return lambda: torch.autograd.grad(module.causal_conv1d_triton(*leaves), leaves, dy)

            report(f"conv forward + backward, mamba-{shape} layer, {TOKENS // length} x {length}",
                   best_of_two(versions, conv_step, 5))  # fmt: skip

    for shape, (d_inner, _, d_model) in LAYERS.items():
        with torch.inference_mode():
            times = best_of_two(residual_paths(d_inner, d_model), lambda step: step, 9)
        cells = ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items())
        print(f"out_proj + residual, mamba-{shape} layer, {TOKENS} tokens: {cells}", flush=True)

    for shape, (_, n_layer, d_model) in LAYERS.items():
        config = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50280, d_state=16)
        model = MambaBackbone(config).reset_parameters(seed=0).cuda().to(torch.bfloat16)
        runs = [("forward", int(n)) for n in a.lengths.split(",")] + [("forward + backward", 512)]
        for mode, length in runs:
            ids = torch.randint(0, 50000, (TOKENS // length, length), device="cuda")
            model.train(mode != "forward")

            def model_step(module, mode=mode, ids=ids, model=model):
                def step():
                    ops._triton = module  # the dispatcher's Triton module
                    if mode == "forward":
                        with torch.inference_mode():
                            model(ids)
                    else:
                        model.zero_grad(set_to_none=True)
                        model(ids).float().square().mean().backward()

                return step

            report(f"mamba-{shape} {mode}, L={length}", best_of_two(versions, model_step, 7 if mode == "forward" else 3), TOKENS)  # fmt: skip
        ops._triton = current
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
