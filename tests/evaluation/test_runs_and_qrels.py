"""TREC run files and qrels (BEIR TSV and TREC layouts): reading, writing, top-k, errors."""

from __future__ import annotations

import pytest

from st_mamba.evaluation import DataFileError, read_qrels, read_run, top_k, write_run


def test_reads_run_in_rank_order(tiny_beir):
    run = read_run(tiny_beir / "runs" / "first-stage.trec")
    assert list(run) == ["q1", "q2", "q3", "q4"]
    assert list(run["q1"].items()) == [("bm25", 3.0), ("mamba", 2.5), ("fox", 1.0)]


def test_top_k_by_score_ties_keep_file_order():
    run = {"q": {"a": 1.0, "b": 3.0, "c": 3.0, "d": 2.0}}
    assert list(top_k(run, 3)["q"]) == ["b", "c", "d"]
    with pytest.raises(ValueError, match="at least 1"):
        top_k(run, 0)


def test_write_then_read_gives_the_same_run(tmp_path):
    run = {"q1": {"a": 0.1, "b": 0.30000000000000004, "c": -2.5}, "q2": {"a": 1e-9}}
    path = write_run(run, tmp_path / "sub" / "run.trec", tag="test")
    assert path.read_text().splitlines()[0] == "q1 Q0 b 1 0.30000000000000004 test"
    assert read_run(path) == run


@pytest.mark.parametrize(
    "text, message",
    [
        ("q1 Q0 a 1 0.5\n", r"run.trec:1: expected 6 columns .* found 5"),
        ("q1 Q0 a 1 0.5 t\nq1 Q0 b one 0.4 t\n", r"run.trec:2: rank 'one' or score '0.4' is not a number"),
        (
            "q1 Q0 a 1 0.5 t\n\nq1 Q0 a 2 0.4 t\n",
            r"run.trec:3: document a appears twice for query q1 \(first on line 1\)",
        ),
        ("\n", r"run.trec: no results in the file"),
    ],
)
def test_bad_run_lines_are_reported_with_line_numbers(tmp_path, text, message):
    (tmp_path / "run.trec").write_text(text)
    with pytest.raises(DataFileError, match=message):
        read_run(tmp_path / "run.trec")


def test_missing_run_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="run file not found: .*absent.trec"):
        read_run(tmp_path / "absent.trec")


def test_reads_beir_and_trec_qrels(tmp_path):
    (tmp_path / "beir.tsv").write_text("query-id\tcorpus-id\tscore\nq1\ta\t1\nq1\tb\t0\nq2\ta\t3\n")
    (tmp_path / "trec.txt").write_text("q1 0 a 1\nq1 0 b 0\nq2 Q0 a 3\n")
    expected = {"q1": {"a": 1, "b": 0}, "q2": {"a": 3}}
    assert read_qrels(tmp_path / "beir.tsv") == expected
    assert read_qrels(tmp_path / "trec.txt") == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("q1\ta\n", r"qrels.tsv:1: expected 3 columns .* found 2"),
        ("query-id\tcorpus-id\tscore\nq1\ta\thigh\n", r"qrels.tsv:2: grade 'high' is not an integer"),
        ("q1\ta\t1\nq1\ta\t2\n", r"qrels.tsv:2: \(q1, a\) is judged again with grade 2, earlier with 1"),
        ("query-id\tcorpus-id\tscore\n", r"qrels.tsv: no judgments in the file"),
    ],
)
def test_bad_qrels_lines_are_reported_with_line_numbers(tmp_path, text, message):
    (tmp_path / "qrels.tsv").write_text(text)
    with pytest.raises(DataFileError, match=message):
        read_qrels(tmp_path / "qrels.tsv")
