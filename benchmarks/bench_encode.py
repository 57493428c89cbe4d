"""GPU encoding throughput: st-mamba against transformers' Mamba with mamba-ssm kernels, BERT and Pythia.

All in one process on one GPU, bf16, random weights (speed does not depend on training), 65,536
tokens per batch (batch = 65,536 / L), median of several timed runs after warm-ups (CUDA events):

1. tokens/s, docs/s and peak memory, forward only (inference mode) and forward + backward, for
   st-mamba with the mamba-130m, mamba-370m, mamba2-130m and mamba2-370m shapes; transformers' MambaModel /
   Mamba2Model with the mamba-ssm and causal-conv1d kernels (rows skipped when those are not
   importable); BERT-base/-large and Pythia-160m/-410m with SDPA; L = 512, 2048, 8192, 32768.
2. the GEMM floor of the mamba-130m shape (its four projections alone) and the per-operation
   times of the Triton kernels (and of mamba-ssm's, when importable): what the dispatcher's
   choice rests on.
3. ``model.encode`` on real text (the SciFact corpus, GPT-NeoX tokenizer, max 512 tokens):
   docs/s including tokenisation, packed against padded batches.
4. one long document (SciFact abstracts end to end: 8K and 1M tokens) through ``model.encode``
   with ``chunk_size``: peak GPU memory of the streamed read against the one-pass read.

It prints a table last and writes, into ``--out-dir``, results.json, the "## GPU" section
of docs/benchmarks.md (gpu_section.md) and the plot of tokens/s against length (benchmarks_gpu.png).
``--update-docs`` splices that section into docs/benchmarks.md, leaving other sections alone, and
keeps the results beside it (docs/benchmarks_gpu.json), so that a later run of some rows can
``--merge`` them: each row and part remembers the run that measured it (command, date, versions), and
each table of the section comes from one run, named above it.

Run (on the GPU machine; the mamba-ssm rows need mamba-ssm and causal-conv1d installed). ../shared
does not travel to the device: ``.bench_data/`` is an ignored folder holding copies of
../shared/data/scifact and ../shared/assets/gpt-neox-20b, carried with the call:

    python benchmarks/bench_encode.py --corpus .bench_data/scifact/corpus.jsonl \
        --tokenizer .bench_data/gpt-neox-20b --out-dir bench_out
    python benchmarks/bench_encode.py --from-json bench_out/results.json --update-docs   # re-render, no GPU
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## GPU"
LINEAR_RATE = 790e12  # bf16 matmul FLOP/s measured on the H200 (../shared/anchors/README.md)

# name -> (family, shape); shapes are those of the public checkpoints.
MODELS = {
    "st-mamba-130m": ("st", dict(d_model=768, n_layer=24, vocab_size=50280, d_state=16)),
    "st-mamba-370m": ("st", dict(d_model=1024, n_layer=48, vocab_size=50280, d_state=16)),
    "st-mamba2-130m": ("st", dict(d_model=768, n_layer=24, vocab_size=50280, version=2, d_state=128, headdim=64)),
    "st-mamba2-370m": ("st", dict(d_model=1024, n_layer=48, vocab_size=50280, version=2, d_state=128, headdim=64)),
    "hf-mamba-130m": ("hf", dict(hidden_size=768, num_hidden_layers=24, state_size=16)),
    "hf-mamba-370m": ("hf", dict(hidden_size=1024, num_hidden_layers=48, state_size=16)),
    "hf-mamba2-130m": ("hf2", dict(hidden_size=768, num_hidden_layers=24, state_size=128, head_dim=64, num_heads=24)),
    "hf-mamba2-370m": ("hf2", dict(hidden_size=1024, num_hidden_layers=48, state_size=128, head_dim=64, num_heads=32)),
    "bert-base": ("bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)),
    "bert-large": (
        "bert",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    ),
    "pythia-160m": (
        "neox",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    ),
    "pythia-410m": (
        "neox",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    ),
}


# Forward tok/s at L = 512, 2048, 8192, 32768 from the team's anchor run on the same H200 and software
# (../shared/anchors/README.md, bench_anchor.py: bf16, 65,536 tokens per batch). Shown, marked as
# such, for the models that a run did not measure itself.
ANCHORS = {
    "hf-mamba-130m": [425e3, 405e3, 393e3, 375e3],
    "hf-mamba-370m": [155e3, 148e3, 143e3, 140e3],
    "hf-mamba2-130m": [563e3, 566e3, 567e3, 560e3],
    "bert-base": [2227e3, 1747e3, 942e3, 332e3],
    "bert-large": [726e3, 587e3, 334e3, 122e3],
    "pythia-160m": [1623e3, 1472e3, 1075e3, 522e3],
    "pythia-410m": [554e3, 502e3, 375e3, 188e3],
}
ANCHOR_LENGTHS = [512, 2048, 8192, 32768]


# --- building the models ------------------------------------------------------------------------


def build(name: str, max_len: int) -> torch.nn.Module:
    family, shape = MODELS[name]
    if family == "st":
        from st_mamba import MambaBackbone, MambaConfig

        return MambaBackbone(MambaConfig(**shape)).reset_parameters(seed=0)
    import transformers as tf

    if family == "hf":
        return tf.MambaModel(tf.MambaConfig(vocab_size=50280, use_cache=False, **shape))
    if family == "hf2":
        return tf.Mamba2Model(tf.Mamba2Config(vocab_size=50280, n_groups=1, expand=2, use_cache=False, **shape))
    if family == "bert":
        config = tf.BertConfig(max_position_embeddings=max_len + 8, **shape)
        config._attn_implementation = "sdpa"
        return tf.BertModel(config, add_pooling_layer=False)
    config = tf.GPTNeoXConfig(vocab_size=50304, max_position_embeddings=max_len + 8, use_cache=False, **shape)
    config._attn_implementation = "sdpa"
    return tf.GPTNeoXModel(config)


def hf_mamba_kernels_available() -> bool:
    try:
        import causal_conv1d  # noqa: F401
        import mamba_ssm  # noqa: F401
    except ImportError:
        return False
    return True


def st_backends() -> str:
    """Which backends st-mamba's dispatcher takes on CUDA in this process."""
    from st_mamba import ops

    if ops._ssd_on_triton(torch.device("cuda")):
        ssd = "st-mamba SSD (Triton)"
    else:
        ssd = "mamba-ssm SSD (Triton)" if ops._mamba_ssm_chunk_scan is not None else "PyTorch chunked SSD"
    return f"scan/conv: {'triton' if ops._triton is not None else 'no triton'}; Mamba-2 scan: {ssd}"


