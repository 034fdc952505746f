"""A bounded queue and N worker tasks: the off-hot-path work of the shadow scorer and the mirror.

    pool = WorkerPool("shadow", size=256, concurrency=2, handle=score, on_drop=dropped.inc)
    pool.start()              # on the app's loop
    pool.offer(item)          # never waits; False (and `on_drop()`) when the queue is full
    await pool.stop()

A handler deals with its own expected failures; anything else it raises is logged and the
worker goes on with the next item (no user waits on these).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger("stillhouse.gateway")

Item = TypeVar("Item")


class WorkerPool(Generic[Item]):
    """`concurrency` tasks taking items from a queue of at most `size`."""

    def __init__(
        self,
        name: str,
        size: int,
        concurrency: int,
        handle: Callable[[Item], Awaitable[None]],
        on_drop: Callable[[], None],
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.concurrency = concurrency
        self.queue: asyncio.Queue[Item] = asyncio.Queue(maxsize=size)
        self._handle = handle
        self._on_drop = on_drop
        self._on_depth = on_depth  # told the queue's length after each put and take
        self._workers: list[asyncio.Task[None]] = []

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def offer(self, item: Item) -> bool:
        """Queue `item` without waiting; False (and counted) when the queue is full."""
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self._on_drop()
            return False
        if self._on_depth is not None:
            self._on_depth(self.queue.qsize())
        return True

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"{self.name}-{i}")
            for i in range(self.concurrency)
        ]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    async def _work(self) -> None:
        while True:
            item = await self.queue.get()
            if self._on_depth is not None:
                self._on_depth(self.queue.qsize())
            try:
                await self._handle(item)
            except Exception:  # a bug must not end the worker
                log.exception("%s worker: an item failed", self.name)
            finally:
                self.queue.task_done()
