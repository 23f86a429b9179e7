"""Speculative decoding by prompt lookup: the proposer and its budget alone, the scheduler's rollback
with hand-made tokens, incremental detokenization of several tokens a step, and the engine with the
real model: outputs equal to the same requests without speculation, bit for bit."""

import itertools
from dataclasses import replace

import pytest
import torch

from model_svc.__main__ import engine_for, parse_args
from model_svc.engine.block_manager import BlockManager
from model_svc.engine.schedule_types import SchedulerConfig
from model_svc.engine.scheduler import Scheduler
from model_svc.engine.sequence import FinishReason, SamplingParams, Sequence
from model_svc.engine.speculation import NgramIndex, Speculator, accepted_count
from model_svc.engine.step_cost import StepCost
from tokenizer_svc.detokenize import decode_incremental, decode_steps

# -- the proposer -------------------------------------------------------------------


def proposals(tokens, k):
    index = NgramIndex()
    index.sync(tokens, [])
    return index.propose(k)


def test_proposes_what_followed_the_latest_earlier_occurrence():
    #           0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]
    # "1 2 3" last occurred at 0..2 (followed by 4 5 9), "2 3" most recently at 6..7 (followed by 7 8):
    # the longer n-gram wins.
    assert proposals(tokens, 3) == [4, 5, 9]
    assert proposals([5, 2, 3, 7, 8, 6, 2, 3], 4) == [7, 8, 6, 2]  # "2 3" (no longer match): 7 8 6 2
    assert proposals([5, 2, 3, 7, 8, 6, 2, 3], 2) == [7, 8]
    assert proposals([1, 2, 3, 4], 5) == []  # nothing repeats
    assert proposals([1, 2, 1, 2], 0) == []


def test_the_index_follows_appended_tokens():
    index = NgramIndex()
    prompt, output = [10, 11, 12, 13, 14], []
    index.sync(prompt, output)
    assert index.propose(3) == []
    for token in [10, 11]:
        output.append(token)
        index.sync(prompt, output)
    assert index.propose(3) == [12, 13, 14]
    output += [12, 99]  # diverged: "12 99" never occurred
    index.sync(prompt, output)
    assert index.propose(3) == []
    output += [10, 11]  # "10 11" now occurred twice: the latest earlier one continues with 12 99
    index.sync(prompt, output)
    assert index.propose(3) == [12, 99, 10]


def test_accepted_count_stops_at_the_first_disagreement():
    assert accepted_count([4, 5, 6], [4, 5, 6, 7]) == 3
    assert accepted_count([4, 5, 6], [4, 9, 6, 7]) == 1
    assert accepted_count([4, 5, 6], [8, 5, 6, 7]) == 0


def test_budget_follows_the_acceptance_and_the_price():
    spec = Speculator()
    assert spec.accept_rate == pytest.approx(0.5)  # the prior
    assert spec.budget(0.1, 8) == 3  # 0.5^3 = 0.125 >= 0.1 > 0.5^4
    assert spec.budget(0.6, 8) == 0  # a row costs more than even the first proposal earns
    assert spec.budget(0.1, 2) == 2
    for _ in range(5):
        spec.record(8, 8)  # everything kept
    assert spec.accept_rate > 0.85 and spec.budget(0.1, 8) == 8
    for _ in range(8):
        spec.record(4, 0)  # nothing kept: within a few verifications it proposes at most one ...
    assert spec.budget(0.1, 8) <= 1 and spec.budget(0.2, 8) == 0  # ... and none where a row is dearer
    for _ in range(2):
        spec.record(2, 2)  # copying again: it proposes more at once
    assert spec.budget(0.1, 8) >= 3
    assert (spec.num_proposed, spec.num_accepted) == (40 + 32 + 4, 40 + 4)


# -- the scheduler with hand-made tokens --------------------------------------------------


