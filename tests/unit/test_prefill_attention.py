"""The native long-prompt attention kernel: as accurate as PyTorch's SDPA for a chunk after cached
tokens, and bit for bit the same for a query however its prompt is chunked, whatever else is in
the call and wherever its blocks lie: its AVX-512 version and, on a CPU with AMX, its tile version."""

import random

import pytest
import torch
import torch.nn.functional as F

from model_svc.engine import kernel_choice, prefill_attention
from tests.unit.test_decode_attention import gathered, make_case


@pytest.fixture(scope="module", params=["avx512", "amx"])
def kernel(request):
    """Each version of the kernel: AVX-512 BF16, and the tile version where the CPU has AMX."""
    attend = prefill_attention.load()
    if attend is None:
        pytest.skip("no C compiler or no AVX-512 BF16 here: the native kernel cannot run")
    if request.param == "amx":
        if not attend.has_amx:
            pytest.skip(f"no AMX tiles here ({kernel_choice.cpu_info().describe()}): the tile version cannot run")
        if not kernel_choice.request_amx():
            pytest.skip("Linux refused this process the AMX tile state")
        attend.use_amx(True)
    return attend


def attend(kernel, arena, query, chunks, tables, scale, block_size=16, out=None):
    """chunks: (first query row, number of rows, tokens before the chunk) per sequence."""
    out = torch.zeros_like(query) if out is None else out
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    flat, offsets = [], []
    for table in tables:
        offsets.append(len(flat))
        flat.extend(table)
    starts, lengths, pasts = zip(*chunks)
    kernel(query, arena[0], arena[1], out, (as_long(starts), as_long(lengths), as_long(pasts), as_long(flat),
                                            as_long(offsets)), block_size, scale)
    return out


@pytest.mark.parametrize("num_kv_heads,group,head_dim", [(3, 3, 64), (2, 4, 128), (4, 1, 32), (1, 5, 64)])
def test_as_accurate_as_sdpa(kernel, num_kv_heads, group, head_dim):
    """Each chunk's rows against a float64 softmax over the keys up to each row's position: no
    worse than twice SDPA's error with the same causal mask (one key too many or too few, a wrong
    scale or a wrong row is far beyond that)."""
    totals = [1, 17, 40, 300, 1500]  # a sequence's length after its chunk
    lengths = [1, 17, 23, 37, 150]  # of which the chunk's rows
    arena, tables, _ = make_case(num_kv_heads, group, head_dim, totals, seed=head_dim)
    gen = torch.Generator().manual_seed(head_dim + 1)
    query = torch.randn(sum(lengths) + 5, num_kv_heads * group, head_dim, generator=gen).to(torch.bfloat16) * 2
    scale = head_dim ** -0.5
    chunks, row = [], 3  # rows need not start at 0
    for total, length in zip(totals, lengths):
        chunks.append((row, length, total - length))
        row += length
    out = attend(kernel, arena, query, chunks, tables, scale)
    for (start, length, past), table in zip(chunks, tables):
        keys, values = gathered(arena, table, past + length)
        q = query[start:start + length].transpose(0, 1).reshape(num_kv_heads, group * length, head_dim)
        mask = (torch.arange(past + length)[None, :] <= past + torch.arange(length)[:, None]).repeat(group, 1)
        scores = (q.double() @ keys.double().transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))
        exact = scores.softmax(-1) @ values.double()
        sdpa = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[None], scale=scale)
        ours = out[start:start + length].transpose(0, 1).reshape_as(q)
        ours_error = (ours.double() - exact).abs().max().item()
        sdpa_error = (sdpa.double() - exact).abs().max().item()
        assert ours_error <= max(2 * sdpa_error, 1e-2), (past, length, ours_error, sdpa_error)
    written = torch.zeros(query.shape[0], dtype=torch.bool)
    for start, length, _ in chunks:
        written[start:start + length] = True
    assert not out[~written].any(), "rows of other tokens were written"


