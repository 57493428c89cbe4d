"""Fixtures of the recipe tests: a saved tiny st-mamba model and a tiny BEIR folder; importing a recipe."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.conftest import random_texts, tiny_config

TRAINING = Path(__file__).resolve().parents[2] / "training"


def load_recipe(name: str) -> ModuleType:
    """Import training/<name>.py (a script, not a package) by its path.

    As under ``python training/<name>.py``, training/ comes first on ``sys.path`` while the file runs, so
    that the recipes find their shared module ``_common``; it stays in ``sys.modules`` afterwards.
    """
    spec = importlib.util.spec_from_file_location(f"training_{name}", TRAINING / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(TRAINING))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(TRAINING))
    return module


@pytest.fixture
def one_thread():
    """Torch on one thread: two OpenMP threads on a tiny model spin against each other on a busy 2-core
    machine (a recipe test ran 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A saved random st-mamba model; also a transformers-format Mamba checkpoint with its tokenizer."""
    from st_mamba import from_config

    model = from_config(
        tiny_config(1), tokenizer_dir, seed=0, max_seq_length=64,
        prompts={"query": "query: ", "document": "passage: "}, device="cpu",
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory) -> Path:
    """32 documents; query i is a few words of document i; 24 train and 8 test queries."""
    folder = tmp_path_factory.mktemp("tiny-beir")
    (folder / "qrels").mkdir()
    documents = random_texts(32, seed=1, max_words=30)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as corpus:
        for i, text in enumerate(documents):
            corpus.write(json.dumps({"_id": f"d{i}", "title": f"doc {i}", "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as queries:
        for i, text in enumerate(documents):
            words = text.split()
            queries.write(json.dumps({"_id": f"q{i}", "text": " ".join(words[:3] + words[-2:])}) + "\n")
    for split, ids in (("train", range(24)), ("test", range(24, 32))):
        with open(folder / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as qrels:
            qrels.write("query-id\tcorpus-id\tscore\n")
            qrels.writelines(f"q{i}\td{i}\t1\n" for i in ids)
    return folder
