"""Which attention paths the runner takes for the real model, as the flags ask."""

import pytest

from model_svc.engine import decode_attention, prefill_attention
from model_svc.engine.runner import ModelRunner


def test_native_decode_attention_for_bfloat16_models(reference_model):
    if decode_attention.load() is None:
        pytest.skip("no C compiler here: the decode attention kernel cannot be built")
    assert ModelRunner(reference_model.model).decode_attention == "native"
    assert ModelRunner(reference_model.model, decode_attention_impl="sdpa").decode_attention == "sdpa"
    assert ModelRunner(reference_model.model, match_generate=True).decode_attention == "generate"


def test_the_long_prompt_kernel_with_native_prefill_only(reference_model):
    kernel = prefill_attention.load()
    if kernel is None:
        pytest.skip("the long-prompt kernel needs AVX-512 BF16 and a C compiler, which this machine lacks")
    assert ModelRunner(reference_model.model).long_prefill is not None
    assert ModelRunner(reference_model.model, prefill_attention_impl="sdpa").long_prefill is None
    assert ModelRunner(reference_model.model, match_generate=True).long_prefill is None
