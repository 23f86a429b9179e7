"""`make bench-peers`, second part (not in CI): genrpc's engine beside OpenVINO GenAI, in process.

Where `make bench-peers` installed it (.venv-openvino): OpenVINO GenAI's continuous-batching
pipeline on the bundled model exported with `optimum-cli export openvino --weight-format int4
--group-size 64` (done once, into models/), against genrpc's engine with `make run`'s defaults
(4-bit nf4 weights, bfloat16 compute), in process, the same prompts as token ids: N = 1, 8, 32
streams of 128 greedy tokens (EOS ignored, no speculation on either side), each burst timed whole
(prompts and decoding), each side one warmed engine or pipeline a round with prefix caching off,
genrpc's step-cost model fed as when served; then a ~4,000-token
prompt alone with one new token (its first token's time). OpenVINO runs in its own process
(bench/openvino_side.py) while genrpc's waits; rounds alternate which side goes first; each side's
figure is its median over the rounds.

Writes bench/results/openvino-<build>.json (the native kernel's build), one file per kind of CPU.

    python -m bench.openvino_peer [--rounds 3] [--concurrency 1 8 32] [--long-prompt-tokens 4000]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time

from bench.peers import NEW_TOKENS, long_prompt, workload_args
from bench.run import MODEL, RESULTS, prompts_for
from genrpc.launch import ROOT, describe_cpu

OPENVINO_PYTHON = os.path.join(ROOT, ".venv-openvino", "bin", "python")
OPENVINO_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct-openvino-int4")
EXPORT = ["--weight-format", "int4", "--group-size", "64"]


def export() -> None:
    """The bundled model in OpenVINO's format (once)."""
    if os.path.exists(os.path.join(OPENVINO_MODEL, "openvino_model.xml")):
        return
    cli = os.path.join(os.path.dirname(OPENVINO_PYTHON), "optimum-cli")
    subprocess.run([cli, "export", "openvino", "--model", MODEL, "--task", "text-generation-with-past", *EXPORT,
                    OPENVINO_MODEL], check=True)


def genrpc_side(loaded, prompts: list[list[int]], concurrency: list[int], long_ids: list[int]) -> dict:
    """genrpc's engine in this process, one for the side's bursts as OpenVINO's pipeline is, with prefix
    caching off as OpenVINO's is (the bursts repeat prompts), warmed up as OpenVINO's: each burst of N
    prompts timed whole, then the long prompt's first token. (A fresh engine per burst paid its
    first step's one-time set-up, 0.07-1 s on an AMX Xeon by the step's rows, inside the timed burst.)"""
    from bench.layer_loop import served_step
    from model_svc.__main__ import engine_for, parse_args
    from model_svc.engine.sequence import SamplingParams, Sequence

    engine = engine_for(loaded, parse_args(["--prompt-lookup-num-tokens", "0", "--max-num-seqs", "64",
                                            "--no-prefix-caching"]))

    def burst(ids: list[list[int]], tokens: int) -> tuple[float, int]:
        for i, prompt in enumerate(ids):
            engine.add(Sequence(i, prompt, SamplingParams(max_new_tokens=tokens, ignore_eos=True)))
        started, produced = time.perf_counter(), 0
        while engine.scheduler.has_work:
            produced += sum(out.token_id is not None for out in served_step(engine)[0])
        return time.perf_counter() - started, produced

    burst(prompts[:8], 16)  # warm-up, as OpenVINO's side
    burst([long_ids], 1)
    points = {}
    for n in concurrency:
        wall, tokens = burst(prompts[:n], NEW_TOKENS)
        if tokens != n * NEW_TOKENS:
            raise RuntimeError(f"genrpc generated {tokens} tokens where {n * NEW_TOKENS} were asked")
        points[str(n)] = {"tokens_per_s": tokens / wall, "wall_s": wall, "tokens": tokens}
    return {"points": points, "long_ttft_s": burst([long_ids], 1)[0]}


