"""The Mamba-2 Triton kernels (``ops/triton_ssd.py``) against the sequential reference, and a tiny
Mamba-2 model through them: outputs, final states and every gradient, by dtype.

As ``test_triton.py`` (whose device choice, interpreter set-up, tolerances and comparison helpers
this module shares): runs on a CUDA GPU; without one only under ``TRITON_INTERPRET=1``, on CPU
tensors with small shapes; skipped without Triton.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from st_mamba import MambaBackbone, ops  # noqa: E402
from st_mamba.ops import triton_ssd  # noqa: E402
from st_mamba.ops.reference import ssd_scan_reference  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.ops.test_triton import (  # noqa: E402  (skips this module too where there is no GPU nor interpreter)
    DEVICE,
    DTYPES,
    INTERPRETED,
    TOLERANCES,
    _check_scan,
    _leaves,
    _packed,
    assert_close,
)

pytestmark = pytest.mark.cuda

NAMES = ["x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"]
LIMIT = (0.0, 0.7)  # a limit that clamps some of the steps below (softplus of N(0, 1) + bias)


def _ssd_inputs(
    batch, length, nheads, headdim, ngroups, d_state, dtype, seed, with_state, n_states=None, d_per_p=False
):
    """x, dt, B, C in ``dtype``; A, D, dt_bias and the initial state in fp32 (as the mixer passes them)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    x = rand(batch, length, nheads, headdim).to(DEVICE, dtype)
    dt = rand(batch, length, nheads).to(DEVICE, dtype)
    A = -(torch.rand(nheads, generator=g) * 4 + 0.1).to(DEVICE)
    B = rand(batch, length, ngroups, d_state).to(DEVICE, dtype)
    C = rand(batch, length, ngroups, d_state).to(DEVICE, dtype)
    D = rand(nheads, headdim) if d_per_p else rand(nheads)
    dt_bias = rand(nheads, scale=0.5)
    h0 = rand(n_states or batch, nheads, headdim, d_state) if with_state else None
    return x, dt, A, B, C, D.to(DEVICE), dt_bias.to(DEVICE), None if h0 is None else h0.to(DEVICE)


def _check(fast_fn, ref_fn, inputs, dtype, seed):
    _check_scan(fast_fn, ref_fn, inputs, dtype, seed, names=NAMES)


def _scan_both(kw):
    """(fast, reference) functions of the leaves (x, dt, A, B, C, D, dt_bias, initial_state), returning (y, final)."""

    def fast(t):
        return triton_ssd.ssd_scan_triton(*t[:6], dt_bias=t[6], initial_state=t[7], return_final_state=True, **kw)

    def ref(t):
        return ssd_scan_reference(*t[:6], dt_bias=t[6], initial_state=t[7], return_final_state=True, **kw)

    return fast, ref


def _small_chunks(monkeypatch) -> None:
    """Chunks of 16 tokens in both forwards and the backward: chunk boundaries inside short sequences."""
    monkeypatch.setattr(triton_ssd, "SSD_CHUNK", 16)
    monkeypatch.setattr(triton_ssd, "SSD_FUSED_CHUNK", 16)


@pytest.fixture(params=["chunk 16", "default chunk"])
def chunk(request, monkeypatch):
    """Chunks of 16 tokens (many chunk boundaries inside each sequence), the pass over states and the fused
    forward 8 rows a program (a state's rows split over several programs), the backward's programs up to two heads
    (dB and dC too, so that a group's heads leave several shares to sum), its products of 16-bit inputs taking
    16-bit operands if they do not by default (or fp32 if they do) and the dx kernel's loops over the states 16
    states a step (several steps, the last one partial, where d_state is 40); or the settings as shipped."""
    if request.param == "chunk 16":
        _small_chunks(monkeypatch)
        monkeypatch.setattr(triton_ssd, "SSD_PASS_BLOCK_P", 8)
        monkeypatch.setattr(triton_ssd, "SSD_FUSED_BLOCK_P", 8)
        monkeypatch.setattr(triton_ssd, "SSD_BWD_HEADS", 2)
        monkeypatch.setattr(triton_ssd, "SSD_BWD_BC_HEADS", 2)
        monkeypatch.setattr(triton_ssd, "SSD_BWD_LOW", not triton_ssd.SSD_BWD_LOW)
        monkeypatch.setattr(triton_ssd, "SSD_BWD_DX_BLOCK_N", 16)
    return triton_ssd.SSD_CHUNK


