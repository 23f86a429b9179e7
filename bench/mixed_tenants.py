"""Scheduling under mixed tenants (part of `make bench`), each figure against its idle baseline in
the same run:

- a long prompt does not hold the door: a short request's time to first token while a ~6,000-token
  prompt is prefilled, over the same request's idle TTFT (target <= 3x);
- a lone ~8,000-token prompt: its TTFT through the service over in-process generate()'s prefill of
  the same tokens (model forward with max_new_tokens=1), service / generate() / service (<= 1.0x);
- a flooding client: A sends 5 Generate calls of 64 prompts (max_new_tokens=4000, EOS ignored);
  B sends a 4-token Generate call a second with an 8 s deadline. B's calls all succeed, p50 within
  3x its idle latency; A is refused beyond its cap (--max-inflight-per-client, default 256); A's
  tokens/s over B's calls is reported (what fair steps, --tenant-slowdown, cost the flooder);
- priority: a priority-10 request during a burst of 96 default-priority streams, TTFT over idle
  (target <= 2x);
- the inter-token latency of a stream while a ~6,000-token prompt is prefilled beside it, over its
  idle inter-token latency (the --prefill-slowdown bound, 2x by default).

    python -m bench.mixed_tenants
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time

import grpc
import torch

from genrpc.launch import ROOT, metric, start_stack
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
SENTENCE = "The harbour master counted the boats that came in with the tide, and wrote each name in a ledger. "


def long_text(tokenizer, num_tokens: int) -> str:
    """Prose of about `num_tokens` tokens (the sentence repeated, numbered so no two are the same)."""
    per = len(tokenizer(SENTENCE).input_ids) + 3
    text = "".join(f"{i}. {SENTENCE}" for i in range(num_tokens // per + 1))
    ids = tokenizer(text).input_ids[:num_tokens]
    return tokenizer.decode(ids)


async def ttft(stub, prompt: str, client: str = "bench", priority: int = 0, max_new_tokens: int = 4) -> float:
    started = time.perf_counter()
    request = pb.GenerateStreamRequest(prompt=prompt, config=pb.GenerationConfig(
        max_new_tokens=max_new_tokens, ignore_eos=True, priority=priority))
    async for message in stub.GenerateStream(request, timeout=600, metadata=(("x-genrpc-client", client),)):
        if message.token_ids:
            return time.perf_counter() - started
    return float("nan")


async def idle_ttft(stub, n: int = 5) -> float:
    return statistics.median([await ttft(stub, "Say hello.") for _ in range(n)])


def fresh(prompt: str, label: str) -> str:
    """The prompt with its own first words, so that no earlier run's blocks are in the prefix cache
    (long prompts share cached blocks: the same prompt again is not prefilled again)."""
    return f"{label}: {prompt}"


async def long_prompt_door(stub, prompt: str) -> dict:
    idle = await idle_ttft(stub)
    loaded = []
    for round_ in range(3):
        long_task = asyncio.create_task(ttft(stub, fresh(prompt, f"Door {round_}"), "long", max_new_tokens=1))
        await asyncio.sleep(1.5)  # its prefill is underway (seconds long)
        loaded.append(await ttft(stub, "Say hello.", "short"))
        await long_task
    return {"idle_ttft_ms": round(idle * 1000, 1), "during_long_prefill_ttft_ms": [round(x * 1000, 1) for x in loaded],
            "ratio_p50": round(statistics.median(loaded) / idle, 2)}


async def stream_itl_beside_long_prefill(stub, prompt: str) -> dict:
    async def itls(during_long: bool) -> list[float]:
        request = pb.GenerateStreamRequest(prompt="Tell me a story.", config=pb.GenerationConfig(
            max_new_tokens=60, ignore_eos=True))
        gaps, last, long_task = [], None, None
        async for message in stub.GenerateStream(request, timeout=600, metadata=(("x-genrpc-client", "s"),)):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            if during_long and long_task is None and len(gaps) == 5:
                long_task = asyncio.create_task(ttft(stub, fresh(prompt, "Beside"), "long", max_new_tokens=1))
        if long_task:
            await long_task
        return gaps[8:] if during_long else gaps

    idle = statistics.median(await itls(False))
    beside = statistics.median(await itls(True))
    return {"idle_itl_ms": round(idle * 1000, 1), "beside_long_prefill_itl_ms": round(beside * 1000, 1),
            "ratio_p50": round(beside / idle, 2)}


async def flood(address: str, model_metrics_port: int | None = None) -> dict:
    """B's latency beside A's flood; with the model service's metrics port, also A's tokens/s over B's
    ten calls (what fair steps cost the flooder: `--tenant-slowdown`)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        async def b_call() -> tuple[str, float]:
            started = time.perf_counter()
            try:
                await stub.Generate(pb.GenerateRequest(prompts=["Say hello."], config=pb.GenerationConfig(
                    max_new_tokens=4, ignore_eos=True)), timeout=8, metadata=(("x-genrpc-client", "B"),))
                return "OK", time.perf_counter() - started
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, time.perf_counter() - started

        idle = statistics.median([(await b_call())[1] for _ in range(5)])
        a_calls = [stub.Generate(pb.GenerateRequest(prompts=[f"Story number {i}-{j}:" for j in range(64)],
                                                    config=pb.GenerationConfig(max_new_tokens=4000, ignore_eos=True)),
                                 timeout=600, metadata=(("x-genrpc-client", "A"),)) for i in range(5)]
        a_tasks = [asyncio.ensure_future(c) for c in a_calls]
        await asyncio.sleep(3)  # A's sequences are admitted and running
        b_results = []
        generated = metric(model_metrics_port, "genrpc_model_generated_tokens_total") if model_metrics_port else 0
        started = time.perf_counter()
        for _ in range(10):
            b_results.append(await b_call())
            await asyncio.sleep(max(0.0, 1 - b_results[-1][1]))
        a_rate = None
        if model_metrics_port:
            a_tokens = (metric(model_metrics_port, "genrpc_model_generated_tokens_total") - generated
                        - 4 * len(b_results))
            a_rate = round(a_tokens / (time.perf_counter() - started), 1)
        a_codes = []
        for call, task in zip(a_calls, a_tasks):
            if not task.done():
                call.cancel()
            try:
                await task
                a_codes.append("OK")
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
                a_codes.append(exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "CANCELLED")
    ok = [t for code, t in b_results if code == "OK"]
    return {"b_idle_ms": round(idle * 1000, 1), "b_codes": [c for c, _ in b_results],
            "b_latency_ms": [round(t * 1000, 1) for _, t in b_results],
            "b_p50_over_idle": round(statistics.median(ok) / idle, 2) if ok else None,
            "a_codes": a_codes, "a_tokens_per_s": a_rate}


