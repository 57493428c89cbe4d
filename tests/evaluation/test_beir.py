"""Loading BEIR folders: the tiny fixture, gzipped files, and every kind of bad input."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import pytest

from st_mamba.evaluation import DataFileError, load_beir


def _copy(tiny_beir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_beir, tmp_path / "beir"))


def test_loads_judged_queries_and_full_corpus(tiny_beir, caplog):
    with caplog.at_level(logging.INFO, logger="st_mamba"):
        dataset = load_beir(tiny_beir, "test")
    assert list(dataset.corpus) == ["mamba", "bm25", "faiss", "ndcg", "fox", "empty"]
    assert list(dataset.queries) == ["q1", "q2", "q3"]
    assert dataset.unjudged_queries == 1
    assert dataset.qrels["q2"] == {"bm25": 2, "ndcg": 1, "fox": 0}
    assert dataset.qrels["q3"]["not-in-corpus"] == 1  # kept: recall must count it
    assert dataset.corpus["mamba"].full_text.startswith("Mamba Mamba is a selective")
    assert dataset.corpus["fox"].full_text == "The quick brown fox jumps over the lazy dog."
    assert "1 of 4 queries have no judgments" in caplog.text
    assert "1 judged documents are not in the corpus" in caplog.text


def test_reads_gzipped_files(tiny_beir, tmp_path):
    folder = _copy(tiny_beir, tmp_path)
    for name in ("corpus.jsonl", "queries.jsonl"):
        with open(folder / name, "rb") as plain, gzip.open(folder / f"{name}.gz", "wb") as packed:
            packed.write(plain.read())
        (folder / name).unlink()
    assert load_beir(folder).corpus == load_beir(tiny_beir).corpus


def test_missing_folder_and_files_are_named(tiny_beir, tmp_path):
    with pytest.raises(FileNotFoundError, match="BEIR folder not found: .*nowhere"):
        load_beir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"qrels for split 'dev' not found: .*qrels/dev.tsv"):
        load_beir(tiny_beir, "dev")
    folder = _copy(tiny_beir, tmp_path)
    (folder / "corpus.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"corpus not found: looked for .*corpus.jsonl and .*corpus.jsonl.gz"):
        load_beir(folder)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"_id": "x", "text": "unterminated', r"corpus.jsonl:3: not valid JSON"),
        ('["a", "list"]', r"corpus.jsonl:3: expected a JSON object, got list"),
        ('{"text": "no id"}', r'corpus.jsonl:3: missing "_id"'),
        ('{"_id": "x"}', r'corpus.jsonl:3: missing "text"'),
        ('{"_id": "x", "text": 5}', r'corpus.jsonl:3: "text" must be a string, got int'),
        ('{"_id": "mamba", "text": "again"}', r"corpus.jsonl:3: duplicate document id 'mamba' \(first on line 1\)"),
    ],
)
def test_malformed_corpus_line_reports_file_and_line(tiny_beir, tmp_path, line, message):
    folder = _copy(tiny_beir, tmp_path)
    rows = (folder / "corpus.jsonl").read_text().splitlines()
    rows.insert(2, line)
    (folder / "corpus.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataFileError, match=message):
        load_beir(folder)


def test_empty_corpus_and_queries(tiny_beir, tmp_path):
    folder = _copy(tiny_beir, tmp_path)
    (folder / "queries.jsonl").write_text("\n\n")
    with pytest.raises(DataFileError, match="queries.jsonl: no queries in the file"):
        load_beir(folder)
    (folder / "corpus.jsonl").write_text("")
    with pytest.raises(DataFileError, match="corpus.jsonl: the corpus is empty"):
        load_beir(folder)


def test_judgments_for_unknown_queries_are_dropped_with_a_warning(tiny_beir, tmp_path, caplog):
    folder = _copy(tiny_beir, tmp_path)
    with open(folder / "qrels" / "test.tsv", "a") as qrels:
        qrels.write("ghost\tmamba\t1\n")
    with caplog.at_level(logging.WARNING, logger="st_mamba"):
        dataset = load_beir(folder)
    assert "ghost" not in dataset.qrels
    assert "judges 1 queries that are not in" in caplog.text


def test_no_query_both_judged_and_known_is_an_error(tiny_beir, tmp_path):
    folder = _copy(tiny_beir, tmp_path)
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "other", "text": "x"}) + "\n")
    with pytest.raises(DataFileError, match="none of its queries is in"):
        load_beir(folder)
