"""OpenVINO GenAI's side of bench/peers.py's in-process comparison; run by .venv-openvino's Python.

Reads a JSON spec (argv[1]): the exported model's folder, the prompts as token ids, the stream
counts, new tokens, and the long prompt's ids. Builds one ContinuousBatchingPipeline on the CPU,
warms it up, then for each count N generates N greedy completions at once (EOS ignored) and times
the burst; then the long prompt alone with one new token (its first token's time). Prints one line
of JSON: {"points": {N: {"tokens_per_s", "wall_s", "tokens"}}, "long_ttft_s": s, "version": v}.
Imports nothing of genrpc's (another virtualenv, another torch).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import openvino as ov
import openvino_genai as genai


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    scheduler = genai.SchedulerConfig()
    scheduler.cache_size = 2  # GB of KV cache: 32 streams of ~140 tokens and the long prompt fit
    scheduler.enable_prefix_caching = False  # each burst computes its prompts, as genrpc's fresh engine does
    pipe = genai.ContinuousBatchingPipeline(spec["model"], scheduler, "CPU")

    def config(new_tokens: int) -> genai.GenerationConfig:
        c = genai.GenerationConfig()
        c.max_new_tokens, c.ignore_eos, c.do_sample = new_tokens, True, False
        return c

    def burst(prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
        inputs = [ov.Tensor(np.array([ids], dtype=np.int64)) for ids in prompts]
        started = time.perf_counter()
        results = pipe.generate(inputs, [config(new_tokens)] * len(inputs))
        wall = time.perf_counter() - started
        return wall, sum(len(r.m_generation_ids[0]) for r in results)

    burst(spec["prompts"][:8], 16)  # warm-up: compilation, first shapes
    burst([spec["long_prompt"]], 1)
    points = {}
    for n in spec["concurrency"]:
        wall, tokens = burst(spec["prompts"][:n], spec["new_tokens"])
        if tokens != n * spec["new_tokens"]:
            raise SystemExit(f"OpenVINO generated {tokens} tokens where {n * spec['new_tokens']} were asked")
        points[n] = {"tokens_per_s": tokens / wall, "wall_s": wall, "tokens": tokens}
    long_wall, _ = burst([spec["long_prompt"]], 1)
    print(json.dumps({"points": points, "long_ttft_s": long_wall, "version": genai.__version__}))


if __name__ == "__main__":
    main()
