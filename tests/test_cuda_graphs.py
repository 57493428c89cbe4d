"""CUDA graphs of the packed forward (``st_mamba.cuda_graphs``): buckets, padding, the graph cache; on a GPU, replays
against the eager forward (those tests are skipped without CUDA)."""

from __future__ import annotations

import copy
import json
import random
import threading
import warnings

import pytest
import torch
from sentence_transformers import SentenceTransformer

from st_mamba import MambaBackbone
from st_mamba.cuda_graphs import (
    ENV_VAR,
    TEXT_BUCKETS,
    TOKEN_BUCKETS,
    Bucket,
    CudaGraphs,
    choose_bucket,
    dummy_steps,
    graphs_enabled,
    longest_dummy,
    pad_packed,
    write_padded,
)
from st_mamba.ops import use_backend, weight_cache
from tests.conftest import random_texts, tiny_config

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def packed_batch(lengths: list[int], device: str = "cpu", seed: int = 0, vocab_size: int = 400):
    """(1, T) random ids and (n + 1,) int32 cu_seqlens for texts of ``lengths`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (1, sum(lengths)), generator=generator)
    cu_seqlens = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    return ids.to(device), cu_seqlens.to(device)


def check_layout(bucket: Bucket, n_tokens: int, n_texts: int) -> None:
    """The bucket holds the batch and its dummy texts: padding tokens iff dummy texts, each dummy >= 1 token
    and no longer than the real texts' mean length (or 16 tokens)."""
    assert bucket.tokens >= n_tokens and bucket.texts >= n_texts
    padding, dummies = bucket.tokens - n_tokens, bucket.texts - n_texts
    assert (padding > 0) == (dummies > 0)
    assert padding >= dummies
    if dummies:
        assert -(-padding // dummies) <= longest_dummy(n_tokens, n_texts) == max(-(-n_tokens // n_texts), 16)
    assert bucket.tokens in TOKEN_BUCKETS and bucket.texts in TEXT_BUCKETS


# --- buckets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_tokens,n_texts,expected",
    [
        (16, 1, Bucket(16, 1)),  # exactly a bucket: no padding
        (16, 2, Bucket(16, 2)),
        (10, 1, Bucket(16, 2)),  # one query: one dummy text takes the 6 free tokens
        (1, 1, Bucket(16, 2)),  # dummies may always have 16 tokens
        (15, 2, Bucket(24, 4)),  # 16 tokens leave one free, but 2 dummy texts (to reach 4) need 2
        (10, 3, Bucket(16, 4)),
        (4_000, 2, Bucket(4_096, 4)),  # 96 free tokens: one dummy would do, and the text bucket above 3 is 4
        (17, 1, Bucket(24, 2)),  # token buckets step by 1.5 and 4/3
        (11_200, 32, Bucket(12_288, 64)),  # 1,088 free tokens in dummies of <= 350: 4 texts more
        (256, 256, Bucket(256, 256)),
        (16384, 1, Bucket(16384, 1)),
        (16384, 256, Bucket(16384, 256)),
    ],
)
def test_choose_bucket(n_tokens, n_texts, expected):
    assert choose_bucket(n_tokens, n_texts) == expected
    check_layout(expected, n_tokens, n_texts)


@pytest.mark.parametrize(
    "n_tokens,n_texts",
    [(16385, 1), (16383, 256), (16383, 200), (8_200, 200), (300, 257), (20000, 300)],
    ids=[
        "too many tokens",
        "no room for a dummy text",
        "no token for the dummy texts",
        "dummies no longer than the texts need more than 256 texts",
        "too many texts",
        "both",
    ],  # fmt: skip
)
def test_beyond_the_largest_bucket_is_none(n_tokens, n_texts):
    assert choose_bucket(n_tokens, n_texts) is None


def test_every_small_batch_gets_a_valid_bucket():
    for n_texts in range(1, 40):
        for n_tokens in range(n_texts, 600, 7):
            check_layout(choose_bucket(n_tokens, n_texts), n_tokens, n_texts)


def test_padding_adds_less_than_half_of_a_text():
    for n_tokens in range(16, 16_385):
        bucket = choose_bucket(n_tokens, 1)
        assert bucket.tokens < 1.5 * n_tokens, n_tokens


