"""Fixtures for the evaluation tests: the hand-made tiny BEIR folder, and ../shared when it is there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_BEIR = Path(__file__).resolve().parents[1] / "data" / "evaluation" / "tiny-beir"
# The shared data sets sit beside the repository (../shared); ST_MAMBA_SHARED points elsewhere.
SHARED_DATA = Path(os.environ.get("ST_MAMBA_SHARED", Path(__file__).resolve().parents[2].parent / "shared")) / "data"


@pytest.fixture
def tiny_beir() -> Path:
    return TINY_BEIR


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared data sets at {SHARED_DATA} (set ST_MAMBA_SHARED to their parent folder)")
    return SHARED_DATA