def _use_forward(monkeypatch, forward: str) -> None:
    """16-bit inputs' forward: fused, whole sequences ("fused"); fused, sequences cut into segments of at least
    two fused chunks wherever they are longer ("segmented"); or the walk, then the outputs in parallel ("walk and outputs")."""
    monkeypatch.setattr(triton_ssd, "SSD_FUSED", forward != "walk and outputs")
    monkeypatch.setattr(triton_ssd, "SSD_FUSED_MIN_WALKS_PER_SM", math.inf if forward == "segmented" else 0)
    monkeypatch.setattr(triton_ssd, "SSD_FUSED_MIN_SEGMENT", 2 * triton_ssd.SSD_FUSED_CHUNK)


# The fused forward runs 16-bit inputs only: fp32 is checked on the walk and outputs, 16-bit dtypes on all three.
DTYPE_FORWARDS = [(dtype, "walk and outputs") for dtype in DTYPES] + [
    (dtype, forward) for dtype in DTYPES if dtype != torch.float32 for forward in ("fused", "segmented")
]


def _dtype_forward_id(value) -> str:
    return str(value) if isinstance(value, torch.dtype) else value.replace(" ", "_")


# (batch, length, nheads, headdim, ngroups, d_state): one token; lengths not a multiple of the chunk;
# exactly one and two chunks of 16; two groups of two heads; headdim and d_state not powers of two;
# headdim over the pass's 8 rows a program and not a multiple of them; d_state over one block of states.
SSD_SHAPES = [(1, 1, 2, 4, 1, 4), (2, 37, 4, 8, 2, 8), (1, 32, 2, 16, 1, 16), (2, 21, 3, 5, 1, 6), (2, 40, 2, 40, 1, 8),
              (1, 24, 2, 8, 1, 40)]  # fmt: skip
if not INTERPRETED:
    SSD_SHAPES += [(4, 300, 8, 64, 2, 64), (2, 1000, 24, 64, 1, 128)]


