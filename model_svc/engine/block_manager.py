"""Bookkeeping of the paged KV cache: fixed-size blocks, reference counts, prefix hashes. No tensors.

The cache is `num_blocks` blocks of `block_size` token slots; block b holds slots
b * block_size .. (b + 1) * block_size - 1 of the runner's arena. A sequence owns a block table (its
blocks in order): its token at position p lives in slot table[p // block_size] * block_size +
p % block_size. Blocks are taken as tokens are appended and given back when the sequence ends, so a
sequence holds what it has computed, not what it might generate.

Automatic prefix caching: a block whose every slot is computed gets a hash chained over its
parent's hash and its token ids (blake2b, 128 bits; the ids are compared on a hit too, so a
collision can never serve another prompt's keys). A chain starts from a root: sequences whose keys
and values are computed with other numerics (a long prompt's kernel) hash under another root, so
they never share blocks with the rest, and each cache salt (a tenant, or a salt its requests name)
has its own roots (`salted_root`). A new sequence takes every leading block whose hash is
cached by reference, without a copy. A block whose last user ends keeps its contents and its
hash and waits in a least-recently-used order; it is reused as is by the next sequence with that
prefix, or emptied for another use only when no never-used block is left.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence as Seq

BLOCK_SIZE = 16


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def block_hash(parent: bytes | None, token_ids: Seq[int]) -> bytes:
    """The identity of a full block: its tokens and, through the parent's hash, every token before."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return digest.digest()


@functools.lru_cache(maxsize=4096)
def salted_root(root: bytes | None, salt: bytes | None) -> bytes | None:
    """The namespace `root` inside the cache salt `salt` (None or empty: `root` itself). Chains from
    different salts never meet, so a tenant can neither hit nor time another tenant's blocks."""
    if not salt:
        return root
    digest = hashlib.blake2b(b"cache salt", digest_size=16)
    digest.update(len(salt).to_bytes(4, "little") + salt + (root or b""))
    return digest.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once full (then its contents never change)
    token_ids: tuple[int, ...] = ()  # of a hashed block, to verify a hit
    parent: bytes | None = None  # the previous block's hash, to verify a hit