def test_a_query_gets_the_same_bits_however_its_prompt_is_chunked(kernel):
    """Each query row's numbers depend on its keys alone: a prompt computed in one chunk or in
    chunks of any sizes (the scheduler sizes them by time) gives the same bits, row by row."""
    total = 700
    arena, tables, _ = make_case(3, 3, 64, [total], seed=5)
    gen = torch.Generator().manual_seed(6)
    query = torch.randn(total, 9, 64, generator=gen).to(torch.bfloat16)
    whole = attend(kernel, arena, query, [(0, total, 0)], tables, 0.125)
    rng = random.Random(0)
    for _ in range(4):
        out, done = torch.zeros_like(query), 0
        while done < total:
            size = min(total - done, rng.choice([1, 2, 5, 16, 33, 100, 257]))
            attend(kernel, arena, query, [(done, size, done)], tables, 0.125, out=out)
            done += size
        assert torch.equal(out, whole)


def test_a_chunk_gets_the_same_bits_in_any_call(kernel):
    totals, lengths = [300, 1200, 64, 900], [40, 130, 64, 7]
    arena, tables, _ = make_case(3, 3, 64, totals, seed=7)
    gen = torch.Generator().manual_seed(8)
    query = torch.randn(sum(lengths), 9, 64, generator=gen).to(torch.bfloat16)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    chunks = [(s, n, t - n) for s, n, t in zip(starts, lengths, totals)]
    together = attend(kernel, arena, query, chunks, tables, 0.125)
    for i, chunk in enumerate(chunks):
        alone = attend(kernel, arena, query, [chunk], [tables[i]], 0.125)
        rows = slice(chunk[0], chunk[0] + chunk[1])
        assert torch.equal(alone[rows], together[rows]), f"chunk {i} changed beside others"
    order = [2, 0, 3, 1]
    shuffled = attend(kernel, arena, query, [chunks[i] for i in order], [tables[i] for i in order], 0.125)
    assert torch.equal(shuffled, together)


@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_where_the_blocks_lie_never_changes_the_bits(kernel, block_size):
    """Scattered blocks of any size (16-key runs read in place, others gathered) against the same
    keys in consecutive blocks of 16."""
    totals = [45, 333]
    arena, tables, _ = make_case(3, 3, 64, totals, seed=9, block_size=block_size)
    gen = torch.Generator().manual_seed(10)
    query = torch.randn(60, 9, 64, generator=gen).to(torch.bfloat16)
    chunks = [(0, 20, 25), (20, 40, 293)]
    scattered = attend(kernel, arena, query, chunks, tables, 0.125, block_size)
    compact = torch.zeros_like(arena)
    compact_tables, next_block = [], 0
    for table, total in zip(tables, totals):
        need = -(-total // 16)
        compact_tables.append(list(range(next_block, next_block + need)))
        next_block += need
        slots = torch.tensor([compact_tables[-1][p // 16] * 16 + p % 16 for p in range(total)])
        compact[:, :, slots] = gathered(arena, table, total, block_size)
    moved = attend(kernel, compact, query, chunks, compact_tables, 0.125, 16)
    assert torch.equal(moved, scattered)


def test_slots_past_the_end_are_never_read_into_the_result(kernel):
    """A block's slots beyond the sequence's length hold whatever an earlier sequence left (here
    NaN): they must not reach the output."""
    arena, tables, _ = make_case(3, 3, 64, [50], seed=11)
    for p in range(50, 64):  # the rest of its last block
        arena[:, :, tables[0][p // 16] * 16 + p % 16] = float("nan")
    query = torch.randn(10, 9, 64, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    out = attend(kernel, arena, query, [(0, 10, 40)], tables, 0.125)
    assert torch.isfinite(out.float()).all()


def test_unsupported_shapes_are_refused(kernel):
    arena, tables, query = make_case(3, 3, 48, [5], seed=2)
    with pytest.raises(ValueError):
        attend(kernel, arena, query, [(0, 5, 0)], tables, 0.125)
    assert not kernel.fits(48) and kernel.fits(64)
