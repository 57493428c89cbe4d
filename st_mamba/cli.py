"""The ``st-mamba`` command: encode, encode-corpus, index, search, evaluate, bench and demo.

    st-mamba demo                                            # retrieval over this repository's docs, offline
    st-mamba encode --model M --input texts.txt --output vectors.npy
    st-mamba index shared/data/scifact --model M --output scifact.index
    st-mamba search scifact.index "do statins lower cholesterol?"
    st-mamba encode-corpus corpus.jsonl --model M --output shards/ --shard-size 10000   # resumable; --devices, --ray
    st-mamba index --shards shards/ --kind hnsw --output corpus.index                   # flat, ivfpq or hnsw
    st-mamba evaluate beir --model M --data shared/data/scifact  # the same as python -m st_mamba.evaluation ...
    st-mamba bench ...                                       # the same as python benchmarks/bench_cpu.py ...

Every verb takes ``--help``. Texts are encoded exactly as read: a plain-text file gives one text per
line (the line break itself is dropped), a JSONL file one text per line from ``--field``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import os
import re
import runpy
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from st_mamba.scale.indexes import IDS_FILE, INDEX_FILE, META_FILE, OFFSETS_FILE

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger("st_mamba.cli")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "st-mamba-distilled"
"""The distilled st-mamba model shipped with the repository: the offline default of ``demo``."""
GPT_NEOX_TOKENIZER_DIR = REPO_ROOT.parent / "shared" / "assets" / "gpt-neox-20b"
"""Tokenizer of the untrained stand-in model ``demo`` builds while DEFAULT_MODEL does not exist."""

DEMO_QUERIES = [
    "How is a text turned into an embedding?",
    "How can I embed a document that is too long to fit in memory?",
    "Which checkpoint formats can st-mamba load?",
    "Which backend runs the selective scan?",
]
_INDEX_BLOCK = 1024  # documents encoded and added to the index at a time, so memory stays flat


class CliError(Exception):
    """A bad input or missing file: reported on one line, exit status 1."""


# --- models -----------------------------------------------------------------------------------------


def load_model(name_or_path: str | os.PathLike, device: str | None = None) -> SentenceTransformer:
    """Load a saved Sentence-Transformers folder (st-mamba or other) or a Hub id, naming what is missing."""
    from st_mamba.loading import load_model as load

    try:
        return load(name_or_path, device=device)
    except OSError as exc:  # FileNotFoundError, NotADirectoryError, or the Hub's answer
        raise CliError(str(exc)) from exc


def untrained_model(tokenizer_dir: str | os.PathLike, seed: int = 0) -> SentenceTransformer:
    """A small random st-mamba model: it runs everywhere, and its rankings mean nothing."""
    from st_mamba import MambaConfig, from_config, load_tokenizer

    vocab_size = len(load_tokenizer(tokenizer_dir))
    config = MambaConfig(d_model=64, n_layer=2, vocab_size=vocab_size, d_state=8)
    return from_config(config, tokenizer_dir, max_seq_length=512, seed=seed, device="cpu")


def demo_model(model: str | None = None, tokenizer: str | None = None) -> tuple[SentenceTransformer, str, bool]:
    """The model of the demo and examples: ``model``, else DEFAULT_MODEL, else an untrained stand-in.

    Returns:
        The model, a one-line description of it, and whether it is trained (False only for the
        stand-in, which is also announced with a warning).
    """
    if model is not None:
        return load_model(model), f"{model}", True
    if DEFAULT_MODEL.is_dir():
        return load_model(DEFAULT_MODEL), f"{DEFAULT_MODEL} (the repository's distilled model)", True
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else GPT_NEOX_TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise CliError(
            f"no trained model at {DEFAULT_MODEL} and no tokenizer folder at {tokenizer_dir} to build an "
            "untrained stand-in; pass --model PATH (a saved st-mamba or Sentence-Transformers folder) or --tokenizer DIR"
        )
    logger.warning(
        "no trained model at %s: using an UNTRAINED random st-mamba model (tokenizer %s); its rankings are "
        "meaningless. Pass --model PATH for real results.",
        DEFAULT_MODEL,
        tokenizer_dir,
    )
    description = f"UNTRAINED random st-mamba (d_model=64, 2 layers, tokenizer {tokenizer_dir})"
    return untrained_model(tokenizer_dir), description, False


def _apply_chunk_size(model: SentenceTransformer, chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    from st_mamba.loading import set_chunk_size

    try:
        set_chunk_size(model, chunk_size, "--chunk-size")
    except ValueError as exc:
        raise CliError(str(exc)) from None


# --- reading texts -------------------------------------------------------------------------------------


def read_texts(path: str, field: str) -> tuple[list[str], list[str]]:
    """(ids, texts) from a JSONL file (one object a line, text in ``field``) or a plain file (one text a line)."""
    stream = sys.stdin if path == "-" else _open(path)
    ids, texts = [], []
    with stream:
        for number, line in enumerate(stream, start=1):
            line = line.removesuffix("\n")
            if path.endswith(".jsonl"):
                if not line.strip():
                    continue
                row = _json_line(line, path, number)
                if not isinstance(row.get(field), str):
                    raise CliError(f"{path}:{number}: field {field!r} is missing or not a string")
                ids.append(str(row.get("_id", row.get("id", number))))
                texts.append(row[field])
            else:
                ids.append(str(number))
                texts.append(line)
    return ids, texts


def _open(path: str):
    try:
        return open(path, encoding="utf-8")  # noqa: SIM115 (closed by the caller's with)
    except FileNotFoundError:
        raise CliError(f"no file at {Path(path).resolve()}") from None


def _json_line(line: str, path: str, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path}:{number}: not JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise CliError(f"{path}:{number}: expected a JSON object")
    return row


# --- encode / index / search ---------------------------------------------------------------------------


def _encode(model: SentenceTransformer, texts: list[str], kind: str, args: argparse.Namespace, progress: bool):
    encode = model.encode_query if kind == "query" else model.encode_document
    return encode(
        texts, prompt=getattr(args, "prompt", None), batch_size=args.batch_size, show_progress_bar=progress,
        convert_to_numpy=True,
    )  # fmt: skip


def command_encode(args: argparse.Namespace) -> int:
    import numpy as np

    if bool(args.texts) == bool(args.input):
        raise CliError("give texts as arguments or --input FILE (one of the two)")
    ids, texts = (
        (list(map(str, range(1, len(args.texts) + 1))), args.texts)
        if args.texts
        else read_texts(args.input, args.field)
    )
    model = load_model(args.model, args.device)
    _apply_chunk_size(model, args.chunk_size)
    embeddings = _encode(model, texts, args.kind, args, progress=not args.no_progress)
    if args.output and args.output.endswith(".npy"):
        np.save(args.output, embeddings.astype(np.float32))
    else:
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
        for doc_id, vector in zip(ids, embeddings.tolist(), strict=True):
            out.write(json.dumps({"id": doc_id, "embedding": vector}) + "\n")
        if args.output:
            out.close()
    if args.output:
        print(f"wrote {len(texts)} embeddings of dimension {embeddings.shape[1]} to {args.output}", file=sys.stderr)
    return 0


def _faiss():
    from st_mamba.scale.indexes import faiss_module

    try:
        return faiss_module()
    except ImportError as exc:
        raise CliError(f"{exc}; 'st-mamba[eval]' brings it too") from None


def _index_settings(args: argparse.Namespace):
    from st_mamba.scale.indexes import IndexSettings

    given = {name: getattr(args, name) for name in _INDEX_OPTIONS if getattr(args, name) is not None}
    return IndexSettings(kind=args.kind, **given)


def command_index(args: argparse.Namespace) -> int:
    from st_mamba.scale import build_index, load_shards, measure_recall, save_index
    from st_mamba.scale.shards import MissingShardsError

    _faiss()
    if (args.corpus is None) == (args.shards is None):
        raise CliError(
            "give a CORPUS to encode (with --model) or --shards DIR written by encode-corpus (one of the two)"
        )
    settings = _index_settings(args)
    if args.shards is not None:
        try:
            shards = load_shards(args.shards)
        except (FileNotFoundError, MissingShardsError) as exc:
            raise CliError(str(exc)) from None
        job = shards.manifest.job
        ids, vectors, offsets = shards.ids, shards.embeddings, shards.positions
        meta = {"model": job["model"]["name"], "corpus": job["corpus"]["path"], "corpus_format": job["corpus"]["format"],
                "document_prompt": job["model"]["document_prompt"], "shards": str(Path(args.shards).resolve())}  # fmt: skip
        source = f"{args.shards} ({job['corpus']['path']})"
    else:
        if args.model is None:
            raise CliError("--model is needed to encode a CORPUS (or build from --shards DIR)")
        ids, vectors, offsets, meta = _encode_corpus_in_blocks(args)
        source = meta["corpus"]
    if not ids:
        raise CliError(f"no documents in {source}")
    try:
        index, settings = build_index(vectors, settings)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    output = Path(args.output)
    save_index(output, index, settings, ids, offsets, meta)
    print(
        f"indexed {len(ids)} documents from {source} into {output}/ ({settings.kind}: {INDEX_FILE}, {IDS_FILE}, {META_FILE})"
    )
    if settings.kind != "flat" and args.recall_queries > 0:
        report = measure_recall(index, vectors, sample=args.recall_queries)
        print(f"recall@{report.k} against exact search: {report.recall:.4f} ({report.queries} corpus vectors as queries, "
              f"{report.qps:,.0f} queries/s); search settings {settings.search_settings()} are saved in {META_FILE}")  # fmt: skip
    return 0


def _encode_corpus_in_blocks(args: argparse.Namespace):
    """Encode a corpus in this process, a block at a time: (ids, float32 vectors, positions, metadata).

    The corpus is read by ``st_mamba.scale.Corpus`` (JSONL or Parquet, a file or a BEIR folder), as
    ``encode-corpus`` reads it; a bad line stops with its line number.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from st_mamba.scale import Corpus, CorpusError
    from st_mamba.scale.corpus import report_bad_lines

    try:
        corpus = Corpus.open(args.corpus, args.on_bad_line)
    except CorpusError as exc:
        raise CliError(str(exc)) from None
    model = load_model(args.model, args.device)
    _apply_chunk_size(model, args.chunk_size)
    ids, offsets, blocks = [], [], []
    if corpus.format == "jsonl":
        with corpus.path.open("rb") as stream:
            total = sum(1 for line in stream if line.strip())
    else:
        total = corpus.end()
    bad_lines: list[int] = []
    documents = corpus.documents(bad_lines=bad_lines)
    with tqdm(total=total, unit="doc", desc="Indexing", disable=args.no_progress) as bar:
        try:
            while block := list(itertools.islice(documents, _INDEX_BLOCK)):
                vectors = _encode(model, [document.text for document in block], "document", args, progress=False)
                blocks.append(np.ascontiguousarray(vectors, dtype=np.float32))
                ids += [document.id for document in block]
                offsets += [document.position for document in block]
                bar.update(len(block))
        except CorpusError as exc:
            raise CliError(str(exc)) from None
    report_bad_lines(corpus, bad_lines)
    dimension = model.get_embedding_dimension()
    vectors = np.concatenate(blocks) if blocks else np.zeros((0, dimension), dtype=np.float32)
    meta = {"model": str(Path(args.model).expanduser().resolve()) if Path(args.model).expanduser().is_dir() else args.model,
            "corpus": str(corpus.path), "corpus_format": corpus.format, "document_prompt": args.prompt}  # fmt: skip
    return ids, vectors, np.asarray(offsets, dtype=np.int64), meta


