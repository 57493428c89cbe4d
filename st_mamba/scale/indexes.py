"""FAISS indexes over unit-length embeddings: exact, IVF-PQ and HNSW, saved with their id map.

Every index scores by inner product, which for st-mamba's normalised embeddings is the cosine.

- ``flat``: ``IndexFlatIP``, exact; 4 bytes per dimension per document.
- ``ivfpq``: ``IndexIVFPQ`` (``nlist`` k-means cells, ``nprobe`` of them searched, vectors compressed
  to ``m`` codes of ``nbits`` bits) for the candidates, re-ranked by ``IndexRefine`` on 8-bit scalar
  quantised vectors (``refine_factor`` x k candidates): PQ codes alone rank the close neighbours of a
  query too coarsely for a recall@10 of 0.95. About 1 byte per dimension plus ``m`` bytes per document.
- ``hnsw``: ``IndexHNSWFlat`` (``M`` links per node, ``ef_construction`` while building,
  ``ef_search`` while searching); full vectors plus the graph, no training.

The search-time settings (``nprobe``, ``refine_factor``, ``ef_search``) are saved in ``index.json``
and applied again by ``load_index``. Defaults reach recall@10 >= 0.95 against the exact index on the
one-million-vector benchmark corpus (docs/scale.md).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from st_mamba.evaluation.search import DocumentEmbeddings, exact_search

INDEX_FILE, IDS_FILE, OFFSETS_FILE, META_FILE = "index.faiss", "ids.json", "offsets.npy", "index.json"
KINDS = ("flat", "ivfpq", "hnsw")
_ADD_BLOCK = 65_536  # vectors converted to float32 and added at a time


def faiss_module():
    """Import FAISS, or say how to install it."""
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "FAISS indexes need faiss-cpu: pip install 'st-mamba[scale]' (or pip install faiss-cpu)"
        ) from None
    return faiss


@dataclass
class IndexSettings:
    """How an index is built and searched. ``None`` build settings are chosen from the corpus size."""

    kind: str = "flat"
    nlist: int | None = None  # ivfpq: k-means cells; default 2^round(log2(sqrt(n))) clipped to [16, 65536]
    m: int | None = None  # ivfpq: sub-quantisers; default dimension / 8 (must divide the dimension)
    nbits: int = 8  # ivfpq: bits per sub-quantiser code
    nprobe: int = 16  # ivfpq: cells searched per query (at 1M vectors 16 to 128 all reach the same recall)
    refine_factor: int = 10  # ivfpq: candidates re-ranked per result
    M: int = 32  # hnsw: links per node
    ef_construction: int = 80  # hnsw: candidate list while inserting (40 caps recall@10 near 0.94 at 1M vectors)
    ef_search: int = 128  # hnsw: candidate list while searching
    train_size: int = field(default=0, repr=False)  # ivfpq: vectors used for training; 0: 64 per cell

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    def resolved(self, count: int, dimension: int) -> IndexSettings:
        """A copy with every ``None`` build setting chosen for ``count`` vectors of ``dimension``."""
        settings = IndexSettings(**asdict(self))
        if self.kind == "ivfpq":
            if settings.nlist is None:
                settings.nlist = int(min(65536, max(16, 2 ** round(math.log2(max(count, 1) ** 0.5)))))
            if settings.m is None:
                settings.m = max(1, dimension // 8)
            if dimension % settings.m:
                raise ValueError(f"ivfpq: m={settings.m} sub-quantisers must divide the dimension {dimension}")
            if count < max(settings.nlist, 2**settings.nbits):
                raise ValueError(
                    f"ivfpq: {count} vectors cannot train {settings.nlist} cells and {2**settings.nbits} codes per "
                    "sub-quantiser; pass a smaller nlist / nbits or use flat"
                )
        return settings

    def search_settings(self) -> dict[str, int]:
        return {
            "flat": {},
            "ivfpq": {"nprobe": self.nprobe, "refine_factor": self.refine_factor},
            "hnsw": {"ef_search": self.ef_search},
        }[self.kind]


def build_index(vectors: np.ndarray, settings: IndexSettings | None = None, seed: int = 0) -> tuple[Any, IndexSettings]:
    """An index of ``vectors`` (n, d), any float dtype, rows in id order.

    Returns:
        The FAISS index, with its search settings applied, and the settings it was built with.
    """
    faiss = faiss_module()
    count, dimension = vectors.shape
    settings = (settings or IndexSettings()).resolved(count, dimension)
    if settings.kind == "flat":
        index = faiss.IndexFlatIP(dimension)
    elif settings.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dimension, settings.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
    else:
        quantizer = faiss.IndexFlatIP(dimension)
        ivfpq = faiss.IndexIVFPQ(
            quantizer, dimension, settings.nlist, settings.m, settings.nbits, faiss.METRIC_INNER_PRODUCT
        )
        sq8 = faiss.IndexScalarQuantizer(dimension, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexRefine(ivfpq, sq8)  # FAISS's Python wrapper keeps ivfpq, quantizer and sq8 alive
        train_size = settings.train_size or 64 * settings.nlist
        sample = np.random.default_rng(seed).choice(count, size=min(count, train_size), replace=False)
        index.train(np.ascontiguousarray(vectors[np.sort(sample)], dtype=np.float32))
    for start in range(0, count, _ADD_BLOCK):
        index.add(np.ascontiguousarray(vectors[start : start + _ADD_BLOCK], dtype=np.float32))
    apply_search_settings(index, settings)
    return index, settings


def apply_search_settings(index: Any, settings: IndexSettings) -> None:
    """Set nprobe / k_factor / efSearch on a built or loaded index."""
    faiss = faiss_module()
    if settings.kind == "hnsw":
        index.hnsw.efSearch = settings.ef_search
    elif settings.kind == "ivfpq":
        index.k_factor = settings.refine_factor
        faiss.extract_index_ivf(index.base_index).nprobe = settings.nprobe


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |top-k found ∩ top-k exact| / k; rows are (n_queries, >= k) document numbers."""
    if found.shape[0] != exact.shape[0]:
        raise ValueError(f"{found.shape[0]} rows of results against {exact.shape[0]} rows of exact results")
    hits = [len(set(f[:k].tolist()) & set(e[:k].tolist()) - {-1}) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits)) / k if hits else float("nan")


