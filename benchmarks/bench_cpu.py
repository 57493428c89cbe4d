"""CPU encoding throughput: st-mamba against transformers' Mamba (its CPU path) and BERT-base.

All in one process on this machine, fp32 (and bf16 where the CPU has it), random weights (speed does not depend on training),
inference mode, the mamba-130m shape (d_model 768, 24 layers, d_state 16, vocab 50,280):

1. tokens/s of the forward pass at batch 4 x 512 and 1 x 4096 tokens for
   - st-mamba: ``MambaBackbone`` with the dispatcher's CPU choice (the compiled kernels when a C
     compiler is present),
   - transformers' ``MambaModel``: without mamba-ssm its per-token PyTorch loop (slow path),
   - BERT-base (``BertModel``, transformers' default attention),
   - the GEMM floor: the four projections of the 24 Mamba layers alone, as plain matmuls, once
     through ``ops.linear`` (what st-mamba uses: oneDNN on CPU) and once through ``F.linear`` (MKL);
2. st-mamba and BERT-base again after ``st_mamba.ops.cpu.keep_freed_memory()``: glibc's malloc
   then keeps freed memory instead of mapping every large tensor afresh (page faults);
3. st-mamba, BERT-base and the GEMM floor with bf16 weights, where the CPU multiplies bf16 natively
   (AVX512-BF16 or AMX, as oneDNN reports it), and how far st-mamba's bf16 outputs are from fp32;
4. where st-mamba's time goes at 4 x 512: projections, convolution, scan and the rest.

Each number is the median of several runs after one warm-up; the slow transformers Mamba gets
fewer runs (the table says how many) so that the whole benchmark stays under ten minutes. Other
processes on the machine make the numbers noisy: the load average is printed with the table.

It prints a table last, writes the "## CPU" section of docs/benchmarks.md (leaving other
sections alone) and the plot docs/benchmarks_cpu.png. ``--quick`` is a smoke run: short
inputs, one run each, nothing written unless ``--docs-dir`` is given.

Run:

    python benchmarks/bench_cpu.py
    python benchmarks/bench_cpu.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from st_mamba import MambaBackbone, MambaConfig, ops
from st_mamba.ops import cpu

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## CPU"
VOCAB, D_MODEL, N_LAYER, D_STATE = 50280, 768, 24, 16  # mamba-130m
KEPT = "malloc keeps freed memory"  # the rows measured after ops.cpu.keep_freed_memory()
BF16 = "bf16 weights"  # the rows measured with every weight (and so every activation) in bfloat16
SHAPES = [(4, 512), (1, 4096)]  # (batch, tokens per text)
QUICK_SHAPES = [(2, 64), (1, 256)]
RUNS = {
    "st-mamba": 5,
    "GEMM floor (ops.linear)": 5,
    "GEMM floor (F.linear)": 5,
    "BERT-base": 3,
    "transformers Mamba (slow path)": 2,
}


def build_st_mamba(dtype: torch.dtype = torch.float32) -> Callable[[torch.Tensor], torch.Tensor]:
    config = MambaConfig(d_model=D_MODEL, n_layer=N_LAYER, vocab_size=VOCAB, d_state=D_STATE)
    return MambaBackbone(config).reset_parameters(seed=0).eval().to(dtype)


def build_hf_mamba() -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers import MambaConfig as HFMambaConfig
    from transformers import MambaModel

    config = HFMambaConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYER, state_size=D_STATE, use_cache=False
    )
    model = MambaModel(config).eval()
    return lambda ids: model(ids).last_hidden_state


def build_bert(max_len: int, dtype: torch.dtype = torch.float32) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers import BertConfig, BertModel

    config = BertConfig(max_position_embeddings=max_len)  # BERT-base: 768 wide, 12 layers, 12 heads
    model = BertModel(config, add_pooling_layer=False).eval().to(dtype)
    return lambda ids: model(ids % config.vocab_size).last_hidden_state


def build_gemm_floor(
    linear: Callable = ops.linear, dtype: torch.dtype = torch.float32
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The four projections of every layer (in_proj, x_proj, dt_proj, out_proj) as plain matmuls, nothing else."""
    d_inner, dt_rank = 2 * D_MODEL, D_MODEL // 16
    g = torch.Generator().manual_seed(0)

    def weight(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g) / cols**0.5).to(dtype)

    layers = [
        (weight(2 * d_inner, D_MODEL), weight(dt_rank + 2 * D_STATE, d_inner), weight(d_inner, dt_rank),
         weight(D_MODEL, d_inner))
        for _ in range(N_LAYER)
    ]  # fmt: skip
    inputs = torch.randn(1024, D_MODEL, generator=g).to(dtype)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        hidden = inputs[ids % len(inputs)]  # (B, L, D)
        for in_w, x_w, dt_w, out_w in layers:
            x = linear(hidden, in_w)[..., :d_inner]  # a strided view, as in the model
            dt = linear(linear(x, x_w)[..., :dt_rank], dt_w)
            hidden = linear(dt, out_w)
        return hidden

    return forward


