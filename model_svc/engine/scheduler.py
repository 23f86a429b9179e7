"""Iteration-level scheduling: which sequences run this step, and how many tokens each.

Every step, each running sequence decodes one token (or continues its chunked
prefill), then waiting sequences are admitted while the step's token budget,
the step's prefill budget and the KV budget allow. The prefill budget keeps a
burst of arrivals from turning into one long step that delays every first
token: prompts are prefilled a few at a time, in arrival order, while running
sequences keep decoding. A prompt longer than the prefill budget is prefilled
in chunks; a shorter one is never split (it waits for the next step instead).
A finished or aborted sequence leaves at once and its blocks are given back.

Memory (block_manager.py): a sequence holds KV-cache blocks for the tokens it has computed, taken
as it grows, not a reservation for `max_new_tokens`. Admission needs the prompt's blocks plus a
small watermark. When a running sequence needs a block and none is free, the most recently
admitted running sequence is preempted (`victim`, the hook a scheduling policy can replace): its
blocks are given back (the full ones stay cached) and it goes to the front of the waiting queue,
to be recomputed from its tokens when there is room. The client sees a pause.

Prefix caching: a sequence starts from every leading full block of its tokens that the cache holds
(a common system prompt, the same question asked twice, a conversation's earlier turns, its own
tokens after a preemption), by reference, and computes only the rest. This is exact, not
approximate: a token's keys and values depend only on the tokens before it, and with the native
attention path they come out bit for bit the same however they were batched or chunked, so a
cached block equals a recomputed one. Only full blocks are hashed; a prompt that goes on matching a
running sequence's computed tokens into a partial block (prompts sharing their first few words, or
a chat template's 20-token system prompt) gets those keys and values copied into its own block,
since the other sequence will write on into its block. At least the last token is always computed,
for its logits. The scheduler never touches tensors: it lists the slots for the step to copy.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable

from model_svc.engine.block_manager import BlockManager, BlockTable
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
    """Before the step, copy the keys and values at arena slots src_slots to dst_slots (every layer)."""

    src_slots: list[int]
    dst_slots: list[int]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)  # running ones first, then admitted
    copies: list[PrefixCopy] = field(default_factory=list)  # partial blocks from running sequences
    num_cached_tokens: int = 0  # tokens admitted sequences took from the cache or copied (not computed)
    num_preempted: int = 0  # sequences preempted to make room this step

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
        blocks: BlockManager,
        max_num_seqs: int,
        max_batch_tokens: int,
        max_waiting: int,
        max_context: int,
        eos_token_ids: Iterable[int],
        max_prefill_tokens: int | None = None,
        max_cached_prompt: int = 0,
    ):
        """max_cached_prompt: sequences whose prompts are at most this many tokens read and fill the
        prefix cache (0: none). The runner's native attention path sets it: only there is a cached
        block bit for bit a recomputed one."""
        if max_batch_tokens < max_num_seqs:
            raise ValueError(
                f"max_batch_tokens={max_batch_tokens} must be >= max_num_seqs={max_num_seqs}: "
                "every running sequence decodes one token per step"
            )
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens or max_batch_tokens
        self.max_cached_prompt = max_cached_prompt if blocks.enable_prefix_caching else 0
        self.max_waiting = max_waiting
        self.max_context = max_context
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.by_id: dict[Hashable, Sequence] = {}
        self.num_preemptions = 0  # since start

    # -- admission -----------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def cacheable(self, seq: Sequence) -> bool:
        return seq.num_prompt_tokens <= self.max_cached_prompt

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise SchedulerFull(f"{len(self.waiting)} sequences already wait (max_waiting={self.max_waiting})")
        if seq.seq_id in self.by_id:
            raise ValueError(f"sequence id {seq.seq_id!r} is already in use")
        most = min(seq.num_prompt_tokens + seq.params.max_new_tokens, self.max_context)
        blocks = self.blocks
        if (blocks.blocks_for(most) > blocks.num_blocks
                or blocks.blocks_for(seq.num_prompt_tokens) + blocks.watermark_blocks > blocks.num_blocks):
            raise ValueError(  # it could never finish, even alone
                f"the sequence may need {most} KV-cache tokens (prompt + max_new_tokens) but this worker "
                f"holds {self.capacity_tokens}"
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
        i = 0
        while i < len(self.running):  # oldest first; the newest give way when blocks run out
            seq = self.running[i]
            uncomputed = seq.num_uncomputed_tokens
            num_new = min(uncomputed, budget) if uncomputed == 1 else min(uncomputed, budget, prefill_budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.blocks.ensure(seq.block_table, seq.num_computed_tokens + num_new):
                victim = self.victim()
                self.preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it was the newest left: nothing after it runs either
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            if uncomputed > 1:
                prefill_budget -= num_new
            i += 1
        while self.waiting and min(budget, prefill_budget) > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            room = min(budget, prefill_budget)
            tokens = seq.token_ids()  # after a preemption: its outputs so far too
            cacheable = self.cacheable(seq)
            num_cached_blocks = self.blocks.num_cached_prefix(tokens, len(tokens) - 1) if cacheable else 0
            num_cached = num_cached_blocks * self.blocks.block_size
            donor, num_shared = self.running_prefix(tokens, num_cached) if cacheable else (None, 0)
            num_shared = max(num_shared, num_cached)
            uncomputed = len(tokens) - num_shared
            if room < uncomputed <= min(self.max_prefill_tokens, self.max_batch_tokens):
                break  # it fits a step of its own: do not split it
            num_new = min(uncomputed, room)
            if not self.blocks.can_admit(num_shared + num_new, num_cached_blocks):
                break  # first come, first served: later ones wait behind it
            self.waiting.popleft()
            seq.block_table = self.blocks.match(tokens, len(tokens) - 1) if cacheable else BlockTable()
            self.blocks.ensure(seq.block_table, num_shared + num_new)
            if donor is not None and num_shared > num_cached:  # the partial block: a copy of its slots
                bs = self.blocks.block_size
                out.copies.append(PrefixCopy(donor.block_table.slots(num_cached, num_shared, bs),
                                             seq.block_table.slots(num_cached, num_shared, bs)))
            seq.num_computed_tokens = num_shared
            out.num_cached_tokens += num_shared
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            prefill_budget -= num_new
        return out

    def running_prefix(self, tokens: list[int], at_least: int) -> tuple[Sequence | None, int]:
        """The running sequence whose computed tokens share the longest prefix with `tokens` (at most
        all but the last token), if longer than `at_least`, and that prefix's length."""
        best, best_len = None, at_least
        for other in self.running:
            limit = min(len(tokens) - 1, other.num_computed_tokens)
            if limit <= best_len or not self.cacheable(other) or other.prompt_ids[0] != tokens[0]:
                continue
            theirs = other.prompt_ids if other.num_prompt_tokens >= limit else other.token_ids()
            low, high = 1, limit  # theirs[:low] == tokens[:low]; find the longest such prefix
            while low < high:
                mid = (low + high + 1) // 2
                if theirs[:mid] == tokens[:mid]:
                    low = mid
                else:
                    high = mid - 1
            if low > best_len:
                best, best_len = other, low
        return best, best_len

    def victim(self) -> Sequence:
        """The running sequence to preempt when blocks run out: the most recently admitted (the
        hook for a scheduling policy)."""
        return self.running[-1]

    def preempt(self, seq: Sequence) -> None:
        """Frees a running sequence's blocks (the full ones stay cached) and puts it at the front
        of the waiting queue, to be recomputed from its tokens."""
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = None
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, out: SchedulerOutput, sampled: dict[Hashable, int]) -> list[Sequence]:
        """Records the computed tokens and the sampled ones; returns the sequences that finished."""
        finished = []
        for item in out.scheduled:
            seq = item.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens += item.num_new_tokens
            table = seq.block_table
            if (self.cacheable(seq)
                    and seq.num_computed_tokens >= (table.num_hashed_blocks + 1) * self.blocks.block_size):
                self.blocks.register(table, seq.token_ids(), seq.num_computed_tokens)
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
        if seq.block_table is not None:
            self.blocks.free(seq.block_table)
            seq.block_table = None
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
