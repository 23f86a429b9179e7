"""The paged KV cache's bookkeeping alone: allocation, reference counts, hashing, eviction, collisions."""

import pytest

from model_svc.engine import block_manager
from model_svc.engine.block_manager import BlockManager, BlockTable, block_hash


def test_blocks_are_taken_as_tokens_are_appended_and_given_back():
    m = BlockManager(8, block_size=4, watermark_blocks=0)
    t = BlockTable()
    assert m.ensure(t, 1) and len(t.block_ids) == 1
    assert m.ensure(t, 4) and len(t.block_ids) == 1  # still fits
    assert m.ensure(t, 5) and len(t.block_ids) == 2
    assert m.num_used_blocks == 2 and m.num_free_blocks == 6
    assert t.slot(5, 4) == t.block_ids[1] * 4 + 1
    assert not m.ensure(t, 40) and len(t.block_ids) == 2  # all or nothing
    m.free(t)
    assert m.num_free_blocks == 8 and t.block_ids == []


def test_admission_keeps_a_watermark():
    m = BlockManager(10, block_size=4, watermark_blocks=2)
    assert m.can_admit(32) and not m.can_admit(33)
    assert m.can_admit(40, num_cached_blocks=2)


def test_full_blocks_are_found_by_a_later_sequence_by_reference():
    m = BlockManager(16, block_size=4)
    tokens = list(range(100, 110))  # 2 full blocks + 2 tokens
    a = BlockTable()
    m.ensure(a, 10)
    m.register(a, tokens, 10)
    assert a.num_hashed_blocks == 2
    b = m.match(tokens + [1, 2], max_tokens=11)
    assert b.block_ids == a.block_ids[:2]  # shared, not copied
    assert m.blocks[a.block_ids[0]].ref_count == 2
    assert (m.num_queried_tokens, m.num_hit_tokens) == (12, 8)
    # A prompt that differs in its second block shares only the first.
    c = m.match(tokens[:4] + [0] * 8, max_tokens=11)
    assert c.block_ids == a.block_ids[:1]
    # At most max_tokens: the last token is always computed.
    assert m.num_cached_prefix(tokens[:8], max_tokens=7) == 1


def test_finished_blocks_stay_cached_and_are_evicted_least_recently_used():
    m = BlockManager(4, block_size=2, watermark_blocks=0)
    old, new = BlockTable(), BlockTable()
    m.ensure(old, 4)
    m.register(old, [1, 2, 3, 4], 4)
    m.ensure(new, 4)
    m.register(new, [5, 6, 7, 8], 4)
    m.free(old)
    m.free(new)
    assert m.num_cached_blocks == 4 and m.num_free_blocks == 4
    # Taking one block evicts the least recently freed prefix's tail first.
    t = BlockTable()
    m.ensure(t, 2)
    assert m.num_cached_prefix([1, 2, 3, 4, 0], 4) == 1  # old's second block went
    assert m.num_cached_prefix([5, 6, 7, 8, 0], 4) == 2
    m.ensure(t, 8)  # everything
    assert m.num_cached_prefix([5, 6, 7, 8, 0], 4) == 0 and not m.by_hash


def test_a_hit_takes_a_cached_block_out_of_the_eviction_order():
    m = BlockManager(2, block_size=2, watermark_blocks=0)
    a = BlockTable()
    m.ensure(a, 2)
    m.register(a, [1, 2], 2)
    m.free(a)
    b = m.match([1, 2, 3], 2)
    assert b.block_ids == [0] and m.num_cached_blocks == 0 and m.num_free_blocks == 1
    c = BlockTable()
    assert not m.ensure(c, 4)  # the shared block is not evictable while used


def test_a_hash_collision_never_serves_another_prompts_keys(monkeypatch):
    monkeypatch.setattr(block_manager, "block_hash", lambda parent, ids: b"same")
    m = BlockManager(4, block_size=2)
    a = BlockTable()
    m.ensure(a, 2)
    m.register(a, [1, 2], 2)
    assert m.num_cached_prefix([9, 9, 9], 2) == 0  # same hash, other ids: a miss
    assert m.num_cached_prefix([1, 2, 9], 2) == 1


