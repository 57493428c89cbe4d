"""Results as JSON (everything needed to reproduce a number) and as a markdown table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("st-mamba", "sentence-transformers", "torch", "transformers", "ir-measures", "bm25s", "faiss-cpu")


@dataclass
class RunResult:
    """One ranked list's scores: a baseline, a dense model, one long-document mode...

    Attributes:
        name: the row label, e.g. ``dense (chunk:512:max)``.
        scores: measure -> mean over ``queries``.
        queries: judged queries averaged (those missing from the run scored 0); None when not known (MTEB).
        seconds: wall time to produce the run (encoding and search), None for a file read from disk.
        settings: what produced it (model path, document mode, BM25 parameters, ...).
    """

    name: str
    scores: dict[str, float]
    queries: int | None
    seconds: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def package_versions() -> dict[str, str]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def to_json(results: list[RunResult], context: dict[str, Any]) -> dict[str, Any]:
    """``context`` (data set, split, measures...) plus one entry per result and the package versions."""
    return {**context, "results": [asdict(result) for result in results], "versions": package_versions()}


def markdown_table(results: list[RunResult]) -> str:
    """One row per result, one column per measure (in the order of the first result), then queries and time."""
    measures = list(dict.fromkeys(measure for result in results for measure in result.scores))
    header = ["run", *measures, "queries", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for result in results:
        cells = [result.name.replace("|", "\\|")]
        cells += [f"{result.scores[m]:.4f}" if m in result.scores else "" for m in measures]
        cells += ["" if result.queries is None else str(result.queries)]
        cells += ["" if result.seconds is None else f"{result.seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_output_path(path: str | Path) -> Path:
    """The JSON output path; refuses a ``.md`` name, which the table beside it would overwrite."""
    path = Path(path)
    if path.suffix == ".md":
        raise ValueError(f"{path}: the output is the JSON file; the markdown table is written beside it as .md")
    return path


def write_report(path: str | Path, results: list[RunResult], context: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``path`` (JSON) and the markdown table beside it (same name, ``.md``); returns both paths."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(results, context), indent=2) + "\n", encoding="utf-8")
    table_path = path.with_suffix(".md")
    table_path.write_text(markdown_table(results), encoding="utf-8")
    return path, table_path
