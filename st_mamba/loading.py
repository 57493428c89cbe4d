"""Loading a saved model by folder or Hub id, for the command line and the integrations.

Sentence-Transformers asks for ``trust_remote_code=True`` before it imports any module class from
outside its own package, ``st_mamba.module.MambaEncoder`` included. A local folder whose
``modules.json`` names only Sentence-Transformers classes and exactly that class loads without the
flag here: both come from installed packages, and such a reference cannot make Sentence-Transformers
run a file of the folder (its dynamic loader only handles ``file.Class`` references, and the
installed class is imported instead). Any other class, and every Hub id, still needs the flag.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformer

from st_mamba.module import MambaEncoder

INSTALLED_CLASSES = frozenset({f"{MambaEncoder.__module__}.{MambaEncoder.__qualname__}"})


def is_st_mamba_folder(folder: Path) -> bool:
    """True if ``modules.json`` names MambaEncoder and otherwise only Sentence-Transformers classes."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return False
    types = [module.get("type", "") for module in json.loads(modules.read_text(encoding="utf-8"))]
    installed = [kind for kind in types if kind in INSTALLED_CLASSES]
    return bool(installed) and all(
        kind in INSTALLED_CLASSES or kind.startswith("sentence_transformers.") for kind in types
    )


def set_chunk_size(model: SentenceTransformer, chunk_size: int, option: str = "chunk_size") -> None:
    """Make the model's MambaEncoder read long texts ``chunk_size`` tokens at a time (constant memory).

    Raises:
        ValueError: the model does not start with a MambaEncoder; ``option`` names the setting in the message.
    """
    first = model[0]
    if not isinstance(first, MambaEncoder):
        raise ValueError(f"{option} is an st-mamba option; this model starts with {type(first).__name__}")
    first.chunk_size = chunk_size


def load_model(
    name_or_path: str | os.PathLike,
    device: str | None = None,
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> SentenceTransformer:
    """Load a SentenceTransformer from a local folder or a Hugging Face Hub id.

    Raises:
        NotADirectoryError: ``name_or_path`` is a file.
        FileNotFoundError: it is written as a path (absolute, ``./``, ``../``, ``~``) and no folder is there.
        OSError: it is neither a local folder nor a model the Hub could give; the message names both.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    kwargs = dict(device=device, **(model_kwargs or {}))
    if path.is_dir():
        trust = trust_remote_code or is_st_mamba_folder(path)
        return SentenceTransformer(str(path), trust_remote_code=trust, **kwargs)
    if path.exists():
        raise NotADirectoryError(f"model path {path} is a file; expected a saved Sentence-Transformers folder")
    if path.is_absolute() or text.startswith((".", "~")):
        raise FileNotFoundError(f"no model folder at {path}")
    try:
        return SentenceTransformer(text, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as exc:
        raise OSError(
            f"could not load model {text!r}: there is no folder {path.resolve()} and the Hugging Face Hub "
            f"did not provide it ({exc})"
        ) from exc
