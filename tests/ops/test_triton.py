"""The Triton kernels against the sequential references: outputs and every gradient, by dtype.

The reference runs on float32 copies of the inputs (its gradients are then exact to float32, where
autograd would otherwise sum a bf16 weight's per-token gradients in bf16), and the Triton outputs,
in the input dtype, are held to a tolerance that depends on that dtype.

Runs on a CUDA GPU. Without one it is skipped, unless ``TRITON_INTERPRET=1`` is set, in which case
the same kernels run on CPU tensors through Triton's interpreter (slow; small shapes only).
``scripts/test.sh`` (what CI runs) sets it on a machine without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from st_mamba.ops import triton as triton_ops  # noqa: E402
from st_mamba.ops.reference import causal_conv1d_reference, selective_scan_reference  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if torch.cuda.is_available() and not INTERPRETED:
    DEVICE = "cuda"
elif INTERPRETED:
    DEVICE = "cpu"
    from triton.runtime import interpreter as _interpreter

    _patch_tensor = _interpreter._patch_lang_tensor

    def _patch_tensor_for_numpy2(tensor, scope):
        # The interpreter's scalars are one-element arrays, which numpy >= 2.4 no longer turns into
        # Python ints (``range(pid, ...)`` in a kernel needs that).
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interpreter._patch_lang_tensor = _patch_tensor_for_numpy2
else:
    pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1)", allow_module_level=True)

pytestmark = pytest.mark.cuda

# (rtol, atol relative to the tensor's largest entry) for outputs and for gradients.
TOLERANCES = {
    torch.float32: ((1e-5, 1e-5), (1e-4, 1e-4)),
    torch.bfloat16: ((1e-2, 1e-2), (2e-2, 2e-2)),
    torch.float16: ((5e-3, 5e-3), (1e-2, 1e-2)),
}
DTYPES = [torch.float32, torch.bfloat16] if INTERPRETED else [torch.float32, torch.bfloat16, torch.float16]


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """Compare in float64 and name the tensor that differs (with its worst error)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if not actual.numel():
        return
    error = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol * scale), f"{name}: max abs error {error:.3g}"


def _leaves(*tensors, dtype=None):
    """Fresh leaf copies (cast to ``dtype`` if given) that collect gradients."""
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in tensors]


def _check_dtypes(outputs, output_dtypes, grads, inputs):
    for out, dtype in zip(outputs, output_dtypes, strict=True):
        assert out.dtype == dtype, f"output dtype {out.dtype} != {dtype}"
    for grad, leaf in zip(grads, [t for t in inputs if t is not None], strict=True):
        assert grad.dtype == leaf.dtype, f"gradient dtype {grad.dtype} != input dtype {leaf.dtype}"


def _grads(outputs, inputs, seed):
    """Backpropagate a fixed random cotangent through every output; return all input gradients."""
    generator = torch.Generator().manual_seed(seed)
    total = sum((out.float() * torch.randn(out.shape, generator=generator).to(out.device)).sum() for out in outputs)
    return torch.autograd.grad(total, [t for t in inputs if t is not None])


def _scan_inputs(batch, length, d_inner, d_state, dtype, seed, with_state, n_states=None):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    x = rand(batch, length, d_inner).to(dtype)
    dt = rand(batch, length, d_inner).to(dtype)
    A = -(torch.rand(d_inner, d_state, generator=g) * 4 + 0.1).to(DEVICE)
    B, C = rand(batch, length, d_state).to(dtype), rand(batch, length, d_state).to(dtype)
    D, dt_bias = rand(d_inner), rand(d_inner, scale=0.5)
    z = rand(batch, length, d_inner).to(dtype)
    h0 = rand(n_states or batch, d_inner, d_state) if with_state else None
    return x, dt, A, B, C, D, z, dt_bias, h0


SCAN_NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]


