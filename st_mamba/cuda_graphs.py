"""CUDA graphs for small packed inference batches: one graph replay where eager mode launches every kernel.

An encode call of one query launches some five hundred small kernels, and on a GPU the host's time to
launch them is most of the call. Here the backbone's packed forward (``input_ids`` (1, T), ``cu_seqlens``
(n + 1,)) is captured once per *bucket* and replayed afterwards.

Buckets. A graph has fixed shapes, so a batch of T tokens in n texts runs in the graph of the smallest
bucket (T_b, n_b) with T_b >= T tokens and n_b >= n texts (``TOKEN_BUCKETS``, ``TEXT_BUCKETS``). The
free room is filled with dummy texts *after* the real ones: packed texts never see each other (the
convolution window and the scan state restart at every ``cu_seqlens`` boundary, every other layer
works token by token), so the real texts' hidden states are those of the unpadded batch, and only
their T rows are read back. The padding is spread evenly over the dummy texts (``write_padded``), and
the bucket has enough of them that none is longer than the real texts' mean length (``choose_bucket``;
or ``SHORT_DUMMY`` tokens):
a kernel that walks each sequence in one program is as slow as its longest sequence, and one dummy text
holding all the padding of a large bucket (thousands of tokens) made a batch of short texts several
times slower. Every dummy text has at least one token (no empty sequences reach the kernels).

Memory. Static inputs and the output (T_b x d_model) are kept per graph; the graphs' intermediate
tensors come from one memory pool that all graphs share. Sharing is safe because replays never
overlap (one lock, and each replay's stream waits for the previous replay) and every replay's output
is copied out before the next one starts. At most ``MAX_GRAPHS`` graphs are kept, the least
recently used dropped first.

Weights. A graph reads the weights, and the tensors ``ops.weight_cache`` derived from them, at the
addresses they had at capture. Every call therefore compares each parameter's identity, storage and
version counter (which every in-place update bumps: optimiser steps, ``load_state_dict``) with what
they were at capture; any change (``.to()``, ``.half()``, training, surgery on the modules) drops all
graphs, which are captured again on demand. The derived tensors a graph reads are kept alive by the
graph, and ``weight_cache`` stores nothing made while a graph is being captured (such a tensor is
only computed when the graph is replayed).

Capture failure (an operation that cannot be captured, out of memory) warns once and runs that
bucket eagerly from then on, without trying it again.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from st_mamba import ops
from st_mamba.ops import weight_cache

logger = logging.getLogger(__name__)

ENV_VAR = "ST_MAMBA_CUDA_GRAPHS"
# 16, 24, 32, 48, ..., 12288, 16384 tokens: powers of two and 1.5 times them, so that padding to a bucket adds
# less than half of a batch's tokens, where powers of two alone added up to as many again (compute, for large batches)
TOKEN_BUCKETS = tuple(sorted({2**k for k in range(4, 15)} | {3 * 2**k for k in range(3, 13)}))
TEXT_BUCKETS = tuple(2**k for k in range(9))  # 1, 2, ..., 256 texts
MAX_GRAPHS = 64
# Dummy texts may be as long as the real texts' mean, or this many tokens where that is fewer (so that
# batches of very short texts do not need a text bucket past the largest): walking 16 tokens costs little.
SHORT_DUMMY = 16
WARMUP_RUNS = 2  # eager runs on a side stream before capture (compiles the Triton kernels, fills caches)


class Bucket(NamedTuple):
    """The shape a graph is captured for: ``tokens`` in the packed row, ``texts`` packed sequences."""

    tokens: int
    texts: int


def env_setting() -> bool | None:
    """``ST_MAMBA_CUDA_GRAPHS``: "0" forces graphs off, "1" on, unset (or empty) leaves the model's setting."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_VAR} must be 0 (graphs off) or 1 (on), got {value!r}")
    return value == "1"


def graphs_enabled(setting: bool) -> bool:
    """Whether graphs are on: the model's ``cuda_graphs`` setting unless ``ST_MAMBA_CUDA_GRAPHS`` overrides it."""
    forced = env_setting()
    return setting if forced is None else forced


def _smallest_at_least(value: int, buckets: Sequence[int]) -> int | None:
    return next((bucket for bucket in buckets if bucket >= value), None)


