"""Structured output, samples and prompt logprobs with the real model in process: every output
validates, a constrained neighbour changes nothing, speculation under a grammar changes nothing."""

import json
import re

import jsonschema
import pytest
import torch

from gateway.structured import grammar_for
from model_svc.__main__ import engine_for, parse_args
from model_svc.engine.sequence import FinishReason, SamplingParams, Sequence
from tests.unit.test_structured import ASKS, SCHEMAS


@pytest.fixture(scope="module")
def engine(reference_model):
    return engine_for(reference_model, parse_args(["--max-num-seqs", "32"]))


def chat(tokenizer, text):
    return tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)).input_ids


def run(engine, seqs):
    for seq in seqs:
        engine.add(seq)
    while engine.scheduler.has_work:
        engine.step()
    return seqs


def test_every_output_parses_and_validates_against_its_schema(engine, hf_tokenizer):
    """100 requests over the 10 schemas, each greedy once and sampled 9 times (seeds, temperatures,
    top-k and top-p varied), run together: each output is JSON that validates against its schema,
    and ends with EOS."""
    samplings = [{}] + [dict(do_sample=True, seed=s, temperature=(0.7, 1.0, 1.3)[s % 3],
                             **({"top_k": 50} if s % 2 else {"top_k": 0, "top_p": 0.95})) for s in range(9)]
    seqs = []
    for i, (schema, ask) in enumerate(zip(SCHEMAS, ASKS)):
        ids = chat(hf_tokenizer, f"Give {ask} as JSON.")
        grammar = grammar_for("json_schema", json.dumps(schema))
        for j, sampling in enumerate(samplings):
            seqs.append(Sequence((i, j), ids, SamplingParams(max_new_tokens=400, grammar=grammar, **sampling)))
    assert len(seqs) == 100
    for seq in run(engine, seqs):
        text = hf_tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        assert seq.finish_reason is FinishReason.EOS_TOKEN, (seq.seq_id, text)
        jsonschema.validate(json.loads(text), SCHEMAS[seq.seq_id[0]])


def test_regex_choice_and_grammar_outputs_match(engine, hf_tokenizer):
    cases = [
        ("regex", r"[A-Z][a-z]{2,12} (is|was) [0-9]{1,2} years old\.", "How old is your cat?",
         lambda t: re.fullmatch(r"[A-Z][a-z]{2,12} (is|was) [0-9]{1,2} years old\.", t)),
        ("choice", ["positive", "negative", "neutral"], "Sentiment of 'I love it'?",
         lambda t: t in ("positive", "negative", "neutral")),
        ("grammar", 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]+/', "What is 6 times 7?",
         lambda t: re.fullmatch(r"The answer is [0-9]+\.", t)),
    ]
    seqs = [Sequence(k, chat(hf_tokenizer, ask), SamplingParams(max_new_tokens=40, grammar=grammar_for(k, v),
                                                                 **({"do_sample": True, "seed": s} if s else {})))
            for k, v, ask, _ in cases for s in (0, 1, 2)]
    for seq in seqs:
        seq.seq_id = (seq.seq_id, seq.params.seed)
    checks = {k: check for k, _, _, check in cases}
    for seq in run(engine, seqs):
        text = hf_tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        assert checks[seq.seq_id[0]](text), (seq.seq_id, text)


