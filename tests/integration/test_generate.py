"""The public API against the real stack: real processes, real gRPC, real model."""

from __future__ import annotations

import concurrent.futures
import uuid

import grpc
import pytest

from genrpc.v1 import generation_pb2 as pb
from tests.greedy import NATIVE_PREFILL_MARGIN, assert_greedy_matches
from tests.helpers import metric

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea and the wind in the autumn evening:",
    "1, 2, 3,",
    "한국어로 인사해 주세요",
]
FINISHED = (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS_TOKEN)


def generate(stub, prompts, **config) -> list[pb.Completion]:
    return list(stub.Generate(pb.GenerateRequest(prompts=prompts, config=pb.GenerationConfig(**config)),
                              timeout=120).completions)


def stream(stub, prompt=None, chat=None, **config) -> list[pb.GenerateStreamResponse]:
    request = pb.GenerateStreamRequest(config=pb.GenerationConfig(**config))
    if chat is not None:
        request.chat.CopyFrom(chat)
    else:
        request.prompt = prompt
    return list(stub.GenerateStream(request, timeout=120))


def test_greedy_tokens_equal_the_in_process_engine_and_generate(stub, reference_model, hf_tokenizer):
    """Through three services, the very tokens of the same engine in process; and generate()'s,
    up to where its top two were within the default prefill's rounding (tests/greedy.py)."""
    from model_svc.__main__ import engine_for, parse_args
    from model_svc.engine.sequence import SamplingParams, Sequence

    engine = engine_for(reference_model, parse_args([]))  # as the model service builds it by default
    for prompt in PROMPTS:
        (got,) = generate(stub, [prompt], max_new_tokens=24)
        engine.add(Sequence("p", hf_tokenizer(prompt).input_ids, SamplingParams(max_new_tokens=24)))
        expected = []
        while engine.scheduler.has_work:
            expected += [out.token_id for out in engine.step() if out.token_id is not None]
        assert list(got.token_ids) == expected, prompt
        assert_greedy_matches(reference_model, hf_tokenizer, prompt, list(got.token_ids), margin=NATIVE_PREFILL_MARGIN)
        assert got.text == hf_tokenizer.decode(list(got.token_ids), skip_special_tokens=True)
        assert got.prompt_tokens == len(hf_tokenizer(prompt).input_ids)
        assert got.generated_tokens == 24 or got.token_ids[-1] == hf_tokenizer.eos_token_id


def test_batch_of_different_lengths_equals_each_alone(stub):
    together = generate(stub, PROMPTS, max_new_tokens=24)
    assert len(together) == len(PROMPTS)
    for prompt, completion in zip(PROMPTS, together):
        (alone,) = generate(stub, [prompt], max_new_tokens=24)
        assert list(completion.token_ids) == list(alone.token_ids), prompt
        assert completion.text == alone.text


def test_concurrent_requests_equal_each_alone(stub):
    alone = {p: list(generate(stub, [p], max_new_tokens=16)[0].token_ids) for p in PROMPTS}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [(p, pool.submit(generate, stub, [p], max_new_tokens=16)) for p in PROMPTS * 2]
        for prompt, future in futures:
            assert list(future.result()[0].token_ids) == alone[prompt]


def test_a_cached_prefix_gives_the_same_numbers_as_computing_it(stack, stub):
    """The first request computes its prompt; the same prompt again, and another with the same
    leading text, start from its cached blocks (after it finished) and get the very same numbers."""
    system = (f"[{uuid.uuid4().hex}] You are a careful assistant. Answer in one short sentence, and never make "
              "things up. ")
    port = stack.model.metrics_port
    hits = lambda: metric(port, "genrpc_model_prefix_cache_hit_tokens")  # noqa: E731
    before = hits()
    cold = generate(stub, [system + "What is rain?"], max_new_tokens=12, logprobs=True)[0]
    assert hits() - before < 16  # a new prefix: nothing to reuse
    before = hits()
    warm = generate(stub, [system + "What is rain?"], max_new_tokens=12, logprobs=True)[0]
    assert hits() - before >= 32
    assert list(warm.token_ids) == list(cold.token_ids)
    assert [t.logprob for t in warm.logprobs] == [t.logprob for t in cold.logprobs]  # the very numbers
    # A running stream's blocks serve a request beside it too.
    running = stub.GenerateStream(pb.GenerateStreamRequest(
        prompt=system + "Why is the sky blue?", config=pb.GenerationConfig(max_new_tokens=60, ignore_eos=True)),
        timeout=120)
    next(running)
    before = hits()
    beside = generate(stub, [system + "Why is the sky blue? Briefly."], max_new_tokens=12, ignore_eos=True)[0]
    running.cancel()
    assert hits() - before >= 32
    assert beside.generated_tokens == 12


