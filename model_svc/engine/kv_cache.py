"""Keys and values of all running sequences, in one arena, under a token budget.

Each running sequence owns one contiguous range of the arena, sized for its
prompt plus its `max_new_tokens`, reserved when it is admitted and released
the moment it ends. Attention then reads each sequence's own keys and values,
exact length, with no padding: this is what makes a sequence's tokens identical
whether it runs alone or beside others (a left-padded merged cache changes the
attention's reduction and flips greedy tokens in bfloat16; see the README).
One arena (rather than a buffer per sequence) lets a step write every new key
of a layer with one `index_copy_`.

Ranges are handed out first-fit from a free list and merged back when freed;
when no free range is long enough, a new sequence waits. Memory is bounded by
the budget: the arena is allocated once (empty: its pages become resident only as they are used).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


@dataclass
class KVRange:
    """A sequence's slots in the arena: tokens start .. start + capacity."""

    start: int
    capacity: int


class KVCacheManager:
    """The arena and its free list. The last slot is a scratch slot for padding rows."""

    def __init__(self, spec: KVSpec, budget_tokens: int, allocate_arena: bool = True):
        self.spec = spec
        self.budget_tokens = budget_tokens
        self.num_used_tokens = 0
        self.free_ranges: list[tuple[int, int]] = [(0, budget_tokens)]  # sorted (start, length)
        self.scratch_slot = budget_tokens
        self.arena = None
        if allocate_arena:
            # [layers, keys/values, kv_heads, slots, head_dim]
            self.arena = torch.empty(
                (spec.num_layers, 2, spec.num_kv_heads, budget_tokens + 1, spec.head_dim),
                dtype=spec.dtype, device=spec.device,
            )

    def can_allocate(self, num_tokens: int) -> bool:
        return any(length >= num_tokens for _, length in self.free_ranges)

    def allocate(self, num_tokens: int) -> KVRange:
        for i, (start, length) in enumerate(self.free_ranges):
            if length >= num_tokens:
                if length == num_tokens:
                    del self.free_ranges[i]
                else:
                    self.free_ranges[i] = (start + num_tokens, length - num_tokens)
                self.num_used_tokens += num_tokens
                return KVRange(start, num_tokens)
        raise RuntimeError(f"KV budget exhausted: no free range of {num_tokens} tokens")

    def free(self, kv: KVRange) -> None:
        self.num_used_tokens -= kv.capacity
        i = bisect.bisect(self.free_ranges, (kv.start, 0))
        start, length = kv.start, kv.capacity
        if i < len(self.free_ranges) and self.free_ranges[i][0] == start + length:  # merge with the next
            length += self.free_ranges.pop(i)[1]
        if i > 0 and sum(self.free_ranges[i - 1]) == start:  # merge with the previous
            prev_start, prev_length = self.free_ranges[i - 1]
            self.free_ranges[i - 1] = (prev_start, prev_length + length)
        else:
            self.free_ranges.insert(i, (start, length))

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stores a step's keys/values [kv_heads, T, head_dim] at arena slots [T]."""
        self.arena[layer, 0].index_copy_(1, slots, keys)
        self.arena[layer, 1].index_copy_(1, slots, values)

    def copy(self, src: int, dst: int, num_tokens: int) -> None:
        """Copies the keys and values of slots src.. to slots dst.., every layer at once."""
        self.arena[..., dst:dst + num_tokens, :] = self.arena[..., src:src + num_tokens, :]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values: [kv_heads, slots, head_dim] each; a sequence's are
        [:, start : start + length]."""
        return self.arena[layer, 0], self.arena[layer, 1]

    @property
    def num_free_tokens(self) -> int:
        return self.budget_tokens - self.num_used_tokens
