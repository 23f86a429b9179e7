"""The native decode-attention kernel: as accurate as PyTorch's SDPA, and bit for bit the same for a
sequence whatever else is in the call and wherever its blocks lie in the arena."""

import random

import pytest
import torch
import torch.nn.functional as F

from model_svc.engine import decode_attention


@pytest.fixture(scope="module")
def kernel():
    attend = decode_attention.load()
    # The machines this runs on have a C compiler: a silent fall-back would hide a slow server.
    assert attend is not None, "the decode-attention kernel did not build"
    return attend


BS = 16


def make_case(num_kv_heads, group, head_dim, lengths, seed, block_size=BS):
    """An arena with each sequence's blocks scattered in random order, as a paged cache leaves them."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-length // block_size) for length in lengths]
    num_blocks = sum(need) + 8
    arena = torch.randn(2, num_kv_heads, num_blocks * block_size + 1, head_dim, generator=gen).to(torch.bfloat16)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for n in need:
        tables.append(order[:n])
        order = order[n:]
    query = torch.randn(len(lengths) + 3, num_kv_heads * group, head_dim, generator=gen).to(torch.bfloat16)
    return arena, tables, query


def gathered(arena, table, length, block_size=BS):
    """A sequence's keys and values [2, Hkv, length, D], in order."""
    slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(length)])
    return arena[:, :, slots]


def attend(kernel, arena, query, rows, tables, lengths, scale, block_size=BS):
    out = torch.zeros_like(query)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    flat, offsets = [], []
    for table in tables:
        offsets.append(len(flat))
        flat.extend(table)
    kernel(query, arena[0], arena[1], out, as_long(rows), as_long(flat), as_long(offsets), as_long(lengths),
           block_size, scale)
    return out


@pytest.mark.parametrize("num_kv_heads,group,head_dim", [(3, 3, 64), (2, 4, 128), (4, 1, 32), (1, 5, 80), (1, 2, 256)])
def test_as_accurate_as_sdpa(kernel, num_kv_heads, group, head_dim):
    lengths = [1, 2, 15, 16, 17, 100, 700, 2100]
    arena, tables, query = make_case(num_kv_heads, group, head_dim, lengths, seed=head_dim)
    scale = head_dim ** -0.5
    rows = [i + 2 for i in range(len(lengths))]  # rows need not start at 0
    out = attend(kernel, arena, query, rows, tables, lengths, scale)
    for b, (row, table, length) in enumerate(zip(rows, tables, lengths)):
        keys, values = gathered(arena, table, length)
        q = query[row].view(num_kv_heads, group, head_dim)
        exact = torch.softmax(q.double() @ keys.double().transpose(1, 2) * scale, -1) @ values.double()
        sdpa = F.scaled_dot_product_attention(q[None], keys[None], values[None], scale=scale)[0]
        ours_error = (out[row].view_as(q).double() - exact).abs().max().item()
        sdpa_error = (sdpa.double() - exact).abs().max().item()
        assert ours_error <= max(2 * sdpa_error, 1e-2), (length, ours_error, sdpa_error)
    untouched = [r for r in range(query.shape[0]) if r not in rows]
    assert not out[untouched].any(), "rows of other tokens were written"


def test_a_sequence_gets_the_same_bits_in_any_batch(kernel):
    rng = random.Random(0)
    lengths = [rng.randint(1, 900) for _ in range(24)]
    arena, tables, query = make_case(3, 3, 64, lengths, seed=1)
    rows = list(range(len(lengths)))
    together = attend(kernel, arena, query, rows, tables, lengths, 0.125)
    for b in range(len(lengths)):
        alone = attend(kernel, arena, query, [b], [tables[b]], [lengths[b]], 0.125)
        assert torch.equal(alone[b], together[b]), f"sequence {b} (length {lengths[b]}) changed beside others"
    for _ in range(10):  # other subsets, in other orders
        subset = rng.sample(rows, rng.randint(2, len(rows)))
        some = attend(kernel, arena, query, subset, [tables[b] for b in subset], [lengths[b] for b in subset], 0.125)
        assert all(torch.equal(some[b], together[b]) for b in subset)


@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_where_the_blocks_lie_never_changes_the_bits(kernel, block_size):
    """A prefix served from cached blocks, or a sequence resumed after a preemption, reads its keys
    from other blocks than a fresh run would: the result must not move."""
    lengths = [1, 17, 300]
    arena, tables, query = make_case(3, 3, 64, lengths, seed=3, block_size=block_size)
    rows = list(range(len(lengths)))
    scattered = attend(kernel, arena, query, rows, tables, lengths, 0.125, block_size)
    compact = torch.zeros_like(arena)
    compact_tables, next_block = [], 0
    for table, length in zip(tables, lengths):  # the same keys, in consecutive blocks
        compact_tables.append(list(range(next_block, next_block + len(table))))
        next_block += len(table)
        slots = torch.tensor([compact_tables[-1][p // block_size] * block_size + p % block_size
                              for p in range(length)])
        compact[:, :, slots] = gathered(arena, table, length, block_size)
    moved = attend(kernel, compact, query, rows, compact_tables, lengths, 0.125, block_size)
    assert torch.equal(moved, scattered)


def test_wrong_dtype_is_refused(kernel):
    arena, tables, query = make_case(3, 3, 64, [5], seed=2)
    with pytest.raises(TypeError):
        kernel(query.float(), arena[0].float(), arena[1].float(), query.float(), torch.tensor([0]),
               torch.tensor(tables[0]), torch.tensor([0]), torch.tensor([5]), BS, 0.125)
