"""vLLM's engine protocol (vllm.grpc.engine.VllmEngine, from the pinned smg-grpc-proto) on the model
worker: contract tests against the real worker process, through the same TLS and token as the gateway."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile

import grpc
import pytest

from genrpc.vllm import vllm_engine_pb2 as pb
from genrpc.vllm import vllm_engine_pb2_grpc
from genrpc.vllm.common_pb2 import GetTokenizerRequest

PROMPT = "Write a long story about a lighthouse keeper and the sea."


@pytest.fixture(scope="module")
def engine_stub(stack):
    with stack.channel(stack.model) as channel:
        yield vllm_engine_pb2_grpc.VllmEngineStub(channel)


@pytest.fixture(scope="module")
def ids(hf_tokenizer):
    return hf_tokenizer(PROMPT).input_ids


def request(ids, rid="r", stream=False, **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, tokenized=pb.TokenizedInput(input_ids=ids), stream=stream,
                              sampling_params=pb.SamplingParams(**params))


def generate(stub, req) -> tuple[list[pb.GenerateStreamChunk], pb.GenerateComplete]:
    chunks, complete = [], None
    for response in stub.Generate(req, timeout=120):
        if response.HasField("chunk"):
            assert complete is None, "a chunk after the final message"
            chunks.append(response.chunk)
        else:
            assert complete is None, "two final messages"
            complete = response.complete
    assert complete is not None
    return chunks, complete


def in_process(reference_model, ids, **params) -> list[int]:
    from model_svc.__main__ import engine_for, parse_args
    from model_svc.engine.sequence import SamplingParams, Sequence

    engine = engine_for(reference_model, parse_args([]))  # as the model service builds it by default
    engine.add(Sequence("p", ids, SamplingParams(**params)))
    out = []
    while engine.scheduler.has_work:
        out += [o.token_id for o in engine.step() if o.token_id is not None]
    return out


def test_greedy_ids_are_the_engines_streamed_or_not(engine_stub, reference_model, ids):
    expected = in_process(reference_model, ids, max_new_tokens=24, ignore_eos=True)
    chunks, complete = generate(engine_stub, request(ids, max_tokens=24, ignore_eos=True, temperature=0.0))
    assert not chunks and list(complete.output_ids) == expected
    assert (complete.finish_reason, complete.prompt_tokens, complete.completion_tokens) == ("length", len(ids), 24)
    chunks, streamed = generate(engine_stub, request(ids, "s", stream=True, max_tokens=24, ignore_eos=True,
                                                     temperature=0.0))
    assert [t for c in chunks for t in c.token_ids] == expected == list(streamed.output_ids)
    assert chunks[-1].completion_tokens == 24 and all(c.prompt_tokens == len(ids) for c in chunks)
    assert streamed.finish_reason == "length"


def test_a_stop_string_ends_the_output_at_the_token_that_completes_it(engine_stub, hf_tokenizer, ids):
    _, full = generate(engine_stub, request(ids, max_tokens=32, ignore_eos=True, temperature=0.0))
    text = hf_tokenizer.decode(list(full.output_ids), skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 4]
    end = next(n for n in range(1, 33) if stop in hf_tokenizer.decode(list(full.output_ids[:n]),
                                                                        skip_special_tokens=True))
    for stream in (False, True):
        chunks, got = generate(engine_stub, request(ids, f"stop-{stream}", stream=stream, max_tokens=32,
                                                    ignore_eos=True, temperature=0.0, stop=["never there", stop],
                                                    skip_special_tokens=True))
        assert list(got.output_ids) == list(full.output_ids[:end])
        assert (got.finish_reason, got.matched_stop_str) == ("stop", stop)
        if stream:
            assert [t for c in chunks for t in c.token_ids] == list(got.output_ids)


def test_a_stop_token_ends_the_output_and_is_named(engine_stub, ids):
    _, full = generate(engine_stub, request(ids, max_tokens=16, ignore_eos=True, temperature=0.0))
    full = list(full.output_ids)
    token = full[5]
    _, got = generate(engine_stub, request(ids, max_tokens=16, ignore_eos=True, temperature=0.0,
                                           stop_token_ids=[token]))
    assert list(got.output_ids) == full[:full.index(token) + 1]
    assert (got.finish_reason, got.matched_token_id) == ("stop", token)


def test_a_seed_reproduces_a_sample_with_its_logprobs(engine_stub, ids):
    params = dict(max_tokens=12, temperature=0.9, top_p=0.95, top_k=40, seed=7, logprobs=2, ignore_eos=True)
    _, first = generate(engine_stub, request(ids, "a", **params))
    chunks, again = generate(engine_stub, request(ids, "b", stream=True, **params))
    _, other = generate(engine_stub, request(ids, "c", **dict(params, seed=8)))
    assert list(first.output_ids) == list(again.output_ids) != list(other.output_ids)
    lp = first.output_logprobs
    assert list(lp.token_ids) == list(first.output_ids) and len(lp.token_logprobs) == 12
    assert all(len(top.values) == 2 and len(top.token_ids) == 2 for top in lp.top_logprobs)
    assert list(lp.token_logprobs) == list(again.output_logprobs.token_logprobs)
    assert [v for c in chunks for v in c.output_logprobs.token_logprobs] == list(lp.token_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)


def test_prompt_logprobs_leave_the_first_token_without_one(engine_stub, ids):
    _, got = generate(engine_stub, request(ids, max_tokens=2, temperature=0.0, prompt_logprobs=1))
    lp = got.input_logprobs
    assert list(lp.token_ids) == ids and len(lp.token_logprobs) == len(ids)
    assert not lp.token_logprobs[0].HasField("value")
    assert all(entry.HasField("value") and entry.value <= 0 for entry in lp.token_logprobs[1:])


def test_a_choice_constraint_holds(engine_stub, hf_tokenizer, ids):
    choices = ["lighthouse", "ocean waves", "keeper"]
    _, got = generate(engine_stub, request(ids, max_tokens=16, temperature=0.0,
                                           choice=pb.ChoiceConstraint(choices=choices)))
    assert hf_tokenizer.decode(list(got.output_ids), skip_special_tokens=True) in choices


def test_abort_ends_a_running_request(stack, engine_stub, ids):
    responses = engine_stub.Generate(request(ids, "long", stream=True, max_tokens=400, ignore_eos=True,
                                             temperature=0.0), timeout=120)
    first = next(responses)
    assert first.HasField("chunk")
    with stack.channel(stack.model) as channel:
        vllm_engine_pb2_grpc.VllmEngineStub(channel).Abort(pb.AbortRequest(request_ids=["long", "unknown"]),
                                                           timeout=10)
    rest = list(responses)
    assert rest[-1].HasField("complete") and rest[-1].complete.finish_reason == "abort"
    assert rest[-1].complete.completion_tokens < 400


def test_a_cancelled_call_frees_its_sequence(engine_stub, ids):
    call = engine_stub.Generate(request(ids, "gone", stream=True, max_tokens=400, ignore_eos=True,
                                        temperature=0.0), timeout=120)
    next(call)
    call.cancel()
    # the same id may run again at once: the cancelled call's sequence and stream are gone
    _, again = generate(engine_stub, request(ids, "gone", max_tokens=2, ignore_eos=True, temperature=0.0))
    assert again.finish_reason == "length"


def test_the_same_request_id_twice_at_once_is_refused(engine_stub, ids):
    call = engine_stub.Generate(request(ids, "twice", stream=True, max_tokens=200, ignore_eos=True,
                                        temperature=0.0), timeout=120)
    next(call)
    with pytest.raises(grpc.RpcError) as info:
        generate(engine_stub, request(ids, "twice", max_tokens=2))
    call.cancel()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already running" in info.value.details()


@pytest.mark.parametrize("change, field", [
    (dict(sampling_params=pb.SamplingParams(n=2)), "sampling_params.n"),
    (dict(sampling_params=pb.SamplingParams(temperature=-1)), "sampling_params.temperature"),
    (dict(sampling_params=pb.SamplingParams(top_p=1.5)), "sampling_params.top_p"),
    (dict(sampling_params=pb.SamplingParams(max_tokens=100_000)), "sampling_params.max_tokens"),
    (dict(sampling_params=pb.SamplingParams(logprobs=50)), "sampling_params.logprobs"),
    (dict(sampling_params=pb.SamplingParams(seed=-3)), "sampling_params.seed"),
    (dict(sampling_params=pb.SamplingParams(stop=[""])), "sampling_params.stop[0]"),
    (dict(sampling_params=pb.SamplingParams(structural_tag="{}")), "sampling_params.structural_tag"),
    (dict(sampling_params=pb.SamplingParams(json_schema="{not json")), "sampling_params.json_schema"),
    (dict(sampling_params=pb.SamplingParams(logit_bias={10**6: 1.0})), "sampling_params.logit_bias"),
    (dict(mm_inputs=pb.MultimodalInputs()), "mm_inputs"),
    (dict(kv_transfer_params_json="{}"), "kv_transfer_params"),
    (dict(request_id=""), "request_id"),
    (dict(tokenized=pb.TokenizedInput(input_ids=[10**6])), "vocabulary size"),
    (dict(tokenized=pb.TokenizedInput(input_ids=[])), "no tokens"),
])
def test_what_does_not_map_is_refused_naming_it(engine_stub, ids, change, field):
    req = request(ids, max_tokens=4)
    for name, value in change.items():
        if isinstance(value, (pb.SamplingParams, pb.TokenizedInput, pb.MultimodalInputs)):
            getattr(req, name).CopyFrom(value)
        else:
            setattr(req, name, value)
    if "sampling_params" in change and not req.sampling_params.HasField("max_tokens") and field != \
            "sampling_params.max_tokens":
        req.sampling_params.max_tokens = 4
    with pytest.raises(grpc.RpcError) as info:
        generate(engine_stub, req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field in info.value.details()


def test_a_text_prompt_is_tokenized_by_the_worker(engine_stub, ids):
    params = pb.SamplingParams(max_tokens=8, temperature=0.0)
    _, by_text = generate(engine_stub, pb.GenerateRequest(request_id="t", text=PROMPT, sampling_params=params))
    _, by_ids = generate(engine_stub, request(ids, max_tokens=8, temperature=0.0))
    assert list(by_text.output_ids) == list(by_ids.output_ids) and by_text.prompt_tokens == len(ids)


def test_model_server_and_load_information(engine_stub, reference_model, hf_tokenizer):
    assert engine_stub.HealthCheck(pb.HealthCheckRequest(), timeout=10).healthy
    info = engine_stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert (info.vocab_size, info.max_context_length) == (reference_model.vocab_size, reference_model.max_context)
    assert list(info.eos_token_ids) == reference_model.eos_token_ids and info.is_generation
    assert info.model_type == "llama" and info.architectures == ["LlamaForCausalLM"]
    assert json.loads(info.default_sampling_params_json)["max_tokens"] == reference_model.defaults.max_new_tokens
    server = engine_stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert server.server_type == "vllm-grpc" and server.block_size > 0 and server.max_num_seqs > 0
    loads = engine_stub.GetLoads(pb.GetLoadsRequest(), timeout=10)
    assert loads.dp_rank_count == 1 and loads.loads[0].max_total_num_tokens > 0
    assert 0 <= loads.loads[0].token_usage < 1


def test_a_load_reported_while_requests_run(engine_stub, ids):
    call = engine_stub.Generate(request(ids, "busy", stream=True, max_tokens=200, ignore_eos=True,
                                        temperature=0.0), timeout=120)
    next(call)
    load = engine_stub.GetLoads(pb.GetLoadsRequest(), timeout=10).loads[0]
    call.cancel()
    assert load.num_running_reqs + load.num_waiting_reqs >= 1 and load.num_used_tokens > 0


def test_the_tokenizer_comes_as_a_zip_with_its_digest(engine_stub, hf_tokenizer, ids, tmp_path):
    """A router builds its own tokenizer from it: the same ids and chat template as the model's."""
    from transformers import AutoTokenizer

    chunks = list(engine_stub.GetTokenizer(GetTokenizerRequest(), timeout=60))
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest() and not any(c.sha256 for c in chunks[:-1])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert "tokenizer.json" in archive.namelist()
        archive.extractall(tmp_path)
    rebuilt = AutoTokenizer.from_pretrained(tmp_path)
    assert rebuilt(PROMPT).input_ids == ids
    messages = [{"role": "user", "content": "hi"}]
    assert rebuilt.apply_chat_template(messages, tokenize=False) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False)


