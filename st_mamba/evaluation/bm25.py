"""A BM25 baseline with bm25s, in the same harness as the dense models.

Text processing (the same for documents and queries): lower-cased, split into runs of two or
more word characters (bm25s' default pattern), English stop words removed (bm25s' list),
Snowball English stemming (PyStemmer). A document is its title and text joined by a space.

Scoring: Lucene's BM25 with k1=0.9 and b=0.4, Anserini's defaults, which BEIR's published BM25
numbers use (BEIR indexes title and text as two fields of one Elasticsearch/Anserini
document; here they are one field). Documents sharing no term with the query score 0 and are
not returned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from st_mamba.evaluation.beir import BeirDataset
from st_mamba.evaluation.runs import Run


@dataclass(frozen=True)
class BM25Settings:
    k1: float = 0.9
    b: float = 0.4
    method: str = "lucene"
    stemmer: str | None = "english"
    stopwords: str | None = "en"

    def as_dict(self) -> dict:
        return asdict(self)


def _bm25s():
    try:
        import bm25s
    except ImportError:
        raise ImportError("the BM25 baseline needs bm25s: pip install 'st-mamba[eval]'") from None
    return bm25s


def _stemmer(language: str | None):
    if language is None:
        return None
    try:
        import Stemmer
    except ImportError:
        raise ImportError("stemming needs PyStemmer: pip install PyStemmer (or BM25Settings(stemmer=None))") from None
    return Stemmer.Stemmer(language).stemWords


def bm25_search(
    dataset: BeirDataset, k: int = 1000, settings: BM25Settings = BM25Settings(), show_progress: bool = True
) -> Run:
    """Index the corpus with bm25s and return each judged query's ``k`` best documents."""
    bm25s = _bm25s()
    stem = _stemmer(settings.stemmer)
    doc_ids = list(dataset.corpus)
    query_ids = list(dataset.queries)
    corpus_tokens = bm25s.tokenize(
        dataset.document_texts(doc_ids), stopwords=settings.stopwords, stemmer=stem, show_progress=show_progress
    )
    retriever = bm25s.BM25(k1=settings.k1, b=settings.b, method=settings.method)
    retriever.index(corpus_tokens, show_progress=show_progress)
    # As strings, query tokens are looked up in the corpus vocabulary; unknown ones are dropped.
    query_tokens = bm25s.tokenize(
        [dataset.queries[query_id] for query_id in query_ids],
        stopwords=settings.stopwords, stemmer=stem, return_ids=False, show_progress=False,
    )  # fmt: skip
    indices, scores = retriever.retrieve(query_tokens, k=min(k, len(doc_ids)), show_progress=show_progress)
    return {
        query_id: {
            doc_ids[index]: float(score) for index, score in zip(row_indices, row_scores, strict=True) if score > 0
        }
        for query_id, row_indices, row_scores in zip(query_ids, indices, scores, strict=True)
    }
