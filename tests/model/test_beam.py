"""Beam search in the engine with the real model: generate()'s sequences and scores with
--match-generate; on the default path the same results alone, beside other traffic and after a
preemption; its members and its blocks."""

import pytest
import torch

from model_svc.engine.sequence import FinishReason, SamplingParams, Sequence
from tests.model.test_engine import PROMPTS, make_engine


def beam_group(ids, leader="L", priority=0, **params):
    """A leader and its members (returned sequences 1 ..), as the model service makes them."""
    p = SamplingParams(**params)
    return [Sequence(leader, ids, p, priority=priority)] + [Sequence((leader, r), ids, p, beam_of=leader, beam_rank=r)
                                         for r in range(1, p.num_return_sequences)]


def drive(engine, seqs, later=(), after_steps=3):
    """Runs until done; `later` joins after `after_steps` steps. Returns {id: (tokens, score, reason)}."""
    got = {}
    for s in seqs:
        engine.add(s)
    steps = 0
    while engine.scheduler.has_work or later:
        steps += 1
        if steps == after_steps:
            for s in later:
                engine.add(s)
            later = ()
        for out in engine.step():
            tokens, score, reason = got.get(out.seq_id, ([], None, None))
            if out.token_id is not None:
                tokens.append(out.token_id)
            got[out.seq_id] = (tokens, out.score if out.score is not None else score, out.finish_reason or reason)
    return got


def generate_beams(loaded, tokenizer, ids, max_new_tokens, **kwargs):
    """generate()'s returned sequences (each cut to its own length) and their scores."""
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                                    return_dict_in_generate=True, tokenizer=tokenizer, **kwargs)
    lengths = ((out.beam_indices + 1).bool()).sum(dim=1).tolist()  # generated tokens of each, padding aside
    return ([row[len(ids):len(ids) + n].tolist() for row, n in zip(out.sequences, lengths)],
            out.sequences_scores.tolist())


@pytest.fixture(scope="module")
def matching(reference_model):
    return make_engine(reference_model, match_generate=True)


CASES = [  # (prompt, returned, settings): each length_penalty / early_stopping kind, a stop string, processors
    (0, 4, dict(length_penalty=0.0, stop_strings=(" capital",))),
    (1, 1, dict(length_penalty=0.5, early_stopping=True, repetition_penalty=1.3, no_repeat_ngram_size=3,
                min_new_tokens=5, bad_words_ids=((13,),))),
    (2, 2, dict(length_penalty=2.0, early_stopping="never")),
]


@pytest.mark.parametrize("prompt,returned,settings", CASES)
def test_match_generate_gives_generates_sequences_and_scores(matching, reference_model, hf_tokenizer, prompt,
                                                             returned, settings):
    ids = hf_tokenizer(PROMPTS[prompt]).input_ids
    got = drive(matching, beam_group(ids, max_new_tokens=16, num_beams=4, num_return_sequences=returned, **settings))
    reference = dict(settings)
    if "stop_strings" in reference:
        reference["stop_strings"] = list(reference["stop_strings"])
    if "bad_words_ids" in reference:
        reference["bad_words_ids"] = [list(w) for w in reference["bad_words_ids"]]
    sequences, scores = generate_beams(reference_model, hf_tokenizer, ids, 16, num_beams=4,
                                       num_return_sequences=returned, **reference)
    ours = [got["L"]] + [got[("L", r)] for r in range(1, returned)]
    assert [tokens for tokens, _, _ in ours] == sequences
    assert [score for _, score, _ in ours] == scores  # float32, to the bit
    for tokens, _, reason in ours:
        assert reason is (FinishReason.EOS_TOKEN if tokens[-1] in matching.scheduler.eos_token_ids
                          else FinishReason.LENGTH)
    assert matching.scheduler.blocks.num_used_blocks == 0 and not matching.groups and not matching.member_of


