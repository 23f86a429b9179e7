"""LoRA adapters (`python -m bench.lora`, writes bench/results/lora-<build>.json, one file per kind
of CPU as the native kernel is built for it: avx2, avx512-bf16): one model service started
with 8 rank-16 adapters on every projection (made with peft from random weights, as the tests make
them), the same streams with and without adapters, back to back in each of 4 rounds (which goes
first alternating); the ratio is the median of the rounds' ratios, robust to the machine's drift:

- 8 streams, each with a different adapter, against 8 streams of the base model (target >= 0.8x);
- 32 streams over 4 adapters against 32 base streams (target >= 0.8x);
- an adapter's load time (reading PEFT's files, checking and packing them for the native kernel).
Streams: 128 greedy tokens each, EOS ignored, prompt lookup off (so both sides compute the same
number of rows).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time

import grpc

from genrpc.launch import ROOT, describe_cpu, start_stack
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
RESULTS = os.path.join(ROOT, "bench", "results")
NEW_TOKENS, RANK, ADAPTERS = 128, 16, 8
TOPICS = ["a lighthouse keeper", "a robot learning to paint", "the history of tea", "a city under the sea",
          "how rain forms", "a chess tournament", "a dragon who collects clocks", "the first day of school"]
TARGET = 0.8


async def burst(stub, adapters: list[str]) -> float:
    """len(adapters) streams at once (adapter i for stream i; "" the base model): tokens per second."""
    async def one(i: int, adapter: str) -> int:
        config = pb.GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True, prompt_lookup_num_tokens=0,
                                     adapter=adapter)
        request = pb.GenerateStreamRequest(prompt=f"Write a long story about {TOPICS[i % len(TOPICS)]}.",
                                           config=config)
        return sum([len(m.token_ids) async for m in stub.GenerateStream(request, timeout=600)])

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*[one(i, a) for i, a in enumerate(adapters)]))
    return tokens / (time.perf_counter() - started)


def load_seconds(path: str) -> float:
    """Reading, checking and packing one adapter (what --lora does per adapter at start)."""
    from transformers import AutoConfig

    from model_svc.engine import lora

    config = AutoConfig.from_pretrained(MODEL)
    kernel = lora.load_kernel()
    started = time.perf_counter()
    adapter = lora.load("x", path, config)
    lora.Adapters([adapter], kernel)
    return time.perf_counter() - started


def run(rounds: int = 4) -> dict:
    from tests.lora_adapters import make_adapter

    folder = tempfile.mkdtemp(prefix="genrpc-bench-lora-")
    paths = {f"a{i}": make_adapter(os.path.join(folder, f"a{i}"), seed=i, rank=RANK) for i in range(ADAPTERS)}
    load_s = min(load_seconds(paths["a0"]) for _ in range(3))
    flags = tuple(arg for name, path in paths.items() for arg in ("--lora", f"{name}={path}"))
    workloads = {"8_streams_8_adapters": [f"a{i}" for i in range(8)],
                 "32_streams_4_adapters": [f"a{i % 4}" for i in range(32)]}
    results: dict[str, dict[str, list[float]]] = {k: {"base": [], "adapters": []} for k in workloads}
    stack = start_stack(MODEL, model_args=flags)
    try:
        async def measure() -> None:
            async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                await burst(stub, ["", "a0"])  # warm-up
                for r in range(rounds):
                    for name, adapters in workloads.items():
                        sides = (("base", "adapters") if r % 2 == 0 else ("adapters", "base"))
                        for side in sides:
                            rate = await burst(stub, [""] * len(adapters) if side == "base" else adapters)
                            results[name][side].append(rate)
                            print(f"lora round {r}: {name} {side}: {rate:.1f} tok/s", flush=True)
        asyncio.run(measure())
    finally:
        stack.stop()
    report = {"rank": RANK, "adapters": ADAPTERS, "new_tokens": NEW_TOKENS, "rounds": rounds,
              "load_ms": round(load_s * 1000, 1), "cpu": describe_cpu()}
    for name, sides in results.items():
        # each round's two sides ran back to back: its ratio holds through the machine's drift, which
        # moves both; the median of the rounds' ratios, and each side's median tokens/s beside it
        ratios = [a / b for a, b in zip(sides["adapters"], sides["base"])]
        report[name] = {"base_tokens_per_s": round(statistics.median(sides["base"]), 1),
                        "adapter_tokens_per_s": round(statistics.median(sides["adapters"]), 1),
                        "ratio": round(statistics.median(ratios), 2), "ratio_each": [round(r, 2) for r in ratios],
                        "base_each": [round(v, 1) for v in sides["base"]],
                        "adapter_each": [round(v, 1) for v in sides["adapters"]]}
    return report


LABELS = {"8_streams_8_adapters": "8 streams, each its own adapter",
          "32_streams_4_adapters": "32 streams over 4 adapters"}


def markdown(report: dict) -> str:
    rows = ["| workload | base model tok/s | with adapters tok/s | ratio | target |", "|---|---|---|---|---|"]
    for key, label in LABELS.items():
        r = report[key]
        rows.append(f"| {label} | {r['base_tokens_per_s']} | {r['adapter_tokens_per_s']} | {r['ratio']:.2f}x | "
                    f">= {TARGET}x |")
    how = (f"{report['rounds']} rounds, the sides back to back and alternating which goes first; tokens/s the "
           f"median of each side, the ratio the median of the rounds' own"
           if "ratio_each" in next(iter(report[key] for key in LABELS)) else
           f"Best of {report['rounds']} alternating rounds")  # a run from before the rounds' own ratios
    rows.append(f"\nRank-{report['rank']} adapters on all seven projections; loading one (read, checked, packed): "
                f"{report['load_ms']} ms. {how}; {report['cpu']}.")
    return "\n".join(rows)


def main() -> dict:
    result = run()
    from bench import readme  # here: it imports this module for its markdown

    readme.save(readme.per_build("lora"), result)
    print(json.dumps(result, indent=2))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
