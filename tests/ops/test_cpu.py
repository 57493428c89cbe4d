"""The compiled CPU kernels against the sequential references, and the dispatcher's choice of them."""

from __future__ import annotations

import logging
import platform
import subprocess
import sys

import pytest
import torch

from st_mamba import ops
from st_mamba.ops import cpu
from st_mamba.ops.reference import causal_conv1d_reference, selective_scan_reference
from tests.ops.test_chunked import assert_close

pytestmark = pytest.mark.skipif(
    not cpu.available(), reason="the compiled CPU kernels did not build here (no C compiler?)"
)


def _inputs(batch: int, length: int, d_inner: int, d_state: int, seed: int, strided: bool = False) -> dict:
    """Random scan inputs; with ``strided``, x/z and B/C are views of one projection, as in ``Mamba1Mixer``."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        x, z = torch.randn(batch, length, 2 * d_inner, generator=g).split(d_inner, dim=-1)
        _, B, C = torch.randn(batch, length, 3 + 2 * d_state, generator=g).split([3, d_state, d_state], dim=-1)
    else:
        x, z = torch.randn(batch, length, d_inner, generator=g), torch.randn(batch, length, d_inner, generator=g)
        B, C = torch.randn(batch, length, d_state, generator=g), torch.randn(batch, length, d_state, generator=g)
    return dict(
        x=x, dt=torch.randn(batch, length, d_inner, generator=g) - 1.0,
        A=-torch.rand(d_inner, d_state, generator=g) * 4, B=B, C=C,
        D=torch.randn(d_inner, generator=g), z=z, dt_bias=torch.randn(d_inner, generator=g),
        initial_state=torch.randn(batch, d_inner, d_state, generator=g),
    )  # fmt: skip


def _sequences_in_bf16(inputs: dict) -> dict:
    """The inputs with what runs along the sequence (x, dt, z, B, C) in bf16, as a bf16 model passes them."""
    return {k: v.to(torch.bfloat16) if k in ("x", "dt", "z", "B", "C") else v for k, v in inputs.items()}


def _check(inputs: dict, dt_softplus: bool = True) -> None:
    kw = dict(dt_softplus=dt_softplus, return_final_state=True)
    y, h = cpu.selective_scan_cpu(**inputs, **kw)
    y_ref, h_ref = selective_scan_reference(**inputs, **kw)
    assert_close("y", y, y_ref)
    assert_close("final_state", h, h_ref)


# N = 16 takes the kernel's unrolled path, other N the generic one; d_inner 40 and 7 leave a partial
# block of channels; lengths 1, odd and 257 are multiples of nothing in particular. The scan walks
# tiles of 64 tokens in groups of 8 blocks of channels: lengths 64, 130 and 200 end on and across
# tiles, d_inner 150 and 300 make more than one group (the last one partial, with a partial block).
@pytest.mark.parametrize(
    "batch,length,d_inner,d_state",
    [(1, 1, 16, 16), (2, 37, 40, 16), (2, 130, 48, 16), (2, 19, 7, 3), (1, 64, 33, 5), (2, 23, 20, 64),
     (2, 200, 150, 16), (1, 130, 300, 5)],
)  # fmt: skip
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_matches_reference(batch, length, d_inner, d_state, strided):
    _check(_inputs(batch, length, d_inner, d_state, seed=batch * 1000 + length, strided=strided))


@pytest.mark.parametrize("missing", ["D", "z", "dt_bias", "initial_state"])
def test_optional_inputs_can_be_left_out(missing):
    inputs = _inputs(2, 29, 24, 16, seed=11, strided=True)
    inputs[missing] = None
    _check(inputs)


def test_without_softplus_and_without_final_state():
    inputs = _inputs(2, 31, 20, 16, seed=12)
    _check({**inputs, "dt": inputs["dt"].abs(), "dt_bias": inputs["dt_bias"].abs()}, dt_softplus=False)
    y = cpu.selective_scan_cpu(**inputs, dt_softplus=True)
    assert_close("y", y, selective_scan_reference(**inputs, dt_softplus=True))


def test_softplus_keeps_precision_for_small_dt():
    """dt + dt_bias around -7 (softplus ~ 1e-3, mamba's smallest initial step) must not lose digits."""
    inputs = _inputs(1, 50, 32, 16, seed=13)
    inputs["dt"] = inputs["dt"] * 0.1 - 7.0
    inputs["dt_bias"] = None
    _check(inputs)


def test_slow_decays_carry_no_bias_over_long_sequences():
    """exp(dt * A) within 1e-5 of 1 (small dt, small |A|): a per-token bias in exp would compound."""
    inputs = _inputs(1, 2000, 16, 16, seed=19)
    inputs["A"] = inputs["A"] * 0.0125  # A in (-0.05, 0]
    inputs["dt"] = inputs["dt"] * 0.1 - 6.0  # softplus(dt + dt_bias) ~ 1e-3 .. 1e-2
    inputs["initial_state"] = None
    _check(inputs)


def test_extreme_decays_stay_finite():
    """Large steps drive exp(dt * A) far below the float range; the state must simply be forgotten."""
    inputs = _inputs(1, 20, 16, 16, seed=14)
    inputs["dt"] = inputs["dt"] * 20 + 60.0  # softplus(dt) up to ~100, dt * A down to ~ -400
    _check(inputs)


def test_wrong_shapes_are_refused_before_the_kernel_reads_them():
    inputs = _inputs(2, 9, 16, 16, seed=20)
    with pytest.raises(ValueError, match=r"A: expected a CPU tensor of shape \(16, 16\)"):
        cpu.selective_scan_cpu(**{**inputs, "A": inputs["A"][:8]})
    with pytest.raises(ValueError, match="initial_state"):
        cpu.selective_scan_cpu(**{**inputs, "initial_state": inputs["initial_state"][:1]})
    with pytest.raises(ValueError, match="weight"):
        cpu.causal_conv1d_cpu(inputs["x"], torch.randn(8, 4))


def test_half_precision_inputs_are_computed_in_fp32():
    inputs = _inputs(2, 17, 24, 16, seed=15)
    low = _sequences_in_bf16(inputs)
    y = cpu.selective_scan_cpu(**low, dt_softplus=True)
    assert y.dtype == torch.bfloat16
    assert_close("y", y.float(), selective_scan_reference(**low, dt_softplus=True).float())


@pytest.mark.parametrize("d_inner,d_state", [(24, 16), (7, 3)])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_bf16_tensors_are_read_and_written_as_they_are(d_inner, d_state, strided):
    """bf16 in, bf16 out, with fp32 arithmetic: exactly the fp32 kernel on the widened inputs, rounded once."""
    inputs = _inputs(2, 29, d_inner, d_state, seed=19, strided=strided)
    low = _sequences_in_bf16(inputs)
    widened = {k: v.float() for k, v in low.items()}
    y, h = cpu.selective_scan_cpu(**low, dt_softplus=True, return_final_state=True)
    y32, h32 = cpu.selective_scan_cpu(**widened, dt_softplus=True, return_final_state=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert torch.equal(y, y32.to(torch.bfloat16)) and torch.equal(h, h32)
    x = low["x"]
    weight, bias = torch.randn(d_inner, 4), torch.randn(d_inner)
    state = torch.randn(2, 3, d_inner).to(torch.bfloat16)  # the last inputs of a previous piece, in x's dtype
    conv = cpu.causal_conv1d_cpu(x, weight, bias, initial_state=state)
    assert conv.dtype == torch.bfloat16
    widened = cpu.causal_conv1d_cpu(x.float(), weight, bias, initial_state=state.float())
    assert torch.equal(conv, widened.to(torch.bfloat16))
    mixed = cpu.causal_conv1d_cpu(x, weight, bias, initial_state=state.float() + 1e-3)  # an fp32 state: upcast path
    expected = cpu.causal_conv1d_cpu(x.float(), weight, bias, initial_state=state.float() + 1e-3)
    assert torch.equal(mixed, expected.to(torch.bfloat16))


def test_bf16_results_round_to_nearest_even_as_torch_does():
    """Sums that fall exactly between two bf16 values (ties), past the largest bf16, NaN and infinities."""
    tie = 2.0**-8  # 1 + 2^-8 lies halfway between 1 and the next bf16 above it, 1 + 2^-7
    cases = [(1.0, tie), (1.0, 3 * tie), (1.0, 0.3), (3.38e38, 1.0e36), (float("nan"), 0.0), (float("inf"), 1.0),
             (-float("inf"), 1.0), (-2.0, -tie)]  # fmt: skip
    cases = cases * 3  # 24 channels: one full vector of 16 and a partial one
    x = torch.tensor([value for value, _ in cases]).view(1, 1, -1)
    bias = torch.tensor([offset for _, offset in cases])
    y = cpu.causal_conv1d_cpu(x.to(torch.bfloat16), torch.ones(len(cases), 1), bias, activation=None)
    expected = (x + bias).to(torch.bfloat16)  # x is exact in bf16; the sum is rounded once
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y[~y.isnan()], expected[~expected.isnan()])


def test_nan_propagates():
    inputs = _inputs(1, 10, 16, 16, seed=16)
    inputs["dt"][0, 3, 5] = float("nan")
    y = cpu.selective_scan_cpu(**inputs, dt_softplus=True)
    assert torch.isnan(y[0, 3:, 5]).all() and not torch.isnan(y[0, :3]).any()


def test_chunks_with_carried_state_equal_one_pass():
    inputs = _inputs(2, 90, 24, 16, seed=17)
    whole = cpu.selective_scan_cpu(**inputs, dt_softplus=True)
    state, parts = inputs["initial_state"], []
    for start in range(0, 90, 25):
        part = {k: v[:, start : start + 25] if k in ("x", "dt", "z", "B", "C") else v for k, v in inputs.items()}
        y, state = cpu.selective_scan_cpu(**{**part, "initial_state": state}, dt_softplus=True, return_final_state=True)
        parts.append(y)
    assert_close("y", torch.cat(parts, dim=1), whole)


def test_without_a_compiler_it_reports_unavailable_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "_find_compiler", lambda: None)
    cpu._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu.__name__):
            assert not cpu.available() and not cpu.available()
    finally:
        cpu._library.cache_clear()
    assert len(caplog.records) == 1 and "pure-PyTorch scan and convolution are used" in caplog.text