def openvino_side(spec_path: str) -> dict:
    out = subprocess.run([OPENVINO_PYTHON, os.path.join(ROOT, "bench", "openvino_side.py"), spec_path],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(rounds: int, concurrency: list[int], long_tokens: int) -> dict:
    from transformers import AutoTokenizer

    from model_svc.loader import load_model

    export()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    prompts = [tokenizer(p).input_ids for p in prompts_for(max(concurrency))]
    long_ids = tokenizer(long_prompt(long_tokens)[0]).input_ids
    from model_svc.__main__ import check_output_layer, parse_args

    # as `make run` loads it: the output layer in int8 where the native kernel's int8 product runs
    loaded = load_model(MODEL, "bfloat16", "4bit", "cpu", output_layer=check_output_layer(parse_args([])))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"model": OPENVINO_MODEL, "prompts": prompts, "concurrency": concurrency,
                   "new_tokens": NEW_TOKENS, "long_prompt": long_ids}, f)
    sides = {"genrpc": lambda: genrpc_side(loaded, prompts, concurrency, long_ids),
             "openvino": lambda: openvino_side(f.name)}
    measured: dict[str, list[dict]] = {side: [] for side in sides}
    orders = []
    try:
        for r in range(rounds):
            order = ["genrpc", "openvino"] if r % 2 == 0 else ["openvino", "genrpc"]
            orders.append(order)
            for side in order:
                measured[side].append(sides[side]())
                point = measured[side][-1]
                print(f"round {r + 1} {side:8s}: " + ", ".join(
                    f"N={n} {p['tokens_per_s']:.1f} tok/s" for n, p in point["points"].items()) +
                    f"; long prompt's first token {point['long_ttft_s']:.2f} s", flush=True)
    finally:
        os.unlink(f.name)
    med = statistics.median
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": describe_cpu(),
              "openvino": {"version": measured["openvino"][0]["version"],
                           "export": "optimum-cli export openvino " + " ".join(EXPORT)},
              "genrpc": "make run defaults (4-bit nf4, bfloat16 compute), no speculation",
              "new_tokens": NEW_TOKENS, "orders": orders, "points": []}
    for n in concurrency:
        g = [m["points"][str(n)]["tokens_per_s"] for m in measured["genrpc"]]
        o = [m["points"][str(n)]["tokens_per_s"] for m in measured["openvino"]]
        report["points"].append({"concurrency": n, "genrpc_tokens_per_s": med(g), "openvino_tokens_per_s": med(o),
                                 "ratio": med(g) / med(o), "ratio_per_round": [a / b for a, b in zip(g, o)]})
    g, o = [m["long_ttft_s"] for m in measured["genrpc"]], [m["long_ttft_s"] for m in measured["openvino"]]
    report["long_prompt"] = {"prompt_tokens": len(long_ids), "genrpc_ttft_s": med(g), "openvino_ttft_s": med(o),
                             "ttft_ratio": med(g) / med(o), "ratio_per_round": [a / b for a, b in zip(g, o)]}
    return report


def markdown(report: dict) -> str:
    """The bench README's table: each side's median tokens/s, the ratio each round, the long prompt."""
    rows = ["| streams | genrpc tok/s | OpenVINO GenAI tok/s | ratio (each round) |", "|---|---|---|---|"]
    for p in report["points"]:
        rounds = ", ".join(f"{r:.2f}" for r in p["ratio_per_round"])
        rows.append(f"| {p['concurrency']} | {p['genrpc_tokens_per_s']:.1f} | {p['openvino_tokens_per_s']:.1f} | "
                    f"{p['ratio']:.2f}x ({rounds}) |")
    lp = report["long_prompt"]
    rows.append(f"\nA {lp['prompt_tokens']}-token prompt alone, first token: genrpc {lp['genrpc_ttft_s']:.2f} s, "
                f"OpenVINO {lp['openvino_ttft_s']:.2f} s: {lp['ttft_ratio']:.2f}x the time (each round "
                f"{', '.join(f'{r:.2f}' for r in lp['ratio_per_round'])}).")
    orders = ", ".join("-".join(o) for o in report["orders"])
    rows.append(f"\nOpenVINO GenAI {report['openvino']['version']} ({report['openvino']['export']}); orders of the "
                f"rounds: {orders}.")
    return "\n".join(rows)


def main() -> None:
    args = workload_args(__doc__.splitlines()[0], rounds=3, least_long=1)
    if not os.path.exists(OPENVINO_PYTHON):
        raise SystemExit(f"{OPENVINO_PYTHON} is missing: `make bench-peers` installs OpenVINO GenAI there")
    report = run(args.rounds, args.concurrency, args.long_prompt_tokens)
    from bench import readme

    with open(os.path.join(RESULTS, f"{readme.per_build('openvino')}.json"), "w") as f:
        json.dump(report, f, indent=2)
    readme.write()
    print(markdown(report))


if __name__ == "__main__":
    main()
