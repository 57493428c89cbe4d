"""Exact, IVF-PQ and HNSW indexes: recall against exact search, saved settings, the CLI from shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from st_mamba import cli
from st_mamba.scale import IndexSettings, build_index, load_index, measure_recall, recall_at_k, save_index
from st_mamba.scale.synthetic import ClusteredEmbeddings
from tests.scale.conftest import save_tiny_model, write_corpus

faiss = pytest.importorskip("faiss")


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """On CI's two shared cores, FAISS's OpenMP threads spin against other processes: one thread trains 3x faster."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def test_recall_at_k_counts_the_overlap_of_top_k_sets():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert recall_at_k(exact, exact, k=4) == 1.0
    assert recall_at_k(np.array([[3, 2, 9, 8], [7, 6, 5, 4]]), exact, k=4) == 0.75  # order within top-k is free
    assert recall_at_k(np.array([[0, 1, -1, -1], [9, 9, 9, 9]]), exact, k=4) == 0.25  # -1: no result
    assert recall_at_k(np.array([[0, 1, 9, 9]]), np.array([[0, 1, 2, 3]]), k=2) == 1.0
    with pytest.raises(ValueError, match="rows"):
        recall_at_k(exact[:1], exact)


@pytest.fixture(scope="module")
def synthetic():
    source = ClusteredEmbeddings(dimension=64, clusters=64, latent=16, seed=0)
    return source.sample(10_000, seed=1), source.sample(300, seed=2, extra_noise=0.1)


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_default_settings_reach_high_recall(synthetic, kind):
    vectors, queries = synthetic
    index, settings = build_index(vectors, IndexSettings(kind=kind))
    assert index.ntotal == len(vectors)
    assert measure_recall(index, vectors, queries).recall >= 0.95
    assert measure_recall(index, vectors, sample=200).recall >= 0.95  # corpus vectors as queries, as the CLI does


def test_flat_is_exact(synthetic):
    vectors, queries = synthetic
    stored = vectors[:5000].astype(np.float16)  # as in float16 shards
    index, _ = build_index(stored)
    assert measure_recall(index, stored, queries).recall == 1.0


def test_search_settings_survive_save_and_load(synthetic, tmp_path):
    vectors, _ = synthetic
    for kind, check in [("hnsw", lambda i: i.hnsw.efSearch == 77),
                        ("ivfpq", lambda i: faiss.extract_index_ivf(i.base_index).nprobe == 7 and i.k_factor == 3)]:  # fmt: skip
        settings = IndexSettings(kind=kind, ef_search=77, nprobe=7, refine_factor=3, nlist=16, nbits=4)
        index, settings = build_index(vectors[:4000], settings)
        ids = [str(i) for i in range(4000)]
        save_index(tmp_path / kind, index, settings, ids, np.arange(4000), {"model": "m", "corpus": "c"})
        loaded, meta = load_index(tmp_path / kind)
        assert check(loaded) and meta["index"]["kind"] == kind and meta["documents"] == 4000


def test_ivfpq_refuses_too_few_vectors_to_train(synthetic):
    with pytest.raises(ValueError, match="cannot train"):
        build_index(synthetic[0][:100], IndexSettings(kind="ivfpq"))


def test_cli_builds_every_kind_from_shards_and_searches_it(tokenizer_dir, tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model", tokenizer_dir, d_model=64)
    write_corpus(tmp_path / "corpus.jsonl", 300)
    shards = tmp_path / "shards"
    assert cli.main(["encode-corpus", str(tmp_path / "corpus.jsonl"), "--model", str(model_dir), "-o", str(shards),
                     "--shard-size", "100", "--no-progress"]) == 0  # fmt: skip
    runs = {}
    for kind, extra in [("flat", []), ("hnsw", []), ("ivfpq", ["--nlist", "8", "--nbits", "6", "--nprobe", "8"])]:
        argv = ["index", "--shards", str(shards), "--kind", kind, "-o", str(tmp_path / kind), *extra]
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert f"indexed 300 documents from {shards}" in out
        assert ("recall@10 against exact search" in out) == (kind != "flat")
        run = tmp_path / f"{kind}.trec"
        assert cli.main(["search", str(tmp_path / kind), "the quick fox", "--top-k", "5", "-o", str(run)]) == 0
        assert "query 1: the quick fox" in capsys.readouterr().out
        runs[kind] = [line.split()[2] for line in run.read_text().splitlines()]
    assert runs["hnsw"][:3] == runs["flat"][:3] and runs["ivfpq"][0] == runs["flat"][0]
    assert json.loads((tmp_path / "ivfpq" / cli.META_FILE).read_text())["index"]["nprobe"] == 8


def test_search_with_a_model_of_another_dimension_is_a_clear_error(model_dir, tokenizer_dir, tmp_path, capsys):
    write_corpus(tmp_path / "corpus.jsonl", 20)
    assert cli.main(["index", str(tmp_path / "corpus.jsonl"), "--model", str(model_dir), "-o", str(tmp_path / "index"),
                     "--no-progress"]) == 0  # fmt: skip
    wider = save_tiny_model(tmp_path / "wider", tokenizer_dir, d_model=48)
    assert cli.main(["search", str(tmp_path / "index"), "a query", "--model", str(wider)]) == 1
    err = capsys.readouterr().err
    assert "makes 48-dimensional embeddings" in err and "holds 32-dimensional ones" in err


def test_index_names_missing_shards(model_dir, tmp_path, capsys):
    write_corpus(tmp_path / "corpus.jsonl", 12)
    assert cli.main(["encode-corpus", str(tmp_path / "corpus.jsonl"), "--model", str(model_dir), "-o",
                     str(tmp_path / "shards"), "--shard-size", "5", "--no-progress"]) == 0  # fmt: skip
    (tmp_path / "shards" / "shard-000001.npz").unlink()
    assert cli.main(["index", "--shards", str(tmp_path / "shards"), "-o", str(tmp_path / "index")]) == 1
    assert "1 of 3 shards" in capsys.readouterr().err
