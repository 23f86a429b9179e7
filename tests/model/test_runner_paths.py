"""Which attention paths the runner takes for the real model, as the flags ask."""

import pytest

from model_svc.engine import decode_attention, gemm, kernel_choice, prefill_attention
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


def test_amx_tiles_only_with_native_numerics(reference_model):
    """--match-generate keeps bitsandbytes' bits in the 4-bit layers: never on AMX tiles, and "on" is refused
    (on every CPU: the refusal comes before asking for tiles)."""
    kernel = gemm.load()
    if kernel is None:
        pytest.skip("no C compiler, or neither AVX-512 BF16 nor AVX2 with FMA here: the native kernel cannot run")
    with pytest.raises(kernel_choice.AmxUnavailable, match="bitsandbytes' bits"):
        ModelRunner(reference_model.model, match_generate=True, amx="on")
    choice = ModelRunner(reference_model.model, match_generate=True).amx_choice
    assert (choice.on, choice.source) == (False, "library bits" if kernel.has_amx else "unavailable")
    with pytest.raises(ValueError, match="amx 'yes'"):
        ModelRunner(reference_model.model, amx="yes")


def test_long_prompts_attend_on_tiles_where_the_products_run_on_them(reference_model):
    """One runner, one kind of bits: the long-prompt attention takes its tile version exactly when the
    4-bit products run on tiles."""
    kernel, attend = gemm.load(), prefill_attention.load()
    if kernel is None or attend is None or not (kernel.has_amx and attend.has_amx):
        pytest.skip(f"no AMX tiles here ({kernel_choice.cpu_info().describe()}): nothing to choose")
    if not kernel_choice.cpu_info().amx_permitted:
        pytest.skip("Linux refused this process the AMX tile state")
    on = ModelRunner(reference_model.model, amx="on")
    assert on.amx_choice.on and on.long_prefill.amx
    off = ModelRunner(reference_model.model, amx="off")
    assert not off.amx_choice.on and not off.long_prefill.amx
    assert on.long_prefill.address != off.long_prefill.address