def test_large_batches_get_a_valid_bucket_or_none():
    for n_texts in (1, 2, 7, 32, 100, 128, 129, 200, 256):
        for n_tokens in range(n_texts, 16_385, 499):
            bucket = choose_bucket(n_tokens, n_texts)
            if bucket is not None:
                check_layout(bucket, n_tokens, n_texts)
            else:  # up to 100 texts the dummies always fit (at most 156 more texts)
                assert n_texts > 100


@pytest.mark.parametrize("n_tokens,n_texts", [(5, 0), (3, 4), (0, 0)])
def test_choose_bucket_refuses_impossible_batches(n_tokens, n_texts):
    with pytest.raises(ValueError, match="n_texts >= 1"):
        choose_bucket(n_tokens, n_texts)


def test_bucket_lists_are_checked():
    with pytest.raises(ValueError, match="token_buckets"):
        CudaGraphs(token_buckets=(32, 16))
    with pytest.raises(ValueError, match="text_buckets"):
        CudaGraphs(text_buckets=())
    with pytest.raises(ValueError, match="max_graphs"):
        CudaGraphs(max_graphs=0)


# --- padding ----------------------------------------------------------------------------------------


def test_padding_layout():
    ids, cu_seqlens = packed_batch([3, 5])  # T = 8, n = 2
    bucket = choose_bucket(8, 2)
    assert bucket == Bucket(16, 4)
    padded_ids, padded_cu = pad_packed(ids, cu_seqlens, bucket, fill_id=0)
    assert padded_ids.shape == (1, 16) and padded_cu.dtype == torch.int32
    assert torch.equal(padded_ids[:, :8], ids) and (padded_ids[:, 8:] == 0).all()
    # The real boundaries, then two dummy texts of 4 tokens (no longer than the real texts' mean).
    assert padded_cu.tolist() == [0, 3, 8, 12, 16]


def test_exact_fit_is_not_padded():
    ids, cu_seqlens = packed_batch([6, 10])
    padded_ids, padded_cu = pad_packed(ids, cu_seqlens, Bucket(16, 2), fill_id=0)
    assert torch.equal(padded_ids, ids) and torch.equal(padded_cu, cu_seqlens)


