"""The scheduler alone: hand-made sampled tokens, no tensors (as vLLM's tests/v1/core)."""

from dataclasses import replace

import pytest

from model_svc.engine.block_manager import BlockManager
from model_svc.engine.schedule_types import DeadlineUnmeetable, ItemKind, SchedulerConfig, SchedulerFull
from model_svc.engine.scheduler import Scheduler
from model_svc.engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus
from model_svc.engine.step_cost import StepCost

EOS = 2
COST = (0.010, 0.001, 0.0)  # the step-time model the tests schedule by: 10 ms a step + 1 ms a token


def make(max_num_seqs=4, max_batch_tokens=16, kv_tokens=1000, max_waiting=10, max_context=100, block_size=4,
         watermark_blocks=0, max_cached_prompt=0, tenant_slowdown=2.0):
    blocks = BlockManager(kv_tokens // block_size, block_size, watermark_blocks=watermark_blocks)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens, max_waiting=max_waiting,
                             max_cached_prompt=max_cached_prompt, tenant_slowdown=tenant_slowdown)
    return Scheduler(blocks, config, max_context, [EOS], cost=StepCost(COST))


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


def test_a_burst_fills_an_idle_step_then_spreads_beside_decodes_and_short_prompts_are_never_split():
    s = make(max_num_seqs=8, max_batch_tokens=64)
    s.config = replace(s.config, max_prefill_tokens=8)
    s.config = replace(s.config, idle_step_seconds=0.0095)  # 9 tokens at 1 ms a token (beyond the 10 ms any step costs)
    for i in range(5):
        s.add(seq(i, n_prompt=3, max_new_tokens=5))
    out, _ = step(s)
    # Nothing decodes: the prompts whose work fits the idle step; the fourth would pass it.
    assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [(0, 3), (1, 3), (2, 3)]
    out, _ = step(s)
    # Beside decoding sequences, max_prefill_tokens (8) a step: 3 + 3 fit; a fifth prompt would be
    # split, so it waits for the next step.
    assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [(0, 1), (1, 1), (2, 1), (3, 3), (4, 3)]
    s.add(seq("long", n_prompt=40, max_new_tokens=5))
    out, _ = step(s)
    assert out.scheduled[-1].seq.seq_id == "long" and out.scheduled[-1].num_new_tokens < 40  # longer: chunked


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


def test_long_prompts_share_their_prompt_blocks_among_themselves_only():
    """Prompts over max_cached_prompt attend through another kernel: they share blocks with each
    other (cached ones, and a running one's partial block), never with shorter prompts, and never
    the blocks of their decoded tokens."""
    s = make(max_num_seqs=8, max_batch_tokens=64, max_cached_prompt=10, block_size=4)
    s.config = replace(s.config, cache_long_prompts=True)
    prompt = list(range(100, 130))  # 30 tokens: long
    s.add(Sequence("a", prompt, SamplingParams(max_new_tokens=20, ignore_eos=True)))
    for _ in range(10):
        step(s)
    a = s.by_id["a"]
    assert a.num_computed_tokens == 39 and a.block_table.num_hashed_blocks == 7  # 28 prompt tokens, not 36
    s.add(Sequence("b", prompt + [1, 2, 3], SamplingParams(max_new_tokens=2)))
    out, _ = step(s)
    assert out.num_cached_tokens == 30 and ("b", 3) in ids_of(out)  # 7 cached blocks, 2 copied from a
    s.add(Sequence("c", prompt[:8], SamplingParams(max_new_tokens=2)))  # short: its own numbers
    out, _ = step(s)
    assert out.num_cached_tokens == 0 and ("c", 8) in ids_of(out)
    s.add(Sequence("d", a.token_ids()[:36], SamplingParams(max_new_tokens=2)))  # a's prompt and 6 outputs
    out, _ = step(s)
    assert out.num_cached_tokens == 30 and ("d", 6) in ids_of(out)


def ids_of(out):
    return [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled]


