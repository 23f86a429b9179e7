"""genrpc model workers behind the real SMG router (`smg` from PyPI, installed by the project's set-up),
which reaches them through vLLM's engine protocol: the OpenAI API through SMG gives what genrpc's own
gateway gives on the same workers.

SMG 1.13 speaks plaintext HTTP/2 without credentials to its gRPC workers (over a grpcs:// URL too:
the worker's TLS handshake sees a plaintext request), so its workers here listen on loopback without
TLS and tokens, as a worker beside SMG in one pod would (docs/routers.md)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from genrpc.launch import start_service, wait_serving
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc
from tests.helpers import MODEL, metric

MODEL_ID = os.path.basename(MODEL.rstrip("/"))
SMG = shutil.which("smg", path=os.path.dirname(sys.executable))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def post_stream(url: str, body: dict, timeout: float = 120) -> list[dict]:
    request = urllib.request.Request(url, json.dumps(dict(body, stream=True)).encode(),
                                     {"content-type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    return events


class Fleet:
    def __init__(self):
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(start_service, "model_svc", "--model", MODEL, "--kv-cache-memory", "0.25")
                       for _ in range(2)]
            tokenizer = pool.submit(start_service, "tokenizer_svc", "--model", MODEL)
            self.workers = [f.result() for f in futures]
            self.tokenizer = tokenizer.result()
        self.gateway = start_service("gateway", "--tokenizer-addrs", self.tokenizer.address, "--model-addrs",
                                     ",".join(w.address for w in self.workers))
        wait_serving(self.gateway.address)
        self.port, self.log_path = free_port(), tempfile.mktemp(prefix="genrpc-smg-", suffix=".log")
        with open(self.log_path, "w") as log:
            self.smg = subprocess.Popen(
                [SMG, "launch", "--backend", "vllm", "--host", "127.0.0.1", "--port", str(self.port),
                 "--prometheus-port", str(free_port()), "--policy", "cache_aware",
                 "--worker-urls", *(f"grpc://{w.address}" for w in self.workers),
                 "--health-check-interval-secs", "1", "--health-failure-threshold", "1", "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.smg.poll() is None, self.smg_log()
            try:  # ready: the model listed, its tokenizer fetched from a worker (GetTokenizer)
                status, _ = post(f"{self.url}/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1})
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"SMG did not serve within 90 s:\n{self.smg_log()}")
        self.channel = grpc.insecure_channel(self.gateway.address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)

    def smg_log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def stop(self):
        self.channel.close()
        self.smg.terminate()
        try:
            self.smg.wait(10)
        except subprocess.TimeoutExpired:
            self.smg.kill()
        for service in (self.gateway, self.tokenizer, *self.workers):
            service.stop()
        os.unlink(self.log_path)


@pytest.fixture(scope="module")
def fleet():
    if SMG is None:
        pytest.skip("the smg router is not installed here (pyproject installs it on x86-64 Linux only)")
    f = Fleet()
    yield f
    f.stop()


def test_completions_through_smg_are_the_gateways(fleet):
    for prompt in ("The capital of France is", "1, 2, 3,"):
        status, body = post(f"{fleet.url}/v1/completions",
                            {"model": MODEL_ID, "prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert status == 200, body
        ours = fleet.stub.Generate(pb.GenerateRequest(prompts=[prompt], config=pb.GenerationConfig(
            max_new_tokens=16)), timeout=120).completions[0]
        assert body["choices"][0]["text"] == ours.text
        assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (
            ours.prompt_tokens, ours.generated_tokens)
        events = post_stream(f"{fleet.url}/v1/completions",
                             {"model": MODEL_ID, "prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert "".join(e["choices"][0]["text"] for e in events if e.get("choices")) == ours.text


def test_chat_completions_through_smg_are_the_gateways(fleet):
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "What is the capital of France?"}]
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": 16, "temperature": 0}
    status, reply = post(f"{fleet.url}/v1/chat/completions", body)
    assert status == 200, reply
    chat = pb.Chat(messages=[pb.Message(role=m["role"], content=m["content"]) for m in messages])
    ours = fleet.stub.Generate(pb.GenerateRequest(chats=[chat], config=pb.GenerationConfig(max_new_tokens=16)),
                               timeout=120).completions[0]
    assert reply["choices"][0]["message"]["content"] == ours.text
    assert reply["usage"]["prompt_tokens"] == ours.prompt_tokens
    events = post_stream(f"{fleet.url}/v1/chat/completions", body)
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    assert streamed == ours.text


def test_a_seeded_sample_through_smg_is_the_gateways(fleet):
    params = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 11}
    status, body = post(f"{fleet.url}/v1/completions",
                        {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 16, **params})
    assert status == 200, body
    ours = fleet.stub.Generate(pb.GenerateRequest(prompts=["Once upon a time"], config=pb.GenerationConfig(
        max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9, top_k=40, seed=11)), timeout=120).completions[0]
    assert body["choices"][0]["text"] == ours.text
    status, again = post(f"{fleet.url}/v1/completions",
                         {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 16, **params, "seed": 12})
    assert again["choices"][0]["text"] != ours.text


def test_a_stop_string_ends_the_completion(fleet):
    status, full = post(f"{fleet.url}/v1/completions", {"model": MODEL_ID, "prompt": "1, 2, 3,", "max_tokens": 16,
                                                        "temperature": 0})
    status, body = post(f"{fleet.url}/v1/completions", {"model": MODEL_ID, "prompt": "1, 2, 3,", "max_tokens": 16,
                                                        "temperature": 0, "stop": [" 6"]})
    assert status == 200, body
    text = full["choices"][0]["text"]
    assert body["choices"][0]["text"] == text[:text.index(" 6")]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_invalid_requests_come_back_as_4xx(fleet):
    status, body = post(f"{fleet.url}/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 4, "n": 2})
    assert status == 400 and "sampling_params.n" in json.dumps(body)  # refused by the worker, named
    status, body = post(f"{fleet.url}/v1/completions",
                        {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 100_000})
    assert status == 400 and "max_tokens" in json.dumps(body)
    status, _ = post(f"{fleet.url}/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "temperature": -1})
    assert status == 400  # refused by SMG itself


def test_cache_aware_routing_keeps_a_conversation_on_one_worker(fleet):
    """Turns of one conversation share their leading tokens: SMG's cache-aware policy sends each to the
    worker that ran the turn before, whose prefix cache then serves the shared part. (Alternating workers,
    a turn would find no cache, or only an older turn's.) SMG subscribes to each worker's KV events."""
    def counters() -> list[tuple[float, float]]:  # per worker: (generated, served from the prefix cache)
        return [(metric(w.metrics_port, "genrpc_model_generated_tokens_total"),
                 metric(w.metrics_port, "genrpc_model_cached_prefix_tokens_total")) for w in fleet.workers]

    messages = [{"role": "system", "content": "You are a helpful assistant who answers briefly and precisely, "
                                              "in plain words, about geography, history and the sea. " * 4},
                {"role": "user", "content": "Name a lighthouse in France."}]
    turns = []  # (the worker that generated, tokens it took from its cache, the prompt's tokens)
    for turn in range(3):
        before = counters()
        status, reply = post(f"{fleet.url}/v1/chat/completions",
                             {"model": MODEL_ID, "messages": messages, "max_tokens": 8, "temperature": 0})
        assert status == 200, reply
        after = counters()
        # the worker that generated this turn's tokens (not one that finished a few of another request's)
        (worker,) = [i for i, (a, b) in enumerate(zip(after, before))
                     if a[0] - b[0] >= reply["usage"]["completion_tokens"]]
        turns.append((worker, after[worker][1] - before[worker][1], reply["usage"]["prompt_tokens"]))
        messages += [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"And another one, number {turn + 2}?"}]
    assert len({worker for worker, _, _ in turns}) == 1, turns
    for (_, _, previous_prompt), (_, cached, _) in zip(turns, turns[1:]):
        assert cached >= previous_prompt - 2 * 16, turns  # the whole previous prompt, to its last blocks
    # SMG follows each worker's prefix cache through its KV-cache events (SubscribeKvEvents)
    assert [metric(w.metrics_port, "genrpc_model_kv_event_streams") for w in fleet.workers] == [1.0, 1.0]


def test_requests_go_on_through_the_other_worker_when_one_dies(fleet):
    fleet.workers[1].proc.kill()
    fleet.workers[1].proc.wait(10)
    answered = 0
    deadline = time.monotonic() + 60
    while answered < 5 and time.monotonic() < deadline:
        try:
            status, body = post(f"{fleet.url}/v1/completions",
                                {"model": MODEL_ID, "prompt": f"Count to {answered + 3}:", "max_tokens": 4,
                                 "temperature": 0}, timeout=30)
        except (urllib.error.URLError, ConnectionError):
            status = 0
        if status == 200:
            answered += 1
        else:
            time.sleep(0.5)  # until SMG's health check takes the dead worker out
    assert answered == 5, fleet.smg_log()
