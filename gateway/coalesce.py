"""Merging concurrent backend calls into one (request coalescing, with no added wait).

A burst of requests would otherwise make one tokenizer Encode and one model Submit each. A unary
call costs its callee a fixed amount of CPU whatever it carries, ten times a short prompt's own
share in a batch (README, "Measured costs behind the design"), and where the services share cores
with the model, that time comes out of the step that is prefilling the burst's first prompts.

`Coalescer.call()` sends at once while fewer than `max_in_flight` calls are in flight, so a lone
request pays nothing and no timer is involved. A call that finds them all busy queues, and when one
finishes, everything queued under the same key goes as one call. (Triton's dynamic batcher with no
queue delay behaves the same way.) Each caller keeps its own timeout; the merged call gets the
longest. A caller that gave up before its merged call answered gets nothing, and `on_orphan` is told
what it would have got (a submit's sequences are running then, and need aborting).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Hashable

from gateway import metrics

# send(items, timeout) -> one result per item, in order; an item's result may be an exception.
SendFn = Callable[[list[Any], "float | None"], Awaitable[list[Any]]]


@dataclass
class _Waiting:
    item: Any
    future: asyncio.Future
    deadline: float | None  # event-loop time


class Coalescer:
    def __init__(self, name: str, send: SendFn, max_in_flight: int, max_batch: int = 64,
                 on_orphan: Callable[[Any, Any], None] | None = None):
        if max_in_flight < 1 or max_batch < 1:
            raise ValueError("max_in_flight and max_batch must be at least 1")
        self._calls_per_send = metrics.COALESCED_CALLS.labels(name)
        self._send = send
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self._on_orphan = on_orphan
        self._queues: dict[Hashable, list[_Waiting]] = {}  # insertion order: oldest key first
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        self.num_calls = 0  # merged calls sent
        self.num_items = 0  # items they carried

    async def call(self, key: Hashable, item: Any, timeout: float | None = None) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        deadline = None if timeout is None else loop.time() + timeout
        self._queues.setdefault(key, []).append(_Waiting(item, future, deadline))
        self._pump()
        if timeout is None:
            return await future
        return await asyncio.wait_for(future, timeout)  # cancels the future when the time is up

    def _pump(self) -> None:
        while self._in_flight < self.max_in_flight and self._queues:
            key = next(iter(self._queues))
            waiting = self._queues[key]
            batch = [w for w in waiting[:self.max_batch] if not w.future.done()]  # done: gave up already
            if len(waiting) > self.max_batch:
                self._queues[key] = waiting[self.max_batch:]
            else:
                del self._queues[key]
            if batch:
                self._in_flight += 1
                task = asyncio.get_running_loop().create_task(self._run(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Waiting]) -> None:
        try:
            deadlines = [w.deadline for w in batch]
            timeout = (None if None in deadlines
                       else max(0.0, max(deadlines) - asyncio.get_running_loop().time()))
            self.num_calls += 1
            self.num_items += len(batch)
            self._calls_per_send.observe(len(batch))
            try:
                results = await self._send([w.item for w in batch], timeout)
            except asyncio.CancelledError:
                for w in batch:
                    w.future.cancel()
                raise
            except Exception as exc:
                results = [exc] * len(batch)
            if len(results) != len(batch):
                error = RuntimeError(f"coalesced call gave {len(results)} results for {len(batch)} calls")
                results = [error] * len(batch)
            for w, result in zip(batch, results):
                if w.future.done():  # the caller gave up
                    if self._on_orphan is not None and not isinstance(result, BaseException):
                        self._on_orphan(w.item, result)
                elif isinstance(result, BaseException):
                    w.future.set_exception(result)
                else:
                    w.future.set_result(result)
        finally:
            self._in_flight -= 1
            self._pump()
