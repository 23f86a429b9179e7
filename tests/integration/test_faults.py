"""Every failure path ends its requests: each named fault point (genrpc/faults.py) armed in the real
services, one at a time. The requests a fault touches end within 2 s with a clear status; afterwards
nothing is left behind (no sequence, KV block, owner entry or tracked stream) and the next request
gives exactly the tokens it gives before any fault."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from genrpc.launch import start_service, start_stack
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc
from tests.helpers import MODEL, metric, wait_for

PROMPT = "Write a short poem about the sea."
REFERENCE = pb.GenerationConfig(max_new_tokens=12)
LONG = pb.GenerationConfig(max_new_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def armed(tmp_path_factory):
    """The three services, each watching one faults file (GENRPC_FAULTS_FILE)."""
    path = str(tmp_path_factory.mktemp("faults") / "faults")
    stack = start_stack(MODEL, env={"GENRPC_FAULTS_FILE": path})
    stack.faults_path = path
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def stub(armed):
    with grpc.insecure_channel(armed.gateway.address) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def reference(stub):
    """The reference request's tokens before any fault."""
    return list(stub.Generate(pb.GenerateRequest(prompts=[PROMPT], config=REFERENCE), timeout=60)
                .completions[0].token_ids)


def arm(stack, spec: str) -> None:
    temporary = stack.faults_path + ".new"
    with open(temporary, "w") as f:
        f.write(spec)
    os.replace(temporary, stack.faults_path)  # a new file: each service re-reads it at its next check


def left_behind(stack) -> dict:
    m, g = stack.model.metrics_port, stack.gateway.metrics_port
    counts = {
        "running": metric(m, "genrpc_model_running_sequences"),
        "waiting": metric(m, "genrpc_model_waiting_sequences"),
        "kv_blocks": metric(m, "genrpc_model_kv_blocks_used"),
        "owned": metric(m, "genrpc_model_owned_sequences"),
        "gateway_inflight": metric(g, "genrpc_gateway_inflight_sequences"),
        "gateway_tracked": metric(g, "genrpc_gateway_tracked_sequences"),
    }
    return {name: value for name, value in counts.items() if value}


def assert_clean_and_exact(stack, stub, reference) -> None:
    arm(stack, "")
    wait_for(lambda: not left_behind(stack), timeout=2, interval=0.05)
    wait_for(lambda: _serves(stub), timeout=10)  # after a lost stream, once the gateway has reconnected
    reply = stub.Generate(pb.GenerateRequest(prompts=[PROMPT], config=REFERENCE), timeout=60)
    assert list(reply.completions[0].token_ids) == reference


def fails_within(call, seconds: float, since: float) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    assert time.monotonic() - since < seconds, f"ended after {time.monotonic() - since:.1f}s"
    return info.value


@pytest.mark.parametrize("point", ["runner.execute", "sampler.sample", "scheduler.update", "model.dispatch"])
def test_a_failed_step_fails_its_sequences_with_internal_and_a_request_id(armed, stub, reference, point):
    wait_for(lambda: not left_behind(armed))
    calls = [stub.GenerateStream(pb.GenerateStreamRequest(prompt=f"{PROMPT} {i}", config=LONG), timeout=60)
             for i in range(2)]
    for call in calls:
        next(call)  # both running
    arm(armed, f"{point}=once")
    armed_at = time.monotonic()
    for call in calls:
        error = fails_within(call, 2, armed_at)
        assert error.code() == grpc.StatusCode.INTERNAL, error.details()
        assert "request id" in error.details()
    assert_clean_and_exact(armed, stub, reference)


def test_an_engine_whose_every_step_fails_fails_its_sequences_and_idles(armed, stub, reference):
    wait_for(lambda: not left_behind(armed))
    arm(armed, "scheduler.schedule=always")
    for _ in range(2):
        started = time.monotonic()
        error = fails_within(stub.GenerateStream(pb.GenerateStreamRequest(prompt=PROMPT, config=LONG), timeout=60),
                             2, started)
        assert error.code() == grpc.StatusCode.INTERNAL and "request id" in error.details()
    wait_for(lambda: not left_behind(armed), timeout=2)
    used = cpu_seconds(armed.model.proc.pid)
    time.sleep(3)
    assert cpu_seconds(armed.model.proc.pid) - used < 0.15, "over 5% of a core while failing every step"
    assert_clean_and_exact(armed, stub, reference)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.parametrize("point, code", [
    ("tokenizer.encode", grpc.StatusCode.INTERNAL),
    ("gateway.tokenizer_call", grpc.StatusCode.INTERNAL),
    ("grammar.compile", grpc.StatusCode.INTERNAL),
])
def test_a_failed_admission_ends_the_request_at_once(armed, stub, reference, point, code):
    wait_for(lambda: not left_behind(armed))
    arm(armed, f"{point}=once")
    config = pb.GenerationConfig(max_new_tokens=40, json_schema='{"type": "object"}')
    started = time.monotonic()
    error = fails_within(stub.GenerateStream(pb.GenerateStreamRequest(prompt=PROMPT, config=config), timeout=60),
                         2, started)
    assert error.code() == code and "request id" in error.details(), error.details()
    assert_clean_and_exact(armed, stub, reference)


