"""generate()'s other logits processors (no_repeat_ngram_size, epsilon and eta cutoffs, suppressed
tokens, forced EOS, the exponential length penalty, sequence bias, renormalization): the sampler
builds them in generate()'s order with generate()'s arguments, and the engine's greedy tokens with
them are generate()'s (--match-generate)."""

import copy

import pytest
import torch
from transformers import WatermarkingConfig

from model_svc.__main__ import engine_for, parse_args
from model_svc.engine.sampler import build_processors
from model_svc.engine.sequence import SamplingParams, Sequence

NEW = 16
EVERYTHING = dict(no_repeat_ngram_size=3, sequence_bias=[[[260], 2.0], [[30, 31], -3.0]], suppress_tokens=[11, 12],
                  begin_suppress_tokens=[13], forced_eos_token_id=[2], exponential_decay_length_penalty=(4, 1.5),
                  renormalize_logits=True, repetition_penalty=1.2)
SAMPLED = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, epsilon_cutoff=3e-4, eta_cutoff=1e-3)
WATERMARK = dict(watermarking_config=WatermarkingConfig(greenlist_ratio=0.3, bias=4.0, hashing_key=12345,
                                                        context_width=2))
SELFHASH = dict(watermarking_config=WatermarkingConfig(seeding_scheme="selfhash", context_width=3))


def tokens(engine, seq: Sequence) -> list[int]:
    engine.add(seq)
    got = []
    while engine.scheduler.has_work:
        got += [out.token_id for out in engine.step() if out.token_id is not None]
    return got


def sampling(kwargs: dict, **extra) -> SamplingParams:
    """generate()'s keyword arguments as the engine's SamplingParams."""
    values = {**kwargs, **extra}
    for name in ("suppress_tokens", "begin_suppress_tokens", "forced_eos_token_id"):
        if name in values:
            values[name] = tuple(values[name])
    if "sequence_bias" in values:
        values["sequence_bias"] = tuple((tuple(ids), bias) for ids, bias in values["sequence_bias"])
    if "watermarking_config" in values:
        w = values["watermarking_config"]
        values["watermarking_config"] = (w.greenlist_ratio, w.bias, w.hashing_key, w.seeding_scheme, w.context_width)
    return SamplingParams(max_new_tokens=NEW, **values)


def generate_processors(model, kwargs: dict, prompt_length: int):
    """The processors generate() itself builds for these arguments and a prompt of this length."""
    config = copy.deepcopy(model.generation_config)
    config.update(**kwargs, max_new_tokens=NEW)
    model._prepare_special_tokens(config, True, device="cpu")
    config.max_length = prompt_length + NEW
    return model._get_logits_processor(config, input_ids_seq_length=prompt_length, device="cpu", model_kwargs={})


@pytest.mark.parametrize("kwargs", [EVERYTHING, {**EVERYTHING, **SAMPLED}, dict(no_repeat_ngram_size=2),
                                    dict(do_sample=True, top_k=0, eta_cutoff=2e-3), WATERMARK,
                                    {**SAMPLED, **SELFHASH, "renormalize_logits": True}],
                         ids=["greedy", "sampled", "ngram", "eta", "watermark", "selfhash"])
def test_the_processors_are_generates_own_in_its_order(reference_model, kwargs):
    """The same scores as generate()'s own list at the first new token, in the middle (past the
    length penalty's start) and at the last (forced EOS), with repeated n-grams in the context."""
    model = reference_model.model
    prompt_length, vocab = 9, model.config.vocab_size
    ours = build_processors(sampling(kwargs), prompt_length, reference_model.eos_token_ids, vocab)
    theirs = generate_processors(model, kwargs, prompt_length)
    generator = torch.Generator().manual_seed(0)
    for new in (0, 1, 6, NEW - 1):
        context = torch.randint(0, 40, (1, prompt_length + new), generator=generator)  # small ids: n-grams repeat
        context[0, -2:] = torch.tensor([30, 31])  # a biased sequence's first tokens, just generated
        scores = torch.randn(1, vocab, generator=generator) * 4
        torch.testing.assert_close(ours(context, scores.clone()), theirs(context, scores.clone()), rtol=0, atol=0,
                                   equal_nan=True)


@pytest.mark.parametrize("prompt, kwargs", [("Write a poem about the sea, the sea, the sea:", EVERYTHING),
                                            ("List the days of the week:", EVERYTHING),
                                            ("List the days of the week:", WATERMARK)])
def test_greedy_tokens_with_the_processors_are_generates(reference_model, hf_tokenizer, prompt, kwargs):
    engine = engine_for(reference_model, parse_args(["--match-generate", "--kv-cache-tokens", "4096"]))
    ids = hf_tokenizer(prompt).input_ids
    got = tokens(engine, Sequence(prompt, ids, sampling(kwargs)))
    with torch.inference_mode():
        input_ids = torch.tensor([ids])
        out = reference_model.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                             max_new_tokens=NEW, do_sample=False, **kwargs)
    assert got == out[0, len(ids):].tolist(), prompt
    if "forced_eos_token_id" in kwargs:
        assert got[-1] == 2 or len(got) < NEW  # forced EOS at the last position
