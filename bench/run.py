"""`make bench`: the service against in-process transformers generate(), same model, prompts
and dtype, in one run.

In each of `--repeats` rounds (default 3):
1. Starts the three services (default flags: 4-bit nf4, bfloat16 compute) and drives them with
   N concurrent streaming clients (N = 1, 4, 16, 32; 128 new tokens each, EOS ignored; the one
   stream makes five requests one after another, the N streams three bursts of N, with three lone
   requests before and after each burst that time the single-stream first token in the same
   minutes, for the TTFT ratio at 16); in the
   first round also a run with arrivals spread over time and mixed lengths, and a 1,000-request
   run that samples the model service's memory.
2. Stops the stack and runs in-process generate() on the same prompts, model and dtype: batch 1
   one after another, and one static left-padded batch of N.
Each point keeps its best round, and the rounds alternate the two sides: this machine's speed
drifts by up to 2x from minute to minute (shared cores), and back-to-back repeats of one side
could all land in a slow minute the other side never saw.
Then the CPU-contention section (bench/cpu_contention.py: the thread policies idle, beside a busy
neighbour and under a CPU quota), the memory-model workloads (bench/memory_model.py: long
max_new_tokens, a shared system prompt, a multi-turn chat) and the scheduling ones
(bench/mixed_tenants.py: a long prompt beside short ones, a flooding client, priorities), the prefix cache
between tenants (bench/tenant_cache.py: cold, isolated, a shared salt), speculative
decoding on and off (bench/speculative.py: input-grounded and free-text prompts, 1 and 16 streams, the
outputs compared), structured output's mask cost and several samples per prompt (bench/structured.py),
and the roofline (bench/roofline.py: each point against its bandwidth or compute bound on this CPU); it
writes bench/results/latest.json, latest.png, cpu_contention.png and speculative.png. Last, beam search
(bench/beams.py) and LoRA adapters (bench/lora.py), each into its own results file.

    python -m bench.run [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time

import torch

from bench import (
    beams,
    cpu_contention,
    lora,
    memory_model,
    mixed_tenants,
    roofline,
    speculative,
    structured,
    tenant_cache,
)
from bench.clients import run_streams
from genrpc.launch import ROOT, describe_cpu, start_stack

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
RESULTS = os.path.join(ROOT, "bench", "results")
TOPICS = ["a lighthouse keeper", "a robot learning to paint", "the history of tea", "a city under the sea",
          "how rain forms", "a chess tournament", "a dragon who collects clocks", "the first day of school"]


SINGLE_STREAM_REQUESTS = 5  # the one-stream TTFT is their median (a 12-token prompt; the 16-stream median: 12.5)
PROBES = 3  # lone requests before and after each burst of N
PROBE_NEW_TOKENS = 4  # a single-stream TTFT probe beside each burst: its first token is all it is for
BURSTS = 3  # bursts of N per round: one burst's p50 moves a lot with this machine's minute-to-minute speed


def prompts_for(n: int) -> list[str]:
    return [f"Write a long story about {TOPICS[i % len(TOPICS)]}" + (" in great detail" * (i % 3)) + "."
            for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(results, wall: float) -> dict:
    ttfts = [r.ttft for r in results if r.num_tokens]
    itls = [x for r in results for x in r.itls]
    tokens = sum(r.num_tokens for r in results)
    return {
        "num_requests": len(results), "num_tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1), "ttft_p99_ms": round(percentile(ttfts, 99) * 1000, 1),
        "itl_p50_ms": round(percentile(itls, 50) * 1000, 1), "itl_p99_ms": round(percentile(itls, 99) * 1000, 1),
        "codes": {c: sum(r.code == c for r in results) for c in {r.code for r in results}},
    }


def single_ttft(address: str, i: int) -> float:
    """Seconds to the first token of one request on an otherwise idle stack."""
    prompt = prompts_for(SINGLE_STREAM_REQUESTS)[i % SINGLE_STREAM_REQUESTS]
    time.sleep(0.1)  # the last burst's streams are gone
    (result,), _ = asyncio.run(run_streams(address, [prompt], [PROBE_NEW_TOKENS], [0.0]))
    time.sleep(0.1)
    return result.ttft


def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["tokens_per_s"])


def bench_service(concurrency: list[int], new_tokens: int, num_soak: int) -> dict:
    """One round: each concurrency once; then, when num_soak > 0, spread arrivals and the memory run."""
    stack = start_stack(MODEL)
    try:
        address = stack.gateway.address
        asyncio.run(run_streams(address, prompts_for(2), [8, 8], [0, 0]))  # warm-up
        out = {"concurrency": {}}
        for n in concurrency:
            # One stream: SINGLE_STREAM_REQUESTS requests one after another; N streams: BURSTS bursts of N
            # simultaneous requests, one after another. Each point summarizes all of its requests.
            # Before and after each burst, PROBES lone requests (PROBE_NEW_TOKENS tokens each) time
            # the single-stream first token in the same minutes as the bursts.
            waves = [[p] for p in prompts_for(SINGLE_STREAM_REQUESTS)] if n == 1 else [prompts_for(n)] * BURSTS
            results, wall, probes = [], 0.0, []
            for i, wave in enumerate(waves):
                if n > 1:
                    probes += [single_ttft(address, i * PROBES + j) for j in range(PROBES)]
                got, took = asyncio.run(run_streams(address, wave, [new_tokens] * len(wave), [0.0] * len(wave)))
                results += got
                wall += took
            point = summarize(results, wall)
            if n > 1:
                probes += [single_ttft(address, len(waves) * PROBES + j) for j in range(PROBES)]
                point["single_ttft_probes_ms"] = [round(p * 1000, 1) for p in probes]
                point["ttft_p50_vs_single"] = round(point["ttft_p50_ms"] / (statistics.median(probes) * 1000), 2)
            out["concurrency"][str(n)] = point
            print(f"service  N={n:>2}: {point}", flush=True)
        if num_soak <= 0:
            return out
        rng = random.Random(0)
        n = 32
        lengths = [rng.randint(16, 256) for _ in range(n)]
        delays = sorted(rng.uniform(0, 8) for _ in range(n))
        prompts = [p * rng.randint(1, 6) for p in prompts_for(n)]
        results, wall = asyncio.run(run_streams(address, prompts, lengths, delays))
        out["spread_mixed"] = dict(summarize(results, wall), arrivals_over_s=8, max_new_tokens="16-256")
        print(f"service spread/mixed: {out['spread_mixed']}", flush=True)
        rss = [stack.model.rss_bytes()]
        batches = 0
        while batches * 50 < num_soak:
            asyncio.run(run_streams(address, prompts_for(50), [8] * 50, [0.0] * 50))
            batches += 1
            rss.append(stack.model.rss_bytes())
        out["memory"] = {"num_requests": batches * 50, "model_rss_mb": [round(r / 2**20, 1) for r in rss]}
        print(f"service memory: {out['memory']}", flush=True)
        return out
    finally:
        stack.stop()


def load_reference():
    from transformers import AutoTokenizer

    from model_svc.loader import load_model

    return load_model(MODEL, "bfloat16", "4bit", "cpu"), AutoTokenizer.from_pretrained(MODEL, padding_side="left")


def bench_generate(reference, concurrency: list[int], new_tokens: int) -> dict:
    """One round of in-process generate(): batch 1 one after another, and a static batch of each N."""
    loaded, tokenizer = reference

    def run(prompts: list[str], n_new: int) -> float:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        started = time.perf_counter()
        with torch.inference_mode():
            loaded.model.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        return time.perf_counter() - started

    run(prompts_for(2), 4)  # warm-up
    out = {}
    single = statistics.median(run([p], new_tokens) for p in prompts_for(4))
    ttft1 = statistics.median(run([p], 1) for p in prompts_for(4))
    out["batch1"] = {"tokens_per_s": round(new_tokens / single, 1), "ttft_ms": round(ttft1 * 1000, 1),
                     "itl_ms": round((single - ttft1) / (new_tokens - 1) * 1000, 1)}
    print(f"generate batch 1: {out['batch1']}", flush=True)
    out["static"] = {}
    for n in concurrency:
        wall = run(prompts_for(n), new_tokens)
        ttft = run(prompts_for(n), 1)
        out["static"][str(n)] = {"tokens_per_s": round(n * new_tokens / wall, 1), "ttft_ms": round(ttft * 1000, 1),
                                 "itl_ms": round((wall - ttft) / (new_tokens - 1) * 1000, 1)}
        print(f"generate static N={n:>2}: {out['static'][str(n)]}", flush=True)
    return out


def interleaved(concurrency: list[int], new_tokens: int, num_soak: int, rounds: int) -> tuple[dict, dict]:
    """Rounds of (service with the stack up, then generate() with the stack stopped); each point keeps
    its best round. Interleaving gives both sides the same share of this machine's slow minutes."""
    reference = load_reference()
    service_rounds, generate_rounds = [], []
    for i in range(rounds):
        print(f"round {i + 1} of {rounds}", flush=True)
        service_rounds.append(bench_service(concurrency, new_tokens, num_soak if i == 0 else 0))
        generate_rounds.append(bench_generate(reference, concurrency, new_tokens))
    service = {**service_rounds[0], "concurrency": {
        str(n): best([r["concurrency"][str(n)] for r in service_rounds]) for n in concurrency}}
    if 1 in concurrency and 16 in concurrency:
        # Paired: the 16-stream p50 over the lone requests timed between its bursts (same minutes).
        service["ttft_N16_vs_N1_each_round"] = [r["concurrency"]["16"]["ttft_p50_vs_single"] for r in service_rounds]
        # Unpaired, as before: over the one-stream point's own TTFT, measured a minute or so earlier.
        service["ttft_N16_vs_N1_point_each_round"] = [
            round(r["concurrency"]["16"]["ttft_p50_ms"] / r["concurrency"]["1"]["ttft_p50_ms"], 2)
            for r in service_rounds]
    generate = {"batch1": best([r["batch1"] for r in generate_rounds]), "static": {
        str(n): best([r["static"][str(n)] for r in generate_rounds]) for n in concurrency}}
    return service, generate


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(n) for n in report["service"]["concurrency"]]
    svc = [report["service"]["concurrency"][str(n)] for n in ns]
    static = [report["generate"]["static"][str(n)] for n in ns]
    b1 = report["generate"]["batch1"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    ax.plot(ns, [s["tokens_per_s"] for s in svc], "o-", label="genrpc (3 services, gRPC)")
    ax.plot(ns, [s["tokens_per_s"] for s in static], "s--", label="generate(), static batch of N")
    ax.axhline(b1["tokens_per_s"], color="gray", linestyle=":", label="generate(), batch 1")
    ax.set(title="Aggregate throughput", xlabel="concurrent streams N", ylabel="tokens/s", xscale="log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.legend()
    for ax, title, key, static_key in ((axes[1], "Time to first token", "ttft", "ttft_ms"),
                                       (axes[2], "Inter-token latency", "itl", "itl_ms")):
        ax.plot(ns, [s[f"{key}_p50_ms"] for s in svc], "o-", label="genrpc p50")
        ax.plot(ns, [s[f"{key}_p99_ms"] for s in svc], "o:", label="genrpc p99")
        ax.plot(ns, [s[static_key] for s in static], "s--", label="generate() static batch")
        ax.set(title=title, xlabel="concurrent streams N", ylabel="ms", xscale="log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.legend()
    fig.suptitle(f"SmolLM2-135M-Instruct, 4-bit nf4 / bfloat16, {report['machine']['cpus']} CPUs, "
                 f"{report['new_tokens']} new tokens per stream")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown_table(report: dict) -> str:
    """The README's table: service against generate(), by concurrency."""
    rows = ["| N | genrpc tok/s | generate() static batch tok/s | ratio | genrpc TTFT p50 / p99 ms "
            "| generate() TTFT ms | genrpc ITL p50 / p99 ms | generate() ITL ms |",
            "|---|---|---|---|---|---|---|---|"]
    for n, svc in report["service"]["concurrency"].items():
        gen = report["generate"]["static"][n]
        rows.append(f"| {n} | {svc['tokens_per_s']} | {gen['tokens_per_s']} | "
                    f"{svc['tokens_per_s'] / gen['tokens_per_s']:.2f} | {svc['ttft_p50_ms']} / {svc['ttft_p99_ms']} | "
                    f"{gen['ttft_ms']} | {svc['itl_p50_ms']} / {svc['itl_p99_ms']} | {gen['itl_ms']} |")
    b1 = report["generate"]["batch1"]
    spread = report["service"]["spread_mixed"]
    mem = report["service"]["memory"]["model_rss_mb"]
    rows += ["", f"generate() batch 1, one after another: {b1['tokens_per_s']} tok/s, TTFT {b1['ttft_ms']} ms, "
                 f"ITL {b1['itl_ms']} ms. Arrivals spread over 8 s, 16-256 new tokens: {spread['tokens_per_s']} tok/s, "
                 f"TTFT p50 {spread['ttft_p50_ms']} ms / p99 {spread['ttft_p99_ms']} ms, "
                 f"ITL p50 {spread['itl_p50_ms']} ms / "
                 f"p99 {spread['itl_p99_ms']} ms. Model service RSS over "
                 f"{report['service']['memory']['num_requests']} requests: "
                 f"{mem[0]} -> {max(mem)} (max) -> {mem[-1]} MiB."]
    if "ttft_N16_vs_N1_each_round" in report["service"]:
        rows += ["", "TTFT p50 at 16 streams over the single-stream TTFT of lone requests timed between its "
                     "bursts, each round: "
                     + ", ".join(f"{r:.2f}" for r in report["service"]["ttft_N16_vs_N1_each_round"])
                     + f" (median {report['ratios']['ttft_N16_vs_N1']:.2f}); over the one-stream point's TTFT, "
                     "measured a minute or so apart: "
                     + ", ".join(f"{r:.2f}" for r in report["service"]["ttft_N16_vs_N1_point_each_round"]) + "."]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and requests (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds (service, then generate()); each point keeps its best round")
    args = parser.parse_args()
    concurrency = [1, 4, 16, 32]
    new_tokens = 32 if args.quick else 128
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "cpu": describe_cpu(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "model": "SmolLM2-135M-Instruct", "dtype": "bfloat16", "quantization": "4bit-nf4",
        "new_tokens": new_tokens,
    }
    report["repeats"] = args.repeats
    machine = roofline.measure()  # first: nothing else on the cores
    report["service"], report["generate"] = interleaved(concurrency, new_tokens, 100 if args.quick else 1000,
                                                         args.repeats)
    report["roofline"] = roofline.bounds(machine, {n: report["service"]["concurrency"][str(n)]["tokens_per_s"]
                                                   for n in concurrency}, context=12 + new_tokens // 2,
                                         output_bytes=roofline.served_output_bytes())
    report["cpu_contention"] = cpu_contention.run(1 if args.quick else 3)
    report["memory_model"] = memory_model.run()
    report["mixed_tenants"] = mixed_tenants.run()
    report["tenant_cache"] = tenant_cache.run()
    report["speculative"] = speculative.run()
    report["structured"] = structured.run()
    report["ratios"] = {
        "single_stream_vs_generate_batch1": round(
            report["service"]["concurrency"]["1"]["tokens_per_s"] / report["generate"]["batch1"]["tokens_per_s"], 2),
        **{f"N{n}_vs_static_batch": round(report["service"]["concurrency"][str(n)]["tokens_per_s"]
                                          / report["generate"]["static"][str(n)]["tokens_per_s"], 2)
           for n in concurrency},
        # TTFT p50 at 16 over TTFT p50 at 1, each ratio within one round (the same minutes): the median round
        "ttft_N16_vs_N1": statistics.median(report["service"]["ttft_N16_vs_N1_each_round"]),
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "latest.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(RESULTS, "tenant_cache.json"), "w") as f:
        json.dump({"when": report["date"], **report["tenant_cache"]}, f, indent=1)
    plot(report, os.path.join(RESULTS, "latest.png"))
    cpu_contention.plot(report["cpu_contention"], os.path.join(RESULTS, "cpu_contention.png"))
    speculative.plot(report["speculative"], os.path.join(RESULTS, "speculative.png"))
    from bench import readme  # here: it imports this module for its table

    readme.write()
    print(json.dumps(report["ratios"], indent=2))
    print(markdown_table(report))
    print(roofline.markdown(report["roofline"]))
    print(json.dumps(report["cpu_contention"]["summary"], indent=2))
    print(cpu_contention.markdown(report["cpu_contention"]))
    print(memory_model.markdown(report["memory_model"]))
    print(mixed_tenants.markdown(report["mixed_tenants"]))
    print(tenant_cache.markdown(report["tenant_cache"]))
    print(speculative.markdown(report["speculative"]))
    print(structured.markdown(report["structured"]))
    beams.main()  # its own file: bench/results/beams.json
    lora.main()  # its own file per kernel build: bench/results/lora-<build>.json


if __name__ == "__main__":
    main()
