#!/usr/bin/env bash
# Creates .venv (if missing) and installs st-mamba with everything its tests, demo and benchmarks need.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (it only installs what is missing).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
py=.venv/bin/python
"$py" -m pip install -q --disable-pip-version-check --upgrade pip
# torch first, pinned: a bare `torch` requirement pulls a multi-GB CUDA build; 2.13.0 is a small CPU wheel here.
"$py" -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
# The versions of the H200 machine's image, so that CI tests what runs there (scripts/constraints.txt).
# One pip call, so that the integrations' `st-mamba` requirement resolves to this checkout, not to PyPI.
"$py" -m pip install -q --disable-pip-version-check -c scripts/constraints.txt \
    -e ".[dev,eval,train,scale]" -e "integrations/langchain[test]" -e "integrations/llamaindex[test]"
