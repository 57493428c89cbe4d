"""Compile every Triton kernel a model's forward and backward launch for a GPU this machine does not have.

Run as a script (``python -m tests.ops.compile_for_gpu --arch 90``) without ``TRITON_INTERPRET``: Triton's
active driver is replaced by one that names the target (``GPUTarget("cuda", arch, 32)``) and every kernel
launch only compiles (``warmup=True``), with Triton's own ptxas. The model runs on CPU tensors with the
Triton backend forced, so each launch compiles the kernel for the real shapes (the Mamba-1 and Mamba-2 blocks
of the 130m checkpoints) and the host code goes on with outputs that were never written; only what was
compiled is looked at. Prints one JSON line per compiled kernel: name, dtype of the run, shared memory (bytes).

``tests/ops/test_gpu_compile.py`` runs it and checks the shared memory against the target's limit, so that a
kernel that cannot launch on the H100/H200 fails CI on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def _install_compile_only_driver(arch: int) -> list[dict]:
    """Make every Triton launch compile for ``sm_{arch}`` and return; the list fills with what compiled: the
    kernel's name, its shared memory (bytes) and its PTX."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:
        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", arch, 32)

        def get_device_interface(self):
            return torch.cuda

    compiled: list[dict] = []
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append({"kernel": self.__name__, "shared": int(kernel.metadata.shared), "ptx": kernel.asm["ptx"]})
        return kernel

    JITFunction.run = compile_only
    driver.set_active(CompileOnlyDriver())
    return compiled


def _models() -> dict:
    """Two layers of each 130m checkpoint's shape: state-spaces/mamba-130m and mamba2-130m."""
    from st_mamba import MambaBackbone, MambaConfig

    return {
        "mamba-130m": MambaBackbone(MambaConfig(d_model=768, n_layer=2, vocab_size=1024, version=1)),
        "mamba2-130m": MambaBackbone(
            MambaConfig(d_model=768, n_layer=2, vocab_size=1024, version=2, d_state=128, headdim=64)
        ),
    }


def _gpu_fast_math() -> None:
    """The kernels' fast math, what a GPU runs; on CPU tensors it is off (the interpreter's choice)."""
    from st_mamba.ops import triton as triton_ops
    from st_mamba.ops import triton_norm, triton_ssd

    triton_ops._fast = triton_norm._fast = triton_ssd._fast = lambda x: True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    args = parser.parse_args()
    compiled = _install_compile_only_driver(args.arch)
    _gpu_fast_math()

    from st_mamba import ops
    from st_mamba.ops import triton_ssd

    ids = torch.randint(0, 1024, (2, 1000), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([0, 700, 1300, 2000], dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        for name, model in _models().items():
            model = model.to(dtype)
            with ops.use_backend("triton"):
                before = len(compiled)
                model(ids).float().sum().backward()  # padded batch, forward and backward
                model(ids.reshape(1, -1), cu_seqlens=lengths).float().sum().backward()  # packed
                with torch.no_grad():
                    model(ids)  # inference (no autograd node: its own launches)
                    # Mamba-2's fused forward on segments (few sequences for the GPU), and the walk-and-outputs
                    # forward that 16-bit inputs take when the fused one is off.
                    bound, triton_ssd.SSD_FUSED_MIN_WALKS_PER_SM = triton_ssd.SSD_FUSED_MIN_WALKS_PER_SM, math.inf
                    model(ids)
                    triton_ssd.SSD_FUSED_MIN_WALKS_PER_SM, triton_ssd.SSD_FUSED = bound, False
                    model(ids)
                    triton_ssd.SSD_FUSED = True
            for entry in compiled[before:]:
                print(json.dumps({"kernel": entry["kernel"], "shared": entry["shared"], "model": name,
                                  "dtype": str(dtype).removeprefix("torch.")}))  # fmt: skip


if __name__ == "__main__":
    main()