def test_no_config_gives_at_most_20_new_tokens(stub):
    (completion,) = generate(stub, ["Tell me a long story about a dragon."])
    assert 1 <= completion.generated_tokens <= 20
    assert completion.finish_reason in FINISHED
    (ignored,) = generate(stub, ["Tell me a long story about a dragon."], ignore_eos=True)
    assert ignored.generated_tokens == 20
    assert ignored.finish_reason == pb.FINISH_REASON_LENGTH


def test_same_seed_same_sample_streamed_or_not(stub):
    config = dict(do_sample=True, temperature=1.3, top_k=0, seed=1234, max_new_tokens=24, ignore_eos=True)
    first = generate(stub, ["Once upon a time"], **config)[0]
    second = generate(stub, ["Once upon a time"], **config)[0]
    streamed = stream(stub, "Once upon a time", **config)
    assert first.seed == 1234
    assert list(first.token_ids) == list(second.token_ids)
    assert [t for m in streamed for t in m.token_ids] == list(first.token_ids)
    assert "".join(m.text for m in streamed) == first.text
    other = generate(stub, ["Once upon a time"], **dict(config, seed=4321))[0]
    assert list(other.token_ids) != list(first.token_ids)


def test_unseeded_sample_reports_a_seed_that_reproduces_it(stub):
    config = dict(do_sample=True, max_new_tokens=16, ignore_eos=True)
    first = generate(stub, ["My favourite food is"], **config)[0]
    again = generate(stub, ["My favourite food is"], **dict(config, seed=first.seed))[0]
    assert list(again.token_ids) == list(first.token_ids)


@pytest.mark.parametrize("prompt", [
    "Translate to Korean: good morning, my friend",
    "Reply with three emoji about the weather:",
    "日本語で自己紹介してください",
])
def test_streamed_text_concatenates_to_unary_text(stub, hf_tokenizer, prompt):
    unary = generate(stub, [prompt], max_new_tokens=32, ignore_eos=True)[0]
    messages = stream(stub, prompt, max_new_tokens=32, ignore_eos=True)
    assert "".join(m.text for m in messages) == unary.text
    assert unary.text == hf_tokenizer.decode(list(unary.token_ids), skip_special_tokens=True)
    # Only a character cut off by the length limit may end the text incomplete.
    assert "\ufffd" not in unary.text.rstrip("\ufffd")
    assert all("\ufffd" not in m.text for m in messages[:-1])
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert messages[-1].generated_tokens == 32


def test_korean_and_emoji_survive_streaming(stub):
    # The model writes multi-byte characters split over several byte-level tokens.
    unary = generate(stub, ["한국어로 인사해 주세요 😀"], max_new_tokens=24, ignore_eos=True)[0]
    assert any(ord(c) > 0x3000 for c in unary.text)
    messages = stream(stub, "한국어로 인사해 주세요 😀", max_new_tokens=24, ignore_eos=True)
    assert "".join(m.text for m in messages) == unary.text
    assert all("\ufffd" not in m.text for m in messages)


def test_stop_string_split_across_tokens(stub):
    base = generate(stub, ["1, 2, 3,"], max_new_tokens=20)[0].text
    assert " 5, 6" in base, base  # the greedy continuation counts on
    # " 5, 6" spans several tokens; nothing from it (or after it) may come out.
    unary = generate(stub, ["1, 2, 3,"], max_new_tokens=20, stop=[" 5, 6"])[0]
    assert unary.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert unary.stop_sequence == " 5, 6"
    assert unary.text == base[: base.index(" 5, 6")]
    messages = stream(stub, "1, 2, 3,", max_new_tokens=20, stop=[" 5, 6"])
    assert "".join(m.text for m in messages) == unary.text
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    included = generate(stub, ["1, 2, 3,"], max_new_tokens=20, stop=[" 5, 6"], include_stop_sequence=True)[0]
    assert included.text == unary.text + " 5, 6"


