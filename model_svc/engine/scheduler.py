"""Iteration-level scheduling: which sequences run this step, and how many tokens each.

Every step, in this order: each decoding sequence computes one token; then waiting sequences are
admitted in policy order; then prompts already being prefilled in chunks take their next chunk. A
long prompt therefore never holds the door: short prompts and decodes share each step with it.
A finished or aborted sequence leaves at once and its blocks are given back.

Policy (`rank`, `victim`, `outranks`): waiting sequences are admitted by priority (higher first),
then by fair share (the tenant running the fewest sequences first: round-robin between clients),
then by arrival. A waiting sequence as urgent as every running one and more urgent than some gets a
step of its own (with any others as urgent): its first token waits for no one's decode. When
sequence slots or blocks run short, a waiting sequence may preempt a running one it outranks: a
less urgent one, or one of a tenant running at least two more sequences than its own. A sequence
whose deadline its place in the queue cannot meet is refused when it is added
(`DeadlineUnmeetable`), so its caller hears "retry later" at once instead of timing out.

Fair steps (`_tenant_cap`): a slot is not enough when one tenant runs 64 sequences beside another's
one, since the light tenant's every token waits for the heavy tenant's whole step. While tenants of
unequal loads share the engine, a step may take up to `tenant_slowdown` times what it would if no
tenant ran more sequences than the lightest does; the heavier tenants' other sequences skip the
step (a tenant's most urgent run first, then the least recently stepped, so that all its streams
advance). Tenants of equal loads are never capped, and a lone tenant has every step to itself.

Prefill budget: a prompt up to `max_prefill_tokens` is admitted whole (never split) while the
step's short-prompt budget lasts. A longer prompt is chunked by time, with the step-time model of
step_cost.py: its chunk may make the step up to `prefill_slowdown` times as long as the rest of it
(so running streams' inter-token latency stays within that factor while it is prefilled), and when
nothing else runs it may fill a step of `idle_step_seconds` (large chunks: a lone long prompt
prefills at full speed; a request arriving meanwhile waits at most for that step).

Memory (block_manager.py): a sequence holds KV-cache blocks for the tokens it has computed, taken
as it grows, not a reservation for `max_new_tokens`. Admission needs the prompt's blocks plus a
small watermark. When a running sequence needs a block and none is free, `victim` is preempted:
its blocks are given back (the full ones stay cached) and it waits again, ranked by its original
arrival, to be recomputed from its tokens when there is room. The client sees a pause.

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

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable, Iterable

from model_svc.engine.block_manager import BlockManager, BlockTable, salted_root
from model_svc.engine.speculation import Speculator
from model_svc.engine.step_cost import StepCost, chunk_pairs
from model_svc.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step (1 for a decode, a chunk for a prefill, 1 + proposals)
    kind: str = "decode"  # "decode", "short" (a prompt admitted whole) or "long" (a long prompt's chunk)
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
    num_capped: int = 0  # sequences that could have run but skip the step for fair shares (`_tenant_cap`)
    _members: set[Sequence] = field(default_factory=set, repr=False)  # the scheduled sequences

    def add(self, seq: Sequence, num_new: int, kind: str = "decode") -> None:
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

    def _count(self, seq: Sequence, num_new: int, kind: str, sign: int) -> None:
        self.num_batched_tokens += sign * num_new
        self.num_pairs += sign * chunk_pairs(seq.num_computed_tokens, num_new)
        if kind == "short":
            self.num_short_tokens += sign * num_new
        elif kind == "long":
            self.num_long_tokens += sign * num_new

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self._members

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


LONG_PROMPTS = b"long-prompt kernel"  # the prefix-cache namespace of prompts over max_cached_prompt


class SchedulerFull(Exception):
    """The waiting queue is at its bound."""


class DeadlineUnmeetable(SchedulerFull):
    """The sequence could not start before its caller's deadline: refused at once, to retry later."""


