"""Compile st-mamba's Triton kernels for an H100/H200 (sm_90) without a GPU: memory instructions and registers.

Triton's compiler needs no GPU: this builds each kernel for ``GPUTarget("cuda", 90, 32)`` from its
source, with the specialisations the launcher would give it (pointers 16-byte aligned; the integer
arguments it specialises on, divisible by 16), and counts the global loads and stores in the PTX by
width. A vector load (``ld.global.v4.b32``: 16 bytes) against scalar 16-bit loads
(``ld.global.b16``) shows at once whether a change lets a kernel's row loads vectorise, before any
GPU time is spent. The registers per thread (and spills) come from the ptxas that ships with
Triton: with one-warp programs they bound how many programs an SM holds (65,536 registers).
``--loops`` disassembles the machine code (Triton's nvdisasm) and counts the instructions of each
loop of the scan kernels, by kind: what one token costs a warp, for the forward scan without its
FAST math, owned-channel layout and aligned rows, then with each added in turn, at 64 and at 128
channels a program; for a chunked forward's phase 1 (a chunk's end state); and for the backward.
``--ssd`` instead reports the registers, spills and shared memory of the Mamba-2 SSD kernels under a few
settings, compiled through the launches a small mamba2-130m-shaped model makes on CPU tensors. Written for
Triton 3.6 (``triton.compiler.ASTSource``).

    python benchmarks/kernel_dev/ptx_loads.py [--loops | --ssd]
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from st_mamba.ops import triton as kernels

FP32_POINTERS = {"a_ptr", "d_ptr", "bias_ptr", "h0_ptr", "hfinal_ptr", "chunk_state_ptr", "chunk_dtsum_ptr",
                 "ckpt_ptr", "chunk_carry_ptr", "scratch_ptr", "dhfinal_ptr", "db_ptr", "dc_ptr", "da_ptr", "dd_ptr",
                 "dbias_ptr", "dh0_ptr", "dw_ptr"}  # fmt: skip
INT_POINTERS = {"cu_ptr", "chunk_off_ptr", "tile_off_ptr"}
# Integer arguments the launcher specialises on (not in kernels._SHAPE_ARGS): model widths, and the
# strides along time and channels, all multiples of 16 in real models.
SPECIALISED = {"d_inner", "d_state", "channels", "stride_xt", "stride_dtt", "stride_zt", "stride_bt", "stride_ct",
               "stride_yt", "stride_dyt", "stride_wc", "stride_h0k"}  # fmt: skip


TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def assemble(ptx: str, disassemble: bool = False) -> tuple[str, str]:
    """ptxas's report on the PTX compiled for sm_90a, and (``disassemble``) nvdisasm's listing of the result."""
    with tempfile.TemporaryDirectory() as folder:
        source, cubin = Path(folder) / "kernel.ptx", Path(folder) / "kernel.cubin"
        source.write_text(ptx)
        report = subprocess.run([str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(source), "-o", str(cubin)],
                                capture_output=True, text=True, check=True).stderr  # fmt: skip
        if not disassemble:
            return report, ""
        listing = subprocess.run(
            [str(TOOLS / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True
        )
        return report, listing.stdout


def registers(report: str) -> str:
    """Registers per thread (and spilled bytes) from ptxas's report."""
    used = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores", report)
    return f"{used.group(1) if used else '?'} registers, {spill.group(1) if spill else '?'} B spilled"


def innermost_loops(listing: str) -> list[Counter]:
    """The instructions (by opcode, modifiers dropped) of each innermost loop in nvdisasm's listing, in
    order: the code from a label to the last branch back to it, where no other loop lies inside."""
    lines = listing.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    spans = {}
    for i, line in enumerate(lines):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i) < i:
            spans[target.group(1)] = (labels[target.group(1)], i)
    found = []
    for begin, end in sorted(spans.values()):
        if end - begin < 2 or any(begin <= b and e <= end and (b, e) != (begin, end) for b, e in spans.values()):
            continue  # the branch-to-itself at the kernel's end, or an outer loop
        opcodes = (
            re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
            for line in lines[begin : end + 1]
        )
        found.append(Counter(m.group(1) for m in opcodes if m))
    return found


def compile_sm90(kernel, constants: dict, num_warps: int) -> str:
    """The sm_90 PTX of ``kernel`` with these constexpr values (bf16 data)."""
    names = kernel.arg_names
    constants = {name: value for name, value in constants.items() if name in names}
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FP32_POINTERS else "*i32" if name in INT_POINTERS else "*bf16"
        else:
            signature[name] = "i32"
    divisible = [(i,) for i, name in enumerate(names) if name.endswith("_ptr") or name in SPECIALISED]
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(name),): value for name, value in constants.items()},
        attrs={key: [["tt.divisibility", 16]] for key in divisible},
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]