def test_a_long_prefill_never_holds_the_door():
    s = make(max_num_seqs=8, max_batch_tokens=512, kv_tokens=4000, max_context=1000)
    s.config = replace(s.config, max_prefill_tokens=16)
    s.config = replace(s.config, idle_step_seconds=0.1)  # ~100 tokens a step when nothing else runs
    s.add(seq("long", n_prompt=600, max_new_tokens=2))
    out, _ = step(s)
    assert ids_of(out) == [("long", 100)]  # alone: a chunk that fills the idle step
    s.add(seq("short", n_prompt=5, max_new_tokens=3))
    out, _ = step(s)
    # The short prompt is admitted at once, and the long one's chunk shrinks to keep the step short:
    # up to prefill_slowdown (2x) the short prompt's step, 10 + 5 ms -> 15 ms more: 15 tokens.
    assert ids_of(out) == [("short", 5), ("long", 15)]
    out, _ = step(s)
    # Beside one decoding stream (a 11 ms step) the chunk adds at most as much again: 11 tokens.
    assert ids_of(out) == [("short", 1), ("long", 11)]


def test_chunks_keep_a_minimum_pace_and_grow_back_when_alone():
    s = make(max_num_seqs=8, max_batch_tokens=512, kv_tokens=4000, max_context=1000)
    s.cost = StepCost((0.010, 0.001, 1e-5))  # attention dear: a chunk at a long context costs more
    s.config = replace(s.config, idle_step_seconds=0.05)
    s.add(seq("long", n_prompt=900, max_new_tokens=1))
    sizes = []
    s.add(seq("short", n_prompt=3, max_new_tokens=30))
    while s.by_id.get("long"):
        out, _ = step(s)
        sizes.append(dict(ids_of(out)).get("long"))
        if s.by_id.get("short") and len(sizes) == 3:
            s.abort("short")
    assert sizes[1] == sizes[2] and 4 <= sizes[1] < sizes[0]  # beside the stream: small, but on
    assert sizes[3] > sizes[2]  # alone again: large chunks
    assert sizes[-2] < sizes[3]  # at a longer context the same time buys fewer tokens


def test_fair_shares_admit_round_robin_between_tenants():
    s = make(max_num_seqs=4, max_batch_tokens=64)
    for i in range(6):
        s.add(Sequence(f"a{i}", [10, 11, 12], SamplingParams(max_new_tokens=50), tenant="A"))
    s.add(Sequence("b0", [10, 11, 12], SamplingParams(max_new_tokens=50), tenant="B"))
    s.add(Sequence("b1", [10, 11, 12], SamplingParams(max_new_tokens=50), tenant="B"))
    out, _ = step(s)
    assert [i.seq.seq_id for i in out.scheduled] == ["a0", "b0", "a1", "b1"]  # though A came first
    assert s.running_by_tenant == {"A": 2, "B": 2}


def test_a_tenant_over_its_share_gives_way_once_and_nobody_trades_places():
    s = make(max_num_seqs=4, max_batch_tokens=64)
    for i in range(6):
        s.add(Sequence(f"a{i}", [10, 11, 12], SamplingParams(max_new_tokens=50), tenant="A"))
    step(s)
    assert s.running_by_tenant["A"] == 4
    s.add(Sequence("b", [10, 11, 12], SamplingParams(max_new_tokens=3), tenant="B"))
    out, _ = step(s)
    # b is admitted at once; A's most recently admitted sequence is paused for it.
    assert ("b", 3) in ids_of(out) and out.num_preempted == 1 and s.by_id["a3"].status is SequenceStatus.WAITING
    finished = []
    for _ in range(2):  # while b runs, A (3 running) does not take its slot back, nor b A's
        out, done = step(s)
        finished += done
        assert out.num_preempted == 0 and s.running_by_tenant["A"] == 3
    assert [f.seq_id for f in finished] == ["b"] and s.running_by_tenant == {"A": 3}
    resumed = 3 + len(s.by_id["a3"].output_ids)  # its prompt and what it had generated
    out, _ = step(s)
    assert ("a3", resumed) in ids_of(out)  # b's slot back to A, a3 first


def flooded(tenant_slowdown=2.0, num_a=32):
    """Tenant A running `num_a` decoding sequences, nobody else; slots to spare."""
    s = make(max_num_seqs=num_a + 8, max_batch_tokens=128, kv_tokens=8000, max_waiting=100, max_context=400,
             tenant_slowdown=tenant_slowdown)
    for i in range(num_a):
        s.add(Sequence(f"a{i}", [10, 11, 12], SamplingParams(max_new_tokens=300), tenant="A"))
    while any(seq.num_uncomputed_tokens > 1 for seq in s.running) or s.waiting:
        step(s)
    return s


