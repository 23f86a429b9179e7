"""Prompt-lookup (n-gram) speculation: what to propose, how much, and what to keep. No tensors.

A decoding sequence may propose the tokens that followed the latest earlier occurrence of its last
n tokens (in the prompt or its output so far); the step then computes its last token and the
proposals together, one row each, and samples every row as ordinary decoding would at that
position. The proposals are kept up to the first one the sample disagrees with; that sample is kept
too (or, when all agree, the sample after the last proposal). So a step emits 1 .. k+1 tokens, and
they are exactly the tokens ordinary decoding would emit:
- each row's logits are bit for bit those of a one-token step at that position (the kernels are
  batch-invariant, and a row sees only the keys before it);
- a row is sampled with the random number of its output position (Sequence.uniform: one number a
  position, drawn from the request's seeded generator in order), with the same penalties and
  suppressions; a proposal is kept exactly when ordinary sampling would have drawn it.
Rejected proposals leave keys and values past the sequence's computed length; they are never read
(a row attends only to positions before it) and are overwritten, and the blocks holding nothing
else are given back (BlockManager.trim).

How many to propose (`Speculator.budget`): the k-th proposal is worth computing when the chance
that it is kept, alpha^k (alpha: this sequence's measured rate of kept proposals), exceeds what its
row costs in the step's currency: its marginal time over the time a step takes per token it already
emits. Alone on the CPU a row costs ~1/10 of a step, so a well-predicted copy proposes many; with 32
streams a row costs about what a token earns, so speculation stops by itself when the step is
compute-bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model_svc.engine.schedule_types import SchedulerOutput
    from model_svc.engine.scheduler import Scheduler

# The n-gram sizes tried, longest first: a longer match predicts the continuation better.
MAX_NGRAM = 4
MIN_NGRAM = 2
# Prior belief in a proposal being kept, worth PRIOR_WEIGHT judged proposals; each judged proposal
# fades the earlier ones by DECAY (the last ~3 count), so a sequence that stops copying stops proposing
# within a few steps, and one that starts copying proposes more at once.
PRIOR_ACCEPT = 0.5
PRIOR_WEIGHT = 1.0
DECAY = 0.7


def accepted_count(proposals: list[int], sampled: list[int]) -> int:
    """How many leading proposals the samples agree with (sampled[j] is the token drawn at the
    position proposals[j] was proposed for)."""
    count = 0
    for proposal, token in zip(proposals, sampled):
        if proposal != token:
            break
        count += 1
    return count


@dataclass
class NgramIndex:
    """Where each n-gram of a token list last ended, kept up to date as tokens are appended."""

    tokens: list[int] = field(default_factory=list)
    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> index of its last token
    num_indexed: int = 0  # n-grams ending before this index are in last_end
    max_ngram: int = MAX_NGRAM  # the longest n-gram matched (a request's max_matching_ngram_size)

    @property
    def min_ngram(self) -> int:
        return min(MIN_NGRAM, self.max_ngram)

    def sync(self, tokens: list[int]) -> None:
        """Brings the index up to a sequence's tokens (its prompt, then its output: only appended to)."""
        self.tokens.extend(tokens[len(self.tokens):])

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the list's last n tokens
        (n from max_ngram down to MIN_NGRAM, or to max_ngram when it is shorter); [] when none
        occurred before."""
        tokens = self.tokens
        end = len(tokens) - 1  # the suffix's own n-grams end here: index only those before it
        for i in range(self.num_indexed, end):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if i + 1 >= n:
                    self.last_end[tuple(tokens[i + 1 - n:i + 1])] = i
        self.num_indexed = max(self.num_indexed, end)
        if k <= 0:
            return []
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(tokens) < n:
                continue
            found = self.last_end.get(tuple(tokens[-n:]))
            if found is not None:
                return tokens[found + 1:found + 1 + k]
        return []


@dataclass
class Speculator:
    """One sequence's proposer and its record of kept proposals."""

    index: NgramIndex = field(default_factory=NgramIndex)
    kept: float = 0.0  # faded count of kept proposals
    trials: float = 0.0  # faded count of proposals judged (each kept one, and the first rejected one)
    num_proposed: int = 0
    num_accepted: int = 0

    @property
    def accept_rate(self) -> float:
        return (self.kept + PRIOR_ACCEPT * PRIOR_WEIGHT) / (self.trials + PRIOR_WEIGHT)

    def budget(self, threshold: float, most: int) -> int:
        """How many proposals pay: the largest k <= most with accept_rate^k >= threshold."""
        if most <= 0 or threshold >= 1:
            return 0
        alpha = self.accept_rate
        if threshold <= 0 or alpha >= 1:
            return most
        if alpha <= 0:
            return 0
        return max(0, min(most, int(math.log(threshold) / math.log(alpha) + 1e-9)))

    def record(self, num_proposed: int, num_accepted: int) -> None:
        """One verification: `num_accepted` of `num_proposed` proposals were kept."""
        self.num_proposed += num_proposed
        self.num_accepted += num_accepted
        outcomes = [1.0] * num_accepted + [0.0] * (num_accepted < num_proposed)  # in order; the rest unjudged
        for kept in outcomes:
            self.kept = DECAY * self.kept + kept
            self.trials = DECAY * self.trials + 1


def propose(scheduler: Scheduler, out: SchedulerOutput, capped: set[str] = frozenset()) -> None:
    """Gives a step's decodes proposals where they pay: a proposal's row (and the draft model's pass,
    with one) must be worth its marginal time at the rate the step earns tokens now. Proposals take
    free blocks only (never preempt) and room the step has left. capped: tenants with more work than
    fair steps let into this step, whose sequences propose nothing (their proposals would lengthen
    the step past what fair steps allow). Called by Scheduler.schedule."""
    decodes = list(out.scheduled)
    cost, draft = scheduler.cost, scheduler.draft
    seconds_per_token = cost.seconds(out.num_batched_tokens, out.num_pairs) / len(decodes)
    for item in decodes:
        seq = item.seq
        if seq.tenant in capped:
            continue
        params = seq.params
        most = min(params.prompt_lookup_num_tokens, params.max_new_tokens - seq.num_output_tokens - 1,
                   scheduler.max_context - seq.num_tokens - 1, scheduler.room(out))
        if most <= 0:
            continue
        if seq.speculator is None:
            seq.speculator = Speculator(NgramIndex(max_ngram=params.max_matching_ngram_size or MAX_NGRAM))
        speculator = seq.speculator
        price = cost.marginal(1, seq.num_tokens) + (draft.seconds_per_token if draft else 0.0)
        num = speculator.budget(price / seconds_per_token, most)
        if draft is not None:
            proposals = draft.propose(seq, num)
        else:
            speculator.index.sync(seq.tokens)
            proposals = speculator.index.propose(num)
        if proposals and scheduler.blocks.ensure(seq.block_table, seq.num_computed_tokens + 1 + len(proposals)):
            out.propose(item, proposals)
