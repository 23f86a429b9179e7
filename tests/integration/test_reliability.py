"""Nothing hangs, nothing leaks, bad input never hurts anyone: cancellation, deadlines,
backpressure, worker faults, shutdown, TLS and tokens, against real processes."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import time

import grpc
import pytest

from genrpc.launch import ROOT
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc
from tests.helpers import MODEL, make_certificates, metric, start_service, wait_for, wait_serving

RUNNING = "genrpc_model_running_sequences"
LONG = pb.GenerationConfig(max_new_tokens=2000, ignore_eos=True)


def running(stack_or_model) -> float:
    model = getattr(stack_or_model, "model", stack_or_model)
    return metric(model.metrics_port, RUNNING)


def test_client_cancel_frees_the_sequence_within_a_step(stack, stub):
    wait_for(lambda: running(stack) == 0)
    call = stub.GenerateStream(pb.GenerateStreamRequest(prompt="Tell me everything.", config=LONG), timeout=60)
    next(call)
    next(call)
    assert running(stack) == 1
    call.cancel()
    took = wait_for(lambda: running(stack) == 0, timeout=5)
    assert took < 2


def test_deadline_ends_the_call_and_frees_the_sequence(stack, stub):
    wait_for(lambda: running(stack) == 0)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(prompts=["Tell me everything."], config=LONG), timeout=0.8)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2
    wait_for(lambda: running(stack) == 0, timeout=3)


def test_stop_string_aborts_on_the_model_service(stack, stub):
    wait_for(lambda: running(stack) == 0)
    before = metric(stack.model.metrics_port, "genrpc_model_generated_tokens_total")
    reply = stub.Generate(pb.GenerateRequest(prompts=["1, 2, 3,"], config=pb.GenerationConfig(
        max_new_tokens=2000, ignore_eos=True, stop=[" 6,"])), timeout=60)
    assert reply.completions[0].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    wait_for(lambda: running(stack) == 0, timeout=3)
    generated = metric(stack.model.metrics_port, "genrpc_model_generated_tokens_total") - before
    assert generated < 20  # stopped at once, not after 2000 tokens


@pytest.fixture(scope="module")
def small_gateway(stack):
    """A gateway that admits at most 2 sequences, in front of the shared workers."""
    gateway = start_service("gateway", "--tokenizer-addrs", stack.tokenizer.address,
                            "--model-addrs", stack.model.address, "--max-inflight-sequences", "2",
                            "--max-inflight-per-client", "2", *stack.credentials.client_flags())
    wait_serving(gateway.address)
    yield gateway
    gateway.stop()


def test_gateway_admission_bound(stack, small_gateway):
    with grpc.insecure_channel(small_gateway.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        calls = [stub.GenerateStream(pb.GenerateStreamRequest(prompt="Go on.", config=LONG), timeout=60)
                 for _ in range(2)]
        for call in calls:
            next(call)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(prompts=["x"], config=pb.GenerationConfig(max_new_tokens=2)), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry" in info.value.details()
        assert time.monotonic() - started < 1  # refused at once, not queued
        for call in calls:
            call.cancel()
        wait_for(lambda: running(stack) == 0, timeout=5)
        ok = stub.Generate(pb.GenerateRequest(prompts=["x"], config=pb.GenerationConfig(max_new_tokens=2)), timeout=30)
        assert ok.completions[0].generated_tokens == 2


def test_model_waiting_bound(stack):
    model = start_service("model_svc", "--model", MODEL, "--max-num-seqs", "1", "--max-batch-tokens", "64",
                          "--max-waiting", "1", *stack.credentials.server_flags())
    gateway = start_service("gateway", "--tokenizer-addrs", stack.tokenizer.address, "--model-addrs", model.address,
                            *stack.credentials.client_flags())
    try:
        wait_serving(gateway.address)
        with grpc.insecure_channel(gateway.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            first = stub.GenerateStream(pb.GenerateStreamRequest(prompt="a", config=LONG), timeout=600)
            next(first)  # running
            # Time enough to wait for the first one's 2,000 tokens: a shorter deadline would be refused
            # at once as one the queue cannot meet (see test_scheduling.py).
            second = stub.GenerateStream(pb.GenerateStreamRequest(prompt="b", config=LONG), timeout=600)
            wait_for(lambda: metric(model.metrics_port, "genrpc_model_waiting_sequences") == 1)
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(pb.GenerateRequest(prompts=["c"]), timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "retry" in info.value.details()
            first.cancel()
            second.cancel()
    finally:
        gateway.stop()
        model.stop()


def drain(call, since: float, limit: float):
    """Reads a stream until it ends or `limit` seconds pass; returns (how it ended, seconds)."""
    try:
        for _ in call:
            if time.monotonic() - since > limit:
                call.cancel()
                return "still streaming", time.monotonic() - since
        return grpc.StatusCode.OK, time.monotonic() - since
    except grpc.RpcError as exc:
        return exc.code(), time.monotonic() - since


def test_worker_killed_mid_stream_then_recovery(stack):
    """Two model workers and two tokenizer replicas behind one gateway; SIGKILL one of each."""
    tokenizer2 = start_service("tokenizer_svc", "--model", MODEL, *stack.credentials.server_flags())
    workers = [start_service("model_svc", "--model", MODEL, *stack.credentials.server_flags()) for _ in range(2)]
    gateway = start_service("gateway", "--tokenizer-addrs", f"{tokenizer2.address},{stack.tokenizer.address}",
                            "--model-addrs", ",".join(w.address for w in workers), *stack.credentials.client_flags())
    try:
        wait_serving(gateway.address)
        with grpc.insecure_channel(gateway.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            wait_for(lambda: stub.ModelInfo(pb.ModelInfoRequest(), timeout=5).num_model_workers == 2)
            # Two streams: least-loaded routing puts one on each worker.
            # 7,000 tokens: the survivor must still be streaming 5 s after the kill (2,000 took ~10 s alone).
            longer = pb.GenerationConfig(max_new_tokens=7000, ignore_eos=True)
            calls = [stub.GenerateStream(pb.GenerateStreamRequest(prompt="Story:", config=longer), timeout=120)
                     for _ in range(2)]
            for call in calls:
                next(call)
            assert [running(w) for w in workers] == [1, 1]
            tokenizer2.stop(signal.SIGKILL)
            workers[0].stop(signal.SIGKILL)
            killed_at = time.monotonic()
            outcomes = list(concurrent.futures.ThreadPoolExecutor(2).map(
                lambda call: drain(call, killed_at, 5.0), calls))
            codes = [code for code, _ in outcomes]
            # The stream on the killed worker ends with UNAVAILABLE fast; the other one goes on.
            assert sorted(codes, key=str) == sorted([grpc.StatusCode.UNAVAILABLE, "still streaming"], key=str), (
                f"{outcomes}\ngateway log:\n{gateway.log()[-3000:]}")
            assert max(seconds for code, seconds in outcomes if code == grpc.StatusCode.UNAVAILABLE) < 3
            # New requests go to the healthy worker, through the healthy tokenizer.
            for _ in range(3):
                reply = stub.Generate(pb.GenerateRequest(prompts=["Hi"], config=pb.GenerationConfig(max_new_tokens=3)),
                                      timeout=30)
                assert reply.completions[0].generated_tokens == 3
            # No worker left: NOT_SERVING and UNAVAILABLE.
            port = workers[1].port
            workers[1].stop(signal.SIGKILL)
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            health = health_pb2_grpc.HealthStub(channel)
            wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                     == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=5)
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(pb.GenerateRequest(prompts=["Hi"]), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            # The worker comes back on its port: the gateway reconnects.
            workers[1] = start_service("model_svc", "--model", MODEL, "--port", str(port),
                                       *stack.credentials.server_flags())
            wait_serving(gateway.address, timeout=30)
            reply = stub.Generate(pb.GenerateRequest(prompts=["Hi"], config=pb.GenerationConfig(max_new_tokens=2)),
                                  timeout=30)
            assert reply.completions[0].generated_tokens == 2
    finally:
        gateway.stop()
        for w in workers:
            w.stop()
        tokenizer2.stop()


def test_model_service_sigterm_exits_cleanly():
    model = start_service("model_svc", "--model", MODEL)
    wait_serving(model.address)
    assert model.stop() == 0


def test_tls_mutual_tls_and_bearer_tokens(stack, tmp_path):
    certs = make_certificates(tmp_path)
    gateway = start_service(
        "gateway", "--tokenizer-addrs", stack.tokenizer.address, "--model-addrs", stack.model.address,
        "--tls-cert", certs["server_cert"], "--tls-key", certs["server_key"], "--tls-client-ca", certs["ca"],
        "--auth-tokens", "s3cret,other", *stack.credentials.client_flags())
    read = lambda name: open(certs[name], "rb").read()  # noqa: E731
    request = pb.GenerateRequest(prompts=["Hi"], config=pb.GenerationConfig(max_new_tokens=2))
    try:
        client_creds = grpc.ssl_channel_credentials(read("ca"), read("client_key"), read("client_cert"))
        wait_serving(gateway.address, credentials=client_creds)
        with grpc.secure_channel(gateway.address, client_creds) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            reply = stub.Generate(request, timeout=30, metadata=[("authorization", "Bearer s3cret")])
            assert reply.completions[0].generated_tokens == 2
            for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Generate(request, timeout=30, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                list(stub.GenerateStream(pb.GenerateStreamRequest(prompt="Hi"), timeout=30))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Without a client certificate the TLS handshake fails: mutual TLS is enforced.
        no_client_cert = grpc.ssl_channel_credentials(read("ca"))
        with grpc.secure_channel(gateway.address, no_client_cert) as channel:
            with pytest.raises(grpc.RpcError) as info:
                generation_pb2_grpc.GenerationStub(channel).Generate(
                    request, timeout=5, metadata=[("authorization", "Bearer s3cret")])
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # Plaintext is refused too.
        with grpc.insecure_channel(gateway.address) as channel:
            with pytest.raises(grpc.RpcError):
                generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=5)
        # The command line reaches it with the same certificates and a token file.
        token_file = tmp_path / "token"
        token_file.write_text("s3cret\n")
        cli = [sys.executable, "-m", "genrpc.cli", "--addr", gateway.address, "--tls-ca", certs["ca"],
               "--tls-cert", certs["client_cert"], "--tls-key", certs["client_key"]]
        ok = subprocess.run([*cli, "--token-file", str(token_file), "generate", "Hi", "--max-new-tokens", "2", "-v"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert ok.returncode == 0 and "2 tokens" in ok.stderr, ok.stderr
        refused = subprocess.run([*cli, "generate", "Hi"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    finally:
        gateway.stop()


def test_many_mixed_requests_leave_nothing_behind(stack, stub):
    """A small soak (make soak runs the long one): mixed lengths, a fifth cancelled mid-stream."""
    wait_for(lambda: running(stack) == 0)
    rss_before = stack.model.rss_bytes()

    def one(i: int) -> str:
        config = pb.GenerationConfig(max_new_tokens=4 + i % 12, ignore_eos=True, seed=i, do_sample=i % 2 == 0)
        if i % 5 == 0:
            call = stub.GenerateStream(pb.GenerateStreamRequest(prompt=f"Item {i}:", config=config), timeout=60)
            next(call)
            call.cancel()
            return "cancelled"
        reply = stub.Generate(pb.GenerateRequest(prompts=[f"Item {i}:"], config=config), timeout=60)
        return "ok" if reply.completions[0].generated_tokens == 4 + i % 12 else "short"

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, range(200)))
    assert outcomes.count("ok") == 160 and outcomes.count("cancelled") == 40
    wait_for(lambda: running(stack) == 0, timeout=5)
    assert metric(stack.model.metrics_port, "genrpc_model_kv_cache_used_tokens") == 0
    assert stack.model.rss_bytes() - rss_before < 200 * 2**20
