"""--output-layer nf4: the output embedding quantized like the 4-bit layers, the input embedding left
as it was; the engine's greedy tokens follow generate() on the same model, batch-invariantly, with
the head through the native kernel where it runs."""

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


def test_the_output_layer_is_nf4_and_the_input_embedding_unchanged(nf4_head_model, reference_model):
    model, plain = nf4_head_model.model, reference_model.model
    head, body = model.lm_head, model.model.layers[0].mlp.down_proj
    assert nf4_head_model.output_layer == "nf4" and reference_model.output_layer == "none"
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


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_follows_generate_on_the_same_model_and_is_batch_invariant(nf4_head_model, hf_tokenizer, prompt):
    engine = make_engine(nf4_head_model)
    ids = hf_tokenizer(prompt).input_ids
    got = run(engine, [Sequence(0, ids, SamplingParams(max_new_tokens=24))])[0]
    assert_greedy_matches(nf4_head_model, hf_tokenizer, prompt, got, margin=NATIVE_PREFILL_MARGIN)
    if gemm.load() is not None:
        assert engine.runner.linear.uses_native(nf4_head_model.model.lm_head)
    crowd = [Sequence(i + 1, hf_tokenizer(p).input_ids, SamplingParams(max_new_tokens=24))
             for i, p in enumerate(PROMPTS)]
    assert run(engine, [Sequence(0, ids, SamplingParams(max_new_tokens=24)), *crowd])[0] == got


def test_an_nf4_output_layer_needs_4bit_layers():
    with pytest.raises(ValueError, match="--quantize 4bit"):
        load_model(MODEL, "bfloat16", "none", "cpu", output_layer="nf4")
    with pytest.raises(ValueError, match="--output-layer 'int3'"):
        load_model(MODEL, "bfloat16", "4bit", "cpu", output_layer="int3")
