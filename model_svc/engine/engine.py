"""One engine step: schedule -> execute -> sample -> update."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

from model_svc.engine.kv_cache import KVCache
from model_svc.engine.runner import ModelRunner
from model_svc.engine.sampler import Sampler
from model_svc.engine.scheduler import Scheduler
from model_svc.engine.sequence import FinishReason, Sequence


@dataclass
class TokenOutput:
    """What one sequence got from one step (or from an abort between steps)."""

    seq_id: Hashable
    token_id: int | None  # None when the sequence ended without a new token
    finish_reason: FinishReason | None = None  # None while it runs
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    error: str = ""
    retryable: bool = False  # the error refused the sequence (capacity, deadline): it may be retried later


@dataclass
class StepStats:
    num_sequences: int = 0  # sequences computed in the step
    num_tokens: int = 0  # tokens computed in the step (prefill chunks and decodes)
    num_cached_tokens: int = 0  # tokens admitted sequences found in the prefix cache instead
    num_preempted: int = 0  # sequences preempted this step
    num_pairs: int = 0  # attention pairs computed (the step-time model's input)


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, sampler: Sampler, kv_cache: KVCache):
        self.runner = runner
        self.scheduler = scheduler
        self.sampler = sampler
        self.kv_cache = kv_cache
        self.last_step = StepStats()

    def add(self, seq: Sequence) -> None:
        self.sampler.prepare(seq)
        self.scheduler.add(seq)

    def abort(self, seq_id: Hashable) -> TokenOutput | None:
        seq = self.scheduler.abort(seq_id)
        return None if seq is None else TokenOutput(seq_id, None, FinishReason.CANCELLED)

    def step(self) -> list[TokenOutput]:
        """Runs one step; returns one output per sequence that got a token or finished."""
        out = self.scheduler.schedule()
        self.last_step = StepStats(len(out.scheduled), out.num_batched_tokens, out.num_cached_tokens,
                                   out.num_preempted, out.num_pairs)
        if out.is_empty:
            return []
        try:
            for copy in out.copies:
                self.kv_cache.copy(copy.src_slots, copy.dst_slots)
            logits = self.runner.execute(out.scheduled, self.kv_cache)
            sampling = [item.seq for item in out.scheduled if item.completes_prompt]
            tokens = self.sampler.sample(logits, sampling)
        except Exception as exc:  # a failed step fails its sequences, never the server
            seqs = [item.seq for item in out.scheduled]
            self.scheduler.fail(seqs)
            message = f"{type(exc).__name__}: {exc}"
            return [TokenOutput(s.seq_id, None, FinishReason.ERROR, error=message) for s in seqs]
        self.scheduler.update(out, {seq.seq_id: t.token_id for seq, t in zip(sampling, tokens)})
        return [
            TokenOutput(seq.seq_id, t.token_id, seq.finish_reason, t.logprob, t.top_logprobs)
            for seq, t in zip(sampling, tokens)
        ]
