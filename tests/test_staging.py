"""staging.PinnedStaging: one pinned buffer, reused, for the batches sent to the GPU."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from st_mamba.staging import PinnedStaging


def test_copies_start_empty_and_pickle():
    """ST's multi-process pool pickles the model: the staging buffer (a lock, an event) must not travel."""
    staging = PinnedStaging()
    for clone in (pickle.loads(pickle.dumps(staging)), copy.deepcopy(staging)):
        assert clone._buffer is None and clone._copied is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sends_every_batch_through_one_buffer(monkeypatch):
    """Each batch arrives whole; pinned memory is allocated only when a batch outgrows the buffer."""
    staging = PinnedStaging()
    batches = [torch.randint(0, 1000, (n,)) for n in (100, 3000, 10, 4096, 7, 9000)]
    allocations = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocations.append(a[0]) or real_empty(*a, **k))
    sent = [staging.to_device(batch, torch.device("cuda")) for batch in batches]
    torch.cuda.synchronize()
    for i, (batch, on_gpu) in enumerate(zip(batches, sent, strict=True)):
        assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), batch), f"batch {i}"
    assert allocations == [4096, 9000]  # the first batch, then only the one that outgrew the buffer
