"""The st-mamba command: demo (offline, as CI runs it), encode, index, search and the two delegations."""

from __future__ import annotations

import json
import re
from importlib.metadata import entry_points

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from st_mamba import MambaConfig, cli, from_config

PROMPTS = {"query": "query: ", "document": "passage: "}
CORPUS_ROWS = [
    {"_id": "ssm", "title": "State spaces", "text": "State space models keep a fixed-size state."},
    {"_id": "fox", "title": "", "text": "The quick brown fox\njumps over the lazy dog."},
    {"_id": "cos", "text": "Dense retrieval ranks documents by cosine similarity."},
    {"_id": "eos", "title": "Pooling", "text": "Mamba Retriever embeds a text as the hidden state at EOS."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=400, d_state=8, dt_rank=4)
    model = from_config(config, tokenizer_dir, seed=0, max_seq_length=256, prompts=PROMPTS, device="cpu")
    folder = tmp_path_factory.mktemp("cli-model")
    model.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return SentenceTransformer(str(model_dir), device="cpu", trust_remote_code=True)


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CORPUS_ROWS), encoding="utf-8")
    return path


def test_console_script_is_declared():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "st-mamba"]
    assert script.value == "st_mamba.cli:main"


# --- demo -----------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not cli.DEFAULT_MODEL.is_dir() and not cli.GPT_NEOX_TOKENIZER_DIR.is_dir(),
    reason="needs the shipped model or ../shared",
)
def test_demo_with_its_defaults_runs_offline(capsys):
    """What the README's main command runs: the shipped model, else the loudly announced stand-in."""
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    for query in cli.DEMO_QUERIES:
        assert f"query: {query}" in out
    assert len(re.findall(r"^  1\. ", out, re.M)) == len(cli.DEMO_QUERIES)
    assert ("UNTRAINED" in out) == (not cli.DEFAULT_MODEL.is_dir())


