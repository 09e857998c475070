"""The dynamic batcher on its own, with a fake forward pass: when batches go and how large they are."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

from service.batcher import Batcher


class Recorder:
    """A fake run_batch: records each batch (and when it began), answers each payload with itself doubled,
    and can be held until the test releases it."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.started: list[float] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, payloads: Sequence[int]) -> list[int]:
        self.started.append(time.monotonic())
        self.batches.append(list(payloads))
        self.entered.set()
        self.release.wait(30)
        return [2 * p for p in payloads]


async def answers(batcher: Batcher, payloads: range, timeout: float) -> list[int]:
    jobs = [batcher.submit(p) for p in payloads]
    return list(await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), timeout))


def test_a_full_batch_goes_at_once_despite_a_long_delay():
    run = Recorder()

    async def main() -> list[int]:
        batcher = Batcher(run, max_batch_size=4, max_queue_delay_s=10.0, max_queue_size=16)
        batcher.start()
        try:
            return await answers(batcher, range(4), timeout=5.0)  # half the delay: it did not wait for it
        finally:
            await batcher.drain()

    assert asyncio.run(main()) == [0, 2, 4, 6]
    assert run.batches == [[0, 1, 2, 3]]


def test_a_partial_batch_waits_for_the_delay_then_goes():
    run = Recorder()
    delay = 0.3

    async def main() -> tuple[list[int], float]:
        batcher = Batcher(run, max_batch_size=4, max_queue_delay_s=delay, max_queue_size=16)
        batcher.start()
        submitted = time.monotonic()
        try:
            return await answers(batcher, range(2), timeout=30.0), submitted
        finally:
            await batcher.drain()

    results, submitted = asyncio.run(main())
    assert results == [0, 2]
    assert run.batches == [[0, 1]]  # one batch, not one per request
    assert run.started[0] - submitted >= delay  # it waited for more requests first


def test_no_batch_exceeds_max_batch_size():
    run = Recorder(hold=True)

    async def main() -> list[int]:
        batcher = Batcher(run, max_batch_size=3, max_queue_delay_s=0.01, max_queue_size=64)
        batcher.start()
        try:
            first = batcher.submit(100)
            assert await asyncio.to_thread(run.entered.wait, 30)  # the first batch holds the worker...
            rest = [batcher.submit(p) for p in range(20)]  # ...while 20 requests queue up
            assert batcher.depth() == 20
            run.release.set()
            futures = [first.future, *(job.future for job in rest)]
            return list(await asyncio.wait_for(asyncio.gather(*futures), 30))
        finally:
            run.release.set()
            await batcher.drain()

    assert asyncio.run(main()) == [200, *(2 * p for p in range(20))]
    assert [len(b) for b in run.batches] == [1, 3, 3, 3, 3, 3, 3, 2]
    assert sum(run.batches, []) == [100, *range(20)]  # in order, each request once
