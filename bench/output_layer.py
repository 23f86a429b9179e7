"""The quantized output layers (`--output-layer int8`, the default where it runs natively, and `nf4`):
accuracy against float32, and one stream's speed.

Accuracy: on the 64 held-out prompts of tests/data/heldout_prompts.txt (written before any of these
runs, never tuned on; each in the model's chat template), 24 greedy tokens from
  - float32: generate() on the unquantized weights (the reference),
  - library: generate() on the model as transformers loads it with load_in_4bit (output layer bfloat16),
  - genrpc bfloat16 / int8 / nf4: the engine in process, output layer unquantized / int8 / nf4.
Agreement of a side with float32: the tokens equal before the first difference (24 if equal up to
EOS or the end), averaged over the prompts; and how many first tokens equal float32's.
Speed: one sequence, 64 tokens, the engine with each output layer, the sides in turn, forwards then
backwards (A B C C B A), twice.
Writes bench/results/output_layer-<build>.json (the native kernel's build: avx2, avx512-bf16), one
file per kind of CPU.

    python -m bench.output_layer
"""

from __future__ import annotations

import json
import os
import time

import torch

from bench.kernels import run_side
from genrpc.launch import ROOT, describe_cpu
from model_svc.__main__ import engine_for, parse_args
from model_svc.engine.sequence import SamplingParams, Sequence
from model_svc.loader import load_model

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
PROMPTS = os.path.join(ROOT, "tests", "data", "heldout_prompts.txt")
TOKENS = 24


def heldout_texts(tokenizer, count: int | None = None) -> list[str]:
    """The first `count` (all: 64) held-out prompts, each in the model's chat template."""
    with open(PROMPTS) as f:
        prompts = [line.strip() for line in f if line.strip()][:count]
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def generate(loaded, tokenizer, texts: list[str]) -> list[list[int]]:
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(texts), 16):
        enc = tokenizer(texts[i:i + 16], return_tensors="pt", padding=True)
        with torch.inference_mode():
            ids = loaded.model.generate(**enc, max_new_tokens=TOKENS, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
        out += ids[:, enc.input_ids.shape[1]:].tolist()
    return out


def engine_tokens(loaded, tokenizer, texts: list[str]) -> list[list[int]]:
    engine = engine_for(loaded, parse_args(["--prompt-lookup-num-tokens", "0", "--max-num-seqs", "64"]))
    outputs = {i: [] for i in range(len(texts))}
    for i, text in enumerate(texts):
        engine.add(Sequence(i, tokenizer(text).input_ids, SamplingParams(max_new_tokens=TOKENS)))
    while engine.scheduler.has_work:
        for out in engine.step():
            if out.token_id is not None:
                outputs[out.seq_id].append(out.token_id)
    return [outputs[i] for i in range(len(texts))]


def agreement(got: list[int], reference: list[int], eos: set[int]) -> int:
    for i, (a, b) in enumerate(zip(got, reference)):
        if a != b:
            return i
        if a in eos:
            return TOKENS
    return TOKENS if len(got) == len(reference) else min(len(got), len(reference))


def markdown(report: dict) -> str:
    """The bench README's table: agreement with float32 by side, and the one-stream speed."""
    rows = ["| side | tokens agreeing with float32, mean of " + str(report["tokens"]) + " | first token equal |",
            "|---|---|---|"]
    for side, a in report["accuracy_against_float32"].items():
        rows.append(f"| {side} | {a['mean_agreement']} | {a['first_token_equal']} of {report['prompts']} |")
    speed = report["one_sequence_tok_s"]
    rows.append(f"\nOne sequence: output layer bfloat16 {speed['none']} tok/s, int8 {speed['int8']} tok/s "
                f"({report['speed_ratio_int8']:.2f}x), nf4 {speed['nf4']} tok/s ({report['speed_ratio_nf4']:.2f}x).")
    return "\n".join(rows)


def main() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    texts = heldout_texts(tokenizer)
    reference = generate(load_model(MODEL, "float32", "none", "cpu"), tokenizer, texts)
    bf16 = load_model(MODEL, "bfloat16", "4bit", "cpu")
    nf4 = load_model(MODEL, "bfloat16", "4bit", "cpu", output_layer="nf4")
    int8 = load_model(MODEL, "bfloat16", "4bit", "cpu", output_layer="int8")
    eos = set(bf16.eos_token_ids)
    sides = {"library generate()": generate(bf16, tokenizer, texts),
             "genrpc, output layer bfloat16": engine_tokens(bf16, tokenizer, texts),
             "genrpc, output layer int8": engine_tokens(int8, tokenizer, texts),
             "genrpc, output layer nf4": engine_tokens(nf4, tokenizer, texts)}
    accuracy = {}
    for name, tokens in sides.items():
        agree = [agreement(t, r, eos) for t, r in zip(tokens, reference)]
        accuracy[name] = {"mean_agreement": round(sum(agree) / len(agree), 2),
                          "first_token_equal": sum(t[:1] == r[:1] for t, r in zip(tokens, reference))}
        print(f"{name}: {accuracy[name]}", flush=True)
    models = {"none": bf16, "int8": int8, "nf4": nf4}
    speed = {side: 0.0 for side in models}
    for side in [*models, *reversed(models)] * 2:
        rate, _ = run_side(models[side], tokenizer, [], 1, 64)
        speed[side] = max(speed[side], rate)
    print("one sequence: " + ", ".join(f"output layer {side} {rate:.1f}" for side, rate in speed.items()) + " tok/s",
          flush=True)
    report = {"cpu": describe_cpu(), "when": time.strftime("%Y-%m-%d %H:%M"), "prompts": len(texts),
              "tokens": TOKENS, "accuracy_against_float32": accuracy,
              "one_sequence_tok_s": {k: round(v, 1) for k, v in speed.items()},
              "speed_ratio_int8": round(speed["int8"] / speed["none"], 2),
              "speed_ratio_nf4": round(speed["nf4"] / speed["none"], 2)}
    from bench import readme  # here: it imports this module for its markdown

    out = os.path.join(ROOT, "bench", "results", f"{readme.per_build('output_layer')}.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    readme.write()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