@dataclass
class RecallReport:
    """recall@k of an index against exact search, and its query speed, on ``queries`` query vectors."""

    recall: float
    k: int
    queries: int
    seconds: float  # searching the index, all queries in one call

    @property
    def qps(self) -> float:
        return self.queries / self.seconds if self.seconds else float("inf")


def measure_recall(
    index: Any, vectors: np.ndarray, queries: np.ndarray | None = None, k: int = 10, sample: int = 1000, seed: int = 0
) -> RecallReport:
    """recall@k of ``index`` against an exact search of ``vectors`` (the vectors it holds, in order).

    Args:
        queries: query vectors; default: ``sample`` rows of ``vectors`` themselves, drawn at random.
    """
    if queries is None:
        rows = np.random.default_rng(seed).choice(len(vectors), size=min(sample, len(vectors)), replace=False)
        queries = vectors[np.sort(rows)]
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, exact = exact_search(queries, DocumentEmbeddings.one_per_document(vectors), k, "faiss", row_block=_ADD_BLOCK)
    started = time.perf_counter()
    _, found = index.search(queries, k)
    seconds = time.perf_counter() - started
    return RecallReport(recall_at_k(found, exact, k), k, len(queries), seconds)


# --- on disk -------------------------------------------------------------------------------------------


def save_index(
    folder: str | Path,
    index: Any,
    settings: IndexSettings,
    ids: list[str],
    offsets: np.ndarray,
    meta: dict[str, Any],
) -> Path:
    """Write index.faiss, ids.json, offsets.npy and index.json (``meta`` plus the settings) into ``folder``."""
    faiss = faiss_module()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(folder / INDEX_FILE))
    (folder / IDS_FILE).write_text(json.dumps(ids), encoding="utf-8")
    np.save(folder / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    meta = {**meta, "documents": len(ids), "dimension": index.d, "metric": "inner product", "index": asdict(settings)}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return folder


def load_index(folder: str | Path) -> tuple[Any, dict[str, Any]]:
    """The index in ``folder`` with its saved search settings applied, and its metadata (index.json).

    Folders written before index kinds existed hold a flat index and no ``index`` entry: read as flat.
    """
    faiss = faiss_module()
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    index = faiss.read_index(str(folder / INDEX_FILE))
    apply_search_settings(index, IndexSettings(**meta.get("index", {"kind": "flat"})))
    return index, meta
