"""hugepages.Arena: tensors back to back on one mapping advised for 2 MB pages; the same values as
ordinary tensors, whatever pages back them."""

import sys

import pytest
import torch

from model_svc.engine import hugepages, lora


def test_an_arena_hands_out_aligned_zeroed_tensors_back_to_back_then_ordinary_ones():
    arena = hugepages.Arena(3 << 20)
    if sys.platform.startswith("linux"):
        assert arena.huge  # the advice was given (whether the kernel honours it is its own setting)
    a = arena.take((1000,), torch.bfloat16)
    b = arena.take((3, 5), torch.float32)
    assert a.data_ptr() % hugepages.HUGE_PAGE == 0 and b.data_ptr() % hugepages.ALIGN == 0
    assert b.data_ptr() == a.data_ptr() + hugepages.padded_bytes(2000)
    assert not a.any() and not b.any() and a.dtype == torch.bfloat16 and b.shape == (3, 5)
    a.fill_(1.5)
    assert not b.any()  # no overlap
    rest = arena.take((3 << 20,), torch.uint8)  # more than is left: an ordinary tensor
    assert rest.numel() == 3 << 20 and not rest.any()
    assert not arena.take((0,), torch.uint8).numel()


def test_adapter_pairs_packed_in_an_arena_are_the_bytes_packed_without_one():
    generator = torch.Generator().manual_seed(2)
    pairs = [(torch.randn(r, k, generator=generator), torch.randn(n, r, generator=generator))
             for r, k, n in ((16, 576, 192), (7, 101, 35), (64, 64, 200))] + [None]
    arena = hugepages.Arena(lora.Packed.nbytes(pairs))
    inside, outside = lora.Packed(pairs, arena), lora.Packed(pairs)
    assert arena.nbytes - hugepages.ALIGN < arena.used <= arena.nbytes  # nbytes sized it: all of them inside
    first = inside.tensors[0].data_ptr()
    assert all(first <= t.data_ptr() < first + arena.nbytes for t in inside.tensors)
    for x, y in zip(inside.tensors, outside.tensors):
        assert torch.equal(x, y) and x.dtype == y.dtype
    assert [(p.rank, p.padded, bool(p.a)) for p in inside.array] == [(p.rank, p.padded, bool(p.a))
                                                                      for p in outside.array]


@pytest.mark.parametrize("nbytes", [0, -5])
def test_an_empty_arena_gives_ordinary_tensors(nbytes):
    arena = hugepages.Arena(nbytes)
    assert arena.take((4,), torch.int64).tolist() == [0, 0, 0, 0]
