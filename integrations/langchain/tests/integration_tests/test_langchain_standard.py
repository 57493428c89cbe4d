"""LangChain's standard integration suite for embeddings, on a tiny local st-mamba model."""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import EmbeddingsIntegrationTests

from langchain_st_mamba import STMambaEmbeddings


class TestSTMambaEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @pytest.fixture(autouse=True)
    def _saved_model(self, model_dir):
        self.model_dir = model_dir

    @property
    def embeddings_class(self) -> type[STMambaEmbeddings]:
        return STMambaEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"model": str(self.model_dir), "device": "cpu"}
