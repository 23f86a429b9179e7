"""A lone sequence's decode step as one row against the step padded with a dummy second row, in process.

With native numerics no product's sums depend on the row count, so a step of one token runs as one
row (ModelRunner.one_row_runs_alone); elsewhere it still gets a dummy second row, which keeps
bitsandbytes' and PyTorch's one-row kernels (GEMV, rounding their own way) out of the step. Two
engines on one loaded model as `make run` loads it (its output layer), one of them made to pad as
before, the same lone sequence of greedy tokens on both (EOS ignored, no speculation), their steps
interleaved one by one over 4 rounds; each side's median step time. Both must give the same tokens.
Writes bench/results/one_row-<build>.json (the native kernel's build), one file per kind of CPU.

    python -m bench.one_row
"""

from __future__ import annotations

import statistics

from bench import readme
from bench.layer_loop import steps
from genrpc.launch import describe_cpu
from model_svc.__main__ import check_output_layer, engine_for, parse_args
from model_svc.loader import load_model

SIDES = ("one row", "two rows")


def run(rounds: int = 4, new_tokens: int = 128) -> dict:
    from transformers import AutoTokenizer

    from bench.peers import MODEL

    output_layer = check_output_layer(parse_args([]))
    loaded = load_model(MODEL, "bfloat16", "4bit", "cpu", output_layer=output_layer)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    engines = {side: engine_for(loaded, parse_args(["--prompt-lookup-num-tokens", "0"])) for side in SIDES}
    engines["two rows"].runner._one_row_alone = False  # the dummy row, as without native numerics
    steps(engines, tokenizer, 1, 8, 1)  # warm: every product's first call
    if not engines["one row"].runner.one_row_runs_alone():
        raise SystemExit("one-row steps do not run here (they need native numerics and the native products)")
    times = steps(engines, tokenizer, 1, new_tokens, rounds)
    medians = {side: statistics.median(t) * 1e3 for side, t in times.items()}
    ratio = medians["one row"] / medians["two rows"]
    print(f"one sequence: {medians['one row']:.2f} ms a step as one row, {medians['two rows']:.2f} ms as two: "
          f"{ratio:.2f}x", flush=True)
    return {"cpu": describe_cpu(), "rounds": rounds, "output_layer": output_layer,
            "one_row_step_ms": round(medians["one row"], 2), "two_rows_step_ms": round(medians["two rows"], 2),
            "steps": len(times["one row"]), "ratio": round(ratio, 3)}


def markdown(report: dict) -> str:
    return (f"One sequence, output layer {report['output_layer']}: {report['one_row_step_ms']} ms a step as one "
            f"row against {report['two_rows_step_ms']} ms padded to two (medians of {report['steps']} steps "
            f"each): {report['ratio']:.2f}x the time.")


def main() -> None:
    readme.save(readme.per_build("one_row"), run())


if __name__ == "__main__":
    main()