def test_a_constrained_neighbour_changes_nothing_for_the_others(engine, hf_tokenizer):
    """Masks, biases and bans are row-wise: unconstrained sequences beside constrained ones give the
    same tokens and logprobs as alone."""
    prompts = [chat(hf_tokenizer, t) for t in ("Tell me about the sea.", "Write a haiku.")]

    def plain(i, ids):
        return Sequence(("plain", i), ids, SamplingParams(max_new_tokens=24, logprobs=True,
                                                          **({"do_sample": True, "seed": 4} if i else {})))
    alone = {}
    for i, ids in enumerate(prompts):
        seq = plain(i, ids)
        outputs = []
        engine.add(seq)
        while engine.scheduler.has_work:
            outputs += [o.logprob for o in engine.step()]
        alone[seq.seq_id] = (seq.output_ids, outputs)
    crowd = [plain(i, ids) for i, ids in enumerate(prompts)]
    others = [Sequence(("json", 0), prompts[0],
                       SamplingParams(max_new_tokens=24, grammar=grammar_for("json_object", True))),
              Sequence(("bias", 0), prompts[1], SamplingParams(max_new_tokens=24, logit_bias=((260, 5.0),))),
              Sequence(("banned", 0), prompts[1], SamplingParams(max_new_tokens=24, bad_words_ids=((30,),)))]
    logprobs = {s.seq_id: [] for s in crowd}
    for seq in crowd + others:
        engine.add(seq)
    while engine.scheduler.has_work:
        for out in engine.step():
            if out.seq_id in logprobs:
                logprobs[out.seq_id].append(out.logprob)
    for seq in crowd:
        assert (seq.output_ids, logprobs[seq.seq_id]) == alone[seq.seq_id]


def test_logit_bias_and_banned_words(engine, hf_tokenizer):
    ids = chat(hf_tokenizer, "Write three sentences about the sea.")
    free = run(engine, [Sequence("free", ids, SamplingParams(max_new_tokens=30))])[0].output_ids
    assert 30 in free  # "." appears ...
    banned = run(engine, [Sequence("ban", ids, SamplingParams(max_new_tokens=30, bad_words_ids=((30,),)))])[0]
    assert 30 not in banned.output_ids  # ... and not once banned
    # A two-token sequence: its second token is banned only right after its first.
    pair = (free[0], free[1])
    two = run(engine, [Sequence("two", ids, SamplingParams(max_new_tokens=30, bad_words_ids=(pair,)))])[0].output_ids
    assert two[0] == free[0] and two[1] != free[1]
    forced = run(engine, [Sequence("bias", ids, SamplingParams(max_new_tokens=5, logit_bias=((9999, 100.0),),
                                                               logprobs=True))])[0]
    assert forced.output_ids == [9999] * 5
    down = run(engine, [Sequence("down", ids, SamplingParams(max_new_tokens=30, logit_bias=((free[0], -100.0),)))])[0]
    assert down.output_ids[0] != free[0]


def test_speculation_under_a_grammar_changes_nothing(engine, hf_tokenizer):
    """Proposals of a constrained sequence are verified with each position's own mask (the grammar
    advanced over the proposals before it, then rolled back): the same tokens, faster."""
    record = '{"name": "Ada", "city": "London", "tags": ["math", "engines"], "year": 1843}'
    ids = chat(hf_tokenizer, "Repeat this JSON record exactly: " + record)
    schema = json.dumps({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "city": {"type": "string", "maxLength": 20},
        "tags": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 12}},
        "year": {"type": "integer", "minimum": 0, "maximum": 3000}},
        "required": ["name", "city", "tags", "year"], "additionalProperties": False})
    results = {}
    for lookup in (0, 8):
        for sampling in ({}, {"do_sample": True, "seed": 3, "top_k": 20}):
            seq = Sequence(lookup, ids, SamplingParams(max_new_tokens=80, grammar=grammar_for("json_schema", schema),
                                                       prompt_lookup_num_tokens=lookup, logprobs=True, **sampling))
            proposed = 0
            engine.add(seq)
            while engine.scheduler.has_work:
                engine.step()
                proposed += engine.last_step.num_proposed
            results[lookup, bool(sampling)] = (seq.output_ids, seq.finish_reason, proposed)
    for sampled in (False, True):
        plain, fast = results[0, sampled], results[8, sampled]
        assert fast[:2] == plain[:2] and plain[2] == 0 and fast[2] > 0
        json.loads(hf_tokenizer.decode(fast[0], skip_special_tokens=True))


# -- several samples, prompt logprobs ---------------------------------------------------------------