def test_fair_steps_cap_a_flooding_tenant_while_a_light_one_runs():
    """A alone has every step; beside B's one sequence, A's rows are capped so that the step takes at
    most tenant_slowdown (2x) what B's row would alone (cost model: 10 ms + 1 ms a token): B's
    prompt step 2 x (10 + 3) ms -> 13 of A's; its decode steps 2 x 11 ms -> 11."""
    s = flooded()
    out, _ = step(s)
    assert len(out.scheduled) == 32 and out.num_capped == 0  # a lone tenant is never capped
    s.add(Sequence("b", [10, 11, 12], SamplingParams(max_new_tokens=4), tenant="B"))
    counts_before = {seq.seq_id: len(seq.output_ids) for seq in s.running}
    sizes = []
    while "b" in s.by_id:
        out, _ = step(s)
        tenants = [item.seq.tenant for item in out.scheduled]
        sizes.append((tenants.count("A"), tenants.count("B"), out.num_capped))
        assert s.cost.seconds(out.num_batched_tokens, out.num_pairs) <= 2 * s.cost.seconds(
            3 if len(sizes) == 1 else 1, 0) + 1e-9
    assert sizes == [(13, 1, 19), (11, 1, 21), (11, 1, 21), (11, 1, 21)]
    # The least recently stepped go first: A's streams advanced by 1 or 2 tokens in those 4 steps, none 0.
    advanced = [len(seq.output_ids) - counts_before[seq.seq_id] for seq in s.running]
    assert sorted(set(advanced)) == [1, 2] and sum(advanced) == 13 + 11 * 3
    out, _ = step(s)
    assert len(out.scheduled) == 32 and out.num_capped == 0  # B is gone: all of A again


CONCAVE = {1: 0.019, 2: 0.019, 4: 0.026, 8: 0.040, 16: 0.067, 32: 0.100, 33: 0.101}  # an EPYC 7002's rows


def test_fair_steps_size_small_steps_by_measured_steps_not_the_line():
    """On a CPU whose step cost is concave in its rows, the line fitted on the flood's big steps
    puts B's lone row far above its measured 19 ms; fair steps read the measured sizes: B's row
    alone 19 ms, so A gets the rows that keep the step within 38 ms: 1 + 3 tokens, measured at
    26 ms (5 to 7 tokens were not measured: read on the light tenant's safe side, the line's
    44-48 ms, not the chord's 29-37; the line alone would allow none beyond the floor of 1)."""
    s = flooded()
    for _ in range(20):
        for tokens, seconds in CONCAVE.items():
            s.cost.observe(tokens, 0, seconds)
    for _ in range(150):  # then the flood alone, its sequences ending and new ones coming
        for tokens in (16, 32):
            s.cost.observe(tokens, 0, CONCAVE[tokens])
    assert s.cost.seconds(1, 0) > 1.3 * CONCAVE[1] and s.cost.measured(1, 0) == pytest.approx(CONCAVE[1])
    s.add(Sequence("b", [10, 11, 12], SamplingParams(max_new_tokens=4), tenant="B"))
    step(s)  # B's prompt
    assert s.policy.tenant_cap() == 3
    out, _ = step(s)
    assert [item.seq.tenant for item in out.scheduled].count("A") == 3


def test_step_cost_measured_reads_recent_steps_by_size():
    """measured: the recent steps of a size, their lower median (the model's attention part added
    for pairs); a size
    not measured: the line, or the larger / smaller of the line and the chord between measured
    sizes; the line beyond them or once they are MEASURED_STEPS old."""
    from model_svc.engine.step_cost import MEASURED_STEPS
    cost = StepCost()
    for _ in range(5):
        for tokens, seconds in CONCAVE.items():
            cost.observe(tokens, 0, seconds)
    assert cost.measured(16, 0) == pytest.approx(0.067)
    chord, line = (0.067 + 0.100) / 2, cost.seconds(24, 0)
    assert cost.measured(24, 0) == line and chord != pytest.approx(line)
    assert cost.measured(24, 0, "high") == pytest.approx(max(chord, line))
    assert cost.measured(24, 0, "low") == pytest.approx(min(chord, line))
    assert cost.measured(64, 0, "low") == cost.seconds(64, 0)  # nothing measured above it
    assert cost.measured(4, 1000) == pytest.approx(0.026 + cost.coef[2] * 1000)
    cost.observe(3, 0, 0.329)  # a first step's warm-up, then the size's real cost: the slow one does not count
    cost.observe(3, 0, 0.020)
    assert cost.measured(3, 0) == pytest.approx(0.020)
    cost.observe(3, 0, 0.021)
    assert cost.measured(3, 0) == pytest.approx(0.021)
    for _ in range(MEASURED_STEPS):
        cost.observe(32, 0, 0.100)
    assert cost.measured(4, 0) == cost.seconds(4, 0)  # the small sizes are stale: the line
    assert cost.measured(32, 0) == pytest.approx(0.100)