def test_build_writes_one_library_to_the_cache_and_reuses_it(monkeypatch, tmp_path):
    monkeypatch.setenv("ST_MAMBA_CACHE", str(tmp_path))
    library = cpu._build(cpu._find_compiler())
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # and no partial file left behind
    modified = library.stat().st_mtime_ns
    assert cpu._build(cpu._find_compiler()) == library and library.stat().st_mtime_ns == modified


@pytest.mark.parametrize("length", [1, 2, 3, 17, 100])
@pytest.mark.parametrize("channels,width", [(16, 4), (40, 4), (6, 4), (20, 2), (33, 5)])
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
def test_causal_conv1d_matches_reference(length, channels, width, with_state):
    g = torch.Generator().manual_seed(length * 100 + channels)
    x = torch.randn(2, length, 2 * channels, generator=g)[..., :channels]  # strided, like x of the in_proj split
    weight, bias = torch.randn(channels, width, generator=g), torch.randn(channels, generator=g)
    state = torch.randn(2, width - 1, channels, generator=g) if with_state else None
    y, s = cpu.causal_conv1d_cpu(x, weight, bias, state, activation="silu", return_final_state=True)
    y_ref, s_ref = causal_conv1d_reference(x, weight, bias, state, activation="silu", return_final_state=True)
    assert_close("y", y, y_ref)
    assert_close("final_state", s, s_ref)