def time_runs(fn: Callable[..., object], runs: int, *args, warmups: int = 1) -> list[float]:
    """Wall-clock seconds of ``fn(*args)``, ``runs`` times after ``warmups`` untimed calls."""
    for _ in range(warmups):
        fn(*args)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return times


def throughput(build: Callable[[], Callable], shapes: list[tuple[int, int]], runs: int) -> list[dict]:
    model = build()
    rows = []
    for batch, length in shapes:
        ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))
        with torch.inference_mode():
            times = time_runs(model, runs, ids)
        seconds = statistics.median(times)
        rows.append({"shape": f"{batch} x {length}", "tok_s": batch * length / seconds, "runs": runs, "s": seconds})
        print(f"  {batch} x {length}: {batch * length / seconds:,.0f} tok/s (median of {runs}: {seconds:.2f} s)")
    return rows


def bf16_agreement(batch: int, length: int) -> dict[str, float]:
    """How far st-mamba's bf16 forward is from its fp32 forward, same weights and tokens.

    The last token's hidden state is what an EOS-pooled encoder returns (before normalising), so its
    cosine to fp32 is what retrieval sees; the max abs difference over all tokens is for scale.
    """
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        exact = build_st_mamba()(ids)
        bf16 = build_st_mamba(torch.bfloat16)(ids).float()
    cosine = F.cosine_similarity(bf16[:, -1], exact[:, -1], dim=-1)
    return {"min_cosine": cosine.min().item(), "max_abs": (bf16 - exact).abs().max().item(),
            "max_abs_fp32": exact.abs().max().item()}  # fmt: skip


def breakdown(batch: int, length: int, runs: int) -> dict[str, float]:
    """Seconds per forward of st-mamba's parts at one shape.

    The parts are timed back to back in every run (the whole forward, the GEMM floor, 24 convolutions,
    24 scans on one layer's inputs), so that a change of load on the machine touches them all alike.
    """
    model = build_st_mamba()
    gemm = build_gemm_floor()
    mixer, d_inner = model.layers[0].mixer, model.config.d_inner
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        x_in, z = mixer.in_proj(torch.randn(batch, length, D_MODEL)).split(d_inner, dim=-1)  # strided views
        x = ops.causal_conv1d(x_in, mixer.conv1d.weight[:, 0], mixer.conv1d.bias)
        dt, B, C = mixer.x_proj(x).split([mixer.config.dt_rank, D_STATE, D_STATE], dim=-1)
        dt = ops.linear(dt, mixer.dt_proj.weight)
        A = -torch.exp(mixer.A_log.float())

        def convolutions() -> None:
            for _ in range(N_LAYER):
                ops.causal_conv1d(x_in, mixer.conv1d.weight[:, 0], mixer.conv1d.bias)

        def scans() -> None:
            for _ in range(N_LAYER):
                ops.selective_scan(x, dt, A, B, C, mixer.D, z=z, dt_bias=mixer.dt_proj.bias, dt_softplus=True)

        parts = {
            "whole forward": (model, ids),
            "four projections (GEMM floor, ops.linear)": (gemm, ids),
            "convolution": (convolutions,),
            "selective scan": (scans,),
        }
        times = {name: time_runs(fn, 0, *args) for name, (fn, *args) in parts.items()}  # warm-ups
        for _ in range(runs):
            for name, (fn, *args) in parts.items():
                times[name] += time_runs(fn, 1, *args, warmups=0)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    measured_parts = sum(t for name, t in seconds.items() if name != "whole forward")
    seconds["the rest (norms, residuals, embedding, glue)"] = seconds["whole forward"] - measured_parts
    return seconds


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model_name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line)
    except (OSError, StopIteration, subprocess.SubprocessError):
        model_name = platform.processor() or "unknown CPU"
    import transformers

    mkl = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    return (
        f"{model_name}, {os.cpu_count()} cores visible, torch {torch.__version__} ({mkl}, "
        f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), transformers {transformers.__version__}"
    )


