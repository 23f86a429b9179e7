"""What the scheduler is configured with and what it hands the engine each step."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from model_svc.engine.sequence import Sequence
from model_svc.engine.step_cost import chunk_pairs


class SchedulerFull(Exception):
    """The waiting queue is at its bound."""


class DeadlineUnmeetable(SchedulerFull):
    """The sequence could not start before its caller's deadline: refused at once, to retry later."""


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's limits and policy settings, checked once here (the messages name the model
    service's flags). max_prefill_tokens: prompt tokens a step admits whole beside decoding sequences
    (None: max_batch_tokens). max_cached_prompt: sequences whose prompts are at most this long read
    and fill the prefix cache (0: none; the runner's native attention sets it: only there is a cached
    block bit for bit a recomputed one). cache_long_prompts: longer prompts (the long-prompt kernel,
    chunking-invariant too) share their prompts' blocks among themselves. A long prompt's chunk may
    make a step up to `prefill_slowdown` times as long as its other work, or `idle_step_seconds` when
    there is none. tenant_slowdown: fair steps (schedule_policy.py; 0: off). speculation: decodes may
    propose tokens to verify (only where the runner's rows are batch-invariant). min_chunk: a long
    prompt advances at least this much a step."""

    max_num_seqs: int = 64
    max_batch_tokens: int = 512
    max_waiting: int = 256
    max_prefill_tokens: int | None = None
    max_cached_prompt: int = 0
    cache_long_prompts: bool = False
    prefill_slowdown: float = 2.0
    idle_step_seconds: float = 0.25
    tenant_slowdown: float = 2.0
    speculation: bool = False
    min_chunk: int = 4

    def __post_init__(self) -> None:
        checks = [
            (self.max_num_seqs >= 1, f"--max-num-seqs={self.max_num_seqs} must be >= 1"),
            (self.max_batch_tokens >= self.max_num_seqs,
             f"--max-batch-tokens={self.max_batch_tokens} must be >= --max-num-seqs={self.max_num_seqs}: every "
             "running sequence decodes one token per step"),
            (self.max_waiting >= 0, f"--max-waiting={self.max_waiting} must be >= 0"),
            (self.max_prefill_tokens is None or self.max_prefill_tokens >= 1,
             f"--max-prefill-tokens={self.max_prefill_tokens} must be >= 1"),
            (self.prefill_slowdown >= 1, f"--prefill-slowdown={self.prefill_slowdown} must be >= 1"),
            (math.isfinite(self.idle_step_seconds) and self.idle_step_seconds > 0,
             f"--idle-step-ms={self.idle_step_seconds * 1000:g} must be > 0"),
            (self.tenant_slowdown == 0 or self.tenant_slowdown >= 1,
             f"--tenant-slowdown={self.tenant_slowdown:g} must be >= 1, or 0 (fair steps off)"),
            (self.min_chunk >= 1, f"min_chunk={self.min_chunk} must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def prefill_tokens(self) -> int:
        """max_prefill_tokens as it applies (the Scheduler caps it at a step's tokens)."""
        return self.max_prefill_tokens or self.max_batch_tokens


class ItemKind(enum.Enum):
    """What a scheduled sequence computes this step."""

    DECODE = "decode"  # one token (plus any proposals to verify)
    SHORT = "short"  # a prompt admitted whole
    LONG = "long"  # a chunk of a long prompt


class Room(enum.Enum):
    """What making room for a waiting sequence found (Scheduler._make_room)."""

    MADE = "made"  # a slot and the blocks it needs are free
    REPLAN = "replan"  # a preemption changed what it can share: plan it again
    NONE = "none"  # it outranks no one it would have to preempt: it waits


@dataclass
class Plan:
    """How a waiting sequence would be admitted this step."""

    tokens: list[int]
    num_cached_blocks: int  # leading full blocks the prefix cache holds
    donor: Sequence | None  # the running sequence whose partial block is copied, if any
    num_shared: int  # tokens not computed: cached blocks, then the copied part
    uncomputed: int
    num_cached_unused: int = 0  # of the cached blocks, those no sequence holds (they count as free now)


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step (1 for a decode, a chunk for a prefill, 1 + proposals)
    kind: ItemKind = ItemKind.DECODE
    completes_prompt: bool = field(init=False)  # this step reaches the sequence's last token, so one is sampled
    # A decode's proposed next tokens (speculation.py): computed after its last token, each row sampled.
    proposals: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.completes_prompt = self.seq.num_computed_tokens + self.num_new_tokens >= self.seq.num_tokens

    @property
    def prompt_rows(self) -> bool:
        """Every row of this prompt chunk needs its logits (the prompt's logprobs were asked)."""
        return (self.seq.params.prompt_logprobs is not None and not self.proposals
                and self.seq.num_computed_tokens < self.seq.num_prompt_tokens)

    def tokens(self) -> list[int]:
        """The token ids this step computes for the sequence."""
        start = self.seq.num_computed_tokens
        return self.seq.token_ids()[start:start + self.num_new_tokens - len(self.proposals)] + self.proposals


@dataclass
class PrefixCopy:
    """Before the step, copy the keys and values at arena slots src_slots to dst_slots (every layer)."""

    src_slots: list[int]
    dst_slots: list[int]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)  # decodes, admitted, then chunks
    copies: list[PrefixCopy] = field(default_factory=list)  # partial blocks from running sequences
    num_cached_tokens: int = 0  # tokens admitted sequences took from the cache or copied (not computed)
    num_preempted: int = 0  # sequences preempted to make room this step
    num_batched_tokens: int = 0  # tokens computed this step (prefill chunks and decodes)
    num_pairs: int = 0  # attention (query, key) pairs of the scheduled tokens (step_cost.py)
    num_short_tokens: int = 0  # of prompts admitted whole
    num_long_tokens: int = 0  # of long prompts' chunks
    num_proposed_tokens: int = 0  # proposals to verify (speculation.py)
    num_capped: int = 0  # sequences that could have run but skip the step for fair shares (schedule_policy.py)
    _members: set[Sequence] = field(default_factory=set, repr=False)  # the scheduled sequences

    def add(self, seq: Sequence, num_new: int, kind: ItemKind = ItemKind.DECODE) -> None:
        """Schedules `num_new` tokens of `seq` (before the step: its computed tokens not yet counted)."""
        self.scheduled.append(ScheduledSequence(seq, num_new, kind))
        self._members.add(seq)
        self._count(seq, num_new, kind, 1)

    def propose(self, item: ScheduledSequence, proposals: list[int]) -> None:
        """Adds a scheduled decode's proposals to the step."""
        seq = item.seq
        self._count(seq, item.num_new_tokens, item.kind, -1)
        item.proposals = list(proposals)
        item.num_new_tokens = 1 + len(proposals)
        self._count(seq, item.num_new_tokens, item.kind, 1)
        self.num_proposed_tokens += len(proposals)

    def remove(self, seq: Sequence) -> None:
        """Takes `seq` out of the step if it is in it (it was preempted)."""
        for i, item in enumerate(self.scheduled):
            if item.seq is seq:
                del self.scheduled[i]
                self._members.discard(seq)
                self._count(seq, item.num_new_tokens, item.kind, -1)
                self.num_proposed_tokens -= len(item.proposals)
                return

    def _count(self, seq: Sequence, num_new: int, kind: ItemKind, sign: int) -> None:
        self.num_batched_tokens += sign * num_new
        self.num_pairs += sign * chunk_pairs(seq.num_computed_tokens, num_new)
        if kind is ItemKind.SHORT:
            self.num_short_tokens += sign * num_new
        elif kind is ItemKind.LONG:
            self.num_long_tokens += sign * num_new

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self._members

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