def test_stream_never_shows_a_prefix_of_a_stop_string_that_completes(stub):
    messages = stream(stub, "1, 2, 3,", max_new_tokens=20, stop=[" 5, 6, 7"])
    seen = ""
    for m in messages:
        seen += m.text
        assert " 5" not in seen
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE


def test_chat_messages_use_the_chat_template(stub, reference_model, hf_tokenizer):
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "What is the capital of France?"}]
    chat = pb.Chat(messages=[pb.Message(role=m["role"], content=m["content"]) for m in messages])
    reply = stub.Generate(pb.GenerateRequest(chats=[chat], config=pb.GenerationConfig(max_new_tokens=16)),
                          timeout=120).completions[0]
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert_greedy_matches(reference_model, hf_tokenizer, list(ids), list(reply.token_ids), margin=NATIVE_PREFILL_MARGIN)
    assert reply.prompt_tokens == len(ids)
    assert "Paris" in reply.text
    streamed = stream(stub, chat=chat, max_new_tokens=16)
    assert "".join(m.text for m in streamed) == reply.text


def test_eos_ends_the_sequence(stub, hf_tokenizer):
    messages = [pb.Message(role="user", content="Say just the word: yes")]
    reply = stub.Generate(pb.GenerateRequest(chats=[pb.Chat(messages=messages)],
                                             config=pb.GenerationConfig(max_new_tokens=64)), timeout=120)
    completion = reply.completions[0]
    assert completion.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    assert completion.token_ids[-1] == hf_tokenizer.eos_token_id
    assert completion.generated_tokens < 64


def test_truncation_keeps_the_last_tokens(stub, hf_tokenizer):
    prompt = "one two three four five six seven eight nine ten"
    (completion,) = generate(stub, [prompt], max_new_tokens=4, truncate_input_tokens=3)
    assert completion.prompt_tokens == 3
    last_three = hf_tokenizer.decode(hf_tokenizer(prompt).input_ids[-3:])
    (direct,) = generate(stub, [last_three], max_new_tokens=4)
    assert list(direct.token_ids) == list(completion.token_ids)


def test_stop_token_ids_and_min_new_tokens(stub):
    (base,) = generate(stub, ["1, 2, 3,"], max_new_tokens=12)
    stopper = base.token_ids[3]
    (stopped,) = generate(stub, ["1, 2, 3,"], max_new_tokens=12, stop_token_ids=[stopper])
    first = list(base.token_ids).index(stopper)
    assert list(stopped.token_ids) == list(base.token_ids[: first + 1])
    assert stopped.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    (held,) = generate(stub, ["1, 2, 3,"], max_new_tokens=12, stop_token_ids=[stopper], min_new_tokens=12)
    assert held.generated_tokens == 12


def test_logprobs(stub):
    (c,) = generate(stub, ["The capital of France is"], max_new_tokens=5, logprobs=True, top_logprobs=3)
    assert len(c.logprobs) == 5
    for token_id, lp in zip(c.token_ids, c.logprobs):
        assert lp.token_id == token_id
        assert lp.logprob <= 0
        assert len(lp.top) == 3
        assert lp.top[0].token_id == token_id  # greedy picks the most likely
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
    # Each token carries its text, as the tokenizer decodes it alone; the alternatives too.
    pieces = [lp.token for lp in c.logprobs]
    assert all(pieces) and "".join(pieces) == c.text
    assert all(t.token for lp in c.logprobs for t in lp.top) and c.logprobs[0].top[0].token == pieces[0]


def test_time_limit_ends_with_partial_text(stub):
    (c,) = generate(stub, ["Count slowly:"], max_new_tokens=4000, ignore_eos=True, time_limit_ms=600)
    assert c.finish_reason == pb.FINISH_REASON_TIME_LIMIT
    assert 0 < c.generated_tokens < 4000


def test_tokenize_and_model_info(stub, hf_tokenizer):
    result = stub.Tokenize(pb.TokenizeRequest(prompts=["Hello world", "한국어"]), timeout=30)
    assert [list(p.token_ids) for p in result.prompts] == [hf_tokenizer(t).input_ids for t in ["Hello world", "한국어"]]
    assert result.prompts[0].tokens == hf_tokenizer.convert_ids_to_tokens(hf_tokenizer("Hello world").input_ids)
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert info.model_name == "SmolLM2-135M-Instruct"
    assert info.max_context_tokens == 8192
    assert info.quantization == "4bit-nf4"
    assert info.dtype == "bfloat16"
    assert info.device == "cpu"
    assert info.default_config.max_new_tokens == 20
    assert list(info.eos_token_ids) == [hf_tokenizer.eos_token_id]


