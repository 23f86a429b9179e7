"""Without a C compiler (CC pointing nowhere, an empty kernel cache) the model service still serves:
attention through SDPA, the eager norms and the libraries' matrix products, the same tokens as asking
for SDPA outright (whose 4-bit products run natively: the library's bits), and greedy tokens equal
generate()'s up to near-ties."""

from model_svc.__main__ import engine_for, parse_args
from model_svc.engine.sequence import SamplingParams, Sequence
from tests.greedy import assert_greedy_matches
from tests.model.test_engine import PROMPTS, run


def test_no_compiler_falls_back_to_sdpa_with_the_same_tokens(reference_model, hf_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GENRPC_KERNEL_CACHE", str(tmp_path / "kernels"))
    fallback = engine_for(reference_model, parse_args(["--kv-cache-tokens", "4096"]))
    assert (fallback.runner.decode_attention, fallback.runner.prefill_attention) == ("sdpa", "sdpa")
    assert fallback.runner.fused is None and not fallback.scheduler.blocks.enable_prefix_caching
    assert fallback.runner.matmul == "library"
    monkeypatch.undo()
    asked = engine_for(reference_model, parse_args(["--kv-cache-tokens", "4096", "--decode-attention", "sdpa"]))
    assert asked.runner.matmul == "native"
    seqs = lambda: [Sequence(i, hf_tokenizer(p).input_ids, SamplingParams(max_new_tokens=12))  # noqa: E731
                    for i, p in enumerate(PROMPTS)]
    got = run(fallback, seqs())
    assert got == run(asked, seqs())
    for i, prompt in enumerate(PROMPTS):
        assert_greedy_matches(reference_model, hf_tokenizer, prompt, got[i])