async def priority_burst(stub) -> dict:
    idle = await idle_ttft(stub)
    burst = [asyncio.create_task(ttft(stub, f"Story number {i}:", "burst", max_new_tokens=64)) for i in range(96)]
    await asyncio.sleep(2.0)  # the burst is admitted (64 running) and 32 wait
    urgent = [await ttft(stub, "Say hello.", "urgent", priority=10) for _ in range(3)]
    await asyncio.gather(*burst)
    return {"idle_ttft_ms": round(idle * 1000, 1), "urgent_ttft_ms": [round(x * 1000, 1) for x in urgent],
            "ratio_p50": round(statistics.median(urgent) / idle, 2)}


def service_part(prompts: dict, with_lone: bool = True) -> dict:
    stack = start_stack(MODEL)
    out: dict = {}
    try:
        async def go():
            async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                await idle_ttft(stub, 2)  # warm-up
                if with_lone:
                    out["lone_8000_ttft_s"] = round(await ttft(stub, prompts["8000"], max_new_tokens=1), 2)
                    print(f"lone 8000-token prompt: {out['lone_8000_ttft_s']} s", flush=True)
                    return
                out["long_prompt_door"] = await long_prompt_door(stub, prompts["6000"])
                print(f"short request during a 6000-token prefill: {out['long_prompt_door']}", flush=True)
                out["itl_beside_long_prefill"] = await stream_itl_beside_long_prefill(stub, prompts["6000"])
                print(f"stream ITL beside a 6000-token prefill: {out['itl_beside_long_prefill']}", flush=True)
                out["priority"] = await priority_burst(stub)
                print(f"priority 10 during 96 streams: {out['priority']}", flush=True)
            out["flood"] = await flood(stack.gateway.address, stack.model.metrics_port)
            print(f"flood: {out['flood']}", flush=True)
            out["preemptions"] = metric(stack.model.metrics_port, "genrpc_model_preemptions")

        asyncio.run(go())
    finally:
        stack.stop()
    return out


