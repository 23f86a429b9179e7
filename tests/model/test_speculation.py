"""Speculative decoding with the real model in process: outputs equal to the same requests without
speculation, bit for bit, by prompt lookup and by a draft model."""


import pytest
import torch

from model_svc.__main__ import engine_for, parse_args
from model_svc.engine.sequence import SamplingParams, Sequence
from model_svc.engine.step_cost import StepCost

PARAGRAPH = ("The quick brown fox jumpd over the lazy dog. It was a sunny day in the valey, and the farmer was "
             "working in his feild. He had three cows, two horses and a dog named Rex.")


@pytest.fixture(scope="module")
def prompts(hf_tokenizer):
    def chat(text):
        return hf_tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
    return [hf_tokenizer(p).input_ids for p in (
        chat("Repeat this paragraph with the typos fixed:\n\n" + PARAGRAPH),
        chat("Copy this list, one item a line: apples, pears, plums, cherries, apples, pears, plums."),
        chat("Write a short story about a robot."),
    )]


@pytest.fixture(scope="module")
def engine(reference_model):
    """The model service's engine with its defaults (speculation on: prompt lookup, 8)."""
    return engine_for(reference_model, parse_args(["--kv-cache-tokens", "8192", "--max-num-seqs", "16"]))


MODES = {
    "greedy": dict(),
    "top-k": dict(do_sample=True, top_k=50, temperature=0.8, seed=3),
    "top-p": dict(do_sample=True, top_k=0, top_p=0.9, seed=11),
    "penalty, min tokens": dict(do_sample=True, top_k=20, repetition_penalty=1.1, min_new_tokens=30, seed=5),
    "greedy, stop token": dict(stop_token_ids=frozenset({30}), min_new_tokens=12),  # "." after 12 tokens
}


def run(engine, specs):
    """Runs (id, prompt, params) together; returns each one's (tokens, logprobs, finish reason), and the
    proposals verified and kept over the run."""
    seqs = [Sequence(i, ids, SamplingParams(**params)) for i, ids, params in specs]
    got = {s.seq_id: ([], []) for s in seqs}
    reasons = {}
    proposed = accepted = 0
    for s in seqs:
        engine.add(s)
    while engine.scheduler.has_work:
        for out in engine.step():
            if out.token_id is not None:
                got[out.seq_id][0].append(out.token_id)
                got[out.seq_id][1].append(out.logprob)
            if out.finish_reason is not None:
                reasons[out.seq_id] = out.finish_reason
        proposed += engine.last_step.num_proposed
        accepted += engine.last_step.num_accepted
        for s in engine.scheduler.running:  # rejected proposals hold no block past the step
            assert len(s.block_table.block_ids) <= engine.scheduler.blocks.blocks_for(s.num_tokens)
    assert engine.scheduler.blocks.num_used_blocks == 0
    return {i: (*got[i], reasons[i]) for i in got}, proposed, accepted


@pytest.mark.parametrize("mode", MODES)
def test_speculation_changes_nothing_alone(engine, prompts, mode):
    params = dict(max_new_tokens=60, logprobs=True, **MODES[mode])
    kept, verified = [], []
    for ids in prompts:
        plain, proposed, _ = run(engine, [(0, ids, dict(params, prompt_lookup_num_tokens=0))])
        assert proposed == 0  # the off switch
        spec, proposed, accepted = run(engine, [(0, ids, dict(params, prompt_lookup_num_tokens=8))])
        assert spec == plain
        kept.append(accepted)
        verified.append(proposed)
    if params.get("do_sample"):
        # A draw need not copy the prompt: whether any proposal is kept depends on the draw (and so on
        # the CPU's rounding), but proposals were verified against it, token by token.
        assert sum(verified) > 0
    else:
        assert kept[0] > 0  # it did speculate (copying the paragraph) ...
    if mode == "greedy":
        assert kept[0] > 30  # ... and greedy, it kept most of what it copied


def test_speculation_changes_nothing_in_a_batch(engine, prompts):
    """Speculating and plain sequences, greedy and seeded, side by side: each equals its run alone
    without speculation."""
    specs = []
    for i, mode in enumerate(MODES):
        for j, ids in enumerate(prompts):
            lookup = 8 if (i + j) % 3 else 0
            specs.append((f"{mode}/{j}", ids, dict(max_new_tokens=48, logprobs=True, prompt_lookup_num_tokens=lookup,
                                                   **MODES[mode])))
    together, proposed, accepted = run(engine, specs)
    assert accepted > 0
    for seq_id, ids, params in specs:
        alone, _, _ = run(engine, [(seq_id, ids, dict(params, prompt_lookup_num_tokens=0))])
        assert together[seq_id] == alone[seq_id], seq_id


def test_proposals_attend_as_decoded_tokens_whatever_the_prompt_path(reference_model, prompts):
    """With prompts attending through SDPA (generate()'s numbers), proposals still attend through
    the decode kernel, as the tokens they stand for would."""
    engine = engine_for(reference_model, parse_args(["--prefill-attention", "sdpa"]))
    assert engine.scheduler.config.speculation and engine.default_prompt_lookup == 8
    for params in (dict(), dict(do_sample=True, top_k=40, seed=2)):
        params = dict(max_new_tokens=48, logprobs=True, **params)
        plain, _, _ = run(engine, [(0, prompts[0], dict(params, prompt_lookup_num_tokens=0))])
        spec, _, accepted = run(engine, [(0, prompts[0], dict(params, prompt_lookup_num_tokens=8))])
        assert spec == plain and accepted > 0