def test_rewriting_the_same_buffers_leaves_nothing_of_a_larger_batch():
    """What the graph's static inputs see: a batch of many texts, then one of few, in the same bucket."""
    bucket = Bucket(64, 8)
    ids_out = torch.empty(1, 64, dtype=torch.long)
    cu_out = torch.empty(9, dtype=torch.int32)
    steps = dummy_steps(bucket)
    for lengths in ([5, 9, 2, 11, 3, 7, 1], [40], [20, 20, 1]):
        ids, cu_seqlens = packed_batch(lengths, seed=len(lengths))
        write_padded(ids_out, cu_out, ids, cu_seqlens, steps, fill_id=7)
        expected_ids, expected_cu = pad_packed(ids, cu_seqlens, bucket, fill_id=7)
        assert torch.equal(ids_out, expected_ids) and torch.equal(cu_out, expected_cu)
        dummy_lengths = (cu_out[1:] - cu_out[:-1])[len(lengths) :]
        padding = 64 - sum(lengths)
        assert cu_out[0] == 0 and cu_out[-1] == 64 and dummy_lengths.sum() == padding
        # The padding shared evenly: every dummy text floor or ceil of padding / dummies, at least one token.
        assert dummy_lengths.min() >= max(1, padding // len(dummy_lengths))
        assert dummy_lengths.max() <= -(-padding // len(dummy_lengths))


def test_pad_packed_refuses_bad_input():
    ids, cu_seqlens = packed_batch([3, 5])
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        pad_packed(ids[0], cu_seqlens, Bucket(16, 4), 0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        pad_packed(ids, cu_seqlens[:1], Bucket(16, 4), 0)
    with pytest.raises(ValueError, match="do not fit"):
        pad_packed(ids, cu_seqlens, Bucket(8, 1), 0)


@pytest.mark.parametrize("backend", [None, "chunked"], ids=["default", "chunked"])
def test_dummy_texts_leave_the_real_ones_unchanged(backend):
    """The padded batch through the ordinary packed forward: the real tokens' hidden states are the unpadded ones."""
    backbone = MambaBackbone(tiny_config(1)).reset_parameters(seed=0).eval()
    for seed, lengths in enumerate([[10], [3, 5], [7, 1, 30, 12, 3], [16, 16]]):
        ids, cu_seqlens = packed_batch(lengths, seed=seed)
        bucket = choose_bucket(ids.shape[1], len(lengths))
        padded_ids, padded_cu = pad_packed(ids, cu_seqlens, bucket, fill_id=0)
        with torch.inference_mode(), use_backend(backend):
            plain = backbone(ids, cu_seqlens=cu_seqlens)[0]  # (T, D)
            padded = backbone(padded_ids, cu_seqlens=padded_cu)[0]  # (T_b, D)
        torch.testing.assert_close(padded[: ids.shape[1]], plain, rtol=1e-5, atol=1e-6)


# --- the graph cache, with captures replaced by stand-ins -----------------------------------------------


class FakeGraph:
    """Stands in for a captured graph on CPU: runs the eager forward of the padded batch."""

    def __init__(self, backbone, bucket):
        self.backbone, self.bucket = backbone, bucket

    def run(self, input_ids, cu_seqlens):
        ids, cu = pad_packed(input_ids, cu_seqlens, self.bucket, fill_id=0)
        return self.backbone(ids, cu_seqlens=cu)[0][: input_ids.shape[1]].clone()


@pytest.fixture
def fake_captures(monkeypatch):
    """Captures that make FakeGraphs, and a list of the buckets captured, in order."""
    captured: list[Bucket] = []

    def capture(self, backbone, bucket, input_ids, cu_seqlens):
        captured.append(bucket)
        return FakeGraph(backbone, bucket)

    monkeypatch.setattr(CudaGraphs, "_capture", capture)
    monkeypatch.setattr(CudaGraphs, "_replay", lambda self, graph, ids, cu: graph.run(ids, cu))
    return captured


@pytest.fixture
def backbone():
    return MambaBackbone(tiny_config(1)).reset_parameters(seed=0).eval()


def run(graphs: CudaGraphs, backbone: MambaBackbone, lengths: list[int], seed: int = 0) -> torch.Tensor:
    ids, cu_seqlens = packed_batch(lengths, seed=seed)
    with torch.inference_mode():
        hidden = graphs.forward(backbone, ids, cu_seqlens)
        torch.testing.assert_close(hidden, backbone(ids, cu_seqlens=cu_seqlens)[0], rtol=1e-5, atol=1e-6)
    return hidden


def test_least_recently_used_graph_is_dropped(fake_captures, backbone):
    graphs = CudaGraphs(max_graphs=2)
    a, b, c = [10], [28], [60]  # buckets (16, 2), (32, 2), (64, 2)
    for lengths in (a, b, a, c):
        run(graphs, backbone, lengths)
    assert fake_captures == [Bucket(16, 2), Bucket(32, 2), Bucket(64, 2)]
    assert list(graphs._graphs) == [Bucket(16, 2), Bucket(64, 2)]  # b was the least recently used
    run(graphs, backbone, b)
    assert fake_captures[-1] == Bucket(32, 2) and list(graphs._graphs) == [Bucket(64, 2), Bucket(32, 2)]


def test_same_bucket_reuses_its_graph(fake_captures, backbone):
    graphs = CudaGraphs()
    for seed, lengths in enumerate([[10], [3, 5], [1, 1, 1], [14]]):  # (16, 2), (16, 4), (16, 4), (16, 2)
        run(graphs, backbone, lengths, seed=seed)
    assert fake_captures == [Bucket(16, 2), Bucket(16, 4)]


def test_beyond_the_largest_bucket_runs_eagerly(fake_captures, backbone):
    graphs = CudaGraphs(token_buckets=(16, 32), text_buckets=(1, 2))
    run(graphs, backbone, [40])
    run(graphs, backbone, [2, 2, 2])
    assert fake_captures == [] and len(graphs) == 0


def test_capture_failure_warns_once_and_runs_eagerly(monkeypatch, backbone):
    attempts: list[Bucket] = []

    def failing_capture(self, backbone, bucket, input_ids, cu_seqlens):
        attempts.append(bucket)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(CudaGraphs, "_capture", failing_capture)
    graphs = CudaGraphs()
    with pytest.warns(RuntimeWarning, match=r"could not capture a CUDA graph for Bucket\(tokens=16, texts=2\)"):
        run(graphs, backbone, [10])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: not for the same bucket, nor for another
        run(graphs, backbone, [12])  # the same bucket: not tried again
        run(graphs, backbone, [28])  # another bucket: tried, fails quietly (logged)
    assert attempts == [Bucket(16, 2), Bucket(32, 2)] and len(graphs) == 0


def test_weight_changes_drop_the_graphs(fake_captures, backbone):
    graphs = CudaGraphs()
    run(graphs, backbone, [10])
    backbone.to("cpu")  # what SentenceTransformer.encode does at every call: nothing changes
    backbone.eval()
    run(graphs, backbone, [10])
    assert len(fake_captures) == 1

    def changed(change) -> None:
        count = len(fake_captures)
        change()
        run(graphs, backbone, [10])
        assert len(fake_captures) == count + 1 and len(graphs) == 1

    layer = backbone.layers[0]
    with torch.no_grad():
        changed(lambda: layer.mixer.A_log.add_(0.1))  # an optimiser step: in place, version bumped
        changed(lambda: backbone.load_state_dict(MambaBackbone(tiny_config(1)).reset_parameters(seed=1).state_dict()))
    changed(lambda: backbone.to(torch.float64).to(torch.float32))  # new storage
    changed(lambda: setattr(layer.norm, "weight", torch.nn.Parameter(layer.norm.weight.detach().clone())))
    changed(lambda: layer.mixer.D.__setattr__("data", layer.mixer.D.detach().clone()))
    changed(lambda: layer.mixer.out_proj._parameters.__setitem__(  # as .to() does where parameters are overwritten
        "weight", torch.nn.Parameter(layer.mixer.out_proj.weight.detach().clone())
    ))  # fmt: skip
    changed(lambda: backbone.layers.__setitem__(1, copy.deepcopy(backbone.layers[1])))  # a new submodule


def test_inference_tensor_weights_run_eagerly(fake_captures):
    with torch.inference_mode():
        backbone = MambaBackbone(tiny_config(1)).reset_parameters(seed=0).eval()
        graphs = CudaGraphs()
        ids, cu_seqlens = packed_batch([10])
        torch.testing.assert_close(graphs.forward(backbone, ids, cu_seqlens), backbone(ids, cu_seqlens=cu_seqlens)[0])
    assert fake_captures == []


def test_copies_start_without_graphs(fake_captures, backbone):
    graphs = CudaGraphs(max_graphs=5)
    run(graphs, backbone, [10])
    for copied in (copy.deepcopy(graphs), copy.copy(graphs)):
        assert len(copied) == 0 and copied.max_graphs == 5


def test_weight_cache_stores_nothing_during_capture():
    weight = torch.nn.Parameter(torch.randn(4))
    weight_cache.capturing += 1
    try:
        made = weight_cache.cached(weight, "neg", lambda w: -w.detach())
    finally:
        weight_cache.capturing -= 1
    assert torch.equal(made, -weight.detach()) and weight_cache.derived_from([weight]) == []
    stored = weight_cache.cached(weight, "neg", lambda w: -w.detach())
    assert [t is stored for t in weight_cache.derived_from([weight])] == [True]


# --- the setting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env,setting,expected",
    [
        (None, False, False),
        (None, True, True),
        ("", True, True),
        ("0", True, False),
        ("1", False, True),
        (" 0 ", True, False),
    ],
)
def test_env_overrides_the_setting(monkeypatch, env, setting, expected):
    if env is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, env)
    assert graphs_enabled(setting) is expected


def test_bad_env_value_is_refused(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "yes")
    with pytest.raises(ValueError, match=f"{ENV_VAR} must be 0"):
        graphs_enabled(True)


@pytest.fixture
def mamba1_model(tokenizer_dir):
    from st_mamba import from_config

    return from_config(tiny_config(1), tokenizer_dir, seed=0, max_seq_length=256, device="cpu")


def test_config_round_trip(mamba1_model, tmp_path):
    encoder = mamba1_model[0]
    assert encoder.cuda_graphs is True  # the default
    encoder.cuda_graphs = False
    mamba1_model.save(str(tmp_path))
    assert json.loads((tmp_path / "st_mamba_config.json").read_text())["cuda_graphs"] is False
    assert SentenceTransformer(str(tmp_path), trust_remote_code=True, device="cpu")[0].cuda_graphs is False
    # A model saved before the key existed loads with the default: graphs on.
    config = json.loads((tmp_path / "st_mamba_config.json").read_text())
    del config["cuda_graphs"]
    (tmp_path / "st_mamba_config.json").write_text(json.dumps(config))
    assert SentenceTransformer(str(tmp_path), trust_remote_code=True, device="cpu")[0].cuda_graphs is True


@pytest.mark.parametrize("bad", [1, "true", None])
def test_cuda_graphs_setting_must_be_bool(mamba1_model, bad):
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        mamba1_model[0].cuda_graphs = bad


def test_training_and_turning_off_drop_the_graphs(mamba1_model):
    encoder = mamba1_model[0]
    encoder.cuda_graphs = True
    for drop in (lambda: mamba1_model.train(), lambda: setattr(encoder, "cuda_graphs", False)):
        encoder._graphs._graphs[Bucket(16, 2)] = object()
        drop()
        assert len(encoder._graphs) == 0
    # What SentenceTransformer.encode does at every call keeps them.
    encoder._graphs._graphs[Bucket(16, 2)] = object()
    mamba1_model.to("cpu")
    mamba1_model.eval()
    assert len(encoder._graphs) == 1


def test_cpu_encode_is_unchanged_by_the_setting(mamba1_model):
    texts = random_texts(5, seed=3)
    mamba1_model[0].cuda_graphs = False
    off = mamba1_model.encode(texts + texts[:1], convert_to_tensor=True)
    mamba1_model[0].cuda_graphs = True
    assert mamba1_model[0].preprocess(texts[:1]).keys() == {"input_ids", "attention_mask"}  # not packed on CPU
    torch.testing.assert_close(mamba1_model.encode(texts + texts[:1], convert_to_tensor=True), off)
    assert len(mamba1_model[0]._graphs) == 0
    copy.deepcopy(mamba1_model)  # the graph cache copies (empty)


# --- on a GPU -----------------------------------------------------------------------------------------

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def random_lengths(rng: random.Random) -> list[int]:
    n_texts = rng.choice([1, 1, 2, 3, 5, 8, 17, 40])
    longest = rng.choice([1, 4, 16, 60, 200])
    return [rng.randint(1, longest) for _ in range(n_texts)]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_replays_equal_eager(dtype):
    backbone = MambaBackbone(tiny_config(1)).reset_parameters(seed=0).to("cuda", dtype).eval()
    graphs = CudaGraphs()
    rng = random.Random(0)
    batches = [[10], [16], [1], [3, 5], [16, 16]] + [random_lengths(rng) for _ in range(25)]
    results = []
    with torch.inference_mode():
        for seed, lengths in enumerate(batches):
            ids, cu_seqlens = packed_batch(lengths, "cuda", seed=seed)
            replayed = graphs.forward(backbone, ids, cu_seqlens)  # (T, D)
            eager = backbone(ids, cu_seqlens=cu_seqlens)[0]
            torch.testing.assert_close(
                replayed, eager, **TOLERANCE[dtype], msg=lambda m, lengths=lengths: f"{lengths}: {m}"
            )
            # The eager forward of the padded batch the graph reads runs the same kernels: the same numbers.
            bucket = graphs.bucket_for(ids.shape[1], len(lengths))
            padded_ids, padded_cu = pad_packed(ids, cu_seqlens, bucket, backbone.config.eos_token_id)
            padded = backbone(padded_ids, cu_seqlens=padded_cu)[0]  # (T_b, D)
            torch.testing.assert_close(replayed, padded[: ids.shape[1]], rtol=0, atol=0)
            results.append((replayed, eager))
    assert len(graphs) > 1
    for replayed, eager in results:  # no later replay overwrote an earlier result
        torch.testing.assert_close(replayed, eager, **TOLERANCE[dtype])


@pytest.mark.cuda
@needs_cuda
def test_gpu_replays_in_one_bucket_with_new_inputs():
    backbone = MambaBackbone(tiny_config(1)).reset_parameters(seed=0).to("cuda").eval()
    graphs = CudaGraphs()
    batches = [[5, 9, 2, 11, 30], [20, 20, 1, 1, 1, 10], [30, 3, 3, 3, 3, 3, 8], [8, 8, 8, 8, 20], [5, 9, 2, 11, 30]]
    for seed, lengths in enumerate(batches):
        assert graphs.bucket_for(sum(lengths), len(lengths)) == Bucket(64, 8)
        ids, cu_seqlens = packed_batch(lengths, "cuda", seed=seed)
        with torch.no_grad() if seed % 2 else torch.inference_mode():  # the static tensors serve both modes
            torch.testing.assert_close(
                graphs.forward(backbone, ids, cu_seqlens), backbone(ids, cu_seqlens=cu_seqlens)[0]
            )
    assert list(graphs._graphs) == [Bucket(64, 8)]


@pytest.mark.cuda
@needs_cuda
def test_gpu_weight_changes_are_seen():
    backbone = MambaBackbone(tiny_config(1)).reset_parameters(seed=0).to("cuda").eval()
    graphs = CudaGraphs()
    ids, cu_seqlens = packed_batch([7, 3], "cuda")

    def check() -> None:
        with torch.inference_mode():
            torch.testing.assert_close(
                graphs.forward(backbone, ids, cu_seqlens), backbone(ids, cu_seqlens=cu_seqlens)[0]
            )

    check()
    with torch.no_grad():
        for layer in backbone.layers:  # A_log, D and dt's bias reach the scan through ops.weight_cache
            layer.mixer.A_log.mul_(0.5)
            layer.mixer.D.add_(1.0)
            layer.mixer.dt_proj.bias.add_(0.3)
            layer.mixer.in_proj.weight.mul_(1.5)
    check()
    backbone.load_state_dict(MambaBackbone(tiny_config(1)).reset_parameters(seed=3).state_dict())
    check()
    backbone.to(torch.bfloat16)
    with torch.inference_mode():
        replayed = graphs.forward(backbone, ids, cu_seqlens)
        torch.testing.assert_close(replayed, backbone(ids, cu_seqlens=cu_seqlens)[0], **TOLERANCE[torch.bfloat16])


@pytest.mark.cuda
@needs_cuda
def test_gpu_encode_with_graphs_equals_without(tiny_model):
    texts = random_texts(40, seed=5, max_words=80)
    tiny_model.to("cuda")
    batches = [texts[:1], texts[1:2], texts[:3], texts[:32], texts]
    tiny_model[0].cuda_graphs = False
    off = [tiny_model.encode(batch, convert_to_tensor=True, batch_size=32) for batch in batches]
    tiny_model[0].cuda_graphs = True
    on = [tiny_model.encode(batch, convert_to_tensor=True, batch_size=32) for batch in batches]
    captured = len(tiny_model[0]._graphs)
    on = [tiny_model.encode(batch, convert_to_tensor=True, batch_size=32) for batch in batches]  # replays only
    assert len(tiny_model[0]._graphs) == captured
    for batch, a, b in zip(batches, on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, batch=batch: f"{len(batch)} texts: {m}")
    assert len(tiny_model[0]._graphs) > 0  # both versions pack in one pass on the GPU
    tokens = tiny_model.encode(texts[:3], output_value="token_embeddings")
    tiny_model[0].cuda_graphs = False
    for a, b in zip(tokens, tiny_model.encode(texts[:3], output_value="token_embeddings"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_cuda
def test_gpu_concurrent_callers_get_their_own_results(tiny_model):
    tiny_model.to("cuda")
    texts = random_texts(24, seed=6, max_words=30)
    tiny_model[0].cuda_graphs = False
    expected = tiny_model.encode(texts, convert_to_tensor=True, batch_size=1)
    tiny_model[0].cuda_graphs = True
    results: dict[int, torch.Tensor] = {}

    def caller(index: int) -> None:
        stream = torch.cuda.Stream()  # each caller on a stream of its own
        with torch.cuda.stream(stream):
            for i in range(index, len(texts), 4):
                results[i] = tiny_model.encode(texts[i : i + 1], convert_to_tensor=True)[0]
            stream.synchronize()

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(len(texts)):
        torch.testing.assert_close(results[i], expected[i], rtol=1e-5, atol=1e-5)
