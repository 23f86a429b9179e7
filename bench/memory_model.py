"""The paged KV cache's workloads (part of `make bench`), each against a baseline in the same run.

- long max_new_tokens: 32 streams asking for 8,000 new tokens each, which the client stops after
  128, against 32 streams asking for 128: how many run at once (the running-sequences gauge,
  sampled) and the aggregate tokens/s of each, in alternating order;
- shared prefix: a ~950-token system prompt followed by 16 different questions, one after another
  and then as a burst of 16, with the prefix cached (after one request that computed it) against
  cold (the same lengths, each system prompt made unique by a tag in its first token);
- a 4-turn chat that re-sends its history: turn 4's first token against the same prompt cold.
The prefix cache's hit rate comes from the model service's counters.

    python -m bench.memory_model
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time
import uuid

import grpc

from bench.clients import StreamResult
from genrpc.launch import ROOT, metric, start_stack
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
STREAMS = 32
STOP_AFTER = 128
LONG_MAX_NEW = 8000
SENTENCES = ["The bakery opens at seven and closes at six, except on Sundays, when it closes at noon.",
             "Sourdough is baked every morning; rye and spelt loaves come out of the oven on Tuesdays and Fridays.",
             "Cakes must be ordered two days ahead, and the shop can write a short message on them for free.",
             "Customers with allergies should ask the staff, who keep a list of every ingredient in each product.",
             "Deliveries are made within the city for orders above thirty euros, between nine and five.",
             "The assistant answers briefly, politely, and never invents prices, products or opening hours."]
QUESTIONS = ["When do you open on Sunday?", "Do you have rye bread today?", "Can I order a birthday cake?",
             "Is there anything without nuts?", "Do you deliver to the harbour?", "How much is a baguette?",
             "Are the croissants vegan?", "Can I pay by card?", "Do you sell gift vouchers?",
             "What is in the spelt loaf?", "Can you write a name on a cake?", "Are you open on holidays?",
             "Do you bake gluten-free bread?", "How early should I order for Saturday?",
             "Do you have a loyalty card?", "Can I pick up an order after six?"]


def system_prompt(tag: str = "") -> str:
    """~950 tokens of instructions; a tag at the very start makes the whole prefix unique (cold)."""
    body = " ".join(SENTENCES * 7)
    return f"[{tag}] {body}" if tag else f"[shop] {body}"


async def stream(stub, request, stop_after: int | None = None) -> StreamResult:
    result = StreamResult(start=time.perf_counter())
    call = stub.GenerateStream(request, timeout=600)
    try:
        async for message in call:
            n = len(message.token_ids)
            if n and result.num_tokens == 0:
                result.ttft = time.perf_counter() - result.start
            result.num_tokens += n
            if stop_after and result.num_tokens >= stop_after:
                call.cancel()  # the client has what it wanted
                break
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            result.code = exc.code().name
    result.end = time.perf_counter()
    return result


def long_max_new_tokens(address: str, model_port: int) -> dict:
    """32 streams stopped after 128 tokens, asking for 8,000 or for 128, alternating."""
    prompts = [f"Write a long story about {q.lower()}" for q in QUESTIONS] * 2

    def run(max_new: int) -> dict:
        running: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                running.append(metric(model_port, "genrpc_model_running_sequences"))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        async def burst():
            async with grpc.aio.insecure_channel(address) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                started = time.perf_counter()
                results = await asyncio.gather(*[stream(stub, pb.GenerateStreamRequest(
                    prompt=p, config=pb.GenerationConfig(max_new_tokens=max_new, ignore_eos=True)), STOP_AFTER)
                    for p in prompts])
                return results, time.perf_counter() - started

        results, wall = asyncio.run(burst())
        done.set()
        sampler.join()
        return {"max_new_tokens": max_new, "tokens_per_s": round(sum(r.num_tokens for r in results) / wall, 1),
                "max_running": max(running), "codes": sorted({r.code for r in results})}

    rounds = []
    for order in ((LONG_MAX_NEW, STOP_AFTER), (STOP_AFTER, LONG_MAX_NEW)):
        for max_new in order:
            rounds.append(run(max_new))
            print(f"long max_new_tokens: {rounds[-1]}", flush=True)
    long = [r for r in rounds if r["max_new_tokens"] == LONG_MAX_NEW]
    short = [r for r in rounds if r["max_new_tokens"] == STOP_AFTER]
    return {"rounds": rounds, "max_running_long": max(r["max_running"] for r in long),
            "tokens_per_s_long_over_short": round(statistics.median(r["tokens_per_s"] for r in long)
                                                  / statistics.median(r["tokens_per_s"] for r in short), 3)}


async def _ttfts(address: str, requests: list, concurrent: bool) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        if concurrent:
            results = await asyncio.gather(*[stream(stub, r, stop_after=1) for r in requests])
        else:
            results = [await stream(stub, r, stop_after=1) for r in requests]
        return [round(r.ttft * 1000, 1) for r in results]


def chat_request(system: str, turns: list[tuple[str, str]], question: str) -> pb.GenerateStreamRequest:
    messages = [pb.Message(role="system", content=system)]
    for user, assistant in turns:
        messages += [pb.Message(role="user", content=user), pb.Message(role="assistant", content=assistant)]
    messages.append(pb.Message(role="user", content=question))
    return pb.GenerateStreamRequest(chat=pb.Chat(messages=messages), config=pb.GenerationConfig(max_new_tokens=1))


def shared_prefix(address: str, model_port: int) -> dict:
    def requests(tags: list[str]) -> list:
        return [pb.GenerateStreamRequest(prompt=system_prompt(tag) + "\nQuestion: " + q,
                                         config=pb.GenerationConfig(max_new_tokens=1))
                for tag, q in zip(tags, QUESTIONS)]

    queried = metric(model_port, "genrpc_model_prefix_cache_queried_tokens")
    hit = metric(model_port, "genrpc_model_prefix_cache_hit_tokens")
    out: dict = {}
    asyncio.run(_ttfts(address, requests([""])[:1], False))  # computes the shared prefix once
    for kind, concurrent in (("sequential", False), ("burst", True)):
        cold = asyncio.run(_ttfts(address, requests([uuid.uuid4().hex[:8] for _ in QUESTIONS]), concurrent))
        warm = asyncio.run(_ttfts(address, requests([""] * len(QUESTIONS)), concurrent))
        out[kind] = {"cold_ttft_ms": cold, "cached_ttft_ms": warm,
                     "cached_over_cold_p50": round(statistics.median(warm) / statistics.median(cold), 3)}
        print(f"shared prefix, {kind}: p50 cold {statistics.median(cold)} ms, cached {statistics.median(warm)} ms",
              flush=True)
    # A 4-turn chat: each turn re-sends the history with the model's own earlier answers.
    system = " ".join(SENTENCES * 2)
    turns: list[tuple[str, str]] = []
    asked = QUESTIONS[:4]
    for question in asked[:3]:
        reply = asyncio.run(_answer(address, chat_request(system, turns, question)))
        turns.append((question, reply))
    turn4 = asyncio.run(_ttfts(address, [chat_request(system, turns, asked[3]) for _ in range(3)], False))
    cold4 = asyncio.run(_ttfts(address, [chat_request(f"[{uuid.uuid4().hex[:8]}] " + system, turns, asked[3])
                                         for _ in range(3)], False))
    out["chat_turn4"] = {"cold_ttft_ms": cold4, "cached_ttft_ms": turn4,
                         "cached_over_cold": round(statistics.median(turn4) / statistics.median(cold4), 3)}
    print(f"chat turn 4: cold {cold4} ms, cached {turn4} ms", flush=True)
    queried = metric(model_port, "genrpc_model_prefix_cache_queried_tokens") - queried
    hit = metric(model_port, "genrpc_model_prefix_cache_hit_tokens") - hit
    out["hit_rate"] = round(hit / queried, 3) if queried else 0.0
    return out


async def _answer(address: str, request: pb.GenerateStreamRequest) -> str:
    request.config.max_new_tokens = 48
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        return "".join([m.text async for m in stub.GenerateStream(request, timeout=120)])


def run() -> dict:
    stack = start_stack(MODEL)
    try:
        address, port = stack.gateway.address, stack.model.metrics_port
        asyncio.run(_ttfts(address, [pb.GenerateStreamRequest(prompt="Hello")], False))  # warm-up
        report = {"long_max_new_tokens": long_max_new_tokens(address, port),
                  "shared_prefix": shared_prefix(address, port)}
        report["model_rss_mb"] = round(stack.model.rss_bytes() / 2**20, 1)
        return report
    finally:
        stack.stop()


def markdown(report: dict) -> str:
    long = report["long_max_new_tokens"]
    shared = report["shared_prefix"]
    rows = ["| workload | result | target |", "|---|---|---|",
            f"| 32 streams, max_new_tokens=8000 stopped at 128 | {long['max_running_long']:.0f} running at once; "
            f"tokens/s {long['tokens_per_s_long_over_short']:.2f}x the max_new_tokens=128 run | 32; within 10% |"]
    for kind in ("sequential", "burst"):
        s = shared[kind]
        rows.append(f"| ~950-token system prompt + 16 questions, {kind} | TTFT p50 cached "
                    f"{statistics.median(s['cached_ttft_ms']):.0f} ms vs cold "
                    f"{statistics.median(s['cold_ttft_ms']):.0f} ms: "
                    f"{s['cached_over_cold_p50']:.2f}x | <= 0.15x |")
    c = shared["chat_turn4"]
    rows.append(f"| 4-turn chat, turn 4 | {statistics.median(c['cached_ttft_ms']):.0f} ms vs cold "
                f"{statistics.median(c['cold_ttft_ms']):.0f} ms: {c['cached_over_cold']:.2f}x | <= 0.25x |")
    rows.append(f"| prefix-cache hit rate over these | {shared['hit_rate']:.0%} of queried tokens | |")
    return "\n".join(rows)


def main() -> None:
    report = run()
    print(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
