"""LoRA adapters in the engine with the real model: PEFT's very tokens with --match-generate; on the
default path the same tokens and logprobs alone and beside rows of other adapters and of the base
model; cached prompts never shared across adapters."""

import pytest
import torch

from model_svc.engine.sequence import FinishReason, SamplingParams, Sequence
from model_svc.loader import load_model
from tests.helpers import MODEL
from tests.lora_adapters import make_adapter
from tests.model.test_engine import PROMPTS, make_engine


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    return {"a": make_adapter(str(folder / "a"), seed=1),
            "b": make_adapter(str(folder / "b"), seed=2, rank=16, targets=["q_proj", "v_proj", "down_proj"])}


def flags(adapters):
    return [arg for name, path in adapters.items() for arg in ("--lora", f"{name}={path}")]


def run(engine, seqs):
    """{id: (tokens, logprobs, finish reason)}."""
    got = {s.seq_id: ([], [], None) for s in seqs}
    for s in seqs:
        engine.add(s)
    while engine.scheduler.has_work:
        for out in engine.step():
            tokens, logprobs, _ = got[out.seq_id]
            if out.token_id is not None:
                tokens.append(out.token_id)
                logprobs.append(out.logprob)
            got[out.seq_id] = (tokens, logprobs, out.finish_reason)
    return got


def peft_greedy(path, ids, n):
    """generate() on a PeftModel (unmerged) over a fresh 4-bit base (PEFT edits the model it wraps)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(MODEL, "bfloat16", "4bit", "cpu").model, path)
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                             do_sample=False)
    return out[0, len(ids):].tolist()


def test_match_generate_gives_peft_tokens(hf_tokenizer, adapters):
    # the model as --match-generate serves it (the output layer unquantized, as PEFT's base has it; the
    # int8 one of reference_model moved a near-tie of adapter b's on a Xeon with AMX)
    engine = make_engine(load_model(MODEL, "bfloat16", "4bit", "cpu"), match_generate=True, extra=flags(adapters))
    ids = [hf_tokenizer(p).input_ids for p in PROMPTS[:2]]
    base = run(engine, [Sequence("base", ids[0], SamplingParams(max_new_tokens=16))])["base"][0]
    together = run(engine, [Sequence(name, ids[i], SamplingParams(max_new_tokens=16), adapter=name)
                            for i, name in enumerate(adapters)] + [Sequence("base", ids[0], SamplingParams(
                                max_new_tokens=16))])
    for i, (name, path) in enumerate(adapters.items()):
        expected = peft_greedy(path, ids[i], 16)
        assert together[name][0] == expected, name
    assert together["a"][0] != base  # the adapter changes the output
    assert together["base"][0] == base


def test_default_path_is_the_same_alone_and_beside_other_adapters(reference_model, hf_tokenizer, adapters):
    """Tokens and logprobs bit for bit, with prefix caching on: the base model's cached prompt (and
    the other adapter's) is never served to an adapter's sequence."""
    engine = make_engine(reference_model, prefix_caching=True, extra=flags(adapters))
    long_prompt = PROMPTS[1] * 4  # full blocks to cache
    ids = hf_tokenizer(long_prompt).input_ids
    params = SamplingParams(max_new_tokens=12, logprobs=True)
    alone = {name: run(make_engine(reference_model, extra=flags(adapters)),
                       [Sequence(name, ids, params, adapter=name if name != "base" else "")])[name]
             for name in ("a", "b", "base")}
    assert alone["a"][0] != alone["base"][0] and alone["b"][0] != alone["base"][0]
    run(engine, [Sequence("warm", ids, params)])  # the base model's blocks of this prompt, cached
    assert engine.scheduler.blocks.num_cached_blocks > 0
    mixed = run(engine, [Sequence("a", ids, params, adapter="a"), Sequence("base", ids, params),
                         Sequence("b", ids, params, adapter="b"),
                         Sequence("other", hf_tokenizer(PROMPTS[3]).input_ids, params, adapter="a")])
    for name in ("a", "b", "base"):
        assert mixed[name][:2] == alone[name][:2], name
    again = run(engine, [Sequence("a", ids, params, adapter="a")])  # now from a's own cached blocks
    assert again["a"][:2] == alone["a"][:2]


def test_adapter_rows_through_the_native_layer_loop_are_the_python_loops(reference_model, hf_tokenizer, adapters):
    """The native layer loop makes the LoRA kernel's calls itself (layers.py): rows of two adapters
    and of the base model, prompts and decodes, give the Python loop's tokens and logprobs."""
    ids = [hf_tokenizer(p).input_ids for p in PROMPTS]
    params = SamplingParams(max_new_tokens=10, logprobs=True)
    got = {}
    for loop in ("native", "python"):
        engine = make_engine(reference_model, extra=[*flags(adapters), "--layer-loop", loop])
        got[loop] = run(engine, [Sequence(i, ids[i], params, adapter=("a", "b", "", "a")[i]) for i in range(4)])
        assert (engine.runner.num_native_loop_steps >= 5) == (loop == "native")
    assert got["native"] == got["python"]
    assert got["native"][0][0] != got["native"][3][0] or ids[0] == ids[3]


