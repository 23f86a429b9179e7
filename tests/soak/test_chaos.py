"""`make soak`: mixed load against 2 model workers and 2 tokenizers behind one gateway while one of
the four is killed (SIGKILL) and restarted at random every 1-3 minutes, and clients cancel at random.

Every request must end with OK, the client's own cancel, or a status a retry can succeed after
(UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED at its deadline); none may outlive its deadline
by more than 2 s; a stream that ends OK must carry its finish reason and every token it counted
(nothing lost silently); the gateway's memory stays flat and nothing is left behind. Writes a JSON
report (GENRPC_SOAK_REPORT, default bench/results/soak.json) with the counts by status.
GENRPC_SOAK_MINUTES sets the length (default 20), GENRPC_SOAK_KILL_EVERY the range of seconds
between kills (default 60,180).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter

import grpc
import pytest

from genrpc.launch import ROOT, describe_cpu, metric, start_service, wait_serving
from genrpc.pki import make_credentials
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc
from tests.helpers import MODEL, wait_for

MINUTES = float(os.environ.get("GENRPC_SOAK_MINUTES", "20"))
KILL_EVERY_S = tuple(float(x) for x in os.environ.get("GENRPC_SOAK_KILL_EVERY", "60,180").split(","))
REPORT = os.environ.get("GENRPC_SOAK_REPORT", os.path.join(ROOT, "bench", "results", "soak.json"))
NUM_CLIENTS = 8
DEADLINE_S = 30.0
RETRYABLE = {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}


class Backends:
    """Two tokenizers and two model workers on fixed ports, each restartable on its port."""

    def __init__(self, folder: str):
        self.credentials = make_credentials(folder)
        self.kinds = ["tokenizer_svc", "tokenizer_svc", "model_svc", "model_svc"]
        self.services = [self._start(kind) for kind in self.kinds]
        self.lock = threading.Lock()

    def _start(self, kind: str, port: int = 0):
        return start_service(kind, "--model", MODEL, "--port", str(port), *self.credentials.server_flags())

    def addresses(self, kind: str) -> str:
        return ",".join(s.address for s, k in zip(self.services, self.kinds) if k == kind)

    def kill_and_restart(self, index: int) -> float:
        with self.lock:
            old = self.services[index]
            old.stop(signal.SIGKILL)
            started = time.monotonic()
            self.services[index] = self._start(self.kinds[index], old.port)
            return time.monotonic() - started

    def models(self):
        with self.lock:
            return [s for s, k in zip(self.services, self.kinds) if k == "model_svc"]

    def stop(self):
        for service in self.services:
            service.stop()


def one_request(stub, rng: random.Random, i: int) -> tuple[str, float, str]:
    """(outcome, seconds, problem): outcome OK, CANCELLED_BY_CLIENT or a status code's name."""
    config = pb.GenerationConfig(max_new_tokens=rng.randint(4, 64), ignore_eos=rng.random() < 0.7, seed=i,
                                 do_sample=rng.random() < 0.5, stop=["\n\n"] if rng.random() < 0.2 else [])
    kind = rng.choice(["unary", "stream", "cancel"])
    started = time.monotonic()
    problem = ""
    try:
        if kind == "unary":
            reply = stub.Generate(pb.GenerateRequest(prompts=[f"Item {i}:"] * rng.randint(1, 3), config=config),
                                  timeout=DEADLINE_S)
            if any(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in reply.completions):
                problem = "a completion without a finish reason"
        elif kind == "stream":
            responses = list(stub.GenerateStream(pb.GenerateStreamRequest(prompt=f"Item {i}:", config=config),
                                                 timeout=DEADLINE_S))
            last = responses[-1]
            received = sum(len(r.token_ids) for r in responses)
            if last.finish_reason == pb.FINISH_REASON_UNSPECIFIED or last.generated_tokens != received:
                problem = f"stream lost tokens: {received} received, {last.generated_tokens} counted"
        else:
            call = stub.GenerateStream(pb.GenerateStreamRequest(prompt=f"Item {i}:", config=config), timeout=DEADLINE_S)
            for n, _ in enumerate(call):
                if n >= rng.randint(0, 8):
                    break
            call.cancel()
            return "CANCELLED_BY_CLIENT", time.monotonic() - started, ""
        return "OK", time.monotonic() - started, problem
    except grpc.RpcError as exc:
        return exc.code().name, time.monotonic() - started, ""


