"""STMambaEmbeddings: LangChain's standard unit suite, then prompts, input checks, async and devices."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from langchain_tests.unit_tests import EmbeddingsUnitTests
from sentence_transformers import SentenceTransformer

from langchain_st_mamba import STMambaEmbeddings

QUERY = "How does Mamba keep a fixed-size state?"
DOCUMENTS = [
    "State space models read a sequence left to right.\nThey keep a fixed-size state.",
    "Dense retrieval ranks by cosine similarity.",
    "The quick brown fox jumps over the lazy dog.",
]


class TestSTMambaEmbeddingsUnit(EmbeddingsUnitTests):
    @pytest.fixture(autouse=True)
    def _saved_model(self, model_dir):
        self.model_dir = model_dir

    @property
    def embeddings_class(self) -> type[STMambaEmbeddings]:
        return STMambaEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"model": str(self.model_dir), "device": "cpu"}


@pytest.fixture(scope="module")
def client(model_dir) -> SentenceTransformer:
    return SentenceTransformer(str(model_dir), device="cpu", trust_remote_code=True)


@pytest.fixture(scope="module")
def embeddings(client) -> STMambaEmbeddings:
    return STMambaEmbeddings(client=client)


def plain_encode(client: SentenceTransformer, texts: list[str]) -> np.ndarray:
    """Encode with no prompt at all: the reference the prompted calls are compared with."""
    return client.encode(texts, prompt="", convert_to_numpy=True)


# --- prompts -----------------------------------------------------------------------------------


def test_saved_prompts_are_used(embeddings, client):
    assert client.prompts == {"query": "query: ", "document": "passage: "}
    np.testing.assert_allclose(embeddings.embed_query(QUERY), plain_encode(client, ["query: " + QUERY])[0], atol=1e-6)
    np.testing.assert_allclose(
        embeddings.embed_documents(DOCUMENTS), plain_encode(client, ["passage: " + d for d in DOCUMENTS]), atol=1e-6
    )


def test_explicit_prompts_win(client):
    custom = STMambaEmbeddings(client=client, query_prompt="search: ", document_prompt="")
    np.testing.assert_allclose(custom.embed_query(QUERY), plain_encode(client, ["search: " + QUERY])[0], atol=1e-6)
    np.testing.assert_allclose(custom.embed_documents(DOCUMENTS), plain_encode(client, DOCUMENTS), atol=1e-6)


def test_newlines_reach_the_model(embeddings):
    with_newline, with_space = embeddings.embed_documents(["one\ntwo", "one two"])
    assert not np.allclose(with_newline, with_space)


# --- input checks ------------------------------------------------------------------------------


def test_empty_list_gives_empty_list(embeddings):
    assert embeddings.embed_documents([]) == []


@pytest.mark.parametrize("bad", [None, 3, b"bytes"], ids=["None", "int", "bytes"])
def test_non_string_is_named_by_its_index_in_the_callers_list(embeddings, bad):
    # The bad text is shortest, so Sentence-Transformers' length sort would move it to the end.
    texts = [*DOCUMENTS, bad, "a much longer document " * 10]
    with pytest.raises(TypeError, match=r"texts\[3\] is " + type(bad).__name__):
        embeddings.embed_documents(texts)


def test_single_string_is_refused(embeddings):
    with pytest.raises(TypeError, match="list of strings"):
        embeddings.embed_documents("one document")


def test_non_string_query_is_refused(embeddings):
    with pytest.raises(TypeError, match="query is NoneType"):
        embeddings.embed_query(None)


def test_missing_model_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        STMambaEmbeddings(model=str(missing))


def test_needs_a_model_or_a_client():
    with pytest.raises(ValueError, match="model="):
        STMambaEmbeddings()


def test_encode_kwargs_may_not_shadow_fields(client):
    with pytest.raises(ValueError, match="prompt"):
        STMambaEmbeddings(client=client, encode_kwargs={"prompt": "x: "})


# --- options -----------------------------------------------------------------------------------


def test_vectors_are_unit_length(embeddings):
    norms = np.linalg.norm(embeddings.embed_documents(DOCUMENTS), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_chunk_size_streams_long_documents_to_the_same_embeddings(model_dir, embeddings):
    long_documents = [" ".join(DOCUMENTS) * 4, DOCUMENTS[1]]
    streaming = STMambaEmbeddings(model=str(model_dir), device="cpu", chunk_size=8)
    assert streaming.client[0].chunk_size == 8
    np.testing.assert_allclose(
        streaming.embed_documents(long_documents), embeddings.embed_documents(long_documents), atol=1e-4
    )


@pytest.mark.slow
def test_device_list_encodes_in_worker_processes(model_dir, embeddings):
    pooled = STMambaEmbeddings(model=str(model_dir), device=["cpu"], batch_size=2)
    try:
        np.testing.assert_allclose(pooled.embed_documents(DOCUMENTS), embeddings.embed_documents(DOCUMENTS), atol=1e-5)
        np.testing.assert_allclose(pooled.embed_query(QUERY), embeddings.embed_query(QUERY), atol=1e-5)
    finally:
        pooled.close()


# --- async -------------------------------------------------------------------------------------


async def test_concurrent_queries_are_encoded_as_one_batch(client, embeddings, monkeypatch):
    batches = []
    encode_query = client.encode_query

    def counting_encode_query(texts, **kwargs):
        batches.append(list(texts))
        return encode_query(texts, **kwargs)

    batched = STMambaEmbeddings(client=client)
    monkeypatch.setattr(client, "encode_query", counting_encode_query)
    queries = [f"question number {i}" for i in range(5)]
    results = await asyncio.gather(*(batched.aembed_query(q) for q in queries))
    assert batches == [queries]
    np.testing.assert_allclose(results, [embeddings.embed_query(q) for q in queries], atol=1e-6)


async def test_async_documents_match_sync(embeddings):
    np.testing.assert_allclose(
        await embeddings.aembed_documents(DOCUMENTS), embeddings.embed_documents(DOCUMENTS), atol=1e-6
    )
    assert await embeddings.aembed_documents([]) == []


async def test_async_checks_input_before_encoding(embeddings):
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        await embeddings.aembed_documents(["fine", None])
    with pytest.raises(TypeError, match="query is int"):
        await embeddings.aembed_query(7)
