"""Scale-out benchmark: sharded encoding with 1 and several workers, and exact vs approximate FAISS indexes.

1. Encoding throughput of the shard pipeline (``st_mamba.scale``), end to end (corpus read, encode,
   shards written), for: one process; Sentence-Transformers' multi-process pool with 1 and N
   workers (``--devices``, or ``--workers`` CPU processes); Ray Data with 1 and N model actors
   (CPU only, skipped when ``ray`` is not installed). Each row also runs once on a corpus of a few
   documents: that run's time is the row's *start-up* (spawning workers, loading the model, CUDA
   and Triton warm-up), and docs/s is counted after it. Embeddings are stored as float32 and
   compared with the one-process run (max abs difference). The model is a random-weight st-mamba
   (mamba-130m shape on GPU, in bf16; a small shape on CPU, fp32) with the GPT-NeoX tokenizer; the
   texts come from ``--corpus`` or are made of words of this repository's docs.
   Then the same texts through ``encode_document`` alone (no shards) in one process and in pools of
   1..N workers, each pool warmed up before its timed call: the fair N-vs-1 comparison, since the
   start-up of the end-to-end rows is measured on a separate run and only approximately subtracted.
2. Indexes over ``--vectors`` synthetic embeddings (``st_mamba.scale.synthetic``: a Gaussian
   mixture of 1,024 topics, each varying in its own 24-dimensional subspace, normalised), 384-d
   float32; queries are 1,000 fresh points of the same topics with extra noise. Flat (exact),
   IVF-PQ and HNSW at their default settings: build seconds, queries/s for the 1,000 queries in one
   call, milliseconds per query one at a time, and recall@10 against the flat index. Skipped when
   ``faiss`` is not installed, or with ``--encode-only``.

It prints a table last, writes ``--json``, and with ``--update-docs`` the "## Benchmark" section of
docs/scale.md and the plot docs/scale_benchmark.png.

On this repository's 2-core CPU machine (about 8 minutes):

    python benchmarks/bench_scale.py --workers 1 2 --docs 2000 --vectors 1000000 \\
        --json bench_out/scale_cpu.json --update-docs

On a 2-GPU machine (no Ray or FAISS needed; the GPT-NeoX tokenizer folder at --tokenizer):

    python benchmarks/bench_scale.py --encode-only --devices cuda:0 cuda:1 --docs 20000 --json $OUT/scale_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import st_mamba
from st_mamba.scale import encode_corpus, encode_corpus_ray, load_shards

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scale.md"
PLOT = ROOT / "docs" / "scale_benchmark.png"
SECTION = "## Benchmark"
# The GPT-NeoX tokenizer beside the checkout (this machine) or inside it (a copy of the working tree).
TOKENIZER = next(
    (
        p
        for p in (ROOT.parent / "shared" / "assets" / "gpt-neox-20b", ROOT / "shared" / "assets" / "gpt-neox-20b")
        if p.is_dir()
    ),
    ROOT.parent / "shared" / "assets" / "gpt-neox-20b",
)

# Random-weight model shapes: the public mamba-130m, and a small one that runs in seconds on 2 CPU cores.
SHAPES = {
    "mamba-130m": dict(d_model=768, n_layer=24, d_state=16),
    "small": dict(d_model=256, n_layer=4, d_state=16),
}
QUERIES = 1000  # query vectors of the index benchmark
LATENCY_QUERIES = 100  # of them searched one at a time for the per-query latency
SWEEPS = {"ivfpq": (16, 32, 48, 64, 128), "hnsw": (64, 128, 256, 512, 1024)}  # nprobe, ef_search also measured


# --- 1. encoding ----------------------------------------------------------------------------------------


def corpus_texts(path: Path | None, count: int, seed: int = 0) -> list[str]:
    """``count`` texts: the first of a JSONL corpus (title + text), else random runs of words of the docs."""
    if path is not None:
        texts = []
        with path.open(encoding="utf-8") as stream:
            for line in stream:
                row = json.loads(line)
                texts.append(f"{row.get('title') or ''} {row['text']}".strip())
                if len(texts) == count:
                    break
        if len(texts) < count:
            sys.exit(f"{path} holds {len(texts)} documents; --docs asks for {count}")
        return texts
    words = re.findall(
        r"[A-Za-z][A-Za-z'-]+", " ".join(p.read_text("utf-8") for p in sorted((ROOT / "docs").glob("*.md")))
    )
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(40, 200))) for _ in range(count)]


def write_jsonl(texts: list[str], path: Path) -> Path:
    path.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)), "utf-8")
    return path


def build_model(shape: str, tokenizer: Path, gpu: bool, max_seq_length: int):
    if not tokenizer.is_dir():
        sys.exit(f"no GPT-NeoX tokenizer folder at {tokenizer}: pass --tokenizer DIR (holding tokenizer.json)")
    vocab_size = len(st_mamba.load_tokenizer(tokenizer))
    config = st_mamba.MambaConfig(vocab_size=vocab_size, **SHAPES[shape])
    model = st_mamba.from_config(config, tokenizer, max_seq_length=max_seq_length, seed=0, device="cpu")
    return model.to(torch.bfloat16) if gpu else model


def encode_runs(model, model_dir: Path, corpus: Path, warmup: Path, devices: list[str], workers: list[int],
                batch_size: int, shard_size: int, work: Path) -> list[dict]:  # fmt: skip
    """One row per (mode, workers): start-up seconds, total seconds, steady docs/s, max |diff| vs one process."""
    gpu = devices[0].startswith("cuda")
    documents = sum(1 for _ in corpus.open(encoding="utf-8"))
    runs = [("one process", 1)] + [("ST pool", n) for n in workers if n > 1]  # a pool of one is one process
    if not gpu:  # Ray Data on GPUs is for a cluster (docs/scale.md); here its CPU actors run beside the pool
        if importlib.util.find_spec("ray") is not None:
            runs += [("Ray Data", n) for n in workers]
        else:
            print("ray is not installed: skipping the Ray Data rows (pip install 'st-mamba[scale]')")
    rows, reference = [], None
    for mode, count in runs:
        device_list = devices[:count] if gpu else ["cpu"] * count
        print(f"encoding: {mode}, {count} worker(s) ({', '.join(device_list)})", flush=True)
        if mode == "Ray Data":
            start_ray()  # only now: Ray's idle processes would take CPU from the rows before
        options = dict(mode=mode, model=model, model_dir=model_dir, devices=device_list, batch_size=batch_size,
                       shard_size=shard_size)  # fmt: skip
        startup = run_encoding(warmup, work / f"warmup-{mode}-{count}", **options)
        total = run_encoding(corpus, work / f"{mode}-{count}", **options)
        embeddings = load_shards(work / f"{mode}-{count}").embeddings
        reference = embeddings if reference is None else reference
        rows.append({
            "mode": mode, "workers": count, "devices": device_list, "documents": documents,
            "startup_s": startup, "total_s": total, "docs_per_s": documents / max(total - startup, 1e-9),
            "max_abs_diff": float(np.abs(embeddings - reference).max()),
        })  # fmt: skip
        shutil.rmtree(work / f"{mode}-{count}")
        print(f"  {rows[-1]['docs_per_s']:,.0f} docs/s after {startup:.1f} s of start-up", flush=True)
    return rows


def threads_per_worker(workers: int) -> int:
    """CPU workers share the cores: each gets its share of threads."""
    return max(1, (os.cpu_count() or 1) // workers)


def steady_runs(model, texts: list[str], devices: list[str], workers: list[int], batch_size: int) -> list[dict]:
    """docs/s of ``encode_document`` alone (no shard files), start-up excluded inside the same run.

    One process, then Sentence-Transformers' pool with 1..N workers: each pool is started, warmed up on
    a few texts (worker start, model load, Triton compilation), and only then timed on all ``texts``,
    so that a pool of N is compared with a pool of 1 measured the same way.
    """
    gpu = devices[0].startswith("cuda")
    warmup = texts[: 8 * max(workers)]
    rows = []
    model.to(devices[0] if gpu else "cpu")
    model.encode_document(warmup, batch_size=batch_size, show_progress_bar=False)
    started = time.perf_counter()
    model.encode_document(texts, batch_size=batch_size, show_progress_bar=False)
    rows.append({"mode": "one process", "workers": 1, "devices": devices[:1],
                 "docs_per_s": len(texts) / (time.perf_counter() - started)})  # fmt: skip
    for count in workers:
        device_list = devices[:count] if gpu else ["cpu"] * count
        print(f"steady encoding: ST pool, {count} worker(s) ({', '.join(device_list)})", flush=True)
        threads = None if gpu else str(threads_per_worker(count))
        with _environment(OMP_NUM_THREADS=threads):  # read by the spawned workers' torch
            pool = model.start_multi_process_pool(device_list)
        try:
            options = dict(batch_size=batch_size, show_progress_bar=False, pool=pool)
            model.encode_document(warmup, chunk_size=max(1, len(warmup) // count), **options)
            started = time.perf_counter()
            model.encode_document(texts, chunk_size=max(batch_size, len(texts) // (4 * count)), **options)
            seconds = time.perf_counter() - started
        finally:
            model.stop_multi_process_pool(pool)
        rows.append({"mode": "ST pool", "workers": count, "devices": device_list, "docs_per_s": len(texts) / seconds})
    return rows


def run_encoding(
    corpus: Path, out: Path, mode: str, model, model_dir: Path, devices: list[str], batch_size: int, shard_size: int
) -> float:
    """Seconds to encode ``corpus`` into shards under ``out``: one process, ST pool over ``devices``, or Ray Data."""
    started = time.perf_counter()
    options = dict(shard_size=shard_size, dtype="float32", batch_size=batch_size, progress=False)
    threads = threads_per_worker(len(devices))
    if mode == "one process":
        encode_corpus(corpus, model, out, devices=devices, **options)
    elif mode == "ST pool":
        cpu = devices[0] == "cpu"
        with _environment(OMP_NUM_THREADS=str(threads) if cpu else None):  # read by the spawned workers' torch
            encode_corpus(corpus, model, out, devices=devices, **options)
    else:
        encode_corpus_ray(corpus, str(model_dir), out, workers=len(devices), cpus_per_worker=threads, **options)
    return time.perf_counter() - started


def start_ray() -> None:
    """A local Ray instance on this machine's CPUs, bound to 127.0.0.1, quiet."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)  # fmt: skip
        ray.data.DataContext.get_current().enable_progress_bars = False