@dataclass
class BlockTable:
    """A sequence's blocks, and how many of its leading tokens' blocks are hashed."""

    block_ids: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    last_hash: bytes | None = None  # hash of block num_hashed_blocks - 1
    root: bytes | None = None  # what the first block's hash chains from (its numerics' namespace)

    def slot(self, position: int, block_size: int) -> int:
        return self.block_ids[position // block_size] * block_size + position % block_size

    def slots(self, start: int, stop: int, block_size: int) -> list[int]:
        """The arena slots of positions start .. stop - 1."""
        return [self.slot(p, block_size) for p in range(start, stop)]

    def covering(self, num_tokens: int, block_size: int) -> list[int]:
        """The blocks that hold the first `num_tokens` tokens."""
        return self.block_ids[:blocks_for(num_tokens, block_size)]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE, enable_prefix_caching: bool = True,
                 watermark_blocks: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unused blocks: the never-used (or emptied) ones first, then cached ones by last use.
        self.empty: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: low ids first
        self.cached: OrderedDict[int, None] = OrderedDict()  # ref_count 0 with a hash, least recent first
        self.by_hash: dict[bytes, int] = {}
        # Admission keeps this many blocks free for running sequences to grow into.
        self.watermark_blocks = max(1, num_blocks // 100) if watermark_blocks is None else watermark_blocks
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # of which found there
        # What the prefix cache gained and lost, in order, while a publisher drains it (model_svc/kv_events.py;
        # None: not recorded): ("stored", hash, parent block's hash or None, token ids, root), ("removed", hash).
        self.kv_events: list[tuple] | None = None

    # -- counts --------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be taken now (empty, or cached and unused)."""
        return len(self.empty) + len(self.cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Unused blocks that keep a prefix for later requests."""
        return len(self.cached)

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    # -- taking and giving back ----------------------------------------------------

    def _take(self) -> int:
        if self.empty:
            block_id = self.empty.pop()
        elif self.cached:
            block_id, _ = self.cached.popitem(last=False)  # the least recently used prefix goes
            block = self.blocks[block_id]
            del self.by_hash[block.hash]
            if self.kv_events is not None:
                self.kv_events.append(("removed", block.hash))
            block.hash, block.token_ids, block.parent = None, (), None
        else:
            raise RuntimeError("no free KV-cache block")  # callers check first: this is a bug
        self.blocks[block_id].ref_count = 1
        return block_id

    def ensure(self, table: BlockTable, num_tokens: int) -> bool:
        """Grows `table` to hold `num_tokens` tokens; False (and nothing taken) if there are not
        enough free blocks."""
        missing = self.blocks_for(num_tokens) - len(table.block_ids)
        if missing <= 0:
            return True
        if missing > self.num_free_blocks:
            return False
        table.block_ids.extend(self._take() for _ in range(missing))
        return True

    def share(self, block_ids: list[int]) -> list[int]:
        """Takes held blocks by reference once more (a beam continued twice shares its full blocks)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count < 1:
                raise RuntimeError(f"block {block_id} is shared but held by no one")  # a bug
            block.ref_count += 1
        return list(block_ids)

    def trim(self, table: BlockTable, num_tokens: int) -> None:
        """Gives back the table's blocks past those holding `num_tokens` tokens (rejected proposals'
        room); they were never hashed, since only computed tokens' full blocks are."""
        keep = self.blocks_for(num_tokens)
        while len(table.block_ids) > keep:
            block = self.blocks[table.block_ids.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:  # not expected (see above); kept cached all the same
                    self.cached[block.block_id] = None
                else:
                    self.empty.append(block.block_id)

    def can_admit(self, num_tokens: int, num_cached_blocks: int = 0, num_cached_unused: int = 0) -> bool:
        """Room for a new sequence's first `num_tokens` tokens (its first `num_cached_blocks` blocks
        come from the cache), keeping the watermark free for running ones. `num_cached_unused`: of
        those cached blocks, the ones no sequence holds: they count among the free blocks now, and
        taking them leaves that many fewer (a preempted sequence coming back to its own blocks)."""
        need = self.blocks_for(num_tokens) - num_cached_blocks
        return need + self.watermark_blocks <= self.num_free_blocks - num_cached_unused

    def free(self, table: BlockTable) -> None:
        """Gives a sequence's blocks back: hashed ones stay cached (the most recent use last)."""
        for block_id in reversed(table.block_ids):  # a prefix's tail goes before its head
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self.cached[block_id] = None
                else:
                    self.empty.append(block_id)
        table.block_ids.clear()
        table.num_hashed_blocks, table.last_hash = 0, None

    # -- prefix caching ------------------------------------------------------------

    def _cached_prefix(self, token_ids: Seq[int], max_tokens: int,
                       root: bytes | None = None) -> tuple[list[int], bytes | None]:
        """The cached blocks holding `token_ids`' longest prefix of whole blocks (at most
        `max_tokens` tokens) under `root`, and the last one's hash."""
        found: list[int] = []
        parent = root
        if not self.enable_prefix_caching:
            return found, parent
        for i in range(max_tokens // self.block_size):
            ids = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = block_hash(parent, ids)
            block_id = self.by_hash.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != ids or block.parent != parent:
                break  # a hash collision: never serve another prompt's keys
            found.append(block_id)
            parent = h
        return found, parent

    def num_cached_prefix(self, token_ids: Seq[int], max_tokens: int, root: bytes | None = None) -> int:
        """How many leading blocks `match` would find now (nothing is taken)."""
        return len(self._cached_prefix(token_ids, max_tokens, root)[0])

    def cached_prefix_use(self, token_ids: Seq[int], max_tokens: int, root: bytes | None = None) -> tuple[int, int]:
        """(leading blocks `match` would find now, how many of them no sequence holds)."""
        found = self._cached_prefix(token_ids, max_tokens, root)[0]
        return len(found), sum(self.blocks[b].ref_count == 0 for b in found)

    def match(self, token_ids: Seq[int], max_tokens: int, root: bytes | None = None) -> BlockTable:
        """A table holding the longest cached prefix of `token_ids` under `root`, whole blocks, at most
        `max_tokens` tokens; its blocks are taken by reference. Empty without prefix caching."""
        found, parent = self._cached_prefix(token_ids, max_tokens, root)
        for block_id in found:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.cached[block_id]
            block.ref_count += 1
        if self.enable_prefix_caching:
            self.num_queried_tokens += len(token_ids)
            self.num_hit_tokens += len(found) * self.block_size
        return BlockTable(found, len(found), parent, root)

    def register(self, table: BlockTable, token_ids: Seq[int], num_computed_tokens: int) -> None:
        """Hashes the table's blocks that `num_computed_tokens` made full, so later sequences can
        find them. A block whose hash another block already holds stays private (no duplicates)."""
        if not self.enable_prefix_caching:
            return
        while (table.num_hashed_blocks + 1) * self.block_size <= num_computed_tokens:
            i = table.num_hashed_blocks
            ids = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = table.last_hash if i else table.root
            h = block_hash(parent, ids)
            block = self.blocks[table.block_ids[i]]
            if h not in self.by_hash and block.hash is None:
                block.hash, block.token_ids, block.parent = h, ids, parent
                self.by_hash[h] = block.block_id
                if self.kv_events is not None:
                    self.kv_events.append(("stored", h, parent if i else None, ids, table.root))
            table.num_hashed_blocks, table.last_hash = i + 1, h