def test_demo_says_loudly_when_its_model_is_untrained(tokenizer_dir, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(cli, "DEFAULT_MODEL", tmp_path / "not-trained-yet")
    assert cli.main(["demo", "--tokenizer", str(tokenizer_dir), "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "MEANINGLESS" in out
    assert any("UNTRAINED" in record.message and record.levelname == "WARNING" for record in caplog.records)
    assert len(re.findall(r"^  2\. ", out, re.M)) == len(cli.DEMO_QUERIES)


def test_demo_with_a_trained_model_makes_no_such_claim(model_dir, tmp_path, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text("# Foxes\nThe quick brown fox.\n\n# Retrieval\nCosine similarity ranks documents.\n")
    assert cli.main(["demo", "--model", str(model_dir), "--corpus", str(notes), "--query", "what is a fox?"]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" not in out
    assert "query: what is a fox?" in out and "notes.md § Foxes" in out and "notes.md § Retrieval" in out


def test_demo_without_model_or_tokenizer_names_both_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "DEFAULT_MODEL", tmp_path / "no-model")
    assert cli.main(["demo", "--tokenizer", str(tmp_path / "no-tokenizer")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "no-model") in err and str(tmp_path / "no-tokenizer") in err


def test_read_passages_keeps_code_blocks_whole_and_names_sections(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Intro line.\n\n## Usage\nRun this:\n\n```bash\npip install x\n\nst-mamba demo\n```\n\nDone.\n")
    passages = cli.read_passages([page], root=tmp_path)
    assert [p.source for p in passages] == ["page.md", "page.md § Usage", "page.md § Usage", "page.md § Usage"]
    assert passages[2].text == "```bash\npip install x\n\nst-mamba demo\n```"


# --- encode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [None, ""], ids=["saved-prompt", "explicit-empty-prompt"])
def test_encode_texts_to_npy(model_dir, model, tmp_path, prompt):
    out = tmp_path / "vectors.npy"
    texts = ["first text", "second\ntext"]
    argv = ["encode", *texts, "--model", str(model_dir), "--output", str(out), "--no-progress"]
    assert cli.main(argv + ([] if prompt is None else ["--prompt", prompt])) == 0
    used = "passage: " if prompt is None else prompt
    np.testing.assert_allclose(np.load(out), model.encode([used + t for t in texts]), atol=1e-6)


def test_encode_jsonl_to_jsonl_keeps_ids_and_text_as_is(model_dir, model, corpus_file, tmp_path):
    out = tmp_path / "vectors.jsonl"
    argv = ["encode", "--input", str(corpus_file), "--model", str(model_dir), "--kind", "query", "-o", str(out)]
    assert cli.main([*argv, "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == [row["_id"] for row in CORPUS_ROWS]
    expected = model.encode(["query: " + row["text"] for row in CORPUS_ROWS])  # the newline stays in
    np.testing.assert_allclose([row["embedding"] for row in rows], expected, atol=1e-6)


def test_missing_model_path_is_named(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert cli.main(["encode", "text", "--model", str(missing)]) == 1
    assert f"no model folder at {missing}" in capsys.readouterr().err


def test_bad_jsonl_line_is_named(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    assert cli.main(["encode", "--input", str(bad), "--model", str(model_dir)]) == 1
    assert f"{bad}:2: field 'text'" in capsys.readouterr().err


# --- index and search -----------------------------------------------------------------------------


def test_index_then_search_matches_exact_cosine_ranking(model_dir, model, corpus_file, tmp_path, capsys):
    pytest.importorskip("faiss")
    index_dir = tmp_path / "index"
    assert cli.main(["index", str(corpus_file), "--model", str(model_dir), "-o", str(index_dir), "--no-progress"]) == 0
    assert json.loads((index_dir / cli.IDS_FILE).read_text()) == [row["_id"] for row in CORPUS_ROWS]
    assert json.loads((index_dir / cli.META_FILE).read_text())["documents"] == len(CORPUS_ROWS)

    query = "how are documents ranked?"
    run = tmp_path / "run.trec"
    assert cli.main(["search", str(index_dir), query, "--top-k", "3", "-o", str(run)]) == 0
    out = capsys.readouterr().out
    documents = model.encode_document([f"{row.get('title') or ''} {row['text']}".strip() for row in CORPUS_ROWS])
    scores = documents @ model.encode_query([query])[0]
    expected = [CORPUS_ROWS[i]["_id"] for i in np.argsort(-scores)[:3]]
    assert [line.split()[2] for line in run.read_text().splitlines()] == expected
    assert f"query 1: {query}" in out
    assert f"  1. {scores.max():7.4f}  {expected[0]}" in out


def test_index_names_a_bad_corpus_line_or_skips_it_on_request(model_dir, tmp_path, capsys, caplog):
    pytest.importorskip("faiss")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "a", "text": "one"}\n{"text": "no id"}\n{"_id": "c", "text": "three"}\n')
    argv = ["index", str(corpus), "--model", str(model_dir), "--no-progress"]
    assert cli.main([*argv, "-o", str(tmp_path / "fail")]) == 1
    assert f"{corpus}:2: no _id (or id)" in capsys.readouterr().err
    assert cli.main([*argv, "-o", str(tmp_path / "skip"), "--on-bad-line", "skip"]) == 0
    assert json.loads((tmp_path / "skip" / cli.IDS_FILE).read_text()) == ["a", "c"]
    assert "skipped 1 bad line(s)" in caplog.text


# --- delegations ----------------------------------------------------------------------------------


def test_evaluate_hands_its_arguments_to_the_harness(capsys):
    pytest.importorskip("st_mamba.evaluation")
    assert cli.main(["evaluate", "--help"]) == 0
    assert "beir" in capsys.readouterr().out


def test_evaluate_without_the_harness_says_so(monkeypatch, capsys):
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["evaluate", "beir"]) == 1
    assert "st_mamba.evaluation" in capsys.readouterr().err


def test_bench_runs_the_benchmark_script_with_its_arguments(tmp_path, monkeypatch):
    script = tmp_path / "benchmarks" / "bench_cpu.py"
    script.parent.mkdir()
    script.write_text("import sys, pathlib\npathlib.Path(sys.argv[1]).write_text(' '.join(sys.argv[2:]))\n")
    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path)
    record = tmp_path / "argv.txt"
    assert cli.main(["bench", str(record), "--threads", "2"]) == 0
    assert record.read_text() == "--threads 2"


def test_bench_without_the_script_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path)
    assert cli.main(["bench"]) == 1
    assert str(tmp_path / "benchmarks" / "bench_cpu.py") in capsys.readouterr().err


def test_folder_naming_another_class_still_needs_trust_remote_code(tiny_model, tmp_path):
    """Only MambaEncoder (installed code) loads without the flag; a folder naming anything else does not."""
    from st_mamba.loading import is_st_mamba_folder

    tiny_model.save(str(tmp_path))
    assert is_st_mamba_folder(tmp_path)
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules[0]["type"] = "st_mamba.Evil"  # would make transformers look for st_mamba.py in the folder
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "st_mamba.py").write_text("raise SystemExit('folder code ran')\n")
    assert not is_st_mamba_folder(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        cli.load_model(tmp_path)