def test_default_path_same_alone_beside_traffic_and_preempted(reference_model, hf_tokenizer):
    """The default numerics are batch-invariant: a search takes the same path whatever runs beside
    it, and a group preempted for room (so started over) finds the same sequences."""
    ids = [hf_tokenizer(p).input_ids for p in PROMPTS[:2]]
    settings = dict(max_new_tokens=32, min_new_tokens=26, num_beams=4, num_return_sequences=3, length_penalty=0.7)
    alone = [drive(make_engine(reference_model), beam_group(ids[i], **settings)) for i in range(2)]
    assert all(len(a[("L", 2)][0]) > 0 for a in alone)

    engine = make_engine(reference_model)
    crowd = [Sequence(f"g{i}", hf_tokenizer(p).input_ids, SamplingParams(max_new_tokens=30)) for i, p in
             enumerate(PROMPTS)]
    got = drive(engine, crowd[:2] + beam_group(ids[0], **settings),
                later=crowd[2:] + beam_group(ids[1], leader="M", **settings))
    assert {k: v for k, v in got.items() if k == "L" or (isinstance(k, tuple) and k[0] == "L")} == alone[0]
    assert {("L",) + k[1:] if isinstance(k, tuple) else "L": v for k, v in got.items()
            if k == "M" or (isinstance(k, tuple) and k[0] == "M")} == alone[1]

    # An urgent long prompt arrives in a small cache: the least urgent search is preempted (starts over).
    small = make_engine(reference_model, kv_cache_tokens=320)
    urgent = Sequence("U", hf_tokenizer(PROMPTS[1] * 12).input_ids, SamplingParams(max_new_tokens=4), priority=1)
    got = drive(small, beam_group(ids[0], **settings) + beam_group(ids[1], leader="M", priority=-1, **settings),
                later=[urgent], after_steps=8)
    assert small.scheduler.num_preemptions > 0
    assert got["L"] == alone[0]["L"] and got["M"] == alone[1]["L"]
    assert got[("M", 2)] == alone[1][("L", 2)]
    assert small.scheduler.blocks.num_used_blocks == 0


def test_beams_share_their_prompt_blocks(reference_model, hf_tokenizer):
    """While beams run, the prompt's full blocks are held once (by reference), not once a beam."""
    ids = hf_tokenizer(PROMPTS[1] * 4).input_ids  # several full blocks
    engine = make_engine(reference_model)
    blocks = engine.scheduler.blocks
    for s in beam_group(ids, max_new_tokens=8, num_beams=4):
        engine.add(s)
    engine.step()  # the prompt, then the beams start
    group = engine.groups["L"]
    assert len(group.beams) == 4
    full = len(ids) // blocks.block_size
    assert all(b.block_table.block_ids[:full] == group.beams[0].block_table.block_ids[:full] for b in group.beams)
    assert blocks.num_used_blocks == full + 4 * (blocks.blocks_for(len(ids)) - full)
    engine.step()
    assert blocks.num_used_blocks <= blocks.blocks_for(len(ids) + 1) + 3 * 2


def test_abort_ends_the_members_and_frees_the_beams(reference_model, hf_tokenizer):
    engine = make_engine(reference_model)
    ids = hf_tokenizer(PROMPTS[0]).input_ids
    for s in beam_group(ids, max_new_tokens=30, num_beams=3, num_return_sequences=3):
        engine.add(s)
    engine.step()
    engine.step()
    outs = engine.abort("L")
    assert {o.seq_id for o in outs} == {"L", ("L", 1), ("L", 2)}
    assert all(o.finish_reason is FinishReason.CANCELLED for o in outs)
    assert engine.scheduler.blocks.num_used_blocks == 0 and not engine.scheduler.has_work
    assert not engine.groups and not engine.member_of


def test_a_member_needs_its_leader(reference_model, hf_tokenizer):
    engine = make_engine(reference_model)
    ids = hf_tokenizer(PROMPTS[0]).input_ids
    p = SamplingParams(max_new_tokens=8, num_beams=2, num_return_sequences=2)
    with pytest.raises(ValueError, match="leader"):
        engine.add(Sequence(("X", 1), ids, p, beam_of="X", beam_rank=1))
    engine.add(Sequence("X", ids, p))
    with pytest.raises(ValueError, match="beam_rank 2"):
        engine.add(Sequence(("X", 2), ids, p, beam_of="X", beam_rank=2))


@pytest.mark.parametrize("settings,field", [
    (dict(do_sample=True), "do_sample"), (dict(num_return_sequences=3), "num_return_sequences"),
    (dict(logprobs=True), "logprobs"), (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(num_beams=17), "num_beams")])
def test_what_beam_search_refuses(settings, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{"num_beams": 2, **settings})


def test_a_failing_search_fails_alone(reference_model, hf_tokenizer, monkeypatch):
    """A search whose step raises ends ERROR with its members and gives its blocks back; a sequence
    beside it goes on to its end."""
    from model_svc.engine import beam

    engine = make_engine(reference_model)
    ids = hf_tokenizer(PROMPTS[0]).input_ids
    calls = []
    real = beam.BeamSearch.step

    def failing(self, log_probs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return real(self, log_probs)

    monkeypatch.setattr(beam.BeamSearch, "step", failing)
    got = drive(engine, [Sequence("g", ids, SamplingParams(max_new_tokens=12))]
                + beam_group(ids, max_new_tokens=12, num_beams=2, num_return_sequences=2))
    assert got["L"][2] is FinishReason.ERROR and got[("L", 1)][2] is FinishReason.ERROR
    assert got["L"][0] == [] and got["g"][2] is FinishReason.LENGTH and len(got["g"][0]) == 12
    assert engine.scheduler.blocks.num_used_blocks == 0 and not engine.groups and not engine.member_of
