"""The command line, run in-process through ``main([...])``."""

from __future__ import annotations

import json

import pytest

from st_mamba.evaluation.cli import build_parser, main


@pytest.fixture
def saved_model(tiny_model, tmp_path):
    folder = tmp_path / "tiny-mamba"
    tiny_model.save(str(folder))
    return folder


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("beir", "score-run", "download", "mteb"):
        assert command in out


def test_score_run_writes_json_and_markdown(tiny_beir, tmp_path, capsys):
    output = tmp_path / "scores.json"
    status = main([
        "score-run", "--qrels", str(tiny_beir / "qrels" / "test.tsv"), "--run", str(tiny_beir / "runs" / "first-stage.trec"),
        "--measures", "nDCG@10", "RR@10", "--min-relevance", "2", "--output", str(output),
    ])  # fmt: skip
    assert status == 0
    table = capsys.readouterr().out
    assert table.startswith("| run | nDCG@10 | RR(rel=2)@10 | queries | seconds |")
    report = json.loads(output.read_text())
    assert report["min_relevance"] == 2 and report["results"][0]["queries"] == 3
    assert output.with_suffix(".md").read_text() == table


def test_output_must_be_the_json_path(tiny_beir, tmp_path, capsys):
    qrels, run = tiny_beir / "qrels" / "test.tsv", tiny_beir / "runs" / "first-stage.trec"
    status = main(["score-run", "--qrels", str(qrels), "--run", str(run), "--output", str(tmp_path / "scores.md")])
    assert status == 1
    assert "the markdown table is written beside it" in capsys.readouterr().err


def test_beir_bm25_only(tiny_beir, tmp_path, capsys):
    status = main(["beir", "--data", str(tiny_beir), "--bm25", "--no-progress", "--save-runs", str(tmp_path / "runs")])
    assert status == 0
    assert "| bm25 |" in capsys.readouterr().out
    assert (tmp_path / "runs" / "bm25.trec").is_file()


def test_beir_model_compares_document_modes(saved_model, tiny_beir, tmp_path, capsys):
    output = tmp_path / "results.json"
    status = main([
        "beir", "--model", str(saved_model), "--data", str(tiny_beir), "--top-k", "5", "--no-progress",
        "--doc-mode", "one-pass", "--doc-mode", "truncate:16", "--doc-mode", "chunk:8:mean", "--output", str(output),
        "--stream-chunk-size", "8",
    ])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    names = [result["name"] for result in json.loads(output.read_text())["results"]]
    assert names == ["tiny-mamba [one-pass]", "tiny-mamba [truncate:16]", "tiny-mamba [chunk:8:mean]"]
    assert json.loads(output.read_text())["results"][0]["settings"]["stream_chunk_size"] == 8


def test_beir_model_searches_with_recased_queries(tiny_model, tiny_beir, tmp_path, capsys):
    tiny_model[0].do_lower_case = True  # blind to case: every re-typed query set must score the same
    tiny_model.save(str(tmp_path / "uncased"))
    output = tmp_path / "results.json"
    cases = ["--query-case", "as-given", "--query-case", "upper", "--query-case", "title"]
    status = main(["beir", "--model", str(tmp_path / "uncased"), "--data", str(tiny_beir), "--top-k", "5",
                   "--no-progress", "--output", str(output), *cases])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    results = json.loads(output.read_text())["results"]
    assert [r["name"] for r in results] == [
        "uncased [model]",
        "uncased [model] queries upper",
        "uncased [model] queries title",
    ]
    assert [r["settings"]["query_case"] for r in results] == ["as-given", "upper", "title"]
    assert results[0]["scores"] == results[1]["scores"] == results[2]["scores"]


def test_recased_data_set_retypes_every_query_and_refuses_unknown_cases(tiny_beir):
    from st_mamba.evaluation.beir import load_beir

    dataset = load_beir(tiny_beir)
    upper = dataset.recased("upper")
    assert upper.queries == {query_id: text.upper() for query_id, text in dataset.queries.items()}
    assert upper.corpus is dataset.corpus and upper.qrels is dataset.qrels
    with pytest.raises(ValueError, match="unknown query case 'shouting'"):
        dataset.recased("shouting")


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_beir_model_loads_in_the_dtype_asked_for(saved_model, tiny_beir, tmp_path, capsys, dtype):
    output = tmp_path / "results.json"
    options = ["--dtype", dtype] if dtype else []
    status = main(["beir", "--model", str(saved_model), "--data", str(tiny_beir), "--no-progress", "--output", str(output), *options])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    result = json.loads(output.read_text())["results"][0]
    assert result["settings"]["dtype"] == (dtype or "float32")
    assert 0.0 <= result["scores"]["nDCG@10"] <= 1.0


def test_beir_rerank_reports_first_stage_and_model(saved_model, tiny_beir, capsys):
    run_file = tiny_beir / "runs" / "first-stage.trec"
    arguments = [
        "beir",
        "--model",
        str(saved_model),
        "--data",
        str(tiny_beir),
        "--rerank",
        str(run_file),
        "--depth",
        "2",
    ]
    status = main([*arguments, "--no-progress"])
    assert status == 0
    out = capsys.readouterr().out
    assert "| first-stage.trec (top 2) |" in out and "| tiny-mamba [model] rerank top 2 |" in out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["beir", "--data", "{tiny}", "--no-progress"], "nothing to evaluate: give --model, --bm25 or both"),
        (["beir", "--data", "{tiny}", "--bm25", "--rerank", "{tiny}/runs/first-stage.trec"], "--rerank needs --model"),
        (["beir", "--data", "{tiny}/absent", "--bm25"], "BEIR folder not found"),
        (["beir", "--data", "{tiny}", "--bm25", "--measures", "Foo@3"], "unknown measure 'Foo@3'"),
        (["beir", "--data", "{tiny}", "--bm25", "--doc-mode", "chunk:x"], "'x' is not a number of tokens"),
        (
            ["score-run", "--qrels", "{tiny}/qrels/test.tsv", "--run", "{tiny}/corpus.jsonl"],
            "corpus.jsonl:1: expected 6 columns",
        ),
        (["download", "beir", "--to", "{tiny}"], "download beir needs a name"),
        (
            [
                "beir",
                "--data",
                "{tiny}",
                "--model",
                "{tiny}",
                "--rerank",
                "{tiny}/runs/first-stage.trec",
                "--query-case",
                "upper",
            ],
            "--query-case is for full-corpus search",
        ),  # fmt: skip
    ],
)
def test_bad_input_exits_1_with_a_clear_message(tiny_beir, capsys, arguments, message):
    status = main([argument.replace("{tiny}", str(tiny_beir)) for argument in arguments])
    assert status == 1
    assert message in capsys.readouterr().err
