"""Build the text corpus that training/distill.py distils all-MiniLM-L6-v2 on: real text that exists offline.

Sources (each data set's README in ../shared/data gives its origin and licence; the Debian packages'
``/usr/share/doc/<package>/copyright`` files give theirs, and the manifest records them):

- ``msmarco-queries``: the 13,817 MS MARCO dev/eval "small" query texts (none is a TREC DL 2019 query);
- ``scifact``: the 5,183 abstracts, and the 809 *train* claims with their 919 train judgments (the
  only real pairs, kept apart for ``MultipleNegativesRankingLoss``);
- ``trec-dl-2019``: the 10,852 pooled passages (the text only; the 43 queries are all test queries);
- ``qmsum``: the transcripts of the *train and val* meetings (the 35 test meetings are left out, as
  are all QMSum queries, whose judgments are all in ``qrels/test.tsv``);
- documentation that Debian packages install: the Python 3.11 manual's reST sources (python3-doc),
  the Linux kernel's Documentation/ (linux-doc), Perl's pod manual (perl-doc) and man pages rendered
  with groff (manpages, manpages-dev and every other installed package's pages). Install them once:
  ``apt-get update && apt-get install -y --no-install-recommends python3-doc linux-doc perl-doc``.

Long texts (meetings, documentation) are cut, at GPT-NeoX token boundaries, into *passages* of
``SHORT_TOKENS`` and *segments* of ``LONG_TOKENS`` tokens (lengths drawn log-uniformly), about
``LONG_TOKEN_SHARE`` of the tokens going to segments. distill.py gives each text the mean of the
teacher's embeddings over its consecutive 256-token windows.

Test data never enters the corpus: every query text of SciFact's test split, of TREC DL 2019 and of
QMSum is collected first, and any corpus text equal to one of them (compared case- and
whitespace-insensitively) is dropped; no training pair is a test judgment (checked by
tests/training/test_corpus_builder.py).

Output (``--output``): ``corpus.jsonl.xz`` (one ``{"text", "source", "kind"}`` per line, kind
"query", "passage" or "segment"), ``pairs.jsonl.xz`` (``{"query", "document", "source"}``) and
``manifest.json`` (counts, GPT-NeoX tokens per source and kind, licences, what was excluded).

Run:
    python training/build_distillation_corpus.py --data ../shared/data --output .distill/corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import lzma
import math
import random
import re
import subprocess
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
# GPT-NeoX tokens taken from each documentation source (documents are read in a seeded random order).
DOC_TOKEN_BUDGET = {"python3-doc": 3_000_000, "linux-doc": 2_500_000, "perl-doc": 1_200_000, "man-pages": 1_300_000}
DOC_PACKAGES = {
    "python3-doc": "python3.11-doc",
    "linux-doc": "linux-doc-6.1",
    "perl-doc": "perl-doc",
    "man-pages": "manpages",
}
MAN_SECTIONS = ("1", "2", "3", "4", "5", "7", "8")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_TOKENIZER = REPO.parent / "shared" / "assets" / "gpt-neox-20b"


@dataclass
class Text:
    text: str
    source: str
    kind: str  # "query", "passage", "segment", or "document" before it is cut


# 2. Reading the data sets ----------------------------------------------------------------------------------
def _json_lines(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def _qrels(path: Path) -> dict[str, dict[str, int]]:
    """query id -> {document id: grade} from a BEIR qrels TSV (header line skipped)."""
    judged: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as rows:
        for number, row in enumerate(rows):
            fields = row.split()
            if not fields or (number == 0 and not fields[-1].lstrip("-").isdigit()):
                continue
            judged.setdefault(fields[0], {})[fields[1]] = int(fields[2])
    return judged


def normalise(text: str) -> str:
    """What two texts are compared by: lower-cased, whitespace collapsed."""
    return " ".join(text.lower().split())


@dataclass
class TestSet:
    """Every test query text and test judgment of the evaluation data: what the corpus must not contain."""

    query_texts: set[str]  # normalised
    judgments: set[tuple[str, str]]  # (query text normalised, document id)


def collect_test_set(data: Path) -> TestSet:
    """SciFact test queries and judgments, all TREC DL 2019 queries and judgments, all QMSum queries and judgments."""
    texts: set[str] = set()
    judgments: set[tuple[str, str]] = set()
    for name, split_files in (
        ("scifact", ["test"]),
        ("trec-dl-2019", ["test"]),
        ("qmsum", ["test", "summary", "specific"]),
    ):
        folder = data / name
        if not folder.is_dir():
            continue
        queries = {row["_id"]: row["text"] for row in _json_lines(folder / "queries.jsonl")}
        test_ids: set[str] = set()
        for split in split_files:
            path = folder / "qrels" / f"{split}.tsv"
            if path.is_file():
                for query_id, judged in _qrels(path).items():
                    test_ids.add(query_id)
                    judgments.update((normalise(queries.get(query_id, query_id)), doc_id) for doc_id in judged)
        if name in ("trec-dl-2019", "qmsum"):
            test_ids.update(queries)  # every query of these two is a test query
        texts.update(normalise(queries[query_id]) for query_id in test_ids if query_id in queries)
    return TestSet(texts, judgments)


def read_msmarco_queries(data: Path) -> list[Text]:
    return [
        Text(row["text"].strip(), "msmarco-queries", "query")
        for row in _json_lines(data / "msmarco-queries" / "queries.jsonl")
    ]


def _full_text(row: dict) -> str:
    return f"{row.get('title') or ''} {row['text']}".strip()


def read_scifact(data: Path) -> tuple[list[Text], list[dict]]:
    """Abstracts, train claims, and (train claim, abstract) pairs; the test split is not read."""
    folder = data / "scifact"
    corpus = {row["_id"]: _full_text(row) for row in _json_lines(folder / "corpus.jsonl")}
    queries = {row["_id"]: row["text"].strip() for row in _json_lines(folder / "queries.jsonl")}
    train = _qrels(folder / "qrels" / "train.tsv")
    texts = [Text(text, "scifact", "passage") for text in corpus.values()]
    texts += [Text(queries[query_id], "scifact", "query") for query_id in train if query_id in queries]
    pairs = [
        {"query": queries[query_id], "document": corpus[doc_id], "document_id": doc_id, "source": "scifact"}
        for query_id, judged in train.items() if query_id in queries
        for doc_id, grade in judged.items() if grade > 0 and doc_id in corpus
    ]  # fmt: skip
    return texts, pairs


def read_trec_dl_passages(data: Path) -> list[Text]:
    return [
        Text(_full_text(row), "trec-dl-2019", "passage") for row in _json_lines(data / "trec-dl-2019" / "corpus.jsonl")
    ]


def read_qmsum_meetings(data: Path) -> list[Text]:
    """Transcripts of the train and val meetings only."""
    folder = data / "qmsum"
    splits = {}
    with open(folder / "meeting_splits.tsv", encoding="utf-8") as rows:
        for row in rows:
            meeting, split = row.rstrip("\n").split("\t")
            splits[meeting] = split
    return [
        Text(row["text"], "qmsum", "document")
        for row in _json_lines(folder / "corpus.jsonl")
        if splits.get(row["_id"]) in ("train", "val")
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


def documentation_files(source: str, root: Path = Path("/")) -> list[Path]:
    """The files of one documentation source, sorted (empty if the package is not installed)."""
    if source == "python3-doc":
        return sorted((root / "usr/share/doc/python3.11/html/_sources").rglob("*.rst.txt"))
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


def read_documentation(source: str, paths: Iterable[Path]) -> Iterator[Text]:
    for path in paths:
        text = _render_man_page(path) if source == "man-pages" else _tidy(_read_maybe_gz(path))
        if text:
            yield Text(text, source, "document")


def licence_of(source: str, root: Path = Path("/")) -> str:
    """First lines of the package's copyright file, for the manifest."""
    path = root / "usr/share/doc" / DOC_PACKAGES[source] / "copyright"
    if not path.is_file():
        return "unknown (copyright file not found)"
    head = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()][:6]
    return f"see {path}: " + " | ".join(head)


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