def test_chained_hash_depends_on_every_earlier_token():
    first = block_hash(None, [1, 2])
    assert block_hash(first, [3, 4]) != block_hash(block_hash(None, [1, 5]), [3, 4])
    assert len(first) == 16


def test_duplicate_contents_stay_private_and_caching_can_be_off():
    m = BlockManager(4, block_size=2)
    a, b = BlockTable(), BlockTable()
    for t in (a, b):
        m.ensure(t, 2)
        m.register(t, [1, 2], 2)
    assert len(m.by_hash) == 1
    m.free(b)
    assert m.num_cached_blocks == 0  # b's copy had no hash: back to empty
    off = BlockManager(4, block_size=2, enable_prefix_caching=False)
    t = BlockTable()
    off.ensure(t, 2)
    off.register(t, [1, 2], 2)
    assert off.match([1, 2, 3], 2).block_ids == [] and not off.by_hash


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        BlockManager(0)


def test_admission_counts_cached_blocks_it_takes_out_of_the_free_pool():
    """Unused cached blocks are free blocks too: a sequence coming back to them (after a preemption)
    takes them out of the pool, so they cannot also pay for its new blocks."""
    m = BlockManager(6, block_size=4, watermark_blocks=0)
    tokens = list(range(100, 128))
    t = BlockTable()
    assert m.ensure(t, 20)
    m.register(t, tokens, 20)
    m.free(t)
    assert m.num_free_blocks == 6 and m.num_cached_blocks == 5
    found, unused = m.cached_prefix_use(tokens, 27)
    assert (found, unused) == (5, 5)
    assert m.can_admit(24, found, unused)  # one new block: the one empty block
    assert not m.can_admit(28, found, unused)  # two new blocks: only one is left once the five are taken
    again = m.match(tokens, 27)
    assert m.ensure(again, 24) and not m.ensure(again, 28)


def test_kv_events_record_stored_and_evicted_blocks_in_order():
    """What model_svc/kv_events.py publishes: a block stored when it is hashed (its parent's hash, its
    ids, its root), removed when its cached block is taken for another sequence; nothing while not
    recorded."""
    from model_svc.kv_events import hash64, to_batch

    m = BlockManager(3, block_size=2, watermark_blocks=0)
    a = BlockTable()
    m.ensure(a, 4)
    m.register(a, [1, 2, 3, 4], 4)  # not recorded yet
    assert m.kv_events is None
    m.free(a)
    m.kv_events = []
    b = BlockTable(root=b"salt")
    m.ensure(b, 5)
    m.register(b, [5, 6, 7, 8, 9], 5)  # two full blocks under a root; taking them evicted a's
    h1 = block_hash(b"salt", (5, 6))
    h2 = block_hash(h1, (7, 8))
    evicted = [e for e in m.kv_events if e[0] == "removed"]
    assert [e[0] for e in m.kv_events] == ["removed", "removed", "stored", "stored"]
    assert {e[1] for e in evicted} == {block_hash(None, (1, 2)), block_hash(block_hash(None, (1, 2)), (3, 4))}
    assert m.kv_events[2:] == [("stored", h1, None, (5, 6), b"salt"), ("stored", h2, h1, (7, 8), b"salt")]
    batch = to_batch(7, 1.0, m.kv_events, 2)
    assert batch.sequence_number == 7 and len(batch.events) == 2  # the removals together, the chain together
    removed, stored = batch.events[0].removed, batch.events[1].stored
    assert sorted(removed.block_hashes) == sorted(hash64(e[1]) for e in evicted)
    assert [list(b.token_ids) for b in stored.blocks] == [[5, 6], [7, 8]]
    assert [b.block_hash for b in stored.blocks] == [hash64(h1), hash64(h2)]
    assert not stored.HasField("parent_block_hash") and stored.cache_salt == b"salt".hex()
    assert len({e.event_id for e in batch.events}) == 2
