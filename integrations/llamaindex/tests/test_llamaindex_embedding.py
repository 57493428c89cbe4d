"""STMambaEmbedding: prompts, batching, input checks, async, and use inside VectorStoreIndex."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import TextNode
from sentence_transformers import SentenceTransformer

from llama_index.embeddings.st_mamba import STMambaEmbedding

QUERY = "How does Mamba keep a fixed-size state?"
TEXTS = [
    "State space models read a sequence left to right.\nThey keep a fixed-size state.",
    "Dense retrieval ranks by cosine similarity.",
    "The quick brown fox jumps over the lazy dog.",
    "Mamba makes the step size depend on the current token.",
    "Tabs\tand unicode: Ünïcödé 🙂",
]


@pytest.fixture(scope="module")
def client(model_dir) -> SentenceTransformer:
    return SentenceTransformer(str(model_dir), device="cpu", trust_remote_code=True)


@pytest.fixture(scope="module")
def embed_model(client) -> STMambaEmbedding:
    return STMambaEmbedding(client=client, embed_batch_size=2)


def plain_encode(client: SentenceTransformer, texts: list[str]) -> np.ndarray:
    """Encode with no prompt at all: the reference the prompted calls are compared with."""
    return client.encode(texts, prompt="", convert_to_numpy=True)


def test_is_a_llamaindex_embedding_loaded_from_a_folder(model_dir):
    embed_model = STMambaEmbedding(model_name=str(model_dir), device="cpu")
    assert isinstance(embed_model, BaseEmbedding)
    assert embed_model.class_name() == "STMambaEmbedding"
    assert len(embed_model.get_query_embedding(QUERY)) == 32


# --- prompts -----------------------------------------------------------------------------------


def test_query_and_text_use_the_saved_prompts(embed_model, client):
    np.testing.assert_allclose(
        embed_model.get_query_embedding(QUERY), plain_encode(client, ["query: " + QUERY])[0], atol=1e-6
    )
    np.testing.assert_allclose(
        embed_model.get_text_embedding(TEXTS[0]), plain_encode(client, ["passage: " + TEXTS[0]])[0], atol=1e-6
    )
    np.testing.assert_allclose(
        embed_model.get_text_embedding_batch(TEXTS), plain_encode(client, ["passage: " + t for t in TEXTS]), atol=1e-6
    )


def test_explicit_prompts_win(client):
    custom = STMambaEmbedding(client=client, query_prompt="search: ", document_prompt="")
    np.testing.assert_allclose(
        custom.get_query_embedding(QUERY), plain_encode(client, ["search: " + QUERY])[0], atol=1e-6
    )
    np.testing.assert_allclose(custom.get_text_embedding_batch(TEXTS), plain_encode(client, TEXTS), atol=1e-6)


def test_text_batches_are_encoded_one_call_per_batch(client, monkeypatch):
    calls = []
    encode_document = client.encode_document

    def counting_encode_document(texts, **kwargs):
        calls.append(len(texts))
        return encode_document(texts, **kwargs)

    embed_model = STMambaEmbedding(client=client, embed_batch_size=2)
    monkeypatch.setattr(client, "encode_document", counting_encode_document)
    assert len(embed_model.get_text_embedding_batch(TEXTS)) == len(TEXTS)
    assert calls == [2, 2, 1]


# --- input checks ------------------------------------------------------------------------------


def test_empty_list_gives_empty_list(embed_model):
    assert embed_model.get_text_embedding_batch([]) == []


@pytest.mark.parametrize("bad", [None, 3.5], ids=["None", "float"])
def test_non_string_is_named_by_its_index_in_the_callers_list(embed_model, bad):
    # embed_batch_size=2: index 3 sits in LlamaIndex's second batch, at position 1 there.
    texts = [*TEXTS[:3], bad, TEXTS[3]]
    with pytest.raises(TypeError, match=r"texts\[3\] is " + type(bad).__name__):
        embed_model.get_text_embedding_batch(texts)


def test_non_string_query_is_refused(embed_model):
    with pytest.raises(TypeError, match="query is NoneType"):
        embed_model.get_query_embedding(None)


def test_missing_model_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        STMambaEmbedding(model_name=str(missing))


def test_needs_a_model_or_a_client():
    with pytest.raises(ValueError, match="model_name="):
        STMambaEmbedding()


def test_chunk_size_streams_long_texts_to_the_same_embeddings(model_dir, embed_model):
    long_texts = [" ".join(TEXTS) * 4, TEXTS[1]]
    streaming = STMambaEmbedding(model_name=str(model_dir), device="cpu", chunk_size=8)
    assert streaming.client[0].chunk_size == 8
    np.testing.assert_allclose(
        streaming.get_text_embedding_batch(long_texts), embed_model.get_text_embedding_batch(long_texts), atol=1e-4
    )


# --- inside LlamaIndex -------------------------------------------------------------------------


def test_vector_store_index_and_retriever_rank_by_our_embeddings(embed_model):
    nodes = [TextNode(text=text, id_=f"node-{i}") for i, text in enumerate(TEXTS)]
    index = VectorStoreIndex(nodes, embed_model=embed_model)
    retrieved = index.as_retriever(similarity_top_k=3).retrieve(QUERY)

    documents = np.array(embed_model.get_text_embedding_batch(TEXTS))
    scores = documents @ np.array(embed_model.get_query_embedding(QUERY))
    expected = [f"node-{i}" for i in np.argsort(-scores)[:3]]
    assert [hit.node.node_id for hit in retrieved] == expected
    np.testing.assert_allclose([hit.score for hit in retrieved], np.sort(scores)[::-1][:3], atol=1e-5)


@pytest.mark.asyncio
async def test_async_index_and_retriever_match_sync(embed_model):
    nodes = [TextNode(text=text, id_=f"node-{i}") for i, text in enumerate(TEXTS)]
    index = VectorStoreIndex(nodes, embed_model=embed_model, use_async=True)
    retriever = index.as_retriever(similarity_top_k=2)
    asynchronous = await retriever.aretrieve(QUERY)
    synchronous = retriever.retrieve(QUERY)
    assert [hit.node.node_id for hit in asynchronous] == [hit.node.node_id for hit in synchronous]


# --- async -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_queries_are_encoded_as_one_batch(client, embed_model, monkeypatch):
    batches = []
    encode_query = client.encode_query

    def counting_encode_query(texts, **kwargs):
        batches.append(list(texts))
        return encode_query(texts, **kwargs)

    batched = STMambaEmbedding(client=client)
    monkeypatch.setattr(client, "encode_query", counting_encode_query)
    queries = [f"question number {i}" for i in range(5)]
    results = await asyncio.gather(*(batched.aget_query_embedding(q) for q in queries))
    assert batches == [queries]
    np.testing.assert_allclose(results, [embed_model.get_query_embedding(q) for q in queries], atol=1e-6)


@pytest.mark.asyncio
async def test_async_texts_match_sync_and_check_input(embed_model):
    np.testing.assert_allclose(
        await embed_model.aget_text_embedding_batch(TEXTS), embed_model.get_text_embedding_batch(TEXTS), atol=1e-6
    )
    np.testing.assert_allclose(
        await embed_model.aget_text_embedding(TEXTS[0]), embed_model.get_text_embedding(TEXTS[0]), atol=1e-6
    )
    with pytest.raises(TypeError, match=r"texts\[3\]"):
        await embed_model.aget_text_embedding_batch([*TEXTS[:3], None])
