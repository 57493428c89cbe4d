"""Reading the line-based files of an evaluation: JSONL, TSV and TREC files, plain or gzipped.

Every error names the file, and the line when one line is at fault, so that a broken data set
can be fixed without a debugger.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataFileError(ValueError):
    """A data file is malformed or inconsistent; the message names the file (and line)."""


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or FileNotFoundError saying which file of the data set is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def find_file(folder: Path, name: str, what: str) -> Path:
    """``folder/name`` or ``folder/name.gz``, whichever exists; FileNotFoundError naming both otherwise."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{what} not found: looked for {folder / name} and {folder / name}.gz")


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its newline) for each non-blank line; ``.gz`` files are unzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as lines:  # -sig: a byte-order mark is not data
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line of a JSONL file; every line must hold one JSON object."""
    for number, line in numbered_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}:{number}: not valid JSON ({exc.msg}): {line[:80]!r}") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row
