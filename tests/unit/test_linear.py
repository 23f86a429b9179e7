"""The short path to bitsandbytes' CPU 4-bit kernel gives the module's very bits."""

import bitsandbytes as bnb
import torch

from model_svc.engine.linear import Linears


def test_direct_calls_equal_the_modules_own(reference_model):
    linears = Linears()
    modules = [m for m in reference_model.model.modules() if isinstance(m, bnb.nn.Linear4bit)][:7]
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for module in modules:
            for rows in (1, 2, 16, 75):
                x = torch.randn(1, rows, module.in_features, generator=gen).to(torch.bfloat16)
                assert torch.equal(linears(module, x), module(x))
    # The short path is taken (where the CPU has bitsandbytes' packed bfloat16 kernel, as here).
    assert all(linears._packed[id(m)] is not None for m in modules)


def test_other_layers_take_their_own_call():
    linears = Linears()
    layer = torch.nn.Linear(8, 4).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(linears(layer, x), layer(x))
        assert torch.equal(linears(layer, x), layer(x))
    assert linears._packed[id(layer)] is None
