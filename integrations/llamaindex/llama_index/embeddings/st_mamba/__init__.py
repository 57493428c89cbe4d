"""LlamaIndex integration for st-mamba: Mamba Retriever embeddings as a LlamaIndex ``BaseEmbedding``."""

from __future__ import annotations

from llama_index.embeddings.st_mamba.base import STMambaEmbedding

__version__ = "0.1.0"

__all__ = ["STMambaEmbedding"]