def _check_scan(fast_fn, ref_fn, inputs, dtype, seed, names=SCAN_NAMES):
    """Outputs, final state and the gradient of every present input (``names``, in order), against the reference
    run on fresh fp32 leaves."""
    (rtol, atol), (grtol, gatol) = TOLERANCES[dtype]
    leaves_ref, leaves_fast = _leaves(*inputs, dtype=torch.float32), _leaves(*inputs)
    y_ref, h_ref = ref_fn(leaves_ref)
    y, h = fast_fn(leaves_fast)
    assert_close("y", y, y_ref, rtol, atol)
    assert_close("final_state", h, h_ref, rtol, atol)
    present = [n for n, t in zip(names, leaves_ref, strict=True) if t is not None]
    grads_fast = _grads([y, h], leaves_fast, seed)
    _check_dtypes([y, h], [dtype, torch.float32], grads_fast, leaves_fast)
    for name, g_fast, g_ref in zip(present, grads_fast, _grads([y_ref, h_ref], leaves_ref, seed), strict=True):
        assert_close(f"grad {name}", g_fast, g_ref, grtol, gatol)


def _check_padded_scan(inputs, dtype, seed):
    """The Triton scan of a (B, L) batch (softplus, initial state as given, final state) against the reference."""
    kw = dict(dt_softplus=True, return_final_state=True)

    def ref(t):
        return selective_scan_reference(*t[:-1], initial_state=t[-1], **kw)

    def fast(t):
        return triton_ops.selective_scan_triton(*t[:-1], initial_state=t[-1], **kw)

    _check_scan(fast, ref, inputs, dtype, seed)


SCAN_SHAPES = [(1, 1, 8, 4), (2, 37, 24, 5), (3, 64, 16, 16), (1, 50, 40, 3)]
if not INTERPRETED:
    SCAN_SHAPES += [(4, 300, 96, 16), (2, 1000, 64, 16)]


@pytest.fixture(params=["whole", "chunked", "chunk starts"])
def chunking(request, monkeypatch):
    """Also run with sequences cut into 16-token chunks, so that the chunks' start states are exercised:
    folded in the forward's phase 2 ("chunked"), or from _scan_chunk_starts_kernel ("chunk starts")."""
    if request.param != "whole":
        monkeypatch.setattr(triton_ops, "SCAN_MIN_PROGRAMS", 10**9)
        monkeypatch.setattr(triton_ops, "SCAN_MIN_CHUNK", 16)
        monkeypatch.setattr(triton_ops, "SCAN_FOLD_MAX_CHUNKS", 10**9 if request.param == "chunked" else 0)
    return request.param != "whole"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,length,d_inner,d_state", SCAN_SHAPES)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_selective_scan_matches_reference(batch, length, d_inner, d_state, dtype, with_state, chunking):
    inputs = _scan_inputs(batch, length, d_inner, d_state, dtype, batch * 100 + length, with_state)
    _check_padded_scan(inputs, dtype, seed=length)


@pytest.mark.parametrize("block_d,warps", [(32, 1), (64, 1), (64, 2)])
def test_selective_scan_forward_launch_shapes(block_d, warps, monkeypatch):
    """The forward scan's other launch shapes (benchmarks/bench_encode.py times them) give the same results."""
    monkeypatch.setattr(triton_ops, "SCAN_FWD_BLOCK_D", block_d)
    monkeypatch.setattr(triton_ops, "SCAN_FWD_WARPS", warps)
    dtype = torch.bfloat16
    inputs = _scan_inputs(3, 45, 150, 16, dtype, 21, True)  # 150 channels: a partial last block for every shape
    _check_padded_scan(inputs, dtype, seed=22)


@pytest.mark.parametrize(
    "n_seq,d_inner,expected",
    [(128, 1536, 128), (32, 1536, 64), (8, 1536, 128), (32, 2048, 128), (3, 96, 128), (600, 40, 64)],
)
def test_forward_scan_takes_narrower_blocks_only_where_they_spare_the_chunks(n_seq, d_inner, expected):
    """128 channels a program, unless only 64 give whole sequences SCAN_MIN_PROGRAMS programs (and
    never more channels than the next power of two above d_inner)."""
    packing = triton_ops._Packing(torch.empty(n_seq, 4, d_inner), None)
    assert triton_ops.SCAN_MIN_PROGRAMS == 512
    assert triton_ops._scan_block(packing, d_inner) == expected


