"""Reading corpora as streams (JSONL, BEIR folder, Parquet), bad lines, and the shard plan."""

from __future__ import annotations

import json
import logging

import pytest

from st_mamba.scale import Corpus, CorpusError, plan_shards
from tests.scale.conftest import texts_of, write_corpus


def test_jsonl_documents_and_positions(tmp_path):
    rows = write_corpus(tmp_path / "corpus.jsonl", 7)
    corpus = Corpus.open(tmp_path)  # a BEIR folder
    documents = list(corpus.documents())
    assert [d.id for d in documents] == [row["_id"] for row in rows]
    assert [d.text for d in documents] == texts_of(rows)
    raw = (tmp_path / "corpus.jsonl").read_bytes()
    for document in documents:
        line = raw[document.position :].split(b"\n", 1)[0]
        assert json.loads(line)["_id"] == document.id
    assert [d.line for d in documents] == list(range(1, 8))


def test_parquet_reads_like_jsonl(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = write_corpus(tmp_path / "corpus.jsonl", 11)
    table = pa.table({"_id": [r["_id"] for r in rows], "title": [r.get("title") for r in rows],
                      "text": [r["text"] for r in rows]})  # fmt: skip
    pq.write_table(table, tmp_path / "corpus.parquet", row_group_size=4)
    corpus = Corpus.open(tmp_path / "corpus.parquet")
    assert [(d.id, d.text) for d in corpus.documents()] == [
        (r["_id"], t) for r, t in zip(rows, texts_of(rows), strict=True)
    ]
    assert [d.id for d in corpus.documents(3, 9)] == [f"doc{i}" for i in range(3, 9)]  # across row groups
    shards, _ = plan_shards(corpus, 5, progress=False)
    assert [[d.id for d in corpus.documents(s.start, s.stop)] for s in shards] == [
        [f"doc{i}" for i in range(j, min(j + 5, 11))] for j in (0, 5, 10)
    ]


def test_shards_cover_the_corpus_once_in_order(tmp_path):
    rows = write_corpus(tmp_path / "corpus.jsonl", 23)
    corpus = Corpus.open(tmp_path / "corpus.jsonl")
    shards, skipped = plan_shards(corpus, 5, progress=False)
    assert [s.documents for s in shards] == [5, 5, 5, 5, 3] and skipped == []
    read = [d.id for s in shards for d in corpus.documents(s.start, s.stop, s.first_line)]
    assert read == [row["_id"] for row in rows]


BAD_CORPUS = [
    '{"_id": "a", "text": "fine"}',
    '{"text": "no id"}',
    "",
    '{"_id": "b", "text": "fine too"}',
    '{"_id": "c", "title": "no text"}',
    "not json",
    '{"_id": "d", "text": "last"}',
]


def test_a_bad_line_fails_with_its_line_number(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(BAD_CORPUS) + "\n")
    with pytest.raises(CorpusError, match=rf"{path}:2: no _id \(or id\)"):
        plan_shards(Corpus.open(path), 2, progress=False)


def test_bad_lines_are_skipped_and_counted_on_request(tmp_path, caplog):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(BAD_CORPUS) + "\n")
    corpus = Corpus.open(path, on_bad_line="skip")
    with caplog.at_level(logging.WARNING):
        shards, skipped = plan_shards(corpus, 2, progress=False)
    assert skipped == [2, 5, 6]
    assert "skipped 3 bad line(s)" in caplog.text and "line(s) 2, 5, 6" in caplog.text
    assert [[d.id for d in corpus.documents(s.start, s.stop)] for s in shards] == [["a", "b"], ["d"]]


def test_missing_corpus_is_named(tmp_path):
    with pytest.raises(CorpusError, match="no corpus.jsonl or corpus.parquet"):
        Corpus.open(tmp_path)
