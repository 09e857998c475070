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


class Finisher:
    """A fake finish stage: records which batches it got, in which thread, and can be held."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, doubled: Sequence[int]) -> list[int | Exception]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(doubled))
        self.entered.set()
        self.release.wait(30)
        return [ValueError("odd") if p == 6 else p + 1 for p in doubled]


def test_the_next_batch_runs_while_one_finishes_but_no_further():
    run, finish = Recorder(), Finisher()

    async def main() -> list[object]:
        batcher = Batcher(run, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=16, finish=finish)
        batcher.start()
        try:
            jobs = [batcher.submit(p) for p in range(4)]
            assert await asyncio.to_thread(finish.entered.wait, 30)  # batch 0 is finishing, and held there
            for _ in range(100):  # batch 1 runs meanwhile
                if len(run.batches) == 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            assert run.batches == [[0], [1]]  # batch 2 waits until batch 0 has finished
            assert batcher.running == 2 and batcher.depth() == 2 and not any(j.future.done() for j in jobs)
            finish.release.set()
            return list(await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs), return_exceptions=True), 30))
        finally:
            finish.release.set()
            await batcher.drain()

    results = asyncio.run(main())
    assert results[:3] == [1, 3, 5] and isinstance(results[3], ValueError)  # one image's failure stays its own
    assert run.batches == [[0], [1], [2], [3]] and finish.batches == [[0], [2], [4], [6]]
    assert len(finish.threads) == 1 and not finish.threads & {"MainThread"}


def test_a_finish_stage_that_raises_fails_its_batch_only_and_drain_waits_for_finishing():
    run = Recorder()
    calls: list[list[int]] = []

    def finish(doubled: Sequence[int]) -> list[int]:
        calls.append(list(doubled))
        time.sleep(0.2)
        if doubled == [0, 2]:
            raise RuntimeError("post-processing bug")
        return list(doubled)

    async def main() -> tuple[list[object], list[object]]:
        batcher = Batcher(run, max_batch_size=2, max_queue_delay_s=0.0, max_queue_size=16, finish=finish)
        batcher.start()
        first = [batcher.submit(p) for p in range(2)]
        second = [batcher.submit(p) for p in range(2, 4)]
        await batcher.drain()  # returns only once the last batch has left the finishing thread
        assert batcher.running == 0
        done = [j.future for j in first + second]
        assert all(f.done() for f in done)
        return [f.exception() for f in done[:2]], [f.result() for f in done[2:]]

    failed, ok = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) for e in failed) and ok == [4, 6]
    assert calls == [[0, 2], [4, 6]]


def test_without_overlap_the_next_batch_waits_for_the_last_to_finish():
    run, finish = Recorder(), Finisher()

    async def main() -> list[object]:
        batcher = Batcher(run, 1, 0.0, 16, finish=finish, overlap=False)
        batcher.start()
        try:
            jobs = [batcher.submit(p) for p in range(2)]
            assert await asyncio.to_thread(finish.entered.wait, 30)
            await asyncio.sleep(0.3)
            assert run.batches == [[0]]  # batch 1 has not run while batch 0 finishes
            finish.release.set()
            return list(await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 30))
        finally:
            finish.release.set()
            await batcher.drain()

    assert asyncio.run(main()) == [1, 3]
    assert run.batches == [[0], [1]]


def test_a_finish_stage_that_loses_results_still_answers_every_job():
    async def main() -> list[object]:
        batcher = Batcher(Recorder(), 3, 0.0, 16, finish=lambda doubled: list(doubled)[:1])
        batcher.start()
        jobs = [batcher.submit(p) for p in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs), return_exceptions=True), 30)
        await batcher.drain()
        return list(results)

    results = asyncio.run(main())
    assert len(results) == 3 and all(
        isinstance(r, RuntimeError) and "1 results for a batch of 3" in str(r) for r in results
    )