# 5. Assembling ---------------------------------------------------------------------------------------------
def build(
    data: Path,
    tokenizer,
    doc_sources: Iterable[str] = tuple(DOC_TOKEN_BUDGET),
    doc_budget: dict[str, int] | None = None,
    doc_root: Path = Path("/"),
    seed: int = SEED,
) -> tuple[list[dict], list[dict], dict]:
    """The corpus records, the training pairs and the manifest (nothing written)."""
    rng = random.Random(seed)
    budget = {**DOC_TOKEN_BUDGET, **(doc_budget or {})}
    test = collect_test_set(data)
    tally: Counter = Counter()

    short: list[Text] = []
    pairs: list[dict] = []
    if (data / "msmarco-queries").is_dir():
        short += read_msmarco_queries(data)
    if (data / "scifact").is_dir():
        texts, pairs = read_scifact(data)
        short += texts
    if (data / "trec-dl-2019").is_dir():
        short += read_trec_dl_passages(data)

    records: list[dict] = []
    tokens_by: Counter = Counter()
    seen: set[str] = set()
    dropped: Counter = Counter()

    def keep(item: Text, tokens: int) -> None:
        key = normalise(item.text)
        if not key:
            return
        if key in test.query_texts:
            dropped["equal to a test query"] += 1
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

    long_sources: list[tuple[str, list[Text] | Iterator[Text], int | None]] = []
    if (data / "qmsum").is_dir():
        long_sources.append(("qmsum", read_qmsum_meetings(data), None))
    licences = {}
    for source in doc_sources:
        files = documentation_files(source, doc_root)
        if not files:
            logger.warning("no files for %s: is %s installed?", source, DOC_PACKAGES[source])
            continue
        rng.shuffle(files)
        long_sources.append((source, read_documentation(source, files), budget[source]))
        licences[source] = {"package": DOC_PACKAGES[source], "licence": licence_of(source, doc_root)}
    for source, documents, limit in long_sources:
        for piece, tokens in cut_documents(documents, tokenizer, rng, limit, tally):
            keep(piece, tokens)
        logger.info("%s: %d tokens so far", source, sum(tokens_by.values()))

    kept_pairs = []
    for pair in pairs:
        query = normalise(pair["query"])
        if query in test.query_texts or (query, pair["document_id"]) in test.judgments:
            dropped["pair that is a test query or judgment"] += 1
            continue
        kept_pairs.append(pair)

    manifest = {
        "records": len(records),
        "pairs": len(kept_pairs),
        "gpt_neox_tokens": sum(tokens_by.values()),
        "tokens": {f"{source}/{kind}": count for (source, kind), count in sorted(tokens_by.items())},
        "records_by_kind": dict(Counter(record["kind"] for record in records)),
        "dropped": dict(dropped),
        "test_query_texts_excluded": len(test.query_texts),
        "settings": {"seed": seed, "short_tokens": SHORT_TOKENS, "long_tokens": LONG_TOKENS,
                     "long_token_share": LONG_TOKEN_SHARE, "doc_token_budget": {s: budget[s] for s in doc_sources}},
        "data_sets": "see the README.md of each folder in the data directory (source and licence)",
        "documentation_licences": licences,
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
    parser.add_argument("--no-docs", action="store_true", help="leave out the Debian documentation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    tokenizer.model_max_length = int(1e30)
    records, pairs, manifest = build(args.data, tokenizer, doc_sources=() if args.no_docs else tuple(DOC_TOKEN_BUDGET))
    write(records, pairs, manifest, args.output)
    print(f"{'source/kind':<28} {'tokens':>12}")
    for name, count in manifest["tokens"].items():
        print(f"{name:<28} {count:>12,}")
    print(f"{'total':<28} {manifest['gpt_neox_tokens']:>12,}  ({manifest['records']:,} texts, {manifest['pairs']} pairs, "
          f"{manifest['corpus.jsonl.xz_bytes'] / 2**20:.1f} MiB xz)")  # fmt: skip


if __name__ == "__main__":
    main()
