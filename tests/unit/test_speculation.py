"""Speculative decoding by prompt lookup, alone: the proposer and its budget, the scheduler's rollback
with hand-made tokens, incremental detokenization of several tokens a step (the engine with the real
model: tests/model/test_speculation.py)."""


import itertools
from dataclasses import replace

import pytest

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
    index.sync(tokens)
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
    tokens = [10, 11, 12, 13, 14]  # the prompt, then the output appended
    index.sync(tokens)
    assert index.propose(3) == []
    for token in [10, 11]:
        tokens.append(token)
        index.sync(tokens)
    assert index.propose(3) == [12, 13, 14]
    tokens += [12, 99]  # diverged: "12 99" never occurred
    index.sync(tokens)
    assert index.propose(3) == []
    tokens += [10, 11]  # "10 11" now occurred twice: the latest earlier one continues with 12 99
    index.sync(tokens)
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


def test_max_matching_ngram_size_bounds_the_match():
    tokens = [1, 2, 3, 4, 9, 7, 3, 4, 5, 6, 2, 3, 4]
    # "2 3 4" occurred at 1..3 (then 9 7), "3 4" most recently at 6..7 (then 5 6): the longest match wins
    assert proposals(tokens, 2) == [9, 7]
    short = NgramIndex(max_ngram=2)  # only 2-grams: "3 4" at 6..7
    short.sync(tokens)
    assert short.propose(2) == [5, 6]
    single = NgramIndex(max_ngram=1)  # "4" most recently at 7
    single.sync(tokens)
    assert single.propose(2) == [5, 6] and NgramIndex(max_ngram=1).min_ngram == 1


def test_a_requests_max_matching_ngram_size_reaches_its_proposer():
    s = make_scheduler()
    prompt = [10, 11, 12, 13, 14, 15, 16, 10, 11]
    params = SamplingParams(max_new_tokens=50, prompt_lookup_num_tokens=4, max_matching_ngram_size=2)
    seq = Sequence("a", prompt, params)
    s.add(seq)
    s.update(s.schedule(), {"a": 12})
    s.schedule()
    assert seq.speculator.index.max_ngram == 2


def test_a_tenant_capped_by_fair_steps_does_not_speculate_in_that_step():
    """Three of A's sequences beside B's one: fair steps cap A, and A's decoding row proposes nothing
    (its proposals would lengthen the step past what fair steps allow); B's row still proposes.
    Without B, A's row proposes."""
    s = make_scheduler()
    s.config = replace(s.config, tenant_slowdown=1.0)
    prompt = [10, 11, 12, 13, 14, 15, 16, 10, 11]  # "10 11" occurred before: proposals follow
    for i in range(3):
        s.add(Sequence(f"a{i}", prompt, SamplingParams(max_new_tokens=50, prompt_lookup_num_tokens=4), tenant="A"))
    s.add(Sequence("b", prompt, SamplingParams(max_new_tokens=50, prompt_lookup_num_tokens=4), tenant="B"))
    s.update(s.schedule(), {f"a{i}": 12 for i in range(3)} | {"b": 12})  # the prompts
    out = s.schedule()
    assert out.num_capped > 0
    by_tenant = {item.seq.tenant: item for item in out.scheduled}
    assert by_tenant["B"].proposals and all(not i.proposals for i in out.scheduled if i.seq.tenant == "A")
    s.abort("b")
    s.update(out, {i.seq.seq_id: 13 for i in out.scheduled if i.seq.seq_id != "b"})  # a0: ... 10 11 12 13
    out = s.schedule()  # A alone: a0 decodes with proposals again (a1 and a2 start their prompts)
    (a0,) = [i for i in out.scheduled if i.seq.seq_id == "a0"]
    assert out.num_capped == 0 and a0.proposals[:2] == [14, 15]
