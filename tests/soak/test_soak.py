"""`make soak`: thousands of mixed requests, a fifth cancelled mid-stream; nothing may leak.

Prints the figures: requests, cancels, memory of each service before and after.
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import grpc
import pytest

from genrpc.v1 import generation_pb2 as pb
from tests.helpers import metric, wait_for

NUM_REQUESTS = int(os.environ.get("GENRPC_SOAK_REQUESTS", "3000"))


@pytest.mark.slow
def test_soak(stack, stub):
    rss_before = {s.module: s.rss_bytes() for s in stack.services}

    def one(i: int) -> str:
        config = pb.GenerationConfig(max_new_tokens=2 + i % 24, ignore_eos=i % 3 != 0, seed=i,
                                     do_sample=i % 2 == 0, stop=["\n\n"] if i % 7 == 0 else [])
        try:
            if i % 5 == 0:
                call = stub.GenerateStream(pb.GenerateStreamRequest(prompt=f"Item {i}:", config=config), timeout=120)
                next(call)
                call.cancel()
                return "cancelled"
            if i % 4 == 0:
                list(stub.GenerateStream(pb.GenerateStreamRequest(prompt=f"Item {i}:", config=config), timeout=120))
            else:
                stub.Generate(pb.GenerateRequest(prompts=[f"Item {i}:"] * (1 + i % 3), config=config), timeout=120)
            return "ok"
        except grpc.RpcError as exc:
            return exc.code().name

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(one, range(NUM_REQUESTS)))
    elapsed = time.monotonic() - started
    wait_for(lambda: metric(stack.model.metrics_port, "genrpc_model_running_sequences") == 0, timeout=10)
    rss_after = {s.module: s.rss_bytes() for s in stack.services}
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    print(f"\nsoak: {NUM_REQUESTS} requests in {elapsed:.0f}s, outcomes {counts}")
    for module in rss_before:
        print(f"  {module}: RSS {rss_before[module] / 2**20:.0f} MiB -> {rss_after[module] / 2**20:.0f} MiB")
    assert counts.get("ok", 0) + counts.get("cancelled", 0) == NUM_REQUESTS
    assert metric(stack.model.metrics_port, "genrpc_model_kv_cache_used_tokens") == 0
    assert metric(stack.model.metrics_port, "genrpc_model_waiting_sequences") == 0
    for module in rss_before:
        assert rss_after[module] - rss_before[module] < 300 * 2**20, module