def test_embed_says_unimplemented(engine_stub):
    with pytest.raises(grpc.RpcError) as info:
        engine_stub.Embed(pb.EmbedRequest(request_id="e"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _subscribe(stub, start: int, until, batches: list) -> tuple[grpc.Future, threading.Thread]:
    """Reads KV-event batches into `batches` on a thread until `until(batches)` holds (then cancels)."""
    from genrpc.vllm.common_pb2 import SubscribeKvEventsRequest

    call = stub.SubscribeKvEvents(SubscribeKvEventsRequest(start_sequence_number=start), timeout=60)

    def read():
        try:
            for batch in call:
                batches.append(batch)
                if until(batches):
                    call.cancel()
                    return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return call, thread


def test_kv_events_follow_the_prefix_cache(engine_stub, hf_tokenizer):
    """A prompt's full blocks come as stored events, in order, each with its token ids and chained to
    the one before it; batches are numbered one after another; a subscriber resuming from a batch
    gets that batch again; a start beyond the next batch is refused."""
    import time
    import uuid

    from genrpc.vllm.common_pb2 import SubscribeKvEventsRequest

    ids = hf_tokenizer(f"[{uuid.uuid4().hex}] " + PROMPT * 2).input_ids  # new blocks: nothing cached yet
    full = len(ids) // 16
    assert full >= 3

    def stored(batches):
        return [(event.stored, block) for batch in batches for event in batch.events if event.HasField("stored")
                for block in event.stored.blocks]

    def has_prompt(batches):
        return sum(list(block.token_ids) == ids[i * 16:(i + 1) * 16] for i in range(full)
                   for _, block in stored(batches)) >= full

    batches: list = []
    call, thread = _subscribe(engine_stub, 0, has_prompt, batches)
    time.sleep(0.5)  # subscribed before the prompt runs (start 0: events from now on)
    generate(engine_stub, request(ids, max_tokens=1, temperature=0.0))
    thread.join(60)
    call.cancel()
    assert has_prompt(batches), [len(b.events) for b in batches]
    numbers = [b.sequence_number for b in batches]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) and numbers[0] >= 1
    chain = {}
    for event, block in stored(batches):
        for i in range(full):
            if list(block.token_ids) == ids[i * 16:(i + 1) * 16]:
                chain[i] = (event, block)
    for i in range(1, full):
        event, block = chain[i]
        previous = chain[i - 1][1].block_hash
        position = list(event.blocks).index(block)
        parent = event.blocks[position - 1].block_hash if position else event.parent_block_hash
        assert parent == previous, i
        assert block.block_size == 16 and event.medium == "CPU"
    first = numbers[0]
    again: list = []
    call, thread = _subscribe(engine_stub, first, lambda got: len(got) >= 1, again)
    thread.join(30)
    assert again and again[0] == batches[0]
    with pytest.raises(grpc.RpcError) as info:
        next(iter(engine_stub.SubscribeKvEvents(SubscribeKvEventsRequest(start_sequence_number=10 ** 9),
                                                timeout=10)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_service_needs_the_workers_credentials(stack, ids):
    from genrpc.security import channel_credentials

    c = stack.credentials
    no_token = channel_credentials(c.ca, c.client_cert, c.client_key)
    with grpc.secure_channel(stack.model.address, no_token) as channel:
        with pytest.raises(grpc.RpcError) as info:
            vllm_engine_pb2_grpc.VllmEngineStub(channel).HealthCheck(pb.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_concurrent_requests_each_get_their_own_ids(engine_stub, reference_model, hf_tokenizer):
    prompts = ["The capital of France is", "1, 2, 3,", "Once upon a time"]
    results = {}

    def one(i, prompt):
        results[i] = list(generate(engine_stub, request(hf_tokenizer(prompt).input_ids, f"c{i}", max_tokens=12,
                                                        ignore_eos=True, temperature=0.0))[1].output_ids)

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, prompt in enumerate(prompts):
        assert results[i] == in_process(reference_model, hf_tokenizer(prompt).input_ids, max_new_tokens=12,
                                        ignore_eos=True)
