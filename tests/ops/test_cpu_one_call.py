"""The Mamba-1 backbone in one call of the compiled CPU library (``ops.cpu.mamba1_forward_small``) against the
layer-by-layer forward, and when ``MambaBackbone`` takes it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from st_mamba import MambaBackbone, MambaConfig, modeling, ops
from st_mamba.ops import cpu
from tests.ops.test_chunked import assert_close

pytestmark = pytest.mark.skipif(
    not cpu.available(), reason="the compiled CPU kernels did not build here (no C compiler?)"
)

# d_model 24 (48 inner channels) and 40 (80): x_proj, dt_proj and out_proj end on a partial panel of outputs
# (32 a panel with AVX-512); d_state 16 takes the scan's unrolled path, 5 the generic one; dt_rank 5 is an odd depth for
# the bf16 pairs; with bias: in_proj and out_proj have biases, the convolution none.
CONFIGS = {
    "base": dict(d_model=24, n_layer=2, vocab_size=50, dt_rank=4),
    "odd sizes": dict(d_model=40, n_layer=3, vocab_size=50, d_state=5, dt_rank=5, bias=True, conv_bias=False),
}


def _model(config: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> MambaBackbone:
    return MambaBackbone(MambaConfig(**CONFIGS[config])).reset_parameters(seed=seed).to(dtype).eval()


def _layer_by_layer(model: MambaBackbone, ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The forward with the one-call path turned off (the per-op CPU kernels and oneDNN)."""
    previous, modeling.ONE_CALL_MAX_WORK = modeling.ONE_CALL_MAX_WORK, -1
    try:
        return model(ids, cu_seqlens=cu_seqlens)
    finally:
        modeling.ONE_CALL_MAX_WORK = previous


def _ids(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the one-call forward."""
    calls = []
    real = cpu.mamba1_forward_small
    monkeypatch.setattr(cpu, "mamba1_forward_small", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    return calls


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("shape", [(1, 0), (1, 1), (1, 11), (3, 33)], ids=str)
def test_fp32_matches_the_layer_by_layer_forward(config, shape, spy):
    model = _model(config, seed=len(shape))
    ids = _ids(shape, seed=shape[1])
    with torch.no_grad():
        hidden = model(ids)
        expected = _layer_by_layer(model, ids)
        with ops.use_backend("reference"):
            reference = model(ids)
    assert spy == [shape]
    assert_close("hidden", hidden, expected)
    assert_close("hidden against the reference", hidden, reference)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_bf16_is_as_close_to_fp32_as_the_layer_by_layer_forward(config, spy):
    """In bf16 the one call keeps fp32 between its ops where the layer-by-layer forward rounds each result to
    bf16: its error against the same weights in fp32 must be no larger (within a quarter)."""
    model = _model(config, torch.bfloat16, seed=3)
    exact = _model(config)
    exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ids = _ids((2, 21), seed=5)
    with torch.no_grad():
        hidden = model(ids)
        rounded = _layer_by_layer(model, ids)
        expected = _layer_by_layer(exact, ids)
    assert spy == [(2, 21)] and hidden.dtype == torch.bfloat16
    error = (hidden.float() - expected).abs().max().item()
    rounded_error = (rounded.float() - expected).abs().max().item()
    assert error <= 1.25 * rounded_error, (error, rounded_error)
    assert error <= 0.05 * expected.abs().max().item()


@pytest.mark.parametrize("lengths", [[7, 1, 30, 12], [0, 5, 0], [40]], ids=str)
def test_packed_batch_equals_each_text_alone(lengths, spy):
    model = _model("odd sizes", seed=1)
    ids = _ids((1, sum(lengths)), seed=len(lengths))
    cu_seqlens = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    with torch.no_grad():
        hidden = model(ids, cu_seqlens=cu_seqlens)
        alone = [_layer_by_layer(model, piece) for piece in ids.split(lengths, dim=1) if piece.shape[1]]
    assert spy == [(1, sum(lengths))]
    assert_close("hidden", hidden, torch.cat(alone, dim=1) if alone else hidden)


def test_a_changed_model_is_seen_at_the_next_call():
    """The weights' layout for the call is kept per backbone; an in-place update, a conversion to another
    dtype or a replaced parameter makes it again."""
    model = _model("base")
    ids = _ids((1, 9), seed=4)
    with torch.no_grad():
        model(ids)
        mixer = model.layers[1].mixer
        for weight in (mixer.A_log, mixer.in_proj.weight, mixer.conv1d.weight, mixer.D, model.norm_f.weight):
            weight.mul_(0.5)
        assert_close("after in-place updates", model(ids), _layer_by_layer(model, ids))
        mixer.out_proj.weight = nn.Parameter(torch.randn_like(mixer.out_proj.weight))
        assert_close("after a replaced parameter", model(ids), _layer_by_layer(model, ids))
        model.to(torch.bfloat16)
        hidden = model(ids)
        assert hidden.dtype == torch.bfloat16
        assert_close("after .to(bf16)", hidden.float(), _layer_by_layer(model, ids).float(), rtol=0.05, atol=0.05)


def test_a_model_made_under_inference_mode_is_computed_right_every_call():
    """Inference tensors keep no version counter: the layout is made again at every call, never reused stale."""
    with torch.inference_mode():
        model = _model("base")
        ids = _ids((1, 9), seed=6)
        first = model(ids)
        model.layers[0].mixer.in_proj.weight.mul_(0.5)
        assert_close("after an update", model(ids), _layer_by_layer(model, ids))
    with torch.no_grad():
        assert not torch.equal(first, model(ids))


def test_mixed_dtypes_fall_back_to_the_layer_by_layer_forward(spy):
    model = _model("base")
    model.layers[0].mixer.in_proj.to(torch.bfloat16)  # one projection in another dtype than the embeddings
    ids = _ids((1, 9), seed=7)
    with torch.no_grad():
        assert cpu.mamba1_forward_small(model, ids) is None
        model.layers[0].mixer.in_proj.to(torch.float32)
        assert cpu.mamba1_forward_small(model, ids) is not None


def test_taken_only_for_small_inference_batches_on_the_cpu_kernels(monkeypatch, spy):
    model = _model("base")
    ids = _ids((1, 9), seed=8)
    model(ids)  # gradients on: the layer-by-layer forward
    with torch.no_grad():
        model(ids, return_state=True)  # states asked for
        with ops.use_backend("chunked"):
            model(ids)
        monkeypatch.setattr(modeling, "ONE_CALL_MAX_WORK", ids.numel() * model.config.d_inner - 1)
        model(ids)  # above the size
        assert spy == []
        monkeypatch.setattr(modeling, "ONE_CALL_MAX_WORK", ids.numel() * model.config.d_inner)
        model(ids)
        with ops.use_backend("cpu"):
            model(ids)
    assert spy == [(1, 9), (1, 9)]


def test_mamba2_is_not_taken(spy):
    model = MambaBackbone(MambaConfig(version=2, d_model=32, n_layer=1, vocab_size=50, d_state=8, headdim=16))
    with torch.no_grad():
        model.reset_parameters(seed=0)(_ids((1, 9), seed=9))
    assert spy == []


def test_bad_input_is_refused_before_the_c_code_reads_it():
    model = _model("base")
    with torch.no_grad():
        with pytest.raises(IndexError):
            model(torch.tensor([[1, 50]]))  # past the vocabulary
        with pytest.raises(ValueError, match="cu_seqlens"):
            model(_ids((1, 9), seed=10), cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))
