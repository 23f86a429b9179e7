"""Iteration-level scheduling: which sequences run this step, and how many tokens each.

Every step, each running sequence decodes one token (or continues its chunked
prefill), then waiting sequences are admitted while the step's token budget,
the step's prefill budget and the KV budget allow. The prefill budget keeps a
burst of arrivals from turning into one long step that delays every first
token: prompts are prefilled a few at a time, in arrival order, while running
sequences keep decoding. A prompt longer than the prefill budget is prefilled
in chunks; a shorter one is never split (it waits for the next step instead).
A finished or aborted sequence leaves at once and its KV reservation is freed.

Prefix sharing: a sequence admitted while another running sequence has already
computed the same leading tokens (a common system prompt, the same question
asked twice, a conversation's earlier turns) starts from a copy of those keys
and values instead of computing them again. This is exact, not approximate: a
token's keys and values depend only on the tokens before it, and with the
native attention path they come out bit for bit the same however they were
batched or chunked, so a copied prefix equals a recomputed one. Only running
sequences donate (finished ones free their cache at once), and at least the
prompt's last token is always computed, for its logits.
The scheduler never touches tensors: it lists the copies for the step to make.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable

from model_svc.engine.kv_cache import KVCacheManager
from model_svc.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step (1 for a decode, a chunk for a prefill)
    completes_prompt: bool = field(init=False)  # this step reaches the sequence's last token, so one is sampled

    def __post_init__(self) -> None:
        self.completes_prompt = self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class PrefixCopy:
    """Copy num_tokens keys and values from arena slot src onward to slot dst onward, before the step."""

    src: int
    dst: int
    num_tokens: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)  # decodes first, then prefills
    copies: list[PrefixCopy] = field(default_factory=list)  # in order: a later copy may read an earlier one

    @property
    def num_shared_tokens(self) -> int:
        return sum(c.num_tokens for c in self.copies)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class SchedulerFull(Exception):
    """The waiting queue is at its bound."""


class Scheduler:
    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_seqs: int,
        max_batch_tokens: int,
        max_waiting: int,
        max_context: int,
        eos_token_ids: Iterable[int],
        max_prefill_tokens: int | None = None,
        max_shared_prompt: int = 0,
    ):
        """max_shared_prompt: prompts up to this many tokens share prefixes (0: no sharing). The
        runner's native attention path sets it: only there is a copied prefix bit-exact."""
        if max_batch_tokens < max_num_seqs:
            raise ValueError(
                f"max_batch_tokens={max_batch_tokens} must be >= max_num_seqs={max_num_seqs}: "
                "every running sequence decodes one token per step"
            )
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens or max_batch_tokens
        self.max_shared_prompt = max_shared_prompt
        self.max_waiting = max_waiting
        self.max_context = max_context
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.by_id: dict[Hashable, Sequence] = {}

    # -- admission -----------------------------------------------------------------

    def kv_tokens_needed(self, seq: Sequence) -> int:
        return min(seq.num_prompt_tokens + seq.params.max_new_tokens, self.max_context)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise SchedulerFull(f"{len(self.waiting)} sequences already wait (max_waiting={self.max_waiting})")
        if seq.seq_id in self.by_id:
            raise ValueError(f"sequence id {seq.seq_id!r} is already in use")
        need = self.kv_tokens_needed(seq)
        if need > self.kv_cache.budget_tokens:
            raise ValueError(
                f"the sequence needs {need} KV-cache tokens (prompt + max_new_tokens) but this worker "
                f"holds {self.kv_cache.budget_tokens}"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.by_id[seq.seq_id] = seq

    def abort(self, seq_id: Hashable) -> Sequence | None:
        """Ends a sequence between steps and frees its KV cache; None if it is unknown or already over."""
        seq = self.by_id.get(seq_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._finish(seq, FinishReason.CANCELLED)
        return seq

    # -- the step ------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_batch_tokens
        prefill_budget = self.max_prefill_tokens
        for seq in self.running:
            uncomputed = seq.num_uncomputed_tokens
            num_new = min(uncomputed, budget) if uncomputed == 1 else min(uncomputed, budget, prefill_budget)
            if num_new > 0:
                out.scheduled.append(ScheduledSequence(seq, num_new))
                budget -= num_new
                if uncomputed > 1:
                    prefill_budget -= num_new
        while self.waiting and min(budget, prefill_budget) > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            room = min(budget, prefill_budget)
            donor, num_shared = self.shared_prefix(seq)
            uncomputed = seq.num_uncomputed_tokens - num_shared
            if room < uncomputed <= min(self.max_prefill_tokens, self.max_batch_tokens):
                break  # it fits a step of its own: do not split it
            need = self.kv_tokens_needed(seq)
            if not self.kv_cache.can_allocate(need):
                break  # first come, first served: later ones wait behind it
            self.waiting.popleft()
            seq.kv_cache = self.kv_cache.allocate(need)
            if num_shared:
                out.copies.append(PrefixCopy(donor.kv_cache.start, seq.kv_cache.start, num_shared))
                seq.num_computed_tokens += num_shared
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(seq.num_uncomputed_tokens, room)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            prefill_budget -= num_new
        return out

    def shared_prefix(self, seq: Sequence) -> tuple[Sequence | None, int]:
        """The running sequence whose computed tokens share the longest prefix with seq's prompt, and
        that prefix's length (at most the prompt's length - 1)."""
        if seq.num_computed_tokens or not 0 < seq.num_prompt_tokens <= self.max_shared_prompt:
            return None, 0
        prompt = seq.prompt_ids
        best, best_len = None, 0
        for other in self.running:
            limit = min(len(prompt) - 1, other.num_computed_tokens)
            if limit <= best_len or other.num_prompt_tokens > self.max_shared_prompt or other.prompt_ids[0] != prompt[0]:
                continue
            tokens = other.prompt_ids if other.num_prompt_tokens >= limit else other.token_ids()
            low, high = 1, limit  # tokens[:low] == prompt[:low]; find the longest such prefix
            while low < high:
                mid = (low + high + 1) // 2
                if tokens[:mid] == prompt[:mid]:
                    low = mid
                else:
                    high = mid - 1
            if low > best_len:
                best, best_len = other, low
        return best, best_len

    def update(self, out: SchedulerOutput, sampled: dict[Hashable, int]) -> list[Sequence]:
        """Records the computed tokens and the sampled ones; returns the sequences that finished."""
        finished = []
        for item in out.scheduled:
            seq = item.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens += item.num_new_tokens
            token_id = sampled.get(seq.seq_id)
            if token_id is None:
                continue  # a prefill chunk that did not reach the prompt's end
            seq.output_ids.append(token_id)
            reason = self.check_stop(seq, token_id)
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def check_stop(self, seq: Sequence, token_id: int) -> FinishReason | None:
        """Token-level stops, as values: EOS or a stop token, then the length limits."""
        params = seq.params
        if not params.ignore_eos and len(seq.output_ids) >= params.min_new_tokens and (
            token_id in self.eos_token_ids or token_id in params.stop_token_ids
        ):
            return FinishReason.EOS_TOKEN
        if len(seq.output_ids) >= params.max_new_tokens or seq.num_tokens >= self.max_context:
            return FinishReason.LENGTH
        return None

    def fail(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            if not seq.is_finished:
                self._finish(seq, FinishReason.ERROR)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        if seq.kv_cache is not None:
            self.kv_cache.free(seq.kv_cache)
            seq.kv_cache = None
        self.by_id.pop(seq.seq_id, None)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)
