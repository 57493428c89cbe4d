"""training/build_distillation_corpus.py: test queries and judgments never reach the corpus."""

from __future__ import annotations

import importlib.util
import json
import lzma
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import SHARED

REPO = Path(__file__).resolve().parents[2]
DATA = SHARED / "data"


def load_script(name: str):
    """Import a recipe from training/ by its path (training/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"training_{name}", REPO / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


builder = load_script("build_distillation_corpus")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _write_qrels(path: Path, rows: list[tuple[str, str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows))


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    """Four miniature data sets laid out like ../shared/data, with traps: train texts equal to test queries."""
    data = tmp_path / "data"
    words = "state space models read long documents in one linear pass while attention is quadratic".split()
    rng = random.Random(0)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    # SciFact: test claims t1..t3, train claims r1..r3; r3 has the text of test claim t1 (written differently)
    abstracts = [{"_id": f"a{i}", "title": f"Title {i}", "text": sentence(60)} for i in range(8)]
    _write_jsonl(data / "scifact" / "corpus.jsonl", abstracts)
    claims = [{"_id": f"t{i}", "text": f"test claim number {i} about models"} for i in range(1, 4)]
    claims += [{"_id": f"r{i}", "text": f"train claim number {i} about passes"} for i in range(1, 3)]
    claims += [{"_id": "r3", "text": "  TEST claim number 1   about models"}]
    _write_jsonl(data / "scifact" / "queries.jsonl", claims)
    _write_qrels(data / "scifact" / "qrels" / "test.tsv", [("t1", "a0", 1), ("t2", "a1", 1), ("t3", "a2", 1)])
    _write_qrels(data / "scifact" / "qrels" / "train.tsv", [("r1", "a3", 1), ("r2", "a4", 1), ("r3", "a0", 1)])
    # TREC DL 2019: every query is a test query; one passage is exactly a query's text
    _write_jsonl(data / "trec-dl-2019" / "corpus.jsonl",
                 [{"_id": f"p{i}", "title": "", "text": sentence(30)} for i in range(5)]
                 + [{"_id": "p9", "title": "", "text": "what is a selective scan"}])  # fmt: skip
    _write_jsonl(
        data / "trec-dl-2019" / "queries.jsonl",
        [{"_id": "1", "text": "what is a selective scan"}, {"_id": "2", "text": "how long is a linear pass"}],
    )
    _write_qrels(data / "trec-dl-2019" / "qrels" / "test.tsv", [("1", "p0", 3), ("2", "p1", 0)])
    # QMSum: meeting m_train (train), m_test (test); queries of both are in qrels/test.tsv
    meetings = [{"_id": "m_train", "title": "", "text": "A: " + sentence(900) + "\nB: TRAINMEETINGMARK"},
                {"_id": "m_test", "title": "", "text": "A: " + sentence(900) + "\nB: TESTMEETINGMARK"}]  # fmt: skip
    _write_jsonl(data / "qmsum" / "corpus.jsonl", meetings)
    _write_jsonl(data / "qmsum" / "queries.jsonl", [{"_id": "sum-m_test-1", "text": "the team summarised the test meeting"},
                                                    {"_id": "spec-m_train-1", "text": "what did A say about passes"}])  # fmt: skip
    _write_qrels(
        data / "qmsum" / "qrels" / "test.tsv", [("sum-m_test-1", "m_test", 1), ("spec-m_train-1", "m_train", 1)]
    )
    (data / "qmsum" / "meeting_splits.tsv").write_text("meeting-id\tqmsum-split\nm_train\ttrain\nm_test\ttest\n")
    # MS MARCO queries: one is a TREC DL 2019 query, one a QMSum query, in other case and spacing
    _write_jsonl(data / "msmarco-queries" / "queries.jsonl",
                 [{"_id": "7", "text": "what is paula deen's brother", "split": "dev"},
                  {"_id": "8", "text": "What is a  selective SCAN", "split": "eval"},
                  {"_id": "9", "text": "what did a say about passes", "split": "eval"}])  # fmt: skip
    return data


def test_no_test_query_or_judgment_reaches_the_corpus(data_dir, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    records, pairs, manifest = builder.build(data_dir, tokenizer, doc_sources=())
    test = builder.collect_test_set(data_dir)
    assert len(test.query_texts) == 3 + 2 + 2  # SciFact test, all TREC DL, all QMSum
    texts = [builder.normalise(record["text"]) for record in records]
    assert not set(texts) & test.query_texts
    for pair in pairs:
        assert builder.normalise(pair["query"]) not in test.query_texts
        assert (builder.normalise(pair["query"]), pair["document_id"]) not in test.judgments
    assert {pair["query"] for pair in pairs} == {
        "train claim number 1 about passes",
        "train claim number 2 about passes",
    }
    # what must be there is there: train claims, abstracts, passages, the train meeting, other queries
    assert "train claim number 1 about passes" in texts
    assert "what is paula deen's brother" in texts
    assert sum(record["source"] == "scifact" and record["kind"] == "passage" for record in records) == 8
    joined = "\n".join(record["text"] for record in records)
    assert "TRAINMEETINGMARK" in joined and "TESTMEETINGMARK" not in joined
    assert manifest["dropped"]["equal to a test query"] == 4  # r3, p9, and two MS MARCO queries
    assert manifest["dropped"]["pair that is a test query or judgment"] == 1
    assert manifest["gpt_neox_tokens"] == sum(manifest["tokens"].values()) > 0


def test_long_texts_are_cut_into_passages_and_segments_at_token_boundaries(tokenizer_dir, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(builder, "SHORT_TOKENS", (8, 20))
    monkeypatch.setattr(builder, "LONG_TOKENS", (40, 120))
    monkeypatch.setattr(builder, "MIN_PIECE_TOKENS", 4)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = " ".join(f"word{i % 37} and more text" for i in range(800))
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    tally: Counter = Counter()
    pieces = builder.cut(text, spans, random.Random(0), tally)
    assert {kind for _, kind, _ in pieces} == {"passage", "segment"}
    for piece, kind, tokens in pieces:
        assert piece in text
        assert tokens <= (20 if kind == "passage" else 120)
    share = tally["segment"] / (tally["segment"] + tally["passage"])
    assert abs(share - builder.LONG_TOKEN_SHARE) < 0.15


def test_documentation_is_read_from_installed_package_files(tmp_path):
    pod = tmp_path / "usr/share/perl/5.36.0/pod/perlintro.pod"
    pod.parent.mkdir(parents=True)
    pod.write_text("=head1 NAME\n\nperlintro - a brief introduction\n\n\n\n\nMore text.   \n")
    assert builder.documentation_files("perl-doc", tmp_path) == [pod]
    assert builder.documentation_files("python3-doc", tmp_path) == []
    [text] = builder.read_documentation("perl-doc", [pod])
    assert text.text == "=head1 NAME\n\nperlintro - a brief introduction\n\nMore text."
    if shutil.which("groff"):
        page = tmp_path / "usr/share/man/man1/demo.1"
        page.parent.mkdir(parents=True)
        page.write_text(
            ".TH DEMO 1\n.SH NAME\ndemo \\- does a demonstration\n.SH DESCRIPTION\n\\fBdemo\\fR reads text.\n"
        )
        rendered = builder._render_man_page(page)
        assert "demo - does a demonstration" in rendered and "\\fB" not in rendered


@pytest.mark.shared
@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
def test_real_data_sources_hold_no_test_query_and_no_test_meeting():
    test = builder.collect_test_set(DATA)
    assert len(test.query_texts) > 2000  # 300 SciFact + 43 TREC DL + ~1,800 QMSum (some repeated)
    short = builder.read_msmarco_queries(DATA) + builder.read_trec_dl_passages(DATA)
    texts, pairs = builder.read_scifact(DATA)
    kept = [t for t in short + texts if builder.normalise(t.text) not in test.query_texts]
    assert len(short + texts) - len(kept) <= 5  # the few train texts equal to a test query are what `build` drops
    meetings = builder.read_qmsum_meetings(DATA)
    assert len(meetings) == 162 + 35  # train + val
    test_meetings = {
        line.split("\t")[0]
        for line in (DATA / "qmsum" / "meeting_splits.tsv").read_text().splitlines()
        if line.endswith("\ttest")
    }
    corpus = {json.loads(line)["_id"]: json.loads(line)["text"] for line in open(DATA / "qmsum" / "corpus.jsonl")}
    assert not {corpus[m] for m in test_meetings} & {m.text for m in meetings}
    test_judged = set(builder._qrels(DATA / "scifact" / "qrels" / "test.tsv"))
    assert len(pairs) == 919 and all(pair["document_id"] for pair in pairs)
    assert not test_judged & {q for q in builder._qrels(DATA / "scifact" / "qrels" / "train.tsv")}


BUILT = REPO / ".distill" / "corpus" / "corpus.jsonl.xz"


@pytest.mark.shared
@pytest.mark.skipif(not (DATA.is_dir() and BUILT.is_file()), reason="needs ../shared/data and a built corpus")
def test_the_built_corpus_holds_no_test_query_and_no_test_judgment():
    test = builder.collect_test_set(DATA)
    with lzma.open(BUILT, "rt", encoding="utf-8") as lines:
        texts = {builder.normalise(json.loads(line)["text"]) for line in lines}
    assert not texts & test.query_texts
    with lzma.open(BUILT.with_name("pairs.jsonl.xz"), "rt", encoding="utf-8") as lines:
        pairs = [json.loads(line) for line in lines]
    assert pairs and all(builder.normalise(p["query"]) not in test.query_texts for p in pairs)
    assert not {(builder.normalise(p["query"]), p["document_id"]) for p in pairs} & test.judgments
