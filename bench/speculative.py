"""Speculative decoding by prompt lookup (part of `make bench`): the same server, the same requests,
with speculation (the default) and without it (prompt_lookup_num_tokens=0), in one run:

- one stream, 8 input-grounded prompts (repeat with typos fixed, extract sentences, add type hints,
  rename a JSON key, ...): tokens/s with over without (target >= 2.0x);
- one stream, 8 free-text prompts (the main bench's stories): the same ratio (target >= 0.97x: the
  adaptive budget must not cost where proposals miss);
- 16 concurrent streams, the 16 prompts together: aggregate tokens/s ratio (target >= 1.0x);
- every output with speculation equal to the one without, greedy and seeded (the count of
  mismatches must be 0), with the acceptance the model service's metrics report.
The two sides alternate (off, on for one prompt; on, off for the next), since this machine's speed
drifts from minute to minute; the EOS ends a request (both sides produce the same tokens, so the
time ratio is the speed ratio).

    python -m bench.speculative
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import grpc

from bench.clients import run_on_stack
from genrpc.launch import ROOT, metric
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
MAX_NEW_TOKENS = 256
FREE_NEW_TOKENS = 128

PARAGRAPH = ("The river rose slowly thorugh the night, and by morning the lower feilds were under water. The farmers "
             "moved thier cattle to the hill, where the grass was thin but dry. Nobody in the vilage remembered a "
             "flood this early in the year. The old miller said the river had risen like this once before, when he "
             "was a boy, and that it took three weeks to go down.")
FUNCTION = '''def merge_orders(orders, returns, currency):
    totals = {}
    for order in orders:
        key = order["customer"]
        totals[key] = totals.get(key, 0) + order["amount"]
    for item in returns:
        key = item["customer"]
        totals[key] = totals.get(key, 0) - item["amount"]
    return {name: round(value, 2) for name, value in totals.items() if value > 0}'''
RECORD = ('{"id": 4821, "name": "Ada Lovelace", "email": "ada@example.org", "city": "London", "plan": "team", '
          '"seats": 12, "active": true, "tags": ["math", "engines", "poetry"], "created": "2024-03-18"}')
PEOPLE = ("Alice, 34, Lisbon; Bruno, 28, Porto; Carla, 41, Faro; Diogo, 23, Braga; Elena, 37, Coimbra; "
          "Filipe, 30, Aveiro")
EMAIL = ("Hi Sam, i wanted to let you know that the meeting on thursday have been moved to friday at 10am. Please "
         "bring the report's from last quarter, and let me know if you cant make it. The room is the same as last "
         "time, on the third floor. Thanks, Jordan")
CODE = '''def average(values):
    x = 0
    for v in values:
        x = x + v
    if len(values) == 0:
        return 0
    return x / len(values)'''
ARTICLE = ("Lighthouses were once kept by families who lived at the foot of the tower.\n\n"
           "Each evening the keeper climbed the stairs, trimmed the wick and wound the clockwork that turned the "
           "lens. On stormy nights he stayed awake until dawn, watching the light and the sea.\n\n"
           "Today most lighthouses are automatic, and the keepers' houses have become museums.")

GROUNDED = [
    "Repeat this paragraph with the typos fixed:\n\n" + PARAGRAPH,
    "Extract every sentence that mentions the river, word for word:\n\n" + PARAGRAPH,
    "Add type hints to this Python function and return the whole function:\n\n" + FUNCTION,
    "Rewrite this JSON record with the key \"name\" renamed to \"full_name\". Output only the JSON.\n\n" + RECORD,
    "Convert this list into a Markdown table with the columns Name, Age and City:\n\n" + PEOPLE,
    "Fix the grammar in this email and return the corrected email:\n\n" + EMAIL,
    "Rename the variable x to total in this code and return the code:\n\n" + CODE,
    "Quote the second paragraph of this text exactly:\n\n" + ARTICLE,
]
TOPICS = ["a lighthouse keeper", "a robot learning to paint", "the history of tea", "a city under the sea",
          "how rain forms", "a chess tournament", "a dragon who collects clocks", "the first day of school"]
FREE = [f"Write a long story about {topic}." for topic in TOPICS]
SEEDED = dict(do_sample=True, temperature=0.7, top_k=50)


def request(content: str, lookup: int, max_new_tokens: int, seed: int | None) -> pb.GenerateRequest:
    config = pb.GenerationConfig(max_new_tokens=max_new_tokens, prompt_lookup_num_tokens=lookup)
    if seed is not None:
        config.MergeFrom(pb.GenerationConfig(seed=seed, **SEEDED))
    return pb.GenerateRequest(chats=[pb.Chat(messages=[pb.Message(role="user", content=content)])], config=config)


async def timed(stub, content: str, lookup: int, max_new_tokens: int, seed: int | None) -> tuple[float, list[int]]:
    started = time.perf_counter()
    response = await stub.Generate(request(content, lookup, max_new_tokens, seed), timeout=600)
    return time.perf_counter() - started, list(response.completions[0].token_ids)


async def one_stream(stub, prompts: list[str], max_new_tokens: int, seed: int | None) -> dict:
    """Each prompt alone, off and on (the order alternating); tokens/s of each side and the mismatches."""
    seconds = {0: 0.0, 1: 0.0}
    tokens, mismatches = 0, 0
    for i, content in enumerate(prompts):
        runs = {}
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            runs[side] = await timed(stub, content, 0 if side == 0 else DEFAULT_LOOKUP, max_new_tokens,
                                     None if seed is None else seed + i)
            seconds[side] += runs[side][0]
        tokens += len(runs[0][1])
        mismatches += runs[0][1] != runs[1][1]
    return {"tokens": tokens, "off_tokens_per_s": round(tokens / seconds[0], 1),
            "on_tokens_per_s": round(tokens / seconds[1], 1), "ratio": round(seconds[0] / seconds[1], 2),
            "mismatches": mismatches}


async def concurrent(stub, rounds: int = 2) -> dict:
    """All 16 prompts at once (grounded and free, greedy), off/on then on/off: aggregate tokens/s."""
    prompts = [(c, MAX_NEW_TOKENS) for c in GROUNDED] + [(c, FREE_NEW_TOKENS) for c in FREE]
    seconds = {0: 0.0, 1: 0.0}
    outputs: dict[int, list] = {0: [], 1: []}
    tokens = 0
    for r in range(rounds):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            started = time.perf_counter()
            got = await asyncio.gather(*[timed(stub, c, 0 if side == 0 else DEFAULT_LOOKUP, n, None)
                                         for c, n in prompts])
            seconds[side] += time.perf_counter() - started
            outputs[side].append([ids for _, ids in got])
            if side == 0:
                tokens += sum(len(ids) for _, ids in got)
    mismatches = sum(a != b for off, on in zip(outputs[0], outputs[1]) for a, b in zip(off, on))
    return {"streams": len(prompts), "tokens": tokens, "off_tokens_per_s": round(tokens / seconds[0], 1),
            "on_tokens_per_s": round(tokens / seconds[1], 1), "ratio": round(seconds[0] / seconds[1], 2),
            "mismatches": mismatches}


DEFAULT_LOOKUP = 8  # what the server defaults to; sent explicitly so the "on" side is what is measured


async def measure(address: str, metrics_port: int) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        await timed(stub, "Say hello.", 0, 8, None)  # warm-up
        proposed0 = metric(metrics_port, "genrpc_model_spec_proposed_tokens_total")
        accepted0 = metric(metrics_port, "genrpc_model_spec_accepted_tokens_total")
        report = {}
        report["grounded_1_stream"] = await one_stream(stub, GROUNDED, MAX_NEW_TOKENS, None)
        print(f"speculative grounded, 1 stream: {report['grounded_1_stream']}", flush=True)
        report["free_1_stream"] = await one_stream(stub, FREE, FREE_NEW_TOKENS, None)
        print(f"speculative free text, 1 stream: {report['free_1_stream']}", flush=True)
        report["grounded_1_stream_seeded"] = await one_stream(stub, GROUNDED, MAX_NEW_TOKENS, 100)
        report["free_1_stream_seeded"] = await one_stream(stub, FREE, FREE_NEW_TOKENS, 200)
        print(f"speculative seeded: {report['grounded_1_stream_seeded']} {report['free_1_stream_seeded']}", flush=True)
        report["mixed_16_streams"] = await concurrent(stub)
        print(f"speculative 16 streams: {report['mixed_16_streams']}", flush=True)
        proposed = metric(metrics_port, "genrpc_model_spec_proposed_tokens_total") - proposed0
        accepted = metric(metrics_port, "genrpc_model_spec_accepted_tokens_total") - accepted0
        report["proposed_tokens"], report["accepted_tokens"] = int(proposed), int(accepted)
        report["acceptance"] = round(accepted / proposed, 3) if proposed else 0.0
        report["mismatches"] = sum(v["mismatches"] for v in report.values() if isinstance(v, dict))
        return report


def run() -> dict:
    return run_on_stack(MODEL, measure)


TARGETS = {"grounded_1_stream": 2.0, "free_1_stream": 0.97, "mixed_16_streams": 1.0}
LABELS = {"grounded_1_stream": "1 stream, input-grounded", "free_1_stream": "1 stream, free text",
          "mixed_16_streams": "16 streams, mixed", "grounded_1_stream_seeded": "1 stream, input-grounded, seeded",
          "free_1_stream_seeded": "1 stream, free text, seeded"}


def markdown(report: dict) -> str:
    rows = ["| workload | tokens/s off | tokens/s on | on / off | target | mismatches |", "|---|---|---|---|---|---|"]
    for key, label in LABELS.items():
        r = report[key]
        target = f">= {TARGETS[key]}x" if key in TARGETS else "-"
        rows.append(f"| {label} | {r['off_tokens_per_s']} | {r['on_tokens_per_s']} | {r['ratio']:.2f}x | {target} "
                    f"| {r['mismatches']} |")
    rows.append(f"\nProposed {report['proposed_tokens']} tokens, kept {report['accepted_tokens']} "
                f"({report['acceptance']:.0%}); mismatches in all: {report['mismatches']}.")
    return "\n".join(rows)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(LABELS)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ratios = [report[k]["ratio"] for k in keys]
    ax.barh([LABELS[k] for k in keys], ratios, color=["tab:green" if r >= TARGETS.get(k, 1.0) else "tab:red"
                                                       for k, r in zip(keys, ratios)])
    for i, k in enumerate(keys):
        if k in TARGETS:
            ax.plot([TARGETS[k]] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2)
        ax.text(ratios[i] + 0.03, i, f"{ratios[i]:.2f}x", va="center")
    ax.axvline(1.0, color="gray", linestyle=":")
    ax.set_xlabel("tokens/s with prompt-lookup speculation / without (same server, same run); black: target")
    ax.set_title(f"Speculative decoding: {report['mismatches']} mismatching outputs, "
                 f"{report['acceptance']:.0%} of proposals kept")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    report = run()
    print(json.dumps(report, indent=2))
    print(markdown(report))
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    plot(report, os.path.join(ROOT, "bench", "results", "speculative.png"))


if __name__ == "__main__":
    main()
