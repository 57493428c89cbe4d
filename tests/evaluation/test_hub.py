"""Hub loaders are real code that needs network; here only their offline errors are checked."""

from __future__ import annotations

import importlib.util

import pytest

from st_mamba.evaluation import HubUnavailableError, download_beir, download_loco, run_mteb


def test_beir_download_offline_says_what_and_what_to_do(tmp_path):
    with pytest.raises(HubUnavailableError, match=r"could not download BeIR/scifact/corpus.jsonl.gz .*--data"):
        download_beir("scifact", tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs the datasets package")
def test_loco_download_offline(tmp_path):
    with pytest.raises(HubUnavailableError, match="hazyresearch/LoCoV1-Documents"):
        download_loco("qmsum", tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("mteb") is not None, reason="mteb is installed")
def test_mteb_without_the_package_names_the_install_command():
    with pytest.raises(ImportError, match=r"pip install 'mteb>=2'"):
        run_mteb(None, ["SciFact"])
