"""Retrieval evaluation for SentenceTransformer models (st-mamba's and any other).

Local BEIR folders, exact dense search or re-ranking of a TREC run, long-document modes, a BM25
baseline, measures from ir-measures, and loaders for Hub benchmarks. The command line is
``python -m st_mamba.evaluation``; docs/evaluation.md shows both uses.
"""

from __future__ import annotations

from st_mamba.evaluation.beir import QUERY_CASES, BeirDataset, Document, load_beir
from st_mamba.evaluation.bm25 import BM25Settings, bm25_search
from st_mamba.evaluation.encoding import DocumentEncoding, encode_documents, encode_queries, split_into_chunks
from st_mamba.evaluation.files import DataFileError
from st_mamba.evaluation.hub import HubUnavailableError, download_beir, download_loco, download_msmarco_dev, run_mteb
from st_mamba.evaluation.metrics import DEFAULT_MEASURES, Evaluation, evaluate, parse_measures
from st_mamba.evaluation.qrels import Qrels, read_qrels
from st_mamba.evaluation.report import RunResult, markdown_table, write_report
from st_mamba.evaluation.retrieval import dense_rerank, dense_search, dense_search_recased
from st_mamba.evaluation.runs import Run, read_run, top_k, write_run
from st_mamba.evaluation.search import DocumentEmbeddings, exact_search

__all__ = [
    "DEFAULT_MEASURES",
    "QUERY_CASES",
    "BM25Settings",
    "BeirDataset",
    "DataFileError",
    "Document",
    "DocumentEmbeddings",
    "DocumentEncoding",
    "Evaluation",
    "HubUnavailableError",
    "Qrels",
    "Run",
    "RunResult",
    "bm25_search",
    "dense_rerank",
    "dense_search",
    "dense_search_recased",
    "download_beir",
    "download_loco",
    "download_msmarco_dev",
    "encode_documents",
    "encode_queries",
    "evaluate",
    "exact_search",
    "load_beir",
    "markdown_table",
    "parse_measures",
    "read_qrels",
    "read_run",
    "run_mteb",
    "split_into_chunks",
    "top_k",
    "write_report",
    "write_run",
]
