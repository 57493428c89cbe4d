"""Compiled CPU selective scan (placeholder until the kernel lands): reports itself unavailable."""

from __future__ import annotations


def available() -> bool:
    return False


def selective_scan_cpu(*args):
    raise RuntimeError("the compiled CPU scan is not available")