def test_fair_steps_skip_a_tenants_least_urgent_sequences_first():
    s = flooded()
    s.by_id["a7"].priority = 5  # one urgent sequence among A's 32 (as if admitted so)
    s.add(Sequence("b", [10, 11, 12], SamplingParams(max_new_tokens=4), tenant="B"))
    for _ in range(4):
        out, _ = step(s)
        assert out.num_capped > 0 and "a7" in [item.seq.seq_id for item in out.scheduled]


def test_fair_steps_off_and_equal_tenants_are_never_capped():
    s = flooded(tenant_slowdown=0)
    s.add(Sequence("b", [10, 11, 12], SamplingParams(max_new_tokens=4), tenant="B"))
    out, _ = step(s)
    assert len(out.scheduled) == 33 and out.num_capped == 0
    # Sixteen tenants of two sequences each: equal loads, full steps.
    s = make(max_num_seqs=32, max_batch_tokens=128, kv_tokens=8000, max_waiting=100, max_context=400)
    for i in range(32):
        s.add(Sequence(i, [10, 11, 12], SamplingParams(max_new_tokens=300), tenant=f"t{i % 16}"))
    for _ in range(3):
        out, _ = step(s)
    assert len(out.scheduled) == 32 and out.num_capped == 0
    with pytest.raises(ValueError, match="--tenant-slowdown=0.5"):
        make(tenant_slowdown=0.5)


def test_a_new_tenant_stops_a_step_longer_than_fair_steps_allow():
    """Policy.caps, asked by Engine.interrupt_for while a step runs: a 32-sequence step of A (42 ms
    by the cost model) for B's 3-token prompt (reference: B's prompt alone, 13 ms)."""
    from collections import Counter
    s = make()
    b = Sequence("b", [10, 11, 12], SamplingParams(), tenant="B")
    a = Sequence("a", [10, 11, 12], SamplingParams(), tenant="A")
    assert s.policy.caps([b], Counter({"A": 32}), s.cost.seconds(32, 0))
    assert not s.policy.caps([b], Counter({"A": 8}), s.cost.seconds(8, 0))  # 18 ms <= 2 x 13 ms
    assert s.policy.caps([b], Counter({"A": 17}), s.cost.seconds(17, 0))  # 27 ms > 2 x 13 ms
    assert not s.policy.caps([a], Counter({"A": 32}), s.cost.seconds(32, 0))  # A's own: no
    assert not s.policy.caps([b], Counter({"A": 32, "B": 1}), s.cost.seconds(33, 0))  # B is in the step already
    assert not make(tenant_slowdown=0).policy.caps([b], Counter({"A": 32}), s.cost.seconds(32, 0))


def test_priority_goes_first_and_preempts_the_least_urgent():
    s = make(max_num_seqs=3, max_batch_tokens=64)
    s.add(Sequence("low", [10, 11], SamplingParams(max_new_tokens=50), priority=-5))
    s.add(Sequence("mid0", [10, 11], SamplingParams(max_new_tokens=50)))
    s.add(Sequence("mid1", [10, 11], SamplingParams(max_new_tokens=50)))
    step(s)
    s.add(Sequence("later", [10, 11], SamplingParams(max_new_tokens=50)))
    s.add(Sequence("urgent", [10, 11], SamplingParams(max_new_tokens=50), priority=9))
    out, _ = step(s)
    # urgent arrived last but goes first, and takes the slot of the least urgent running sequence
    # (though older); "later" is as urgent as those left and waits, preempting nobody.
    assert ("urgent", 2) in ids_of(out) and s.by_id["low"].status is SequenceStatus.WAITING
    assert s.by_id["later"].status is SequenceStatus.WAITING and out.num_preempted == 1
    s.abort("mid0")
    out, _ = step(s)
    assert ("later", 2) in ids_of(out)  # a free slot: "later" outranks "low" by priority