def test_generates_other_processors_reach_the_engine(stub, hf_tokenizer):
    """generate()'s processors through the three services (their exactness: tests/model/test_processors.py)."""
    (plain,) = generate(stub, [PROMPTS[1]], max_new_tokens=12)
    first = plain.token_ids[0]
    (got,) = generate(stub, [PROMPTS[1]], max_new_tokens=12, suppress_tokens=[first], no_repeat_ngram_size=1)
    assert first not in got.token_ids
    assert len(set(got.token_ids)) == len(got.token_ids)  # no token twice
    eos = hf_tokenizer.eos_token_id
    (forced,) = generate(stub, [PROMPTS[1]], max_new_tokens=4, forced_eos_token_id=[eos])
    assert forced.token_ids[-1] == eos and forced.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    assert len(forced.token_ids) == 4 and list(forced.token_ids[:3]) == list(plain.token_ids[:3])


def test_a_watermarked_output_is_detected_by_transformers_detector(stub, hf_tokenizer):
    """watermarking_config through the services; transformers' own WatermarkDetector, given the same
    settings, finds the watermark in the output and not in the same prompt's unwatermarked output."""
    import torch
    from transformers import AutoConfig, WatermarkDetector

    from tests.helpers import MODEL

    settings = dict(greenlist_ratio=0.25, bias=6.0, hashing_key=777)
    prompt = "Write a long story about a lighthouse keeper."
    (marked,) = generate(stub, [prompt], max_new_tokens=64, ignore_eos=True,
                         watermarking_config=pb.WatermarkingConfig(**settings))
    (plain,) = generate(stub, [prompt], max_new_tokens=64, ignore_eos=True)
    assert list(marked.token_ids) != list(plain.token_ids)
    detector = WatermarkDetector(AutoConfig.from_pretrained(MODEL), "cpu",
                                 {**settings, "seeding_scheme": "lefthash", "context_width": 1})
    found = [detector(torch.tensor([list(c.token_ids)]), z_threshold=4.0, return_dict=True) for c in (marked, plain)]
    assert found[0].prediction[0] and not found[1].prediction[0], (found[0].z_score, found[1].z_score)
    # The gateway's DetectWatermark: the detector's very figures for the ids, its verdict for the texts.
    config = pb.WatermarkingConfig(**settings)
    for completion, verdict in zip((marked, plain), found):
        request = pb.DetectWatermarkRequest(token_ids=list(completion.token_ids), watermarking_config=config,
                                            z_threshold=4.0)
        by_ids = stub.DetectWatermark(request, timeout=30)
        assert (by_ids.num_tokens_scored, by_ids.num_green_tokens) == (verdict.num_tokens_scored[0],
                                                                       verdict.num_green_tokens[0])
        assert by_ids.z_score == pytest.approx(verdict.z_score[0], rel=1e-6)
        assert by_ids.prediction == verdict.prediction[0]
    by_text = [stub.DetectWatermark(pb.DetectWatermarkRequest(text=c.text, watermarking_config=config,
                                                              z_threshold=4.0), timeout=30) for c in (marked, plain)]
    assert by_text[0].prediction and not by_text[1].prediction and by_text[0].num_tokens > 32
    with pytest.raises(grpc.RpcError) as info:  # the settings are checked as GenerationConfig's are
        stub.DetectWatermark(pb.DetectWatermarkRequest(text="x", watermarking_config=pb.WatermarkingConfig(
            seeding_scheme="minhash")), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "seeding_scheme" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.DetectWatermark(pb.DetectWatermarkRequest(text="x", token_ids=[1, 2]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exactly one" in info.value.details()


def test_beam_search_through_the_services(stub, reference_model, hf_tokenizer):
    """num_beams through three services: the in-process engine's very sequences and scores (whose
    exactness against generate() is tests/model/test_beam.py's), best first; the same beside other
    traffic; streamed, the same text at the end with the score on the last message."""
    from model_svc.__main__ import engine_for, parse_args
    from tests.model.test_beam import beam_group, drive

    engine = engine_for(reference_model, parse_args([]))  # as the model service builds it by default
    settings = dict(max_new_tokens=20, num_beams=4, num_return_sequences=3, length_penalty=0.8)
    got = generate(stub, PROMPTS[:2], **settings)
    assert [(c.index, c.sample_index) for c in got] == [(i, r) for i in range(2) for r in range(3)]
    for i, prompt in enumerate(PROMPTS[:2]):
        ids = hf_tokenizer(prompt).input_ids
        expected = drive(engine, beam_group(ids, **settings))
        for rank, completion in enumerate(got[3 * i:3 * i + 3]):
            tokens, score, _ = expected["L"] if rank == 0 else expected[("L", rank)]
            assert list(completion.token_ids) == tokens, (prompt, rank)
            assert completion.sequence_score == pytest.approx(score, abs=0) and completion.HasField("sequence_score")
            assert completion.text == hf_tokenizer.decode(tokens, skip_special_tokens=True)
            assert completion.finish_reason in FINISHED and completion.generated_tokens == len(tokens)
        assert got[3 * i].sequence_score >= got[3 * i + 1].sequence_score >= got[3 * i + 2].sequence_score

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # beside greedy and sampled traffic
        others = [pool.submit(generate, stub, [p], max_new_tokens=24, do_sample=True, seed=i)
                  for i, p in enumerate(PROMPTS)]
        again = pool.submit(generate, stub, PROMPTS[:2], **settings)
        assert [(list(c.token_ids), c.sequence_score) for c in again.result()] == [
            (list(c.token_ids), c.sequence_score) for c in got]
        assert all(f.result() for f in others)

    messages = stream(stub, PROMPTS[0], **settings)
    for rank in range(3):
        mine = [m for m in messages if m.sample_index == rank]
        assert "".join(m.text for m in mine) == got[rank].text
        assert [t for m in mine for t in m.token_ids] == list(got[rank].token_ids)
        assert mine[-1].finish_reason in FINISHED and mine[-1].sequence_score == got[rank].sequence_score
    (plain,) = generate(stub, PROMPTS[:1], max_new_tokens=20)
    assert not plain.HasField("sequence_score")


def test_beam_search_ends_beams_at_stop_strings(stub, reference_model, hf_tokenizer):
    """A stop string ends a beam inside the search (generate(stop_strings=...)'s way); each returned
    text is cut at it as any completion's is."""
    from model_svc.__main__ import engine_for, parse_args
    from tests.model.test_beam import beam_group, drive

    settings = dict(max_new_tokens=24, num_beams=3, num_return_sequences=2)
    engine = engine_for(reference_model, parse_args([]))
    ids = hf_tokenizer(PROMPTS[1]).input_ids
    expected = drive(engine, beam_group(ids, stop_strings=("\n",), **settings))
    got = generate(stub, PROMPTS[1:2], stop=["\n"], **settings)
    for rank, completion in enumerate(got):
        tokens, score, _ = expected["L"] if rank == 0 else expected[("L", rank)]
        text = hf_tokenizer.decode(tokens, skip_special_tokens=True)
        assert completion.sequence_score == score
        if "\n" in text:
            assert completion.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE and completion.stop_sequence == "\n"
            assert completion.text == text[:text.index("\n")]
        else:
            assert completion.text == text and completion.finish_reason in FINISHED
    assert any(c.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE for c in got)


def test_the_cli_runs_a_beam_search(stack, stub):
    """`genrpc generate --num-beams`: each returned sequence under its score, as the API gives it."""
    from tests.integration.test_services import run_cli

    out = run_cli(stack, "generate", PROMPTS[0], "--max-new-tokens", "12", "--num-beams", "3", "-n", "2",
                  "--length-penalty", "0.5", "--early-stopping", "never")
    assert out.returncode == 0, out.stderr
    got = generate(stub, PROMPTS[:1], max_new_tokens=12, num_beams=3, num_return_sequences=2, length_penalty=0.5,
                   early_stopping=pb.EARLY_STOPPING_NEVER)
    expected = "".join(f"--- sequence {c.sample_index} (score {c.sequence_score:.4f})\n{c.text}\n" for c in got)
    assert out.stdout == expected