@pytest.mark.slow
@pytest.mark.timeout(MINUTES * 60 + 600)
def test_chaos_soak():
    folder = tempfile.mkdtemp(prefix="genrpc-soak-")  # its own: pytest prunes old tmp_path folders meanwhile
    backends = Backends(folder)
    gateway = start_service("gateway", "--tokenizer-addrs", backends.addresses("tokenizer_svc"),
                            "--model-addrs", backends.addresses("model_svc"), *backends.credentials.client_flags())
    outcomes: Counter[str] = Counter()
    problems: list[str] = []
    kills: list[dict] = []
    overdue: list[float] = []
    stop_at = time.monotonic() + MINUTES * 60
    try:
        wait_serving(gateway.address)
        with grpc.insecure_channel(gateway.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            wait_for(lambda: stub.ModelInfo(pb.ModelInfoRequest(), timeout=5).num_model_workers == 2, timeout=60)
            for i in range(20):  # warm up before the memory baseline
                one_request(stub, random.Random(i), i)
            rss_before = gateway.rss_bytes()
            lock = threading.Lock()
            counter = iter(range(10**9))

            def client(seed: int) -> None:
                rng = random.Random(seed)
                while time.monotonic() < stop_at:
                    with lock:
                        i = next(counter)
                    outcome, seconds, problem = one_request(stub, rng, i)
                    with lock:
                        outcomes[outcome] += 1
                        if problem:
                            problems.append(problem)
                        if seconds > DEADLINE_S + 2:
                            overdue.append(seconds)

            def killer() -> None:
                rng = random.Random(7)
                while True:
                    wait = rng.uniform(*KILL_EVERY_S)
                    if time.monotonic() + wait > stop_at - 30:  # the last half minute runs undisturbed
                        return
                    time.sleep(wait)
                    index = rng.randrange(4)
                    try:
                        took = backends.kill_and_restart(index)
                    except Exception as exc:  # noqa: BLE001 - reported by the test
                        problems.append(f"restarting {backends.kinds[index]} failed: {exc}"[:2000])
                        return
                    kills.append({"at_s": round(MINUTES * 60 - (stop_at - time.monotonic())),
                                  "service": backends.kinds[index], "restart_s": round(took, 1)})

            threads = [threading.Thread(target=client, args=(seed,)) for seed in range(NUM_CLIENTS)]
            threads.append(threading.Thread(target=killer))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wait_for(lambda: metric(gateway.metrics_port, "genrpc_gateway_inflight_sequences") == 0, timeout=10)
            rss_after = gateway.rss_bytes()
            models = backends.models()
            left = {name: sum(metric(m.metrics_port, name) for m in models) for name in (
                "genrpc_model_running_sequences", "genrpc_model_waiting_sequences", "genrpc_model_kv_blocks_used",
                "genrpc_model_owned_sequences")}
            left["genrpc_gateway_tracked_sequences"] = metric(gateway.metrics_port, "genrpc_gateway_tracked_sequences")
    finally:
        gateway.stop()
        backends.stop()
        shutil.rmtree(folder, ignore_errors=True)
    report = {
        "minutes": MINUTES, "clients": NUM_CLIENTS, "deadline_s": DEADLINE_S, "requests": sum(outcomes.values()),
        "outcomes": dict(outcomes), "kills": kills, "problems": problems[:20], "overdue_s": overdue[:20],
        "gateway_rss_mib": [round(rss_before / 2**20), round(rss_after / 2**20)], "left_behind": left,
        "cpu": describe_cpu(),
    }
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    with open(REPORT, "w") as f:
        json.dump(report, f, indent=1)
    print("\nchaos soak:", json.dumps(report))
    allowed = {"OK", "CANCELLED_BY_CLIENT", "DEADLINE_EXCEEDED", *RETRYABLE}
    assert set(outcomes) <= allowed, outcomes
    assert outcomes["OK"] > 0.5 * sum(outcomes.values())
    assert not problems and not overdue
    assert len(kills) >= max(1, int(MINUTES * 60 / KILL_EVERY_S[1]) - 1)
    assert not any(left.values()), left
    assert rss_after - rss_before < 100 * 2**20