# --- timing -------------------------------------------------------------------------------------


def time_cuda(fn, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, after ``warmup`` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def forward_fn(model: torch.nn.Module, family: str, ids: torch.Tensor):
    if family == "st":
        return lambda: model(ids)
    return lambda: model(input_ids=ids).last_hidden_state


def run_model(
    name: str, lengths: list[int], bwd_lengths: list[int], tokens: int, reps: int, modes: list[str], deadline: float
) -> list[dict]:
    family = MODELS[name][0]
    torch.manual_seed(0)
    model = build(name, max(lengths)).to("cuda", torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    embedding_weight = model.embeddings.weight if family == "st" else model.get_input_embeddings().weight
    embedding, vocab_size = embedding_weight.numel(), embedding_weight.shape[0]
    rows = []
    for mode in modes:
        for length in lengths if mode == "fwd" else bwd_lengths:
            if time.time() > deadline:
                print(f"{name} {mode} L={length}: skipped (time budget)", flush=True)
                continue
            batch = max(1, tokens // length)
            ids = torch.randint(0, vocab_size, (batch, length), device="cuda")  # BERT's vocabulary is 30,522
            forward = forward_fn(model, family, ids)
            if mode == "fwd":

                def step(forward=forward):
                    with torch.inference_mode():
                        forward()

            else:
                model.zero_grad(set_to_none=True)

                def step(forward=forward):
                    forward().float().square().mean().backward()

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                ms = time_cuda(step, reps if mode == "fwd" else max(3, reps // 2))
            except Exception as exc:  # noqa: BLE001 - report and go on with the other rows
                print(f"{name} {mode} L={length}: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                torch.cuda.empty_cache()
                continue
            tok_s = batch * length / (ms / 1e3)
            flops_per_token = 2 * (params - embedding) * (3 if mode == "fwdbwd" else 1)
            row = dict(
                model=name, mode=mode, L=length, batch=batch, ms=round(ms, 2), tok_s=round(tok_s),
                docs_s=round(batch / (ms / 1e3), 1), mfu_lin=round(flops_per_token * tok_s / LINEAR_RATE, 3),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), params_m=round(params / 1e6, 1),
            )  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


# --- floors and per-operation times --------------------------------------------------------------


def gemm_floor(tokens: int, reps: int) -> dict:
    """The mamba-130m shape's four projections alone, 24 layers: the matmul floor of its forward."""
    d, d_inner, d_state, rank, layers = 768, 1536, 16, 48, 24
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(o, i, device="cuda", dtype=torch.bfloat16) / i**0.5 for o, i in
               [(2 * d_inner, d), (rank + 2 * d_state, d_inner), (d_inner, rank), (d, d_inner)]]  # fmt: skip
    w_in, w_x, w_dt, w_out = weights

    def gemms():
        h = x
        for _ in range(layers):
            u = (h @ w_in.T)[:, :d_inner]
            dt = (u @ w_x.T)[:, :rank] @ w_dt.T
            h = (u * dt) @ w_out.T

    ms = time_cuda(gemms, reps)
    return dict(what="GEMM floor, mamba-130m shape (4 projections x 24 layers)", ms=round(ms, 2),
                tok_s=round(tokens / (ms / 1e3)))  # fmt: skip


# (channels per program, warps): the forward scan's launch shapes timed in the per-operation table.
# Registers per thread of the padded forward (benchmarks/kernel_dev/ptx_loads.py, sm_90): 168 /
# 254 / 96 / 96, i.e. at most 12 / 8 / 21 / 20 warps an SM.
SCAN_SHAPES = [(64, 1), (128, 1), (32, 1), (64, 2)]


def time_scan_shapes(scan, reps: int, rows: list[dict]) -> None:
    """Time the forward scan with each launch shape, then give the library's default back.

    The model rows run with the library's default: a shape that wins here (one 512-token layer) can
    lose elsewhere (128 x 1 tied 64 x 1 at 512 tokens and lost 6-7% at 2K and 32K, whole models, H200).
    """
    from st_mamba.ops import triton as triton_ops

    default = triton_ops.SCAN_FWD_BLOCK_D, triton_ops.SCAN_FWD_WARPS
    for block_d, warps in SCAN_SHAPES:
        triton_ops.SCAN_FWD_BLOCK_D, triton_ops.SCAN_FWD_WARPS = block_d, warps
        with torch.inference_mode():
            us = time_cuda(scan, reps) * 1e3
        rows.append(dict(op=f"scan triton, {block_d} channels x {warps} warp", dtype="bfloat16", us=round(us, 1)))
        print(json.dumps(rows[-1]), flush=True)
    triton_ops.SCAN_FWD_BLOCK_D, triton_ops.SCAN_FWD_WARPS = default


def op_times(tokens: int, reps: int) -> list[dict]:
    """Microseconds per call of the scan and the convolution, mamba-130m layer shape, 512-token rows."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        causal_conv1d_fn = selective_scan_fn = None
    length, d_inner, d_state = 512, 1536, 16
    batch = tokens // length
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        _time_ops(dtype, batch, length, d_inner, d_state, reps, rows, selective_scan_fn, causal_conv1d_fn)
    return rows


def _time_ops(dtype, batch, length, d_inner, d_state, reps, rows, selective_scan_fn, causal_conv1d_fn) -> None:
    """Append the per-call times of each backend's scan and convolution in ``dtype`` to ``rows``."""
    from st_mamba.ops import triton as triton_ops

    g = torch.Generator(device="cuda").manual_seed(0)
    xz = torch.randn(batch, length, 2 * d_inner, device="cuda", dtype=dtype, generator=g)
    x, z = xz.split(d_inner, dim=-1)
    dt = torch.randn(batch, length, d_inner, device="cuda", dtype=dtype, generator=g) - 4
    bc = torch.randn(batch, length, 2 * d_state + 48, device="cuda", dtype=dtype, generator=g)
    B, C = bc[..., 48 : 48 + d_state], bc[..., 48 + d_state :]
    A = -torch.rand(d_inner, d_state, device="cuda", generator=g) * 8
    D, bias = torch.ones(d_inner, device="cuda"), torch.zeros(d_inner, device="cuda")
    w, wb = torch.randn(d_inner, 4, device="cuda", dtype=dtype), torch.randn(d_inner, device="cuda", dtype=dtype)
    candidates = {
        "scan triton": lambda: triton_ops.selective_scan_triton(x, dt, A, B, C, D, z, bias, True),
        "conv triton": lambda: triton_ops.causal_conv1d_triton(x, w, wb),
    }
    if dtype == torch.bfloat16:
        time_scan_shapes(lambda: triton_ops.selective_scan_triton(x, dt, A, B, C, D, z, bias, True), reps, rows)
    if selective_scan_fn is not None:
        # mamba-ssm wants (B, Di, L): what our dispatcher hands it (its transposes/copies included).
        def scan_mamba_ssm():
            xt, dtt, zt = x.transpose(1, 2), dt.transpose(1, 2), z.transpose(1, 2)
            y = selective_scan_fn(xt, dtt, A, B.transpose(1, 2), C.transpose(1, 2), D, z=zt,
                                  delta_bias=bias, delta_softplus=True)  # fmt: skip
            return y.transpose(1, 2)

        candidates["scan mamba-ssm"] = scan_mamba_ssm
        candidates["conv causal-conv1d"] = lambda: causal_conv1d_fn(x.transpose(1, 2), w, wb, activation="silu")
    for what, fn in candidates.items():
        with torch.inference_mode():
            ms = time_cuda(fn, reps)
        rows.append(dict(op=what, dtype=str(dtype).replace("torch.", ""), us=round(ms * 1e3, 1),
                         batch=batch, L=length))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)


# --- model.encode on real text -----------------------------------------------------------------


def encode_benchmark(corpus: Path, tokenizer: Path, max_docs: int) -> list[dict]:
    from st_mamba import MambaConfig, from_config

    docs = []
    with open(corpus) as f:
        for line in f:
            row = json.loads(line)
            docs.append((row.get("title", "") + " " + row.get("text", "")).strip())
            if len(docs) >= max_docs:
                break
    model = from_config(MambaConfig(**MODELS["st-mamba-130m"][1]), tokenizer, max_seq_length=512, seed=0,
                        device="cuda")  # fmt: skip
    model.to(torch.bfloat16)
    encoder = model[0]
    n_tokens = sum(min(len(ids), 511) + 1 for ids in encoder.tokenizer(docs, add_special_tokens=False)["input_ids"])
    rows = []
    settings = [
        ("packed", 32, True),
        ("packed", 256, True),
        ("padded", 256, True),
        ("packed", 256, False),
    ]
    for layout, batch_size, to_tensor in settings:
        encoder.chunk_size = None if layout == "packed" else 10**9  # a chunk_size no batch reaches: padded
        model.encode(docs[:512], batch_size=batch_size, convert_to_tensor=to_tensor)  # warm-up (compiles)
        torch.cuda.synchronize()
        best = math.inf
        for _ in range(2):
            start = time.perf_counter()
            out = model.encode(docs, batch_size=batch_size, convert_to_tensor=to_tensor)
            if to_tensor:
                out.cpu()
            best = min(best, time.perf_counter() - start)
        row = dict(layout=layout, batch_size=batch_size, output="tensor" if to_tensor else "numpy", docs=len(docs),
                   tokens=n_tokens, seconds=round(best, 3), docs_s=round(len(docs) / best, 1),
                   tok_s=round(n_tokens / best))  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    encoder.chunk_size = None
    return rows


def streaming_memory(corpus: Path, tokenizer: Path, lengths: list[int], chunk: int) -> list[dict]:
    """Peak GPU memory of ``model.encode`` on one long document, read ``chunk`` tokens at a time.

    The document is SciFact abstracts end to end, cut to each length (EOS included). A document of at
    most ``chunk`` tokens is read in one pass; a longer one streams, carrying the SSM and conv states.
    "above weights" is the peak minus what the model held before the call.
    """
    from st_mamba import MambaConfig, from_config

    model = from_config(MambaConfig(**MODELS["st-mamba-130m"][1]), tokenizer, max_seq_length=None, chunk_size=chunk,
                        seed=0, device="cuda").to(torch.bfloat16)  # fmt: skip
    encoder = model[0]
    ids: list[int] = []
    with open(corpus) as f:
        for line in f:
            row = json.loads(line)
            ids += encoder.tokenizer((row.get("title", "") + " " + row.get("text", "")).strip() + "\n\n",
                                     add_special_tokens=False)["input_ids"]  # fmt: skip
            if len(ids) >= max(lengths):
                break
    ids *= -(-max(lengths) // len(ids))  # a corpus shorter than the longest length is repeated
    rows = []
    for n in [lengths[0], *lengths]:  # the first length twice: its first run also compiles the kernels
        keep = n - 1  # decoded ids can tokenise to a few more: cut by the excess until the text holds n - 1
        while True:
            text = encoder.tokenizer.decode(ids[:keep])
            tokens = len(encoder.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # and its EOS
            if tokens <= n:
                break
            keep -= tokens - n
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        model.encode([text], batch_size=1, convert_to_tensor=True).cpu()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
        row = dict(tokens=tokens, chunk=chunk, streamed=tokens > chunk, peak_mib=round(peak / 2**20, 1),
                   above_weights_mib=round((peak - before) / 2**20, 1), seconds=round(seconds, 2),
                   tok_s=round(tokens / seconds))  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows[1:]


# --- report -------------------------------------------------------------------------------------


def _run_line(run: dict) -> str:
    """Where, when and with what a run of record measured: the line above each of its tables."""
    versions = f"torch {run['torch']}, triton {run['triton']}, transformers {run['transformers']}"
    if run.get("mamba_ssm"):
        versions += f", mamba-ssm {run['mamba_ssm']} and causal-conv1d built from source"
    return f"Measured {run['date']} on one {run['gpu']} ({versions}) with `{run['command']}`."


def _k(value: float) -> str:
    return f"{value / 1e3:,.0f}K"


def throughput_table(rows: list[dict], mode: str) -> str:
    lengths = sorted({r["L"] for r in rows if r["mode"] == mode})
    if not lengths:
        return ""
    names = [n for n in MODELS if any(r["model"] == n and r["mode"] == mode for r in rows)]
    head = "| model | " + " | ".join(f"L={n}" for n in lengths) + " | docs/s at 512 | MFU(lin) at 512 | peak GiB |"
    lines = [head, "|---" * (len(lengths) + 4) + "|"]
    for name in names:
        by_len = {r["L"]: r for r in rows if r["model"] == name and r["mode"] == mode}
        cells = [_k(by_len[n]["tok_s"]) if n in by_len else "-" for n in lengths]
        first = by_len.get(512)
        extra = [f"{first['docs_s']:,.0f}", f"{first['mfu_lin']:.2f}"] if first else ["-", "-"]
        peak = max(r["peak_gib"] for r in by_len.values())
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(extra) + f" | {peak:.1f} |")
    return "\n".join(lines)


def render(results: dict) -> str:
    """The "## GPU" section: each table from one run of record, named above it."""
    rows, meta = results["rows"], results["meta"]
    runs, part_runs = meta["runs"], results.get("part_runs", {})
    parts = [
        SECTION,
        "",
        f"bf16, random weights (speed does not depend on training), {meta['tokens']:,} tokens per batch "
        f"(batch = {meta['tokens']:,} / L), median of timed runs after warm-ups (CUDA events). st-mamba backends: "
        f"{meta['st_backends']}. hf-* = transformers' MambaModel / Mamba2Model with the mamba-ssm and causal-conv1d "
        "kernels. BERT and Pythia use SDPA. MFU(lin) = 2 x non-embedding parameters x tokens/s (x3 with backward) / "
        "790 TFLOP/s, the H200's measured bf16 matmul rate (the H100 SXM's data sheet gives the same peak as the H200's).",
        "",
    ]
    for index in sorted({r["run"] for r in rows}, reverse=True):  # the newest run first
        run_rows = [r for r in rows if r["run"] == index]
        names = ", ".join(n for n in MODELS if any(r["model"] == n for r in run_rows))
        parts += [f"### Tokens/s: {names}", "", _run_line(runs[index]), ""]
        for mode, title in (("fwd", "Forward (inference)"), ("fwdbwd", "Forward + backward")):
            table = throughput_table(run_rows, mode)
            if table:
                parts += [f"{title}:", "", table, ""]
    measured = {r["model"] for r in rows if r["mode"] == "fwd"}
    missing = [name for name in ANCHORS if name not in measured]
    if missing:
        parts += [
            "### Tokens/s, forward: models no run above measured",
            "",
            "From the team's anchor run on the same H200 and software (../shared/anchors/bench_anchor.py, "
            "same settings; transformers with mamba-ssm 2.3.2.post1 and causal-conv1d 1.7.0 built from source).",
            "",
            "| model (anchor run) | " + " | ".join(f"L={n}" for n in ANCHOR_LENGTHS) + " |",
            "|---" * (len(ANCHOR_LENGTHS) + 1) + "|",
            *[f"| {name} | " + " | ".join(_k(v) for v in ANCHORS[name]) + " |" for name in missing],
            "",
        ]
    parts += ["![tokens/s against length, forward](benchmarks_gpu.png)", ""]
    if results.get("floor"):
        floor = results["floor"]
        parts += ["### Matmul floor", "", _run_line(runs[part_runs["floor"]]), "",
                  f"{floor['what']}: {_k(floor['tok_s'])} tok/s ({floor['ms']} ms per batch).", ""]  # fmt: skip
    if results.get("ops"):
        parts += ["### Per operation (mamba-130m layer, 128 x 512 tokens), microseconds", "",
                  _run_line(runs[part_runs["ops"]]), "",
                  "| operation | bf16 | fp16 | fp32 |", "|---|---|---|---|"]  # fmt: skip
        for op in dict.fromkeys(r["op"] for r in results["ops"]):
            by_dtype = {r["dtype"]: r["us"] for r in results["ops"] if r["op"] == op}
            cells = [f"{by_dtype[d]:,.0f}" if d in by_dtype else "-" for d in ("bfloat16", "float16", "float32")]
            parts.append(f"| {op} | " + " | ".join(cells) + " |")
        parts.append("")
    if results.get("encode"):
        enc = results["encode"]
        parts += [
            f"### model.encode on SciFact ({enc[0]['docs']:,} abstracts, {enc[0]['tokens']:,} tokens with EOS, "
            "GPT-NeoX tokenizer, max 512 tokens), st-mamba-130m shape, bf16",
            "",
            _run_line(runs[part_runs["encode"]]),
            "Wall time of the whole call: tokenisation, batching, forward, results back in input order.",
            "",
            "| batches | batch_size | output | seconds | docs/s | tok/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in enc:
            parts.append(f"| {r['layout']} | {r['batch_size']} | {r['output']} | {r['seconds']} | "
                         f"{r['docs_s']:,.0f} | {_k(r['tok_s'])} |")  # fmt: skip
        parts.append("")
    if results.get("stream"):
        stream = results["stream"]
        parts += [
            f"### One long document, streamed {stream[0]['chunk']:,} tokens at a time (st-mamba-130m shape, bf16)",
            "",
            _run_line(runs[part_runs["stream"]]),
            "`model.encode([text])` with `chunk_size` set: wall time of the call (tokenisation included) and",
            "peak GPU memory (`torch.cuda.max_memory_allocated`), in all and above the model's own weights.",
            "",
            "| tokens | read | peak MiB | above weights MiB | seconds | tok/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in stream:
            read = "streamed" if r["streamed"] else "one pass"
            parts.append(f"| {r['tokens']:,} | {read} | {r['peak_mib']:,.0f} | {r['above_weights_mib']:,.0f} | "
                         f"{r['seconds']} | {_k(r['tok_s'])} |")  # fmt: skip
        short, long = stream[0], stream[-1]
        parts += ["", f"Peak of {long['tokens']:,} tokens against {short['tokens']:,}: "
                  f"{long['peak_mib'] / short['peak_mib']:.2f}x in all, "
                  f"{long['above_weights_mib'] / short['above_weights_mib']:.2f}x above the weights.", ""]  # fmt: skip
    return "\n".join(parts)


def drop_unused_runs(results: dict) -> None:
    """Keep only the runs that some row or part still comes from, renumbering the references."""
    part_runs = results.setdefault("part_runs", {})
    used = sorted({r["run"] for r in results["rows"]} | set(part_runs.values()))
    renumber = {old: new for new, old in enumerate(used)}
    results["meta"]["runs"] = [results["meta"]["runs"][old] for old in used]
    for r in results["rows"]:
        r["run"] = renumber[r["run"]]
    for part in part_runs:
        part_runs[part] = renumber[part_runs[part]]


def run_command(argv: list[str]) -> str:
    """The command line of this run as written in the docs: relative to the repository, without the
    options that only say where results go or which earlier results to keep (--out-dir, --merge)."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in ("--out-dir", "--merge"):
            skip_next = True
        elif not arg.startswith(("--out-dir=", "--merge=")):
            kept.append(arg)
    return " ".join(["python benchmarks/bench_encode.py", *kept])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs = results["meta"]["runs"]

    def card(run: dict) -> str:  # "NVIDIA H100 80GB HBM3" -> "H100"
        return run["gpu"].removeprefix("NVIDIA ").split()[0]

    gpus = sorted({card(run) for run in runs})
    for name in MODELS:
        rows = [r for r in results["rows"] if r["model"] == name and r["mode"] == "fwd"]
        if rows:
            points = sorted((r["L"], r["tok_s"]) for r in rows)
            style = "-" if name.startswith("st-") else ("--" if name.startswith("hf-") else ":")
            cards = sorted({card(runs[r["run"]]) for r in rows})
            label = f"{name} ({', '.join(cards)})" if len(gpus) > 1 else name  # rows of several cards: say which
            ax.plot([p[0] for p in points], [p[1] / 1e6 for p in points], style, marker="o", label=label)
    measured = {r["model"] for r in results["rows"] if r["mode"] == "fwd"}
    for name, values in ANCHORS.items():
        if name not in measured:
            style = "--" if name.startswith("hf-") else ":"
            ax.plot(
                ANCHOR_LENGTHS, [v / 1e6 for v in values], style, marker=".", alpha=0.6, label=f"{name} (anchor, H200)"
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L (tokens; 65,536 tokens per batch)")
    ax.set_ylabel("forward throughput (M tokens/s)")
    ax.set_title(f"Encoding throughput on one GPU ({', '.join(gpus)}), bf16")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def update_docs(section: str, doc: Path = DOC) -> None:
    """Replace (or append) the GPU section of docs/benchmarks.md, leaving every other section alone."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + section.rstrip("\n").splitlines() + [""] + lines[end:]).rstrip("\n") + "\n"
    doc.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--lengths", default="512,2048,8192,32768")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--bwd-lengths", default="512,2048", help="lengths measured with backward")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--corpus", type=Path, default=ROOT / ".bench_data" / "scifact" / "corpus.jsonl")
    p.add_argument("--tokenizer", type=Path, default=ROOT / ".bench_data" / "gpt-neox-20b")
    p.add_argument("--max-docs", type=int, default=10**9)
    p.add_argument("--skip", default="", help="comma list of parts to skip: models,floor,ops,encode,stream")
    p.add_argument("--stream-lengths", default="8192,1048576", help="documents streamed (first: the reference)")
    p.add_argument("--stream-chunk", type=int, default=8192, help="tokens read at a time when streaming")
    p.add_argument("--merge", type=Path, help="results.json of an earlier run: its rows are kept unless re-measured")
    p.add_argument("--time-budget", type=float, default=math.inf, help="seconds; later model rows are skipped")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench_out")
    p.add_argument("--from-json", type=Path, help="only render the report from this results.json (no GPU)")
    p.add_argument("--update-docs", action="store_true", help="write the section and plot into docs/")
    a = p.parse_args()

    if a.from_json:
        results = json.loads(a.from_json.read_text())
    else:
        import transformers
        import triton

        deadline = time.time() + a.time_budget
        skip = set(filter(None, a.skip.split(",")))
        results = json.loads(a.merge.read_text()) if a.merge else {"rows": [], "part_runs": {}}
        run = dict(
            command=run_command(sys.argv[1:]), date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name(),
            torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
        )  # fmt: skip
        if hf_mamba_kernels_available():
            import mamba_ssm

            run["mamba_ssm"] = mamba_ssm.__version__
        runs = results.get("meta", {}).get("runs", []) + [run]
        this_run = len(runs) - 1
        results["meta"] = dict(tokens=a.tokens, st_backends=st_backends(), runs=runs)
        torch.backends.cuda.matmul.allow_tf32 = True
        lengths = [int(n) for n in a.lengths.split(",")]
        modes = a.modes.split(",")
        if "floor" not in skip:
            results["floor"] = gemm_floor(a.tokens, a.reps)
            results["part_runs"]["floor"] = this_run
            print(json.dumps(results["floor"]), flush=True)
        if "ops" not in skip:
            results["ops"] = op_times(a.tokens, a.reps)
            results["part_runs"]["ops"] = this_run
        if "encode" not in skip and a.corpus.exists():
            results["encode"] = encode_benchmark(a.corpus, a.tokenizer, a.max_docs)
            results["part_runs"]["encode"] = this_run
        if "stream" not in skip and a.corpus.exists():
            stream_lengths = [int(n) for n in a.stream_lengths.split(",")]
            results["stream"] = streaming_memory(a.corpus, a.tokenizer, stream_lengths, a.stream_chunk)
            results["part_runs"]["stream"] = this_run
        from st_mamba.ops import triton as triton_ops

        results["meta"]["scan_fwd_shape"] = [
            triton_ops.SCAN_FWD_BLOCK_D,
            triton_ops.SCAN_FWD_WARPS,
            triton_ops.SCAN_FWD_NARROW_BLOCK_D,
        ]
        if "models" not in skip:
            for name in a.models.split(","):
                if MODELS[name][0].startswith("hf") and not hf_mamba_kernels_available():
                    print(f"{name}: skipped (mamba-ssm / causal-conv1d not importable)", flush=True)
                    continue
                bwd_lengths = [int(n) for n in a.bwd_lengths.split(",")]
                fresh = [
                    dict(row, run=this_run)
                    for row in run_model(name, lengths, bwd_lengths, a.tokens, a.reps, modes, deadline)
                ]
                measured = {(r["model"], r["mode"], r["L"]) for r in fresh}
                results["rows"] = [r for r in results["rows"] if (r["model"], r["mode"], r["L"]) not in measured]
                results["rows"] += fresh
        drop_unused_runs(results)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    section = render(results)
    (a.out_dir / "gpu_section.md").write_text(section)
    plot(results, a.out_dir / "benchmarks_gpu.png")
    if a.update_docs:
        update_docs(section)
        plot(results, DOC.parent / "benchmarks_gpu.png")
        (DOC.parent / "benchmarks_gpu.json").write_text(json.dumps(results, indent=1))  # what --merge reads next time
    print()
    print(throughput_table(results["rows"], "fwd"))
    print()
    print(throughput_table(results["rows"], "fwdbwd"))


if __name__ == "__main__":
    main()
