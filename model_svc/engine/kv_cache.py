"""Per-sequence KV storage under a global token budget.

Each running sequence owns one contiguous buffer sized for its prompt plus its
`max_new_tokens`, reserved when it is admitted and released the moment it ends.
Attention then reads each sequence's own keys and values, exact length, with no
padding: this is what makes a sequence's tokens identical whether it runs alone
or beside others (a left-padded merged cache changes the attention's reduction
and flips greedy tokens in bfloat16; see the README's engine notes).

The budget is in tokens, so memory is bounded by it: when a new sequence does
not fit, it waits.
"""

from __future__ import annotations

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


class SequenceKV:
    """One sequence's keys and values: [layers, 1, kv_heads, capacity, head_dim] each."""

    def __init__(self, spec: KVSpec, capacity: int):
        shape = (spec.num_layers, 1, spec.num_kv_heads, capacity, spec.head_dim)
        self.keys = torch.empty(shape, dtype=spec.dtype, device=spec.device)
        self.values = torch.empty(shape, dtype=spec.dtype, device=spec.device)
        self.capacity = capacity

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor):
        """Stores keys/values [1, kv_heads, t, head_dim] at positions start..start+t and returns
        the cache up to there: ([1, kv_heads, start+t, head_dim], same)."""
        end = start + keys.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: position {end} past capacity {self.capacity}")
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class KVCacheManager:
    """Hands out SequenceKV buffers while the reserved tokens stay within the budget."""

    def __init__(self, spec: KVSpec, budget_tokens: int):
        self.spec = spec
        self.budget_tokens = budget_tokens
        self.num_used_tokens = 0

    def can_allocate(self, num_tokens: int) -> bool:
        return self.num_used_tokens + num_tokens <= self.budget_tokens

    def allocate(self, num_tokens: int) -> SequenceKV:
        if not self.can_allocate(num_tokens):
            raise RuntimeError(f"KV budget exhausted: {num_tokens} asked, {self.num_free_tokens} free")
        self.num_used_tokens += num_tokens
        return SequenceKV(self.spec, num_tokens)

    def free(self, kv: SequenceKV) -> None:
        self.num_used_tokens -= kv.capacity

    @property
    def num_free_tokens(self) -> int:
        return self.budget_tokens - self.num_used_tokens
