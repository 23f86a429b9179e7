"""Tenants and the prefix cache (part of `make bench`): a ~1,000-token system prompt that tenant A
has just sent, then tenant B's first token for the same prompt (another question after it), against
the same prompt cold, in the same minutes:

- cold: a system prompt no one has sent (a tag in its first token makes it unique);
- isolated: A sent it first, B has its own namespace (the default): B's first token should be a
  cold one's (no timing side channel);
- shared salt: A and B both name the same `cache_salt`: B's first token is a cached one's;
- own: A sends it again (its own namespace): the cached figure the isolation gives up across tenants.

Each round times the four in a rotated order; the report keeps each one's median over the rounds
and its ratio to cold, with the CPU it ran on.

    python -m bench.tenant_cache    (alone: writes bench/results/tenant_cache.json)
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import uuid

import grpc

from bench.memory_model import QUESTIONS, system_prompt
from genrpc.launch import ROOT, describe_cpu, metric, start_stack
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
ROUNDS = 5
KINDS = ["cold", "isolated", "shared_salt", "own"]


def ttft(stub, who: str, system: str, question: str, salt: str | None = None) -> float:
    config = pb.GenerationConfig(max_new_tokens=2, cache_salt=salt) if salt else pb.GenerationConfig(max_new_tokens=2)
    chat = pb.Chat(messages=[pb.Message(role="system", content=system), pb.Message(role="user", content=question)])
    started = time.perf_counter()
    for message in stub.GenerateStream(pb.GenerateStreamRequest(chat=chat, config=config), timeout=120,
                                       metadata=(("authorization", f"Bearer {who}"),)):
        if message.token_ids:
            return time.perf_counter() - started
    raise RuntimeError("no token")


def one(stub, kind: str, i: int) -> float:
    """B's (or for `own`, A's) first token for `kind`; A's preparing request is not timed."""
    system = system_prompt(uuid.uuid4().hex[:8])  # new for each measurement: nothing cached before
    question = QUESTIONS[i % len(QUESTIONS)]
    if kind == "cold":
        return ttft(stub, "tenant-b", system, question)
    salt = uuid.uuid4().hex if kind == "shared_salt" else None
    ttft(stub, "tenant-a", system, QUESTIONS[(i + 1) % len(QUESTIONS)], salt)
    return ttft(stub, "tenant-a" if kind == "own" else "tenant-b", system, question, salt)


def run(rounds: int = ROUNDS) -> dict:
    folder = tempfile.mkdtemp(prefix="genrpc-bench-tenants-")
    tokens = os.path.join(folder, "tokens")
    with open(tokens, "w") as f:
        f.write("tenant-a name=a\ntenant-b name=b\n")
    stack = start_stack(MODEL, gateway_args=("--auth-tokens-file", tokens))
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        with grpc.insecure_channel(stack.gateway.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            one(stub, "cold", 99)  # warm-up
            hits_before = metric(stack.model.metrics_port, "genrpc_model_prefix_cache_hit_tokens")
            for r in range(rounds):
                for k in range(len(KINDS)):
                    kind = KINDS[(r + k) % len(KINDS)]
                    seconds[kind].append(one(stub, kind, r * len(KINDS) + k))
            hits = metric(stack.model.metrics_port, "genrpc_model_prefix_cache_hit_tokens") - hits_before
    finally:
        stack.stop()
    medians = {kind: statistics.median(values) for kind, values in seconds.items()}
    return {
        "rounds": rounds, "prompt": "a ~1,000-token system prompt (bench/memory_model.py) and a question",
        "ttft_ms": {kind: round(medians[kind] * 1000, 1) for kind in KINDS},
        "ttft_ms_each": {kind: [round(s * 1000, 1) for s in values] for kind, values in seconds.items()},
        "vs_cold": {kind: round(medians[kind] / medians["cold"], 2) for kind in KINDS},
        "cached_tokens": hits, "cpu": describe_cpu(),
    }




def markdown(report: dict) -> str:
    rows = ["| B's first token for a prompt A just sent | TTFT p50 ms | vs cold |", "|---|---|---|"]
    names = {"cold": "cold (no one sent it)", "isolated": "isolated (default: each tenant its own cache)",
             "shared_salt": "shared `cache_salt`", "own": "A itself, again"}
    for kind in KINDS:
        rows.append(f"| {names[kind]} | {report['ttft_ms'][kind]} | {report['vs_cold'][kind]:.2f} |")
    rows.append(f"\n{report['rounds']} rounds, each kind's median; {report['cpu']}.")
    return "\n".join(rows)


if __name__ == "__main__":
    result = run()
    from bench import readme  # here: it imports this module for its markdown

    readme.save("tenant_cache", result)
    print(json.dumps(result, indent=2))
    print(markdown(result))