def render(results: dict) -> str:
    shapes = [row["shape"] for row in next(iter(results["throughput"].values()))]
    lines = [
        SECTION,
        "",
        f"Measured {results['date']} on {results['machine']}, with "
        f"`{results['command']}`. fp32 unless a row says bf16, random weights, inference mode, median of the runs after one "
        f"warm-up. Other processes shared the machine (load average {results['load_before']:.1f} before, "
        f"{results['load_after']:.1f} after, on {os.cpu_count()} cores), so the numbers are noisy; compare "
        "rows of the same run.",
        "",
        "| model (mamba-130m shape unless named) | " + " | ".join(f"{s} tok/s" for s in shapes) + " | runs |",
        "|---|" + "---|" * len(shapes) + "---|",
    ]
    for name, rows in results["throughput"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['tok_s']:,.0f}" for r in rows) + f" | {rows[0]['runs']} |")
    lines += [
        "",
        f'Rows marked "{KEPT}" ran after `st_mamba.ops.cpu.keep_freed_memory()` (opt-in, process-wide; '
        "the same as starting Python with `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:"
        "glibc.malloc.trim_threshold=2147483647`): by default glibc maps each large tensor afresh and "
        "its pages fault in on first touch. How often depends on what the process allocated before "
        "(glibc adapts its threshold), so the default rows move between runs more than the others.",
        "",
    ]
    if "bf16_agreement" in results:
        agreement = results["bf16_agreement"]
        lines += [
            f'Rows marked "{BF16}" hold every weight in bfloat16 (`model.to(torch.bfloat16)`, or '
            '`model_kwargs={"torch_dtype": "bfloat16"}` when loading a SentenceTransformer): the matmuls run '
            "in bf16 with fp32 accumulation (oneDNN), the scan and the convolution in fp32 on bf16 inputs. "
            f"Against the fp32 forward at {results['breakdown_shape'].split(',')[0]} (same weights, same tokens), "
            f"the last token's hidden state (the EOS embedding) has cosine >= {agreement['min_cosine']:.5f}; "
            f"the largest abs difference over all tokens is {agreement['max_abs']:.3g} (largest fp32 value "
            f"{agreement['max_abs_fp32']:.3g}).",
            "",
        ]
    lines += [
        f"Where st-mamba's time goes at {results['breakdown_shape']} (seconds per forward, 24 layers; "
        "each part timed on its own, back to back):",
        "",
    ]
    lines += ["| part | seconds | share |", "|---|---|---|"]
    whole = results["breakdown"]["whole forward"]
    for part, seconds in results["breakdown"].items():
        if seconds < 0:  # the rest is a difference of medians: below zero it is lost in the noise
            lines.append(f"| {part} | {seconds:.3f} (within the noise) | ~0% |")
        else:
            lines.append(f"| {part} | {seconds:.3f} | {seconds / whole:.0%} |")
    lines += ["", f"st-mamba backends: {results['backends']}.", "", "![CPU throughput](benchmarks_cpu.png)", ""]
    return "\n".join(lines)


