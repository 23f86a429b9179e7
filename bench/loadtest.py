"""`make loadtest`: a ghz-style load generator in Python (ghz itself is not installable here).

Sends `--total` calls with `--concurrency` workers to a genrpc gateway and prints what ghz
prints: count, total time, requests/s, slowest/fastest/average, a latency histogram, latency
percentiles and the status-code distribution. `--format json` prints the same as JSON.

    python -m bench.loadtest --call Generate -d '{"prompts": ["Hello"], "config": {"max_new_tokens": 16}}' \\
        -c 8 -n 64 [--addr 127.0.0.1:50051] [--format json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time

import grpc
from google.protobuf import json_format

from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc

CALLS = {"Generate": pb.GenerateRequest, "GenerateStream": pb.GenerateStreamRequest}


async def worker(stub, call: str, request, queue: asyncio.Queue, results: list, timeout: float) -> None:
    while True:
        try:
            queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        started = time.perf_counter()
        code = "OK"
        try:
            if call == "Generate":
                await stub.Generate(request, timeout=timeout)
            else:
                async for _ in stub.GenerateStream(request, timeout=timeout):
                    pass
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        results.append((time.perf_counter() - started, code))


async def run(addr: str, call: str, request, concurrency: int, total: int, timeout: float):
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    results: list[tuple[float, str]] = []
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        started = time.perf_counter()
        await asyncio.gather(*[worker(stub, call, request, queue, results, timeout) for _ in range(concurrency)])
        return results, time.perf_counter() - started


def report(results: list[tuple[float, str]], elapsed: float) -> dict:
    latencies = sorted(r[0] for r in results)
    codes = collections.Counter(r[1] for r in results)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] if latencies else 0.0

    histogram = []
    if latencies:
        low, high = latencies[0], latencies[-1]
        width = (high - low) / 10 or 1e-9
        buckets = [0] * 11
        for value in latencies:
            buckets[min(10, int((value - low) / width))] += 1
        histogram = [{"mark_s": round(low + i * width, 4), "count": c} for i, c in enumerate(buckets)]
    return {
        "count": len(results), "total_s": round(elapsed, 3), "rps": round(len(results) / elapsed, 2),
        "slowest_s": round(latencies[-1], 4) if latencies else 0,
        "fastest_s": round(latencies[0], 4) if latencies else 0,
        "average_s": round(sum(latencies) / len(latencies), 4) if latencies else 0,
        "histogram": histogram,
        "latency_distribution": {f"p{q}": round(pct(q), 4) for q in (10, 25, 50, 75, 90, 95, 99)},
        "status_code_distribution": dict(codes),
    }


def print_text(r: dict) -> None:
    print("\nSummary:")
    print(f"  Count:\t{r['count']}\n  Total:\t{r['total_s'] * 1000:.2f} ms")
    print(f"  Slowest:\t{r['slowest_s'] * 1000:.2f} ms\n  Fastest:\t{r['fastest_s'] * 1000:.2f} ms")
    print(f"  Average:\t{r['average_s'] * 1000:.2f} ms\n  Requests/sec:\t{r['rps']:.2f}")
    print("\nResponse time histogram:")
    top = max((b["count"] for b in r["histogram"]), default=1) or 1
    for b in r["histogram"]:
        print(f"  {b['mark_s'] * 1000:10.3f} [{b['count']}]\t|{'∎' * round(40 * b['count'] / top)}")
    print("\nLatency distribution:")
    for name, value in r["latency_distribution"].items():
        print(f"  {name[1:]} % in {value * 1000:.2f} ms")
    print("\nStatus code distribution:")
    for code, count in r["status_code_distribution"].items():
        print(f"  [{code}]\t{count} responses")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--call", default="Generate", choices=list(CALLS))
    parser.add_argument("-d", "--data", default='{"prompts": ["Hello"], "config": {"max_new_tokens": 16}}',
                        help="the request as JSON (proto3 JSON names, as ghz -d)")
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("-n", "--total", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    parser.add_argument("--format", default="text", choices=["text", "json"])
    args = parser.parse_args(argv)
    if args.data == parser.get_default("data") and args.call == "GenerateStream":
        args.data = '{"prompt": "Hello", "config": {"max_new_tokens": 16}}'
    try:
        request = json_format.Parse(args.data, CALLS[args.call]())
    except json_format.ParseError as exc:
        print(f"--data is not a valid {CALLS[args.call].__name__}: {exc}", file=sys.stderr)
        return 2
    results, elapsed = asyncio.run(run(args.addr, args.call, request, args.concurrency, args.total, args.timeout))
    r = report(results, elapsed)
    print(json.dumps(r, indent=2)) if args.format == "json" else print_text(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
