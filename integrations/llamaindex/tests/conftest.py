"""Fixtures: a tiny byte-level tokenizer and a tiny random st-mamba model, built and saved in the test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the socket guard (root pyproject addopts) is the hard stop

CORPUS = [
    "State space models read a sequence left to right and keep a fixed-size state.",
    "Mamba makes the step size, B and C depend on the current token.",
    "Dense retrieval encodes queries and documents into vectors and ranks by cosine similarity.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?,.;:'\"()[]{}",
    "Ünïcödé, emoji 🙂 and tabs\tand\nnewlines are bytes like any other.",
]
PROMPTS = {"query": "query: ", "document": "passage: "}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 400-token byte-level BPE tokenizer with ``<|endoftext|>`` = 0."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 20, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A random two-layer Mamba-1 st-mamba model with query/document prompts, saved to disk."""
    from st_mamba import MambaConfig, from_config

    config = MambaConfig(d_model=32, n_layer=2, vocab_size=400, d_state=8, dt_rank=4)
    model = from_config(config, tokenizer_dir, seed=0, max_seq_length=256, prompts=PROMPTS, device="cpu")
    folder = tmp_path_factory.mktemp("st-mamba-tiny")
    model.save(str(folder))
    return folder