class _environment:
    """Set environment variables (None: leave alone) for the duration of a with block."""

    def __init__(self, **values: str | None) -> None:
        self.values = {k: v for k, v in values.items() if v is not None}

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- 2. indexes -----------------------------------------------------------------------------------------


def index_runs(count: int, dimension: int) -> list[dict]:
    """Build, query and score flat, IVF-PQ and HNSW indexes over ``count`` synthetic vectors."""
    from dataclasses import asdict

    from st_mamba.scale import IndexSettings, build_index, recall_at_k
    from st_mamba.scale.indexes import apply_search_settings
    from st_mamba.scale.synthetic import ClusteredEmbeddings

    print(f"indexes: generating {count:,} synthetic {dimension}-d vectors", flush=True)
    source = ClusteredEmbeddings(dimension=dimension)
    vectors = source.sample(count, seed=1)
    queries = source.sample(QUERIES, seed=2, extra_noise=0.1)
    rows, exact = [], None
    for kind in ("flat", "ivfpq", "hnsw"):
        print(f"indexes: {kind}", flush=True)
        started = time.perf_counter()
        index, settings = build_index(vectors, IndexSettings(kind=kind))
        build = time.perf_counter() - started
        started = time.perf_counter()
        _, found = index.search(queries, 10)
        batch = time.perf_counter() - started
        latencies = []
        for query in queries[:LATENCY_QUERIES]:
            started = time.perf_counter()
            index.search(query[None], 10)
            latencies.append(time.perf_counter() - started)
        exact = found if exact is None else exact
        if kind == "ivfpq":  # what the PQ codes alone find, before the re-ranking
            unrefined = recall_at_k(index.base_index.search(queries, 10)[1], exact, 10)
        sweep = []
        for value in SWEEPS.get(kind, ()):  # search-time settings cost no rebuild
            name = "nprobe" if kind == "ivfpq" else "ef_search"
            apply_search_settings(index, IndexSettings(**{**asdict(settings), name: value}))
            started = time.perf_counter()
            _, swept = index.search(queries, 10)
            sweep.append({name: value, "qps": QUERIES / (time.perf_counter() - started),
                          "recall_at_10": recall_at_k(swept, exact, 10)})  # fmt: skip
        shown = {"flat": {}, "ivfpq": dict(nlist=settings.nlist, m=settings.m, nbits=settings.nbits,
                 nprobe=settings.nprobe, refine_factor=settings.refine_factor),
                 "hnsw": dict(M=settings.M, ef_construction=settings.ef_construction, ef_search=settings.ef_search)}  # fmt: skip
        rows.append({
            "kind": kind, "settings": shown[kind], "vectors": count, "dimension": dimension, "build_s": build,
            "qps": QUERIES / batch, "ms_per_query": 1000 * float(np.median(latencies)),
            "recall_at_10": recall_at_k(found, exact, 10), "bytes_per_vector": _bytes_per_vector(index, count),
        })  # fmt: skip
        rows[-1]["sweep"] = sweep
        if kind == "ivfpq":
            rows[-1]["recall_at_10_pq_only"] = unrefined
        print(f"  build {build:.1f} s, {rows[-1]['qps']:,.0f} queries/s, recall@10 {rows[-1]['recall_at_10']:.4f}")
        del index
    return rows


