"""The 4-bit layers' faster paths give the module's very bits where bitsandbytes packs its weights for
the CPU (AVX-512 BF16): the native kernel (gemm.py) and the short path to bitsandbytes' own. Where it
does not (AVX2), the native kernel runs on its own packed copy and computes what VDPBF16PS's
documented arithmetic gives; the native dense path is batch-invariant and as accurate as PyTorch's."""

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16

from model_svc.engine import gemm
from model_svc.engine.linear import Linears

ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 17, 32, 75)  # every tile shape of the kernel (6 to 12 rows a tile past 8)
NO_KERNEL = "no C compiler, or neither AVX-512 BF16 nor AVX2 with FMA here: the native kernel cannot run"
LIBRARY_PACKS = bool(has_avx512bf16())  # bitsandbytes packs 4-bit weights for its CPU kernel only there


def _modules(model):
    return [m for m in model.model.modules() if isinstance(m, bnb.nn.Linear4bit)][:7]


@pytest.mark.parametrize("native", [False, True], ids=["library", "native"])
def test_4bit_paths_equal_the_modules_own(reference_model, native):
    """Without the promise of native numbers (dense=False: --match-generate, SDPA attention) every path
    gives the module's bits; a fast path wherever the library has a CPU kernel, the module's call elsewhere."""
    kernel = gemm.load() if native else None
    if native and kernel is None:
        pytest.skip(NO_KERNEL)
    linears = Linears(kernel)
    modules = _modules(reference_model)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for module in modules:
            for rows in ROWS:
                x = torch.randn(1, rows, module.in_features, generator=gen).to(torch.bfloat16)
                assert torch.equal(linears(module, x), module(x)), (module, rows)
    assert all((linears._packed[id(m)] is not None) == LIBRARY_PACKS for m in modules)  # a fast path where there is one
    assert all(linears.uses_native(m) == (native and LIBRARY_PACKS) for m in modules)


