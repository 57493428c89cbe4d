"""Corpora beyond one machine: sharded resumable encoding, Ray Data, approximate FAISS indexes.

- ``corpus``: JSONL / BEIR / Parquet corpora read as a stream; the shard plan.
- ``shards``: the output folder (manifest + atomically written shards); reading it back.
- ``encode``: ``encode_corpus`` on one machine, in one process or Sentence-Transformers' process pool.
- ``ray_encode``: ``encode_corpus_ray``, the same on a Ray cluster (Ray Data, one model actor per GPU).
- ``indexes``: exact, IVF-PQ and HNSW indexes from the shards, recall@k against exact search.
- ``synthetic``: embedding-like random vectors for index benchmarks and tests.

See docs/scale.md.
"""

from __future__ import annotations

from st_mamba.scale.corpus import Corpus, CorpusError, Document, ShardSpec, plan_shards
from st_mamba.scale.encode import encode_corpus
from st_mamba.scale.indexes import IndexSettings, build_index, load_index, measure_recall, recall_at_k, save_index
from st_mamba.scale.ray_encode import encode_corpus_ray
from st_mamba.scale.shards import Manifest, MissingShardsError, ResumeError, iter_shards, load_shards

__all__ = [
    "Corpus",
    "CorpusError",
    "Document",
    "IndexSettings",
    "Manifest",
    "MissingShardsError",
    "ResumeError",
    "ShardSpec",
    "build_index",
    "encode_corpus",
    "encode_corpus_ray",
    "iter_shards",
    "load_index",
    "load_shards",
    "measure_recall",
    "plan_shards",
    "recall_at_k",
    "save_index",
]
