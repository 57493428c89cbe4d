"""Turning queries and documents into vectors with any SentenceTransformer, long documents included.

Queries go through ``model.encode_query`` and documents through ``model.encode_document``, so
the model's saved prompts apply. Vectors are L2-normalised when the model's similarity is
cosine, so that inner product (what the search computes) ranks as the model means to.

Long documents can be read four ways (``DocumentEncoding``), to compare what a model gains from
reading a whole document:

- ``model``: as the model is configured (its own ``max_seq_length`` truncates);
- ``one-pass``: the whole document in one pass (``max_seq_length=None``); only for models with
  no length limit, such as st-mamba's MambaEncoder, whose ``chunk_size`` bounds memory;
- ``truncate:N``: the first N tokens (``max_seq_length=N``, the model's own count, which
  includes the EOS or CLS/SEP it adds);
- ``chunk:N:max`` / ``chunk:N:mean``: the document is cut into pieces of N tokens (of the
  model's tokenizer, cut at token boundaries of the original text; ``overlap`` tokens shared
  between neighbours), each piece is embedded on its own, and the document scores the max or
  the mean of its pieces' scores. The mean is computed as the inner product with the mean piece
  vector, which equals the mean of the pieces' scores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sentence_transformers import SentenceTransformer

from st_mamba.evaluation.search import DocumentEmbeddings
from st_mamba.module import MambaEncoder

logger = logging.getLogger(__name__)

Mode = Literal["model", "one-pass", "truncate", "chunk"]
_MODES = ("model", "one-pass", "truncate", "chunk")


@dataclass(frozen=True)
class DocumentEncoding:
    """How documents are read; see the module docstring. ``parse("chunk:512:max")`` builds one from text."""

    mode: Mode = "model"
    tokens: int | None = None
    aggregate: Literal["max", "mean"] = "max"
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"unknown document mode {self.mode!r}; expected one of {', '.join(_MODES)}")
        if self.mode in ("truncate", "chunk") and (self.tokens is None or self.tokens < 1):
            raise ValueError(f"{self.mode} needs a positive number of tokens, got {self.tokens!r}")
        if self.mode in ("model", "one-pass") and self.tokens is not None:
            raise ValueError(f"{self.mode} takes no number of tokens")
        if self.aggregate not in ("max", "mean"):
            raise ValueError(f"chunk scores aggregate by 'max' or 'mean', not {self.aggregate!r}")
        if self.mode == "chunk" and not 0 <= self.overlap < self.tokens:
            raise ValueError(f"overlap must be in [0, {self.tokens}), got {self.overlap}")

    @classmethod
    def parse(cls, spec: str, overlap: int = 0) -> DocumentEncoding:
        """From ``model``, ``one-pass``, ``truncate:N``, ``chunk:N`` (max), ``chunk:N:max`` or ``chunk:N:mean``."""
        mode, *rest = spec.strip().split(":")
        try:
            tokens = int(rest[0]) if rest else None
        except ValueError:
            raise ValueError(f"document mode {spec!r}: {rest[0]!r} is not a number of tokens") from None
        if mode == "chunk":
            if len(rest) > 2:
                raise ValueError(f"document mode {spec!r}: expected chunk:N or chunk:N:max|mean")
            return cls("chunk", tokens, rest[1] if len(rest) == 2 else "max", overlap)
        if len(rest) > 1 or (mode == "truncate") != bool(rest):
            raise ValueError(f"document mode {spec!r}: expected model, one-pass, truncate:N or chunk:N[:max|mean]")
        return cls(mode, tokens)

    def __str__(self) -> str:
        if self.mode == "truncate":
            return f"truncate:{self.tokens}"
        if self.mode == "chunk":
            overlap = f" (overlap {self.overlap})" if self.overlap else ""
            return f"chunk:{self.tokens}:{self.aggregate}{overlap}"
        return self.mode


def reads_any_length(model: SentenceTransformer) -> bool:
    """Whether the model has no length limit of its own (st-mamba's MambaEncoder reads any length)."""
    return isinstance(model[0], MambaEncoder)


@contextmanager
def _max_seq_length(model: SentenceTransformer, value: int | None) -> Iterator[None]:
    previous = model.max_seq_length
    model.max_seq_length = value
    try:
        yield
    finally:
        model.max_seq_length = previous


def _normalize(model: SentenceTransformer) -> bool:
    name = model.similarity_fn_name or "cosine"
    if name not in ("cosine", "dot"):
        raise ValueError(
            f"exact search ranks by inner product; this model's similarity is {name!r} (cosine or dot needed)"
        )
    return name == "cosine"


def _check_finite(vectors: np.ndarray, what: str) -> np.ndarray:
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {len(vectors)} {what} embeddings contain NaN or inf (first: row {int(bad.argmax())})"
        )
    return vectors