def test_a_request_more_urgent_than_all_running_gets_a_step_of_its_own():
    s = make(max_num_seqs=7, max_batch_tokens=64)
    for i in range(3):
        s.add(Sequence(i, [10, 11], SamplingParams(max_new_tokens=50)))
    step(s)
    s.add(Sequence("same", [10, 11], SamplingParams(max_new_tokens=50)))
    out, _ = step(s)  # as urgent as those running: beside their decodes
    assert ids_of(out) == [(0, 1), (1, 1), (2, 1), ("same", 2)]
    s.add(Sequence("five", [10, 11, 12], SamplingParams(max_new_tokens=50), priority=5))
    s.add(Sequence("nine", [10, 11], SamplingParams(max_new_tokens=50), priority=9))
    s.add(Sequence("zero", [10, 11], SamplingParams(max_new_tokens=50)))
    assert s.policy.urgent_priority() == 1  # more urgent than the running (all 0)
    out, _ = step(s)  # only the prompts more urgent than every running sequence, most urgent first
    assert ids_of(out) == [("nine", 2), ("five", 3)]
    assert s.policy.urgent_priority() is None
    out, _ = step(s)  # then everyone decodes again, and the rest is admitted
    assert ids_of(out) == [(0, 1), (1, 1), (2, 1), ("same", 1), ("nine", 1), ("five", 1), ("zero", 2)]


def test_an_urgent_client_running_already_still_gets_urgent_steps():
    """Its previous request (as urgent) still decodes: a new one is as urgent as every running
    sequence and more urgent than some, so it too gets a step of its own; one as urgent as the
    least urgent does not."""
    s = make(max_num_seqs=8, max_batch_tokens=64)
    s.add(Sequence("bulk", [10, 11], SamplingParams(max_new_tokens=50)))
    s.add(Sequence("first", [10, 11], SamplingParams(max_new_tokens=50), priority=10))
    step(s)
    s.add(Sequence("second", [10, 11], SamplingParams(max_new_tokens=50), priority=10))
    out, _ = step(s)
    assert ids_of(out) == [("second", 2)]
    assert s.policy.outranks_step([Sequence("third", [1], SamplingParams(), priority=10)], [0, 10])
    assert not s.policy.outranks_step([Sequence("third", [1], SamplingParams(), priority=10)], [10])
    assert not s.policy.outranks_step([Sequence("low", [1], SamplingParams(), priority=3)], [0, 10])
    s.add(Sequence("more bulk", [10, 11], SamplingParams(max_new_tokens=50)))
    out, _ = step(s)
    assert ids_of(out) == [("first", 1), ("bulk", 1), ("second", 1), ("more bulk", 2)]


def test_an_urgent_step_that_admits_nothing_is_an_ordinary_one():
    s = make(max_num_seqs=2, max_batch_tokens=64, max_context=200)
    s.add(Sequence(0, [10, 11], SamplingParams(max_new_tokens=50)))
    step(s)
    s.config = replace(s.config, max_batch_tokens=40)  # the urgent prompt (45 tokens, never split) cannot fit this step
    s.config = replace(s.config, max_prefill_tokens=64)
    s.add(Sequence("urgent", list(range(10, 55)), SamplingParams(max_new_tokens=5), priority=3))
    out, _ = step(s)
    assert ids_of(out) == [(0, 1)]  # the running sequence still advances: no empty steps


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once():
    s = make(max_num_seqs=2, max_batch_tokens=64)
    for i in range(2):  # both slots held by sequences that must run 40 more tokens
        s.add(Sequence(i, [10, 11, 12], SamplingParams(max_new_tokens=40, ignore_eos=True)))
    step(s)
    now = 1000.0
    with pytest.raises(DeadlineUnmeetable, match="retry later"):  # ~40 steps of ~12 ms: ~0.5 s
        s.add(Sequence("hurried", [10, 11], SamplingParams(max_new_tokens=5), deadline=now + 0.2), now=now)
    s.add(Sequence("patient", [10, 11], SamplingParams(max_new_tokens=5), deadline=now + 2.0), now=now)
    assert "hurried" not in s.by_id and s.by_id["patient"].status is SequenceStatus.WAITING
    # A sequence that may stop at EOS any step could free its slot at once: no refusal for it.
    t = make(max_num_seqs=1, max_batch_tokens=64)
    t.add(Sequence(0, [10, 11, 12], SamplingParams(max_new_tokens=40)))
    step(t)
    t.add(Sequence("hurried", [10, 11], SamplingParams(max_new_tokens=5), deadline=now + 0.2), now=now)


