"""LangChain's async standard tests under this repository's pytest-asyncio settings (fixtures: ../../conftest.py)."""

from __future__ import annotations

import inspect

import pytest


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """Give langchain-tests' inherited ``async def`` tests the ``asyncio`` mark.

    LangChain packages run pytest-asyncio in auto mode; this repository runs it in strict mode, where
    only marked coroutines are run. Marking them here, before pytest-asyncio's own wrapper turns marked
    coroutines into asyncio items, keeps the standard test classes unmodified (langchain-tests checks
    that no standard test is overridden).
    """
    result = yield
    if inspect.iscoroutinefunction(obj):
        for item in result if isinstance(result, list) else [result]:
            if isinstance(item, pytest.Function) and item.get_closest_marker("asyncio") is None:
                item.add_marker(pytest.mark.asyncio)
    return result