def test_samples_of_one_prompt_share_its_computation_and_equal_separate_runs(engine, hf_tokenizer):
    ids = chat(hf_tokenizer, "Tell me a short story about a fox who learns to sing. " * 3)
    params = [SamplingParams(max_new_tokens=16, do_sample=True, seed=7 + i, ignore_eos=True) for i in range(4)]
    alone = [run(engine, [Sequence(("alone", i), ids, p)])[0].output_ids for i, p in enumerate(params)]
    blocks = engine.scheduler.blocks
    hits = blocks.num_hit_tokens
    together = run(engine, [Sequence(("together", i), ids, p) for i, p in enumerate(params)])
    assert [s.output_ids for s in together] == alone
    assert blocks.num_hit_tokens - hits >= 4 * (len(ids) // 16) * 16  # (the prompt is cached from the alone runs)
    # Fresh prompt (nothing cached): the first sample computes it, the others only their last token.
    fresh = chat(hf_tokenizer, "A fresh prompt, never seen: the history of the lighthouse at Alexandria. " * 3)
    computed = cached = 0
    seqs = [Sequence(("fresh", i), fresh, p) for i, p in enumerate(params)]
    for seq in seqs:
        engine.add(seq)
    while engine.scheduler.has_work:
        engine.step()
        computed += engine.last_step.num_tokens
        cached += engine.last_step.num_cached_tokens
    first = cached - 3 * (len(fresh) - 1)  # what the first found cached (the chat template's system prompt)
    assert 0 <= first < len(fresh) // 2  # each later sample took all its prompt but its last token ...
    assert computed == (len(fresh) - first) + 3 + 4 * 15  # ... so the prompt was computed once


def test_prompt_logprobs_match_transformers(reference_model, hf_tokenizer):
    """Each prompt token's logprob given the tokens before it, against in-process transformers'
    log-softmax of the same model: bit-near with the prompt attending as generate() does, and within
    bfloat16 rounding with the default native prefill; alternatives sorted and the chosen one among
    them when it is the most likely. The prompt is computed, not taken from the cache."""
    text = "The capital of France is Paris, and the capital of Spain is Madrid."
    ids = hf_tokenizer(text).input_ids
    with torch.inference_mode():
        reference = torch.log_softmax(reference_model.model(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [float(reference[p, ids[p + 1]]) for p in range(len(ids) - 1)]
    for flags, tolerance in ((["--prefill-attention", "sdpa"], 0.05), ([], 0.5)):
        engine = engine_for(reference_model, parse_args(flags))
        run(engine, [Sequence("warm", ids, SamplingParams(max_new_tokens=1))])  # the prompt is now cached ...
        seq = Sequence("p", ids, SamplingParams(max_new_tokens=2, prompt_logprobs=3))
        engine.add(seq)
        first = None
        while engine.scheduler.has_work:
            for out in engine.step():
                if first is None:
                    first = out
        assert engine.last_step.num_cached_tokens == 0  # ... but computed again for its logprobs
        got = first.prompt_logprobs
        assert [t for t, _, _ in got] == ids[1:]
        diffs = [abs(lp - e) for (_, lp, _), e in zip(got, expected)]
        assert max(diffs) < tolerance and sum(diffs) / len(diffs) < tolerance / 5, (flags, max(diffs))
        for token, logprob, top in got:
            assert len(top) == 3 and [lp for _, lp in top] == sorted([lp for _, lp in top], reverse=True)
            assert top[0][1] >= logprob - 1e-6


def test_prompt_logprobs_survive_chunking(reference_model, hf_tokenizer):
    ids = hf_tokenizer("One two three four five six seven eight nine ten. " * 12).input_ids
    whole = engine_for(reference_model, parse_args(["--max-prefill-tokens", "512"]))
    chunked = engine_for(reference_model, parse_args(["--max-prefill-tokens", "8", "--idle-step-ms", "5"]))
    results = []
    for engine in (whole, chunked):
        seq = Sequence("c", ids, SamplingParams(max_new_tokens=1, prompt_logprobs=0))
        outs = []
        engine.add(seq)
        steps = 0
        while engine.scheduler.has_work:
            outs += engine.step()
            steps += 1
        results.append((outs[0].prompt_logprobs, steps))
    assert results[1][1] > 2  # really chunked
    assert results[0][0] == results[1][0]  # native prefill: chunking changes no bit
