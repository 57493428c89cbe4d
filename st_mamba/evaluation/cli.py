"""Command line: ``python -m st_mamba.evaluation {beir,score-run,download,mteb} ...``; see docs/evaluation.md."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from st_mamba.evaluation.beir import QUERY_CASES, load_beir
from st_mamba.evaluation.files import DataFileError
from st_mamba.evaluation.hub import HubUnavailableError
from st_mamba.evaluation.metrics import DEFAULT_MEASURES, evaluate, parse_measures
from st_mamba.evaluation.qrels import read_qrels
from st_mamba.evaluation.report import RunResult, check_output_path, markdown_table, write_report
from st_mamba.evaluation.runs import Run, read_run, top_k, write_run

logger = logging.getLogger("st_mamba.evaluation")
DTYPES = ("float32", "bfloat16", "float16")  # --dtype: bfloat16 halves the matmul time on CPUs with AVX512-BF16 or AMX

_EXAMPLES = """examples:
  python -m st_mamba.evaluation beir --model path/to/model --data shared/data/scifact --bm25 --output scifact.json
  python -m st_mamba.evaluation beir --model path/to/model --data shared/data/trec-dl-2019 \\
      --rerank shared/data/trec-dl-2019/runs/BM25.dl19.trec --min-relevance 2
  python -m st_mamba.evaluation beir --model path/to/model --data shared/data/qmsum --split summary \\
      --doc-mode one-pass --doc-mode truncate:512 --doc-mode chunk:512:max --doc-mode chunk:512:mean
  python -m st_mamba.evaluation score-run --qrels shared/data/trec-dl-2019/qrels/test.tsv \\
      --run shared/data/trec-dl-2019/runs/*.trec --min-relevance 2
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_measure_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--measures", nargs="+", default=list(DEFAULT_MEASURES), metavar="MEASURE",
        help="ir-measures names (default: %(default)s); e.g. nDCG@10 RR@10 R@100 AP P(rel=2)@5",
    )  # fmt: skip
    parser.add_argument(
        "--min-relevance", type=int, default=1, metavar="GRADE",
        help="lowest grade that counts as relevant for binary measures (RR, R, AP, P); nDCG always uses the "
        "grades. TREC DL: 2. (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--output", type=Path, metavar="FILE.json", help="write results as JSON, and a markdown table beside it"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m st_mamba.evaluation",
        description="Evaluate SentenceTransformer models (st-mamba or any other) and baselines on retrieval benchmarks.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    beir = commands.add_parser(
        "beir", help="evaluate on a local BEIR folder (full-corpus search or re-ranking a run)",
        description="Evaluate a model and/or BM25 on a BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv).",
    )  # fmt: skip
    beir.add_argument("--data", type=Path, required=True, metavar="FOLDER", help="the BEIR folder")
    beir.add_argument("--split", default="test", help="qrels split: qrels/SPLIT.tsv (default: %(default)s)")
    beir.add_argument(
        "--model", metavar="PATH", help="SentenceTransformer folder or Hub id (loaded with trust_remote_code)"
    )
    beir.add_argument(
        "--bm25", action="store_true", help="also run the bm25s baseline (k1=0.9, b=0.4, English stemming)"
    )
    beir.add_argument(
        "--rerank",
        type=Path,
        metavar="RUNFILE",
        help="re-rank this TREC run's candidates instead of searching the corpus",
    )
    beir.add_argument(
        "--depth",
        type=_positive_int,
        default=100,
        help="candidates per query taken from --rerank (default: %(default)s)",
    )
    beir.add_argument(
        "--top-k",
        type=_positive_int,
        default=1000,
        help="results per query for full-corpus search (default: %(default)s)",
    )
    beir.add_argument(
        "--doc-mode", action="append", metavar="MODE",
        help="how documents are read, repeatable to compare: model (default), one-pass, truncate:N, "
        "chunk:N:max, chunk:N:mean",
    )  # fmt: skip
    beir.add_argument(
        "--query-case", action="append", metavar="CASE", choices=list(QUERY_CASES),
        help="also search with the queries re-typed, repeatable: as-given (default), upper, lower, title",
    )  # fmt: skip
    beir.add_argument(
        "--chunk-overlap", type=int, default=0, metavar="TOKENS", help="tokens shared by neighbouring chunks"
    )
    beir.add_argument(
        "--stream-chunk-size", type=_positive_int, metavar="TOKENS",
        help="st-mamba models only: read texts longer than this in pieces that carry the state (the same "
        "embeddings in bounded memory; sets the MambaEncoder's chunk_size, e.g. 2048 for one-pass)",
    )  # fmt: skip
    beir.add_argument("--batch-size", type=_positive_int, default=32)
    beir.add_argument("--device", help="e.g. cpu, cuda (default: sentence-transformers picks)")
    beir.add_argument(
        "--dtype", choices=DTYPES, help="load the model's weights in this dtype (default: as saved, or float32)"
    )
    beir.add_argument("--backend", choices=("auto", "faiss", "torch"), default="auto", help="exact search backend")
    beir.add_argument("--save-runs", type=Path, metavar="FOLDER", help="write each ranked list as a TREC run file here")
    beir.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_measure_options(beir)

    score = commands.add_parser(
        "score-run", help="score TREC run files against qrels",
        description="Score run files (query-id Q0 doc-id rank score tag) against qrels (BEIR TSV or TREC format).",
    )  # fmt: skip
    score.add_argument("--qrels", type=Path, required=True, metavar="FILE")
    score.add_argument("--run", type=Path, nargs="+", required=True, metavar="RUNFILE")
    _add_measure_options(score)

    download = commands.add_parser(
        "download", help="download a benchmark from the Hugging Face Hub into a BEIR folder",
        description="beir NAME: BeIR/NAME (e.g. scifact); msmarco-dev: MS MARCO passage dev; loco TASK: a LoCoV1 task.",
    )  # fmt: skip
    download.add_argument("source", choices=("beir", "msmarco-dev", "loco"))
    download.add_argument("name", nargs="?", help="BEIR data set or LoCoV1 task (not for msmarco-dev)")
    download.add_argument("--to", type=Path, required=True, metavar="FOLDER")
    download.add_argument("--split", nargs="+", default=["test"], help="qrels splits for beir (default: %(default)s)")

    mteb = commands.add_parser("mteb", help="run MTEB tasks with the mteb package (needs network and pip install mteb)")
    mteb.add_argument("--model", required=True, metavar="PATH")
    mteb.add_argument("--task", nargs="+", required=True, metavar="NAME", help="e.g. SciFact NFCorpus")
    mteb.add_argument("--device")
    mteb.add_argument("--output", type=Path, metavar="FILE.json")
    return parser


def _load_model(path: str, device: str | None, dtype: str | None = None):
    from sentence_transformers import SentenceTransformer

    model_kwargs = {"torch_dtype": dtype} if dtype else None
    return SentenceTransformer(path, trust_remote_code=True, device=device, model_kwargs=model_kwargs)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _run_beir(args: argparse.Namespace) -> int:
    from st_mamba.evaluation.bm25 import BM25Settings, bm25_search
    from st_mamba.evaluation.encoding import DocumentEncoding, reads_any_length
    from st_mamba.evaluation.retrieval import dense_rerank, dense_search_recased

    if args.model is None and not args.bm25:
        raise ValueError("nothing to evaluate: give --model, --bm25 or both")
    if args.rerank is not None and args.model is None:
        raise ValueError("--rerank needs --model (to score a run as it is, use score-run)")
    if args.rerank is not None and (args.query_case or ["as-given"]) != ["as-given"]:
        raise ValueError("--query-case is for full-corpus search, not --rerank")
    parse_measures(args.measures, args.min_relevance)  # fail on a bad measure before any slow work
    encodings = [DocumentEncoding.parse(spec, args.chunk_overlap) for spec in (args.doc_mode or ["model"])]
    dataset = load_beir(args.data, args.split)
    progress = not args.no_progress
    results: list[RunResult] = []
    runs: dict[str, Run] = {}

    def record(name: str, run: Run, seconds: float | None, settings: dict) -> None:
        evaluation = evaluate(dataset.qrels, run, args.measures, args.min_relevance)
        results.append(RunResult(name, evaluation.scores, evaluation.queries, seconds, settings))
        runs[name] = run

    candidates = None
    if args.rerank is not None:
        candidates = top_k(read_run(args.rerank), args.depth)
        record(
            f"{args.rerank.name} (top {args.depth})", candidates, None, {"run": str(args.rerank), "depth": args.depth}
        )
    if args.bm25:
        settings = BM25Settings()
        start = time.perf_counter()
        run = bm25_search(dataset, args.top_k, settings, show_progress=progress)
        record("bm25", run, time.perf_counter() - start, {"bm25": settings.as_dict(), "top_k": args.top_k})
    if args.model is not None:
        model = _load_model(args.model, args.device, args.dtype)
        if args.stream_chunk_size is not None:
            if not reads_any_length(model):
                raise ValueError("--stream-chunk-size is for st-mamba models (MambaEncoder); this model has none")
            model[0].chunk_size = args.stream_chunk_size
        model_name = Path(args.model).name or args.model
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")  # what the weights really are
        cases = args.query_case or ["as-given"]
        for encoding in encodings:
            start = time.perf_counter()
            settings = {"model": args.model, "documents": str(encoding), "batch_size": args.batch_size, "dtype": dtype}
            if args.stream_chunk_size is not None:
                settings["stream_chunk_size"] = args.stream_chunk_size
            if candidates is not None:
                run = dense_rerank(model, dataset, candidates, encoding, args.batch_size, progress)
                record(f"{model_name} [{encoding}] rerank top {args.depth}", run, time.perf_counter() - start, settings)
                continue
            recased = dense_search_recased(
                model, dataset, cases, args.top_k, encoding, args.batch_size, args.backend, progress
            )
            seconds = (time.perf_counter() - start) / len(cases)  # the corpus is embedded once for all cases
            for case, run in recased.items():
                name = f"{model_name} [{encoding}]" + ("" if case == "as-given" else f" queries {case}")
                record(name, run, seconds, {**settings, "query_case": case})

    if args.save_runs is not None:
        for name, run in runs.items():
            write_run(run, args.save_runs / f"{_slug(name)}.trec", tag=_slug(name))
    context = {
        "data": str(args.data), "split": args.split, "documents": len(dataset.corpus),
        "queries": len(dataset.queries), "unjudged_queries_skipped": dataset.unjudged_queries,
        "measures": args.measures, "min_relevance": args.min_relevance,
    }  # fmt: skip
    _finish(results, context, args.output)
    return 0


def _run_score(args: argparse.Namespace) -> int:
    parse_measures(args.measures, args.min_relevance)
    qrels = read_qrels(args.qrels)
    results = []
    for path in args.run:
        evaluation = evaluate(qrels, read_run(path), args.measures, args.min_relevance)
        results.append(RunResult(path.name, evaluation.scores, evaluation.queries, settings={"run": str(path)}))
    context = {"qrels": str(args.qrels), "measures": args.measures, "min_relevance": args.min_relevance}
    _finish(results, context, args.output)
    return 0


def _run_download(args: argparse.Namespace) -> int:
    from st_mamba.evaluation.hub import download_beir, download_loco, download_msmarco_dev

    if args.source != "msmarco-dev" and not args.name:
        raise ValueError(f"download {args.source} needs a name (a BEIR data set or a LoCoV1 task)")
    if args.source == "beir":
        folder = download_beir(args.name, args.to, args.split)
    elif args.source == "msmarco-dev":
        folder = download_msmarco_dev(args.to)
    else:
        folder = download_loco(args.name, args.to)
    logger.info("wrote %s", folder)
    return 0


def _run_mteb(args: argparse.Namespace) -> int:
    from st_mamba.evaluation.hub import run_mteb

    rows = run_mteb(_load_model(args.model, args.device), args.task)
    results = [RunResult(f"{row['task']} ({row['split']})", {"main_score": row["main_score"]}, None) for row in rows]
    _finish(results, {"model": args.model, "mteb": rows}, args.output)
    return 0


def _finish(results: list[RunResult], context: dict, output: Path | None) -> None:
    if output is not None:
        json_path, table_path = write_report(output, results, context)
        logger.info("wrote %s and %s", json_path, table_path)
    sys.stdout.write(markdown_table(results))


_COMMANDS = {"beir": _run_beir, "score-run": _run_score, "download": _run_download, "mteb": _run_mteb}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (1 for a bad input, with the reason on stderr)."""
    args = build_parser().parse_args(argv)
    # The handler's own level keeps libraries that set DEBUG on their loggers (bm25s) quiet.
    handler = logging.StreamHandler()
    handler.setLevel(logging.INFO)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", handlers=[handler])
    logger.setLevel(logging.INFO)
    try:
        if getattr(args, "output", None) is not None:
            check_output_path(args.output)  # before any slow work
        return _COMMANDS[args.command](args)
    except (OSError, ValueError, ImportError, DataFileError, HubUnavailableError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