@pytest.mark.parametrize("with_z,with_d,with_bias,softplus", [(False, False, False, False), (True, False, True, True)])
def test_selective_scan_optional_inputs(with_z, with_d, with_bias, softplus):
    x, dt, A, B, C, D, z, dt_bias, _ = _scan_inputs(2, 29, 16, 4, torch.float32, 5, False)
    dt = dt.abs() * 0.1 if not softplus else dt  # without softplus dt must already be a positive step
    inputs = (x, dt, A, B, C, D if with_d else None, z if with_z else None, dt_bias if with_bias else None, None)

    def ref(t):
        return selective_scan_reference(*t[:-1], dt_softplus=softplus, return_final_state=True)

    def fast(t):
        return triton_ops.selective_scan_triton(*t[:-1], dt_softplus=softplus, return_final_state=True)

    _check_scan(fast, ref, inputs, torch.float32, seed=6)


def _packed(lengths):
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return cu_seqlens, [slice(int(a), int(b)) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True)]


PACKED_LENGTHS = [[5, 1, 37, 16, 20], [64], [3, 3, 3]]
if not INTERPRETED:
    PACKED_LENGTHS += [[700, 1, 33, 128, 129, 5, 1000]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", PACKED_LENGTHS + [[0, 1, 19, 0, 1, 40, 0]], ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_selective_scan_packed_matches_per_sequence_reference(lengths, dtype, with_state, chunking):
    total, n = sum(lengths), len(lengths)
    inputs = _scan_inputs(1, total, 24, 16, dtype, total + n, with_state, n_states=n)
    cu_seqlens, pieces = _packed(lengths)

    def ref(t):
        x, dt, A, B, C, D, z, dt_bias, h0 = t
        ys, hs = [], []
        for i, s in enumerate(pieces):
            y, h = selective_scan_reference(
                x[:, s], dt[:, s], A, B[:, s], C[:, s], D, z[:, s], dt_bias, dt_softplus=True,
                initial_state=None if h0 is None else h0[i : i + 1], return_final_state=True,
            )  # fmt: skip
            ys.append(y)
            hs.append(h)
        return torch.cat(ys, dim=1), torch.cat(hs, dim=0)

    def fast(t):
        return triton_ops.selective_scan_triton(
            *t[:-1], dt_softplus=True, initial_state=t[-1], return_final_state=True, cu_seqlens=cu_seqlens
        )

    _check_scan(fast, ref, inputs, dtype, seed=n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile", [1, 5, 16])
def test_selective_scan_backward_tiles(tile, dtype, chunking, monkeypatch):
    """Sequences of many backward tiles, none a multiple of the tile length (chunks rounded up to whole tiles)."""
    monkeypatch.setattr(triton_ops, "SCAN_BWD_TILE", tile)
    inputs = _scan_inputs(2, 43, 24, 5, dtype, tile, with_state=True)
    _check_padded_scan(inputs, dtype, seed=tile)


class _LaunchCounter:
    """Wraps a kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[300], [0, 1, 170, 0, 1, 130, 0]], ids=["padded", "packed"])
def test_selective_scan_long_sequence_takes_the_chunked_backward(lengths, dtype, monkeypatch):
    """One long sequence is too few programs to fill a GPU: its backward is cut into chunks, whose
    adjoints are folded back from the last chunk to the first (here across many chunks)."""
    monkeypatch.setattr(triton_ops, "SCAN_MIN_CHUNK", 32)
    carry_kernel = _LaunchCounter(triton_ops._scan_bwd_carry_kernel)
    monkeypatch.setattr(triton_ops, "_scan_bwd_carry_kernel", carry_kernel)
    total, n = sum(lengths), len(lengths)
    inputs = _scan_inputs(1, total, 16, 4, dtype, total, with_state=True, n_states=n)
    cu_seqlens, pieces = _packed(lengths)

    def ref(t):
        x, dt, A, B, C, D, z, dt_bias, h0 = t
        outs = [
            selective_scan_reference(
                x[:, s], dt[:, s], A, B[:, s], C[:, s], D, z[:, s], dt_bias, dt_softplus=True,
                initial_state=h0[i : i + 1], return_final_state=True,
            )
            for i, s in enumerate(pieces)
        ]  # fmt: skip
        return torch.cat([y for y, _ in outs], dim=1), torch.cat([h for _, h in outs], dim=0)

    def fast(t):
        return triton_ops.selective_scan_triton(
            *t[:-1], dt_softplus=True, initial_state=t[-1], return_final_state=True,
            cu_seqlens=cu_seqlens if n > 1 else None,
        )  # fmt: skip

    _check_scan(fast, ref, inputs, dtype, seed=total)
    assert carry_kernel.launches == 1, "the backward did not take the chunked path"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_selective_scan_final_state_gradient_alone(dtype, with_state, chunking):
    """A loss on the final state only: the adjoint starts from dh_final, and y's gradient is zero."""
    (rtol, atol), (grtol, gatol) = TOLERANCES[dtype]
    inputs = _scan_inputs(2, 41, 24, 5, dtype, 41, with_state)
    leaves_ref, leaves_fast = _leaves(*inputs, dtype=torch.float32), _leaves(*inputs)
    kw = dict(dt_softplus=True, return_final_state=True)
    _, h_ref = selective_scan_reference(*leaves_ref[:-1], initial_state=leaves_ref[-1], **kw)
    _, h = triton_ops.selective_scan_triton(*leaves_fast[:-1], initial_state=leaves_fast[-1], **kw)
    assert_close("final_state", h, h_ref, rtol, atol)
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def grads(state, leaves):  # C, D and z do not reach the final state: their gradients are zeros
        present = [t for t in leaves if t is not None]
        return torch.autograd.grad(state, present, dh, allow_unused=True, materialize_grads=True)

    grads_fast = grads(h, leaves_fast)
    _check_dtypes([h], [torch.float32], grads_fast, leaves_fast)
    present = [n for n, t in zip(SCAN_NAMES, leaves_ref, strict=True) if t is not None]
    for name, g_fast, g_ref in zip(present, grads_fast, grads(h_ref, leaves_ref), strict=True):
        assert_close(f"grad {name}", g_fast, g_ref, grtol, gatol)


def _conv_inputs(batch, length, channels, width, dtype, seed, with_state, n_states=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=g).to(DEVICE, dtype)
    weight = torch.randn(channels, width, generator=g).to(DEVICE, dtype)
    bias = torch.randn(channels, generator=g).to(DEVICE, dtype)
    state = torch.randn(n_states or batch, width - 1, channels, generator=g).to(DEVICE, dtype) if with_state else None
    return x, weight, bias, state


CONV_NAMES = ["x", "weight", "bias", "initial_state"]


def _check_conv(fast_fn, ref_fn, inputs, dtype, seed):
    (rtol, atol), (grtol, gatol) = TOLERANCES[dtype]
    leaves_ref, leaves_fast = _leaves(*inputs, dtype=torch.float32), _leaves(*inputs)
    y_ref, s_ref = ref_fn(leaves_ref)
    x = leaves_fast[0]
    strided = torch.cat([x, x.detach()], dim=-1)[..., : x.shape[-1]]  # as in Mamba: x is half of in_proj's output
    y, s = fast_fn([strided, *leaves_fast[1:]])
    assert_close("y", y, y_ref, rtol, atol)
    assert_close("final_state", s, s_ref, rtol, atol)
    present = [n for n, t in zip(CONV_NAMES, leaves_ref, strict=True) if t is not None]
    grads_fast = _grads([y, s], leaves_fast, seed)
    _check_dtypes([y, s], [dtype, dtype], grads_fast, leaves_fast)
    for name, g_fast, g_ref in zip(present, grads_fast, _grads([y_ref, s_ref], leaves_ref, seed), strict=True):
        assert_close(f"grad {name}", g_fast, g_ref, grtol, gatol)


CONV_SHAPES = [(2, 1, 6, 4), (2, 3, 6, 4), (3, 70, 40, 4), (1, 17, 130, 2)]
if not INTERPRETED:
    CONV_SHAPES += [(4, 513, 200, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,length,channels,width", CONV_SHAPES)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv1d_matches_reference(batch, length, channels, width, dtype, with_state, activation):
    inputs = _conv_inputs(batch, length, channels, width, dtype, length + channels, with_state)
    kw = dict(activation=activation, return_final_state=True)

    def ref(t):
        return causal_conv1d_reference(*t, **kw)

    def fast(t):
        return triton_ops.causal_conv1d_triton(*t, **kw)

    _check_conv(fast, ref, inputs, dtype, seed=length)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", PACKED_LENGTHS + [[1, 2, 1, 9]], ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_causal_conv1d_packed_matches_per_sequence_reference(lengths, dtype, with_state):
    n = len(lengths)
    inputs = _conv_inputs(1, sum(lengths), 40, 4, dtype, sum(lengths), with_state, n_states=n)
    cu_seqlens, pieces = _packed(lengths)

    def ref(t):
        x, weight, bias, h0 = t
        outs = [
            causal_conv1d_reference(
                x[:, s], weight, bias, None if h0 is None else h0[i : i + 1], return_final_state=True
            )
            for i, s in enumerate(pieces)
        ]
        return torch.cat([y for y, _ in outs], dim=1), torch.cat([st for _, st in outs], dim=0)

    def fast(t):
        return triton_ops.causal_conv1d_triton(*t, return_final_state=True, cu_seqlens=cu_seqlens)

    _check_conv(fast, ref, inputs, dtype, seed=n)


def test_causal_conv1d_of_more_than_four_taps_is_refused_and_dispatched_elsewhere():
    x, weight, bias, _ = _conv_inputs(2, 9, 8, 5, torch.float32, 5, with_state=False)
    with pytest.raises(ValueError, match="at most 4 taps, not 5"):
        triton_ops.causal_conv1d_triton(x, weight, bias)
    if DEVICE == "cuda":  # the dispatcher takes another backend for it
        from st_mamba import ops

        assert_close("y", ops.causal_conv1d(x, weight, bias), causal_conv1d_reference(x, weight, bias), 1e-5, 1e-5)


@pytest.mark.skipif(INTERPRETED, reason="counts compiled kernels, which the interpreter does not make")
def test_batches_of_new_shapes_reuse_the_compiled_kernels():
    """Training-like batches of many (rows, length) shapes compile nothing after two warm-up shapes.

    Triton specialises on integer arguments (== 1, divisible by 16) unless told not to; a compile
    per new combination stalled training for seconds every few steps.
    """
    from st_mamba import MambaBackbone, MambaConfig

    kernels = [triton_ops._scan_fwd_kernel, triton_ops._scan_bwd_carry_kernel, triton_ops._scan_bwd_kernel,
               triton_ops._conv_fwd_kernel, triton_ops._conv_bwd_pre_kernel, triton_ops._conv_bwd_input_kernel]  # fmt: skip
    torch.manual_seed(0)
    backbone = MambaBackbone(MambaConfig(d_model=32, n_layer=2, version=1, d_state=8, vocab_size=100))
    backbone.reset_parameters(seed=0).to(DEVICE)

    def step(rows: int, length: int) -> None:
        backbone(torch.randint(0, 100, (rows, length), device=DEVICE)).float().pow(2).mean().backward()

    def compiled() -> list[int]:
        device = torch.cuda.current_device()
        return [len(kernel.device_caches[device][0]) if device in kernel.device_caches else 0 for kernel in kernels]

    for rows, length in ((3, 40), (2, 300)):  # whole sequences, and sequences cut into chunks (> 256 tokens)
        step(rows, length)
    warm = compiled()
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        step(
            int(torch.randint(1, 33, (1,), generator=generator)), int(torch.randint(5, 600, (1,), generator=generator))
        )
    assert compiled() == warm, f"kernels compiled per shape: {warm} after warm-up, {compiled()} after 12 new shapes"
