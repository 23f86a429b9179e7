"""The thread that steps the engine.

gRPC handlers run on the asyncio loop; the model runs here, on its own thread
(torch releases the GIL while it computes). Commands (add, abort) are queued
and applied between steps, and each step's outputs go to `publish`, which the
server uses to hand them back to the asyncio loop.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable, Hashable, Iterable

from model_svc.engine.engine import Engine, TokenOutput
from model_svc.engine.scheduler import SchedulerFull
from model_svc.engine.sequence import FinishReason, Sequence

log = logging.getLogger("genrpc.engine")

Publish = Callable[[list[TokenOutput]], None]


class EngineLoop:
    def __init__(self, engine: Engine, publish: Publish):
        self.engine = engine
        self.publish = publish
        self._commands: deque[tuple[str, object]] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._num_pending_adds = 0
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def add(self, seqs: list[Sequence]) -> None:
        """Queues sequences; raises SchedulerFull at once when the waiting bound would be passed."""
        scheduler = self.engine.scheduler
        with self._wake:
            num_waiting = scheduler.num_waiting + self._num_pending_adds
            if num_waiting + len(seqs) > scheduler.max_waiting:
                raise SchedulerFull(
                    f"the model worker is at capacity ({num_waiting} sequences waiting, "
                    f"max_waiting={scheduler.max_waiting}); retry later"
                )
            self._num_pending_adds += len(seqs)
            self._commands.append(("add", seqs))
            self._wake.notify()

    def abort(self, seq_ids: Iterable[Hashable]) -> None:
        with self._wake:
            self._commands.append(("abort", list(seq_ids)))
            self._wake.notify()

    def _apply_commands(self) -> list[TokenOutput]:
        outputs = []
        while True:
            with self._wake:
                if not self._commands:
                    return outputs
                kind, payload = self._commands.popleft()
                if kind == "add":
                    self._num_pending_adds -= len(payload)
            if kind == "add":
                for seq in payload:
                    try:
                        self.engine.add(seq)
                    except (ValueError, SchedulerFull) as exc:
                        outputs.append(TokenOutput(seq.seq_id, None, FinishReason.ERROR, error=str(exc)))
            else:
                for seq_id in payload:
                    out = self.engine.abort(seq_id)
                    if out is not None:
                        outputs.append(out)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._commands and not self.engine.scheduler.has_work:
                    self._wake.wait()
                if self._stopped:
                    return
            try:
                outputs = self._apply_commands()
                outputs.extend(self.engine.step())
            except Exception:  # never let the engine thread die
                log.exception("engine step failed")
                continue
            if outputs:
                self.publish(outputs)

    @property
    def num_running(self) -> int:
        return self.engine.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.scheduler.num_waiting + self._num_pending_adds