def encode_queries(
    model: SentenceTransformer, texts: Sequence[str], batch_size: int = 32, show_progress: bool = True
) -> np.ndarray:
    """(Q, D) float32 query vectors."""
    vectors = model.encode_query(
        list(texts), batch_size=batch_size, show_progress_bar=show_progress,
        convert_to_numpy=True, normalize_embeddings=_normalize(model),
    )  # fmt: skip
    return _check_finite(np.asarray(vectors, dtype=np.float32), "query")


def encode_documents(
    model: SentenceTransformer,
    texts: Sequence[str],
    encoding: DocumentEncoding = DocumentEncoding(),
    batch_size: int = 32,
    show_progress: bool = True,
) -> DocumentEmbeddings:
    """Document vectors: one row per document, or one per chunk for ``chunk:N:max``."""
    normalize = _normalize(model)

    def encode(pieces: list[str]) -> np.ndarray:
        vectors = model.encode_document(
            pieces, batch_size=batch_size, show_progress_bar=show_progress,
            convert_to_numpy=True, normalize_embeddings=normalize,
        )  # fmt: skip
        return _check_finite(np.asarray(vectors, dtype=np.float32).reshape(len(pieces), -1), "document")

    texts = list(texts)
    if encoding.mode == "model":
        return DocumentEmbeddings.one_per_document(encode(texts))
    if encoding.mode == "one-pass":
        if not reads_any_length(model):
            raise ValueError(
                f"one-pass needs a model without a length limit (st-mamba); this one reads at most "
                f"{model.max_seq_length} tokens: use truncate:N or chunk:N"
            )
        if model[0].chunk_size is None:
            logger.warning(
                "one-pass with chunk_size=None keeps every token's activations of a batch; for long documents set "
                "model[0].chunk_size (CLI: --stream-chunk-size 2048; same embeddings, bounded memory)"
            )
        with _max_seq_length(model, None):
            return DocumentEmbeddings.one_per_document(encode(texts))
    if encoding.mode == "truncate":
        if not reads_any_length(model) and model.max_seq_length is not None and encoding.tokens > model.max_seq_length:
            raise ValueError(
                f"truncate:{encoding.tokens} is longer than this model can read ({model.max_seq_length} tokens)"
            )
        with _max_seq_length(model, encoding.tokens):
            return DocumentEmbeddings.one_per_document(encode(texts))

    pieces, offsets = split_into_chunks(model, texts, encoding.tokens, encoding.overlap)
    logger.info("%d documents cut into %d chunks of at most %d tokens", len(texts), len(pieces), encoding.tokens)
    limit = None if reads_any_length(model) else model.max_seq_length
    with _max_seq_length(model, limit):
        vectors = encode(pieces)
    if encoding.aggregate == "max":
        return DocumentEmbeddings(vectors, offsets)
    counts = np.diff(offsets).astype(np.float32)[:, None]
    return DocumentEmbeddings.one_per_document(np.add.reduceat(vectors, offsets[:-1], axis=0) / counts)


def split_into_chunks(
    model: SentenceTransformer, texts: Sequence[str], tokens: int, overlap: int = 0
) -> tuple[list[str], np.ndarray]:
    """Cut each text into pieces of at most ``tokens`` tokens of the model's tokenizer.

    Pieces are substrings of the original text, cut at token boundaries (so no text is rewritten
    by a decode). An empty text gives one empty piece, so that every document has a row.

    Returns:
        the pieces, and offsets (N + 1,): text ``i`` owns pieces ``offsets[i]:offsets[i + 1]``.
    """
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("chunking needs a fast (Rust) tokenizer, which reports character offsets")
    _check_chunk_fits(model, tokens)
    stride = tokens - overlap
    spans = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
        "offset_mapping"
    ]
    pieces: list[str] = []
    offsets = [0]
    for text, token_spans in zip(texts, spans, strict=True):
        if not token_spans:
            pieces.append(text)
        for start in range(0, max(len(token_spans) - overlap, 1), stride):
            window = token_spans[start : start + tokens]
            if window:
                pieces.append(text[window[0][0] : window[-1][1]])
        offsets.append(len(pieces))
    return pieces, np.asarray(offsets, dtype=np.int64)


def _check_chunk_fits(model: SentenceTransformer, tokens: int) -> None:
    """A chunk plus the document prompt and special tokens must fit in the model's window, or it would be cut."""
    if reads_any_length(model) or model.max_seq_length is None:
        return
    # encode_document takes the first of these prompts that the model has
    prompt = next((model.prompts[name] for name in ("document", "passage", "corpus") if name in model.prompts), "")
    overhead = len(model.tokenizer(prompt)["input_ids"])
    if tokens + overhead > model.max_seq_length:
        raise ValueError(
            f"chunks of {tokens} tokens plus {overhead} for the prompt and special tokens exceed the model's "
            f"max_seq_length of {model.max_seq_length}; use chunk:{model.max_seq_length - overhead} or less"
        )