def command_encode_corpus(args: argparse.Namespace) -> int:
    from st_mamba.scale import CorpusError, ResumeError, encode_corpus, encode_corpus_ray
    from st_mamba.scale.ray_encode import ray_module

    options = dict(shard_size=args.shard_size, dtype=args.dtype, batch_size=args.batch_size, prompt=args.prompt,
                   on_bad_line=args.on_bad_line, progress=not args.no_progress)  # fmt: skip
    if args.ray and args.devices:
        raise CliError("--devices is for one machine; with --ray, say --workers N and --gpus-per-worker G")
    try:
        if args.ray:
            ray_module().init(address=args.ray_address)  # None: RAY_ADDRESS if set, else a local instance
            manifest = encode_corpus_ray(args.corpus, args.model, args.output, workers=args.workers,
                                         gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                                         **options)  # fmt: skip
        else:
            manifest = encode_corpus(args.corpus, args.model, args.output, devices=args.devices, **options)
    except (CorpusError, ResumeError, ImportError, OSError, ValueError) as exc:
        raise CliError(str(exc)) from None
    skipped = f", {len(manifest.skipped_lines)} bad line(s) skipped" if manifest.skipped_lines else ""
    print(f"wrote {manifest.documents} embeddings ({manifest.dimension}-d {manifest.job['dtype']}) in "
          f"{len(manifest.shards)} shard(s) to {args.output}/{skipped}; "
          f"index them with: st-mamba index --shards {args.output} --output INDEX [--kind ivfpq|hnsw]")  # fmt: skip
    return 0


