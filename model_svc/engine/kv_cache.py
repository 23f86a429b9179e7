"""The paged KV cache's tensors: one arena per model, owned by the runner.

The arena holds `num_blocks * block_size` token slots (plus one scratch slot for the dummy row a
one-token step adds); which sequence owns which block is the block manager's business
(block_manager.py), and the runner reads and writes slots through each sequence's block table.
Attention reads each sequence's own keys and values, exact length, with no padding: this is what
makes a sequence's tokens identical whether it runs alone or beside others (a left-padded merged
cache changes the attention's reduction and flips greedy tokens in bfloat16; see the README). One
arena (rather than a buffer per sequence) lets a step write every new key of a layer with one call.
The arena is allocated once and zeroed, so its memory is committed at start: the process is as
large from its first request as it will be under full load (a limit that is too small fails at
start, not hours later), and a steady RSS afterwards means nothing leaks. Left lazy, the prefix
cache would touch fresh blocks for hours (it keeps freed blocks for reuse and takes never-used ones
first), and RSS would creep up to the arena's size.

Its size (`arena_tokens`): --kv-cache-tokens, or --kv-cache-memory's bytes at the model's cost per
token, or by default AUTO_FRACTION of the memory available at start, at most AUTO_MAX_BYTES (as
vLLM's CPU backend sets its KV space in bytes: a model with a costlier token gets fewer of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 1 << 30
AUTO_FRACTION = 1 / 8  # of the memory available at start, by default
AUTO_MAX_BYTES = 2 * GIB  # at most, by default (1 GiB where the memory available is unknown)


def arena_tokens(bytes_per_token: int, block_size: int, tokens: int | None = None,
                 memory_gib: float | None = None, available: int | None = None) -> tuple[int, str]:
    """The arena's capacity in tokens (whole blocks, at least one) and how it was chosen: `tokens`
    when given, else the tokens `memory_gib` holds, else the default budget of `available` bytes."""
    if tokens is not None:
        return tokens // block_size * block_size, "--kv-cache-tokens"
    if memory_gib is not None:
        budget, why = int(memory_gib * GIB), f"--kv-cache-memory {memory_gib:g}"
    elif available is None:
        budget, why = GIB, "1 GiB: the memory available is unknown"
    else:
        budget = min(AUTO_MAX_BYTES, int(available * AUTO_FRACTION))
        why = f"min(2 GiB, 1/8 of the {available / GIB:.1f} GiB available)"
    return max(block_size, budget // bytes_per_token // block_size * block_size), why


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


class KVCache:
    """The arena: [layers, keys/values, kv_heads, slots, head_dim]; the last slot is scratch."""

    def __init__(self, spec: KVSpec, num_blocks: int, block_size: int):
        self.spec = spec
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        self.scratch_slot = self.num_slots
        self.arena = torch.zeros((spec.num_layers, 2, spec.num_kv_heads, self.num_slots + 1, spec.head_dim),
                                 dtype=spec.dtype, device=spec.device)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stores a step's keys/values [kv_heads, T, head_dim] at arena slots [T]."""
        self.arena[layer, 0].index_copy_(1, slots, keys)
        self.arena[layer, 1].index_copy_(1, slots, values)

    def copy(self, src_slots: list[int], dst_slots: list[int]) -> None:
        """Copies the keys and values at slots src_slots to dst_slots, every layer at once."""
        src = torch.tensor(src_slots, dtype=torch.long, device=self.arena.device)
        dst = torch.tensor(dst_slots, dtype=torch.long, device=self.arena.device)
        self.arena.index_copy_(3, dst, self.arena.index_select(3, src))

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values: [kv_heads, slots, head_dim] each."""
        return self.arena[layer, 0], self.arena[layer, 1]
