"""Which sequences share keys and values, and where a new prompt finds the longest computed prefix.

A sequence reads and fills the prefix cache when its numbers are chunking-invariant (the runner's
native attention: `max_cached_prompt`), within its namespace: its cache salt's (no timing side
channel between tenants), and for prompts over `max_cached_prompt` the long-prompt kernel's (its
numbers differ from the short prompts' and from its own decoded tokens'). Past the cache's whole
blocks, a running sequence that has computed more of a new prompt's tokens lends them
(`running_prefix`: the partial block is copied), and one still computing a block more of it makes
the new prompt wait for those blocks (`computed_by_another`), so a prompt is computed once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model_svc.engine.block_manager import salted_root
from model_svc.engine.schedule_types import Plan
from model_svc.engine.sequence import Sequence

if TYPE_CHECKING:
    from model_svc.engine.scheduler import Scheduler

LONG_PROMPTS = b"long-prompt kernel"  # the prefix-cache namespace of prompts over max_cached_prompt


class Prefixes:
    """Reads the scheduler's configuration and running sequences; changes nothing."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def cacheable(self, seq: Sequence) -> bool:
        """Whether the sequence reads and fills the prefix cache: not when it wants its prompt's
        logprobs (cached blocks hold keys and values, not logits: its prompt is computed in full)."""
        if seq.params.prompt_logprobs is not None:
            return False
        if seq.group is not None and (seq is not seq.group.leader or seq.group.started):
            return False  # a beam, or a leader whose prompt blocks its beams hold now
        config = self.scheduler.config
        return seq.num_prompt_tokens <= config.max_cached_prompt or config.cache_long_prompts

    def is_long(self, seq: Sequence) -> bool:
        """Whether its prompt goes through the long-prompt kernel (other numerics)."""
        return seq.num_prompt_tokens > self.scheduler.config.max_cached_prompt

    def root(self, seq: Sequence) -> bytes | None:
        """The prefix-cache namespace of the sequence's numbers (block_manager.py) within its cache
        salt's: sequences of different salts never share a block."""
        salt = seq.cache_salt
        if seq.adapter:  # an adapter's keys and values are its own (a name loaded again: other weights)
            salt = (salt or b"") + b"\x00adapter:" + (seq.adapter_key or seq.adapter).encode()
        return salted_root(LONG_PROMPTS if self.is_long(seq) else None, salt)

    def shareable(self, seq: Sequence) -> int:
        """How many of a sequence's leading tokens others may share once computed: all of them, or a
        long prompt's prompt tokens (its decoded ones went through the other kernel)."""
        return seq.num_prompt_tokens if self.is_long(seq) else seq.num_tokens

    def running_prefix(self, tokens: list[int], at_least: int,
                       root: bytes | None = None) -> tuple[Sequence | None, int]:
        """The running sequence (of the namespace `root`) whose computed, shareable tokens share the
        longest prefix with `tokens` (at most all but the last token), if longer than `at_least`, and
        that prefix's length."""
        best, best_len = None, at_least
        for other in self.scheduler.running:
            limit = min(len(tokens) - 1, other.num_computed_tokens, self.shareable(other))
            if (limit <= best_len or not self.cacheable(other) or self.root(other) != root
                    or other.tokens[0] != tokens[0]):
                continue
            theirs = other.tokens  # within `limit`: the tokens it computed and may share
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

    def computed_by_another(self, seq: Sequence, plan: Plan) -> bool:
        """Whether a running sequence is still computing at least a block more of `seq`'s prompt than
        `seq` could share now (the samples of one prompt, a burst with a long common prefix): then
        `seq` waits and shares those blocks when they are done, so a prompt is computed once."""
        if not self.cacheable(seq):
            return False
        tokens, bs, root = plan.tokens, self.scheduler.blocks.block_size, self.root(seq)
        for other in self.scheduler.running:
            if (other.num_computed_tokens >= other.num_prompt_tokens or not self.cacheable(other)
                    or self.root(other) != root):
                continue  # not prefilling, or not sharing
            limit = min(len(tokens) - 1, other.num_prompt_tokens)
            if limit < plan.num_shared + bs or other.tokens[:bs] != tokens[:bs]:
                continue
            common = next((i for i, (a, b) in enumerate(zip(other.tokens[:limit], tokens[:limit])) if a != b),
                          limit)
            if common >= plan.num_shared + bs:
                return True
        return False