def test_causal_conv1d_without_bias_or_activation():
    g = torch.Generator().manual_seed(5)
    x, weight = torch.randn(3, 21, 24, generator=g), torch.randn(24, 4, generator=g)
    assert_close(
        "y", cpu.causal_conv1d_cpu(x, weight, activation=None), causal_conv1d_reference(x, weight, activation=None)
    )


def _packed(lengths: list[int]) -> torch.Tensor:
    return torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


# Empty sequences, one token, spans of 32 crossed, and a sequence far longer than the others.
@pytest.mark.parametrize("lengths", [[5, 1, 17, 40, 3], [0, 33, 0, 2], [1], [300, 4, 4]], ids=str)
@pytest.mark.parametrize("d_state", [16, 5])
def test_packed_scan_equals_each_sequence_alone(lengths, d_state):
    """A packed batch: every sequence starts from its own state and leaves its own; none sees another."""
    d_inner = 140  # two groups of blocks, the second with a partial block
    inputs = _inputs(1, sum(lengths), d_inner, d_state, seed=len(lengths) + d_state, strided=True)
    inputs["initial_state"] = torch.randn(len(lengths), d_inner, d_state, generator=torch.Generator().manual_seed(1))
    cu_seqlens = _packed(lengths)
    y, h = cpu.selective_scan_cpu(**inputs, dt_softplus=True, return_final_state=True, cu_seqlens=cu_seqlens)
    bounds = cu_seqlens.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        alone = {k: v[:, start:end] if k in ("x", "dt", "z", "B", "C") else v for k, v in inputs.items()}
        alone["initial_state"] = inputs["initial_state"][i : i + 1]
        y_ref, h_ref = selective_scan_reference(**alone, dt_softplus=True, return_final_state=True)
        assert_close(f"y of sequence {i}", y[:, start:end], y_ref)
        assert_close(f"final_state of sequence {i}", h[i : i + 1], h_ref)


