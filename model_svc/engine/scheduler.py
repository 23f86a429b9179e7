"""Iteration-level scheduling: which sequences run this step, and how many tokens each (the
mechanics: queues, blocks, chunks). Policy is in schedule_policy.py (admission order, preemption,
urgent steps, deadlines, fair steps, chunk sizes), the prefix search in prefix_search.py.

Every step, in this order: each decoding sequence computes one token; then waiting sequences are
admitted in policy order (a prompt up to `max_prefill_tokens` whole while the step's short-prompt
budget lasts, a longer one a chunk sized by time); then prompts already being prefilled take their
next chunk, so a long prompt never holds the door. A sequence holds KV-cache blocks for the tokens
it has computed (block_manager.py); when none is free, the policy's victim is preempted and waits
again under its original arrival. A sequence starts from the cached full blocks of its tokens and
from a running sequence's partial block (`PrefixCopy`): the scheduler never touches tensors, it
lists the slots for the step to copy. Docs: docs/scheduling.md.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import replace
from typing import Hashable, Iterable

from model_svc.engine.block_manager import BlockManager, BlockTable
from model_svc.engine.prefix_search import Prefixes
from model_svc.engine.schedule_policy import Policy
from model_svc.engine.schedule_types import (
    DeadlineUnmeetable,
    ItemKind,
    Plan,
    PrefixCopy,
    Room,
    SchedulerConfig,
    SchedulerFull,
    SchedulerOutput,
)
from model_svc.engine.sequence import FinishReason, Sequence, SequenceStatus
from model_svc.engine.speculation import propose
from model_svc.engine.step_cost import StepCost


class Scheduler:
    def __init__(self, blocks: BlockManager, config: SchedulerConfig, max_context: int,
                 eos_token_ids: Iterable[int], cost: StepCost | None = None, draft=None):
        """cost: the step-time model chunks are sized by (step_cost.py). draft: a draft.DraftProposer
        proposes instead of prompt lookup (--draft-model), with config.speculation."""
        cached = config.max_cached_prompt if blocks.enable_prefix_caching else 0
        self.config = replace(config, max_cached_prompt=cached,
                              cache_long_prompts=config.cache_long_prompts and cached > 0,
                              max_prefill_tokens=min(config.prefill_tokens, config.max_batch_tokens))
        self.blocks = blocks
        self.max_context = max_context
        self.eos_token_ids = frozenset(eos_token_ids)
        self.cost = cost or StepCost()
        self.draft = draft
        self.policy = Policy(self)
        self.prefixes = Prefixes(self)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # in admission order
        self.running_by_tenant: Counter[str] = Counter()
        self.by_id: dict[Hashable, Sequence] = {}
        self.num_preemptions = 0  # since start
        self.num_steps = 0  # scheduled since start (a sequence's last_step says when it last ran)
        self._arrivals = itertools.count()

    def __setattr__(self, name: str, value) -> None:
        if name in SchedulerConfig.__dataclass_fields__:  # it would shadow nothing: say so
            raise AttributeError(f"Scheduler.{name}: a setting, in scheduler.config (dataclasses.replace it)")
        super().__setattr__(name, value)

    # -- admission -----------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def cacheable(self, seq: Sequence) -> bool:
        """Whether the sequence reads and fills the prefix cache (prefix_search.py)."""
        return self.prefixes.cacheable(seq)

    def add(self, seq: Sequence, now: float | None = None) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise SchedulerFull(f"{len(self.waiting)} sequences already wait (max_waiting={self.config.max_waiting})")
        if seq.seq_id in self.by_id:
            raise ValueError(f"sequence id {seq.seq_id!r} is already in use")
        most = min(seq.num_prompt_tokens + seq.params.max_new_tokens, self.max_context)
        blocks = self.blocks
        # beams share the prompt's full blocks; each may hold every generated token and a partial block
        beam_blocks = (seq.params.num_beams - 1) * (blocks.blocks_for(most - seq.num_prompt_tokens) + 1)
        if (blocks.blocks_for(most) + beam_blocks > blocks.num_blocks
                or blocks.blocks_for(seq.num_prompt_tokens) + blocks.watermark_blocks > blocks.num_blocks):
            raise ValueError(  # it could never finish, even alone
                f"the sequence may need {most} KV-cache tokens (prompt + max_new_tokens)"
                + (f" and {beam_blocks * blocks.block_size} more for its {seq.params.num_beams} beams"
                   if beam_blocks else "") + f" but this worker holds {self.capacity_tokens}"
            )
        seq.arrival = next(self._arrivals)
        if seq.deadline is not None:
            now = time.monotonic() if now is None else now
            wait = self.policy.estimate_start(seq)
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

    # -- the step ------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """The next step. An urgent step (`urgent_priority`) computes only the urgent prompts, so that
        an urgent request's first token waits for no one's decode; the others resume the step after,
        beside it. Should nothing urgent fit, the step is an ordinary one."""
        floor = self.policy.urgent_priority()
        if floor is not None:
            out = self._schedule(floor)
            if not out.is_empty:
                return out
        return self._schedule(None)

    def _schedule(self, floor: int | None) -> SchedulerOutput:
        """`schedule`; floor: an urgent step, admitting only sequences of at least this priority."""
        out = SchedulerOutput()
        self.num_steps += 1
        cap = self.policy.tenant_cap() if floor is None else None
        rows: Counter[str] = Counter()  # sequences of each tenant in the step

        def capped(seq: Sequence, width: int = 1) -> bool:
            """Over its tenant's share with `width` more rows (a beam search's beams go together: its
            tenant's first rows of a step, whatever the cap)."""
            if cap is None or rows[seq.tenant] + width <= cap or not rows[seq.tenant]:
                return False
            out.num_capped += 1
            return True

        # 1. Every decoding sequence advances one token, oldest first (when fair steps cap a tenant, its
        # most urgent first, then the least recently stepped).
        # A beam search's beams advance together, as one sequence of its tenant's.
        decodes = [] if floor is not None else [
            seq for seq in self.running if seq.status is SequenceStatus.RUNNING
            and (seq.num_uncomputed_tokens == 1 or (seq.group is not None and seq.group.started))]
        if cap is not None:
            decodes.sort(key=lambda seq: (-seq.priority, seq.last_step))
        for seq in decodes:
            beams = seq.group.beams if seq.group is not None and seq.group.started else [seq]
            if seq.status is SequenceStatus.RUNNING and not capped(seq, len(beams)):
                if self.room(out) >= len(beams) and all(
                        self._grow(beam, beam.num_computed_tokens + 1, out, owner=seq) for beam in beams):
                    for beam in beams:
                        out.add(beam, 1)
                    rows[seq.tenant] += len(beams)
        if self.config.speculation and out.scheduled:  # the rows of a tenant over the cap do not speculate
            propose(self, out, set() if cap is None else {
                tenant for tenant, work in self.policy.tenant_rows().items() if len(work) > cap})
        decode_seconds = self.cost.seconds(out.num_batched_tokens, out.num_pairs) if out.scheduled else 0.0
        # 2. Waiting sequences, in policy order: short prompts whole, long ones a chunk; they come before
        # the chunks of long prompts already running, so that a long prefill never holds the door.
        deferred: set[Sequence] = set()
        while True:
            candidates = [w for w in self.waiting if w not in deferred and (floor is None or w.priority >= floor)
                          and (cap is None or rows[w.tenant] < cap)]  # not over its tenant's share
            if not candidates:
                break
            seq = min(candidates, key=self.policy.rank)
            plan = self._plan(seq)
            if self.prefixes.computed_by_another(seq, plan):
                deferred.add(seq)  # it will share those blocks instead of computing them again
                continue
            room = self.room(out)
            kind = ItemKind.SHORT if plan.uncomputed <= self.config.prefill_tokens else ItemKind.LONG
            if kind is ItemKind.SHORT:  # whole, never split
                shorts = out.num_short_tokens + plan.uncomputed
                fits = shorts <= self.config.prefill_tokens or (
                    not decode_seconds and self.cost.marginal(shorts, 0) <= self.config.idle_step_seconds)
                if not fits or plan.uncomputed > room:
                    break  # the next step
                num_new = plan.uncomputed
            else:
                num_new = self.policy.chunk(out, plan.num_shared, min(plan.uncomputed, room), decode_seconds)
                if num_new <= 0:
                    break
            made = self._make_room(seq, plan, num_new, out)
            if made is Room.NONE:
                break  # first come (in policy order), first served: the others wait behind it
            if made is Room.REPLAN:
                continue
            self._admit(seq, plan, num_new, kind, out)
            rows[seq.tenant] += 1
        # 3. Long prompts already running take the next chunk of what time allows.
        for seq in list(self.running) if floor is None else []:
            uncomputed = seq.num_uncomputed_tokens
            if seq.status is not SequenceStatus.RUNNING or uncomputed <= 1 or seq in out or capped(seq):
                continue
            num_new = self.policy.chunk(out, seq.num_computed_tokens, min(uncomputed, self.room(out)), decode_seconds)
            if num_new > 0 and self._grow(seq, seq.num_computed_tokens + num_new, out):
                out.add(seq, num_new, ItemKind.LONG)
                rows[seq.tenant] += 1
        if cap is not None:  # prompts held back by their tenant's cap skip the step too
            out.num_capped += sum(rows[seq.tenant] >= cap for seq in self.waiting)
        for item in out.scheduled:
            item.seq.last_step = self.num_steps
        return out

    def room(self, out: SchedulerOutput) -> int:
        """Tokens the step has left."""
        return self.config.max_batch_tokens - out.num_batched_tokens

    def _plan(self, seq: Sequence) -> Plan:
        tokens = seq.token_ids()  # after a preemption: its outputs so far too
        cacheable = self.cacheable(seq)
        root = self.prefixes.root(seq)
        num_cached_blocks, num_cached_unused = (self.blocks.cached_prefix_use(tokens, len(tokens) - 1, root)
                                                if cacheable else (0, 0))
        num_cached = num_cached_blocks * self.blocks.block_size
        donor, num_shared = self.prefixes.running_prefix(tokens, num_cached, root) if cacheable else (None, 0)
        num_shared = max(num_shared, num_cached)
        return Plan(tokens, num_cached_blocks, donor, num_shared, len(tokens) - num_shared, num_cached_unused)

    def _make_room(self, seq: Sequence, plan: Plan, num_new: int, out: SchedulerOutput) -> Room:
        """Frees a sequence slot and the blocks `seq` needs, preempting running sequences it outranks.
        REPLAN when a preempted sequence was its donor or may have held blocks it shares."""
        while (len(self.running) >= self.config.max_num_seqs
               or not self.blocks.can_admit(plan.num_shared + num_new, plan.num_cached_blocks,
                                            plan.num_cached_unused)):
            victim = self.policy.victim()
            if victim is None or not self.policy.outranks(seq, victim):
                return Room.NONE
            self._preempt_scheduled(victim, out)
            if victim is plan.donor or plan.num_cached_blocks:  # its blocks may be among the cached ones
                return Room.REPLAN
        return Room.MADE

    def _admit(self, seq: Sequence, plan: Plan, num_new: int, kind: ItemKind, out: SchedulerOutput) -> None:
        self.waiting.remove(seq)
        cacheable = self.cacheable(seq)
        root = self.prefixes.root(seq)
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

    def _grow(self, seq: Sequence, num_tokens: int, out: SchedulerOutput, owner: Sequence | None = None) -> bool:
        """Gives a running sequence (or one of `owner`'s beams) blocks for `num_tokens`, preempting
        victims while none are free; False when it (or its owner) was preempted itself."""
        while not self.blocks.ensure(seq.block_table, num_tokens):
            victim = self.policy.victim()
            self._preempt_scheduled(victim, out)
            if victim is (owner or seq):
                return False
        return True

    def fork_beams(self, group, parents: list[int], tokens: list[int]) -> list[PrefixCopy]:
        """Moves a beam search to its next beams: beam i continues beam parents[i] (the leader's
        prompt at the first step) with tokens[i]. A parent's first child takes its block table, the
        others share its full blocks and get a copy of its partial one (the returned slot copies, to
        do before the next step); a parent no child continues gives its blocks back first, so a
        step needs no more blocks than the last held. Beams are never cached (their blocks die
        with the search); the leader keeps an empty table while they run."""
        bs, blocks = self.blocks.block_size, self.blocks
        old = group.beams or [group.leader]
        tables = [beam.block_table for beam in old]
        computed = old[0].num_computed_tokens
        full, partial = divmod(computed, bs)
        for j, table in enumerate(tables):
            if j not in parents:
                blocks.free(table)
        taken, copies, children = set(), [], []
        for i, (p, token) in enumerate(zip(parents, tokens)):
            if p in taken:
                table = BlockTable(blocks.share(tables[p].block_ids[:full]), root=tables[p].root)
                if partial:
                    if not blocks.ensure(table, computed):  # cannot be: the unchosen gave back as many
                        raise RuntimeError("no block left to copy a beam's partial block into")
                    copies.append(PrefixCopy(tables[p].slots(full * bs, computed, bs),
                                             table.slots(full * bs, computed, bs)))
            else:
                taken.add(p)
                table = tables[p]
            children.append((old[p].tokens + [token], table))
        if not group.beams:  # the first step: the beams are made, the leader hands its table over
            group.leader.block_table = BlockTable(root=tables[0].root)
            group.beams = [self._beam(group, i) for i in range(len(parents))]
        for beam, (beam_tokens, table) in zip(group.beams, children):
            beam.tokens, beam.block_table, beam.num_computed_tokens = beam_tokens, table, computed
        return copies

    @staticmethod
    def _beam(group, index: int) -> Sequence:
        leader = group.leader
        beam = Sequence((leader.seq_id, "beam", index), leader.prompt_ids,
                        replace(leader.params, prompt_lookup_num_tokens=0), status=SequenceStatus.RUNNING,
                        tenant=leader.tenant, priority=leader.priority, arrival=leader.arrival,
                        cache_salt=leader.cache_salt, group=group, adapter=leader.adapter,
                        adapter_key=leader.adapter_key)
        beam.processors = leader.processors
        return beam

    def _free_beams(self, seq: Sequence) -> None:
        """Gives back a beam search's beams' blocks: it ended, or starts over from its prompt."""
        if seq.group is not None:
            for beam in seq.group.beams:
                if beam.block_table is not None:
                    self.blocks.free(beam.block_table)
                    beam.block_table = None
            seq.group.restart()

    def _preempt_scheduled(self, victim: Sequence, out: SchedulerOutput) -> None:
        """Preempts `victim`, taking it out of this step if it was scheduled already (its beams too)."""
        if victim.group is not None:
            for beam in victim.group.beams:
                out.remove(beam)
        out.remove(victim)
        self.preempt(victim)
        out.num_preempted += 1

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
            if item.kind is ItemKind.SHORT and item.seq.status is SequenceStatus.RUNNING:
                self._requeue(item.seq)

    def _requeue(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._untrack(seq)
        self._free_beams(seq)  # a beam search starts over from its prompt
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
                seq.append(token_id)
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
        computed = min(seq.num_computed_tokens, self.prefixes.shareable(seq))
        if self.cacheable(seq) and computed >= (table.num_hashed_blocks + 1) * self.blocks.block_size:
            self.blocks.register(table, seq.token_ids(), computed)

    def check_stop(self, seq: Sequence, token_id: int) -> FinishReason | None:
        """Token-level stops, as values: EOS or a stop token, then the length limits."""
        params = seq.params
        if not params.ignore_eos and seq.num_output_tokens >= params.min_new_tokens and (
            token_id in self.eos_token_ids or token_id in params.stop_token_ids
        ):
            return FinishReason.EOS_TOKEN
        if seq.num_output_tokens >= params.max_new_tokens or seq.num_tokens >= self.max_context:
            return FinishReason.LENGTH
        return None

    def fail(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        """Ends `seqs` with ERROR and frees their blocks; returns those that were not over yet."""
        failed = []
        for seq in dict.fromkeys(s.group.leader if s.group is not None else s for s in seqs):  # a beam: its search
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
        self.waiting.clear()
        self.running.clear()
        self.running_by_tenant.clear()
        for seq in seqs:
            self._release(seq, FinishReason.ERROR)
        return seqs

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Ends a running sequence between steps (a beam search that found its sequences)."""
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self._untrack(seq)
        self._release(seq, reason)

    def _release(self, seq: Sequence, reason: FinishReason) -> None:
        """Ends a sequence out of the queues: its reason, its blocks back, its draft state dropped."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._free_beams(seq)
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
