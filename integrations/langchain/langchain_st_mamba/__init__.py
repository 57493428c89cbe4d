"""LangChain integration for st-mamba: Mamba Retriever embeddings as a LangChain ``Embeddings``."""

from __future__ import annotations

from langchain_st_mamba.embeddings import STMambaEmbeddings

__version__ = "0.1.0"

__all__ = ["STMambaEmbeddings"]
