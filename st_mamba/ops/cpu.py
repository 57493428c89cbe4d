"""CPU fast paths of the Mamba mixers, forward only; the compiled ones are built on first use.

- ``selective_scan_cpu``: the selective scan with softplus(dt + dt_bias), the D skip and the
  SiLU(z) gate fused (``csrc/selective_scan_cpu.c``).
- ``causal_conv1d_cpu``: the depthwise causal convolution with bias and SiLU fused
  (``csrc/causal_conv1d_cpu.c``).
  Both compute in fp32 and read and write fp32 or bf16 tensors as they are (bf16 models make no
  fp32 copies of their activations).
- ``mamba1_forward_small``: a whole Mamba-1 backbone for a small inference batch in one call
  (``csrc/mamba1_small_cpu.c``): norms, projections and glue in C around the two kernels above.
- ``linear_onednn``: the projections through oneDNN's fp32 matmul (ships with PyTorch; nothing to
  build).
- ``one_thread``: runs a block's CPU work on the calling thread (no OpenMP team), for batches
  too small to gain from the second core (``MambaBackbone`` uses it for queries).
- ``keep_freed_memory``: an opt-in setting of glibc's malloc that spares every large tensor its
  page faults (a fifth of the mamba-130m forward on 2 cores).

On first use, ``csrc/*.c`` is compiled with the system C compiler (``$CC``, else ``cc`` or
``gcc``) for this machine (``-march=native``; ``$ST_MAMBA_CPU_MARCH`` names another target, e.g.
``x86-64-v3`` for any AVX2 machine) into one library in a cache folder
(``$ST_MAMBA_CACHE``, else ``~/.cache/st_mamba``), under a name that hashes the sources, the
flags, the compiler and the CPU it targets; later processes load the cached library. When there
is no compiler or the build fails, ``available()`` is False, one warning says why, and the
dispatcher in ``ops/__init__.py`` uses the pure-PyTorch paths instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from st_mamba.ops.chunked import conv_final_state
from st_mamba.ops.weight_cache import cached

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("csrc")
MARCH_ENV = "ST_MAMBA_CPU_MARCH"  # the -march the kernels are built for; unset: native


def build_flags() -> tuple[str, ...]:
    """The compiler flags: ``-march`` from ``$ST_MAMBA_CPU_MARCH`` (default ``native``).

    No -ffast-math: the kernel's exp rounds with an add-and-subtract trick that reassociation would remove.
    """
    march = os.environ.get(MARCH_ENV, "").strip() or "native"
    return ("-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")


class _Seq(ctypes.Structure):
    """Mirror of the C ``Seq``: a (B, L, C) tensor whose channels have stride 1."""

    _fields_ = [("data", ctypes.c_void_p), ("batch_stride", ctypes.c_int64), ("time_stride", ctypes.c_int64)]


class _ScanArgs(ctypes.Structure):
    """Mirror of the C ``ScanArgs``; field order and types must match the C struct exactly."""

    _fields_ = [
        ("batch", ctypes.c_int64),
        ("length", ctypes.c_int64),
        ("d_inner", ctypes.c_int64),
        ("d_state", ctypes.c_int64),
        ("x", _Seq),
        ("dt", _Seq),
        ("z", _Seq),
        ("B", _Seq),
        ("C", _Seq),
        ("A", ctypes.c_void_p),
        ("D", ctypes.c_void_p),
        ("dt_bias", ctypes.c_void_p),
        ("dt_softplus", ctypes.c_int),
        ("bf16", ctypes.c_int),
        ("initial_state", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("final_state", ctypes.c_void_p),
        ("cu_seqlens", ctypes.c_void_p),
        ("n_seqs", ctypes.c_int64),
    ]


class _ConvArgs(ctypes.Structure):
    """Mirror of the C ``ConvArgs``."""

    _fields_ = [
        ("batch", ctypes.c_int64),
        ("length", ctypes.c_int64),
        ("channels", ctypes.c_int64),
        ("width", ctypes.c_int64),
        ("x", _Seq),
        ("weight", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("silu", ctypes.c_int),
        ("bf16", ctypes.c_int),
        ("initial_state", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("cu_seqlens", ctypes.c_void_p),
        ("n_seqs", ctypes.c_int64),
    ]


# The order of the C ``LayerWeights`` fields.
_LAYER_WEIGHTS = "norm in_proj in_bias conv conv_bias x_proj dt_proj dt_bias A D out_proj out_bias".split()


class _LayerWeights(ctypes.Structure):
    """Mirror of the C ``LayerWeights``: one pointer per weight (or derived tensor), in this order."""

    _fields_ = [(name, ctypes.c_void_p) for name in _LAYER_WEIGHTS]


class _SmallForwardArgs(ctypes.Structure):
    """Mirror of the C ``SmallForwardArgs``."""

    _fields_ = [
        ("batch", ctypes.c_int64),
        ("length", ctypes.c_int64),
        ("d_model", ctypes.c_int64),
        ("d_inner", ctypes.c_int64),
        ("d_state", ctypes.c_int64),
        ("dt_rank", ctypes.c_int64),
        ("d_conv", ctypes.c_int64),
        ("n_layer", ctypes.c_int64),
        ("layers", ctypes.POINTER(_LayerWeights)),
        ("norm_f", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("bf16", ctypes.c_int),
        ("embedded", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("cu_seqlens", ctypes.c_void_p),
        ("n_seqs", ctypes.c_int64),
    ]


def _cache_dir() -> Path:
    return Path(os.environ.get("ST_MAMBA_CACHE") or Path.home() / ".cache" / "st_mamba")


def _find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str) -> Path:
    """Compile the kernels into the cache (once per sources, flags, compiler and CPU); return the library's path."""
    # The predefined macros name the compiler's version and every instruction set that -march enables
    # (on this CPU, for native), so that a cache folder shared between machines never serves the wrong code.
    flags = build_flags()
    target = subprocess.run(
        [compiler, *flags, "-E", "-dM", "-x", "c", os.devnull], capture_output=True, text=True, timeout=60
    )
    sources = sorted(SOURCE_DIR.glob("*.c"))
    digest = hashlib.sha256(target.stdout.encode() + " ".join(flags).encode())
    for path in sorted(SOURCE_DIR.glob("*.[ch]")):
        digest.update(path.name.encode() + path.read_bytes())
    library = _cache_dir() / f"st_mamba_cpu-{digest.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: two processes building at once each write their own
    # file, and the rename that lands last replaces an identical library.
    fd, partial = tempfile.mkstemp(prefix=library.stem + "-", suffix=".partial", dir=library.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, "-o", partial, *map(str, sources)], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"`{compiler} {' '.join(flags)}` failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = _find_compiler()
    if compiler is None:
        reason = "no C compiler found (set $CC, or install gcc)"
    else:
        try:
            library = ctypes.CDLL(str(_build(compiler)))
            library.selective_scan_fwd.argtypes = [ctypes.POINTER(_ScanArgs), ctypes.c_int]
            library.causal_conv1d_fwd.argtypes = [ctypes.POINTER(_ConvArgs), ctypes.c_int]
            library.selective_scan_fwd.restype = library.causal_conv1d_fwd.restype = None
            library.mamba1_forward_small.argtypes = [ctypes.POINTER(_SmallForwardArgs), ctypes.c_int]
            library.mamba1_forward_small.restype = ctypes.c_int
            library.mamba1_small_panel_width.argtypes = []
            library.mamba1_small_panel_width.restype = ctypes.c_int
            library.mamba1_small_bf16_pairs.argtypes = []
            library.mamba1_small_bf16_pairs.restype = ctypes.c_int
            library.st_mamba_set_thread_count.argtypes = [ctypes.c_int]
            library.st_mamba_set_thread_count.restype = ctypes.c_int
            return library
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            reason = f"building or loading {SOURCE_DIR} failed: {error}"
    logger.warning(
        "st_mamba: the compiled CPU kernels are unavailable, %s; the pure-PyTorch scan and convolution are used.",
        reason,
    )
    return None


