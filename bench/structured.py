"""Structured output and several samples per prompt (part of `make bench`), in one run:

- mask cost: the same 16 chat requests ("<thing> as JSON", 10 schemas) constrained by their JSON
  schema and unconstrained, 16 at once and one at a time, both orders; the unconstrained side makes
  exactly as many tokens as its constrained twin (max_new_tokens set to it, EOS ignored), and
  speculation is off on both, so the two differ by the mask's work (and the text); aggregate
  tokens/s constrained over unconstrained (target at 16 streams >= 0.8x); every constrained output
  parsed and validated;
- num_return_sequences=8 on a ~500-token prompt (32 new tokens each, EOS ignored) against one
  sample of the same prompt and length: total time (target <= 1.3x) and the tokens the model
  service computed (its genrpc_model_batch_tokens counter: the prompt computed once, not 8 times).
  Speculation is off on both sides, as for the mask cost: the prompt repeats a story, so prompt
  lookup's proposals are taken, far more often by one sample than by eight, and the figure measured
  that luck (one sample's 32 tokens in 8 to 32 steps); the default's ratio is reported beside it.
Each request's prompt starts with a number of its own, so no run is served from another's cache.

    python -m bench.structured
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time

import grpc
import jsonschema

from bench.clients import run_on_stack
from genrpc.launch import ROOT, metric
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
SCHEMAS = [
    ("a person", {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                                    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                  "required": ["name", "age"], "additionalProperties": False}),
    ("a product review", {"type": "object", "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 60}}, "required": ["sentiment", "stars", "summary"],
        "additionalProperties": False}),
    ("a blog post", {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40}, "tags": {
        "type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}}, "required": ["title", "tags"],
        "additionalProperties": False}),
    ("a weather lookup", {"type": "object", "properties": {"tool": {"const": "get_weather"}, "arguments": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}, "required": ["tool", "arguments"],
        "additionalProperties": False}),
    ("an order", {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"],
        "additionalProperties": False}),
    ("a meeting", {"type": "object", "properties": {
        "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
        "topic": {"type": "string", "maxLength": 30}, "attendees": {"type": "integer", "minimum": 0, "maximum": 50}},
        "required": ["date", "topic", "attendees"], "additionalProperties": False}),
    ("a bug report", {"type": "object", "properties": {"label": {"enum": ["bug", "feature", "question"]},
                                                        "priority": {"enum": [1, 2, 3]},
                                                        "summary": {"type": "string", "maxLength": 50}},
                      "required": ["label", "priority", "summary"], "additionalProperties": False}),
    ("a colour", {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                    "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
                  "required": ["name", "hex"], "additionalProperties": False}),
    ("a city", {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                  "country": {"type": "string", "maxLength": 30},
                                                  "population": {"type": "integer", "minimum": 0, "maximum": 50000000}},
                "required": ["city", "country", "population"], "additionalProperties": False}),
    ("a book", {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                                  "year": {"type": "integer", "minimum": 1400, "maximum": 2030},
                                                  "genres": {"type": "array", "maxItems": 2,
                                                             "items": {"enum": ["fiction", "history", "science"]}}},
                "required": ["title", "year", "genres"], "additionalProperties": False}),
]
MAX_NEW_TOKENS = 200
STORY = ("The harbour master counted the boats that came in with the tide, and wrote each name in a ledger "
         "that had belonged to his father. ")


def request(i: int, constrained: bool, length: int | None = None) -> pb.GenerateRequest:
    """Request i, constrained by its schema, or unconstrained making exactly `length` tokens."""
    thing, schema = SCHEMAS[i % len(SCHEMAS)]
    # Speculation off on both sides: it gains more on the more predictable constrained text, which
    # would hide the mask's cost.
    config = pb.GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, prompt_lookup_num_tokens=0)
    if constrained:
        config.json_schema = json.dumps(schema)
    elif length:
        config.max_new_tokens, config.ignore_eos = length, True
    content = f"Request {i}. Describe {thing} as JSON."
    return pb.GenerateRequest(chats=[pb.Chat(messages=[pb.Message(role="user", content=content)])], config=config)


async def burst(stub, first: int, n: int, constrained: bool,
                lengths: dict[int, int] | None = None) -> tuple[float, int, int]:
    """n requests at once; (seconds, tokens, outputs that failed their schema). Constrained, the
    `lengths` dict gets each request's token count; unconstrained, each request makes that many."""
    started = time.perf_counter()
    responses = await asyncio.gather(*[
        stub.Generate(request(first + i, constrained, None if constrained else (lengths or {}).get(first + i)),
                      timeout=600) for i in range(n)])
    seconds = time.perf_counter() - started
    tokens = sum(r.completions[0].generated_tokens for r in responses)
    if constrained and lengths is not None:
        lengths.update({first + i: r.completions[0].generated_tokens for i, r in enumerate(responses)})
    invalid = 0
    if constrained:
        for i, r in enumerate(responses):
            try:
                jsonschema.validate(json.loads(r.completions[0].text), SCHEMAS[(first + i) % len(SCHEMAS)][1])
            except (ValueError, jsonschema.ValidationError):
                invalid += 1
    return seconds, tokens, invalid