def choose_bucket(
    n_tokens: int,
    n_texts: int,
    token_buckets: Sequence[int] = TOKEN_BUCKETS,
    text_buckets: Sequence[int] = TEXT_BUCKETS,
) -> Bucket | None:
    """The smallest bucket that holds ``n_texts`` texts of ``n_tokens`` tokens in all plus the dummy texts
    its padding needs, or None when the largest bucket is too small.

    Padding tokens need dummy texts to belong to, none longer than ``longest_dummy(n_tokens, n_texts)``, and
    each dummy text needs a token; an exact fit needs neither.
    """
    if n_texts < 1 or n_tokens < n_texts:
        raise ValueError(f"a packed batch needs n_texts >= 1 texts of >= 1 token each, got {n_texts=} {n_tokens=}")
    longest = longest_dummy(n_tokens, n_texts)
    tokens = _smallest_at_least(n_tokens, token_buckets)
    texts = _smallest_at_least(n_texts, text_buckets)
    # Each step only grows the bucket, so this ends: at a bucket that holds the batch, or past the largest.
    while tokens is not None and texts is not None:
        padding, dummies = tokens - n_tokens, texts - n_texts
        if dummies < -(-padding // longest):
            texts = _smallest_at_least(n_texts - (-padding // longest), text_buckets)
        elif padding < dummies:
            tokens = _smallest_at_least(n_tokens + dummies, token_buckets)
        else:
            return Bucket(tokens, texts)
    return None


def longest_dummy(n_tokens: int, n_texts: int) -> int:
    """The most tokens a dummy text may have: the real texts' mean length (rounded up), or ``SHORT_DUMMY``."""
    return max(-(-n_tokens // n_texts), SHORT_DUMMY)


def dummy_steps(bucket: Bucket, device: torch.device | str = "cpu") -> Tensor:
    """(n_b,) int32 1, 2, ..., n_b: ``write_padded`` makes the dummy texts' boundaries from it on the device."""
    return torch.arange(1, bucket.texts + 1, dtype=torch.int32, device=device)


def write_padded(
    ids_out: Tensor, cu_out: Tensor, input_ids: Tensor, cu_seqlens: Tensor, steps: Tensor, fill_id: int
) -> None:
    """Write the packed batch, padded with dummy trailing texts, into the bucket-shaped ``ids_out`` (1, T_b)
    and ``cu_out`` (n_b + 1,); ``steps`` is ``dummy_steps(bucket)``.

    Dummy tokens are ``fill_id``. The real texts keep their tokens and boundaries: rows 0..T-1 of the
    padded batch's output are the unpadded batch's. The d = n_b - n dummy texts share the padding
    P = T_b - T evenly: dummy j ends at T + floor(j P / d), so each has floor(P / d) or ceil(P / d) tokens.
    The boundaries are computed on the device (T, n, P and d are shapes, known without a sync).
    """
    n_tokens, n_texts = input_ids.shape[1], cu_seqlens.numel() - 1
    padding, dummies = ids_out.shape[1] - n_tokens, cu_out.numel() - 1 - n_texts
    ids_out[:, :n_tokens].copy_(input_ids)
    ids_out[:, n_tokens:].fill_(fill_id)
    cu_out[: n_texts + 1].copy_(cu_seqlens)
    if dummies:
        torch.floor_divide(steps[:dummies] * padding, dummies, out=cu_out[n_texts + 1 :]).add_(n_tokens)


def pad_packed(input_ids: Tensor, cu_seqlens: Tensor, bucket: Bucket, fill_id: int) -> tuple[Tensor, Tensor]:
    """The packed batch padded to ``bucket``: (1, T_b) ids and (n_b + 1,) int32 ``cu_seqlens`` (see ``write_padded``)."""
    _check_packed(input_ids, cu_seqlens)
    padding, dummies = bucket.tokens - input_ids.shape[1], bucket.texts - (cu_seqlens.numel() - 1)
    if padding < dummies or dummies < 0 or (padding and not dummies):
        raise ValueError(
            f"{input_ids.shape[1]} tokens in {cu_seqlens.numel() - 1} texts do not fit {bucket} "
            "(its free tokens need dummy texts, each dummy text a token)"
        )
    ids = input_ids.new_empty(1, bucket.tokens)
    cu = cu_seqlens.new_empty(bucket.texts + 1, dtype=torch.int32)
    write_padded(ids, cu, input_ids, cu_seqlens, dummy_steps(bucket, cu_seqlens.device), fill_id)
    return ids, cu


def _check_packed(input_ids: Tensor, cu_seqlens: Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"packed input_ids must be (1, T), got {tuple(input_ids.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be (n + 1,) with n >= 1, got {tuple(cu_seqlens.shape)}")


def weights_state(modules: Sequence[nn.Module]) -> list[int] | None:
    """(identity, storage address, version) of every parameter and buffer of ``modules``, flat; None where
    a tensor keeps no version counter (created under ``torch.inference_mode``): then a change cannot be seen.

    A new dtype or device always comes with new storage, so the address covers both.
    """
    state = []
    try:
        for module in modules:
            for tensors in (module._parameters, module._buffers):
                for tensor in tensors.values():
                    if tensor is not None:
                        state += (id(tensor), tensor.data_ptr(), tensor._version)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None
    return state


# Bumped whenever any module anywhere registers a submodule: a backbone's module list is then read again.
_module_generation = 0


def _bump_module_generation(*args) -> None:
    global _module_generation
    _module_generation += 1


nn.modules.module.register_module_module_registration_hook(_bump_module_generation)


def graphs_apply(backbone: nn.Module, input_ids: Tensor) -> bool:
    """Whether a packed batch for ``backbone`` may run as a graph: CUDA, inference (autograd off, eval
    mode, no autocast, not inside another capture), and a backbone that reads packed batches in one pass."""
    device = input_ids.device
    return (
        device.type == "cuda"
        and not torch.is_grad_enabled()
        and not backbone.training
        and not torch.is_autocast_enabled("cuda")
        and ops.packs_in_one_pass(device, backbone.config.version)
        and not torch.cuda.is_current_stream_capturing()
    )


class CapturedGraph:
    """One bucket's graph and its static tensors: ``input_ids`` (1, T_b), ``cu_seqlens`` (n_b + 1,), ``output`` (T_b, D)."""

    def __init__(self, backbone: nn.Module, bucket: Bucket, input_ids: Tensor, cu_seqlens: Tensor, fill_id: int,
                 pool: tuple) -> None:  # fmt: skip
        device = input_ids.device
        self.bucket, self.fill_id = bucket, fill_id
        # Normal tensors (not inference tensors), so that calls both in and out of inference mode may write them.
        with torch.inference_mode(False), torch.no_grad():
            self.steps = dummy_steps(bucket, device)
            self.input_ids = torch.empty(1, bucket.tokens, dtype=input_ids.dtype, device=device)
            self.cu_seqlens = torch.empty(bucket.texts + 1, dtype=torch.int32, device=device)
            self.load(input_ids, cu_seqlens)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    backbone(self.input_ids, cu_seqlens=self.cu_seqlens)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other threads may go on with their own (eager) CUDA work during the capture.
            with _capturing(), torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.output = backbone(self.input_ids, cu_seqlens=self.cu_seqlens)[0]  # (T_b, D)
        # The derived weights the graph reads stay alive (and unchanged) as long as the graph does.
        self.derived_weights = weight_cache.derived_from(p for p in backbone.parameters())

    def load(self, input_ids: Tensor, cu_seqlens: Tensor) -> None:
        """Copy a packed batch, padded, into the static inputs (on the current stream)."""
        write_padded(self.input_ids, self.cu_seqlens, input_ids, cu_seqlens, self.steps, self.fill_id)

    def run(self, input_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
        """(T, D) hidden states of the real tokens, a tensor of their own (the next replay overwrites ``output``)."""
        self.load(input_ids, cu_seqlens)
        self.graph.replay()
        return self.output[: input_ids.shape[1]].clone()


class _capturing:
    """Marks the time of a capture for ``weight_cache`` (which then stores nothing made inside)."""

    def __enter__(self) -> None:
        weight_cache.capturing += 1

    def __exit__(self, *exc) -> None:
        weight_cache.capturing -= 1


class CudaGraphs:
    """Captured graphs of one backbone's packed forward, by bucket, least recently used dropped first.

    ``forward(backbone, input_ids, cu_seqlens)`` returns the (T, D) hidden states of a packed batch, from a
    graph replay where a bucket holds the batch and its graph could be captured, else from the eager forward.
    The caller checks ``graphs_apply`` first.
    """

    def __init__(
        self,
        token_buckets: Sequence[int] = TOKEN_BUCKETS,
        text_buckets: Sequence[int] = TEXT_BUCKETS,
        max_graphs: int = MAX_GRAPHS,
    ) -> None:
        for name, buckets in (("token_buckets", token_buckets), ("text_buckets", text_buckets)):
            if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
                raise ValueError(f"{name} must be increasing positive ints, got {buckets!r}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.token_buckets, self.text_buckets, self.max_graphs = tuple(token_buckets), tuple(text_buckets), max_graphs
        self._lock = threading.Lock()
        # The backbone's modules, read again when another backbone comes or modules were registered anywhere.
        self._modules: tuple[nn.Module, ...] = ()
        self._modules_key: tuple[int, int] | None = None  # (id of the backbone, _module_generation)
        self._warned = False  # about a failed capture: once
        self._told_unversioned = False
        self._reset()

    def _reset(self) -> None:
        self._wait_idle()
        self._graphs: collections.OrderedDict[Bucket, CapturedGraph] = collections.OrderedDict()
        self._failed: set[Bucket] = set()
        self._pool = None  # made with the first graph: a new pool per set of graphs frees the old one's memory
        self._weights: list[int] | None = None  # weights_state at capture
        self._done: torch.cuda.Event | None = None  # recorded after the last replay's output was copied out

    def _wait_idle(self) -> None:
        """Wait for the last replay (every earlier one comes before it) before a graph is dropped."""
        if getattr(self, "_done", None) is not None:
            self._done.synchronize()

    def __getstate__(self) -> dict:
        # A copy (deepcopy, or pickled to a worker process) starts without graphs.
        return {"token_buckets": self.token_buckets, "text_buckets": self.text_buckets, "max_graphs": self.max_graphs}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph (and the memory they hold) and forget failed captures."""
        with self._lock:
            self._reset()

    def bucket_for(self, n_tokens: int, n_texts: int) -> Bucket | None:
        """``choose_bucket`` with these buckets."""
        return choose_bucket(n_tokens, n_texts, self.token_buckets, self.text_buckets)

    def forward(self, backbone: nn.Module, input_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
        """(1, T) ids, (n + 1,) int32 ``cu_seqlens`` -> (T, D) final hidden states."""
        _check_packed(input_ids, cu_seqlens)
        bucket = self.bucket_for(input_ids.shape[1], cu_seqlens.numel() - 1)
        if bucket is None:
            return backbone(input_ids, cu_seqlens=cu_seqlens)[0]
        with self._lock:
            graph = self._graph(backbone, bucket, input_ids, cu_seqlens)
            if graph is not None:
                return self._replay(graph, input_ids, cu_seqlens)
        return backbone(input_ids, cu_seqlens=cu_seqlens)[0]

    def _replay(self, graph: CapturedGraph, input_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
        """Replays share the pool and the static tensors: each waits for the previous one, whatever its stream."""
        stream = torch.cuda.current_stream(input_ids.device)
        if self._done is not None:
            stream.wait_event(self._done)
        hidden = graph.run(input_ids, cu_seqlens)
        if self._done is None:
            self._done = torch.cuda.Event()
        self._done.record(stream)
        return hidden

    def _graph(
        self, backbone: nn.Module, bucket: Bucket, input_ids: Tensor, cu_seqlens: Tensor
    ) -> CapturedGraph | None:
        """The bucket's graph, captured now if needed; None where graphs cannot serve (run eagerly)."""
        weights = self._weights_now(backbone)
        if weights is None:
            return None
        if weights != self._weights:
            if self._graphs or self._failed:
                logger.info("st_mamba: the weights changed; dropping %d CUDA graphs", len(self._graphs))
            self._reset()
            self._weights = weights
        graph = self._graphs.get(bucket)
        if graph is not None:
            self._graphs.move_to_end(bucket)
            return graph
        if bucket in self._failed:
            return None
        try:
            graph = self._capture(backbone, bucket, input_ids, cu_seqlens)
        except Exception as exc:  # noqa: BLE001 - any failure to capture means: run this bucket eagerly
            self._failed.add(bucket)
            message = f"st_mamba: could not capture a CUDA graph for {bucket}; that bucket runs eagerly: {exc!r}"
            if not self._warned:
                warnings.warn(message, RuntimeWarning, stacklevel=4)
                self._warned = True
            else:
                logger.info(message)
            return None
        self._graphs[bucket] = graph
        if len(self._graphs) > self.max_graphs:
            self._wait_idle()
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        return graph

    def _weights_now(self, backbone: nn.Module) -> list[int] | None:
        """``weights_state`` of the backbone, whose module list is read again only when it may have changed."""
        key = (id(backbone), _module_generation)
        if key != self._modules_key:
            self._modules, self._modules_key = tuple(backbone.modules()), key
        state = weights_state(self._modules)
        if state is None and not self._told_unversioned:
            self._told_unversioned = True
            logger.info("st_mamba: weights made under torch.inference_mode keep no version; no CUDA graphs")
        return state

    def _capture(self, backbone: nn.Module, bucket: Bucket, input_ids: Tensor, cu_seqlens: Tensor) -> CapturedGraph:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        fill_id = backbone.config.eos_token_id
        logger.info("st_mamba: capturing a CUDA graph for %s", bucket)
        return CapturedGraph(backbone, bucket, input_ids, cu_seqlens, fill_id, self._pool)
