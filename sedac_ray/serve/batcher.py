"""Load-adaptive batching for replica methods.

Ray Serve's ``@serve.batch`` forms the next batch as soon as the current one starts, so while a
batch computes every new arrival becomes a batch of its own and waits in line. Here a batch is
only formed when one of ``max_in_flight`` slots is free, from everything that queued up in the
meantime: batches grow with load, and a lone request waits at most ``wait_s`` for company.

With a ``target`` (how many items the caller expects in the next batch, and at most how many it
may hold), a batch instead waits until that many have queued, or ``wait_s`` passed: callers that
come back a little apart (the front door streams each token before it submits the sequence's next
step) still travel together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Clear ``event`` and wait for the next ``set()``, at most ``timeout_s``; whether it came."""
    event.clear()
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except asyncio.TimeoutError:  # an alias of TimeoutError from 3.11 on
        return False
    return True


class Batcher(Generic[Item, Result]):
    def __init__(
        self,
        handler: Callable[[list[Item]], Awaitable[list[Result]]],
        max_size: int,
        wait_s: float,
        max_in_flight: int = 1,
        target: Callable[[], int] | None = None,
    ):
        self.handler = handler
        self.max_size = max_size
        self.wait_s = wait_s
        self.max_in_flight = max_in_flight
        self.target = target
        self.sizes: list[int] = []  # recent batch sizes, for stats
        self.batches = 0
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self._arrived = asyncio.Event()

    @property
    def queued(self) -> int:
        """Items waiting for a batch."""
        return self._queue.qsize()

    async def submit(self, item: Item) -> Result:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        self._arrived.set()
        return await future

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.max_in_flight)
        while True:
            await slots.acquire()  # the next batch forms only when it can run
            batch = [await self._queue.get()]
            size = self.max_size
            if self.target is not None:
                size = max(1, min(size, self.target()))
                await self._gather(size - 1)
            elif self._queue.empty() and self.wait_s > 0:
                await asyncio.sleep(self.wait_s)
            while not self._queue.empty() and len(batch) < size:
                batch.append(self._queue.get_nowait())
            batch = [(item, future) for item, future in batch if not future.cancelled()]
            if not batch:
                slots.release()
                continue
            self.sizes = (self.sizes + [len(batch)])[-1000:]
            self.batches += 1
            task = asyncio.get_running_loop().create_task(self._process(batch))
            task.add_done_callback(lambda _: slots.release())

    async def _gather(self, count: int) -> None:
        """Wait until ``count`` more items queued, or ``wait_s`` passed."""
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while self._queue.qsize() < count:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            if not await wait_set(self._arrived, remaining):
                return

    async def _process(self, batch: list[tuple[Item, asyncio.Future]]) -> None:
        try:
            results = await self.handler([item for item, _ in batch])
        except Exception as error:  # every caller in the batch gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):  # this item alone failed
                future.set_exception(result)
            else:
                future.set_result(result)
