"""st-mamba: Mamba language models as Sentence-Transformers embedding models (Mamba Retriever)."""

from __future__ import annotations

from st_mamba.builders import from_backbone, from_config
from st_mamba.checkpoints import CheckpointError, load_backbone
from st_mamba.config import MambaConfig
from st_mamba.modeling import MambaBackbone
from st_mamba.module import MambaEncoder, TokenizerNotFoundError, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "MambaBackbone",
    "MambaConfig",
    "MambaEncoder",
    "TokenizerNotFoundError",
    "from_backbone",
    "from_config",
    "load_backbone",
    "load_tokenizer",
]