def make_scheduler(kv_tokens=1000, block_size=4):
    blocks = BlockManager(kv_tokens // block_size, block_size, watermark_blocks=0)
    # A step costs 10 ms plus 1 ms a token: a lone sequence's row is worth 1/11 of a step.
    config = SchedulerConfig(max_num_seqs=4, max_batch_tokens=64, max_waiting=10, speculation=True)
    return Scheduler(blocks, config, 200, [2], cost=StepCost((0.010, 0.001, 0.0)))


def test_verified_tokens_are_kept_up_to_the_first_miss_and_the_rest_rolls_back():
    s = make_scheduler()
    prompt = [10, 11, 12, 13, 14, 15, 16, 10, 11]  # "10 11" occurred before: propose 12 13 14 ...
    seq = Sequence("a", prompt, SamplingParams(max_new_tokens=50, prompt_lookup_num_tokens=4))
    s.add(seq)
    out = s.schedule()
    s.update(out, {"a": 12})  # the prompt's step; now decoding, last token 12 (uncomputed)
    out = s.schedule()
    (item,) = out.scheduled
    assert item.proposals == [13, 14, 15]  # the budget: 0.5^3 >= 1/11 > 0.5^4
    assert item.tokens() == [12, 13, 14, 15] and item.num_new_tokens == 4 and out.num_batched_tokens == 4
    assert len(seq.block_table.block_ids) == 4  # room for 13 tokens, taken for the step
    # Sampled at each row: 13 (kept), 14 (kept), 99 (15 rejected): emitted 13 14 99.
    s.update(out, {"a": [13, 14, 99]})
    assert seq.output_ids == [12, 13, 14, 99]
    assert seq.num_computed_tokens == 12 and seq.num_tokens == 13  # 12, 13, 14 computed; 99 is next
    assert len(seq.block_table.block_ids) == 4  # blocks for 13 tokens: none only the rejection used
    assert (seq.speculator.num_proposed, seq.speculator.num_accepted) == (3, 2)


def test_rejected_proposals_give_their_blocks_back():
    s = make_scheduler(block_size=2)
    cycle = list(range(10, 40))  # the prompt goes round a cycle; the output goes on round it
    seq = Sequence("a", cycle + [10, 11], SamplingParams(max_new_tokens=50, prompt_lookup_num_tokens=8))
    following = lambda token: 10 + (token - 9) % 30  # noqa: E731
    s.add(seq)
    s.update(s.schedule(), {"a": 12})
    for _ in range(3):  # every proposal kept: the budget grows
        out = s.schedule()
        (item,) = out.scheduled
        assert item.proposals == [following(t) for t in [seq.output_ids[-1], *item.proposals[:-1]]]
        s.update(out, {"a": item.proposals + [following(item.proposals[-1])]})
    out = s.schedule()
    (item,) = out.scheduled
    assert len(item.proposals) == 8
    used = s.blocks.num_used_blocks
    assert len(seq.block_table.block_ids) == s.blocks.blocks_for(seq.num_tokens + 8)
    s.update(out, {"a": [77]})  # the first proposal is rejected
    assert len(seq.block_table.block_ids) == s.blocks.blocks_for(seq.num_tokens)
    assert s.blocks.num_used_blocks < used
    s.abort("a")
    assert s.blocks.num_used_blocks == 0


def test_a_stop_among_the_kept_proposals_ends_the_sequence_there():
    s = make_scheduler()
    seq = Sequence("a", [10, 11, 12, 2, 14, 10, 11], SamplingParams(max_new_tokens=50, prompt_lookup_num_tokens=4))
    s.add(seq)
    s.update(s.schedule(), {"a": 12})
    out = s.schedule()
    assert out.scheduled[0].proposals[:2] == [2, 14]  # EOS (2) proposed, then more
    finished = s.update(out, {"a": [2, 14]})  # EOS kept, then a token past it
    assert finished == [seq] and seq.finish_reason is FinishReason.EOS_TOKEN
    assert seq.output_ids == [12, 2]  # nothing past the stop
    assert s.blocks.num_used_blocks == 0


def test_proposals_never_pass_max_new_tokens():
    s = make_scheduler()
    seq = Sequence("a", [10, 11, 12, 13, 14, 15, 10, 11], SamplingParams(max_new_tokens=3, prompt_lookup_num_tokens=8))
    s.add(seq)
    s.update(s.schedule(), {"a": 12})
    out = s.schedule()
    assert out.scheduled[0].proposals == [13]  # 2 tokens may still come: one proposal and its successor


def test_no_proposals_when_asked_for_none_or_not_enabled():
    for lookup, enabled in ((0, True), (4, False)):
        s = make_scheduler()
        s.config = replace(s.config, speculation=enabled)
        seq = Sequence("a", [10, 11, 12, 13, 10, 11], SamplingParams(max_new_tokens=9, prompt_lookup_num_tokens=lookup))
        s.add(seq)
        s.update(s.schedule(), {"a": 12})
        out = s.schedule()
        assert out.scheduled[0].proposals == [] and out.num_batched_tokens == 1


# -- detokenizing several tokens of one step ----------------------------------------------


def test_several_new_tokens_decode_as_successive_steps(hf_tokenizer):
    decode = lambda ids, skip: hf_tokenizer.decode(ids, skip_special_tokens=skip)  # noqa: E731
    ids = hf_tokenizer("Grüße, 東京! naïve café ").input_ids + [hf_tokenizer.eos_token_id]
    for split in ([3, 1, 4, 2], [1] * len(ids), [len(ids)], [5, len(ids) - 5]):
        # one token at a time, as ordinary decoding calls it
        texts, prefix, read, sent = [], 0, 0, []
        for i, token in enumerate(ids):
            sent.append(token)
            step = decode_incremental(decode, sent[prefix:], read - prefix, True, i == len(ids) - 1)
            texts.append(step.text)
            prefix, read = prefix + step.prefix_offset, prefix + step.read_offset
        # the same ids in groups, one call a group
        got, prefix, read, position = [], 0, 0, 0
        for size in itertools.cycle(split):
            if position == len(ids):
                break
            size = min(size, len(ids) - position)
            position += size
            step = decode_steps(decode, ids[prefix:position], read - prefix, True, position == len(ids), size)
            assert step.text == "".join(step.texts)
            got.extend(step.texts)
            prefix, read = prefix + step.prefix_offset, prefix + step.read_offset
        assert got == texts and "".join(got) == hf_tokenizer.decode(ids, skip_special_tokens=True)


# -- the engine with the real model --------------------------------------------------------

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
    from tests.conftest import MODEL

    draft = load_model(MODEL, "bfloat16", "none", "cpu").model
    proposer = DraftProposer(draft)

    def greedy(ids, n):
        with torch.inference_mode():
            out = draft.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        return out[0, len(ids):].tolist()

    seq = Sequence("a", list(prompts[0]), SamplingParams())
    first = proposer.propose(seq, 5)
    assert first == greedy(seq.prompt_ids, 5)
    seq.output_ids += first[:2] + [first[2] + 1]  # two kept, then another token than the third
    assert proposer.propose(seq, 4) == greedy(seq.token_ids(), 4)
    assert proposer.seconds_per_token > 0
    proposer.release("a")
    assert not proposer.states


def test_a_draft_that_costs_more_than_it_saves_stops_being_asked(reference_model, prompts):
    """A draft's measured time a pass is part of a proposal's price: priced against steps of a few
    microseconds (any forward pass costs more), the draft is asked until it has been measured, then
    never again, and the output is the same."""
    from tests.conftest import MODEL

    engine = engine_for(reference_model, parse_args(["--draft-model", MODEL]))
    engine.scheduler.cost = StepCost((2e-6, 1e-7, 1e-12))
    params = dict(max_new_tokens=60, prompt_lookup_num_tokens=8)
    got, proposed, accepted = run(engine, [(0, prompts[0], params)])
    plain, _, _ = run(engine_for(reference_model, parse_args([])), [(0, prompts[0], dict(params, prompt_lookup_num_tokens=0))])
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
