"""Which model worker a request goes to: the one most likely to hold its prompt's leading blocks in
its prefix cache, unless that one is much busier than the least-loaded.

Least-loaded routing alone scatters a conversation's turns and a shared system prompt's requests
over the workers, and each worker computes the prefix again. The router remembers, per worker, the
chained hashes of the leading blocks (up to `MAX_BLOCKS`) of the prompts it sent there, in a bounded
least-recently-used set, and sends a prompt to the worker that matches the most of its leading
blocks, as SGLang's cache-aware router does with its radix trees. A worker whose load passes
`2 x the least load + SLACK` loses its claim, so affinity never piles work onto one worker. The
hashes only steer: a stale or colliding entry costs a cache miss, never a wrong answer.

A request through a LoRA adapter goes, when no worker holds its prefix, to the worker its adapter's
last request went to, within the same load bound: a worker holds at most --max-loras adapters in
memory and reads the others from disk when asked, so an adapter's traffic kept together keeps it
in memory there (the LoRA affinity vLLM's routers and llm-d's endpoint picker give).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, TypeVar

MAX_BLOCKS = 64  # leading blocks of a prompt remembered (1,024 tokens at 16 a block)
CAPACITY = 100_000  # block hashes remembered per worker
HOMES = 10_000  # adapters whose last worker is remembered
SLACK = 4  # sequences a cache-holding worker may run beyond twice the least-loaded one's

W = TypeVar("W")


def block_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str = "",
                 max_blocks: int = MAX_BLOCKS) -> list[int]:
    """Chained hashes of the prompt's full leading blocks, from its cache salt: each covers every
    token before it too, and the same prompt under another salt matches nothing."""
    hashes, parent = [], hash(cache_salt)
    for i in range(min(len(token_ids) // block_size, max_blocks)):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        hashes.append(parent)
    return hashes


class PrefixRouter:
    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self.seen: dict[object, OrderedDict[int, None]] = {}  # worker key -> block hashes, least recent first
        self.homes: OrderedDict[str, object] = OrderedDict()  # adapter -> the worker key it last went to

    def choose(self, workers: list[W], loads: list[int], keys: list[object], hashes: list[int],
               adapter: str = "") -> W:
        """The worker to send a prompt with these block hashes (through this LoRA adapter) to
        (workers non-empty)."""
        least = min(loads)
        best, best_match = None, 0
        for worker, load, key in zip(workers, loads, keys):
            if load > 2 * least + SLACK:
                continue  # too busy to claim a request for its cache
            seen = self.seen.get(key)
            match = 0
            if seen:
                for h in hashes:
                    if h not in seen:
                        break
                    match += 1
            if match > best_match:
                best, best_match = worker, match
        if best is None and adapter and self.homes.get(adapter) in keys:
            i = keys.index(self.homes[adapter])
            if loads[i] <= 2 * least + SLACK:
                return workers[i]
        if best is None:
            return workers[loads.index(least)]
        return best

    def record(self, key: object, hashes: list[int], adapter: str = "") -> None:
        """Remembers that a prompt with these block hashes (through this adapter) went to the worker `key`."""
        if adapter:
            self.homes[adapter] = key
            self.homes.move_to_end(adapter)
            if len(self.homes) > HOMES:
                self.homes.popitem(last=False)
        seen = self.seen.setdefault(key, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def forget(self, key: object) -> None:
        """A worker that left or restarted (its cache is gone)."""
        self.seen.pop(key, None)
        for adapter in [a for a, k in self.homes.items() if k == key]:
            del self.homes[adapter]