def command_search(args: argparse.Namespace) -> int:
    import numpy as np

    from st_mamba.scale.indexes import IndexSettings, apply_search_settings, load_index

    _faiss()
    folder = Path(args.index)
    if not (folder / INDEX_FILE).is_file():
        raise CliError(f"no index at {folder / INDEX_FILE} (build one with st-mamba index)")
    index, meta = load_index(folder)
    overrides = {name: getattr(args, name) for name in ("nprobe", "ef_search") if getattr(args, name) is not None}
    if overrides:
        apply_search_settings(index, IndexSettings(**{**meta.get("index", {"kind": "flat"}), **overrides}))
    ids = json.loads((folder / IDS_FILE).read_text(encoding="utf-8"))
    offsets = np.load(folder / OFFSETS_FILE)
    if bool(args.queries) == bool(args.queries_file):
        raise CliError("give queries as arguments or --queries-file FILE (one of the two)")
    query_ids, queries = (
        (list(map(str, range(1, len(args.queries) + 1))), args.queries) if args.queries else read_texts(args.queries_file, "text")
    )  # fmt: skip
    model = load_model(args.model or meta["model"], args.device)
    if model.get_embedding_dimension() != index.d:
        raise CliError(
            f"the model {args.model or meta['model']} makes {model.get_embedding_dimension()}-dimensional embeddings, "
            f"the index at {folder} holds {index.d}-dimensional ones (built with {meta['model']}): search it with that model"
        )
    vectors = _encode(model, queries, "query", args, progress=False)
    scores, rows = index.search(np.ascontiguousarray(vectors, dtype=np.float32), args.top_k)
    corpus = Path(meta["corpus"])
    run_lines = []
    for query_id, query, query_scores, query_rows in zip(query_ids, queries, scores, rows, strict=True):
        print(f"\nquery {query_id}: {query}")
        for rank, (score, row) in enumerate(zip(query_scores, query_rows, strict=True), start=1):
            if row < 0:  # fewer documents than top_k
                break
            run_lines.append(f"{query_id} Q0 {ids[row]} {rank} {score:.6f} st-mamba")
            print(f"  {rank:>2}. {score:7.4f}  {ids[row]}  {_snippet(_document_at(corpus, int(offsets[row])))}")
    if args.output:
        Path(args.output).write_text("\n".join(run_lines) + "\n", encoding="utf-8")
        print(f"\nwrote a TREC run of {len(run_lines)} lines to {args.output}")
    return 0