def memory_instructions(kernel, constants: dict, num_warps: int) -> tuple[Counter, str]:
    """Global loads and stores by width in the sm_90 PTX of ``kernel`` (bf16 data), and its registers per thread."""
    ptx = compile_sm90(kernel, constants, num_warps)
    return Counter(re.findall(r"(?:ld|st)\.global[\w.]*", ptx)), registers(assemble(ptx)[0])


def loop_table() -> None:
    """Instructions a token of the scan kernels' loops (padded batch, bf16, one warp; 64 channels unless a row says 128)."""
    block = kernels.SCAN_FWD_NARROW_BLOCK_D
    common = dict(HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_D=True, HAS_H0=False, VARLEN=False, SEARCH_STEPS=1,
                  BLOCK_D=block, BLOCK_N=16)  # fmt: skip
    forward = dict(common, STORE_FINAL=False, PHASE=2, STARTS=False, STORE_Y=True, STORE_CKPT=False,
                   STAGES=kernels.SCAN_FWD_STAGES)  # fmt: skip
    owned = kernels._channels_per_thread(block, kernels.SCAN_FWD_WARPS)
    wide = kernels.SCAN_FWD_BLOCK_D
    builds = [
        ("scan forward, precise math, Triton's layout", kernels._scan_fwd_kernel, dict(forward, FAST=False, D_PER_THREAD=block, ALIGNED=False)),
        ("scan forward, FAST", kernels._scan_fwd_kernel, dict(forward, FAST=True, D_PER_THREAD=block, ALIGNED=False)),
        ("scan forward, FAST, owned channels", kernels._scan_fwd_kernel, dict(forward, FAST=True, D_PER_THREAD=owned, ALIGNED=False)),
        ("scan forward, FAST, owned channels, rows aligned", kernels._scan_fwd_kernel, dict(forward, FAST=True, D_PER_THREAD=owned, ALIGNED=True)),
        (f"scan forward as the last, {wide} channels", kernels._scan_fwd_kernel, dict(forward, FAST=True, BLOCK_D=wide, D_PER_THREAD=kernels._channels_per_thread(wide, kernels.SCAN_FWD_WARPS), ALIGNED=True)),
        (f"scan forward's phase 1 (a chunk's end state), {wide} channels", kernels._scan_fwd_kernel, dict(forward, PHASE=1, STORE_Y=False, FAST=True, BLOCK_D=wide, D_PER_THREAD=kernels._channels_per_thread(wide, kernels.SCAN_FWD_WARPS), ALIGNED=True)),
        ("scan backward (its two walks over a tile)", kernels._scan_bwd_kernel, dict(common, FAST=True, HAS_DHFINAL=False, TILE=kernels.SCAN_BWD_TILE, ALIGNED=True, EVEN_D=True, EVEN_N=True)),
    ]  # fmt: skip
    print("Innermost loops in code order: the forward's folding of earlier chunks' end states, then its walk")
    print("over the tokens; the backward's folding of later chunks' carries, then its two walks over a tile.\n")
    print("| kernel | each loop: instructions an iteration (MUFU, global loads, shuffles) | per thread |")
    print("|---|---|---|")
    for name, kernel, constants in builds:
        report, listing = assemble(compile_sm90(kernel, constants, kernels.SCAN_FWD_WARPS), disassemble=True)
        cells = "; ".join(f"{sum(c.values())} ({c['MUFU']}, {c['LDG']}, {c['SHFL']})" for c in innermost_loops(listing))
        print(f"| {name} | {cells} | {registers(report)} |", flush=True)


# Mamba-2 settings whose registers docs/kernels.md compares (the library's first).
SSD_SETTINGS = {
    "library": {},
    "fused, 8 warps, 2 stages": {"SSD_FUSED_WARPS": 8, "SSD_FUSED_STAGES": 2},
    "fused, Q = 64": {"SSD_FUSED_CHUNK": 64},
    "fused, Q = 64, 8 warps": {"SSD_FUSED_CHUNK": 64, "SSD_FUSED_WARPS": 8},
    "backward fp32 products": {"SSD_BWD_LOW": False},
    "backward 8 warps": {"SSD_BWD_WARPS": 8},
    "backward 8 warps, fp32 products": {"SSD_BWD_WARPS": 8, "SSD_BWD_LOW": False},
}


