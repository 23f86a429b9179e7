"""The scheduler alone: hand-made sampled tokens, no tensors (as vLLM's tests/v1/core)."""

import pytest

from model_svc.engine.block_manager import BlockManager
from model_svc.engine.scheduler import Scheduler, SchedulerFull
from model_svc.engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus

EOS = 2


def make(max_num_seqs=4, max_batch_tokens=16, kv_tokens=1000, max_waiting=10, max_context=100, block_size=4,
         watermark_blocks=0, max_cached_prompt=0):
    blocks = BlockManager(kv_tokens // block_size, block_size, watermark_blocks=watermark_blocks)
    return Scheduler(blocks, max_num_seqs, max_batch_tokens, max_waiting, max_context, [EOS],
                     max_cached_prompt=max_cached_prompt)


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
    assert s.blocks.num_used_blocks == 1  # b's 3 computed tokens: blocks as it grows, no reservation


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


def test_admission_needs_the_prompts_blocks_not_max_new_tokens():
    s = make(kv_tokens=40, watermark_blocks=1, max_num_seqs=8, max_batch_tokens=64)  # 10 blocks of 4
    for i in range(4):
        s.add(seq(i, n_prompt=7, max_new_tokens=30))  # 2 blocks a prompt; up to 37 tokens each
    out, _ = step(s)
    assert len(out.scheduled) == 4 and s.num_running == 4  # a reservation would have admitted one
    assert s.blocks.num_used_blocks == 8
    s.add(seq("late", n_prompt=7, max_new_tokens=5))
    out, _ = step(s)
    assert s.by_id["late"].status is SequenceStatus.WAITING  # 2 free blocks, 2 needed + the watermark
    s.abort(0)
    s.abort(1)
    assert s.blocks.num_used_blocks == 4
    out, _ = step(s)  # the two left grow into a third block each; 4 free: late's 2 and the watermark
    assert s.by_id["late"].status is SequenceStatus.RUNNING and s.blocks.num_used_blocks == 8


def test_preemption_frees_the_newest_and_resumes_it_from_its_tokens():
    s = make(kv_tokens=16, max_num_seqs=4, max_batch_tokens=32)  # 4 blocks of 4
    s.add(seq("old", n_prompt=3, max_new_tokens=8))
    s.add(seq("new", n_prompt=3, max_new_tokens=8))
    step(s)  # both prompts: one block each
    for _ in range(6):  # both grow into their second block (all four taken), then old needs a third
        out, _ = step(s)
    assert out.num_preempted == 1 and s.num_preemptions == 1
    new = s.by_id["new"]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table is None
    assert s.waiting[0] is new and new.num_preemptions == 1
    outputs_when_preempted = list(new.output_ids)
    while s.by_id.get("old"):
        step(s)
    out, _ = step(s)  # new is readmitted: its prompt and outputs so far are computed again
    (item,) = out.scheduled
    assert item.seq is new and item.num_new_tokens == 3 + len(outputs_when_preempted) and item.completes_prompt
    assert new.output_ids[:len(outputs_when_preempted)] == outputs_when_preempted


def test_a_lone_sequence_that_outgrows_the_cache_is_refused_at_once():
    with pytest.raises(ValueError, match="KV-cache tokens"):
        make(kv_tokens=16).add(seq("big", n_prompt=3, max_new_tokens=14))
    with pytest.raises(ValueError, match="KV-cache tokens"):  # its prompt could never be admitted
        make(kv_tokens=16, watermark_blocks=1).add(seq("big", n_prompt=13, max_new_tokens=1))
    make(kv_tokens=16, watermark_blocks=1).add(seq("fits", n_prompt=3, max_new_tokens=13))


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
    assert not s.has_work and s.blocks.num_used_blocks == 0 and not s.by_id


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


def test_prefix_cache_serves_whole_blocks_of_running_and_finished_sequences():
    s = make(max_num_seqs=8, max_batch_tokens=32, max_cached_prompt=20)
    system = [50, 51, 52, 53, 54, 55]
    s.add(Sequence("a", system + [60, 61], SamplingParams(max_new_tokens=5)))
    out, _ = step(s, token=90)
    assert out.num_cached_tokens == 0  # nothing ran before it
    s.add(Sequence("b", system + [70], SamplingParams(max_new_tokens=5)))  # shares a's first block
    s.add(Sequence("c", system + [60, 61, 90, 91], SamplingParams(max_new_tokens=5)))  # a's 2 full blocks
    s.add(Sequence("d", system + [60, 61], SamplingParams(max_new_tokens=5)))  # a's very prompt
    s.add(Sequence("e", [99] + system, SamplingParams(max_new_tokens=5)))  # differs at the first token
    out, _ = step(s, token=90)
    a, b, c, d, e = (s.by_id[x].block_table.block_ids for x in "abcde")
    assert b[0] == c[0] == d[0] == a[0] and c[1] == a[1]  # whole blocks by reference
    assert d[1] != a[1]  # a whole prompt is never taken: its last token is computed for the logits
    assert e[0] not in a
    # Past the whole blocks, what a running sequence computed is copied into the new one's block.
    slot = lambda table, p: table[p // 4] * 4 + p % 4  # noqa: E731
    assert [(c_.src_slots, c_.dst_slots) for c_ in out.copies] == [
        ([slot(a, 4), slot(a, 5)], [slot(b, 4), slot(b, 5)]),  # b: the rest of the system tokens
        ([slot(a, 4), slot(a, 5), slot(a, 6)], [slot(d, 4), slot(d, 5), slot(d, 6)]),  # d: all but its last
    ]
    assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [
        ("a", 1), ("b", 1), ("c", 2), ("d", 1), ("e", 7)]
    assert out.num_cached_tokens == 6 + 8 + 7
    # Once a and the others end, their full blocks stay cached for a later request.
    for x in "abcde":
        s.abort(x)
    assert s.blocks.num_used_blocks == 0 and s.blocks.num_cached_blocks >= 3
    s.add(Sequence("f", system + [60, 61, 90, 91, 5], SamplingParams(max_new_tokens=5)))
    out, _ = step(s)
    assert out.num_cached_tokens == 8 and out.scheduled[0].num_new_tokens == 3


def test_prefix_caching_is_off_by_default_and_bounded_by_prompt_length():
    for max_cached, prompt_len in ((0, 9), (5, 9)):
        s = make(max_batch_tokens=32, max_cached_prompt=max_cached)
        s.add(seq("a", n_prompt=prompt_len, max_new_tokens=5))
        step(s)
        s.add(seq("b", n_prompt=prompt_len, max_new_tokens=5))
        out, _ = step(s)
        assert out.num_cached_tokens == 0 and not s.blocks.by_hash and not out.copies
        assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", prompt_len)]
