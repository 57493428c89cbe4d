"""Fixtures of the scale tests: a saved tiny model and small corpora written to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from st_mamba import from_config
from tests.conftest import random_texts, tiny_config

PROMPTS = {"query": "query: ", "document": "passage: "}


def save_tiny_model(folder: Path, tokenizer_dir: Path, seed: int = 0, **config) -> Path:
    model = from_config(tiny_config(1, **config), tokenizer_dir, seed=seed, max_seq_length=128, prompts=PROMPTS,
                        device="cpu")  # fmt: skip
    model.save(str(folder))
    return folder


def write_corpus(path: Path, count: int, seed: int = 0) -> list[dict]:
    """A BEIR-style corpus.jsonl of ``count`` random documents (every third one has a title)."""
    rows = [
        {"_id": f"doc{i}", **({"title": f"Title {i}"} if i % 3 == 0 else {}), "text": text}
        for i, text in enumerate(random_texts(count, seed=seed, max_words=40))
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


def texts_of(rows: list[dict]) -> list[str]:
    return [f"{row.get('title') or ''} {row['text']}".strip() for row in rows]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("scale-model"), tokenizer_dir)


@pytest.fixture(scope="session")
def model(model_dir):
    from st_mamba.loading import load_model

    return load_model(model_dir, device="cpu")
