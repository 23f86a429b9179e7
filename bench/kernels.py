"""The native kernel's measured row-count choice against its panel-only path, paired in one run.

The engine in process (no speculation, no gRPC: the products are what differs), N sequences of 64
greedy tokens (EOS ignored) at N = 1, 2, 4, 8, 16, 32, for each side in turn, in the order A B B A
per round so that the machine's drift hits both sides alike; each point keeps its best round. Side
"panel" forces `--matmul-direct-rows 0` (every product through the decoded panel); side "measured"
is the default (`auto`: the threshold kernel_choice.py measured on this CPU). Both give the same
tokens, which the bench checks. Each point is also put against its roofline (bench/roofline.py).
Writes bench/results/kernels.json and kernels.png.

    python -m bench.kernels [--rounds 2] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bench import roofline
from genrpc.launch import ROOT, describe_cpu
from model_svc.__main__ import engine_for, parse_args
from model_svc.engine import kernel_choice
from model_svc.engine.sequence import SamplingParams, Sequence
from model_svc.loader import load_model

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
STREAMS = (1, 2, 4, 8, 16, 32)
TOPICS = ["a lighthouse keeper", "a lost robot", "the first city on Mars", "a dragon's library", "two rival chefs",
          "a river that runs uphill", "a clockmaker's apprentice", "the last winter"]


def run_side(loaded, tokenizer, flags: list[str], n: int, tokens: int) -> tuple[float, list[list[int]]]:
    engine = engine_for(loaded, parse_args(["--prompt-lookup-num-tokens", "0", "--max-num-seqs", "64", *flags]))
    prompts = [tokenizer(f"Write a long story about {TOPICS[i % len(TOPICS)]}.").input_ids for i in range(n)]
    seqs = [Sequence(i, ids, SamplingParams(max_new_tokens=tokens, ignore_eos=True)) for i, ids in enumerate(prompts)]
    outputs = {s.seq_id: [] for s in seqs}
    for s in seqs:
        engine.add(s)
    while engine.scheduler.has_work and not any(outputs.values()):  # prompts first: time the decoding
        for out in engine.step():
            if out.token_id is not None:
                outputs[out.seq_id].append(out.token_id)
    start, produced = time.perf_counter(), sum(map(len, outputs.values()))
    while engine.scheduler.has_work:
        for out in engine.step():
            if out.token_id is not None:
                outputs[out.seq_id].append(out.token_id)
    elapsed = time.perf_counter() - start
    return (sum(map(len, outputs.values())) - produced) / elapsed, [outputs[i] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "kernels.json"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    loaded = load_model(MODEL, "bfloat16", "4bit", "cpu")
    sides = {"panel": ["--matmul-direct-rows", "0"], "measured": []}
    best: dict[str, dict[int, float]] = {side: {} for side in sides}
    for r in range(args.rounds):
        for n in STREAMS:
            tokens = {}
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order + order[::-1]:
                rate, out = run_side(loaded, tokenizer, sides[side], n, args.tokens)
                best[side][n] = max(best[side].get(n, 0.0), rate)
                if tokens.setdefault(side, out) != out:
                    raise SystemExit(f"{side} at {n} streams gave other tokens on a second run")
            if tokens["panel"] != tokens["measured"]:
                raise SystemExit(f"the two sides gave different tokens at {n} streams: the paths' bits differ")
            print(f"round {r + 1}, {n} streams: panel {best['panel'][n]:.1f}, measured {best['measured'][n]:.1f} "
                  "tok/s (best so far)", flush=True)
    choice = engine_for(loaded, parse_args(["--prompt-lookup-num-tokens", "0"])).runner.matmul_detail
    machine = roofline.measure()
    report = {
        "cpu": describe_cpu(), "cpu_flags": kernel_choice.cpu_info().describe(), "threads": torch.get_num_threads(),
        "tokens_per_sequence": args.tokens, "rounds": args.rounds, "choice": choice,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "points": {str(n): {"panel_tok_s": round(best["panel"][n], 1), "measured_tok_s": round(best["measured"][n], 1),
                            "ratio": round(best["measured"][n] / best["panel"][n], 2)} for n in STREAMS},
        "roofline": roofline.bounds(machine, {n: round(best["measured"][n], 1) for n in STREAMS}, context=80,
                                    output_bytes=roofline.served_output_bytes()),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    plot(report, args.out.removesuffix(".json") + ".png")
    from bench import readme  # here: it imports this module for its markdown

    readme.write()
    print(json.dumps(report["points"], indent=2))
    print(roofline.markdown(report["roofline"]))


def markdown(report: dict) -> str:
    """The bench README's table: both sides by sequence count, and the measured side's roofline."""
    m = report["roofline"]["machine"]
    rows = [f"{report['cpu_flags']}; read bandwidth {m['read_bandwidth_gb_s']} GB/s, peak {m['peak_gflop_s']} "
            f"GFLOP/s ({m['peak_dtype']}). The choice measured there: {report['choice']}.", "",
            "| sequences | panel only tok/s | measured choice tok/s | ratio | fraction of roofline |",
            "|---|---|---|---|---|"]
    for n, p in report["points"].items():
        bound = report["roofline"]["points"][n]
        rows.append(f"| {n} | {p['panel_tok_s']} | {p['measured_tok_s']} | {p['ratio']:.2f} | "
                    f"{bound['fraction']:.2f} ({bound['bound']}) |")
    return "\n".join(rows)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = [int(n) for n in report["points"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for side, label in (("panel_tok_s", "panel only (--matmul-direct-rows 0)"), ("measured_tok_s", "measured choice")):
        ax.plot(streams, [report["points"][str(n)][side] for n in streams], marker="o", label=label)
    ax.plot(streams, [report["roofline"]["points"][str(n)]["bound_tokens_per_s"] for n in streams], ls="--",
            color="grey", label="roofline bound")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequences")
    ax.set_ylabel("decoded tokens/s (in process)")
    ax.set_title(report["cpu"], fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
