"""The scheduler alone: hand-made sampled tokens, no tensors (as vLLM's tests/v1/core)."""

import pytest
import torch

from model_svc.engine.kv_cache import KVCacheManager, KVSpec
from model_svc.engine.scheduler import Scheduler, SchedulerFull
from model_svc.engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus

EOS = 2


def make(max_num_seqs=4, max_batch_tokens=16, kv_tokens=1000, max_waiting=10, max_context=100):
    spec = KVSpec(1, 1, 2, torch.float32, torch.device("cpu"))
    return Scheduler(KVCacheManager(spec, kv_tokens), max_num_seqs, max_batch_tokens, max_waiting, max_context, [EOS])


def seq(i, n_prompt=3, **params):
    return Sequence(i, list(range(10, 10 + n_prompt)), SamplingParams(**params))


def step(s, token=7):
    out = s.schedule()
    sampled = {item.seq.seq_id: token for item in out.scheduled if item.completes_prompt}
    return out, s.update(out, sampled)


def test_join_at_next_step_and_leave_at_once():
    s = make()
    s.add(seq("a", max_new_tokens=2))
    out, _ = step(s)
    assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [("a", 3)]
    s.add(seq("b", max_new_tokens=5))
    out, finished = step(s)
    assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 3)]
    assert [f.seq_id for f in finished] == ["a"]
    assert finished[0].finish_reason is FinishReason.LENGTH
    assert [x.seq_id for x in s.running] == ["b"]
    assert s.kv_cache.num_used_tokens == 3 + 5


def test_chunked_prefill_keeps_decoding():
    s = make(max_batch_tokens=8)
    s.add(seq("short", max_new_tokens=10))
    step(s)
    s.add(seq("long", n_prompt=20, max_new_tokens=5))
    chunks = []
    for _ in range(3):
        out, _ = step(s)
        chunks.append([(i.seq.seq_id, i.num_new_tokens, i.completes_prompt) for i in out.scheduled])
    # The running sequence decodes every step; the long prompt fills what the budget leaves.
    assert chunks == [
        [("short", 1, True), ("long", 7, False)],
        [("short", 1, True), ("long", 7, False)],
        [("short", 1, True), ("long", 6, True)],
    ]
    assert s.by_id["long"].output_ids == [7]


def test_kv_budget_makes_new_sequences_wait():
    s = make(kv_tokens=20)
    s.add(seq("a", max_new_tokens=12))  # needs 15
    s.add(seq("b", max_new_tokens=12))
    out, _ = step(s)
    assert [i.seq.seq_id for i in out.scheduled] == ["a"]
    assert s.by_id["b"].status is SequenceStatus.WAITING
    s.abort("a")
    assert s.kv_cache.num_used_tokens == 0
    out, _ = step(s)
    assert [i.seq.seq_id for i in out.scheduled] == ["b"]


def test_max_num_seqs_bound():
    s = make(max_num_seqs=2)
    for i in range(3):
        s.add(seq(i, max_new_tokens=5))
    out, _ = step(s)
    assert len(out.scheduled) == 2 and s.num_waiting == 1


def test_waiting_bound_and_too_big_requests():
    s = make(max_waiting=1)
    s.add(seq("a"))
    with pytest.raises(SchedulerFull):
        s.add(seq("b"))
    with pytest.raises(ValueError, match="KV-cache tokens"):
        make(kv_tokens=10).add(seq("c", max_new_tokens=20))


def test_eos_min_new_tokens_and_ignore_eos():
    s = make()
    s.add(seq("a", max_new_tokens=5))
    step(s)
    _, finished = step(s, token=EOS)
    assert finished[0].finish_reason is FinishReason.EOS_TOKEN
    s.add(seq("b", max_new_tokens=3, ignore_eos=True))
    finished = []
    for _ in range(3):
        finished += step(s, token=EOS)[1]
    assert finished[0].finish_reason is FinishReason.LENGTH and len(finished[0].output_ids) == 3
    s.add(seq("c", max_new_tokens=5, stop_token_ids=frozenset({9})))
    _, finished = step(s, token=9)
    assert finished[0].finish_reason is FinishReason.EOS_TOKEN


def test_context_limit():
    s = make(max_context=5)
    s.add(seq("a", n_prompt=3, max_new_tokens=50))
    step(s)
    _, finished = step(s)
    assert finished[0].finish_reason is FinishReason.LENGTH and finished[0].num_tokens == 5


def test_abort_waiting_and_running_frees_everything():
    s = make(max_num_seqs=1)
    s.add(seq("a", max_new_tokens=50))
    s.add(seq("b", max_new_tokens=50))
    step(s)
    assert s.abort("b").finish_reason is FinishReason.CANCELLED
    assert s.abort("a").finish_reason is FinishReason.CANCELLED
    assert s.abort("a") is None
    assert not s.has_work and s.kv_cache.num_used_tokens == 0 and not s.by_id


def test_sampling_params_are_checked():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))


def test_prefill_budget_spreads_a_burst_and_never_splits_a_short_prompt():
    s = make(max_num_seqs=8, max_batch_tokens=64)
    s.max_prefill_tokens = 8
    for i in range(4):
        s.add(seq(i, n_prompt=3, max_new_tokens=5))
    out, _ = step(s)
    # 3 + 3 fit the prefill budget of 8; the third prompt would be split, so it waits.
    assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [(0, 3), (1, 3)]
    out, _ = step(s)
    assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [(0, 1), (1, 1), (2, 3), (3, 3)]
    s.add(seq("long", n_prompt=20, max_new_tokens=5))
    out, _ = step(s)
    assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled][-1] == ("long", 8)  # longer: chunked


def test_prefix_sharing_copies_what_a_running_sequence_computed():
    s = make(max_num_seqs=8, max_batch_tokens=32)
    s.max_shared_prompt = 20
    system = [50, 51, 52, 53, 54, 55]
    s.add(Sequence("a", system + [60, 61], SamplingParams(max_new_tokens=5)))
    out, _ = step(s, token=90)
    assert not out.copies  # nothing ran before it
    s.add(Sequence("b", system + [70], SamplingParams(max_new_tokens=5)))  # shares the system tokens
    s.add(Sequence("c", system + [60, 61, 90, 91], SamplingParams(max_new_tokens=5)))  # and a's first output
    s.add(Sequence("d", system + [60, 61], SamplingParams(max_new_tokens=5)))  # a's very prompt
    s.add(Sequence("e", [99] + system, SamplingParams(max_new_tokens=5)))  # differs at the first token
    out, _ = step(s, token=90)
    a, b, c, d = (s.by_id[x].kv_cache.start for x in "abcd")
    assert [(c_.src, c_.dst, c_.num_tokens) for c_ in out.copies] == [
        (a, b, 6),
        (a, c, 8),  # a has computed its 8 prompt tokens; its output 90 is not computed yet
        (a, d, 7),  # a whole prompt is never copied: its last token is computed for the logits
    ]
    assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [
        ("a", 1), ("b", 1), ("c", 2), ("d", 1), ("e", 7)]
    assert out.num_shared_tokens == 21


def test_prefix_sharing_is_off_by_default_and_bounded_by_prompt_length():
    for max_shared, prompt_len in ((0, 6), (5, 6)):
        s = make(max_batch_tokens=32)
        s.max_shared_prompt = max_shared
        s.add(seq("a", n_prompt=prompt_len, max_new_tokens=5))
        step(s)
        s.add(seq("b", n_prompt=prompt_len, max_new_tokens=5))
        out, _ = step(s)
        assert not out.copies
        assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", prompt_len)]
