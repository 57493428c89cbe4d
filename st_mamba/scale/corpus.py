"""A corpus read as a stream of documents, and cut into shards of a fixed number of documents.

Two formats, chosen by the file name:

- JSONL (``corpus.jsonl``, or a BEIR folder holding one): one JSON object a line with ``_id`` (or
  ``id``), ``text`` and an optional ``title``. A document's *position* is the byte offset of its line.
- Parquet (``*.parquet``, or a folder holding ``corpus.parquet``): the same columns; the position is
  the row number.

A document's text is ``title + " " + text``, stripped: the BEIR / MTEB convention, also that of
``st-mamba index`` and ``st_mamba.evaluation``. Blank JSONL lines are not documents. A line without
an id or a string text is *bad*: with ``on_bad_line="fail"`` reading stops there with its line
number; with ``"skip"`` it is left out and counted, and ``plan_shards`` reports the count and the
line numbers once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

OnBadLine = Literal["fail", "skip"]
_REPORTED_LINES = 20  # bad line numbers named in the warning; the rest are counted


class CorpusError(ValueError):
    """A corpus that cannot be read: missing, of an unknown format, or with a bad line under ``on_bad_line="fail"``."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    position: int  # byte offset of its line (JSONL) or row number (Parquet)
    line: int  # line number (JSONL) or row number + 1 (Parquet), for messages


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``number`` holds the documents at positions [start, stop): ``documents`` of them."""

    number: int
    start: int
    stop: int
    documents: int
    first_line: int  # line number of the document at ``start``


@dataclass(frozen=True)
class Corpus:
    """A JSONL or Parquet corpus file. Build one with ``Corpus.open``."""

    path: Path
    format: Literal["jsonl", "parquet"]
    on_bad_line: OnBadLine = "fail"

    @classmethod
    def open(cls, path: str | Path, on_bad_line: OnBadLine = "fail") -> Corpus:
        """The corpus at ``path``: a .jsonl or .parquet file, or a BEIR folder holding corpus.jsonl / corpus.parquet."""
        if on_bad_line not in ("fail", "skip"):
            raise ValueError(f"on_bad_line must be 'fail' or 'skip', got {on_bad_line!r}")
        path = Path(path).expanduser().resolve()
        if path.is_dir():
            found = [path / name for name in ("corpus.jsonl", "corpus.parquet") if (path / name).is_file()]
            if not found:
                raise CorpusError(f"no corpus.jsonl or corpus.parquet in {path}")
            path = found[0]
        if not path.is_file():
            raise CorpusError(f"no corpus at {path} (expected a .jsonl or .parquet file, or a BEIR folder)")
        kind = "parquet" if path.suffix == ".parquet" else "jsonl"
        return cls(path, kind, on_bad_line)

    def fingerprint(self) -> dict[str, Any]:
        """Path, size and modification time: a resumed job must read the very same file."""
        stat = self.path.stat()
        return {"path": str(self.path), "format": self.format, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def documents(
        self, start: int = 0, stop: int | None = None, first_line: int = 1, bad_lines: list[int] | None = None
    ) -> Iterator[Document]:
        """The documents at positions [start, stop), in order.

        Args:
            first_line: the line number at ``start`` (known from the shard plan), for messages.
            bad_lines: with ``on_bad_line="skip"``, the line numbers of skipped lines are appended here.
        """
        rows = self._jsonl(start, stop, first_line) if self.format == "jsonl" else self._parquet(start, stop)
        for position, line, row in rows:
            problem = _problem(row)
            if problem is None:
                yield Document(str(row.get("_id", row.get("id"))), _text(row), position, line)
            elif self.on_bad_line == "fail":
                raise CorpusError(f"{self.path}:{line}: {problem} (pass --on-bad-line skip to skip such lines)")
            elif bad_lines is not None:
                bad_lines.append(line)

    def _jsonl(self, start: int, stop: int | None, first_line: int) -> Iterator[tuple[int, int, Any]]:
        with self.path.open("rb") as stream:
            stream.seek(start)
            position = start
            for line, raw in enumerate(stream, start=first_line):
                if stop is not None and position >= stop:
                    return
                here, position = position, position + len(raw)
                if not raw.strip():
                    continue
                try:
                    yield here, line, json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    yield here, line, f"not JSON ({exc})"

    def _parquet(self, start: int, stop: int | None) -> Iterator[tuple[int, int, Any]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CorpusError("reading Parquet needs pyarrow: pip install 'st-mamba[scale]'") from None
        file = pq.ParquetFile(self.path)
        names = set(file.schema_arrow.names)
        columns = [name for name in ("_id", "id", "title", "text") if name in names]
        group_start = 0
        for group in range(file.num_row_groups):
            group_rows = file.metadata.row_group(group).num_rows
            group_stop = group_start + group_rows
            if group_stop > start and (stop is None or group_start < stop):
                rows = file.read_row_group(group, columns=columns).to_pylist()
                for offset in range(max(start - group_start, 0), min(group_rows, (stop or group_stop) - group_start)):
                    position = group_start + offset
                    yield position, position + 1, rows[offset]
            group_start = group_stop

    def end(self) -> int:
        """The position after the last document."""
        if self.format == "jsonl":
            return self.path.stat().st_size
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.path).metadata.num_rows


def _problem(row: Any) -> str | None:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        return "expected a JSON object"
    if row.get("_id", row.get("id")) is None:
        return "no _id (or id)"
    if not isinstance(row.get("text"), str):
        return "no string text"
    return None


def _text(row: dict[str, Any]) -> str:
    return f"{row.get('title') or ''} {row['text']}".strip()


def plan_shards(corpus: Corpus, shard_size: int, progress: bool = True) -> tuple[list[ShardSpec], list[int]]:
    """Read the corpus once and cut it into shards of ``shard_size`` documents (the last one may be smaller).

    Returns:
        The shards, and the line numbers of the bad lines skipped (empty under ``on_bad_line="fail"``,
        which raises ``CorpusError`` at the first one instead).
    """
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    shards: list[ShardSpec] = []
    bad_lines: list[int] = []
    first: Document | None = None
    count = 0
    with tqdm(desc="Reading corpus", unit="doc", disable=not progress) as bar:
        for document in corpus.documents(bad_lines=bad_lines):
            if count == shard_size:
                shards.append(ShardSpec(len(shards), first.position, document.position, count, first.line))
                first, count = None, 0
            first = first or document
            count += 1
            bar.update()
    if count:
        shards.append(ShardSpec(len(shards), first.position, corpus.end(), count, first.line))
    report_bad_lines(corpus, bad_lines)
    return shards, bad_lines


def report_bad_lines(corpus: Corpus, bad_lines: list[int]) -> None:
    """One warning that counts the skipped lines and names the first ``_REPORTED_LINES`` of them."""
    if not bad_lines:
        return
    named = ", ".join(map(str, bad_lines[:_REPORTED_LINES])) + (", ..." if len(bad_lines) > _REPORTED_LINES else "")
    logger.warning(
        "skipped %d bad line(s) of %s (no id, no string text, or not a JSON object): line(s) %s",
        len(bad_lines), corpus.path, named,
    )  # fmt: skip