def available() -> bool:
    """True when the kernels are built (or were built before) and load; the first call may compile them."""
    return _library() is not None


def _checked_library(**expected: tuple[Tensor | None, tuple[int, ...]]) -> ctypes.CDLL:
    """The library, once every given tensor is a CPU tensor of its expected shape (None: absent).

    The kernels read raw pointers and trust the shapes; a mismatch must be an error here, not a crash there.
    """
    library = _library()
    if library is None:
        raise RuntimeError("the compiled CPU kernels are not available (see the warning logged by st_mamba.ops.cpu)")
    for name, (t, shape) in expected.items():
        if t is not None and (tuple(t.shape) != tuple(shape) or t.device.type != "cpu"):
            raise ValueError(
                f"{name}: expected a CPU tensor of shape {tuple(shape)}, got {tuple(t.shape)} on {t.device}"
            )
    return library


def _kernel_rows(t: Tensor, bf16: bool) -> Tensor:
    """bf16 (when ``bf16``) or fp32 with unit stride on the last dim; strided views such as a ``split``
    of a projection pass uncopied."""
    t = t if bf16 else t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def _all_bf16(*tensors: Tensor | None) -> bool:
    """Whether the kernel can read these as bf16: it takes its sequence inputs all bf16 or all fp32."""
    return all(t is None or t.dtype == torch.bfloat16 for t in tensors)