def test_step_cost_learns_the_machine():
    truth = (0.004, 0.0004, 2e-6)
    cost = StepCost()  # the prior is this CPU's, about 3x slower than "truth"
    import random
    rng = random.Random(1)
    for _ in range(300):
        tokens = rng.choice([1, 4, 16, 64, 300])
        pairs = tokens * rng.randrange(1, 3000)
        cost.observe(tokens, pairs, truth[0] + truth[1] * tokens + truth[2] * pairs)
    for tokens, pairs in ((1, 100), (64, 64 * 2000), (300, 300 * 500)):
        want = truth[0] + truth[1] * tokens + truth[2] * pairs
        assert abs(cost.seconds(tokens, pairs) - want) < 0.05 * want
    start, budget = 1000, 0.05
    n = cost.chunk_for(budget, start, 10_000)
    from model_svc.engine.step_cost import chunk_pairs
    assert cost.marginal(n, chunk_pairs(start, n)) <= budget < cost.marginal(n + 1, chunk_pairs(start, n + 1))


def test_a_one_token_prompt_counts_as_a_short_prompt_when_chunks_are_sized():
    s = make(max_num_seqs=8, max_batch_tokens=512, kv_tokens=4000, max_context=1000, max_cached_prompt=20)
    s.config = replace(s.config, max_prefill_tokens=16)
    prompt = list(range(10, 19))  # 9 tokens: two full blocks of 4 are cached once it has run
    s.add(Sequence("a", prompt, SamplingParams(max_new_tokens=1)))
    step(s)
    assert not s.has_work
    s.add(Sequence("again", prompt, SamplingParams(max_new_tokens=1)))  # all but its last token cached
    s.add(seq("long", n_prompt=600, max_new_tokens=1))
    out, _ = step(s)
    # "again" computes 1 token (10 + 1 ms); the long chunk may add as much again: 11 tokens.
    assert ids_of(out) == [("again", 1), ("long", 11)]
    assert (out.num_short_tokens, out.num_long_tokens, out.num_batched_tokens) == (1, 11, 12)


def test_a_prompt_being_computed_is_shared_not_computed_again():
    """The samples of one prompt (and a burst with a long common prefix) arrive together: the first
    computes the prompt, the others wait a step and take its blocks, computing only their last token."""
    s = make(max_num_seqs=8, max_batch_tokens=64, max_cached_prompt=20)
    prompt = list(range(10, 22))  # 12 tokens: 3 blocks
    for i in range(3):
        s.add(Sequence(f"sample{i}", list(prompt), SamplingParams(max_new_tokens=5, do_sample=True, seed=i)))
    s.add(Sequence("other", [99] + prompt[1:], SamplingParams(max_new_tokens=5)))  # shares nothing
    out, _ = step(s)
    assert ids_of(out) == [("sample0", 12), ("other", 12)]
    out, _ = step(s)
    assert ids_of(out) == [("sample0", 1), ("other", 1), ("sample1", 1), ("sample2", 1)]
    assert out.num_cached_tokens == 2 * 11  # each took 11 of the 12 prompt tokens from sample0
    # A sequence sharing only what is cached already is not held back.
    s.add(Sequence("late", prompt[:8] + [77, 78], SamplingParams(max_new_tokens=5)))
    out, _ = step(s)
    assert ("late", 2) in ids_of(out)


def test_a_stopped_step_readmits_its_short_prompts_whole():
    """A step stopped before it computed anything (Engine: StepInterrupted) is rewound: a prompt it
    admitted whole waits again and is admitted whole again, never taken up as a long prompt's chunk."""
    s = make(max_num_seqs=8, max_batch_tokens=64)
    s.config = replace(s.config, max_prefill_tokens=8)
    s.config = replace(s.config, idle_step_seconds=0.0035)  # a long prompt's chunk is 3-4 tokens
    s.add(seq("short", n_prompt=6, max_new_tokens=5))
    out = s.schedule()
    assert [(i.seq.seq_id, i.num_new_tokens, i.kind) for i in out.scheduled] == [("short", 6, ItemKind.SHORT)]
    s.rewind(out)  # nothing was computed
    assert s.by_id["short"].status is SequenceStatus.WAITING and s.blocks.num_used_blocks == 0
    out, _ = step(s)
    assert [(i.seq.seq_id, i.num_new_tokens, i.kind) for i in out.scheduled] == [("short", 6, ItemKind.SHORT)]


