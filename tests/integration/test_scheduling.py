"""Scheduling policy through the real services: a flooding client is capped and the other gets its
share, an urgent request overtakes a full batch, a deadline the queue cannot meet is refused at
once, and a long prompt being prefilled never holds the door. Ordering, not timing, is asserted."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc
from tests.helpers import MODEL, metric, start_stack, wait_for

LONG = dict(max_new_tokens=2000, ignore_eos=True)
SLOTS = 4  # sequences the model service runs at once
CAP = 6  # sequences one client may have in flight


@pytest.fixture(scope="module")
def small():
    s = start_stack(MODEL, model_args=("--max-num-seqs", str(SLOTS), "--max-waiting", "64"),
                    gateway_args=("--max-inflight-per-client", str(CAP)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(small):
    with grpc.insecure_channel(small.gateway.address) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def as_client(name: str):
    return (("x-genrpc-client", name),)


def running(stack) -> float:
    return metric(stack.model.metrics_port, "genrpc_model_running_sequences")


def idle(stack) -> None:
    wait_for(lambda: running(stack) == 0 and metric(stack.model.metrics_port, "genrpc_model_waiting_sequences") == 0,
             timeout=10)


def generate(stub, prompts, client, timeout=60, **config):
    return stub.Generate(pb.GenerateRequest(prompts=prompts, config=pb.GenerationConfig(**config)),
                         timeout=timeout, metadata=as_client(client))


def test_a_flooding_client_is_capped_and_another_gets_its_share(small, stub):
    idle(small)
    preempted_before = metric(small.model.metrics_port, "genrpc_model_preemptions")
    generated_before = metric(small.model.metrics_port, "genrpc_model_generated_tokens_total")
    flood = stub.Generate.future(pb.GenerateRequest(prompts=[f"Story {i}:" for i in range(CAP)],
                                                    config=pb.GenerationConfig(**LONG)),
                                 timeout=120, metadata=as_client("A"))
    try:
        # A holds every slot with sequences past their prompts (a step stopped before it computed
        # a prompt puts the prompt back to waiting: no preemption needed then); 2 more wait.
        wait_for(lambda: running(small) == SLOTS and metric(
            small.model.metrics_port, "genrpc_model_generated_tokens_total") - generated_before >= 2 * SLOTS,
                 timeout=30)
        with pytest.raises(grpc.RpcError) as info:  # A over its share: refused at once
            generate(stub, ["One more"], "A", max_new_tokens=4)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "per client" in info.value.details()
        # B is not refused, and does not wait for A's 2000-token sequences: it takes a slot from A.
        reply = generate(stub, ["Hello"], "B", max_new_tokens=4, ignore_eos=True)
        assert reply.completions[0].generated_tokens == 4
        assert not flood.done()
        assert metric(small.model.metrics_port, "genrpc_model_preemptions") > preempted_before
    finally:
        flood.cancel()
    idle(small)


def test_an_urgent_request_overtakes_a_full_batch(small, stub):
    idle(small)
    batch = stub.Generate.future(pb.GenerateRequest(prompts=[f"Story {i}:" for i in range(SLOTS + 1)],
                                                    config=pb.GenerationConfig(**LONG)),
                                 timeout=120, metadata=as_client("C"))
    try:
        wait_for(lambda: running(small) == SLOTS, timeout=20)
        # The same client, so only the priority differs: at 0 it would wait for a 2000-token sequence.
        reply = generate(stub, ["Quick:"], "C", max_new_tokens=4, ignore_eos=True, priority=5)
        assert reply.completions[0].generated_tokens == 4
        assert not batch.done()
    finally:
        batch.cancel()
    idle(small)


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once(small, stub):
    idle(small)
    batch = stub.Generate.future(pb.GenerateRequest(prompts=[f"Story {i}:" for i in range(SLOTS)],
                                                    config=pb.GenerationConfig(**LONG)),
                                 timeout=120, metadata=as_client("C"))
    try:
        wait_for(lambda: running(small) == SLOTS, timeout=20)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:  # behind ~2000 steps of sequences that cannot stop early
            generate(stub, ["Late:"], "C", timeout=3, max_new_tokens=4)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert "retry later" in info.value.details()
        assert time.monotonic() - started < 2.5  # told before its deadline, not at it
        # With time to spare it is accepted (and waits), and priority still goes first.
        reply = generate(stub, ["Late:"], "C", timeout=30, max_new_tokens=4, priority=1)
        assert reply.completions[0].generated_tokens >= 1
    finally:
        batch.cancel()
    idle(small)


def test_a_long_prompt_being_prefilled_does_not_hold_the_door(small, stub, hf_tokenizer):
    idle(small)
    words = "the quick brown fox jumps over the lazy dog " * 400  # ~3,600 tokens: seconds of prefill
    first_token_at: list[float] = []

    def long_stream():
        call = stub.GenerateStream(pb.GenerateStreamRequest(prompt=words, config=pb.GenerationConfig(
            max_new_tokens=2, ignore_eos=True)), timeout=120, metadata=as_client("D"))
        for _ in call:
            first_token_at.append(time.monotonic())
            break
        call.cancel()

    thread = threading.Thread(target=long_stream)
    thread.start()
    try:
        wait_for(lambda: running(small) == 1, timeout=20)  # admitted: its prefill has begun
        reply = generate(stub, ["Hi"], "E", max_new_tokens=4, ignore_eos=True)
        short_done = time.monotonic()
        assert reply.completions[0].generated_tokens == 4
        assert not first_token_at or first_token_at[0] > short_done  # it did not wait for the long prefill
    finally:
        thread.join(timeout=120)
    assert first_token_at  # and the long prompt was served too
    idle(small)


def test_fair_steps_cap_a_flooding_client_beside_a_light_one(stack):
    """The default stack (--tenant-slowdown 2): while A runs 48 sequences, B's request is computed in
    steps that skip some of A's (genrpc_model_fair_share_skips_total), and A's go on after it."""
    with grpc.insecure_channel(stack.gateway.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        idle(stack)
        flood = stub.Generate.future(pb.GenerateRequest(prompts=[f"Story {i}:" for i in range(48)],
                                                        config=pb.GenerationConfig(max_new_tokens=300,
                                                                                   ignore_eos=True)),
                                     timeout=120, metadata=as_client("A"))
        try:
            port = stack.model.metrics_port
            wait_for(lambda: running(stack) == 48, timeout=30)
            skips = metric(port, "genrpc_model_fair_share_skips_total")
            generated = metric(port, "genrpc_model_generated_tokens_total")
            wait_for(lambda: metric(port, "genrpc_model_generated_tokens_total") >= generated + 96, timeout=30)
            assert metric(port, "genrpc_model_fair_share_skips_total") == skips  # A alone: every step is A's
            reply = generate(stub, ["Hello"], "B", max_new_tokens=4, ignore_eos=True)
            assert reply.completions[0].generated_tokens == 4
            assert metric(port, "genrpc_model_fair_share_skips_total") > skips
            assert not flood.done()
            generated = metric(port, "genrpc_model_generated_tokens_total")
            wait_for(lambda: metric(port, "genrpc_model_generated_tokens_total") >= generated + 48,
                     timeout=30)  # B is gone: A's sequences advance
        finally:
            flood.cancel()
        idle(stack)
