"""Streaming clients that measure what a caller sees: time to first token, inter-token latency,
tokens per second."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc


@dataclass
class StreamResult:
    start: float
    ttft: float = 0.0  # seconds to the first token
    itls: list[float] = field(default_factory=list)  # seconds between tokens
    num_tokens: int = 0
    end: float = 0.0
    code: str = "OK"


async def one_stream(stub, prompt: str, max_new_tokens: int, delay: float = 0.0, metadata=None) -> StreamResult:
    await asyncio.sleep(delay)
    result = StreamResult(start=time.perf_counter())
    request = pb.GenerateStreamRequest(prompt=prompt, config=pb.GenerationConfig(
        max_new_tokens=max_new_tokens, ignore_eos=True))
    last = result.start
    try:
        async for message in stub.GenerateStream(request, timeout=600, metadata=metadata):
            now = time.perf_counter()
            n = len(message.token_ids)
            if n == 0:
                continue
            if result.num_tokens == 0:
                result.ttft = now - result.start
            else:
                result.itls.extend([(now - last) / n] * n)
            result.num_tokens += n
            last = now
    except grpc.aio.AioRpcError as exc:
        result.code = exc.code().name
    result.end = time.perf_counter()
    return result


async def run_streams(address: str, prompts: list[str], max_new_tokens: list[int], delays: list[float]):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        started = time.perf_counter()
        results = await asyncio.gather(*[
            one_stream(stub, p, n, d) for p, n, d in zip(prompts, max_new_tokens, delays)])
        return results, time.perf_counter() - started


def run_on_stack(model: str, measure) -> dict:
    """Starts the three services with their defaults, runs `measure(gateway address, model metrics
    port)` (a coroutine function) against them, and stops them."""
    from genrpc.launch import start_stack

    stack = start_stack(model)
    try:
        return asyncio.run(measure(stack.gateway.address, stack.model.metrics_port))
    finally:
        stack.stop()