@pytest.mark.parametrize("lengths", [[5, 1, 17, 40, 3], [0, 33, 0, 2], [1], [300, 4, 4]], ids=str)
@pytest.mark.parametrize("width", [4, 3])
def test_packed_conv_equals_each_sequence_alone(lengths, width):
    g = torch.Generator().manual_seed(sum(lengths) + width)
    x = torch.randn(1, sum(lengths), 80, generator=g)[..., :40]  # strided, like x of the in_proj split
    weight, bias = torch.randn(40, width, generator=g), torch.randn(40, generator=g)
    cu_seqlens = _packed(lengths)
    y = cpu.causal_conv1d_cpu(x, weight, bias, cu_seqlens=cu_seqlens)
    bounds = cu_seqlens.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        assert_close(f"y of sequence {i}", y[:, start:end], causal_conv1d_reference(x[:, start:end], weight, bias))


def test_packed_bounds_are_checked_before_the_kernels_read_them():
    x = torch.randn(1, 10, 16)
    for bad in ([0, 4, 11], [1, 10], [0, 6, 4, 10], [0]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            cpu.causal_conv1d_cpu(x, torch.randn(16, 4), cu_seqlens=torch.tensor(bad, dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):  # packed batches have one row
        cpu.causal_conv1d_cpu(torch.randn(2, 5, 16), torch.randn(16, 4), cu_seqlens=_packed([5, 5]))
    with pytest.raises(ValueError, match="no initial_state"):
        cpu.causal_conv1d_cpu(x, torch.randn(16, 4), torch.zeros(16), torch.zeros(2, 3, 16), cu_seqlens=_packed([4, 6]))


def test_one_thread_holds_only_inside_the_block_and_only_on_this_thread():
    import threading

    before = torch.get_num_threads()
    seen = {}
    with cpu.one_thread():
        seen["inside"] = torch.get_num_threads()
        other = threading.Thread(target=lambda: seen.setdefault("other thread", torch.get_num_threads()))
        other.start()
        other.join()
    assert seen["inside"] == 1
    assert torch.get_num_threads() == before
    assert seen["other thread"] == before


def test_small_batches_on_one_thread_equal_the_parallel_forward(monkeypatch):
    """The backbone runs a query's batch on the calling thread; the result is the same as with every thread."""
    from st_mamba import MambaBackbone, MambaConfig, modeling

    model = MambaBackbone(MambaConfig(d_model=24, n_layer=2, vocab_size=50, dt_rank=4)).reset_parameters(seed=0)
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(2))
    entered = []
    real_one_thread = cpu.one_thread
    monkeypatch.setattr(cpu, "one_thread", lambda: entered.append(1) or real_one_thread())
    with torch.no_grad():
        alone = model(ids)
        monkeypatch.setattr(modeling, "ONE_THREAD_MAX_WORK", 0)
        parallel = model(ids)
    assert entered == [1]
    assert_close("hidden", alone, parallel)


def _one_call(monkeypatch, on: bool) -> None:
    """Small batches run the whole backbone in one C call (tests/ops/test_cpu_one_call.py); off, layer by layer."""
    from st_mamba import modeling

    if not on:
        monkeypatch.setattr(modeling, "ONE_CALL_MAX_WORK", -1)


@pytest.mark.parametrize("one_call", [False, True], ids=["layer by layer", "one call"])
@pytest.mark.parametrize("d_state", [16, 8])
def test_backbone_on_the_kernels_matches_the_reference(d_state, one_call, monkeypatch):
    """The mixer's strided views (x/z of in_proj, dt/B/C of x_proj) reach the kernels as they are."""
    from st_mamba import MambaBackbone, MambaConfig

    _one_call(monkeypatch, one_call)

    config = MambaConfig(d_model=24, n_layer=2, vocab_size=50, d_state=d_state, dt_rank=4)
    model = MambaBackbone(config).reset_parameters(seed=0).eval()
    ids = torch.randint(0, 50, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids)
        with ops.use_backend("reference"):
            expected = model(ids)
    assert_close("hidden", hidden, expected)


@pytest.mark.parametrize("one_call", [False, True], ids=["layer by layer", "one call"])
def test_packed_backbone_on_the_kernels_matches_the_reference(one_call, monkeypatch):
    from st_mamba import MambaBackbone, MambaConfig

    _one_call(monkeypatch, one_call)

    config = MambaConfig(d_model=24, n_layer=2, vocab_size=50, dt_rank=4)
    model = MambaBackbone(config).reset_parameters(seed=0).eval()
    lengths = [7, 1, 30, 12]
    ids = torch.randint(0, 50, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = model(ids, cu_seqlens=_packed(lengths))
        with ops.use_backend("reference"):
            expected = model(ids, cu_seqlens=_packed(lengths))
    assert_close("hidden", hidden, expected)


@pytest.mark.parametrize("one_call", [False, True], ids=["layer by layer", "one call"])
def test_weights_changed_in_place_are_seen_at_the_next_forward(one_call, monkeypatch):
    """Inference keeps -exp(A_log), packed projections and conv taps per weight; an update replaces them."""
    from st_mamba import MambaBackbone, MambaConfig

    _one_call(monkeypatch, one_call)

    model = MambaBackbone(MambaConfig(d_model=24, n_layer=1, vocab_size=50, dt_rank=4)).reset_parameters(seed=0)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(ids)  # fills the caches
        mixer = model.layers[0].mixer
        for weight in (mixer.A_log, mixer.in_proj.weight, mixer.conv1d.weight, mixer.D):
            weight.mul_(0.5)
        hidden = model(ids)
        with ops.use_backend("reference"):
            expected = model(ids)
    assert_close("hidden", hidden, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_onednn_matches_f_linear(with_bias, dtype):
    if not cpu.onednn_supports(dtype):
        pytest.skip(f"oneDNN does not run {dtype} on this CPU (or this PyTorch build has no oneDNN)")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 37, 80, generator=g)[..., :48].to(dtype)  # strided, like dt of the x_proj split
    weight = torch.randn(96, 48, generator=g).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype) if with_bias else None
    y = cpu.linear_onednn(x, weight, bias)
    assert y.dtype == dtype
    assert_close("y", y, torch.nn.functional.linear(x, weight, bias))


def test_bf16_projections_use_onednn_only_where_the_cpu_runs_bf16(monkeypatch):
    """oneDNN refuses bf16 without AVX-512 BW/VL/DQ or AVX-NE-CONVERT: there the projection stays F.linear."""
    monkeypatch.setattr(ops, "_forced", None)
    g = torch.Generator().manual_seed(8)
    x, weight = torch.randn(3, 48, generator=g).bfloat16(), torch.randn(96, 48, generator=g).bfloat16()
    expected = torch.nn.functional.linear(x, weight)
    for supported in (False, True):
        if supported and not cpu.onednn_supports(torch.bfloat16):
            continue
        monkeypatch.setattr(ops, "_announced", set())
        monkeypatch.setattr(cpu, "onednn_supports", lambda dtype, supported=supported: supported)
        with torch.no_grad():
            assert_close("y", ops.linear(x, weight), expected)
        assert {op: backend for op, backend, _ in ops._announced} == {"linear": "cpu" if supported else "torch"}


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_with_residual_adds_it(with_bias):
    """On CPU the residual is a plain add after the projection (oneDNN or F.linear)."""
    g = torch.Generator().manual_seed(7)
    x, residual, weight = torch.randn(2, 5, 48, generator=g), torch.randn(2, 5, 96, generator=g), torch.randn(96, 48, generator=g)  # fmt: skip
    bias = torch.randn(96, generator=g) if with_bias else None
    expected = residual + torch.nn.functional.linear(x, weight, bias)
    with torch.no_grad():
        assert_close("y", ops.linear(x, weight, bias, residual), expected)


_REFAULTS = """
import resource, torch
from st_mamba.ops import cpu
tuned = cpu.keep_freed_memory() if {tune} else False
for _ in range(2):
    torch.ones(12 << 20)  # 48 MiB, above glibc's largest automatic mmap threshold (32 MiB); freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.ones(12 << 20)
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_keep_freed_memory_spares_large_tensors_their_page_faults():
    def refaults(tune: bool) -> tuple[str, int]:
        code = _REFAULTS.format(tune=tune)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        tuned, faults = out.stdout.split()
        return tuned, int(faults)

    pages = (48 << 20) // 4096
    default_faults = refaults(False)[1]
    assert default_faults >= 4 * pages  # mapped afresh, and faulted in, every time
    tuned, faults = refaults(True)
    # Mostly reused; one tensor's worth of faults was seen once in CI (12,288 of 49,152), so at most half remain.
    assert tuned == "True" and faults <= default_faults // 2


def _backends_used(requires_grad: bool) -> dict[str, str]:
    """Run each CPU operation through the dispatcher once; report the backend each announced."""
    ops._announced.clear()
    inputs = _inputs(1, 8, 16, 16, seed=18)
    x = inputs.pop("x").clone().requires_grad_(requires_grad)
    ops.selective_scan(x, **inputs, dt_softplus=True)
    ops.causal_conv1d(x, torch.randn(16, 4))
    ops.linear(x, torch.randn(4, 16))
    return {op: backend for op, backend, _ in ops._announced}


def test_dispatcher_uses_the_cpu_paths_only_without_gradients(monkeypatch):
    monkeypatch.setattr(ops, "_forced", None)
    monkeypatch.setattr(ops, "_announced", set())
    fast = {"selective_scan": "cpu", "causal_conv1d": "cpu", "linear": "cpu" if cpu.onednn_available() else "torch"}
    with torch.no_grad():
        assert _backends_used(requires_grad=True) == fast
    assert _backends_used(requires_grad=False) == fast
    assert _backends_used(requires_grad=True) == {
        "selective_scan": "chunked",
        "causal_conv1d": "chunked",
        "linear": "torch",
    }


def _cpu_has(flag: str) -> bool:
    try:
        return f" {flag} " in f" {open('/proc/cpuinfo').read().replace(chr(10), ' ')} "
    except OSError:
        return False


# Built for narrower targets, the kernels use narrower vectors (vector_math.h: 8 lanes with AVX2, 4 with
# SSE2): the results must not change. Each target builds its own library (about 15 s).
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 targets")
@pytest.mark.parametrize("march,needs", [("x86-64-v3", "avx2"), ("x86-64", "sse2")])
def test_kernels_built_for_narrower_vectors_match_the_reference(march, needs, monkeypatch, tmp_path):
    if not _cpu_has(needs):
        pytest.skip(f"this CPU has no {needs}")
    monkeypatch.setenv(cpu.MARCH_ENV, march)
    monkeypatch.setenv("ST_MAMBA_CACHE", str(tmp_path))
    cpu._library.cache_clear()
    try:
        assert cpu.available()
        assert f"-march={march}" in cpu.build_flags()
        for shape in [(2, 37, 40, 16), (2, 19, 7, 3), (1, 64, 33, 5)]:  # full and partial vectors, N = 16 and not
            _check(_inputs(*shape, seed=sum(shape)))
            _check(_sequences_in_bf16(_inputs(*shape, seed=1)))
        g = torch.Generator().manual_seed(3)
        x, weight, bias = (torch.randn(*shape, generator=g) for shape in [(2, 50, 21), (21, 4), (21,)])
        assert_close("conv", cpu.causal_conv1d_cpu(x, weight, bias), causal_conv1d_reference(x, weight, bias))
        from st_mamba import MambaBackbone, MambaConfig

        config = MambaConfig(d_model=40, n_layer=2, vocab_size=50, d_state=5, dt_rank=5)
        model = MambaBackbone(config).reset_parameters(seed=0).eval()
        ids = torch.randint(0, 50, (2, 13), generator=g)
        with torch.no_grad():
            with ops.use_backend("reference"):
                expected = model(ids)
            assert_close("one-call forward", cpu.mamba1_forward_small(model, ids), expected)
            hidden = cpu.mamba1_forward_small(model.to(torch.bfloat16), ids)
        assert_close("one-call forward in bf16", hidden.float(), expected, rtol=0.05, atol=0.05)
    finally:
        cpu._library.cache_clear()


def test_release_threads_ends_the_calling_threads_openmp_workers(monkeypatch):
    """After a parallel region a thread keeps torch.get_num_threads() - 1 workers; releasing ends them."""
    import os
    import threading
    import time

    if torch.get_num_threads() < 2 or not os.path.isdir("/proc/self/task") or cpu._omp_pause() is None:
        pytest.skip("needs Linux, PyTorch with libgomp (OpenMP 5.0) and at least two PyTorch threads")

    def thread_count(expected: int | None = None) -> int:
        for _ in range(200):  # released workers leave asynchronously
            count = len(os.listdir("/proc/self/task"))
            if expected is None or count == expected:
                break
            time.sleep(0.005)
        return count

    seen = {}
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))

    def work() -> None:
        seen["before"] = thread_count()
        torch.mm(a, a)  # the first parallel region of this thread starts its workers
        seen["working"] = thread_count()
        seen["released"] = cpu.release_threads()
        seen["after"] = thread_count(seen["before"])
        seen["product"] = torch.mm(a, a)  # new workers, same result

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen["working"] == seen["before"] + torch.get_num_threads() - 1
    assert seen["released"] is True
    assert seen["after"] == seen["before"]
    assert_close("product", seen["product"], a.double().mm(a.double()).float())
    # without a libgomp of OpenMP 5.0 in the process there is nothing to release
    monkeypatch.setattr(cpu, "_omp_pause", lambda: None)
    assert cpu.release_threads() is False
