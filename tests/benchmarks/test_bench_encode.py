"""benchmarks/bench_encode.py's report: every table names the one run that measured it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_bench_encode():
    """Import benchmarks/bench_encode.py (a script, not a package) by its path."""
    spec = importlib.util.spec_from_file_location("bench_encode", REPO / "benchmarks" / "bench_encode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench_encode()


def _run(command: str, date: str) -> dict:
    return dict(command=command, date=date, gpu="GPU X", torch="2.0", triton="3.0", transformers="5.0")


def _row(model: str, mode: str, length: int, run: int) -> dict:
    return dict(model=model, mode=mode, L=length, tok_s=1e6, docs_s=10.0, mfu_lin=0.1, peak_gib=1.0, run=run)


def test_the_recorded_command_leaves_out_where_results_go_and_what_was_merged():
    argv = ["--models", "st-mamba-130m", "--out-dir", "/some/machine/out", "--merge=/x/results.json", "--reps", "5"]
    assert bench.run_command(argv) == "python benchmarks/bench_encode.py --models st-mamba-130m --reps 5"


def test_runs_no_row_or_part_comes_from_are_dropped_and_the_rest_renumbered():
    results = {
        "meta": {"runs": [_run("a", "1"), _run("b", "2"), _run("c", "3")]},
        "rows": [_row("bert-base", "fwd", 512, 2)],
        "part_runs": {"floor": 0},
    }
    bench.drop_unused_runs(results)
    assert [run["command"] for run in results["meta"]["runs"]] == ["a", "c"]
    assert results["rows"][0]["run"] == 1 and results["part_runs"] == {"floor": 0}


def test_each_table_sits_under_the_run_that_measured_it():
    results = {
        "meta": {"tokens": 65536, "st_backends": "triton", "runs": [_run("old command", "2026-01-01"), _run("new command", "2026-01-02")]},
        "rows": [_row("bert-base", "fwd", 512, 0), _row("st-mamba-130m", "fwd", 512, 1), _row("st-mamba-130m", "fwdbwd", 512, 1)],
    }  # fmt: skip
    section = bench.render(results)
    new, old = section.index("`new command`"), section.index("`old command`")
    assert new < section.index("| st-mamba-130m |") < old < section.index("| bert-base |")
    assert section.count("Forward + backward:") == 1  # only the run that measured it has that table
    assert "Merged" not in section


def test_the_gpu_section_of_the_docs_is_what_the_committed_results_render_to():
    results = json.loads((REPO / "docs" / "benchmarks_gpu.json").read_text())
    doc = (REPO / "docs" / "benchmarks.md").read_text()
    assert bench.render(results).strip() in doc