@dataclass
class _Plan:
    """How a waiting sequence would be admitted this step."""

    tokens: list[int]
    num_cached_blocks: int  # leading full blocks the prefix cache holds
    donor: Sequence | None  # the running sequence whose partial block is copied, if any
    num_shared: int  # tokens not computed: cached blocks, then the copied part
    uncomputed: int
    num_cached_unused: int = 0  # of the cached blocks, those no sequence holds (they count as free now)


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
        cost: StepCost | None = None,
        prefill_slowdown: float = 2.0,
        idle_step_seconds: float = 0.25,
        speculation: bool = False,
        cache_long_prompts: bool = False,
        tenant_slowdown: float = 2.0,
    ):
        """max_prefill_tokens: prompt tokens a step admits whole beside decoding sequences (a prompt
        up to this long is never split); longer prompts are chunked by time (below).
        max_cached_prompt: sequences whose prompts are at most this many tokens read and fill the
        prefix cache (0: none). The runner's native attention path sets it: only there is a cached
        block bit for bit a recomputed one.
        cost: the step-time model chunks are sized by (step_cost.py). A long prompt's chunk may make
        a step up to `prefill_slowdown` times as long as the rest of it (the decoding sequences' and
        the short prompts' work) would take alone; when nothing else runs, up to `idle_step_seconds`
        (a request arriving meanwhile waits for that step to end).
        speculation: decoding sequences that ask for it (prompt_lookup_num_tokens) may propose tokens
        to verify (speculation.py); only where the runner's rows are batch-invariant (native decode).
        cache_long_prompts: longer prompts (the runner's long-prompt kernel, chunking-invariant too)
        share their prompts' blocks among themselves, in their own namespace (LONG_PROMPTS): their
        numbers differ from the shorter prompts' and from their own decoded tokens', so neither
        ever reads their blocks, and blocks holding decoded tokens are not cached.
        tenant_slowdown: fair steps (`_tenant_cap`): while tenants of unequal loads share the engine, a
        step may take up to this many times what it would if no tenant ran more sequences than the
        lightest one does (0: off, every runnable sequence is in every step)."""
        if max_batch_tokens < max_num_seqs:
            raise ValueError(
                f"max_batch_tokens={max_batch_tokens} must be >= max_num_seqs={max_num_seqs}: "
                "every running sequence decodes one token per step"
            )
        if prefill_slowdown < 1:
            raise ValueError(f"prefill_slowdown={prefill_slowdown} must be >= 1")
        if tenant_slowdown != 0 and not tenant_slowdown >= 1:
            raise ValueError(f"tenant_slowdown={tenant_slowdown} must be >= 1, or 0 (off)")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = min(max_prefill_tokens or max_batch_tokens, max_batch_tokens)
        self.max_cached_prompt = max_cached_prompt if blocks.enable_prefix_caching else 0
        self.cache_long_prompts = cache_long_prompts and self.max_cached_prompt > 0
        self.max_waiting = max_waiting
        self.max_context = max_context
        self.eos_token_ids = frozenset(eos_token_ids)
        self.cost = cost or StepCost()
        self.prefill_slowdown = prefill_slowdown
        self.idle_step_seconds = idle_step_seconds
        self.tenant_slowdown = tenant_slowdown
        self.speculation = speculation
        self.draft = None  # a draft.DraftProposer proposes instead of prompt lookup (--draft-model)
        self.min_chunk = 4  # a long prompt advances at least this much a step
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # in admission order
        self.running_by_tenant: Counter[str] = Counter()
        self.by_id: dict[Hashable, Sequence] = {}
        self.num_preemptions = 0  # since start
        self.num_steps = 0  # scheduled since start (a sequence's last_step says when it last ran)
        self._arrivals = itertools.count()

    # -- admission -----------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def cacheable(self, seq: Sequence) -> bool:
        """Whether the sequence reads and fills the prefix cache: not when it wants its prompt's
        logprobs (cached blocks hold keys and values, not logits: its prompt is computed in full)."""
        if seq.params.prompt_logprobs is not None:
            return False
        return seq.num_prompt_tokens <= self.max_cached_prompt or self.cache_long_prompts

    def _is_long(self, seq: Sequence) -> bool:
        """Whether its prompt goes through the long-prompt kernel (other numerics)."""
        return seq.num_prompt_tokens > self.max_cached_prompt

    def _root(self, seq: Sequence) -> bytes | None:
        """The prefix-cache namespace of the sequence's numbers (block_manager.py) within its cache
        salt's: sequences of different salts never share a block (no timing side channel)."""
        return salted_root(LONG_PROMPTS if self._is_long(seq) else None, seq.cache_salt)

    def _shareable(self, seq: Sequence) -> int:
        """How many of a sequence's leading tokens others may share once computed: all of them, or a
        long prompt's prompt tokens (its decoded ones went through the other kernel)."""
        return seq.num_prompt_tokens if self._is_long(seq) else seq.num_tokens

    def add(self, seq: Sequence, now: float | None = None) -> None:
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
        seq.arrival = next(self._arrivals)
        if seq.deadline is not None:
            now = time.monotonic() if now is None else now
            wait = self.estimate_start(seq)
            if now + wait > seq.deadline:
                raise DeadlineUnmeetable(
                    f"the sequence would start in about {wait:.1f} s ({len(self.waiting)} waiting, "
                    f"{len(self.running)} running) but its deadline is in {max(0.0, seq.deadline - now):.1f} s; "
                    "retry later")
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

    # -- policy --------------------------------------------------------------------

    def rank(self, seq: Sequence) -> tuple[int, int, int]:
        """Admission order, smallest first: more urgent, then the tenant running fewest sequences
        (round-robin between clients), then earlier arrival (a preempted sequence keeps its own)."""
        return -seq.priority, self.running_by_tenant[seq.tenant], seq.arrival

    def victim(self) -> Sequence | None:
        """The running sequence to preempt when blocks or slots run out: the least urgent, then of
        the tenant running the most sequences, then the most recently admitted."""
        if not self.running:
            return None
        return min(reversed(self.running), key=lambda s: (s.priority, -self.running_by_tenant[s.tenant]))

    def outranks(self, seq: Sequence, victim: Sequence) -> bool:
        """Whether a waiting sequence may preempt a running one: it is more urgent, or as urgent and
        its tenant runs at least two fewer sequences (so that two tenants never trade places)."""
        if seq.priority != victim.priority:
            return seq.priority > victim.priority
        return (seq.tenant != victim.tenant
                and self.running_by_tenant[victim.tenant] > self.running_by_tenant[seq.tenant] + 1)

    def estimate_start(self, seq: Sequence) -> float:
        """Seconds until a new sequence would get its first token, from its place in the queue and
        the step-time model: the prompts ranked before it and its own are prefilled at the model's
        rate, and when no sequence slot is free and it outranks no running sequence, it waits for the
        running sequences that cannot stop early (ignore_eos, min_new_tokens) to free one."""
        mine = self.rank(seq)
        ahead = [w for w in self.waiting if self.rank(w) < mine]
        tokens = seq.num_prompt_tokens + sum(w.num_uncomputed_tokens for w in ahead)
        tokens += sum(r.num_uncomputed_tokens for r in self.running if r.num_uncomputed_tokens > 1)
        decoding = sum(r.num_uncomputed_tokens == 1 for r in self.running)
        steps = -(-tokens // self.max_prefill_tokens) if decoding else 1
        seconds = steps * self.cost.seconds(decoding, 0) + self.cost.marginal(tokens, 0)
        slot = len(self.running) + len(ahead) - self.max_num_seqs  # slots to be freed before its own
        victim = self.victim()
        if slot >= 0 and (victim is None or not self.outranks(seq, victim)):
            bound = sorted(
                (r.params.max_new_tokens - len(r.output_ids)) if r.params.ignore_eos
                else max(0, r.params.min_new_tokens - len(r.output_ids)) for r in self.running)
            if bound:
                seconds += bound[min(slot, len(bound) - 1)] * self.cost.seconds(len(self.running), 0)
        return seconds

    # -- the step ------------------------------------------------------------------

    @staticmethod
    def _urgent_floor(priorities: list[int]) -> int:
        """The least priority that is urgent beside sequences of these priorities: as urgent as the
        most urgent of them and more than the least (one of its own rank may be running still: an
        urgent client's previous request)."""
        return max(min(priorities) + 1, max(priorities))

    def urgent_priority(self) -> int | None:
        """When the step is an urgent one (`schedule`), the least priority a prompt needs to be in it,
        else None."""
        if not self.running or not self.waiting:
            return None
        floor = self._urgent_floor([seq.priority for seq in self.running])
        return floor if max(seq.priority for seq in self.waiting) >= floor else None

    def outranks_step(self, seqs: Iterable[Sequence], priorities: Iterable[int]) -> bool:
        """Whether one of `seqs` would make an urgent step beside sequences of these priorities."""
        priorities = list(priorities)
        return bool(priorities) and any(seq.priority >= self._urgent_floor(priorities) for seq in seqs)

    def schedule(self) -> SchedulerOutput:
        """The next step. An urgent step (`urgent_priority`) computes only the urgent prompts, so that
        an urgent request's first token waits for no one's decode; the others resume the step after,
        beside it. Should nothing urgent fit, the step is an ordinary one."""
        floor = self.urgent_priority()
        if floor is not None:
            out = self._schedule(floor)
            if not out.is_empty:
                return out
        return self._schedule(None)

    def _schedule(self, floor: int | None) -> SchedulerOutput:
        """`schedule`; floor: an urgent step, admitting only sequences of at least this priority."""
        out = SchedulerOutput()
        self.num_steps += 1
        cap = self._tenant_cap() if floor is None else None
        rows: Counter[str] = Counter()  # sequences of each tenant in the step

        def capped(seq: Sequence) -> bool:
            if cap is None or rows[seq.tenant] < cap:
                return False
            out.num_capped += 1
            return True

        # 1. Every decoding sequence advances one token, oldest first (when fair steps cap a tenant, its
        # most urgent first, then the least recently stepped).
        decodes = [] if floor is not None else [
            seq for seq in self.running if seq.status is SequenceStatus.RUNNING and seq.num_uncomputed_tokens == 1]
        if cap is not None:
            decodes.sort(key=lambda seq: (-seq.priority, seq.last_step))
        for seq in decodes:
            if seq.status is SequenceStatus.RUNNING and not capped(seq):
                if self._room(out) > 0 and self._grow(seq, seq.num_computed_tokens + 1, out):
                    out.add(seq, 1)
                    rows[seq.tenant] += 1
        if self.speculation and out.scheduled:
            self._speculate(out)
        decode_seconds = self.cost.seconds(out.num_batched_tokens, out.num_pairs) if out.scheduled else 0.0
        # 2. Waiting sequences, in policy order: short prompts whole, long ones a chunk; they come before
        # the chunks of long prompts already running, so that a long prefill never holds the door.
        deferred: set[Sequence] = set()
        while True:
            candidates = [w for w in self.waiting if w not in deferred and (floor is None or w.priority >= floor)
                          and (cap is None or rows[w.tenant] < cap)]  # not over its tenant's share
            if not candidates:
                break
            seq = min(candidates, key=self.rank)
            plan = self._plan(seq)
            if self._computed_by_another(seq, plan):
                deferred.add(seq)  # it will share those blocks instead of computing them again
                continue
            room = self._room(out)
            kind = "short" if plan.uncomputed <= self.max_prefill_tokens else "long"
            if kind == "short":  # whole, never split
                shorts = out.num_short_tokens + plan.uncomputed
                fits = shorts <= self.max_prefill_tokens or (
                    not decode_seconds and self.cost.marginal(shorts, 0) <= self.idle_step_seconds)
                if not fits or plan.uncomputed > room:
                    break  # the next step
                num_new = plan.uncomputed
            else:
                num_new = self._chunk(out, plan.num_shared, min(plan.uncomputed, room), decode_seconds)
                if num_new <= 0:
                    break
            admitted = self._make_room(seq, plan, num_new, out)
            if admitted is None:
                break  # first come (in policy order), first served: the others wait behind it
            if not admitted:
                continue  # a preemption changed what it can share: plan again
            self._admit(seq, plan, num_new, kind, out)
            rows[seq.tenant] += 1
        # 3. Long prompts already running take the next chunk of what time allows.
        for seq in list(self.running) if floor is None else []:
            uncomputed = seq.num_uncomputed_tokens
            if seq.status is not SequenceStatus.RUNNING or uncomputed <= 1 or seq in out or capped(seq):
                continue
            num_new = self._chunk(out, seq.num_computed_tokens, min(uncomputed, self._room(out)), decode_seconds)
            if num_new > 0 and self._grow(seq, seq.num_computed_tokens + num_new, out):
                out.add(seq, num_new, "long")
                rows[seq.tenant] += 1
        if cap is not None:  # prompts held back by their tenant's cap skip the step too
            out.num_capped += sum(rows[seq.tenant] >= cap for seq in self.waiting)
        for item in out.scheduled:
            item.seq.last_step = self.num_steps
        return out

    def _tenant_rows(self) -> dict[str, list[tuple[int, int]]]:
        """What each tenant could compute this step, a (tokens, attention pairs) row per sequence: its
        running sequences' next token or chunk, its waiting prompts' (up to max_prefill_tokens);
        cheapest first."""
        rows: dict[str, list[tuple[int, int]]] = {}
        for seq in itertools.chain(self.running, self.waiting):
            num = min(seq.num_uncomputed_tokens, self.max_prefill_tokens)
            if num > 0:
                rows.setdefault(seq.tenant, []).append((num, chunk_pairs(seq.num_computed_tokens, num)))
        for tenant_rows in rows.values():
            tenant_rows.sort()
        return rows

    def _tenant_cap(self) -> int | None:
        """Fair steps: the most sequences any one tenant computes this step, or None for no cap. The
        step may take `tenant_slowdown` times what it would if every tenant ran at most as many as
        the lightest one could (the cost model's estimate); the cap is the most that keeps it so.
        None when fair steps are off, one tenant has work, or the loads are equal."""
        if not self.tenant_slowdown or len(set(self.running_by_tenant).union(w.tenant for w in self.waiting)) < 2:
            return None
        rows = self._tenant_rows()
        if len(rows) < 2:
            return None
        sizes = [len(r) for r in rows.values()]
        lightest, heaviest = min(sizes), max(sizes)
        if lightest == heaviest:
            return None
        sums = [list(itertools.accumulate(r, lambda a, b: (a[0] + b[0], a[1] + b[1]), initial=(0, 0)))
                for r in rows.values()]

        def seconds(cap: int) -> float:  # the step with each tenant's `cap` cheapest rows
            tokens = pairs = 0
            for acc in sums:
                t, p = acc[min(cap, len(acc) - 1)]
                tokens += t
                pairs += p
            return self.cost.seconds(tokens, pairs)

        budget = self.tenant_slowdown * seconds(lightest) * (1 + 1e-9)  # rounding: 2 x 14 ms fits 28 ms
        low, high = lightest, heaviest  # seconds(low) <= budget; find the largest such cap
        while low < high:
            mid = (low + high + 1) // 2
            if seconds(mid) <= budget:
                low = mid
            else:
                high = mid - 1
        return None if low >= heaviest else low

    def caps(self, seqs: Iterable[Sequence], step_rows: Counter, step_seconds: float) -> bool:
        """Whether a running step (`step_rows` sequences of each tenant, `step_seconds` long by the cost
        model) is longer than fair steps allow beside new sequences `seqs` of a tenant not in it: then
        stopping it (Engine.interrupt_for) gets the newcomer's first token sooner."""
        if not self.tenant_slowdown or not step_rows:
            return False
        tokens: dict[str, list[int]] = {}  # each new tenant's prompts
        for seq in seqs:
            if seq.tenant not in step_rows:
                tokens.setdefault(seq.tenant, []).append(min(seq.num_prompt_tokens, self.max_prefill_tokens))
        if not tokens:
            return False
        lightest = min(min(step_rows.values()), min(map(len, tokens.values())))
        reference = sum(min(n, lightest) for n in step_rows.values())  # a decode row each
        reference += sum(sum(sorted(t)[:lightest]) for t in tokens.values())
        return step_seconds > self.tenant_slowdown * self.cost.seconds(reference, 0)

    def _speculate(self, out: SchedulerOutput) -> None:
        """Gives the step's decodes proposals where they pay (speculation.py): a proposal's row (and
        the draft model's pass, with one) must be worth its marginal time at the rate the step earns
        tokens now. Proposals take free blocks only (never preempt) and room the step has left."""
        decodes = list(out.scheduled)
        seconds_per_token = self.cost.seconds(out.num_batched_tokens, out.num_pairs) / len(decodes)
        for item in decodes:
            seq = item.seq
            params = seq.params
            most = min(params.prompt_lookup_num_tokens, params.max_new_tokens - len(seq.output_ids) - 1,
                       self.max_context - seq.num_tokens - 1, self._room(out))
            if most <= 0:
                continue
            if seq.speculator is None:
                seq.speculator = Speculator()
            speculator = seq.speculator
            price = self.cost.marginal(1, seq.num_tokens) + (self.draft.seconds_per_token if self.draft else 0.0)
            num = speculator.budget(price / seconds_per_token, most)
            if self.draft is not None:
                proposals = self.draft.propose(seq, num)
            else:
                speculator.index.sync(seq.prompt_ids, seq.output_ids)
                proposals = speculator.index.propose(num)
            if proposals and self.blocks.ensure(seq.block_table, seq.num_computed_tokens + 1 + len(proposals)):
                out.propose(item, proposals)

    def _computed_by_another(self, seq: Sequence, plan: _Plan) -> bool:
        """Whether a running sequence is still computing at least a block more of `seq`'s prompt than
        `seq` could share now (the samples of one prompt, a burst with a long common prefix): then
        `seq` waits and shares those blocks when they are done, so a prompt is computed once."""
        if not self.cacheable(seq):
            return False
        tokens, bs, root = plan.tokens, self.blocks.block_size, self._root(seq)
        for other in self.running:
            if (other.num_computed_tokens >= other.num_prompt_tokens or not self.cacheable(other)
                    or self._root(other) != root):
                continue  # not prefilling, or not sharing
            limit = min(len(tokens) - 1, other.num_prompt_tokens)
            if limit < plan.num_shared + bs or other.prompt_ids[:bs] != tokens[:bs]:
                continue
            common = next((i for i, (a, b) in enumerate(zip(other.prompt_ids[:limit], tokens[:limit])) if a != b),
                          limit)
            if common >= plan.num_shared + bs:
                return True
        return False

    def _room(self, out: SchedulerOutput) -> int:
        return self.max_batch_tokens - out.num_batched_tokens

    def _chunk(self, out: SchedulerOutput, start: int, most: int, decode_seconds: float) -> int:
        """Tokens of a long prompt (`start` computed) this step may compute: what keeps the step within
        `prefill_slowdown` times its other work, or within `idle_step_seconds` when there is none;
        at least `min_chunk` while no other long prompt advanced this step."""
        long_tokens, short_tokens = out.num_long_tokens, out.num_short_tokens
        other = decode_seconds + (self.cost.marginal(short_tokens, 0) if short_tokens else 0.0)
        if other:
            allowance = (self.prefill_slowdown - 1) * (other if decode_seconds else other + self.cost.seconds(0, 0))
        else:
            allowance = self.idle_step_seconds
        spent = self.cost.marginal(long_tokens, 0)
        num_new = self.cost.chunk_for(allowance - spent, start, most)
        if num_new < self.min_chunk and not long_tokens:
            num_new = min(self.min_chunk, most)
        return num_new

    def _plan(self, seq: Sequence) -> _Plan:
        tokens = seq.token_ids()  # after a preemption: its outputs so far too
        cacheable = self.cacheable(seq)
        root = self._root(seq)
        num_cached_blocks, num_cached_unused = (self.blocks.cached_prefix_use(tokens, len(tokens) - 1, root)
                                                if cacheable else (0, 0))
        num_cached = num_cached_blocks * self.blocks.block_size
        donor, num_shared = self.running_prefix(tokens, num_cached, root) if cacheable else (None, 0)
        num_shared = max(num_shared, num_cached)
        return _Plan(tokens, num_cached_blocks, donor, num_shared, len(tokens) - num_shared, num_cached_unused)

    def _make_room(self, seq: Sequence, plan: _Plan, num_new: int, out: SchedulerOutput) -> bool | None:
        """Frees a sequence slot and the blocks `seq` needs, preempting running sequences it outranks.
        True: there is room; False: a preempted sequence was its donor, or held blocks `seq` shares
        (plan again); None: no room."""
        while (len(self.running) >= self.max_num_seqs
               or not self.blocks.can_admit(plan.num_shared + num_new, plan.num_cached_blocks,
                                            plan.num_cached_unused)):
            victim = self.victim()
            if victim is None or not self.outranks(seq, victim):
                return None
            self._preempt_scheduled(victim, out)
            if victim is plan.donor or plan.num_cached_blocks:  # its blocks may be among the cached ones
                return False
        return True

    def _admit(self, seq: Sequence, plan: _Plan, num_new: int, kind: str, out: SchedulerOutput) -> None:
        self.waiting.remove(seq)
        cacheable = self.cacheable(seq)
        root = self._root(seq)
        seq.block_table = (self.blocks.match(plan.tokens, len(plan.tokens) - 1, root) if cacheable
                           else BlockTable(root=root))
        if not self.blocks.ensure(seq.block_table, plan.num_shared + num_new):  # can_admit said there was room
            raise RuntimeError(f"admission found {self.blocks.num_free_blocks} free blocks, fewer than planned")
        num_cached = plan.num_cached_blocks * self.blocks.block_size
        if plan.donor is not None and plan.num_shared > num_cached:  # the partial block: a copy of its slots
            bs = self.blocks.block_size
            out.copies.append(PrefixCopy(plan.donor.block_table.slots(num_cached, plan.num_shared, bs),
                                         seq.block_table.slots(num_cached, plan.num_shared, bs)))
        seq.num_computed_tokens = plan.num_shared
        out.num_cached_tokens += plan.num_shared
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.running_by_tenant[seq.tenant] += 1
        out.add(seq, num_new, kind)

    def _grow(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Gives a running sequence blocks for `num_tokens`, preempting victims while none are free;
        False when it was preempted itself."""
        while not self.blocks.ensure(seq.block_table, num_tokens):
            victim = self.victim()
            self._preempt_scheduled(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt_scheduled(self, victim: Sequence, out: SchedulerOutput) -> None:
        """Preempts `victim`, taking it out of this step if it was scheduled already."""
        out.remove(victim)
        self.preempt(victim)
        out.num_preempted += 1

    def running_prefix(self, tokens: list[int], at_least: int,
                       root: bytes | None = None) -> tuple[Sequence | None, int]:
        """The running sequence (of the namespace `root`) whose computed, shareable tokens share the
        longest prefix with `tokens` (at most all but the last token), if longer than `at_least`, and
        that prefix's length."""
        best, best_len = None, at_least
        for other in self.running:
            limit = min(len(tokens) - 1, other.num_computed_tokens, self._shareable(other))
            if (limit <= best_len or not self.cacheable(other) or self._root(other) != root
                    or other.prompt_ids[0] != tokens[0]):
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

    def preempt(self, seq: Sequence) -> None:
        """Frees a running sequence's blocks (the full ones stay cached) and puts it at the front
        of the waiting queue, to be recomputed from its tokens."""
        self._requeue(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def rewind(self, out: SchedulerOutput) -> None:
        """Undoes a step that was stopped before it computed anything: a prompt it admitted whole
        waits again, so that it is admitted whole again (never split into a long prompt's chunks)."""
        for item in out.scheduled:
            if item.kind == "short" and item.seq.status is SequenceStatus.RUNNING:
                self._requeue(item.seq)

    def _requeue(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._untrack(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = None
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)  # its arrival ranks it before those that came later

    def _untrack(self, seq: Sequence) -> None:
        self.running_by_tenant[seq.tenant] -= 1
        if not self.running_by_tenant[seq.tenant]:
            del self.running_by_tenant[seq.tenant]  # bounded by the running sequences, not by all tenants

    def update(self, out: SchedulerOutput, sampled: dict[Hashable, int | list[int]]) -> list[Sequence]:
        """Records the computed tokens and the sampled ones: a token per sequence that completed its
        prompt or decoded, and for a decode with proposals the tokens it emits (its kept proposals,
        then the one sampled after them). Tokens are appended in order until one ends the sequence.
        Returns the sequences that finished."""
        finished = []
        for item in out.scheduled:
            seq = item.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            tokens = sampled.get(seq.seq_id)
            if tokens is None:  # a prefill chunk that did not reach the prompt's end
                seq.num_computed_tokens += item.num_new_tokens
                self._register(seq)
                continue
            tokens = [tokens] if isinstance(tokens, int) else tokens
            computed = seq.num_computed_tokens + (len(tokens) if item.proposals else item.num_new_tokens)
            if item.proposals:
                seq.speculator.record(len(item.proposals), len(tokens) - 1)
            reason, appended = None, 0
            for token_id in tokens:
                seq.output_ids.append(token_id)
                appended += 1
                if seq.constraint is not None:
                    seq.constraint.advance(token_id)
                reason = self.check_stop(seq, token_id)
                if reason is not None:
                    break
            if seq.params.do_sample:
                seq.consume_uniforms(appended)
            # Computed: the last token and the kept proposals (those past a stop included); the
            # rejected proposals' keys and values roll back, and so do the blocks only they used.
            seq.num_computed_tokens = min(computed, seq.num_tokens)
            if item.proposals:
                self.blocks.trim(seq.block_table, seq.num_tokens)
            self._register(seq)
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def _register(self, seq: Sequence) -> None:
        """Hashes the blocks the sequence's computed tokens filled (prefix caching)."""
        table = seq.block_table
        computed = min(seq.num_computed_tokens, self._shareable(seq))
        if self.cacheable(seq) and computed >= (table.num_hashed_blocks + 1) * self.blocks.block_size:
            self.blocks.register(table, seq.token_ids(), computed)

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

    def fail(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        """Ends `seqs` with ERROR and frees their blocks; returns those that were not over yet."""
        failed = []
        for seq in seqs:
            if not seq.is_finished:
                if seq.status is SequenceStatus.WAITING:
                    self.waiting.remove(seq)
                self._finish(seq, FinishReason.ERROR)
                failed.append(seq)
        return failed

    def fail_all(self) -> list[Sequence]:
        """Ends every sequence with ERROR, whatever list it is in, and frees their blocks: after a
        failure inside `schedule`, the queues may be half-moved."""
        seqs = list(self.by_id.values())
        for seq in seqs:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = FinishReason.ERROR
            if seq.block_table is not None:
                self.blocks.free(seq.block_table)
                seq.block_table = None
            if self.draft is not None:
                self.draft.release(seq.seq_id)
        self.waiting.clear()
        self.running.clear()
        self.running_by_tenant.clear()
        self.by_id.clear()
        return seqs

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self._untrack(seq)
        if seq.block_table is not None:
            self.blocks.free(seq.block_table)
            seq.block_table = None
        if self.draft is not None:
            self.draft.release(seq.seq_id)
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