def update_docs(section: str, doc: Path) -> None:
    """Replace (or append) the CPU section of the benchmarks page, leaving every other section alone."""
    lines = doc.read_text().splitlines() if doc.exists() else ["# Benchmarks", ""]
    start = next((i for i, line in enumerate(lines) if line.startswith(SECTION)), None)
    if start is None:
        lines += [""] if lines and lines[-1].strip() else []
        start = end = len(lines)
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    new = lines[:start] + section.rstrip("\n").splitlines() + [""] + lines[end:]
    doc.write_text("\n".join(new).rstrip("\n") + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["throughput"])
    shapes = [row["shape"] for row in results["throughput"][names[0]]]
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [row["tok_s"] for row in results["throughput"][name]]
        bars = ax.bar([j + i * width for j in range(len(shapes))], values, width, label=name)
        ax.bar_label(bars, [f"{v:,.0f}" for v in values], fontsize=7)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(shapes))], [f"{s} tokens" for s in shapes])
    ax.set_ylabel("tokens / s (higher is better)")
    capability = torch.backends.cpu.get_cpu_capability()  # what PyTorch's own kernels use (ATEN_CPU_CAPABILITY)
    ax.set_title(f"CPU encoding, {os.cpu_count()} cores, {capability} ({results['date']})")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short inputs, one run each")
    parser.add_argument("--docs-dir", type=Path, help="where benchmarks.md and the plot go (default: docs/)")
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    runs = {name: 1 for name in RUNS} if args.quick else RUNS
    docs_dir = args.docs_dir or (None if args.quick else ROOT / "docs")

    # 1. Throughput of each model at each shape.
    load_before = os.getloadavg()[0]
    builders = {
        "st-mamba": build_st_mamba,
        "GEMM floor (ops.linear)": build_gemm_floor,
        "GEMM floor (F.linear)": lambda: build_gemm_floor(F.linear),
        "BERT-base": lambda: build_bert(max(length for _, length in shapes)),
        "transformers Mamba (slow path)": build_hf_mamba,
    }
    results = {"throughput": {}}
    for name, build in builders.items():
        print(f"{name}:")
        results["throughput"][name] = throughput(build, shapes, runs[name])
    backends = sorted({f"{op}={backend}" for op, backend, _ in ops._announced})

    # 2. The same two models once malloc keeps freed memory (process-wide, so after the rows above).
    kept = cpu.keep_freed_memory()
    if kept:
        for name in ("st-mamba", "BERT-base"):
            print(f"{name}, {KEPT}:")
            results["throughput"][f"{name}, {KEPT}"] = throughput(builders[name], shapes, runs[name])

    # 3. bf16 weights, where this CPU multiplies bf16 natively (else bf16 would only be slower).
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        bf16_builders = {
            "st-mamba": lambda: build_st_mamba(torch.bfloat16),
            "GEMM floor (ops.linear)": lambda: build_gemm_floor(dtype=torch.bfloat16),
            "BERT-base": lambda: build_bert(max(length for _, length in shapes), torch.bfloat16),
        }
        label = f"{BF16}, {KEPT}" if kept else BF16
        for name, build in bf16_builders.items():
            print(f"{name}, {label}:")
            results["throughput"][f"{name}, {label}"] = throughput(build, shapes, runs[name])
        results["bf16_agreement"] = bf16_agreement(*shapes[0])
        print(f"bf16 against fp32: {results['bf16_agreement']}")
    else:
        print("no native bf16 matmul on this CPU (oneDNN): the bf16 rows are skipped")

    # 4. Where st-mamba's time goes, without the page faults where malloc now keeps freed memory.
    batch, length = shapes[0]
    results["breakdown"] = breakdown(batch, length, runs["st-mamba"])
    results.update(
        breakdown_shape=f"{batch} x {length}" + (f", {KEPT}" if kept else ""),
        backends=", ".join(backends),
        machine=machine(),
        date=datetime.date.today().isoformat(),
        command="python benchmarks/bench_cpu.py" + (" --quick" if args.quick else ""),
        load_before=load_before,
        load_after=os.getloadavg()[0],
    )

    # 5. The section of docs/benchmarks.md, the plot, and the table last.
    section = render(results)
    if docs_dir is not None:
        docs_dir.mkdir(parents=True, exist_ok=True)
        update_docs(section, docs_dir / "benchmarks.md")
        plot(results, docs_dir / "benchmarks_cpu.png")
        print(f"\nwrote {docs_dir / 'benchmarks.md'} ({SECTION} section) and {docs_dir / 'benchmarks_cpu.png'}")
    print()
    print(section)


if __name__ == "__main__":
    main()
