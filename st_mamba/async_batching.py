"""Dynamic batching of concurrent async queries: one encode call for all queries that are waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial

from st_mamba.ops.cpu import release_threads

Batch = list[tuple[str, asyncio.Future]]


class QueryBatcher:
    """Encodes concurrently awaited queries together, off the event loop.

    A server answering many users calls ``aembed_query`` once per request. Encoding each query alone
    leaves the batch dimension empty and makes the requests queue for the model one by one. Here a
    query that arrives while an encode is running waits for it to finish and then goes out with every
    other query that arrived meanwhile, as one batch; each caller gets its own row back.

    Before each batch goes to the executor, the event loop's thread gives back the OpenMP worker
    threads its own PyTorch work left waiting (``ops.cpu.release_threads``): with two threads' pools
    alive on a machine with few cores, libgomp makes every parallel region wake sleeping workers, and a
    CPU batch on the worker took twice as long.

    Args:
        encode: maps a list of texts to their embeddings, in order (runs on ``executor``).
        executor: where ``encode`` runs; one worker keeps calls to the model sequential.
    """

    def __init__(self, encode: Callable[[list[str]], list[list[float]]], executor: Executor) -> None:
        self._encode = encode
        self._executor = executor
        self._waiting: dict[asyncio.AbstractEventLoop, Batch] = {}
        self._busy: set[asyncio.AbstractEventLoop] = set()

    async def embed(self, text: str) -> list[float]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiting = self._waiting.setdefault(loop, [])
        waiting.append((text, future))
        if len(waiting) == 1 and loop not in self._busy:
            # Let the other tasks that are ready in this turn of the loop add their queries first.
            loop.call_soon(self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._waiting.pop(loop, [])
        if not batch:
            return
        self._busy.add(loop)
        release_threads()
        job = loop.run_in_executor(self._executor, self._encode, [text for text, _ in batch])
        job.add_done_callback(partial(self._finish, loop, batch))

    def _finish(self, loop: asyncio.AbstractEventLoop, batch: Batch, job: asyncio.Future) -> None:
        self._busy.discard(loop)
        failure = asyncio.CancelledError() if job.cancelled() else job.exception()
        rows = None if failure is not None else job.result()
        for row, (_, future) in enumerate(batch):
            if future.done():  # its caller was cancelled
                continue
            if failure is not None:
                future.set_exception(failure)
            else:
                future.set_result(rows[row])
        if self._waiting.get(loop):
            self._flush(loop)
