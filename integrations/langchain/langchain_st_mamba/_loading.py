"""Loading a SentenceTransformer by folder or Hub id, with errors that name what was asked for."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformer


def is_st_mamba_folder(folder: Path) -> bool:
    """True if ``modules.json`` names only st-mamba and Sentence-Transformers classes.

    Sentence-Transformers asks for ``trust_remote_code`` before importing any module class of its
    own package, including ``st_mamba.module.MambaEncoder``. That class comes from the installed
    st-mamba, not from the folder, so such a folder can be loaded without the flag.
    """
    modules = folder / "modules.json"
    if not modules.is_file():
        return False
    types = [module.get("type", "") for module in json.loads(modules.read_text(encoding="utf-8"))]
    known = all(kind.startswith(("st_mamba.", "sentence_transformers.")) for kind in types)
    return known and any(kind.startswith("st_mamba.") for kind in types)


def load_model(
    name_or_path: str | os.PathLike,
    device: str | None = None,
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> SentenceTransformer:
    """Load a SentenceTransformer from a local folder or a Hugging Face Hub id.

    Raises:
        FileNotFoundError: ``name_or_path`` is written as a path (absolute, ``./``, ``../``, ``~``)
            and no folder is there.
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
