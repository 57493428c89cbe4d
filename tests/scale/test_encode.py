"""encode_corpus: shards equal a plain encode, a killed job resumes exactly, a different job refuses to."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from st_mamba import cli
from st_mamba.scale import ResumeError, encode_corpus, load_shards
from st_mamba.scale.shards import MANIFEST, finished_shards, shard_path
from tests.scale.conftest import save_tiny_model, texts_of, write_corpus


def test_shards_hold_what_encode_document_gives(model, tmp_path):
    rows = write_corpus(tmp_path / "corpus.jsonl", 30)
    manifest = encode_corpus(tmp_path / "corpus.jsonl", model, tmp_path / "out", shard_size=8, dtype="float32",
                             progress=False)  # fmt: skip
    assert len(manifest.shards) == 4 and manifest.documents == 30
    shards = load_shards(tmp_path / "out")
    assert shards.ids == [row["_id"] for row in rows]
    expected = np.concatenate([model.encode_document(texts_of(rows[i : i + 8])) for i in range(0, 30, 8)])
    np.testing.assert_array_equal(shards.embeddings, expected)  # the same batches, so the same bits


def test_float16_shards(model, tmp_path):
    rows = write_corpus(tmp_path / "corpus.jsonl", 10)
    encode_corpus(tmp_path / "corpus.jsonl", model, tmp_path / "out", shard_size=4, progress=False)
    shards = load_shards(tmp_path / "out")
    assert shards.embeddings.dtype == np.float16
    np.testing.assert_allclose(shards.embeddings, model.encode_document(texts_of(rows)), atol=2e-3)


def test_a_killed_job_resumes_to_the_uninterrupted_result(model_dir, tmp_path):
    """SIGKILL a job once a shard is on disk, run it again: the same embeddings, each document once.

    The job is a forked process, which starts in milliseconds where a fresh interpreter would spend
    seconds importing Sentence-Transformers. It runs on one thread: OpenMP's thread pool, inherited
    from this process by fork, would hang it.
    """
    rows = write_corpus(tmp_path / "corpus.jsonl", 200)
    out = tmp_path / "out"
    arguments = (tmp_path / "corpus.jsonl", model_dir, out)
    options = dict(shard_size=10, dtype="float32", devices=["cpu"], progress=False)
    job = multiprocessing.get_context("fork").Process(target=_encode_on_one_thread, args=arguments, kwargs=options)
    job.start()
    deadline = time.monotonic() + 30
    while not (out.is_dir() and finished_shards(out)) and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(job.pid, signal.SIGKILL)
    job.join()
    assert job.exitcode == -signal.SIGKILL
    written = finished_shards(out)
    assert 0 < len(written) < 20, "the job was not killed midway"
    for number in written:  # every shard on disk is whole
        assert np.load(shard_path(out, number))["embeddings"].shape == (10, 32)
    leftover = out / f".{shard_path(out, 19).name}.0123456789ab.tmp"  # as if killed while writing it
    leftover.write_bytes(b"half a shard")

    encode_corpus(*arguments, **options)
    assert not leftover.exists()
    resumed = load_shards(out)
    encode_corpus(tmp_path / "corpus.jsonl", model_dir, tmp_path / "reference", **options)
    reference = load_shards(tmp_path / "reference")
    assert resumed.ids == reference.ids == [row["_id"] for row in rows]
    np.testing.assert_allclose(resumed.embeddings, reference.embeddings, rtol=0, atol=1e-6)  # 1 or 2 threads
    np.testing.assert_array_equal(resumed.positions, reference.positions)


def _encode_on_one_thread(*args, **kwargs):
    import threading

    import torch
    import tqdm.auto
    import tqdm.std

    # tqdm's write lock holds a multiprocessing lock that the forked job shares with this process: killed while
    # holding it (every progress bar takes it, disabled ones too), the job would leave this process's next bar
    # waiting forever. The job takes a lock of its own, for tqdm's bars (Sentence-Transformers') and tqdm.auto's.
    lock = threading.RLock()
    for bar in (tqdm.std.tqdm, tqdm.auto.tqdm):
        bar.set_lock(lock)
    torch.set_num_threads(1)
    encode_corpus(*args, **kwargs)


def test_a_changed_corpus_or_model_refuses_to_resume(model_dir, tokenizer_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 12)
    out = tmp_path / "out"
    encode_corpus(corpus, model_dir, out, shard_size=5, progress=False)
    other_model = save_tiny_model(tmp_path / "other-model", tokenizer_dir, seed=1)
    with pytest.raises(ResumeError, match="cannot be resumed.*model.*weights_blake2b"):
        encode_corpus(corpus, other_model, out, shard_size=5, progress=False)
    with pytest.raises(ResumeError, match="shard_size: 5 in the folder, 6 now"):
        encode_corpus(corpus, model_dir, out, shard_size=6, progress=False)
    write_corpus(corpus, 13)
    with pytest.raises(ResumeError, match="corpus"):
        encode_corpus(corpus, model_dir, out, shard_size=5, progress=False)
    assert len(finished_shards(out)) == 3 and (out / MANIFEST).is_file()  # nothing was touched


def test_cli_reports_bad_lines_with_their_numbers(model_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "a", "text": "one"}\n{"_id": "b"}\n{"_id": "c", "text": "three"}\n')
    argv = ["encode-corpus", str(corpus), "--model", str(model_dir), "--no-progress"]
    assert cli.main([*argv, "-o", str(tmp_path / "fail")]) == 1
    assert f"{corpus}:2: no string text" in capsys.readouterr().err
    assert cli.main([*argv, "-o", str(tmp_path / "skip"), "--on-bad-line", "skip"]) == 0
    assert "1 bad line(s) skipped" in capsys.readouterr().out
    shards = load_shards(tmp_path / "skip")
    assert shards.ids == ["a", "c"] and shards.manifest.skipped_lines == [2]


def test_resume_with_nothing_left_is_a_no_op(model, tmp_path):
    write_corpus(tmp_path / "corpus.jsonl", 6)
    encode_corpus(tmp_path / "corpus.jsonl", model, tmp_path / "out", shard_size=3, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    encode_corpus(tmp_path / "corpus.jsonl", model, tmp_path / "out", shard_size=3, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before
    assert os.listdir(tmp_path / "out") and load_shards(tmp_path / "out").embeddings.shape == (6, 32)