def _unpacked(codes: torch.Tensor) -> torch.Tensor:
    """Code indices [n, k] from bitsandbytes' CPU packing ([n / 32][k / 2][32] bytes: byte j of a pair
    holds column j // 2's code (low half) and 16 + j // 2's (high half) at input k + j % 2)."""
    n, k = codes.shape[0], codes.shape[1] * 2
    c = codes.reshape(n // 32, k // 2, 16, 2).long()  # [block, pair, j // 2, j % 2]
    both = torch.stack([c & 15, c >> 4], dim=2)  # [block, pair, low/high half, column % 16, parity]
    return both.reshape(n // 32, k // 2, 32, 2).permute(0, 2, 1, 3).reshape(n, k)


def _documented(x: torch.Tensor, weights: torch.Tensor, block: int, scales: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes, written out: per block of `block` inputs and column, a float32 sum over
    the pairs of x[k + 1] * w[k + 1] then x[k] * w[k] (each product exact, each sum rounded: VDPBF16PS as
    Intel documents it), then sum += block sum * scale (one rounding, as an FMA), rounded to bfloat16."""
    xs, ws = x.float(), weights.float()
    total = torch.zeros(x.shape[0], weights.shape[0])
    for start in range(0, x.shape[1], block):
        part = torch.zeros_like(total)
        for i in range(start, start + block, 2):
            part = part + xs[:, i + 1, None] * ws[None, :, i + 1]
            part = part + xs[:, i, None] * ws[None, :, i]
        if scales is None:
            total = part
        else:  # float64 holds the product exactly: one rounding to float32, as the FMA
            total = (total.double() + part.double() * scales[start // block].double()).float()
    return total.to(torch.bfloat16)


def test_native_4bit_on_its_own_copy_follows_the_documented_arithmetic(reference_model):
    """Where the library has no CPU kernel, the native path packs a copy of each layer (the module is left
    as it was) and its bits are the documented arithmetic's, row by row, whatever the rows beside."""
    kernel = gemm.load()
    if kernel is None:
        pytest.skip(NO_KERNEL)
    if LIBRARY_PACKS:
        pytest.skip("bitsandbytes packs the weights here: test_4bit_paths_equal_the_modules_own checks the "
                    "native kernel against its own CPU kernel, bit for bit")
    linears = Linears(kernel, dense=True)
    layer = reference_model.model.model.layers[2]
    gen = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for module in (layer.self_attn.q_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
            before = module.weight.data.clone()
            x = torch.randn(33, module.in_features, generator=gen).to(torch.bfloat16)
            whole = linears(module, x)
            packed = linears._packed[id(module)]
            assert linears.uses_native(module) and packed.own
            assert torch.equal(module.weight.data, before) and not getattr(
                module.weight.quant_state, "packing_format_for_cpu", False)  # the module untouched
            weights = packed.code_values[_unpacked(packed.weight)]
            assert torch.equal(whole, _documented(x, weights, packed.blocksize, packed.absmax.float()))
            for start, stop in ((0, 1), (1, 3), (3, 8), (8, 21), (0, 33)):
                assert torch.equal(linears(module, x[start:stop]), whole[start:stop])
            # the copy holds the module's weights: code value times the block's absmax, each rounded to
            # bfloat16, against the library's product rounded to bfloat16: three roundings apart at most
            scale = packed.absmax.float().T.repeat_interleave(packed.blocksize, dim=1)
            ours = weights.float() * scale
            theirs = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            assert torch.allclose(ours, theirs, rtol=2 ** -7, atol=0)
            assert (whole.float() - module(x).float()).abs().max() < 0.05 * module(x).float().abs().max()


def test_native_4bit_rows_do_not_depend_on_their_neighbours(reference_model):
    kernel = gemm.load()
    if kernel is None:
        pytest.skip(NO_KERNEL)
    linears = Linears(kernel, dense=True)
    module = _modules(reference_model)[4]  # an MLP projection: 1536 columns
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, module.in_features, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        linears(module, x[:1])
        whole = linears(module, x)
        for start, stop in ((0, 1), (3, 5), (7, 11), (20, 26), (1, 40)):
            assert torch.equal(linears(module, x[start:stop]), whole[start:stop])


def test_native_dense_is_batch_invariant_and_accurate():
    kernel = gemm.load()
    if kernel is None:
        pytest.skip(NO_KERNEL)
    gen = torch.Generator().manual_seed(2)
    layer = torch.nn.Linear(96, 320, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(320, 96, generator=gen))
    linears = Linears(kernel, dense=True)
    x = torch.randn(21, 96, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        whole = linears(layer, x)
        assert linears.uses_native(layer)
        for i in range(21):
            assert torch.equal(linears(layer, x[i:i + 1]), whole[i:i + 1])
    # float32 sums of exact products, rounded once to bfloat16: within one bfloat16 step of the exact value
    exact = x.double() @ layer.weight.double().T
    step = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    assert ((whole.double() - exact).abs() <= step).all()


def test_other_layers_take_their_own_call():
    linears = Linears()
    layer = torch.nn.Linear(8, 4).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(linears(layer, x), layer(x))
        assert torch.equal(linears(layer, x), layer(x))
    assert linears._packed[id(layer)] is None


def test_layers_sharing_an_input_take_one_product_with_the_same_bits(reference_model):
    kernel = gemm.load()
    if kernel is None:
        pytest.skip(NO_KERNEL)
    linears = Linears(kernel, dense=True)
    layer = reference_model.model.model.layers[1]
    groups = [(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
              (layer.mlp.gate_proj, layer.mlp.up_proj)]
    gen = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        for modules in groups:
            for rows in (1, 3, 8, 33):
                x = torch.randn(1, rows, modules[0].in_features, generator=gen).to(torch.bfloat16)
                outs = linears.many(modules, x)  # the first: each layer alone, then together
                outs_again = linears.many(modules, x)
                assert linears._many.get(tuple(map(id, modules))) not in (None, False)
                for module, out, again in zip(modules, outs, outs_again):
                    alone = linears(module, x)
                    assert torch.equal(out, alone) and torch.equal(again, alone)
                    if LIBRARY_PACKS:  # the module reads its weight, now a slice of the joint one
                        assert torch.equal(alone, module(x))