@pytest.mark.parametrize("dtype,forward", DTYPE_FORWARDS, ids=_dtype_forward_id)
@pytest.mark.parametrize("shape", SSD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_ssd_scan_matches_reference(shape, dtype, forward, with_state, chunk, monkeypatch):
    _use_forward(monkeypatch, forward)
    inputs = _ssd_inputs(*shape, dtype, seed=sum(shape), with_state=with_state)
    _check(*_scan_both(dict(dt_softplus=True, dt_limit=LIMIT)), inputs, dtype, seed=shape[1])


@pytest.mark.parametrize(
    "softplus,limit,with_d,d_per_p,with_bias",
    [(False, (0.0, float("inf")), False, False, False), (True, (0.0, float("inf")), True, True, True),
     (True, (0.2, 0.5), True, False, False)],
    ids=["bare", "D per channel", "limit both sides"],
)  # fmt: skip
def test_ssd_scan_optional_inputs(softplus, limit, with_d, d_per_p, with_bias, monkeypatch):
    _small_chunks(monkeypatch)
    x, dt, A, B, C, D, dt_bias, h0 = _ssd_inputs(2, 27, 4, 8, 2, 8, torch.float32, 7, True, d_per_p=d_per_p)
    if not softplus:
        dt = dt.abs() * 0.2  # without softplus dt must already be a positive step
    inputs = (x, dt, A, B, C, D if with_d else None, dt_bias if with_bias else None, h0)
    _check(*_scan_both(dict(dt_softplus=softplus, dt_limit=limit)), inputs, torch.float32, seed=8)


# With chunks of 16: shorter than a chunk (5, 1), exactly one (16), boundaries inside (37, 20, 33),
# and empty sequences between.
PACKED_LENGTHS = [[5, 1, 37, 16, 20], [0, 1, 19, 0, 33, 0]]
if not INTERPRETED:
    PACKED_LENGTHS += [[700, 1, 33, 128, 129, 5, 1000, 64]]


def _per_sequence_reference(pieces, kw):
    def ref(t):
        x, dt, A, B, C, D, dt_bias, h0 = t
        ys, finals = [], []
        for i, s in enumerate(pieces):
            y, h = ssd_scan_reference(
                x[:, s], dt[:, s], A, B[:, s], C[:, s], D, dt_bias, initial_state=None if h0 is None else h0[i : i + 1],
                return_final_state=True, **kw,
            )  # fmt: skip
            ys.append(y)
            finals.append(h)
        return torch.cat(ys, dim=1), torch.cat(finals, dim=0)

    return ref


@pytest.mark.parametrize("dtype,forward", DTYPE_FORWARDS, ids=_dtype_forward_id)
@pytest.mark.parametrize("lengths", PACKED_LENGTHS, ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_ssd_scan_packed_matches_per_sequence_reference(lengths, dtype, forward, with_state, monkeypatch):
    _small_chunks(monkeypatch)
    _use_forward(monkeypatch, forward)
    # The state buffers start as NaN: a row that some kernel uses before any kernel wrote it turns outputs or
    # gradients into NaN, where uninitialised memory could hide it.
    new_states = triton_ssd._Inputs.new_states
    monkeypatch.setattr(triton_ssd._Inputs, "new_states", lambda self: new_states(self).fill_(float("nan")))
    n = len(lengths)
    inputs = _ssd_inputs(1, sum(lengths), 4, 8, 2, 8, dtype, sum(lengths) + n, with_state, n_states=n)
    cu_seqlens, pieces = _packed(lengths)
    kw = dict(dt_softplus=True, dt_limit=LIMIT)

    def fast(t):
        return triton_ssd.ssd_scan_triton(
            *t[:6], dt_bias=t[6], initial_state=t[7], return_final_state=True, cu_seqlens=cu_seqlens, **kw
        )

    _check(fast, _per_sequence_reference(pieces, kw), inputs, dtype, seed=n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ssd_scan_final_state_gradient_alone(dtype, monkeypatch):
    """A loss on the final state only: the backward starts from its gradient; C and D then get zeros."""
    _small_chunks(monkeypatch)
    (rtol, atol), (grtol, gatol) = TOLERANCES[dtype]
    inputs = _ssd_inputs(2, 41, 4, 8, 2, 8, dtype, 41, with_state=True)
    leaves_ref, leaves_fast = _leaves(*inputs, dtype=torch.float32), _leaves(*inputs)
    fast, ref = _scan_both(dict(dt_softplus=True))
    (_, h), (_, h_ref) = fast(leaves_fast), ref(leaves_ref)
    assert_close("final_state", h, h_ref, rtol, atol)
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads_fast = torch.autograd.grad(h, leaves_fast, dh, allow_unused=True, materialize_grads=True)
    grads_ref = torch.autograd.grad(h_ref, leaves_ref, dh, allow_unused=True, materialize_grads=True)
    for name, g_fast, g_ref in zip(NAMES, grads_fast, grads_ref, strict=True):
        assert_close(f"grad {name}", g_fast, g_ref, grtol, gatol)


def test_ssd_scan_of_no_tokens_passes_the_state_through():
    """Zero-length sequences launch nothing: the final state is the initial state, and so is its gradient."""
    leaves = _leaves(*_ssd_inputs(2, 0, 4, 8, 2, 8, torch.float32, 5, with_state=True))
    y, h = _scan_both(dict(dt_softplus=True))[0](leaves)
    assert y.shape == (2, 0, 4, 8)
    assert_close("final_state", h, leaves[-1], 0, 0)
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    grads = torch.autograd.grad(h, leaves, dh)
    assert_close("grad initial_state", grads[-1], dh, 0, 0)
    for name, grad, leaf in zip(NAMES[:-1], grads[:-1], leaves[:-1], strict=True):
        assert grad.shape == leaf.shape and not grad.any(), f"grad {name}: not zeros of the input's shape"


def test_ssd_scan_inference_path_equals_the_autograd_one(monkeypatch):
    """Without a gradient to take the kernels run without the autograd node; same outputs, bit for bit."""
    _small_chunks(monkeypatch)
    lengths = [5, 30, 16]
    inputs = _ssd_inputs(1, sum(lengths), 4, 8, 2, 8, torch.float32, 11, True, n_states=len(lengths))
    cu_seqlens, _ = _packed(lengths)
    kw = dict(dt_softplus=True, dt_limit=LIMIT, return_final_state=True, cu_seqlens=cu_seqlens)
    x, dt, A, B, C, D, dt_bias, h0 = _leaves(*inputs)
    y, h = triton_ssd.ssd_scan_triton(x, dt, A, B, C, D, dt_bias, initial_state=h0, **kw)
    assert y.grad_fn is not None
    with torch.no_grad():
        y_inf, h_inf = triton_ssd.ssd_scan_triton(x, dt, A, B, C, D, dt_bias, initial_state=h0, **kw)
    assert torch.equal(y_inf, y.detach()), "y differs between the inference and autograd paths"
    assert torch.equal(h_inf, h.detach()), "final state differs between the inference and autograd paths"


def test_fused_forward_takes_16_bit_inputs_and_cuts_too_few_walks_into_segments(monkeypatch):
    """16-bit inputs take the fused forward, fp32 the walk and outputs. Fewer (sequences x heads x row blocks)
    walks than the bound a multiprocessor (here 10 of them) cut the sequences into segments: as long as gives
    the bound, a whole number of fused chunks, at least the minimum, and shorter than the sequences. Every
    forward gives the same y and final state."""
    monkeypatch.setattr(triton_ssd, "_multiprocessors", lambda device: 10)
    monkeypatch.setattr(triton_ssd, "SSD_FUSED_CHUNK", 4)
    x, dt, A, B, C, D, dt_bias, h0 = _ssd_inputs(2, 21, 4, 16, 2, 8, torch.bfloat16, 9, True)
    limit = (0.0, float("inf"))
    inp = triton_ssd._Inputs(x, dt, A, B, C, D, dt_bias, True, limit, h0, None)
    assert triton_ssd._fused_forward(inp)
    assert not triton_ssd._fused_forward(triton_ssd._Inputs(x.float(), dt, A, B, C, D, dt_bias, True, limit, h0, None))
    # Walks: 2 sequences x 4 heads x 2 blocks of 8 of the 16 state rows = 16, enough for 1.6 a multiprocessor.
    # Below the bound, segments for the target (at least the bound): for 4 (40 walks) segments of 2 x 21 x 8 / 40 =
    # 8.4 tokens, rounded down to chunks of 4: 8; for 8, 4.2 -> 4, or the minimum; none as long as a sequence.
    cases = [(1.6, 4, 4, None), (1.7, 4, 4, 8), (4, 1, 4, 8), (4, 4, 4, 8), (8, 4, 4, 4), (2, 8, 4, 4), (8, 4, 6, 6),
             (4, 4, 21, None)]  # fmt: skip
    for bound, target, min_segment, expected in cases:
        monkeypatch.setattr(triton_ssd, "SSD_FUSED_MIN_WALKS_PER_SM", bound)
        monkeypatch.setattr(triton_ssd, "SSD_FUSED_SEGMENT_WALKS_PER_SM", target)
        monkeypatch.setattr(triton_ssd, "SSD_FUSED_MIN_SEGMENT", min_segment)
        assert triton_ssd._segment_tokens(inp, block_p=8) == expected, (bound, target, min_segment)
    # The kernels (a GPU's products take chunks of at least 16 tokens): sequences of three segments and a bit.
    monkeypatch.setattr(triton_ssd, "SSD_FUSED_CHUNK", 16)
    x, dt, A, B, C, D, dt_bias, h0 = _ssd_inputs(2, 100, 4, 16, 2, 8, torch.bfloat16, 9, True)
    kw = dict(dt_bias=dt_bias, dt_softplus=True, initial_state=h0, return_final_state=True)
    outputs = {}
    for forward in ("fused", "segmented", "walk and outputs"):
        _use_forward(monkeypatch, forward)
        outputs[forward] = triton_ssd.ssd_scan_triton(x, dt, A, B, C, D, **kw)
    (rtol, atol), _ = TOLERANCES[torch.bfloat16]
    for forward in ("fused", "segmented"):
        assert_close(f"{forward} y", outputs[forward][0], outputs["walk and outputs"][0], rtol, atol)
        assert_close(f"{forward} final_state", outputs[forward][1], outputs["walk and outputs"][1], rtol, atol)


def test_backward_heads_a_program_divide_the_group():
    most = [1, 2, 5, 7, 8, 24, 1 << 30, 0]
    assert [triton_ssd._heads_a_program(24, m) for m in most] == [1, 2, 4, 6, 8, 24, 24, 1]
    assert [triton_ssd._heads_a_program(3, m) for m in (1, 2, 3)] == [1, 1, 3]


def test_ssd_scan_rejects_bad_inputs():
    x, dt, A, B, C, D, dt_bias, _ = _ssd_inputs(2, 5, 4, 8, 2, 8, torch.float32, 1, False)
    with pytest.raises(ValueError, match="nheads \\(4\\) must be a multiple of ngroups \\(3\\)"):
        triton_ssd.ssd_scan_triton(x, dt, A, B.new_zeros(2, 5, 3, 8), C.new_zeros(2, 5, 3, 8))
    with pytest.raises(ValueError, match="D must have shape \\(4,\\) or \\(4, 8\\), got \\(8,\\)"):
        triton_ssd.ssd_scan_triton(x, dt, A, B, C, D=x.new_zeros(8))
    with pytest.raises(ValueError, match="initial_state must have shape \\(2, 4, 8, 8\\)"):
        triton_ssd.ssd_scan_triton(x, dt, A, B, C, initial_state=x.new_zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="packed input .* batch size 1, got 2"):
        triton_ssd.ssd_scan_triton(x, dt, A, B, C, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="dt must have shape \\(2, 5, 4\\)"):
        triton_ssd.ssd_scan_triton(x, dt[:, :, :2], A, B, C)


@pytest.mark.parametrize("by_default", [True, False])
def test_dispatcher_picks_triton_for_mamba2_only_on_cuda_or_when_forced(caplog, monkeypatch, by_default):
    """CPU keeps the chunked scan by default; forcing ``triton`` reaches these kernels; CUDA picks them and packs
    Mamba-2 unless ``SSD_TRITON_BY_DEFAULT`` is off."""
    monkeypatch.setattr(ops, "_announced", set())
    monkeypatch.setattr(ops, "_forced", None)
    monkeypatch.setattr(ops, "SSD_TRITON_BY_DEFAULT", by_default)
    assert ops.packs_in_one_pass(torch.device("cuda"), 2) == by_default
    assert not ops.packs_in_one_pass(torch.device("cpu"), 2)
    with ops.use_backend("triton"):
        assert ops.packs_in_one_pass(torch.device("cuda"), 2)
    x, dt, A, B, C, D, dt_bias, _ = _ssd_inputs(1, 9, 2, 4, 1, 4, torch.float32, 2, False)
    with caplog.at_level("INFO", logger="st_mamba.ops"):
        default = ops.ssd_scan(x, dt, A, B, C, D, dt_bias, dt_softplus=True)
        with ops.use_backend("triton"):
            forced = ops.ssd_scan(x, dt, A, B, C, D, dt_bias, dt_softplus=True)
    if DEVICE == "cuda" and by_default:
        expected = "'triton'"
    else:
        expected = "'mamba_ssm'" if DEVICE == "cuda" and ops._mamba_ssm_chunk_scan is not None else "'chunked'"
    assert any(f"ssd_scan runs on the {expected} backend" in r.getMessage() for r in caplog.records)
    assert any("ssd_scan runs on the 'triton' backend" in r.getMessage() for r in caplog.records)
    assert_close("y", forced, default, 1e-5, 1e-5)


# --- the whole model ---------------------------------------------------------------------------


def _tiny_mamba2(**overrides) -> MambaBackbone:
    # headdim 16, d_inner 64: 4 heads; ngroups 2: two heads a group.
    config = tiny_config(2, **{"ngroups": 2, **overrides})
    return MambaBackbone(config).reset_parameters(seed=0).to(DEVICE)


def test_model_packed_through_triton_equals_padded_reference(monkeypatch):
    """A tiny Mamba-2 backbone: a packed batch on the Triton kernels (one pass, per-text final states)
    gives every token's hidden state, and every text's state, that the padded batch gives on the reference."""
    _small_chunks(monkeypatch)
    backbone = _tiny_mamba2()
    lengths = [7, 1, 30, 16]
    g = torch.Generator().manual_seed(1)
    padded = torch.randint(1, 400, (len(lengths), max(lengths)), generator=g).to(DEVICE)
    keep = torch.arange(max(lengths), device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    cu_seqlens, _ = _packed(lengths)
    with torch.no_grad():
        with ops.use_backend("triton"):
            packed, packed_state = backbone(padded[keep][None], return_state=True, cu_seqlens=cu_seqlens)
        with ops.use_backend("reference"):
            expected = backbone(padded)
            own_states = [backbone(padded[i : i + 1, :n], return_state=True)[1] for i, n in enumerate(lengths)]
    assert_close("hidden", packed[0], expected[keep], 1e-4, 1e-4)
    for i, own in enumerate(own_states):
        for layer, (theirs, mine) in enumerate(zip(packed_state, own, strict=True)):
            assert_close(f"text {i} layer {layer} ssm state", theirs.ssm[i : i + 1], mine.ssm, 1e-4, 1e-4)


def test_model_streamed_in_chunks_equals_one_pass(monkeypatch):
    """A long text fed in three pieces, the state carried between them, equals one pass (both on Triton)."""
    _small_chunks(monkeypatch)
    backbone = _tiny_mamba2()
    ids = torch.randint(1, 400, (2, 45), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad(), ops.use_backend("triton"):
        whole = backbone(ids)
        state, pieces = None, []
        for part in ids.split([13, 20, 12], dim=1):
            out, state = backbone(part, state=state, return_state=True)
            pieces.append(out)
    assert_close("hidden", torch.cat(pieces, dim=1), whole, 1e-4, 1e-4)


def test_model_in_bf16_on_the_fused_forward_packed_and_streamed(monkeypatch):
    """A tiny Mamba-2 backbone in bf16 on the fused forward, whole and segmented: a packed batch equals the padded
    one on the walk and outputs, and a text streamed in three pieces (state carried) equals one pass, within bf16's
    tolerance."""
    _small_chunks(monkeypatch)
    backbone = _tiny_mamba2().to(torch.bfloat16)
    lengths = [7, 1, 30, 16]
    g = torch.Generator().manual_seed(5)
    padded = torch.randint(1, 400, (len(lengths), max(lengths)), generator=g).to(DEVICE)
    keep = torch.arange(max(lengths), device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    cu_seqlens, _ = _packed(lengths)
    (rtol, atol), _ = TOLERANCES[torch.bfloat16]
    with torch.no_grad(), ops.use_backend("triton"):
        _use_forward(monkeypatch, "walk and outputs")
        expected = backbone(padded)
        for forward in ("fused", "segmented"):
            _use_forward(monkeypatch, forward)
            packed = backbone(padded[keep][None], cu_seqlens=cu_seqlens)
            whole = backbone(padded)
            state, pieces = None, []
            for part in padded.split([13, 10, 7], dim=1):
                out, state = backbone(part, state=state, return_state=True)
                pieces.append(out)
            assert_close(f"{forward}: packed hidden", packed[0], expected[keep], rtol, atol)
            assert_close(f"{forward}: streamed hidden", torch.cat(pieces, dim=1), whole, rtol, atol)


@pytest.mark.parametrize(
    "checkpointing,norm_groups", [(False, 1), (True, 1), (False, 2)], ids=["stored", "checkpointed", "norm groups"]
)
def test_model_gradients_through_triton_equal_chunked(checkpointing, norm_groups, monkeypatch, caplog):
    """Training: the output and every parameter's gradient of a tiny Mamba-2 backbone, Triton scan and gated
    norm (with or without gradient checkpointing, which re-runs each layer's forward in the backward; the norm
    over one group or two) against PyTorch's chunked scan and reference norm."""
    _small_chunks(monkeypatch)
    monkeypatch.setattr(ops, "_announced", set())
    ids = torch.randint(1, 400, (2, 23), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    grads, outputs = {}, {}
    for backend in ("triton", "chunked"):
        backbone = _tiny_mamba2(norm_groups=norm_groups)
        backbone.gradient_checkpointing = checkpointing and backend == "triton"
        with ops.use_backend(backend), caplog.at_level("INFO", logger="st_mamba.ops"):
            outputs[backend] = backbone(ids)
            outputs[backend].float().pow(2).mean().backward()
        grads[backend] = {name: p.grad for name, p in backbone.named_parameters()}
    messages = [r.getMessage() for r in caplog.records]
    assert any("gated_rms_norm runs on the 'triton' backend" in m for m in messages)
    assert any("gated_rms_norm runs on the 'torch' backend" in m for m in messages)
    assert_close("hidden", outputs["triton"], outputs["chunked"], 1e-4, 1e-4)
    for name, g_ref in grads["chunked"].items():
        assert_close(f"grad {name}", grads["triton"][name], g_ref, 1e-4, 1e-4)


@pytest.mark.parametrize("n_groups", [1, 2])
def test_model_on_triton_equals_transformers_mamba2(tmp_path, n_groups):
    """transformers' Mamba2Model and our backbone loaded from its checkpoint, ours on the Triton kernels (SSD scan,
    convolution, gated norm): the same hidden states (fp32)."""
    from st_mamba import load_backbone
    from tests.test_checkpoints import VOCAB, hf_mamba2

    theirs = hf_mamba2(seed=3, n_groups=n_groups)
    theirs.save_pretrained(tmp_path)
    ours, _ = load_backbone(tmp_path)
    theirs, ours = theirs.to(DEVICE), ours.to(DEVICE)
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad(), ops.use_backend("triton"):
        actual = ours(ids)
    with torch.no_grad():
        expected = theirs(input_ids=ids).last_hidden_state
    assert_close("hidden", actual, expected, 1e-4, 1e-4)
