"""The loop that steps the engine.

gRPC handlers run on an asyncio loop in a helper thread; the engine steps on the
process's main thread (torch releases the GIL while it computes). The main
thread, because OpenMP keeps one worker pool per thread that has used it: the
weights are loaded on the main thread, and stepping on a second one made every
parallel kernel wait on two pools (half the throughput, measured: see the README's
"Measured costs behind the design"). Commands (add, abort) are queued
and applied between steps, and each step's outputs go to `publish`, which the
server uses to hand them back to the asyncio loop.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Callable, Hashable, Iterable

from prometheus_client import Counter, Histogram

from model_svc.engine.engine import Engine, TokenOutput
from model_svc.engine.schedule_types import SchedulerFull
from model_svc.engine.sequence import FinishReason, Sequence

log = logging.getLogger("genrpc.engine")

Publish = Callable[[list[TokenOutput]], None]
MAX_BACKOFF_S = 1.0  # the longest pause after failures in a row (an engine failing every step idles)

STEP_SECONDS = Histogram("genrpc_model_step_seconds", "duration of one engine step",
                         buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5))
BATCH_SEQUENCES = Histogram("genrpc_model_batch_sequences", "sequences computed in one step",
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
CACHED_PREFIX_TOKENS = Counter("genrpc_model_cached_prefix_tokens",
                               "tokens admitted sequences took from the prefix cache instead of computing them")
INTERRUPTED_STEPS = Counter("genrpc_model_interrupted_steps",
                            "steps stopped between layers for an arrival (a more urgent request, or a prompt "
                            "while only long prompts prefilled); their work is redone")
CAPPED_SEQUENCES = Counter("genrpc_model_fair_share_skips",
                           "sequences that could have run in a step but skipped it for fair shares: a tenant "
                           "running many beside a lighter one (--tenant-slowdown)")
SPEC_PROPOSED = Counter("genrpc_model_spec_proposed_tokens",
                        "tokens proposed by prompt lookup and verified (speculative decoding)")
SPEC_ACCEPTED = Counter("genrpc_model_spec_accepted_tokens",
                        "of those, tokens kept (emitted without a step of their own)")
SPEC_ACCEPT_RATE = Histogram("genrpc_model_spec_acceptance_rate",
                             "share of a sequence's proposals kept, one observation per verification",
                             buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0))
SEQUENCE_STEP_TOKENS = Histogram("genrpc_model_sequence_step_tokens",
                                 "tokens one sequence got from one step (1 without speculation)",
                                 buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 33))
ADAPTER_SEQUENCES = Counter("genrpc_model_adapter_sequences", "sequences admitted to the engine, by LoRA adapter",
                            ["adapter"])
BATCH_TOKENS = Histogram("genrpc_model_batch_tokens", "tokens computed in one step (prefill and decode)",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048))


class EngineLoop:
    def __init__(self, engine: Engine, publish: Publish | None = None,
                 between_steps: Callable[[], None] | None = None):
        self.engine = engine
        self.publish = publish or (lambda outputs: None)
        self.between_steps = between_steps or (lambda: None)  # on the engine thread (the thread policy)
        self.after_step: Callable[[], None] = lambda: None  # on the engine thread (KV-cache events)
        self._commands: deque[tuple[str, object]] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._num_pending_adds = 0
        engine.adapters.defer = self.call  # adapters are read on threads of their own, installed between steps

    @property
    def stopped(self) -> bool:
        """Whether `stop()` was called (the server is going down)."""
        return self._stopped

    def stop(self) -> None:
        """Makes `run()` return after the current step; callable from any thread."""
        with self._wake:
            self._stopped = True
            self._wake.notify()

    def add(self, seqs: list[Sequence]) -> None:
        """Queues sequences; raises SchedulerFull at once when the waiting bound would be passed."""
        scheduler = self.engine.scheduler
        with self._wake:
            num_waiting = scheduler.num_waiting + self._num_pending_adds
            if num_waiting + len(seqs) > scheduler.config.max_waiting:
                raise SchedulerFull(
                    f"the model worker is at capacity ({num_waiting} sequences waiting, "
                    f"max_waiting={scheduler.config.max_waiting}); retry later"
                )
            self._num_pending_adds += len(seqs)
            self._commands.append(("add", seqs))
            self._wake.notify()
        self.engine.interrupt_for(seqs)

    def abort(self, seq_ids: Iterable[Hashable]) -> None:
        with self._wake:
            self._commands.append(("abort", list(seq_ids)))
            self._wake.notify()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Runs `fn` on the engine thread between two steps (after the commands queued before it);
        its result or exception comes back through the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._commands.append(("call", (fn, future)))
            self._wake.notify()
        return future

    def _apply_commands(self, outputs: list[TokenOutput]) -> None:
        """Applies the queued adds and aborts, appending their outputs (a refusal, an abort's end)."""
        while True:
            with self._wake:
                if not self._commands:
                    return
                kind, payload = self._commands.popleft()
                if kind == "add":
                    self._num_pending_adds -= len(payload)
            if kind == "add":
                for seq in payload:
                    try:
                        self.engine.add(seq)
                        if seq.adapter and seq.beam_of is None:
                            ADAPTER_SEQUENCES.labels(seq.adapter).inc()
                    except (ValueError, SchedulerFull) as exc:
                        outputs.append(TokenOutput(seq.seq_id, None, FinishReason.ERROR, error=str(exc),
                                                   retryable=isinstance(exc, SchedulerFull)))
                    except Exception as exc:  # not the request's fault: it ends, the others go on
                        log.error("adding a sequence failed", exc_info=exc)
                        outputs.append(TokenOutput(seq.seq_id, None, FinishReason.ERROR,
                                                   error=f"adding the sequence failed ({type(exc).__name__})"))
            elif kind == "call":
                fn, future = payload
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as exc:  # the caller's to report; the engine goes on
                        future.set_exception(exc)
            else:
                for seq_id in payload:
                    outputs.extend(self.engine.abort(seq_id))

    def run(self) -> None:
        """Steps the engine on the calling thread until `stop()`. Whatever fails, every sequence it
        touched ends with an output (the engine fails them), the outputs already collected go out,
        and failures in a row back off (up to MAX_BACKOFF_S) instead of spinning."""
        failures = 0
        while True:
            with self._wake:
                while not self._stopped and not self._commands and not self.engine.scheduler.has_work:
                    self._wake.wait(timeout=1.0)  # wakes now and then so signal handlers can run
                if self._stopped:
                    return
                if failures:  # woken early by a command or stop(), or not at all
                    self._wake.wait(timeout=min(MAX_BACKOFF_S, 0.01 * 2 ** failures))
                    if self._stopped:
                        return
            outputs: list[TokenOutput] = []
            try:
                self.between_steps()
                self.engine.interrupt.clear()  # what asked for it is among the commands
                self._apply_commands(outputs)
                started = time.perf_counter()
                interrupted, failed_before = self.engine.num_interrupted, self.engine.num_failures
                outputs.extend(self.engine.step())
                INTERRUPTED_STEPS.inc(self.engine.num_interrupted - interrupted)
                stats = self.engine.last_step
                CAPPED_SEQUENCES.inc(stats.num_capped)
                if stats.num_tokens:
                    elapsed = time.perf_counter() - started
                    STEP_SECONDS.observe(elapsed)
                    self.engine.scheduler.cost.observe(stats.num_tokens, stats.num_pairs, elapsed)
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("step: %d sequences, %d tokens, %.1f ms", stats.num_sequences, stats.num_tokens,
                                  elapsed * 1000)
                    BATCH_SEQUENCES.observe(stats.num_sequences)
                    BATCH_TOKENS.observe(stats.num_tokens)
                    CACHED_PREFIX_TOKENS.inc(stats.num_cached_tokens)
                    if stats.num_proposed:
                        SPEC_PROPOSED.inc(stats.num_proposed)
                        SPEC_ACCEPTED.inc(stats.num_accepted)
                        for proposed, kept in stats.verified:
                            SPEC_ACCEPT_RATE.observe(kept / proposed)
                    for count in stats.emitted:
                        SEQUENCE_STEP_TOKENS.observe(count)
                failures = failures + 1 if self.engine.num_failures != failed_before else 0
            except Exception as exc:  # never let the engine thread die, nor a sequence wait for nothing
                outputs.extend(self.engine.fail_all(exc))
                failures += 1
            if outputs:
                self.publish(outputs)
            try:
                self.after_step()
            except Exception:  # noqa: BLE001 - a listener's failure must not stop the engine
                log.exception("after a step")

    @property
    def num_running(self) -> int:
        return self.engine.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.scheduler.num_waiting + self._num_pending_adds
