"""The 4-bit layers' faster paths give the module's very bits: the native kernel (gemm.py) and the
short path to bitsandbytes' own; the native dense path is batch-invariant and as accurate as PyTorch's."""

import bitsandbytes as bnb
import pytest
import torch

from model_svc.engine import gemm
from model_svc.engine.linear import Linears

ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 17, 32, 75)  # every tile shape of the kernel (6 to 12 rows a tile past 8)


def _modules(model):
    return [m for m in model.model.modules() if isinstance(m, bnb.nn.Linear4bit)][:7]


@pytest.mark.parametrize("native", [False, True], ids=["library", "native"])
def test_4bit_paths_equal_the_modules_own(reference_model, native):
    kernel = gemm.load() if native else None
    if native and kernel is None:
        pytest.skip("no C compiler or no AVX-512 BF16 here: the native kernel cannot run")
    linears = Linears(kernel)
    modules = _modules(reference_model)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for module in modules:
            for rows in ROWS:
                x = torch.randn(1, rows, module.in_features, generator=gen).to(torch.bfloat16)
                assert torch.equal(linears(module, x), module(x)), (module, rows)
    assert all(linears._packed[id(m)] is not None for m in modules)  # a fast path is taken, not the module
    assert all(linears.uses_native(m) == native for m in modules)


def test_native_4bit_rows_do_not_depend_on_their_neighbours(reference_model):
    kernel = gemm.load()
    if kernel is None:
        pytest.skip("no C compiler or no AVX-512 BF16 here: the native kernel cannot run")
    linears = Linears(kernel)
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
        pytest.skip("no C compiler or no AVX-512 BF16 here: the native kernel cannot run")
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
        pytest.skip("no C compiler or no AVX-512 BF16 here: the native kernel cannot run")
    linears = Linears(kernel)
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
                    want = module(x)  # the module reads its weight, now a slice of the joint one
                    assert torch.equal(out, want) and torch.equal(again, want) and torch.equal(linears(module, x), want)
