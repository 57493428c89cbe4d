"""The dispatcher: one visible choice per call, announced once, forcible for tests and benchmarks."""

from __future__ import annotations

import logging
import socket

import pytest
import torch

from st_mamba import ops


def _inputs(requires_grad: bool = False):
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(1, 9, 4, generator=g), torch.randn(1, 9, 4, generator=g)
    A, B, C = -torch.rand(4, 3, generator=g), torch.randn(1, 9, 3, generator=g), torch.randn(1, 9, 3, generator=g)
    return [t.requires_grad_(requires_grad) for t in (x, dt, A, B, C)]


def test_choice_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(ops, "_announced", set())
    monkeypatch.setattr(ops, "_forced", None)
    with caplog.at_level(logging.INFO, logger="st_mamba.ops"):
        ops.selective_scan(*_inputs(requires_grad=True))
        ops.selective_scan(*_inputs(requires_grad=True))
    messages = [r.getMessage() for r in caplog.records if "selective_scan runs on" in r.getMessage()]
    assert messages == ["st_mamba: selective_scan runs on the 'chunked' backend (cpu)"]


def test_all_backends_agree_through_the_dispatcher():
    outputs = {}
    for backend in ("reference", "chunked"):
        with ops.use_backend(backend):
            outputs[backend] = ops.selective_scan(*_inputs(), dt_softplus=True)
    torch.testing.assert_close(outputs["chunked"], outputs["reference"], rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with ops.use_backend("fast"):
            pass


def test_tests_cannot_reach_the_network():
    """The socket guard from pyproject's addopts is active: an outside address is refused before any packet.

    Skipped only where pytest-socket (the dev extra) is not installed, e.g. a GPU machine running the
    GPU tests with ``-o addopts=""``; with the plugin installed, a missing guard fails here.
    """
    pytest.importorskip("pytest_socket", reason="pytest-socket (the dev extra) is not installed: no guard to check")
    with pytest.raises(Exception, match="(?i)socket|host"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