def test_failures_end_sequences_wherever_they_are():
    s = make()
    for name in "abc":
        s.add(seq(name, max_new_tokens=5))
    out, _ = step(s)
    s.add(seq("late", max_new_tokens=5))
    assert [x.seq_id for x in s.fail([s.by_id["b"], s.by_id["late"]])] == ["b", "late"]
    assert s.num_waiting == 0 and [x.seq_id for x in s.running] == ["a", "c"]
    s.add(seq("waiting", max_new_tokens=5))
    failed = s.fail_all()
    assert sorted(x.seq_id for x in failed) == ["a", "c", "waiting"]
    assert all(x.finish_reason is FinishReason.ERROR for x in failed)
    assert not s.has_work and not s.by_id and s.blocks.num_used_blocks == 0


def start_search(s, leader_id="L", tenant="", n_prompt=6, beams=4):
    """A beam search's leader through its prompt, then its beams (as the engine's first search step)."""
    from model_svc.engine.beam import BeamGroup

    leader = Sequence(leader_id, list(range(10, 10 + n_prompt)), SamplingParams(max_new_tokens=20, num_beams=beams),
                      tenant=tenant)
    leader.group = BeamGroup(leader)
    s.add(leader)
    out = s.schedule()
    s.update(out, {})  # the engine samples no token for it: the search does
    copies = s.fork_beams(leader.group, [0] * beams, list(range(100, 100 + beams)))
    return leader, copies


def test_beams_share_full_blocks_and_copy_partial_ones():
    s = make(block_size=4, max_batch_tokens=64)
    leader, copies = start_search(s, n_prompt=6)  # a full block and a half
    beams = leader.group.beams
    assert [b.tokens[-1] for b in beams] == [100, 101, 102, 103] and all(b.num_computed_tokens == 6 for b in beams)
    full = beams[0].block_table.block_ids[0]
    assert all(b.block_table.block_ids[0] == full for b in beams) and s.blocks.blocks[full].ref_count == 4
    partials = {b.block_table.block_ids[1] for b in beams}
    assert len(partials) == 4 and len(copies) == 3  # the first beam took the leader's; three copies
    assert all(c.src_slots == beams[0].block_table.slots(4, 6, 4) for c in copies)
    assert leader.block_table.block_ids == [] and s.blocks.num_used_blocks == 5
    out = s.schedule()  # the beams advance together
    assert sorted(i.seq.seq_id for i in out.scheduled) == [("L", "beam", i) for i in range(4)]
    s.update(out, {})
    # Beam 0 continued twice, beam 2 once: beams 1 and 3 give their blocks back first.
    copies = s.fork_beams(leader.group, [0, 0, 2, 0], [5, 6, 7, 8])
    assert [b.tokens[6:] for b in beams] == [[100, 5], [100, 6], [102, 7], [100, 8]]
    assert len(copies) == 2 and s.blocks.num_used_blocks == 5
    s.finish(leader, FinishReason.LENGTH)
    assert s.blocks.num_used_blocks == 0 and not s.has_work


def test_a_beam_search_counts_its_beams_for_fair_steps_and_goes_whole():
    s = make(block_size=4, max_batch_tokens=64, max_num_seqs=8)
    leader, _ = start_search(s, tenant="beams", beams=4)
    s.add(Sequence("x", [10, 11, 12], SamplingParams(max_new_tokens=9), tenant="other"))
    assert len(s.policy.tenant_rows()["beams"]) == 4
    for _ in range(4):
        out = s.schedule()
        ids = [i.seq.seq_id for i in out.scheduled]
        beams = [i for i in ids if isinstance(i, tuple)]
        assert len(beams) in (0, 4)  # all of a search's beams or none
        s.update(out, {item.seq.seq_id: 7 for item in out.scheduled if item.seq.group is None
                       and item.completes_prompt})
        if beams:
            s.fork_beams(leader.group, [0, 1, 2, 3], [7, 7, 7, 7])
    assert s.running_by_tenant == {"beams": 1, "other": 1}  # the search is one request
