"""A dynamic batcher with Triton's semantics.

- A batch runs as soon as `max_batch_size` requests wait, or when the oldest waiting request has waited
  `max_queue_delay` (a partial batch).
- Past `max_queue_size` waiting requests, `submit` refuses at once (the caller answers 503).
- A request whose future was cancelled (timeout, client gone) is dropped when its batch is formed; the
  rest of the batch is unaffected.
- One batch runs at a time, in a worker thread, so the event loop keeps accepting and decoding requests.
- A batch then finishes (post-processing, say) in a second thread while the next batch runs: the forward
  pass of one overlaps the host work of the other. At most one batch waits to finish, so a slow
  finish holds the next forward pass back instead of piling up model outputs. `overlap=False` keeps the
  stages in turn (the next batch runs once the last one has finished).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    pass


@dataclass
class Job:
    payload: Any
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0  # when its batch began to run


# Runs one batch in the worker thread, returning anything; finish turns that, in the finishing thread, into
# a result (or an exception) per payload, in order. Without a finish, run_batch returns those results.
BatchFn = Callable[[Sequence[Any]], Any]
FinishFn = Callable[[Any], Sequence[Any]]


def as_they_are(results: Any) -> Sequence[Any]:
    return results


class Batcher:
    def __init__(
        self,
        run_batch: BatchFn,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        on_batch: Callable[[int, int], None] | None = None,
        finish: FinishFn | None = None,
        overlap: bool = True,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.on_batch = on_batch  # (batch size, requests still waiting), as each batch leaves the queue
        self.finish = finish or as_they_are
        self.overlap = overlap
        self.queue: deque[Job] = deque()
        self.running = 0  # jobs taken from the queue and not answered yet (running or finishing)
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish")
        self._finishing: asyncio.Future[None] | None = None  # the batch finishing in the second thread
        self._task: asyncio.Task[None] | None = None

    def depth(self) -> int:
        return sum(1 for job in self.queue if not job.future.done())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    def submit(self, payload: Any) -> Job:
        if len(self.queue) >= self.max_queue_size:
            self._prune()
        if len(self.queue) >= self.max_queue_size:
            raise QueueFull
        job = Job(payload, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        self._wakeup.set()
        return job

    def _prune(self) -> None:
        self.queue = deque(job for job in self.queue if not job.future.done())

    async def _next_batch(self) -> list[Job]:
        while True:
            self._prune()
            if not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self.queue[0].enqueued + self.max_queue_delay_s
            while len(self.queue) < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
                self._prune()
            batch: list[Job] = []
            while self.queue and len(batch) < self.max_batch_size:
                job = self.queue.popleft()
                if not job.future.done():
                    batch.append(job)
            if batch:
                return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self.running += len(batch)
            now = time.monotonic()
            for job in batch:
                job.started = now
            if self.on_batch:
                self.on_batch(len(batch), self.depth())
            try:
                out = await loop.run_in_executor(self._executor, self.run_batch, [job.payload for job in batch])
            except Exception as err:  # the whole batch failed; the next one still runs
                self._answer(batch, [err] * len(batch))
                continue
            if self._finishing is not None:  # the batch before this one must have left the finishing thread;
                await asyncio.shield(self._finishing)  # shielded: a cancelled loop still answers that batch
            self._finishing = loop.create_task(self._finish(batch, out))
            if not self.overlap:
                await asyncio.shield(self._finishing)

    async def _finish(self, batch: list[Job], out: Any) -> None:
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._finisher, self.finish, out)
        except Exception as err:
            results = [err] * len(batch)
        self._answer(batch, results)

    def _answer(self, batch: list[Job], results: Sequence[Any]) -> None:
        self.running -= len(batch)
        if len(results) != len(batch):  # a bug below; every job must still be answered
            results = [RuntimeError(f"{len(results)} results for a batch of {len(batch)}")] * len(batch)
        for job, result in zip(batch, results):
            if job.future.done():
                continue  # cancelled while running
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    async def drain(self) -> None:
        """Wait until every queued and running job is answered, then stop."""
        while self.queue or self.running:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
        self._executor.shutdown(wait=True)
        self._finisher.shutdown(wait=True)
