"""The architectures the runner claims, each as a tiny random-weight model built from its config:
Llama with Llama 3's rope scaling, Mistral with a sliding window shorter than the prompt, Qwen2
with its q/k/v biases. Greedy tokens equal generate() on the same model with --match-generate, and
the default path stays within the accuracy bound; an unsupported architecture fails at start."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from model_svc.engine.sequence import SamplingParams, Sequence
from model_svc.loader import load_model
from tests.model.test_engine import make_engine, run

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, tie_word_embeddings=False)
CONFIGS = {
    "llama3-rope": lambda: LlamaConfig(**COMMON, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "mistral-window": lambda: MistralConfig(**COMMON, sliding_window=12),
    "qwen2-bias": lambda: Qwen2Config(**COMMON, use_sliding_window=False),
}
PROMPT_LEN, NEW = 40, 12  # longer than the sliding window; past rope scaling's original 32 positions


def tiny(tmp_path_factory, kind: str) -> str:
    folder = tmp_path_factory.mktemp(kind)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind]())
    with torch.no_grad():  # sharper than the default init, so greedy tokens are not near-ties
        for p in model.parameters():
            p.mul_(4.0)
    if kind == "qwen2-bias":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    model.save_pretrained(folder)
    return str(folder)


def reference(loaded, ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_greedy_equals_generate(tmp_path_factory, kind):
    loaded = load_model(tiny(tmp_path_factory, kind), "float32", "none", "cpu")
    torch.manual_seed(1)
    prompts = [torch.randint(3, 512, (PROMPT_LEN,)).tolist() for _ in range(3)]
    expected = [reference(loaded, ids) for ids in prompts]
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    # --match-generate: generate()'s own attention calls; prompts chunked (16 tokens a step) and batched.
    engine = make_engine(loaded, max_batch_tokens=16, match_generate=True)
    got = run(engine, [Sequence(i, ids, params) for i, ids in enumerate(prompts)])
    assert [got[i] for i in range(len(prompts))] == expected
    # The default path (sdpa for a float32 model), in one piece.
    default = run(make_engine(loaded), [Sequence(i, ids, params) for i, ids in enumerate(prompts)])
    assert [default[i] for i in range(len(prompts))] == expected


def test_bfloat16_native_path_stays_close(tmp_path_factory):
    """The native kernel (bfloat16 on the CPU) on the Llama-3-rope model: the first token equals
    generate()'s and most of the rest do (rounding may flip a near-tie later on)."""
    loaded = load_model(tiny(tmp_path_factory, "llama3-rope"), "bfloat16", "none", "cpu")
    torch.manual_seed(2)
    prompts = [torch.randint(3, 512, (PROMPT_LEN,)).tolist() for _ in range(4)]
    engine = make_engine(loaded)
    assert engine.runner.decode_attention == "native"
    got = run(engine, [Sequence(i, ids, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
                       for i, ids in enumerate(prompts)])
    agree = 0
    for i, ids in enumerate(prompts):
        expected = reference(loaded, ids)
        assert got[i][0] == expected[0]
        agree += next((k for k, (a, b) in enumerate(zip(got[i], expected)) if a != b), NEW)
    assert agree >= 0.75 * NEW * len(prompts)


def test_an_unsupported_architecture_fails_at_start(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(folder)
    loaded = load_model(str(folder), "float32", "none", "cpu")
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        make_engine(loaded)
