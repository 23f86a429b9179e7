"""The native layer loop against the Python loop (`--layer-loop`), in process.

Two engines on one loaded model, one per loop, the same workload on both, their steps interleaved
one by one (A B A B ...), so the machine's drift hits both alike: N sequences of greedy tokens (EOS
ignored, no speculation), each side's median step time over the run; then a ~4,000-token prompt
alone with one new token, its time to first token, the engines in the order A B B A. Both loops
must give the same tokens (they make the same kernel calls). Writes
bench/results/layer_loop-<build>.json (the native kernel's build), one file per kind of CPU.

    python -m bench.layer_loop
"""

from __future__ import annotations

import statistics
import time

from bench import readme
from bench.peers import long_prompt, workload_args
from bench.run import prompts_for
from genrpc.launch import describe_cpu
from model_svc.__main__ import engine_for, parse_args
from model_svc.engine.sequence import SamplingParams, Sequence
from model_svc.loader import load_model

LOOPS = ("native", "python")


def served_step(engine) -> tuple[list, float]:
    """One engine step, timed, its cost fed to the engine's step-cost model as the served loop does
    (model_svc/engine/loop.py), so that long prompts' chunks are sized as when served (stepped bare,
    the model keeps its prior: on an AMX Xeon 111-token chunks of 62 ms where 250 ms are allowed)."""
    start = time.perf_counter()
    outputs = engine.step()
    seconds = time.perf_counter() - start
    stats = engine.last_step
    if stats.num_tokens:
        engine.scheduler.cost.observe(stats.num_tokens, stats.num_pairs, seconds)
    return outputs, seconds


def steps(engines: dict, tokenizer, n: int, new_tokens: int, rounds: int, same_tokens: bool = True) -> dict:
    """Each engine's step times (s) over `rounds` bursts of n sequences, the engines' steps interleaved
    (their order reversed every other round); checks that all made the same tokens (`same_tokens`)."""
    times = {name: [] for name in engines}
    for r in range(rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        tokens = {loop: {} for loop in engines}
        for loop in order:
            for i, text in enumerate(prompts_for(n)):
                engines[loop].add(Sequence(f"{r}-{i}", tokenizer(text).input_ids,
                                           SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)))
        first = True
        while any(e.scheduler.has_work for e in engines.values()):
            for loop in order:
                engine = engines[loop]
                if not engine.scheduler.has_work:
                    continue
                outputs, seconds = served_step(engine)
                if not first:  # the prompts' step is not a decode step
                    times[loop].append(seconds)
                for out in outputs:
                    if out.token_id is not None:
                        tokens[loop].setdefault(out.seq_id, []).append(out.token_id)
            first = False
        if same_tokens and any(made != tokens[order[0]] for made in tokens.values()):
            raise SystemExit(f"the engines ({', '.join(order)}) made different tokens at {n} sequences")
    return times


def first_token(engine, ids: list[int]) -> float:
    engine.add(Sequence("long", ids, SamplingParams(max_new_tokens=1)))
    start = time.perf_counter()
    while engine.scheduler.has_work:
        served_step(engine)
    return time.perf_counter() - start


def long_prompt_ttfts(engines: dict, tokenizer, long_tokens: int) -> tuple[int, dict[str, list[float]]]:
    """A ~`long_tokens` prompt alone (a fresh first line each time, so no cache answers it): its length
    and each engine's times to first token, the engines in the order A B B A."""
    text, count = long_prompt(long_tokens)
    ttft = {name: [] for name in engines}
    for r, name in enumerate((*engines, *list(engines)[::-1])):
        ttft[name].append(first_token(engines[name], tokenizer(f"Request {r}.\n{text}").input_ids))
    return count, ttft


def run(concurrency: list[int], rounds: int, long_tokens: int) -> dict:
    from transformers import AutoTokenizer

    from bench.peers import MODEL

    loaded = load_model(MODEL, "bfloat16", "4bit", "cpu")
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    engines = {loop: engine_for(loaded, parse_args(["--prompt-lookup-num-tokens", "0", "--max-num-seqs", "64",
                                                    "--layer-loop", loop]))
               for loop in LOOPS}
    steps(engines, tokenizer, 2, 8, 1)  # warm: the products bound, the native loop planned
    if engines["native"].runner.layer_loop != "native":
        raise SystemExit("the native layer loop cannot run here (it needs the native kernels)")
    points = []
    for n in concurrency:
        times = steps(engines, tokenizer, n, 128 if n <= 8 else 64, rounds)
        medians = {loop: statistics.median(t) * 1e3 for loop, t in times.items()}
        points.append({"sequences": n, "native_step_ms": round(medians["native"], 2),
                       "python_step_ms": round(medians["python"], 2), "steps": len(times["native"]),
                       "ratio": round(medians["native"] / medians["python"], 3)})
        print(f"N={n:2d}: native {medians['native']:.2f} ms, python {medians['python']:.2f} ms a step: "
              f"{points[-1]['ratio']:.2f}x", flush=True)
    result = {"cpu": describe_cpu(), "rounds": rounds, "points": points}
    if long_tokens:
        count, ttft = long_prompt_ttfts(engines, tokenizer, long_tokens)
        medians = {loop: statistics.median(t) for loop, t in ttft.items()}
        result["long_prompt"] = {"prompt_tokens": count, "native_s": [round(t, 2) for t in ttft["native"]],
                                 "python_s": [round(t, 2) for t in ttft["python"]],
                                 "ratio": round(medians["native"] / medians["python"], 3)}
        print(f"{count}-token prompt: native {ttft['native']} s, python {ttft['python']} s", flush=True)
    return result


def markdown(report: dict) -> str:
    rows = ["| sequences | native loop ms a step | Python loop ms a step | ratio |", "|---|---|---|---|"]
    for p in report["points"]:
        rows.append(f"| {p['sequences']} | {p['native_step_ms']} | {p['python_step_ms']} | {p['ratio']:.2f}x |")
    lp = report.get("long_prompt")
    if lp:
        rows.append(f"\nA {lp['prompt_tokens']}-token prompt alone, first token: native {lp['native_s']} s, Python "
                    f"{lp['python_s']} s (A B B A): {lp['ratio']:.2f}x (medians).")
    return "\n".join(rows)


def main() -> None:
    args = workload_args(__doc__.splitlines()[0], rounds=2, least_long=0)
    readme.save(readme.per_build("layer_loop"), run(args.concurrency, args.rounds, args.long_prompt_tokens))


if __name__ == "__main__":
    main()