def _document_at(corpus: Path, position: int) -> str:
    """The text at a byte offset (JSONL) or row (Parquet) of the corpus, as it was encoded."""
    from st_mamba.scale import Corpus

    if not corpus.is_file():
        return "(corpus file moved)"
    document = next(Corpus.open(corpus, on_bad_line="skip").documents(position, position + 1), None)
    return document.text if document is not None else "(corpus file changed)"


def _snippet(text: str, width: int = 110) -> str:
    """For display only: whitespace runs shown as one space, cut to ``width`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# --- delegations ----------------------------------------------------------------------------------------


def command_evaluate(arguments: Sequence[str]) -> int:
    """Run ``python -m st_mamba.evaluation ARGUMENTS`` in this process."""
    if importlib.util.find_spec("st_mamba.evaluation") is None:
        raise CliError(
            "st-mamba evaluate needs the evaluation harness st_mamba.evaluation, which this installation lacks"
        )
    saved_argv = sys.argv
    sys.argv = ["st-mamba evaluate", *arguments]
    try:
        runpy.run_module("st_mamba.evaluation", run_name="__main__")
    except SystemExit as exit_:
        return _exit_status(exit_.code)
    finally:
        sys.argv = saved_argv
    return 0


def command_bench(arguments: Sequence[str]) -> int:
    """Run ``python benchmarks/bench_cpu.py ARGUMENTS`` from the source checkout."""
    script = REPO_ROOT / "benchmarks" / "bench_cpu.py"
    if not script.is_file():
        raise CliError(
            f"st-mamba bench runs {script}, which does not exist here (the benchmarks live in a source checkout of st-mamba)"
        )
    return subprocess.call([sys.executable, str(script), *arguments])


def _exit_status(code: object) -> int:
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


# --- demo -----------------------------------------------------------------------------------------------


@dataclass
class Passage:
    """A paragraph of a Markdown file and where it comes from (``docs/design.md § Long documents``)."""

    source: str
    text: str


def read_passages(paths: Sequence[Path], root: Path | None = None) -> list[Passage]:
    """Split Markdown files into passages: blank-line separated blocks, a fenced code block kept whole.

    Headings are not passages; they name the passages under them. Passage text is the file's text.
    """
    return [passage for path in paths for passage in _markdown_passages(_short(path, root), path.read_text("utf-8"))]


def _markdown_passages(name: str, markdown: str) -> list[Passage]:
    passages: list[Passage] = []
    heading, block, fenced = "", [], False

    def flush() -> None:
        if block:
            passages.append(Passage(f"{name} § {heading}" if heading else name, "\n".join(block)))
            block.clear()

    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            block.append(line)
        elif fenced:
            block.append(line)
        elif match := re.match(r"#{1,6}\s+(.*)", line):
            flush()
            heading = match.group(1).strip()
        elif line.strip():
            block.append(line)
        else:
            flush()
    flush()
    return passages


def demo_documents(corpus: Sequence[str] | None = None) -> tuple[list[Path], Path | None]:
    """The demo's Markdown files: ``corpus`` (files or folders), else the repository's README.md and docs/."""
    if corpus:
        paths = []
        for item in map(Path, corpus):
            if item.is_dir():
                paths += sorted(item.rglob("*.md")) + sorted(item.rglob("*.txt"))
            elif item.is_file():
                paths.append(item)
            else:
                raise CliError(f"no file or folder at {item.resolve()}")
        return paths, None
    paths = [p for p in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))] if p.is_file()]
    return paths, REPO_ROOT


def command_demo(args: argparse.Namespace) -> int:
    import numpy as np

    paths, root = demo_documents(args.corpus)
    passages = read_passages(paths, root)
    if not passages:
        raise CliError("the demo found no passages: pass --corpus with Markdown or text files")
    model, description, trained = demo_model(args.model, args.tokenizer)
    queries = args.query or DEMO_QUERIES

    started = time.perf_counter()
    documents = model.encode_document([p.text for p in passages], batch_size=16, convert_to_numpy=True)
    query_vectors = model.encode_query(queries, convert_to_numpy=True)
    seconds = time.perf_counter() - started
    scores = np.asarray(model.similarity(query_vectors, documents))

    rule = "=" * 100
    print(rule)
    print("st-mamba demo: dense retrieval over Markdown passages")
    print(f"model   : {description}")
    if not trained:
        print("WARNING : this model is UNTRAINED (random weights). The rankings below are MEANINGLESS; they only")
        print(f"          show the pipeline working. Put a trained model at {DEFAULT_MODEL} or pass --model PATH.")
    print(f"corpus  : {len(passages)} passages from {len(paths)} files ({', '.join(_short(p, root) for p in paths)})")
    print(f"encoded : {len(passages)} passages + {len(queries)} queries in {seconds:.1f} s on {model.device}")
    print(rule)
    for query, row in zip(queries, scores, strict=True):
        print(f"\nquery: {query}")
        for rank, index in enumerate(np.argsort(-row)[: args.top_k], start=1):
            print(f"  {rank}. {row[index]:.3f}  [{passages[index].source}]")
            print(f"     {_snippet(passages[index].text, 160)}")
    return 0


def _short(path: Path, root: Path | None) -> str:
    return str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else str(path)


# --- command line ---------------------------------------------------------------------------------------


_INDEX_OPTIONS = ("nlist", "m", "nbits", "nprobe", "refine_factor", "M", "ef_construction", "ef_search")


def build_parser() -> argparse.ArgumentParser:
    from st_mamba.scale.indexes import IndexSettings

    parser = argparse.ArgumentParser(prog="st-mamba", description="Mamba Retriever embeddings from the command line.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def add_model_options(verb: argparse.ArgumentParser, required: bool = True) -> None:
        verb.add_argument(
            "--model", required=required, help="saved st-mamba / Sentence-Transformers folder (or Hub id)"
        )
        verb.add_argument("--device", help="cpu, cuda, cuda:1... (default: Sentence-Transformers picks)")
        verb.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: %(default)s)")
        verb.add_argument("--prompt", help="prompt to prepend instead of the model's saved query/document prompt")

    encode = verbs.add_parser("encode", help="embed texts into .npy or JSONL")
    encode.add_argument("texts", nargs="*", help="texts to embed (or use --input)")
    encode.add_argument(
        "--input", help="plain-text file (one text a line), .jsonl file (text in --field), or - for plain text on stdin"
    )
    encode.add_argument("--field", default="text", help="JSONL field holding the text (default: %(default)s)")
    encode.add_argument("--kind", choices=["document", "query"], default="document",
                        help="encode_document or encode_query, i.e. which saved prompt (default: %(default)s)")  # fmt: skip
    encode.add_argument("--output", "-o", help="out.npy (float32 matrix) or out.jsonl; default: JSONL on stdout")
    encode.add_argument("--chunk-size", type=int, help="st-mamba: read texts longer than this many tokens in chunks")
    encode.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(encode)
    encode.set_defaults(run=command_encode)

    encode_corpus = verbs.add_parser(
        "encode-corpus", help="embed a corpus into resumable shards (one process, a process pool, or Ray)"
    )
    encode_corpus.add_argument("corpus", help="corpus.jsonl / corpus.parquet ({_id, title, text}) or a BEIR folder")
    encode_corpus.add_argument(
        "--model", required=True, help="saved st-mamba / Sentence-Transformers folder (or Hub id)"
    )
    encode_corpus.add_argument("--output", "-o", required=True, help="shard folder (resumed if it holds this same job)")
    encode_corpus.add_argument(
        "--shard-size", type=int, default=10_000, help="documents per shard (default: %(default)s)"
    )
    encode_corpus.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                               help="stored embedding type (default: %(default)s)")  # fmt: skip
    encode_corpus.add_argument(
        "--batch-size", type=int, default=32, help="texts per forward pass (default: %(default)s)"
    )
    encode_corpus.add_argument("--prompt", help="prompt to prepend instead of the model's saved document prompt")
    encode_corpus.add_argument("--on-bad-line", choices=["fail", "skip"], default="fail",
                               help="a line without id or text: stop there, or skip it with a counted warning "
                                    "(default: %(default)s)")  # fmt: skip
    encode_corpus.add_argument(
        "--devices", nargs="+", help="one device, or several for a process pool: cuda:0 cuda:1 (or cpu cpu)"
    )
    encode_corpus.add_argument("--ray", action="store_true", help="encode on Ray Data, one model actor per worker")
    encode_corpus.add_argument(
        "--ray-address", help="with --ray: cluster to join, e.g. auto (default: RAY_ADDRESS, else local)"
    )
    encode_corpus.add_argument("--workers", type=int, default=1, help="with --ray: model actors (default: %(default)s)")
    encode_corpus.add_argument("--gpus-per-worker", type=float, default=0, help="with --ray: GPUs per actor, 1 on GPUs")
    encode_corpus.add_argument("--cpus-per-worker", type=float, default=1, help="with --ray: CPUs per actor (threads)")
    encode_corpus.add_argument("--no-progress", action="store_true", help="no progress bar")
    encode_corpus.set_defaults(run=command_encode_corpus)

    index = verbs.add_parser("index", help="build a FAISS index (exact, IVF-PQ or HNSW) of a corpus or of its shards")
    index.add_argument("corpus", nargs="?", help="corpus.jsonl / corpus.parquet ({_id, title, text}) or a BEIR folder")
    index.add_argument("--shards", help="instead of CORPUS: a folder written by st-mamba encode-corpus")
    index.add_argument("--on-bad-line", choices=["fail", "skip"], default="fail",
                       help="CORPUS: a line without id or text stops the build, or is skipped with a counted "
                            "warning (default: %(default)s)")  # fmt: skip
    index.add_argument(
        "--output", "-o", required=True, help="folder for index.faiss, ids.json, offsets.npy, index.json"
    )
    index.add_argument("--kind", choices=["flat", "ivfpq", "hnsw"], default="flat",
                       help="flat: exact; ivfpq, hnsw: approximate, recall@10 printed (default: %(default)s)")  # fmt: skip
    defaults = IndexSettings()
    index.add_argument("--nlist", type=int, help="ivfpq: k-means cells (default: about sqrt(documents), a power of 2)")
    index.add_argument(
        "--m", type=int, help="ivfpq: PQ sub-quantisers, must divide the dimension (default: dimension/8)"
    )
    index.add_argument("--nbits", type=int, help=f"ivfpq: bits per PQ code (default: {defaults.nbits})")
    index.add_argument("--nprobe", type=int, help=f"ivfpq: cells searched per query (default: {defaults.nprobe})")
    index.add_argument("--refine-factor", type=int,
                       help=f"ivfpq: candidates re-ranked per result (default: {defaults.refine_factor})")  # fmt: skip
    index.add_argument("--hnsw-m", type=int, dest="M", help=f"hnsw: links per node (default: {defaults.M})")
    index.add_argument(
        "--ef-construction", type=int, help=f"hnsw: build-time list (default: {defaults.ef_construction})"
    )
    index.add_argument("--ef-search", type=int, help=f"hnsw: search-time list (default: {defaults.ef_search})")
    index.add_argument("--recall-queries", type=int, default=1000,
                       help="corpus vectors used as queries to measure recall@10 (0: skip; default: %(default)s)")  # fmt: skip
    index.add_argument("--chunk-size", type=int, help="st-mamba: read documents longer than this many tokens in chunks")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(index, required=False)
    index.set_defaults(run=command_index)

    search = verbs.add_parser("search", help="query an index built by st-mamba index")
    search.add_argument("index", help="folder written by st-mamba index")
    search.add_argument("queries", nargs="*", help="query texts (or use --queries-file)")
    search.add_argument("--queries-file", help="plain-text file (one query a line) or JSONL ({_id, text} lines)")
    search.add_argument("--top-k", type=int, default=10, help="results per query (default: %(default)s)")
    search.add_argument("--output", "-o", help="also write a TREC run file here")
    search.add_argument("--nprobe", type=int, help="ivfpq index: cells searched (default: the one saved with it)")
    search.add_argument("--ef-search", type=int, help="hnsw index: search-time list (default: the one saved with it)")
    add_model_options(search, required=False)
    search.set_defaults(run=command_search)

    # Listed for --help only: main() hands everything after these verbs to their own command lines.
    verbs.add_parser("evaluate", help="retrieval evaluation: python -m st_mamba.evaluation ARGS (see evaluate --help)")
    verbs.add_parser("bench", help="CPU benchmark: python benchmarks/bench_cpu.py ARGS (see bench --help)")

    demo = verbs.add_parser("demo", help="retrieve passages of this repository's docs for a few questions, offline")
    demo.add_argument("--model", help=f"model folder (default: {DEFAULT_MODEL}, else an untrained stand-in)")
    demo.add_argument(
        "--tokenizer", help=f"tokenizer folder for the untrained stand-in (default: {GPT_NEOX_TOKENIZER_DIR})"
    )
    demo.add_argument(
        "--corpus", action="append", help="a Markdown/text file or folder (repeatable; default: README.md and docs/)"
    )
    demo.add_argument("--query", action="append", help="a question (repeatable; default: four about st-mamba)")
    demo.add_argument("--top-k", type=int, default=3, help="passages shown per question (default: %(default)s)")
    demo.set_defaults(run=command_demo)
    return parser


_DELEGATED_VERBS = {"evaluate": command_evaluate, "bench": command_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``st-mamba`` (and ``python -m st_mamba``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    verb = argv[0] if argv else None
    try:
        if verb in _DELEGATED_VERBS:
            return _DELEGATED_VERBS[verb](argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except CliError as exc:
        print(f"st-mamba {verb}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