def _seq(t: Tensor | None) -> _Seq:
    if t is None:
        return _Seq(None, 0, 0)
    return _Seq(t.data_ptr(), t.stride(0), t.stride(1))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _packed_bounds(cu_seqlens: Tensor | None, batch: int, length: int) -> tuple[Tensor | None, int]:
    """(int32 bounds the kernel can read, number of sequences); (None, batch) for an unpacked batch.

    The kernels trust the bounds: they are checked here (batch 1, from 0 to the length, not decreasing).
    """
    if cu_seqlens is None:
        return None, batch
    bounds = cu_seqlens.to(device="cpu", dtype=torch.int32).contiguous()
    values = bounds.tolist()
    rising = (
        bounds.dim() == 1 and len(values) >= 2 and all(a <= b for a, b in zip(values[:-1], values[1:], strict=True))
    )
    if batch != 1 or not rising or values[0] != 0 or values[-1] != length:
        raise ValueError(f"cu_seqlens must rise from 0 to {length} (a packed batch of 1 row), got {values}")
    return bounds, len(values) - 1


def selective_scan_cpu(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan on CPU, forward only; same signature and shapes as ``selective_scan_reference``.

    Computes in fp32. When x, dt, z, B and C are all bf16 the kernel reads them and writes y as they
    are (no fp32 copies); other dtypes are upcast. y is returned in the dtype of x. ``cu_seqlens``
    (n + 1,) marks a packed batch as in ``ops.selective_scan``: x (1, T, Di), states (n, Di, N).
    """
    batch, length, d_inner = x.shape
    d_state = A.shape[-1]
    bounds, states = _packed_bounds(cu_seqlens, batch, length)
    library = _checked_library(
        x=(x, x.shape), dt=(dt, x.shape), z=(z, x.shape), A=(A, (d_inner, d_state)),
        B=(B, (batch, length, d_state)), C=(C, (batch, length, d_state)), D=(D, (d_inner,)),
        dt_bias=(dt_bias, (d_inner,)), initial_state=(initial_state, (states, d_inner, d_state)),
    )  # fmt: skip
    bf16 = _all_bf16(x, dt, z, B, C)
    xs, dts, Bs, Cs = (_kernel_rows(t, bf16) for t in (x, dt, B, C))
    zs = None if z is None else _kernel_rows(z, bf16)
    A, D, dt_bias = (None if t is None else t.float().contiguous() for t in (A, D, dt_bias))
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    y = torch.empty(batch, length, d_inner, dtype=torch.bfloat16 if bf16 else torch.float32)
    final_state = torch.empty(states, d_inner, d_state, dtype=torch.float32) if return_final_state else None
    args = _ScanArgs(
        batch, length, d_inner, d_state,
        _seq(xs), _seq(dts), _seq(zs), _seq(Bs), _seq(Cs),
        _ptr(A), _ptr(D), _ptr(dt_bias), int(dt_softplus), int(bf16),
        _ptr(initial_state), _ptr(y), _ptr(final_state), _ptr(bounds), states,
    )  # fmt: skip
    library.selective_scan_fwd(ctypes.byref(args), torch.get_num_threads())
    y = y.to(x.dtype)
    return (y, final_state) if return_final_state else y


def _taps(weight: Tensor) -> Tensor:
    """The convolution's (C, K) weight as the kernels read it: (K, C) fp32, a row of channels a tap."""
    return weight.float().t().contiguous()


def causal_conv1d_cpu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_state: Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Depthwise causal convolution on CPU, forward only; same signature and shapes as ``causal_conv1d_reference``.

    Computes in fp32 (bf16 x and carried state are read, and y written, as bf16; other dtypes are
    upcast) and returns y and the final state in the dtype of x. ``cu_seqlens`` (n + 1,) marks a
    packed batch, x (1, T, C), whose sequences carry no state in or out.
    """
    if activation not in ("silu", None):
        raise ValueError(f"unsupported activation {activation!r}")
    batch, length, channels = x.shape
    width = weight.shape[-1]
    bounds, states = _packed_bounds(cu_seqlens, batch, length)
    if bounds is not None and (initial_state is not None or return_final_state):
        raise ValueError("packed batches (cu_seqlens) take no initial_state and return no final state here")
    library = _checked_library(
        x=(x, x.shape), weight=(weight, (channels, width)), bias=(bias, (channels,)),
        initial_state=(initial_state, (batch, width - 1, channels)),
    )  # fmt: skip
    bf16 = _all_bf16(x, initial_state)
    xs = _kernel_rows(x, bf16)
    weight_by_tap = cached(weight, "conv taps", _taps)
    bias = None if bias is None else bias.float().contiguous()
    carried = None if initial_state is None else _kernel_rows(initial_state, bf16).contiguous()
    y = torch.empty(batch, length, channels, dtype=torch.bfloat16 if bf16 else torch.float32)
    args = _ConvArgs(
        batch, length, channels, width, _seq(xs), _ptr(weight_by_tap), _ptr(bias), int(activation == "silu"),
        int(bf16), _ptr(carried), _ptr(y), _ptr(bounds), states,
    )  # fmt: skip
    library.causal_conv1d_fwd(ctypes.byref(args), torch.get_num_threads())
    y = y.to(x.dtype)
    return (y, conv_final_state(x, initial_state, width)) if return_final_state else y


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Inside the block, CPU work started from the calling thread runs on that thread alone.

    A parallel region costs a wake-up and a barrier (microseconds each, and on a host busy with other
    processes, a wait for a thread that is not scheduled); for a batch of a few tokens that is more
    than the second core saves. This sets the calling thread's OpenMP team size (which PyTorch's
    parallel loops, oneDNN and these kernels read) to 1 and restores it after; other threads and
    ``torch.get_num_threads()`` elsewhere are untouched. Without the compiled library it does nothing.
    """
    library = _library()
    if library is None:
        yield
        return
    previous = library.st_mamba_set_thread_count(1)
    try:
        yield
    finally:
        library.st_mamba_set_thread_count(previous)


@functools.cache
def _omp_pause():
    """OpenMP 5.0's ``omp_pause_resource_all`` of the libgomp this process has loaded (PyTorch's, the one the
    kernels link), or None: no libgomp loaded, or one older than OpenMP 5.0. Nothing is loaded for this."""
    no_load = getattr(os, "RTLD_NOLOAD", None)
    if no_load is None:
        return None
    try:
        pause = ctypes.CDLL("libgomp.so.1", mode=no_load | os.RTLD_NOW).omp_pause_resource_all
    except (OSError, AttributeError):
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


def release_threads() -> bool:
    """End the OpenMP worker threads that the calling thread's parallel regions left behind.

    libgomp keeps a pool of worker threads for every thread that has run a parallel region (PyTorch's
    CPU ops, oneDNN, these kernels). Once all the pools together hold more threads than the machine has
    cores, it stops letting idle workers spin and puts them to sleep, so every parallel region of every
    thread pays for waking them: on a 2-core benchmark machine the shipped model's forward of 64 queries
    took 42 ms on one thread, and 86 ms on that thread once a second thread had run the model too
    (docs/benchmarks.md, "Latency of one encode call"). A thread that is done with PyTorch (the thread
    that loaded and warmed up a model, before a worker thread serves it) calls this to give its workers
    back (OpenMP's soft pause); its next parallel region starts new ones. True where it did; False where
    the process has no libgomp with OpenMP 5.0 loaded.
    """
    pause = _omp_pause()
    return pause is not None and pause(1) == 0  # 1: omp_pause_soft


@functools.cache
def onednn_available() -> bool:
    """True when this PyTorch build has oneDNN's linear (x86 builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def onednn_supports(dtype: torch.dtype) -> bool:
    """True when ``linear_onednn`` runs ``dtype`` here: fp32 wherever oneDNN is; bf16 where the CPU has the
    instructions oneDNN's bf16 matmul needs (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; it refuses bf16 elsewhere)."""
    if not onednn_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Rows the packed weights are laid out for; the packed layout is as fast as the plain one or faster at
# every batch measured (1 to 8,192 rows), and for a query's few rows a third faster than re-packing.
_PACKED_FOR_ROWS = 16


def linear_onednn(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` through oneDNN's matmul (the op torch.compile emits for CPU linears), forward only.

    In fp32 ``F.linear`` on CPU calls MKL's sgemm; on the 2-core AMD Zen 4 of docs/benchmarks.md oneDNN
    ran the four Mamba-1 projections 10-25% faster (single thread, CPU time), with strided inputs as they
    are. The weight goes in already reordered into oneDNN's blocked layout (made once per weight and kept:
    ``weight_cache``; a second copy of the weights in memory), which spares every call the reorder that
    dominates the projections of a short query: in bf16 on an Intel Xeon with AMX, one thread, a 12-row
    query's projections took 16-23 us each instead of 19-49 us through ``F.linear``, with the same results.
    ``onednn_supports(dtype)`` says where it runs.
    """
    packed = cached(weight, "onednn", lambda w: torch.ops.mkldnn._reorder_linear_weight(w, _PACKED_FOR_ROWS))
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def keep_freed_memory() -> bool:
    """Opt in: make glibc's malloc keep freed memory for reuse instead of handing it back to the system.

    By default glibc maps every block above a threshold afresh and unmaps it when freed, so each large
    tensor of a CPU forward faults its pages in again; on the 2-core machine of docs/benchmarks.md
    that cost about a fifth of the mamba-130m forward. Afterwards blocks up to 1 GiB come from the
    heap, which is never trimmed: the process keeps its peak memory. Process-wide, so st-mamba never
    calls it by itself; the same at start-up, for any program:
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483647``.

    Returns:
        False where the C library is not glibc (nothing changed).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return mallopt(m_mmap_threshold, 1 << 30) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1


class _SmallForwardPlan:
    """What ``mamba1_forward_small`` hands the C code for one backbone: a pointer to every weight in the layout
    the code reads (projections in panels in the model's dtype; norms, biases, taps, A, D in fp32), the tensors
    behind the pointers, and what tells whether the backbone has changed since."""

    def __init__(self, backbone) -> None:
        cfg = backbone.config
        self.dtype = backbone.embeddings.weight.dtype
        projections = [getattr(layer.mixer, name).weight for layer in backbone.layers
                       for name in ("in_proj", "x_proj", "dt_proj", "out_proj")]  # fmt: skip
        eps = {backbone.norm_f.eps, *(layer.norm.eps for layer in backbone.layers)}
        self.supported = (
            self.dtype in (torch.float32, torch.bfloat16)
            and all(w.dtype == self.dtype for w in projections)
            and len(eps) == 1
        )
        self.eps = backbone.norm_f.eps
        self._keep: list[Tensor] = []
        self._identity = [
            (table, name, value)
            for module in backbone.modules()
            for table in (module._parameters, module._modules)
            for name, value in table.items()
        ]
        self._parameters = [value for table, _, value in self._identity if isinstance(value, Tensor)]
        try:
            self._versions = [p._version for p in self._parameters]
        except RuntimeError:  # inference tensors keep no version: never reuse this plan
            self._versions = None
        self._pointers = [p.data_ptr() for p in self._parameters]
        self._library = _library()  # the panels' layout is the build's
        if not self.supported:
            return
        with torch.no_grad():
            self.layers = (_LayerWeights * cfg.n_layer)()
            for i, layer in enumerate(backbone.layers):
                m = layer.mixer
                A, D, dt_bias = m._scan_parameters()  # -exp(A_log), D and dt's bias in fp32, as the mixer makes them
                self.layers[i] = _LayerWeights(*map(self._pointer, (
                    self._fp32(layer.norm.weight), self._panels(m.in_proj.weight), self._fp32(m.in_proj.bias),
                    _taps(m.conv1d.weight[:, 0, :]), self._fp32(m.conv1d.bias), self._panels(m.x_proj.weight),
                    self._panels(m.dt_proj.weight), dt_bias, A, D, self._panels(m.out_proj.weight),
                    self._fp32(m.out_proj.bias),
                )))  # fmt: skip
            self.norm_f = self._pointer(self._fp32(backbone.norm_f.weight))

    def current(self) -> bool:
        """Whether the backbone still has the parameters (same tensors, same memory, no in-place change) and the
        modules this plan was made from, and the library is the one it was laid out for."""
        if self._versions is None or self._library is not _library():
            return False
        return (
            all(table.get(name) is value for table, name, value in self._identity)
            and [p._version for p in self._parameters] == self._versions
            and [p.data_ptr() for p in self._parameters] == self._pointers
        )

    def _pointer(self, t: Tensor | None) -> int | None:
        if t is None:
            return None
        self._keep.append(t.contiguous())
        return self._keep[-1].data_ptr()

    @staticmethod
    def _fp32(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().float()

    @staticmethod
    def _panels(weight: Tensor) -> Tensor:
        """(N, K) weight -> ceil(N / W) panels (K, W) of W outputs each, the last padded with zeros; W is the
        build's panel width. bf16 weights in a build with AVX512-BF16 take panels (ceil(K / 2), W, 2) instead:
        each output's weights for inputs k and k + 1 side by side (see ``csrc/mamba1_small_cpu.c``)."""
        library = _library()
        width, (n, k) = library.mamba1_small_panel_width(), weight.shape
        pairs = weight.dtype == torch.bfloat16 and library.mamba1_small_bf16_pairs()
        depth = k + k % 2 if pairs else k
        padded = weight.detach().new_zeros(-(-n // width) * width, depth)
        padded[:n, :k] = weight.detach()
        panels = padded.view(-1, width, depth).transpose(1, 2)  # (panels, K, W)
        if pairs:
            panels = panels.reshape(panels.shape[0], depth // 2, 2, width).transpose(2, 3)  # (panels, K / 2, W, 2)
        return panels.contiguous()


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan_for(backbone) -> _SmallForwardPlan:
    plan = _plans.get(backbone)
    if plan is None or not plan.current():
        plan = _SmallForwardPlan(backbone)
        _plans[backbone] = plan
    return plan


def mamba1_forward_small(backbone, input_ids: Tensor, cu_seqlens: Tensor | None = None) -> Tensor | None:
    """A Mamba-1 ``MambaBackbone``'s forward at inference in one call of the C library: (B, L) token ids ->
    (B, L, D) final hidden states, as ``backbone(input_ids, cu_seqlens=cu_seqlens)`` computes them.

    For small batches (a query, a few), where the layer-by-layer forward spends most of its time around its
    ops rather than in them (``csrc/mamba1_small_cpu.c``). The intermediates between ops stay in fp32 (the
    layer-by-layer forward of a bf16 model rounds each to bf16). The weights' layout for it is made on the
    first call and kept (a second copy of the projections) until a parameter changes. Returns None where it
    does not apply: weights in another dtype than fp32 or bf16, or of mixed dtypes, or norms with different
    eps; the caller then runs the layer-by-layer forward.
    """
    library = _checked_library()
    cfg = backbone.config
    plan = _plan_for(backbone)
    if not plan.supported:
        return None
    batch, length = input_ids.shape
    bounds, states = _packed_bounds(cu_seqlens, batch, length)
    embedded = backbone.embeddings(input_ids).contiguous()
    out = torch.empty_like(embedded)
    args = _SmallForwardArgs(
        batch, length, cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv, cfg.n_layer,
        plan.layers, plan.norm_f, plan.eps, int(plan.dtype == torch.bfloat16), embedded.data_ptr(), out.data_ptr(),
        _ptr(bounds), states,
    )  # fmt: skip
    if library.mamba1_forward_small(ctypes.byref(args), torch.get_num_threads()) != 0:
        raise MemoryError(f"the CPU forward of {batch} x {length} tokens could not allocate its buffers")
    return out
