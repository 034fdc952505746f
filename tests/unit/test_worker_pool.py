"""`WorkerPool`, the shadow scorer's and the mirror's queue: bounded, never waits, counts drops,
and survives a handler that raises."""

from __future__ import annotations

import asyncio

from stillhouse.serving.gateway.workers import WorkerPool


def test_a_full_queue_drops_and_counts_without_waiting():
    async def scenario() -> tuple[list[bool], int, list[int]]:
        drops, depths = [], []
        release = asyncio.Event()

        async def handle(item: int) -> None:
            await release.wait()

        pool = WorkerPool(
            "t", 2, 1, handle, on_drop=lambda: drops.append(1), on_depth=depths.append
        )
        pool.start()
        first = pool.offer(0)
        await asyncio.sleep(0.01)  # the worker takes it: the queue is empty again
        offered = [first] + [pool.offer(i) for i in range(1, 5)]
        release.set()
        await pool.queue.join()
        await pool.stop()
        return offered, len(drops), depths

    offered, dropped, depths = asyncio.run(scenario())
    assert offered == [True, True, True, False, False]  # one in hand, two waiting, two dropped
    assert dropped == 2
    assert depths[:2] == [1, 0] and max(depths) == 2 and depths[-1] == 0


def test_a_handler_that_raises_does_not_end_its_worker():
    async def scenario() -> list[int]:
        done: list[int] = []

        async def handle(item: int) -> None:
            if item == 1:
                raise RuntimeError("a bug")
            done.append(item)

        pool = WorkerPool("t", 8, 1, handle, on_drop=lambda: None)
        pool.start()
        for i in range(4):
            pool.offer(i)
        await pool.queue.join()
        await pool.stop()
        return done

    assert asyncio.run(scenario()) == [0, 2, 3]


def test_stop_cancels_the_workers_mid_item():
    async def scenario() -> int:
        async def handle(item: int) -> None:
            await asyncio.sleep(60)

        pool = WorkerPool("t", 8, 3, handle, on_drop=lambda: None)
        pool.start()
        pool.offer(1)
        await asyncio.sleep(0.01)
        await asyncio.wait_for(pool.stop(), 2)
        return pool.depth

    assert asyncio.run(scenario()) == 0
