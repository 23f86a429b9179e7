"""Who goes first: the scheduler's policy, apart from its mechanics (scheduler.py).

Waiting sequences are admitted by priority (higher first), then by fair share (the tenant running
the fewest sequences first: round-robin between clients), then by arrival (`rank`). A waiting
sequence as urgent as every running one and more urgent than some gets a step of its own (with any
others as urgent): its first token waits for no one's decode (`urgent_priority`). When sequence
slots or blocks run short, a waiting sequence may preempt a running one it outranks (`victim`,
`outranks`): a less urgent one, or one of a tenant running at least two more sequences than its
own. A sequence whose deadline its place in the queue cannot meet is refused when it is added
(`estimate_start`), so its caller hears "retry later" at once instead of timing out.

Fair steps (`tenant_cap`): a slot is not enough when one tenant runs 64 sequences beside another's
one, since the light tenant's every token waits for the heavy tenant's whole step. While tenants of
unequal loads share the engine, a step may take up to `tenant_slowdown` times what the lightest
tenant's own rows would take alone (its latency, which is what it notices), and never caps a tenant
below the lightest one's count (equal shares: the heavy tenant always advances); the heavier
tenants' other sequences skip the step (a tenant's most urgent run first, then the least recently
stepped, so that all its streams advance). Tenants of equal loads are never capped, and a lone
tenant has every step to itself.

Chunks (`chunk`): a long prompt's chunk may make the step up to `prefill_slowdown` times as long as
the rest of it by the step-time model (step_cost.py), or fill `idle_step_seconds` when nothing else
runs.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import TYPE_CHECKING, Iterable

from model_svc.engine.sequence import Sequence
from model_svc.engine.step_cost import chunk_pairs

if TYPE_CHECKING:
    from model_svc.engine.schedule_types import SchedulerOutput
    from model_svc.engine.scheduler import Scheduler


class Policy:
    """Reads the scheduler's queues, configuration and step-time model; changes nothing."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def rank(self, seq: Sequence) -> tuple[int, int, int]:
        """Admission order, smallest first: more urgent, then the tenant running fewest sequences
        (round-robin between clients), then earlier arrival (a preempted sequence keeps its own)."""
        return -seq.priority, self.scheduler.running_by_tenant[seq.tenant], seq.arrival

    def victim(self) -> Sequence | None:
        """The running sequence to preempt when blocks or slots run out: the least urgent, then of
        the tenant running the most sequences, then the most recently admitted."""
        s = self.scheduler
        if not s.running:
            return None
        return min(reversed(s.running), key=lambda r: (r.priority, -s.running_by_tenant[r.tenant]))

    def outranks(self, seq: Sequence, victim: Sequence) -> bool:
        """Whether a waiting sequence may preempt a running one: it is more urgent, or as urgent and
        its tenant runs at least two fewer sequences (so that two tenants never trade places)."""
        if seq.priority != victim.priority:
            return seq.priority > victim.priority
        running = self.scheduler.running_by_tenant
        return seq.tenant != victim.tenant and running[victim.tenant] > running[seq.tenant] + 1

    def estimate_start(self, seq: Sequence) -> float:
        """Seconds until a new sequence would get its first token, from its place in the queue and
        the step-time model: the prompts ranked before it and its own are prefilled at the model's
        rate, and when no sequence slot is free and it outranks no running sequence, it waits for the
        running sequences that cannot stop early (ignore_eos, min_new_tokens) to free one."""
        s, cost = self.scheduler, self.scheduler.cost
        mine = self.rank(seq)
        ahead = [w for w in s.waiting if self.rank(w) < mine]
        tokens = seq.num_prompt_tokens + sum(w.num_uncomputed_tokens for w in ahead)
        tokens += sum(r.num_uncomputed_tokens for r in s.running if r.num_uncomputed_tokens > 1)
        decoding = sum(r.num_uncomputed_tokens == 1 for r in s.running)
        steps = -(-tokens // s.config.prefill_tokens) if decoding else 1
        seconds = steps * cost.seconds(decoding, 0) + cost.marginal(tokens, 0)
        slot = len(s.running) + len(ahead) - s.config.max_num_seqs  # slots to be freed before its own
        victim = self.victim()
        if slot >= 0 and (victim is None or not self.outranks(seq, victim)):
            bound = sorted(
                (r.params.max_new_tokens - r.num_output_tokens) if r.params.ignore_eos
                else max(0, r.params.min_new_tokens - r.num_output_tokens) for r in s.running)
            if bound:
                seconds += bound[min(slot, len(bound) - 1)] * cost.seconds(len(s.running), 0)
        return seconds

    @staticmethod
    def urgent_floor(priorities: list[int]) -> int:
        """The least priority that is urgent beside sequences of these priorities: as urgent as the
        most urgent of them and more than the least (one of its own rank may be running still: an
        urgent client's previous request)."""
        return max(min(priorities) + 1, max(priorities))

    def urgent_priority(self) -> int | None:
        """When the step is an urgent one (Scheduler.schedule), the least priority a prompt needs to be
        in it, else None."""
        s = self.scheduler
        if not s.running or not s.waiting:
            return None
        floor = self.urgent_floor([seq.priority for seq in s.running])
        return floor if max(seq.priority for seq in s.waiting) >= floor else None

    def outranks_step(self, seqs: Iterable[Sequence], priorities: Iterable[int]) -> bool:
        """Whether one of `seqs` would make an urgent step beside sequences of these priorities."""
        priorities = list(priorities)
        return bool(priorities) and any(seq.priority >= self.urgent_floor(priorities) for seq in seqs)

    def tenant_rows(self) -> dict[str, list[tuple[int, int]]]:
        """What each tenant could compute this step, a (tokens, attention pairs) row per sequence: its
        running sequences' next token or chunk, its waiting prompts' (up to max_prefill_tokens);
        cheapest first."""
        s = self.scheduler
        rows: dict[str, list[tuple[int, int]]] = {}
        for seq in itertools.chain(s.running, s.waiting):
            if seq.group is not None and seq.group.started:  # a beam search: a decode row a beam
                rows.setdefault(seq.tenant, []).extend((1, chunk_pairs(b.num_computed_tokens, 1))
                                                       for b in seq.group.beams)
                continue
            num = min(seq.num_uncomputed_tokens, s.config.prefill_tokens)
            if num > 0:
                rows.setdefault(seq.tenant, []).append((num, chunk_pairs(seq.num_computed_tokens, num)))
        for tenant_rows in rows.values():
            tenant_rows.sort()
        return rows

    def tenant_cap(self) -> int | None:
        """Fair steps: the most rows any one tenant computes this step, or None for no cap. The step
        may take `tenant_slowdown` times what the lightest tenant's rows would alone (of equally
        light tenants, the costliest), each estimate on the light tenant's safe side
        (`step_at_most`, `alone_at_least`); the cap is the most that keeps
        it so, and never below the lightest tenant's count. None when fair steps are off, one tenant
        has work, or the loads are equal."""
        s = self.scheduler
        slowdown = s.config.tenant_slowdown
        if not slowdown or len(set(s.running_by_tenant).union(w.tenant for w in s.waiting)) < 2:
            return None
        rows = self.tenant_rows()
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
            return self.step_at_most(tokens, pairs)

        alone = max(self.alone_at_least(sum(t for t, _ in r), sum(p for _, p in r))
                    for r in rows.values() if len(r) == lightest)
        budget = slowdown * alone * (1 + 1e-9)  # rounding: 2 x 14 ms fits 28 ms
        low, high = lightest, heaviest  # the largest cap within budget, at least `lightest`
        while low < high:
            mid = (low + high + 1) // 2
            if seconds(mid) <= budget:
                low = mid
            else:
                high = mid - 1
        return None if low >= heaviest else low

    def step_at_most(self, tokens: int, pairs: int) -> float:
        """A step's duration for fair steps, on the light tenant's safe side: the steps measured at
        that size, else the larger of the line and the chord between measured sizes
        (StepCost.measured: step cost is concave in rows on a CPU, so the chord underestimates: a
        flood's 12-row step read as 42 ms between 1 and 64 rows, against 53 measured)."""
        return self.scheduler.cost.measured(tokens, pairs, side="high")

    def alone_at_least(self, tokens: int, pairs: int) -> float:
        """The light tenant's own step, on its safe side: measured, else the smaller estimate (the
        line overestimated a 4-row step at 38 ms against 26 measured)."""
        return self.scheduler.cost.measured(tokens, pairs, side="low")

    def caps(self, seqs: Iterable[Sequence], step_rows: Counter, step_seconds: float) -> bool:
        """Whether a running step (`step_rows` sequences of each tenant, `step_seconds` long by the cost
        model) is longer than fair steps allow (`tenant_cap`) beside new sequences `seqs` of a tenant
        not in it: then stopping it (Engine.interrupt_for) gets the newcomer's first token sooner."""
        s = self.scheduler
        if not s.config.tenant_slowdown or not step_rows:
            return False
        tokens: dict[str, list[int]] = {}  # each new tenant's prompts
        for seq in seqs:
            if seq.tenant not in step_rows:
                tokens.setdefault(seq.tenant, []).append(min(seq.num_prompt_tokens, s.config.prefill_tokens))
        if not tokens:
            return False
        # Each tenant's (rows, tokens): the step's a decode row each, the newcomers' their prompts.
        loads = [(n, n) for n in step_rows.values()] + [(len(t), sum(t)) for t in tokens.values()]
        lightest = min(n for n, _ in loads)
        reference = max(t for n, t in loads if n == lightest)  # the lightest tenant's rows alone
        return step_seconds > s.config.tenant_slowdown * self.alone_at_least(reference, 0)

    def chunk(self, out: SchedulerOutput, start: int, most: int, decode_seconds: float) -> int:
        """Tokens of a long prompt (`start` computed) this step may compute: what keeps the step within
        `prefill_slowdown` times its other work, or within `idle_step_seconds` when there is none;
        at least `min_chunk` while no other long prompt advanced this step."""
        config, cost = self.scheduler.config, self.scheduler.cost
        long_tokens, short_tokens = out.num_long_tokens, out.num_short_tokens
        other = decode_seconds + (cost.marginal(short_tokens, 0) if short_tokens else 0.0)
        if other:
            allowance = (config.prefill_slowdown - 1) * (other if decode_seconds else other + cost.seconds(0, 0))
        else:
            allowance = config.idle_step_seconds
        spent = cost.marginal(long_tokens, 0)
        num_new = cost.chunk_for(allowance - spent, start, most)
        if num_new < config.min_chunk and not long_tokens:
            num_new = min(config.min_chunk, most)
        return num_new
