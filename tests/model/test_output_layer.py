"""--output-layer int8 (the default where its kernel product runs natively) and nf4: the output
embedding quantized, the input embedding left as it was; the engine's greedy tokens follow generate()
on the same model, batch-invariantly, with the head through the native kernel where it runs."""

import bitsandbytes as bnb
import pytest
import torch

from model_svc.engine import gemm
from model_svc.engine.sequence import SamplingParams, Sequence
from model_svc.loader import load_model
from tests.greedy import NATIVE_PREFILL_MARGIN, assert_greedy_matches
from tests.helpers import MODEL
from tests.model.test_engine import PROMPTS, make_engine, run


@pytest.fixture(scope="module")
def nf4_head_model():
    return load_model(MODEL, "bfloat16", "4bit", "cpu", output_layer="nf4")


@pytest.fixture(scope="module")
def int8_head_model():
    return load_model(MODEL, "bfloat16", "4bit", "cpu", output_layer="int8")


def test_the_output_layer_is_nf4_and_the_input_embedding_unchanged(nf4_head_model, reference_model):
    model, plain = nf4_head_model.model, reference_model.model
    head, body = model.lm_head, model.model.layers[0].mlp.down_proj
    assert nf4_head_model.output_layer == "nf4"
    assert isinstance(head, bnb.nn.Linear4bit) and not isinstance(plain.lm_head, bnb.nn.Linear4bit)
    assert head.weight.quant_state.blocksize == body.weight.quant_state.blocksize
    assert head.weight.quant_state.quant_type == "nf4"
    assert torch.equal(model.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    # the 4-bit head holds the embedding to nf4's precision: each weight within half the widest gap
    # between neighbouring nf4 code values (-1 and -0.696) times its block's absmax, plus bfloat16 rounding
    weight = plain.model.embed_tokens.weight.detach().float()
    restored = bnb.functional.dequantize_4bit(head.weight.data, head.weight.quant_state).detach().float()
    if restored.shape != weight.shape:  # packed for the CPU kernel (AVX-512 BF16): compare through a product
        x = torch.randn(3, weight.shape[1]).to(torch.bfloat16)
        assert (head(x).float() - x.float() @ weight.T).abs().max() < 0.15 * (x.float() @ weight.T).abs().max()
    else:
        blocksize = head.weight.quant_state.blocksize
        absmax = weight.reshape(-1, blocksize).abs().amax(dim=1, keepdim=True)
        error = (restored.reshape(-1, blocksize) - weight.reshape(-1, blocksize)).abs()
        assert (error <= absmax * (0.153 + 2 ** -7)).all()


def test_the_int8_output_layer_holds_each_weight_to_half_its_step(int8_head_model):
    """A scale per column and 64 inputs (absmax / 127), each weight within half a step of its code times
    the scale; the input embedding is the checkpoint's, unquantized."""
    model = int8_head_model.model
    head = model.lm_head
    assert int8_head_model.output_layer == "int8" and isinstance(head, gemm.Int8Linear)
    weight = model.model.embed_tokens.weight.detach().float()
    assert weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    n, k = weight.shape
    blocks = weight.reshape(n, k // 64, 64)
    step = blocks.abs().amax(dim=2, keepdim=True) / 127
    restored = gemm.dequantize_int8(head.codes, head.scales).reshape(n, k // 64, 64)
    assert head.codes.dtype == torch.int8 and int(head.codes.abs().max()) == 127
    assert ((restored - blocks).abs() <= step * (0.5 + 1e-5)).all()
    assert not torch.equal(restored, blocks)  # quantized, not a copy


def test_the_int8_product_is_the_quantized_weights_product(int8_head_model):
    """The kernel's int8 product (where it runs) against float32 on the dequantized weight: within the
    bfloat16 rounding of its output, at one row (read directly) and at 32 (through panels)."""
    kernel = gemm.load()
    if kernel is None or not kernel.has_int8:
        pytest.skip("the native kernel has no int8 product here: the module's own call runs")
    head = int8_head_model.model.lm_head
    x = torch.randn(32, head.in_features, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    reference = x.float() @ gemm.dequantize_int8(head.codes, head.scales).T
    for rows in (1, 32):
        got = kernel.int8(x[:rows], head.codes, head.scales).float()
        assert ((got - reference[:rows]).abs() <= reference[:rows].abs() * 2 ** -8 + 1e-3).all(), rows
    assert torch.allclose(head(x).float(), reference, rtol=2 ** -8, atol=1e-3)  # the module's own call


@pytest.mark.parametrize("prompt", PROMPTS[:2])
@pytest.mark.parametrize("layer", ["nf4", "int8"])
def test_greedy_follows_generate_on_the_same_model_and_is_batch_invariant(request, hf_tokenizer, layer, prompt):
    loaded = request.getfixturevalue(f"{layer}_head_model")
    engine = make_engine(loaded)
    ids = hf_tokenizer(prompt).input_ids
    got = run(engine, [Sequence(0, ids, SamplingParams(max_new_tokens=24))])[0]
    assert_greedy_matches(loaded, hf_tokenizer, prompt, got, margin=NATIVE_PREFILL_MARGIN)
    kernel = gemm.load()
    if kernel is not None and (layer == "nf4" or kernel.has_int8):
        assert engine.runner.linear.uses_native(loaded.model.lm_head)
    crowd = [Sequence(i + 1, hf_tokenizer(p).input_ids, SamplingParams(max_new_tokens=24))
             for i, p in enumerate(PROMPTS)]
    assert run(engine, [Sequence(0, ids, SamplingParams(max_new_tokens=24)), *crowd])[0] == got


def test_an_nf4_output_layer_needs_4bit_layers():
    """(int8 goes with any weights: its scales are its own.)"""
    with pytest.raises(ValueError, match="--quantize 4bit"):
        load_model(MODEL, "bfloat16", "none", "cpu", output_layer="nf4")
    with pytest.raises(ValueError, match="--output-layer 'int3'"):
        load_model(MODEL, "bfloat16", "4bit", "cpu", output_layer="int3")