def _bytes_per_vector(index, count: int) -> float:
    import faiss

    with tempfile.NamedTemporaryFile() as file:
        faiss.write_index(index, file.name)
        return os.path.getsize(file.name) / count


# --- report ---------------------------------------------------------------------------------------------


def machine(devices: list[str]) -> str:
    if devices[0].startswith("cuda"):
        names = sorted({torch.cuda.get_device_name(d) for d in devices})
        return f"{len(devices)} x {', '.join(names)}, torch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def render(results: dict) -> str:
    lines = [
        SECTION, "",
        f"Measured {results['date']} on {results['machine']} with `{results['command']}` "
        f"(load average {results['load_before']:.1f} before, {results['load_after']:.1f} after: other "
        "processes shared the machine, so compare rows of one run).", "",
    ]  # fmt: skip
    if results["encoding"]:
        e = results["encoding"]
        lines += [
            f"**Encoding** {e[0]['documents']:,} documents into shards of {results['shard_size']} (float32), model "
            f"{results['model']}, batch size {results['batch_size']}. Start-up is the time of the same run on "
            "a handful of documents; docs/s is counted after it.", "",
            "| mode | workers | start-up s | total s | docs/s | speed-up | max abs diff vs one process |",
            "|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        base = e[0]["docs_per_s"]
        for row in e:
            lines.append(
                f"| {row['mode']} | {row['workers']} ({', '.join(row['devices'])}) | {row['startup_s']:.1f} | "
                f"{row['total_s']:.1f} | {row['docs_per_s']:,.0f} | {row['docs_per_s'] / base:.2f}x | "
                f"{row['max_abs_diff']:.2e} |"
            )
        lines.append("")
    if results.get("steady"):
        lines += ["**Steady-state encoding** (`encode_document` alone, no shard files; each pool started and "
                  "warmed up before the timed call):", "",
                  "| mode | workers | docs/s | speed-up over a pool of 1 |", "|---|---|---|---|"]  # fmt: skip
        one = next((r["docs_per_s"] for r in results["steady"] if r["mode"] == "ST pool" and r["workers"] == 1), None)
        for row in results["steady"]:
            speedup = f"{row['docs_per_s'] / one:.2f}x" if one and row["mode"] == "ST pool" else "-"
            lines.append(f"| {row['mode']} | {row['workers']} ({', '.join(row['devices'])}) | "
                         f"{row['docs_per_s']:,.0f} | {speedup} |")  # fmt: skip
        lines.append("")
    if results["indexes"]:
        i = results["indexes"]
        if "indexes_measured" in results:
            m = results["indexes_measured"]
            lines += [f"Indexes measured {m['date']} by `{m['command']}` (load average {m['load_before']:.1f} "
                      f"before, {m['load_after']:.1f} after).", ""]  # fmt: skip
        lines += [
            f"**Indexes** over {i[0]['vectors']:,} synthetic {i[0]['dimension']}-d unit vectors (float32), "
            f"{QUERIES:,} held-out noisy queries; recall@10 against the flat index; queries/s with all "
            f"queries in one call, ms/query with {LATENCY_QUERIES} queries one at a time (median).", "",
            "| index | settings | build s | queries/s | ms/query | recall@10 | bytes/vector |",
            "|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for row in i:
            settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "exact"
            lines.append(
                f"| {row['kind']} | {settings} | {row['build_s']:.1f} | {row['qps']:,.0f} | {row['ms_per_query']:.2f} | "
                f"{row['recall_at_10']:.4f} | {row['bytes_per_vector']:,.0f} |"
            )
        pq_only = next((row["recall_at_10_pq_only"] for row in i if "recall_at_10_pq_only" in row), None)
        if pq_only is not None:
            lines.append(f"\nThe IVF-PQ index's PQ codes alone, before re-ranking, reach recall@10 {pq_only:.4f}.")
        lines += ["", "Search-time settings of the same indexes (no rebuild):", "",
                  "| index | setting | queries/s | recall@10 |", "|---|---|---|---|"]  # fmt: skip
        for row in i:
            for point in row.get("sweep", []):
                name, value = next((k, v) for k, v in point.items() if k not in ("qps", "recall_at_10"))
                lines.append(f"| {row['kind']} | {name}={value} | {point['qps']:,.0f} | {point['recall_at_10']:.4f} |")
        lines.append("")
    if results.get("plot"):
        lines += [f"![scale benchmark]({results['plot']})", ""]
    return "\n".join(lines)


def update_docs(section: str, doc: Path = DOC) -> None:
    """Replace (or append) the benchmark section of docs/scale.md, leaving every other section alone."""
    lines = doc.read_text().splitlines() if doc.exists() else ["# Scale out", ""]
    start = next((n for n, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        lines += [""] if lines and lines[-1].strip() else []
        start = end = len(lines)
    else:
        end = next((n for n in range(start + 1, len(lines)) if lines[n].startswith("## ")), len(lines))
    doc.write_text("\n".join(lines[:start] + section.rstrip("\n").splitlines() + [""] + lines[end:]).rstrip() + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("encoding", "indexes") if results[name]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        if name == "encoding":
            labels = [f"{r['mode']}\n{r['workers']} worker(s)" for r in results["encoding"]]
            bars = ax.bar(labels, [r["docs_per_s"] for r in results["encoding"]], color="tab:blue")
            ax.bar_label(bars, [f"{r['docs_per_s']:,.0f}" for r in results["encoding"]], fontsize=8)
            ax.set_ylabel("documents / s after start-up (higher is better)")
            ax.set_title(f"Encoding ({results['model']})")
            ax.tick_params(axis="x", labelsize=8)
        else:
            for row in results["indexes"]:
                if row.get("sweep"):
                    points = [(p["recall_at_10"], p["qps"]) for p in row["sweep"]]
                    ax.plot(*zip(*points, strict=True), marker=".", alpha=0.6, label=f"{row['kind']} sweep")
                ax.scatter(row["recall_at_10"], row["qps"], s=60)
                ax.annotate(f"{row['kind']} (build {row['build_s']:.0f} s)", (row["recall_at_10"], row["qps"]),
                            textcoords="offset points", xytext=(6, 4), fontsize=8)  # fmt: skip
            ax.legend(fontsize=8)
            ax.set_yscale("log")
            ax.set_xlabel("recall@10 against exact")
            ax.set_ylabel("queries / s, batch of 1,000 (log)")
            ax.set_title(f"{results['indexes'][0]['vectors']:,} vectors, {results['indexes'][0]['dimension']}-d")
    fig.suptitle(f"st-mamba scale-out, {results['machine']} ({results['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", default=["cpu"], help="cuda:0 cuda:1 ... (default: cpu)")
    parser.add_argument("--workers", nargs="+", type=int, help="CPU: worker counts to run (default: 1 and 2)")
    parser.add_argument("--docs", type=int, default=2000, help="documents encoded per run (default: %(default)s)")
    parser.add_argument("--corpus", type=Path, help="JSONL corpus to take the texts from (default: synthetic text)")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="GPT-NeoX tokenizer folder")
    parser.add_argument("--shape", choices=list(SHAPES), help="model shape (default: mamba-130m on GPU, small on CPU)")
    parser.add_argument("--batch-size", type=int, help="texts per forward pass (default: 256 on GPU, 32 on CPU)")
    parser.add_argument("--shard-size", type=int, default=1000, help="documents per shard (default: %(default)s)")
    parser.add_argument("--max-seq-length", type=int, default=512, help="tokens per text (default: %(default)s)")
    parser.add_argument(
        "--vectors", type=int, default=1_000_000, help="synthetic vectors indexed (default: %(default)s)"
    )
    parser.add_argument("--dimension", type=int, default=384, help="their dimension (default: %(default)s)")
    parser.add_argument("--encode-only", action="store_true", help="skip the index part (no FAISS needed)")
    parser.add_argument("--indexes-only", action="store_true", help="skip the encoding part")
    parser.add_argument("--indexes-from", type=Path, help="with --encode-only: keep the index results of this JSON")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--update-docs", action="store_true", help=f"write the {SECTION} section of {DOC} and {PLOT}")
    args = parser.parse_args()
    gpu = args.devices[0].startswith("cuda")
    workers = list(range(1, len(args.devices) + 1)) if gpu else (args.workers or [1, 2])
    shape = args.shape or ("mamba-130m" if gpu else "small")
    batch_size = args.batch_size or (256 if gpu else 32)
    results = {
        "date": datetime.date.today().isoformat(), "machine": machine(args.devices),
        "command": "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]), "load_before": os.getloadavg()[0],
        "model": f"random {shape} st-mamba, {'bf16' if gpu else 'fp32'}", "batch_size": batch_size,
        "shard_size": args.shard_size,
        "encoding": [], "indexes": [],
    }  # fmt: skip

    # 1. Encoding throughput.
    if not args.indexes_only:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as folder:
            work = Path(folder)
            model = build_model(shape, args.tokenizer, gpu, args.max_seq_length)
            model.save(str(work / "model"))  # Ray actors load it from here
            texts = corpus_texts(args.corpus, args.docs)
            corpus = write_jsonl(texts, work / "corpus.jsonl")
            warmup = write_jsonl(texts[: 8 * max(workers)], work / "warmup.jsonl")
            results["encoding"] = encode_runs(model, work / "model", corpus, warmup, args.devices, workers,
                                              batch_size, args.shard_size, work)  # fmt: skip
            results["steady"] = steady_runs(model, texts, args.devices, workers, batch_size)

    # 2. Indexes (or those of an earlier run, with the command and load that measured them).
    if args.indexes_from:
        earlier = json.loads(args.indexes_from.read_text())
        results["indexes"] = earlier["indexes"]
        results["indexes_measured"] = {k: earlier[k] for k in ("date", "command", "load_before", "load_after")}
    elif not args.encode_only:
        try:
            import faiss  # noqa: F401
        except ImportError:
            print("faiss is not installed: skipping the index part (pip install 'st-mamba[scale]')")
        else:
            results["indexes"] = index_runs(args.vectors, args.dimension)

    # 3. JSON, docs section, plot, and the table last.
    results["load_after"] = os.getloadavg()[0]
    if args.update_docs:
        plot(results, PLOT)
        results["plot"] = PLOT.name
        update_docs(render(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(render(results))


if __name__ == "__main__":
    main()
