"""Fixtures of both integrations' tests: the core tests' tiny tokenizer, and a tiny st-mamba model saved with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import tiny_config, tokenizer_dir  # noqa: F401 (a fixture, shared with the core tests)

PROMPTS = {"query": "query: ", "document": "passage: "}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:  # noqa: F811 (the imported fixture, requested by name)
    """A random two-layer Mamba-1 st-mamba model (d_model 32) with query/document prompts, saved to disk."""
    from st_mamba import from_config

    model = from_config(tiny_config(1), tokenizer_dir, seed=0, max_seq_length=256, prompts=PROMPTS, device="cpu")
    folder = tmp_path_factory.mktemp("st-mamba-tiny")
    model.save(str(folder))
    return folder