def test_speculation_survives_preemption(reference_model, prompts):
    """A cache too small for all of them: sequences are preempted and recomputed mid-speculation."""
    small = engine_for(reference_model, parse_args(["--kv-cache-tokens", "384", "--no-prefix-caching"]))
    specs = [(i, prompts[i % 2], dict(max_new_tokens=100, ignore_eos=True, do_sample=bool(i % 2), seed=i, top_k=40,
                                      prompt_lookup_num_tokens=8)) for i in range(4)]
    together, _, accepted = run(small, specs)
    assert small.scheduler.num_preemptions > 0 and accepted > 0
    for seq_id, ids, params in specs:
        alone, _, _ = run(small, [(seq_id, ids, dict(params, prompt_lookup_num_tokens=0))])
        assert together[seq_id] == alone[seq_id]


def test_speculation_needs_native_decode(reference_model):
    sdpa = engine_for(reference_model, parse_args(["--decode-attention", "sdpa", "--prefill-attention", "sdpa"]))
    assert sdpa.default_prompt_lookup == 0 and not sdpa.scheduler.config.speculation
    assert engine_for(reference_model, parse_args([])).default_prompt_lookup == 8
    for flags in (["--match-generate", "--prompt-lookup-num-tokens", "4"],
                  ["--decode-attention", "sdpa", "--prompt-lookup-num-tokens", "4"],
                  ["--prompt-lookup-num-tokens", "33"], ["--prompt-lookup-num-tokens", "-1"]):
        with pytest.raises(SystemExit, match="prompt-lookup-num-tokens"):
            engine_for(reference_model, parse_args(flags))
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        SamplingParams(prompt_lookup_num_tokens=33)


# -- a draft model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory, reference_model):
    """A tiny random-weight Llama with the served model's vocabulary: the default model has no
    smaller sibling here, so this stands for one (its guesses are mostly wrong)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=reference_model.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("draft")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def test_a_draft_models_proposals_change_nothing(reference_model, prompts, tiny_draft):
    """Proposals from a draft model are verified like prompt lookup's: a tiny random draft (its
    guesses mostly wrong) gives the same tokens and logprobs as no speculation, greedy and seeded,
    alone and together."""
    plain_engine = engine_for(reference_model, parse_args([]))
    specs = [(f"{j}/{seeded}", ids, dict(max_new_tokens=40, logprobs=True, prompt_lookup_num_tokens=6,
                                         **(dict(do_sample=True, top_k=40, seed=j) if seeded else {})))
             for j, ids in enumerate(prompts) for seeded in (False, True)]
    expected = {}
    for seq_id, ids, params in specs:
        expected.update(run(plain_engine, [(seq_id, ids, dict(params, prompt_lookup_num_tokens=0))])[0])
    engine = engine_for(reference_model, parse_args(["--draft-model", tiny_draft]))
    assert engine.scheduler.draft is not None
    # Priced as if a step took 1,000 s, every proposal pays: the draft is asked every step, however
    # wrong its guesses (the engine's cost model learns only in the service's loop, not here).
    engine.scheduler.cost = StepCost((1000.0, 0.001, 6e-7))
    for spec in specs[:2]:
        assert run(engine, [spec])[0] == {spec[0]: expected[spec[0]]}
    together, proposed, _ = run(engine, specs)
    assert together == expected
    assert proposed >= sum(len(tokens) - 1 for tokens, _, _ in together.values())  # a proposal or more a step
    assert not engine.scheduler.draft.states  # every sequence's draft cache went with it


def test_the_draft_proposes_its_own_greedy_continuation(reference_model, prompts):
    """The proposer alone, with the served model's own weights unquantized as the draft: it proposes
    what the draft's generate() would, and after a rejection it cuts its cache back and goes on from
    the sequence's real tokens."""
    from model_svc.engine.draft import DraftProposer
    from model_svc.loader import load_model
    from tests.helpers import MODEL

    draft = load_model(MODEL, "bfloat16", "none", "cpu").model
    proposer = DraftProposer(draft)

    def greedy(ids, n):
        with torch.inference_mode():
            out = draft.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        return out[0, len(ids):].tolist()

    seq = Sequence("a", list(prompts[0]), SamplingParams())
    first = proposer.propose(seq, 5)
    assert first == greedy(seq.prompt_ids, 5)
    seq.tokens += first[:2] + [first[2] + 1]  # two kept, then another token than the third
    assert proposer.propose(seq, 4) == greedy(seq.token_ids(), 4)
    assert proposer.seconds_per_token > 0
    proposer.release("a")
    assert not proposer.states


def test_a_draft_that_costs_more_than_it_saves_stops_being_asked(reference_model, prompts):
    """A draft's measured time a pass is part of a proposal's price: priced against steps of a few
    microseconds (any forward pass costs more), the draft is asked until it has been measured, then
    never again, and the output is the same."""
    from tests.helpers import MODEL

    engine = engine_for(reference_model, parse_args(["--draft-model", MODEL]))
    engine.scheduler.cost = StepCost((2e-6, 1e-7, 1e-12))
    params = dict(max_new_tokens=60, prompt_lookup_num_tokens=8)
    got, proposed, accepted = run(engine, [(0, prompts[0], params)])
    plain, _, _ = run(engine_for(reference_model, parse_args([])),
                      [(0, prompts[0], dict(params, prompt_lookup_num_tokens=0))])
    assert got == plain
    assert 0 < proposed <= 8 and accepted > 0  # its first guesses were proposed (and kept), then no more
    assert engine.scheduler.draft.seconds_per_token > 0


def test_a_draft_with_another_vocabulary_is_refused(reference_model, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="vocabulary has 1000 tokens"):
        engine_for(reference_model, parse_args(["--draft-model", str(tmp_path)]))
    with pytest.raises(SystemExit, match="--draft-model proposes nothing"):
        engine_for(reference_model, parse_args(["--draft-model", str(tmp_path), "--prompt-lookup-num-tokens", "0"]))