@pytest.mark.parametrize("point", ["tokenizer.detokenize", "gateway.model_stream"])
def test_a_lost_stream_ends_the_sequence_on_the_model_worker_too(armed, stub, reference, point):
    """The request ends UNAVAILABLE (a retry can succeed) and its sequence stops on the worker
    within 2 s, instead of running on to max_new_tokens with nobody reading it."""
    wait_for(lambda: not left_behind(armed))
    calls = [stub.GenerateStream(pb.GenerateStreamRequest(prompt=f"{PROMPT} {i}", config=LONG), timeout=60)
             for i in range(2)]
    for call in calls:
        next(call)
    arm(armed, f"{point}=once")
    armed_at = time.monotonic()
    for call in calls:
        error = fails_within(call, 2, armed_at)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    wait_for(lambda: metric(armed.model.metrics_port, "genrpc_model_running_sequences") == 0,
             timeout=2 - (time.monotonic() - armed_at))
    assert_clean_and_exact(armed, stub, reference)


def test_a_client_that_stops_reading_is_bounded(armed):
    """32 clients that read nothing: each stream ends RESOURCE_EXHAUSTED once --max-stream-buffer
    pieces wait unread, its sequence stops on the worker, and the gateway's memory stays flat. The
    clients' own windows are kept small (1 KiB, no window growth) so that the gateway is the one
    holding what they do not read."""
    gateway = start_service("gateway", "--tokenizer-addrs", armed.tokenizer.address, "--model-addrs",
                            armed.model.address, "--max-stream-buffer", "32", *armed.credentials.client_flags())
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    try:
        wait_for(lambda: metric(gateway.metrics_port, "genrpc_gateway_tracked_sequences") == 0, timeout=60)
        with grpc.insecure_channel(gateway.address, options=options) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            wait_for(lambda: _serves(stub), timeout=60)
            rss_before = gateway.rss_bytes(), armed.model.rss_bytes()
            generated_before = metric(armed.model.metrics_port, "genrpc_model_generated_tokens_total")
            config = pb.GenerationConfig(max_new_tokens=2000, ignore_eos=True)
            calls = [stub.GenerateStream(pb.GenerateStreamRequest(prompt=f"Story {i}:", config=config), timeout=120)
                     for i in range(32)]
            wait_for(lambda: metric(armed.model.metrics_port, "genrpc_model_running_sequences") > 0, timeout=30)
            wait_for(lambda: metric(armed.model.metrics_port, "genrpc_model_running_sequences") == 0, timeout=90)
            generated = metric(armed.model.metrics_port, "genrpc_model_generated_tokens_total") - generated_before
            assert metric(gateway.metrics_port, "genrpc_gateway_tracked_sequences") == 0
            assert gateway.rss_bytes() - rss_before[0] < 20 * 2**20
            assert armed.model.rss_bytes() - rss_before[1] < 50 * 2**20
            for call in calls:  # the client reads at last: what was held, then the status
                error = fails_within(call, 120, time.monotonic())
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-stream-buffer" in error.details()
        assert generated < 32 * 200  # stopped near the bound, not at max_new_tokens
        wait_for(lambda: metric(gateway.metrics_port, "genrpc_gateway_inflight_sequences") == 0, timeout=5)
        # A reader that keeps up is not one that stopped: a beam search's 48 tokens arrive in one step,
        # more than the 32 pieces the bound allows to wait, and the whole answer comes back.
        with grpc.insecure_channel(gateway.address) as channel:
            answer = generation_pb2_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(
                prompts=["Story:"], config=pb.GenerationConfig(max_new_tokens=48, num_beams=2, ignore_eos=True)),
                timeout=120)
        assert answer.completions[0].generated_tokens == 48
    finally:
        gateway.stop()


def _serves(stub) -> bool:
    try:
        stub.Generate(pb.GenerateRequest(prompts=["Hi"], config=pb.GenerationConfig(max_new_tokens=1)), timeout=10)
        return True
    except grpc.RpcError:
        return False
