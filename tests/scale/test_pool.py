"""Sentence-Transformers' multi-process pool: MambaEncoder travels to spawned workers and encodes the same."""

from __future__ import annotations

import numpy as np

from st_mamba.scale import encode_corpus, load_shards
from tests.scale.conftest import write_corpus


def test_a_pool_of_two_cpu_workers_matches_one_process(model, tmp_path):
    write_corpus(tmp_path / "corpus.jsonl", 120)
    options = dict(shard_size=50, dtype="float32", progress=False)
    encode_corpus(tmp_path / "corpus.jsonl", model, tmp_path / "single", **options)
    encode_corpus(tmp_path / "corpus.jsonl", model, tmp_path / "pool", devices=["cpu", "cpu"], **options)
    single, pooled = load_shards(tmp_path / "single"), load_shards(tmp_path / "pool")
    assert pooled.ids == single.ids
    # The pool cuts each shard into other batches (other padding): equal up to float rounding.
    np.testing.assert_allclose(pooled.embeddings, single.embeddings, rtol=0, atol=1e-5)
