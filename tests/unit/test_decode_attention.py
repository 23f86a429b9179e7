"""The native decode-attention kernel: as accurate as PyTorch's SDPA, and bit for bit the same for a
sequence whatever else is in the call."""

import random

import pytest
import torch
import torch.nn.functional as F

from model_svc.engine import decode_attention
from model_svc.engine.runner import ModelRunner


@pytest.fixture(scope="module")
def kernel():
    attend = decode_attention.load()
    # The machines this runs on have a C compiler: a silent fall-back would hide a slow server.
    assert attend is not None, "the decode-attention kernel did not build"
    return attend


def make_case(num_kv_heads, group, head_dim, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    slots = sum(lengths) + 64 * len(lengths) + 1
    arena = torch.randn(2, num_kv_heads, slots, head_dim, generator=gen).to(torch.bfloat16)
    starts, position = [], 0
    for length in lengths:  # ranges with gaps between them, as the arena has
        starts.append(position)
        position += length + int(torch.randint(0, 64, (1,), generator=gen))
    query = torch.randn(len(lengths) + 3, num_kv_heads * group, head_dim, generator=gen).to(torch.bfloat16)
    return arena, starts, query


def attend(kernel, arena, query, rows, starts, lengths, scale):
    out = torch.zeros_like(query)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    kernel(query, arena[0], arena[1], out, as_long(rows), as_long(starts), as_long(lengths), scale)
    return out


@pytest.mark.parametrize("num_kv_heads,group,head_dim", [(3, 3, 64), (2, 4, 128), (4, 1, 32), (1, 5, 80)])
def test_as_accurate_as_sdpa(kernel, num_kv_heads, group, head_dim):
    lengths = [1, 2, 15, 16, 17, 100, 700, 2100]
    arena, starts, query = make_case(num_kv_heads, group, head_dim, lengths, seed=head_dim)
    scale = head_dim ** -0.5
    rows = [i + 2 for i in range(len(lengths))]  # rows need not start at 0
    out = attend(kernel, arena, query, rows, starts, lengths, scale)
    for b, (row, start, length) in enumerate(zip(rows, starts, lengths)):
        keys, values = arena[:, :, start:start + length]
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
    arena, starts, query = make_case(3, 3, 64, lengths, seed=1)
    rows = list(range(len(lengths)))
    together = attend(kernel, arena, query, rows, starts, lengths, 0.125)
    for b in range(len(lengths)):
        alone = attend(kernel, arena, query, [b], [starts[b]], [lengths[b]], 0.125)
        assert torch.equal(alone[b], together[b]), f"sequence {b} (length {lengths[b]}) changed beside others"
    for _ in range(10):  # other subsets, in other orders
        subset = rng.sample(rows, rng.randint(2, len(rows)))
        some = attend(kernel, arena, query, subset, [starts[b] for b in subset], [lengths[b] for b in subset], 0.125)
        assert all(torch.equal(some[b], together[b]) for b in subset)


def test_wrong_dtype_is_refused(kernel):
    arena, starts, query = make_case(3, 3, 64, [5], seed=2)
    with pytest.raises(TypeError):
        kernel(query.float(), arena[0].float(), arena[1].float(), query.float(), torch.tensor([0]),
               torch.tensor([0]), torch.tensor([5]), 0.125)


def test_the_runner_uses_it_for_bfloat16_models(reference_model):
    assert ModelRunner(reference_model.model).decode_attention == "native"
    assert ModelRunner(reference_model.model, decode_attention_impl="sdpa").decode_attention == "sdpa"
    assert ModelRunner(reference_model.model, match_generate=True).decode_attention == "generate"
