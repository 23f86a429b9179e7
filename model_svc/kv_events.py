"""vLLM's KV-cache events (`VllmEngine.SubscribeKvEvents`), for routers that follow each worker's
prefix cache (SMG): the blocks the block manager hashed (stored, with their token ids, so the router
folds them into its own content hashes) and the cached blocks it reused for others (removed).

The block manager records them on the engine thread (`BlockManager.kv_events`); after each step
`drain` hands them to the server's event loop, which numbers them as one batch (from 1, one more a
batch), keeps the last HISTORY batches, and sends each to every subscriber. A subscriber starts
from now (`start_sequence_number` 0) or resumes from a batch it names, replayed from the history;
a batch older than the history is gone, and the stream then starts with a KvCacheCleared event so
the subscriber forgets what it cannot know is still there. A block's hash is the first 8 bytes of
its 128-bit prefix hash as a signed integer; blocks hashed under a root other than the plain one
(another tenant's salt, an adapter, a long prompt's numerics) carry that root as `cache_salt`, so
a plain request's prefix never matches them.
"""

from __future__ import annotations

import asyncio
import collections
import time

from genrpc.vllm import common_pb2

HISTORY = 4096  # batches kept for subscribers that resume
QUEUE = 4096  # batches a subscriber may fall behind by before its stream ends (it resumes from its cursor)
MEDIUM = "CPU"  # where this engine keeps its KV cache (vLLM's `medium` string)


def hash64(digest: bytes) -> int:
    """A block's 128-bit prefix hash as the protocol's signed 64-bit block hash."""
    return int.from_bytes(digest[:8], "little", signed=True)


def to_batch(number: int, timestamp: float, events: list[tuple], block_size: int) -> common_pb2.KvEventBatch:
    """The block manager's events as one KvEventBatch: consecutive stores of one chain in one event,
    consecutive removals in one."""
    out: list[common_pb2.KvCacheEvent] = []
    last_stored: tuple[bytes, bytes | None] | None = None  # (hash, root) of the previous stored block
    for event in events:
        if event[0] == "stored":
            _, digest, parent, token_ids, root = event
            block = common_pb2.KvBlock(block_hash=hash64(digest), token_ids=token_ids, block_size=block_size)
            if out and out[-1].HasField("stored") and last_stored == (parent, root):
                out[-1].stored.blocks.append(block)
            else:
                stored = common_pb2.KvBlocksStored(blocks=[block], tier=common_pb2.KV_CACHE_TIER_DEVICE,
                                                   medium=MEDIUM, locality=common_pb2.KV_CACHE_LOCALITY_LOCAL)
                if parent is not None:
                    stored.parent_block_hash = hash64(parent)
                if root is not None:
                    stored.cache_salt = root.hex()
                out.append(common_pb2.KvCacheEvent(stored=stored))
            last_stored = (digest, root)
        elif event[0] == "removed":
            if out and out[-1].HasField("removed"):
                out[-1].removed.block_hashes.append(hash64(event[1]))
            else:
                out.append(common_pb2.KvCacheEvent(removed=common_pb2.KvBlocksRemoved(
                    block_hashes=[hash64(event[1])], tier=common_pb2.KV_CACHE_TIER_DEVICE, medium=MEDIUM,
                    locality=common_pb2.KV_CACHE_LOCALITY_LOCAL)))
            last_stored = None
    for i, event in enumerate(out):
        event.event_id = number * 1_000_000 + i + 1  # unique across batches: batch number, then position
    return common_pb2.KvEventBatch(sequence_number=number, timestamp=timestamp, events=out, dp_rank=0)


class KvEventPublisher:
    def __init__(self, loop: asyncio.AbstractEventLoop, blocks):
        """Starts the block manager recording (`blocks.kv_events`); `drain` runs on the engine thread."""
        self.loop = loop
        self.blocks = blocks
        self.next_number = 1
        self.history: collections.deque[common_pb2.KvEventBatch] = collections.deque(maxlen=HISTORY)
        self.queues: set[asyncio.Queue] = set()
        blocks.kv_events = []

    def drain(self) -> None:
        """After a step, on the engine thread: the step's events to the event loop, as one batch."""
        events = self.blocks.kv_events
        if not events:
            return
        self.blocks.kv_events = []
        self.loop.call_soon_threadsafe(self._publish, events, time.time())

    def _publish(self, events: list[tuple], timestamp: float) -> None:
        batch = to_batch(self.next_number, timestamp, events, self.blocks.block_size)
        self.next_number += 1
        self.history.append(batch)
        for queue in list(self.queues):
            if queue.qsize() >= QUEUE:  # too far behind: its stream ends, and it resumes from its cursor
                self.queues.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(batch)

    async def subscribe(self, start: int):
        """The batches from `start` (0: from now) as they come; raises LookupError for a start beyond the
        next batch. Ends (returns) when the subscriber has fallen QUEUE batches behind."""
        if start > self.next_number:
            raise LookupError(f"start_sequence_number {start} is beyond the next batch ({self.next_number})")
        queue: asyncio.Queue = asyncio.Queue()
        replay: list[common_pb2.KvEventBatch] = []
        if start:
            replay = [batch for batch in self.history if batch.sequence_number >= start]
            oldest = self.history[0].sequence_number if self.history else self.next_number
            if start < oldest:  # part of what it asks for is gone: it forgets everything, then goes on
                cleared = common_pb2.KvEventBatch(sequence_number=oldest - 1, timestamp=time.time(), dp_rank=0,
                                                  events=[common_pb2.KvCacheEvent(cleared=common_pb2.KvCacheCleared())])
                replay.insert(0, cleared)
        self.queues.add(queue)
        try:
            for batch in replay:
                yield batch
            while True:
                batch = await queue.get()
                if batch is None:
                    return
                yield batch
        finally:
            self.queues.discard(queue)
