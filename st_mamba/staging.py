"""One pinned host buffer, reused, through which a process sends its small batches to the GPU.

``tensor.pin_memory()`` for every batch asks the driver for page-locked memory each time (cudaHostAlloc,
which the driver serialises, and an is_pinned query): about 3 ms of host time in a one-query encode call
on the H200, more than the forward pass. Here the buffer is allocated once (grown when a larger batch
comes), the batch is copied into it and sent with one asynchronous copy; before the buffer is written
again, the previous copy out of it must have finished, which an event recorded after that copy says.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor


class PinnedStaging:
    """Sends 1-D tensors of one dtype to a CUDA device through a reused pinned buffer."""

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self._copied: torch.cuda.Event | None = None  # recorded after the last copy out of the buffer
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}  # a copy (deepcopy, or pickled to a worker process) starts with a buffer of its own

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def to_device(self, values: Tensor, device: torch.device) -> Tensor:
        """``values`` (1-D, on the host) on ``device``; the copy is queued on the current stream, not waited for."""
        with self._lock:
            if self._copied is not None:
                self._copied.synchronize()  # the previous batch's copy, queued behind the forward before it
            if self._buffer is None or self._buffer.numel() < values.numel() or self._buffer.dtype != values.dtype:
                size = max(values.numel(), 2 * (0 if self._buffer is None else self._buffer.numel()), 4096)
                self._buffer = torch.empty(size, dtype=values.dtype, pin_memory=True)
            staged = self._buffer[: values.numel()]
            staged.copy_(values)
            sent = staged.to(device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(device))
            return sent