async def mask_cost(stub, streams: int, rounds: int = 2) -> dict:
    """A constrained pass first learns each request's length (and warms the prefix cache for both
    sides); then the rounds alternate the two sides over the same requests."""
    rates = {True: [], False: []}
    invalid = outputs = 0
    first = 1000 * streams
    lengths: dict[int, int] = {}
    waves = [(first + i, 1) for i in range(8)] if streams == 1 else [(first, streams)]
    for start, n in waves:
        await burst(stub, start, n, True, lengths)
    for r in range(rounds):
        for constrained in ((True, False) if r % 2 == 0 else (False, True)):
            seconds = tokens = 0
            for start, n in waves:
                s, t, bad = await burst(stub, start, n, constrained, lengths)
                seconds, tokens, invalid = seconds + s, tokens + t, invalid + bad
                outputs += n * constrained
            rates[constrained].append(tokens / seconds)
    on, off = statistics.mean(rates[True]), statistics.mean(rates[False])
    return {"streams": streams, "constrained_tokens_per_s": round(on, 1), "free_tokens_per_s": round(off, 1),
            "ratio": round(on / off, 2), "constrained_outputs": outputs, "invalid_outputs": invalid}


async def samples(stub, metrics_port: int, tokenizer_words: int = 500) -> dict:
    """num_return_sequences=8 against 1 on a ~500-token prompt, both orders, fresh prompts each time;
    speculation off on both sides, then the server's default (ratio_default)."""
    text = (STORY * (tokenizer_words // 20 + 1))
    result = {(lookup, n): [] for lookup in (0, None) for n in (1, 8)}
    computed = {1: [], 8: []}
    for lookup in (0, None):
        for r, n in enumerate((1, 8, 8, 1)):
            prompt = f"Run {r} {lookup}: " + text + " Continue the story."
            before = metric(metrics_port, "genrpc_model_batch_tokens_sum")
            started = time.perf_counter()
            response = await stub.Generate(pb.GenerateRequest(prompts=[prompt], config=pb.GenerationConfig(
                max_new_tokens=32, ignore_eos=True, do_sample=True, seed=r, num_return_sequences=n,
                prompt_lookup_num_tokens=lookup)), timeout=600)
            result[lookup, n].append(time.perf_counter() - started)
            await asyncio.sleep(0.2)
            if lookup == 0:
                computed[n].append(metric(metrics_port, "genrpc_model_batch_tokens_sum") - before)
            prompt_tokens = response.completions[0].prompt_tokens
    mean = {key: statistics.mean(times) for key, times in result.items()}
    return {"prompt_tokens": prompt_tokens, "new_tokens": 32, "one_sample_s": round(mean[0, 1], 2),
            "eight_samples_s": round(mean[0, 8], 2), "ratio": round(mean[0, 8] / mean[0, 1], 2),
            "ratio_default": round(mean[None, 8] / mean[None, 1], 2),
            "computed_tokens_one": int(statistics.mean(computed[1])),
            "computed_tokens_eight": int(statistics.mean(computed[8]))}


async def measure(address: str, metrics_port: int) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        await burst(stub, 0, 10, True)  # warm-up: every schema's grammar compiled once
        report = {"mask_cost_16": await mask_cost(stub, 16)}
        print(f"structured 16 streams: {report['mask_cost_16']}", flush=True)
        report["mask_cost_1"] = await mask_cost(stub, 1)
        print(f"structured 1 stream: {report['mask_cost_1']}", flush=True)
        report["samples"] = await samples(stub, metrics_port)
        print(f"samples: {report['samples']}", flush=True)
        return report


def run() -> dict:
    return run_on_stack(MODEL, measure)


def markdown(report: dict) -> str:
    m16, m1, s = report["mask_cost_16"], report["mask_cost_1"], report["samples"]
    return "\n".join([
        "| workload | result | target |", "|---|---|---|",
        f"| 16 streams, every one constrained by a JSON schema | {m16['constrained_tokens_per_s']} against "
        f"{m16['free_tokens_per_s']} tokens/s unconstrained: {m16['ratio']:.2f}x; {m16['invalid_outputs']} of "
        f"{m16['constrained_outputs']} outputs invalid | >= 0.8x; 0 invalid |",
        f"| 1 stream, the same | {m1['constrained_tokens_per_s']} against {m1['free_tokens_per_s']} tokens/s: "
        f"{m1['ratio']:.2f}x; {m1['invalid_outputs']} of {m1['constrained_outputs']} invalid | |",
        f"| num_return_sequences=8, {s['prompt_tokens']}-token prompt, {s['new_tokens']} tokens each | "
        f"{s['eight_samples_s']} s against {s['one_sample_s']} s for one: {s['ratio']:.2f}x without speculation "
        f"({s['ratio_default']:.2f}x with the default's); tokens computed {s['computed_tokens_eight']} against "
        f"{s['computed_tokens_one']} | <= 1.3x; the prompt once |",
    ])


def main() -> None:
    report = run()
    print(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