def test_an_unknown_adapter_is_refused(reference_model, adapters):
    engine = make_engine(reference_model, extra=flags(adapters))
    with pytest.raises(ValueError, match="'c' is not loaded"):
        engine.add(Sequence("x", [1, 2, 3], SamplingParams(), adapter="c"))
    assert [a.describe() for a in engine.runner.adapters.by_name.values()] == [
        "a (rank 8, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)",
        "b (rank 16, q_proj, v_proj, down_proj)"]


def test_beam_search_and_speculation_with_an_adapter(reference_model, hf_tokenizer, adapters):
    """A beam search's beams and speculated proposals go through the sequence's adapter."""
    from tests.model.test_beam import beam_group, drive

    engine = make_engine(reference_model, extra=flags(adapters))
    ids = hf_tokenizer(PROMPTS[0]).input_ids
    plain = run(engine, [Sequence("p", ids, SamplingParams(max_new_tokens=16, prompt_lookup_num_tokens=0),
                                  adapter="a")])["p"]
    spec = run(engine, [Sequence("s", ids, SamplingParams(max_new_tokens=16, prompt_lookup_num_tokens=8),
                                 adapter="a")])["s"]
    assert spec[0] == plain[0] and spec[2] in (FinishReason.LENGTH, FinishReason.EOS_TOKEN)
    group = beam_group(ids, max_new_tokens=8, num_beams=2)
    for s in group:
        s.adapter = "a"
    with_adapter = drive(engine, group)
    without = drive(engine, beam_group(ids, max_new_tokens=8, num_beams=2))
    assert with_adapter["L"][0] != without["L"][0]


def test_max_loras_reads_an_adapter_from_disk_when_one_is_free(reference_model, hf_tokenizer, adapters):
    """--max-loras 1: b's sequence waits (parked) while a's runs, then b takes a's place in memory;
    each gets the tokens and logprobs it gets with both resident; a parked beam search waits whole;
    an aborted parked sequence ends CANCELLED; a is read again for the next request of it."""
    from tests.model.test_beam import beam_group, drive

    ids = [hf_tokenizer(p).input_ids for p in PROMPTS[:2]]
    params = SamplingParams(max_new_tokens=10, logprobs=True)
    both = run(make_engine(reference_model, extra=flags(adapters)),
               [Sequence("a", ids[0], params, adapter="a"), Sequence("b", ids[1], params, adapter="b")])
    engine = make_engine(reference_model, extra=[*flags(adapters), "--max-loras", "1"])
    store = engine.adapters
    assert list(store.resident) == ["a"] and sorted(store.registered) == ["a", "b"]
    engine.add(Sequence("a", ids[0], params, adapter="a"))
    engine.add(Sequence("b", ids[1], params, adapter="b"))
    engine.add(Sequence("gone", ids[1], params, adapter="b"))
    assert [s.seq_id for s in store.parked] == ["b", "gone"] and list(store.pending) == ["b"]
    assert [(o.seq_id, o.finish_reason) for o in engine.abort("gone")] == [("gone", FinishReason.CANCELLED)]
    got = {"a": ([], []), "b": ([], [])}
    order = []
    while engine.scheduler.has_work:
        for out in engine.step():
            if out.token_id is not None:
                got[out.seq_id][0].append(out.token_id)
                got[out.seq_id][1].append(out.logprob)
                order.append(out.seq_id)
    assert order.index("b") > len(order) - order[::-1].index("a") - 1  # b only once a had ended
    assert list(store.resident) == ["b"] and store.num_loads == 1
    for name in ("a", "b"):
        assert got[name] == tuple(both[name][:2]), name
    group = beam_group(ids[0], max_new_tokens=6, num_beams=2, num_return_sequences=2)
    for s in group:
        s.adapter = "a"
    parked_search = drive(engine, group)
    resident_search = drive(make_engine(reference_model, extra=flags(adapters)), [
        Sequence(s.seq_id, s.prompt_ids, s.params, adapter="a", beam_of=s.beam_of, beam_rank=s.beam_rank)
        for s in group])
    assert parked_search == resident_search and list(store.resident) == ["a"] and store.num_loads == 2
