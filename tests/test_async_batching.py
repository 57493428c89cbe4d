"""st_mamba.async_batching.QueryBatcher: waiting queries go out as one batch, off the event loop's thread."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import st_mamba.async_batching as async_batching


def test_waiting_queries_go_out_together_and_the_loop_thread_gives_back_its_openmp_workers(monkeypatch):
    events = []
    monkeypatch.setattr(async_batching, "release_threads", lambda: events.append(("release", threading.get_ident())))

    def encode(texts: list[str]) -> list[list[float]]:
        events.append(("encode", threading.get_ident(), list(texts)))
        return [[float(len(text))] for text in texts]

    async def main() -> tuple[list, int]:
        batcher = async_batching.QueryBatcher(encode, ThreadPoolExecutor(max_workers=1))
        first = await asyncio.gather(*(batcher.embed(text) for text in ("a", "bb", "ccc")))
        second = await batcher.embed("dddd")
        return [*first, second], threading.get_ident()

    rows, loop_thread = asyncio.run(main())
    assert rows == [[1.0], [2.0], [3.0], [4.0]]
    assert [event[0] for event in events] == ["release", "encode", "release", "encode"]
    assert {event[1] for event in events if event[0] == "release"} == {loop_thread}  # the loop's own workers
    assert all(event[1] != loop_thread for event in events if event[0] == "encode")
    assert [event[2] for event in events if event[0] == "encode"] == [["a", "bb", "ccc"], ["dddd"]]
