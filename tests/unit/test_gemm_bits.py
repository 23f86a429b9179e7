"""The native int8 product's bits against its arithmetic written out in torch (per block of 64 inputs
and column, a float32 sum pair after pair, the odd input first; then sum += partial * scale in one
rounding; bfloat16 to nearest even), at every row count the tiles distinguish, for each build this
CPU can run: the one the engine loads and, where that is AVX-512 BF16, the AVX2 build too."""

import ctypes

import pytest
import torch

from model_svc.engine import gemm, kernels

ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 24, 33)


def vector_partial(rows: torch.Tensor, weight: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Inputs start .. stop - 1's float32 partial sums in VDPBF16PS's order: pair after pair, the odd
    input's product first."""
    part = torch.zeros(rows.shape[0], weight.shape[1])
    for p in range(start, stop, 2):
        part = part + rows[:, p + 1:p + 2] * weight[p + 1]
        part = part + rows[:, p:p + 1] * weight[p]
    return part


def reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, partial=vector_partial) -> torch.Tensor:
    """`gemm_int8_bf16`'s sums term for term, each quantization block's partial summed by `partial`: a
    bfloat16 input times an int8 code is exact in float32, so `part + x * w` rounds once, as the FMA
    (or VDPBF16PS's step) does; partial * scale is exact in float64, so the scale's FMA rounds once
    too (to float64, then float32: the same but for a tie within 2^-29, which these inputs do not hit)."""
    blocks, k, _ = codes.shape
    n, blocksize = blocks * gemm.COLUMNS, k // scales.shape[1]
    weight = codes.permute(1, 0, 2).reshape(k, n).float()
    scale = scales.permute(1, 0, 2).reshape(k // blocksize, n).double()
    rows = x.float()
    acc = torch.zeros(rows.shape[0], n)
    for kb in range(k // blocksize):
        part = partial(rows, weight, kb * blocksize, (kb + 1) * blocksize)
        acc = (part.double() * scale[kb] + acc.double()).float()
    return acc.to(torch.bfloat16)


def builds() -> list[tuple[str, gemm.Gemm]]:
    kernel = gemm.load()
    if kernel is None:
        return []
    found = [(kernel.isa, kernel)]
    if kernel.isa == "avx512-bf16":  # the AVX2 section of the same source, built for this CPU without AVX-512
        path = kernels.build(gemm.SOURCE, extra_flags=("-fopenmp", "-mno-avx512f"))
        found.append(("avx2", gemm.Gemm(ctypes.CDLL(str(path)))))
    return found


@pytest.fixture(scope="module")
def operands():
    gen = torch.Generator().manual_seed(11)
    n, k = 320, 384
    weight = torch.randn(n, k, generator=gen) * 0.05
    weight[:32, :64] = 0  # an all-zero block: scale 0
    codes, scales = gemm.quantize_int8(weight, 64)
    x = torch.randn(max(ROWS), k, generator=gen).to(torch.bfloat16)
    return x, codes, scales, reference(x, codes, scales)


def test_every_native_build_here_has_the_int8_product():
    found = builds()
    if not found:
        pytest.skip("no C compiler, or neither AVX-512 BF16 nor AVX2 with FMA here: the native kernel cannot run")
    assert all(kernel.has_int8 for _, kernel in found), [isa for isa, kernel in found if not kernel.has_int8]


@pytest.mark.parametrize("isa", ["avx512-bf16", "avx2"])
def test_the_int8_product_is_its_written_out_arithmetic_bit_for_bit(isa, operands):
    kernel = dict(builds()).get(isa)
    if kernel is None:
        pytest.skip(f"no {isa} build runs on this CPU")
    x, codes, scales, expected = operands
    for direct in ((2, 0, 4096) if kernel.set_direct_rows(2, 2) >= 0 else (None,)):
        if direct is not None:
            kernel.set_direct_rows(2, direct)
        for m in ROWS:
            assert torch.equal(kernel.int8(x[:m], codes, scales), expected[:m]), (isa, m, direct)
    kernel.set_direct_rows(2, 2)


def test_nf4_products_are_the_same_bits_from_every_build_here():
    """The nf4 product's AVX2 section computes VDPBF16PS's sums with float32 FMAs, term for term: where
    both build here, they agree bit for bit at every row count (the direct, panel and tile paths), for a
    product split into parts."""
    found = builds()
    if len(found) < 2:
        pytest.skip(f"one build of the nf4 kernel here ({[isa for isa, _ in found]}): nothing to compare")
    gen = torch.Generator().manual_seed(5)
    n, k, blocksize = 576, 1536, 64
    codes = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    absmax = (torch.rand(k // blocksize, n, generator=gen) + 0.1).to(torch.bfloat16)
    values = torch.linspace(-1, 1, 16).to(torch.bfloat16)
    for m in (1, 2, 3, 5, 8, 9, 12, 33):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        outs = [kernel.nf4_parts(x, codes, absmax, values, [192, 384], blocksize) for _, kernel in found]
        assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1])), m


def test_the_product_with_silu_is_the_product_then_silu_bit_for_bit():
    """gemm_nf4_silu_bf16 (the layer loop's gate/up product, silu * up after each group of column
    blocks) gives the bits of the product into gate and up, then fused.c's silu_mul, at every way
    the kernel takes rows (few, half-block tiles; on AMX tiles: few, streamed 17-64, many), on
    AVX-512 and, where the CPU has them, on tiles; widths of one and of several column blocks a group."""
    from model_svc.engine import fused

    kernel, ops = gemm.load(), fused.load()
    if kernel is None or ops is None or kernel.nf4_silu_address is None:
        pytest.skip("no AVX-512 build of the nf4 kernel here: the layer loop calls the product, then silu")
    gen = torch.Generator().manual_seed(12)
    k, blocksize = 576, 64
    paths = [False] + ([True] if kernel.has_amx and kernel.set_amx(True) == 1 else [])
    try:
        for width in (1536, 96):
            codes = torch.randint(0, 256, (2 * width, k // 2), generator=gen, dtype=torch.uint8)
            absmax = (torch.rand(k // blocksize, 2 * width, generator=gen) + 0.1).to(torch.bfloat16)
            values = torch.linspace(-1, 1, 16).to(torch.bfloat16)
            x = (torch.randn(300, k, generator=gen) * 2).to(torch.bfloat16)
            for amx in paths:
                kernel.set_amx(amx)
                for m in (1, 3, 8, 9, 16, 17, 31, 32, 33, 64, 65, 100, 300):
                    gate, up = kernel.nf4_parts(x[:m], codes, absmax, values, [width, width], blocksize)
                    want = ops.silu_mul(gate.contiguous(), up.contiguous())
                    got = kernel.nf4_silu(x[:m], codes, absmax, values, width, blocksize)
                    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (width, amx, m)
    finally:
        kernel.set_amx(False)
