"""The long-document modes on the tiny random st-mamba model (and a non-Mamba model where it matters)."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from transformers import AutoTokenizer, BertConfig, BertModel

from st_mamba.evaluation import DocumentEncoding, encode_documents, encode_queries, split_into_chunks

LONG = "State space models read a sequence left to right and keep a fixed-size state. " * 6
TEXTS = [LONG, "A short one.", ""]


def _encode(model, texts):
    return model.encode_document(texts, convert_to_numpy=True, normalize_embeddings=True)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("model", DocumentEncoding()),
        ("one-pass", DocumentEncoding("one-pass")),
        ("truncate:64", DocumentEncoding("truncate", 64)),
        ("chunk:32", DocumentEncoding("chunk", 32, "max")),
        ("chunk:32:mean", DocumentEncoding("chunk", 32, "mean")),
    ],
)
def test_parse_round_trips(spec, expected):
    assert DocumentEncoding.parse(spec) == expected
    assert DocumentEncoding.parse(str(expected)) == expected


@pytest.mark.parametrize("spec", ["truncate", "truncate:x", "chunk:32:median", "one-pass:5", "whole", "chunk:0"])
def test_parse_rejects_bad_modes(spec):
    with pytest.raises(ValueError):
        DocumentEncoding.parse(spec)


def test_chunks_are_substrings_that_cover_every_token(tiny_model):
    tokens = len(tiny_model.tokenizer(LONG, add_special_tokens=False)["input_ids"])
    pieces, offsets = split_into_chunks(tiny_model, TEXTS, tokens=16)
    assert offsets.tolist() == [0, -(-tokens // 16), -(-tokens // 16) + 1, -(-tokens // 16) + 2]
    assert all(piece in LONG for piece in pieces[: offsets[1]])
    assert "".join(pieces[: offsets[1]]).replace(" ", "") == LONG.strip().replace(" ", "")
    assert pieces[offsets[1]] == "A short one." and pieces[offsets[2]] == ""  # an empty text keeps one row
    spans = tiny_model.tokenizer(LONG, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    overlapping, overlapping_offsets = split_into_chunks(tiny_model, [LONG], tokens=16, overlap=8)
    assert overlapping_offsets[1] == -(-(tokens - 8) // 8)
    assert overlapping[1] == LONG[spans[8][0] : spans[23][1]], "the second chunk starts 8 tokens in"


def test_one_pass_reads_everything_and_truncate_cuts(tiny_model):
    limit = 40
    short_tokens = len(tiny_model.tokenizer("passage: A short one.", add_special_tokens=False)["input_ids"])
    assert short_tokens < limit - 1 < len(tiny_model.tokenizer(LONG, add_special_tokens=False)["input_ids"])
    tiny_model.max_seq_length = limit
    one_pass = encode_documents(tiny_model, TEXTS, DocumentEncoding("one-pass"), show_progress=False)
    truncated = encode_documents(tiny_model, TEXTS, DocumentEncoding("truncate", limit), show_progress=False)
    as_configured = encode_documents(tiny_model, TEXTS, DocumentEncoding(), show_progress=False)
    assert tiny_model.max_seq_length == limit, "the model's own setting is restored"
    np.testing.assert_allclose(truncated.vectors, as_configured.vectors, atol=1e-6, err_msg=f"truncate:{limit}")
    tiny_model.max_seq_length = None
    np.testing.assert_allclose(one_pass.vectors, _encode(tiny_model, TEXTS), atol=1e-5, err_msg="one-pass")
    assert not np.allclose(one_pass.vectors[0], truncated.vectors[0], atol=1e-4), "the long text was cut"
    np.testing.assert_allclose(one_pass.vectors[1:], truncated.vectors[1:], atol=1e-5, err_msg="short texts")


def test_chunk_max_and_mean_score_the_pieces(tiny_model):
    pieces, offsets = split_into_chunks(tiny_model, TEXTS, tokens=16)
    piece_vectors = _encode(tiny_model, pieces)
    queries = encode_queries(tiny_model, ["fixed-size state", "short"], show_progress=False)
    piece_scores = queries @ piece_vectors.T
    chunk_max = encode_documents(tiny_model, TEXTS, DocumentEncoding("chunk", 16, "max"), show_progress=False)
    chunk_mean = encode_documents(tiny_model, TEXTS, DocumentEncoding("chunk", 16, "mean"), show_progress=False)
    expected_max = np.stack(
        [piece_scores[:, a:b].max(axis=1) for a, b in zip(offsets[:-1], offsets[1:], strict=True)], axis=1
    )
    expected_mean = np.stack(
        [piece_scores[:, a:b].mean(axis=1) for a, b in zip(offsets[:-1], offsets[1:], strict=True)], axis=1
    )
    np.testing.assert_allclose(chunk_max.scores(queries), expected_max, atol=1e-5, err_msg="chunk max")
    np.testing.assert_allclose(chunk_mean.scores(queries), expected_mean, atol=1e-5, err_msg="chunk mean")
    assert chunk_mean.vectors.shape[0] == len(TEXTS) and chunk_max.vectors.shape[0] == len(pieces)


@pytest.fixture
def bert_model(tokenizer_dir, tmp_path):
    """A tiny random BERT SentenceTransformer (mean pooling) with a 32-token window, built offline."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path)
    config = BertConfig(
        vocab_size=400, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(tmp_path)
    transformer = Transformer(str(tmp_path), max_seq_length=32)
    return SentenceTransformer(modules=[transformer, Pooling(16, "mean"), Normalize()], device="cpu")


def test_one_pass_and_long_truncation_need_an_unlimited_model(bert_model):
    with pytest.raises(ValueError, match="one-pass needs a model without a length limit"):
        encode_documents(bert_model, TEXTS, DocumentEncoding("one-pass"), show_progress=False)
    with pytest.raises(ValueError, match="longer than this model can read"):
        encode_documents(bert_model, TEXTS, DocumentEncoding("truncate", 64), show_progress=False)
    vectors = encode_documents(bert_model, TEXTS, DocumentEncoding("truncate", 8), show_progress=False).vectors
    assert vectors.shape == (3, 16)


def test_chunks_must_fit_a_limited_model(bert_model):
    with pytest.raises(ValueError, match="exceed the model's max_seq_length of 32"):
        encode_documents(bert_model, TEXTS, DocumentEncoding("chunk", 40), show_progress=False)
    documents = encode_documents(bert_model, TEXTS, DocumentEncoding("chunk", 16), show_progress=False)
    assert documents.n_documents == 3 and len(documents.vectors) > 3
    assert bert_model.max_seq_length == 32
