"""AMX tiles against AVX-512 (`--matmul-amx on` / `off`), in process, on a CPU with AMX.

First the products-only timings `--matmul-amx auto` decides by (kernel_choice.measure_amx: one pass
over the model's 4-bit and int8 products, each layer its own weights, both paths interleaved). Then
two engines on one loaded model with the served defaults (int8 output layer, native layer loop; no
speculation), one per path, the same N sequences of greedy tokens (EOS ignored) on both, their
steps interleaved one by one, the order reversed every other round: each side's median step time.
Then a ~4,000-token prompt alone, its first token, the engines A B B A; on the tile side its
attention runs on tiles too. The paths round differently, so their tokens may differ. Writes
bench/results/amx.json.

    python -m bench.amx
"""

from __future__ import annotations

import statistics

from bench import readme
from bench.layer_loop import long_prompt_ttfts, steps
from bench.peers import workload_args
from genrpc.launch import describe_cpu
from model_svc.__main__ import check_output_layer, engine_for, parse_args
from model_svc.engine import kernel_choice
from model_svc.loader import load_model

SIDES = ("on", "off")  # --matmul-amx


def run(concurrency: list[int], rounds: int, long_tokens: int) -> dict:
    from transformers import AutoTokenizer

    from bench.peers import MODEL

    if kernel_choice.cpu_info().isa != "amx-bf16":
        raise SystemExit(f"no AMX tiles to compare here: {kernel_choice.cpu_info().describe()}")
    loaded = load_model(MODEL, "bfloat16", "4bit", "cpu", output_layer=check_output_layer(parse_args([])))
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    engines = {side: engine_for(loaded, parse_args(["--prompt-lookup-num-tokens", "0", "--max-num-seqs", "64",
                                                    "--matmul-amx", side]))
               for side in SIDES}
    runner = engines["on"].runner
    shapes = runner._product_shapes()
    timings = kernel_choice.measure_amx(runner.linear.gemm, shapes[0], shapes[2])
    vector, tiles = kernel_choice.per_row(timings)
    result = {"cpu": describe_cpu(), "rounds": rounds,
              "products": {"timings": {str(m): t for m, t in timings.items()},
                           "per_row_ratio": round(tiles / vector, 3), "tiles_chosen": kernel_choice.amx_wins(timings)}}
    print(f"products: {tiles / vector:.2f}x AVX-512's time per row; "
          + ", ".join(f"{m} rows {t[1] / t[0]:.2f}x" for m, t in timings.items()), flush=True)
    steps(engines, tokenizer, 2, 8, 1, same_tokens=False)  # warm: the products bound, the native loop planned
    points = []
    for n in concurrency:
        times = steps(engines, tokenizer, n, 128 if n <= 8 else 64, rounds, same_tokens=False)
        medians = {side: statistics.median(t) * 1e3 for side, t in times.items()}
        points.append({"sequences": n, "tiles_step_ms": round(medians["on"], 2),
                       "avx512_step_ms": round(medians["off"], 2), "steps": len(times["on"]),
                       "ratio": round(medians["on"] / medians["off"], 3)})
        print(f"N={n:2d}: tiles {medians['on']:.2f} ms, AVX-512 {medians['off']:.2f} ms a step: "
              f"{points[-1]['ratio']:.2f}x", flush=True)
    result["points"] = points
    if long_tokens:
        count, ttft = long_prompt_ttfts(engines, tokenizer, long_tokens)
        medians = {side: statistics.median(t) for side, t in ttft.items()}
        result["long_prompt"] = {"prompt_tokens": count, "tiles_s": [round(t, 2) for t in ttft["on"]],
                                 "avx512_s": [round(t, 2) for t in ttft["off"]],
                                 "ratio": round(medians["on"] / medians["off"], 3)}
        print(f"{count}-token prompt: tiles {ttft['on']} s, AVX-512 {ttft['off']} s", flush=True)
    return result


def markdown(report: dict) -> str:
    products = report["products"]
    rows = ["| rows | AVX-512 ms | tiles ms | ratio |", "|---|---|---|---|"]
    for m, (vector, tiles) in products["timings"].items():
        rows.append(f"| {m} | {vector} | {tiles} | {tiles / vector:.2f}x |")
    rows.append(f"\nProducts alone, one pass over the model's layers: tiles take {products['per_row_ratio']:.2f}x "
                f"AVX-512's time per row over these counts, so `auto` takes "
                f"{'tiles' if products['tiles_chosen'] else 'AVX-512'}.\n")
    rows += ["| sequences | tiles ms a step | AVX-512 ms a step | ratio |", "|---|---|---|---|"]
    for p in report["points"]:
        rows.append(f"| {p['sequences']} | {p['tiles_step_ms']} | {p['avx512_step_ms']} | {p['ratio']:.2f}x |")
    lp = report.get("long_prompt")
    if lp:
        rows.append(f"\nA {lp['prompt_tokens']}-token prompt alone, first token: tiles {lp['tiles_s']} s, AVX-512 "
                    f"{lp['avx512_s']} s (A B B A): {lp['ratio']:.2f}x (medians).")
    return "\n".join(rows)


def main() -> None:
    args = workload_args(__doc__.splitlines()[0], rounds=2, least_long=0)
    result = run(args.concurrency, args.rounds, args.long_prompt_tokens)
    readme.save("amx", result)


if __name__ == "__main__":
    main()