def ssd_table() -> None:
    """Registers, spills and shared memory of every Mamba-2 SSD kernel a two-layer mamba2-130m-shaped backbone
    launches (forward and backward, padded, packed, and the fused forward on segments), in bf16 and fp32, under
    each of SSD_SETTINGS. The launches only compile (``tests/ops/compile_for_gpu.py``'s driver), on CPU tensors."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.ops.compile_for_gpu import _gpu_fast_math, _install_compile_only_driver, _models

    compiled = _install_compile_only_driver(90)
    _gpu_fast_math()
    from st_mamba import ops
    from st_mamba.ops import triton_ssd

    library = {name: getattr(triton_ssd, name) for setting in SSD_SETTINGS.values() for name in setting}
    ids = torch.randint(0, 1024, (2, 1000), generator=torch.Generator().manual_seed(0))
    print("| settings | dtype | kernel | per thread | shared KB |")
    print("|---|---|---|---|---|")
    for (label, setting), dtype in itertools.product(SSD_SETTINGS.items(), (torch.bfloat16, torch.float32)):
        for name, value in {**library, **setting}.items():
            setattr(triton_ssd, name, value)
        model = _models()["mamba2-130m"].to(dtype)
        before = len(compiled)
        with ops.use_backend("triton"):
            model(ids).float().sum().backward()
            with torch.no_grad():
                bound, triton_ssd.SSD_FUSED_MIN_WALKS_PER_SM = triton_ssd.SSD_FUSED_MIN_WALKS_PER_SM, float("inf")
                model(ids)  # the fused forward on segments (16-bit inputs)
                triton_ssd.SSD_FUSED_MIN_WALKS_PER_SM = bound
        rows = {}  # a kernel's variants (forward / reverse walk, fused with or without outputs) that differ
        for entry in compiled[before:]:
            if entry["kernel"].startswith("_ssd"):
                report, _ = assemble(entry["ptx"])
                rows.setdefault(f"`{entry['kernel']}` | {registers(report)} | {entry['shared'] / 1024:.0f}", None)
        for row in rows:
            print(f"| {label} | {str(dtype).removeprefix('torch.')} | {row} |", flush=True)
    for name, value in library.items():
        setattr(triton_ssd, name, value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loops", action="store_true", help="the scan loops' instructions instead of the memory table")
    p.add_argument("--ssd", action="store_true", help="registers and spills of the Mamba-2 SSD kernels instead")
    a = p.parse_args()
    if a.loops:
        loop_table()
        return
    if a.ssd:
        ssd_table()
        return
    scan = dict(HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, BLOCK_D=kernels.SCAN_FWD_BLOCK_D, BLOCK_N=16,
                D_PER_THREAD=kernels._channels_per_thread(kernels.SCAN_FWD_BLOCK_D, kernels.SCAN_FWD_WARPS),
                STAGES=kernels.SCAN_FWD_STAGES, EVEN_D=True, EVEN_N=True)  # fmt: skip
    conv = dict(WIDTH=4, HAS_BIAS=True, HAS_H0=False, SILU=True, FAST=True, BLOCK_T=kernels.CONV_BLOCK_T,
                BLOCK_C=kernels.CONV_BLOCK_C)  # fmt: skip
    print("| kernel | batch | ALIGNED | global loads and stores in the PTX | per thread |")
    print("|---|---|---|---|---|")
    for varlen, aligned in itertools.product((False, True), (False, True)):
        layout = dict(VARLEN=varlen, ALIGNED=aligned, SEARCH_STEPS=4 if varlen else 1)
        builds = {
            "scan forward": (
                kernels._scan_fwd_kernel,
                {
                    **scan,
                    **layout,
                    "HAS_D": True,
                    "HAS_H0": False,
                    "STORE_FINAL": False,
                    "PHASE": 2,
                    "STARTS": False,
                    "STORE_Y": True,
                    "STORE_CKPT": False,
                },
                kernels.SCAN_FWD_WARPS,
            ),  # fmt: skip
            "scan backward": (
                kernels._scan_bwd_kernel,
                {
                    **scan,
                    **layout,
                    "HAS_D": True,
                    "HAS_H0": False,
                    "HAS_DHFINAL": False,
                    "TILE": kernels.SCAN_BWD_TILE,
                    "BLOCK_D": kernels.SCAN_BWD_BLOCK_D,
                },
                kernels.SCAN_BWD_WARPS,
            ),  # fmt: skip
            "conv forward": (kernels._conv_fwd_kernel, {**conv, **layout}, kernels.CONV_WARPS),
            "conv backward (pre)": (
                kernels._conv_bwd_pre_kernel,
                {
                    **conv,
                    **layout,
                    "BLOCK_T": kernels.CONV_BWD_BLOCK_T,
                    "BLOCK_C": kernels.CONV_BWD_BLOCK_C,
                    "TILES": kernels.CONV_BWD_TILES,
                },
                kernels.CONV_BWD_WARPS,
            ),  # fmt: skip
        }
        for name, (kernel, constants, warps) in builds.items():
            counts, regs = memory_instructions(kernel, constants, warps)
            cells = ", ".join(f"{count} {op}" for op, count in sorted(counts.items()))
            print(f"| {name} | {'packed' if varlen else 'padded'} | {aligned} | {cells} | {regs} |", flush=True)


if __name__ == "__main__":
    main()
