"""models/st-mamba-distilled, the model the repository ships: it loads, retrieves, reads long texts, stays small."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

MODEL = Path(__file__).resolve().parents[1] / "models" / "st-mamba-distilled"

# Five questions on unrelated topics and, in the same order, the passage that answers each.
QUESTIONS = [
    "How do vaccines train the immune system?",
    "What is the capital of France?",
    "How do I sort a list in Python?",
    "Why is the sky blue?",
    "What causes inflation in an economy?",
]
ANSWERS = [
    "Vaccines expose the immune system to an antigen so that it produces antibodies and memory cells.",
    "Paris is the capital and most populous city of France.",
    "Python lists have a sort() method, and the built-in sorted() returns a new sorted list.",
    "Sunlight is scattered by the molecules of the atmosphere, and blue light is scattered most.",
    "Inflation rises when the money supply grows faster than the output of goods and services.",
]


@pytest.fixture(scope="module")
def model() -> SentenceTransformer:
    assert MODEL.is_dir(), f"the shipped model is missing: {MODEL}"
    return SentenceTransformer(str(MODEL), trust_remote_code=True, device="cpu")


def test_weights_are_fp16_safetensors_under_50_mb():
    tensors = load_file(MODEL / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in tensors.values())
    total = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert total <= 50 * 10**6, f"{total:,} bytes"


def test_each_question_finds_its_own_answer(model):
    scores = model.similarity(model.encode_query(QUESTIONS), model.encode_document(ANSWERS))
    assert scores.argmax(dim=1).tolist() == list(range(len(QUESTIONS))), scores
    vectors = model.encode_document(ANSWERS, convert_to_tensor=True)
    assert vectors.shape == (len(ANSWERS), 384)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(len(ANSWERS)), rtol=0, atol=1e-4)


def test_a_long_text_streams_to_the_same_embedding_as_one_pass(model):
    """Texts past ``chunk_size`` are read chunk by chunk with the state carried: the same vector."""
    text = " ".join(ANSWERS * 120)  # about 2,500 tokens, past the shipped chunk size of 2,048
    assert len(model.tokenizer(text)["input_ids"]) > model[0].chunk_size
    streamed = model.encode_document([text], convert_to_tensor=True)
    chunk_size = model[0].chunk_size
    try:
        model[0].chunk_size = None
        whole = model.encode_document([text], convert_to_tensor=True)
    finally:
        model[0].chunk_size = chunk_size
    torch.testing.assert_close(streamed, whole, rtol=1e-4, atol=1e-4)


def test_queries_typed_in_capitals_find_the_same_answers(model):
    """The shipped model lower-cases its input (the teacher it was distilled from is uncased)."""
    assert model[0].do_lower_case
    shouted = model.encode_query([question.upper() for question in QUESTIONS], convert_to_tensor=True)
    torch.testing.assert_close(shouted, model.encode_query(QUESTIONS, convert_to_tensor=True))


def test_careless_whitespace_reads_as_clean_text(model):
    """The shipped model reads runs of spaces and tabs as one space and puts a space before a text."""
    assert model[0].normalize_whitespace and model[0].add_prefix_space
    careless = [f"  {question.replace(' ', '  ')}\t" for question in QUESTIONS]
    torch.testing.assert_close(
        model.encode_query(careless, convert_to_tensor=True), model.encode_query(QUESTIONS, convert_to_tensor=True)
    )