def generate_prefill_s(prompt: str) -> float:
    from transformers import AutoTokenizer

    from model_svc.loader import load_model

    loaded = load_model(MODEL, "bfloat16", "4bit", "cpu")
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    enc = tokenizer([prompt], return_tensors="pt")
    with torch.inference_mode():
        loaded.model.generate(**tokenizer(["Hello"], return_tensors="pt"), max_new_tokens=2)  # warm-up
        started = time.perf_counter()
        loaded.model.generate(**enc, max_new_tokens=1, do_sample=False)
        return time.perf_counter() - started


def run() -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    prompts = {"6000": long_text(tokenizer, 6000), "8000": long_text(tokenizer, 8000)}
    report = service_part(prompts, with_lone=False)
    lone = [service_part(prompts)["lone_8000_ttft_s"]]
    generate = [round(generate_prefill_s(prompts["8000"]), 2)]
    print(f"generate() prefill of the 8000-token prompt: {generate[0]} s", flush=True)
    lone.append(service_part(prompts)["lone_8000_ttft_s"])
    report["lone_8000"] = {"service_ttft_s": lone, "generate_prefill_s": generate,
                           "ratio": round(min(lone) / min(generate), 2)}
    return report


def markdown(report: dict) -> str:
    door, itl, prio, fl, lone = (report["long_prompt_door"], report["itl_beside_long_prefill"], report["priority"],
                                 report["flood"], report["lone_8000"])
    ok = fl["b_codes"].count("OK")
    return "\n".join([
        "| workload | result | target |", "|---|---|---|",
        f"| short request while a 6,000-token prompt is prefilled | TTFT p50 {door['ratio_p50']:.2f}x idle "
        f"({statistics.median(door['during_long_prefill_ttft_ms']):.0f} vs {door['idle_ttft_ms']:.0f} ms) | <= 3x |",
        f"| a stream's inter-token latency beside that prefill | {itl['ratio_p50']:.2f}x idle "
        f"({itl['beside_long_prefill_itl_ms']:.0f} vs {itl['idle_itl_ms']:.0f} ms) | ~2x |",
        f"| lone 8,000-token prompt | TTFT {min(lone['service_ttft_s']):.1f} s vs generate() prefill "
        f"{min(lone['generate_prefill_s']):.1f} s: {lone['ratio']:.2f}x | <= 1.0x |",
        f"| A floods (5 x 64 prompts, 4,000 tokens); B: 4 tokens a second, 8 s deadline | B {ok}/{len(fl['b_codes'])} "
        f"OK, p50 {fl['b_p50_over_idle']}x idle; A: {', '.join(fl['a_codes'])}, {fl['a_tokens_per_s']} tokens/s "
        "meanwhile | B all OK, <= 3x; A refused past cap |",
        f"| priority 10 during a burst of 96 streams | TTFT p50 {prio['ratio_p50']:.2f}x idle "
        f"({statistics.median(prio['urgent_ttft_ms']):.0f} vs {prio['idle_ttft_ms']:.0f} ms) | <= 2x |",
    ])


def main() -> None:
    report = run()
    print(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
