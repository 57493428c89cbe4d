"""Every Triton kernel compiles for the H100/H200 (sm_90) and fits its shared memory, checked without a GPU.

Triton's interpreter (how CI runs the kernels' numerical tests) never compiles a kernel, so it cannot see a
kernel that is correct but does not launch: the SSD backward once asked for 262 KB of shared memory at
d_state 128, where a Hopper SM has 227 KB. ``compile_for_gpu`` compiles the kernels for sm_90 with Triton's
own ptxas at the 130m checkpoints' shapes; this test reads what they need.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

# 227 KB: the most shared memory one block can have on compute capability 9.0 (CUDA programming guide).
SM90_SHARED_BYTES = 232_448
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the kernels' own tests launch them on it")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.ops.compile_for_gpu", "--arch", "90"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_kernel_of_both_blocks_compiled(compiled):
    names = {(entry["model"], entry["dtype"], entry["kernel"]) for entry in compiled}
    for dtype in ("float32", "bfloat16"):
        for kernel in ("_scan_fwd_kernel", "_scan_bwd_kernel", "_conv_fwd_kernel", "_conv_bwd_input_kernel"):
            assert ("mamba-130m", dtype, kernel) in names
        for kernel in (
            "_ssd_state_walk_kernel", "_ssd_chunk_scan_fwd_kernel", "_ssd_chunk_scan_bwd_kernel",
            "_ssd_chunk_scan_bwd_bc_kernel", "_gated_norm_fwd_kernel", "_gated_norm_bwd_kernel",
        ):  # fmt: skip
            assert ("mamba2-130m", dtype, kernel) in names
    for kernel in ("_ssd_fused_fwd_kernel", "_ssd_state_passing_kernel"):  # 16-bit inputs only
        assert ("mamba2-130m", "bfloat16", kernel) in names


def test_every_kernel_fits_the_shared_memory_of_sm90(compiled):
    over = [entry for entry in compiled if entry["shared"] > SM90_SHARED_BYTES]
    assert not over, f"over {SM90_SHARED_BYTES} bytes of shared memory on sm_90: {over}"
