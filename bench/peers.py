"""`make bench-peers` (not in CI): genrpc beside vLLM's CPU build, in the same minutes.

Both serve the bundled model (genrpc with `make run`'s defaults: 4-bit nf4 weights, bfloat16
compute; vLLM bfloat16, its OpenAI server, `VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=<all
CPUs>`, from the separate virtualenv .venv-peers that the Makefile fills with `vllm-cpu`). Both
are started once; while one side is measured the other side's processes are stopped (SIGSTOP), so
an idle server's threads take nothing from the measured one, and a burst of 8 short requests lets
the side just resumed settle before it is measured. Each round measures every concurrency
on one side, then on the other; rounds alternate which side goes first (genrpc-vLLM, vLLM-genrpc,
...), because this machine's speed drifts by up to 2x between minutes.

Workload (issue 14's): the 8 story prompts of bench/run.py as plain completions, 128 greedy tokens
per stream, EOS ignored, N concurrent streams (N = 1, 8, 32; one stream makes three requests one
after another). A client sees tokens/s (all streams' tokens over the wall time of the burst) and
time to first token. Each side's figure per N is its median over the rounds, and the ratio is
genrpc's over vLLM's; per-round ratios are kept too.

A long prompt too (issue 28's): one request alone with a prompt of ~4,000 tokens (a text made for
the bench, the same on both sides, a fresh first line each request so that neither side's prefix
cache answers it), 8 greedy tokens; its time to first token, once a round on each side.

Then the same streams on a larger model (issue 28's 1B class; `--no-large-model` skips it): a
Llama-shaped model of 1.07 B parameters (hidden 2,048, 16 layers, 32 query and 8 key/value heads,
MLP 8,192, the bundled tokenizer's 49,152 tokens, tied embeddings) with random weights (seeded),
built once from that config into models/Llama-1B-random; each side serves it as it serves the
small one. No long prompt there (its prefill alone would take minutes on two cores).

Writes bench/results/peers-<build>.json and .png (the native kernel's build: one per kind of CPU).

    python -m bench.peers [--rounds 3] [--concurrency 1 8 32] [--long-prompt-tokens 4000] [--no-large-model]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from bench import roofline
from bench.clients import run_streams
from bench.run import MODEL, RESULTS, percentile, prompts_for
from genrpc.launch import ROOT, describe_cpu, start_stack

PEERS_PYTHON = os.path.join(ROOT, ".venv-peers", "bin", "python")
NEW_TOKENS = 128
SINGLE_STREAM_REQUESTS = 3
LONG_PROMPT_TOKENS = 4000
MAX_LONG_PROMPT = 7000  # the model's 8,192 positions, less the new tokens
LONG_NEW_TOKENS = 8
VLLM_READY_SECONDS = 1200  # its first start on a slow CPU took ~10 minutes (compilation)
LARGE_MODEL = os.path.join(ROOT, "models", "Llama-1B-random")
LARGE_SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Vllm:
    """vLLM's OpenAI server in its own process group (the API server and its engine processes)."""

    def __init__(self, model: str, max_model_len: int = 2048):
        if not os.path.exists(PEERS_PYTHON):
            raise SystemExit(f"{PEERS_PYTHON} is missing: `make bench-peers` installs vllm-cpu there")
        self.port = free_port()
        self.model = model
        cpus = sorted(os.sched_getaffinity(0))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4",
                   VLLM_CPU_OMP_THREADS_BIND=f"{cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1))
                   else ",".join(map(str, cpus)))
        self.log = open(os.path.join(RESULTS, "peers-vllm.log.tmp"), "w")
        self.proc = subprocess.Popen(
            [PEERS_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "bfloat16",
             "--max-model-len", str(max_model_len), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + VLLM_READY_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"vLLM was not ready within {VLLM_READY_SECONDS} s; see {self.log.name}")

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        try:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                self.signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()

    def version(self) -> str:
        out = subprocess.run([PEERS_PYTHON, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                             capture_output=True, text=True)
        return out.stdout.strip() or "unknown"


async def vllm_stream(port: int, model: str, prompt: str, new_tokens: int) -> tuple[float, int]:
    """One streamed completion over HTTP/1.0 (close-delimited, so the body is plain SSE lines):
    (seconds to the first text, completion tokens)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"vLLM answered {status!r}: {await reader.read()!r}")
    ttft, tokens = 0.0, 0
    while line := await reader.readline():
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        event = json.loads(line[6:])
        if event.get("choices") and event["choices"][0].get("text") and not ttft:
            ttft = time.perf_counter() - start
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    writer.close()
    return ttft, tokens


async def measure_vllm(port: int, model: str, n: int, new_tokens: int = NEW_TOKENS) -> dict:
    prompts = prompts_for(n)
    if n == 1:
        started = time.perf_counter()
        results = [await vllm_stream(port, model, prompts[0], new_tokens) for _ in range(SINGLE_STREAM_REQUESTS)]
    else:
        started = time.perf_counter()
        results = await asyncio.gather(*[vllm_stream(port, model, p, new_tokens) for p in prompts])
    wall = time.perf_counter() - started
    return summary([t for t, _ in results], sum(k for _, k in results), wall, n, new_tokens)


async def measure_genrpc(address: str, n: int, new_tokens: int = NEW_TOKENS) -> dict:
    if n == 1:
        started = time.perf_counter()
        results = []
        for _ in range(SINGLE_STREAM_REQUESTS):
            results += (await run_streams(address, prompts_for(1), [new_tokens], [0.0]))[0]
    else:
        started = time.perf_counter()
        results, _ = await run_streams(address, prompts_for(n), [new_tokens] * n, [0.0] * n)
    wall = time.perf_counter() - started
    if any(r.code != "OK" for r in results):
        raise RuntimeError(f"genrpc: {[r.code for r in results if r.code != 'OK']}")
    return summary([r.ttft for r in results], sum(r.num_tokens for r in results), wall, n, new_tokens)


def large_model(folder: str = LARGE_MODEL) -> str:
    """The 1B-class model (LARGE_SHAPE on the bundled model's config: its vocabulary, positions and
    norms), random weights from seed 0 in bfloat16, with the bundled tokenizer; built once (~2.1 GB,
    a minute), then reused. Returns its folder."""
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    import shutil
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(MODEL, **LARGE_SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder))  # whole or not at all
    try:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(MODEL, name)):
                shutil.copy(os.path.join(MODEL, name), tmp)
        os.chmod(tmp, 0o755)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def long_prompt(tokens: int) -> tuple[str, int]:
    """A made-up text of about `tokens` tokens of the bundled model's tokenizer (numbered paragraphs
    of the story prompts' topics), and its length in tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    paragraphs, text = [], ""
    topics = prompts_for(8)
    while len(tokenizer(text).input_ids) < tokens:
        i = len(paragraphs)
        paragraphs.append(f"Note {i + 1}. {topics[i % len(topics)]} Consider part {i + 1} of it, and what "
                          f"follows from part {i}: the details change, the question stays the same.")
        text = "\n".join(paragraphs)
    ids = tokenizer(text).input_ids[:tokens]
    text = tokenizer.decode(ids)
    return text, len(tokenizer(text).input_ids)


async def long_ttft_vllm(port: int, model: str, prompt: str) -> float:
    ttft, tokens = await vllm_stream(port, model, prompt, LONG_NEW_TOKENS)
    if tokens != LONG_NEW_TOKENS:
        raise RuntimeError(f"vLLM: {tokens} tokens where {LONG_NEW_TOKENS} were asked")
    return ttft


async def long_ttft_genrpc(address: str, prompt: str) -> float:
    results, _ = await run_streams(address, [prompt], [LONG_NEW_TOKENS], [0.0])
    if results[0].code != "OK" or results[0].num_tokens != LONG_NEW_TOKENS:
        raise RuntimeError(f"genrpc: {results[0].code}, {results[0].num_tokens} tokens")
    return results[0].ttft


def summary(ttfts: list[float], tokens: int, wall: float, n: int, new_tokens: int) -> dict:
    expected = new_tokens * (SINGLE_STREAM_REQUESTS if n == 1 else n)
    if tokens != expected:
        raise RuntimeError(f"{tokens} tokens where {expected} were asked")
    return {"tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttfts, 50), "tokens": tokens, "wall_s": wall}


class Genrpc:
    def __init__(self, model: str):
        self.stack = start_stack(model, timeout=600)  # a new model's first start measures its kernels
        self.procs = [self.stack.tokenizer.proc, self.stack.model.proc, self.stack.gateway.proc]

    def signal(self, sig: int) -> None:
        for proc in self.procs:
            proc.send_signal(sig)

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.stack.stop()


def run(rounds: int, concurrency: list[int], long_tokens: int = LONG_PROMPT_TOKENS, model: str = MODEL) -> dict:
    """Both servers on `model`, each point measured on each side every round (module docstring)."""
    os.makedirs(RESULTS, exist_ok=True)
    long_text, long_length = long_prompt(long_tokens) if long_tokens else ("", 0)
    fresh = iter(range(1_000_000))  # each long request's own first line: no prefix cache answers it

    def long_request() -> str:
        return f"Request {next(fresh)}.\n{long_text}"

    genrpc = Genrpc(model)
    vllm = None
    try:
        genrpc.signal(signal.SIGSTOP)  # vLLM's start-up (compilation, warm-up) must not share its cores
        vllm = Vllm(model, max_model_len=max(2048, long_length + 64 + LONG_NEW_TOKENS))
        genrpc.signal(signal.SIGCONT)
        sides = {
            "genrpc": (genrpc, lambda n, k=NEW_TOKENS: measure_genrpc(genrpc.stack.gateway.address, n, k)),
            "vllm": (vllm, lambda n, k=NEW_TOKENS: measure_vllm(vllm.port, model, n, k)),
        }
        long_measure = {"genrpc": lambda: long_ttft_genrpc(genrpc.stack.gateway.address, long_request()),
                        "vllm": lambda: long_ttft_vllm(vllm.port, model, long_request())}
        for side, (server, measure) in sides.items():  # warm-up: first requests, all shapes
            other = sides["vllm" if side == "genrpc" else "genrpc"][0]
            other.signal(signal.SIGSTOP)
            for n in concurrency:
                asyncio.run(measure(min(n, 8)))
            if long_tokens:
                asyncio.run(long_measure[side]())
            other.signal(signal.SIGCONT)
        measured: dict[str, dict[int, list[dict]]] = {s: {n: [] for n in concurrency} for s in sides}
        long_ttfts: dict[str, list[float]] = {s: [] for s in sides}
        orders = []
        for r in range(rounds):
            order = ["genrpc", "vllm"] if r % 2 == 0 else ["vllm", "genrpc"]
            orders.append(order)
            for side in order:
                server, measure = sides[side]
                other = sides["vllm" if side == "genrpc" else "genrpc"][0]
                other.signal(signal.SIGSTOP)
                try:
                    # A burst of 8 x 16 tokens first: a side just resumed settles (genrpc's thread
                    # policy saw the other side's CPU while it was stopped) before it is measured.
                    # Once again after a pause if it fails: a gateway resumed from SIGSTOP may find
                    # its keepalive ping to the model worker timed out while it was stopped, drop
                    # that channel (its calls UNAVAILABLE) and reconnect.
                    try:
                        asyncio.run(measure(8, 16))
                    except RuntimeError as error:
                        print(f"round {r + 1} {side}: settling burst failed ({error}); again in 3 s", flush=True)
                        time.sleep(3)
                        asyncio.run(measure(8, 16))
                    for n in concurrency:
                        point = asyncio.run(measure(n))
                        measured[side][n].append(point)
                        print(f"round {r + 1} {side:6s} N={n:2d}: {point['tokens_per_s']:6.1f} tok/s, "
                              f"TTFT p50 {point['ttft_p50_s'] * 1000:6.0f} ms", flush=True)
                    if long_tokens:
                        long_ttfts[side].append(asyncio.run(long_measure[side]()))
                        print(f"round {r + 1} {side:6s} {long_length}-token prompt: first token in "
                              f"{long_ttfts[side][-1]:.2f} s", flush=True)
                finally:
                    other.signal(signal.SIGCONT)
        report = {
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": platform.processor() or platform.machine()},
            "workload": {"prompts": prompts_for(8), "new_tokens": NEW_TOKENS, "greedy": True, "ignore_eos": True,
                         "single_stream_requests": SINGLE_STREAM_REQUESTS},
            "model": os.path.basename(model),
            "genrpc": "make run defaults (4-bit nf4, bfloat16 compute)",
            "vllm": {"version": vllm.version(), "dtype": "bfloat16", "server": "OpenAI /v1/completions, streamed"},
            "orders": orders,
            "points": [],
        }
        if long_tokens:
            g, v = long_ttfts["genrpc"], long_ttfts["vllm"]
            report["long_prompt"] = {
                "prompt_tokens": long_length, "new_tokens": LONG_NEW_TOKENS,
                "genrpc_ttft_s": statistics.median(g), "vllm_ttft_s": statistics.median(v),
                "ttft_ratio": statistics.median(g) / statistics.median(v),
                "ratio_per_round": [a / b for a, b in zip(g, v)], "genrpc_rounds_s": g, "vllm_rounds_s": v}
        for n in concurrency:
            g, v = measured["genrpc"][n], measured["vllm"][n]
            med = lambda points, key: statistics.median(p[key] for p in points)  # noqa: E731
            report["points"].append({
                "concurrency": n,
                "genrpc": {"tokens_per_s": med(g, "tokens_per_s"), "ttft_p50_s": med(g, "ttft_p50_s"), "rounds": g},
                "vllm": {"tokens_per_s": med(v, "tokens_per_s"), "ttft_p50_s": med(v, "ttft_p50_s"), "rounds": v},
                "ratio_tokens_per_s": med(g, "tokens_per_s") / med(v, "tokens_per_s"),
                "ratio_per_round": [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(g, v)],
                "ttft_ratio": med(g, "ttft_p50_s") / med(v, "ttft_p50_s"),
            })
        return report
    finally:
        if vllm is not None:
            vllm.stop()
        genrpc.stop()


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
    labels = [str(p["concurrency"]) for p in points]
    x = range(len(points))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.38
    for offset, side, colour in ((-width / 2, "genrpc", "tab:blue"), (width / 2, "vllm", "tab:orange")):
        left.bar([i + offset for i in x], [p[side]["tokens_per_s"] for p in points], width, label=side, color=colour)
        right.bar([i + offset for i in x], [p[side]["ttft_p50_s"] * 1000 for p in points], width, label=side,
                  color=colour)
    for i, p in zip(x, points):
        left.annotate(f"{p['ratio_tokens_per_s']:.2f}x",
                      (i, max(p["genrpc"]["tokens_per_s"], p["vllm"]["tokens_per_s"])),
                      ha="center", va="bottom")
    left.set(xticks=list(x), xticklabels=labels, xlabel="concurrent streams", ylabel="tokens/s (median of rounds)",
             title="Throughput, genrpc / vLLM-CPU")
    right.set(xticks=list(x), xticklabels=labels, xlabel="concurrent streams", ylabel="ms",
              title="Time to first token, p50")
    left.legend()
    fig.suptitle(f"genrpc vs vLLM {report['vllm']['version']} (CPU), same minutes, {report['when']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


TARGETS = {1: ">= 1.5x", 8: ">= 1.3x", 32: ">= 1.2x; TTFT no worse"}
LARGE_TARGETS = {8: ">= 1.5x on a CPU with AMX", 32: ">= 1.5x on a CPU with AMX"}


def markdown(report: dict) -> str:
    """The bench README's tables: each point's median tokens/s, the ratio each round, first tokens;
    then the larger model's."""
    rows = _table(report, TARGETS)
    if "long_prompt" in report:
        lp = report["long_prompt"]
        rounds = ", ".join(f"{r:.2f}" for r in lp["ratio_per_round"])
        rows.append(f"\nA {lp['prompt_tokens']}-token prompt alone, time to first token (median of rounds): genrpc "
                    f"{lp['genrpc_ttft_s']:.2f} s, vLLM {lp['vllm_ttft_s']:.2f} s: {lp['ttft_ratio']:.2f}x the time "
                    f"(each round {rounds}; target <= 0.8x on a CPU with AMX).")
    orders = ", ".join("-".join(o) for o in report["orders"])
    rows.append(f"\nvLLM {report['vllm']['version']} ({report['vllm']['dtype']}); orders of the rounds: {orders}.")
    large = report.get("large_model")
    if large:
        rows += [f"\nThe 1B-class model ({large.get('model', 'Llama-1B-random')}, random weights), same rounds:", "",
                 *_table(large, LARGE_TARGETS)]
    return "\n".join(rows)


def _table(report: dict, targets: dict) -> list[str]:
    rows = ["| streams | genrpc tok/s | vLLM-CPU tok/s | ratio (each round) | TTFT p50 genrpc / vLLM ms | target |",
            "|---|---|---|---|---|---|"]
    for p in report["points"]:
        n, g, v = p["concurrency"], p["genrpc"], p["vllm"]
        rounds = ", ".join(f"{r:.2f}" for r in p["ratio_per_round"])
        rows.append(f"| {n} | {g['tokens_per_s']:.1f} | {v['tokens_per_s']:.1f} | {p['ratio_tokens_per_s']:.2f}x "
                    f"({rounds}) | {g['ttft_p50_s'] * 1000:.0f} / {v['ttft_p50_s'] * 1000:.0f} | "
                    f"{targets.get(n, '')} |")
    return rows


def workload_args(description: str, rounds: int, least_long: int, large: bool = False) -> argparse.Namespace:
    """The flags of the benches that compare sides over N streams and a lone long prompt (this one,
    bench/openvino_peer.py, bench/layer_loop.py, bench/amx.py), parsed and checked: --rounds, --concurrency,
    --long-prompt-tokens (at least `least_long`; 0, where allowed: not measured); with `large`,
    --no-large-model (the 1B-class model's streams skipped)."""
    parser = argparse.ArgumentParser(description=description)
    if large:
        parser.add_argument("--no-large-model", action="store_true", help="skip the 1B-class model's streams")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--long-prompt-tokens", type=int, default=LONG_PROMPT_TOKENS,
                        help="the lone long prompt's length in tokens" + ("" if least_long else " (0: not measured)"))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds}: must be >= 1")
    if not least_long <= args.long_prompt_tokens <= MAX_LONG_PROMPT:
        parser.error(f"--long-prompt-tokens={args.long_prompt_tokens}: must be in [{least_long}, {MAX_LONG_PROMPT}] "
                     "(the model's 8,192 positions, less the new tokens)")
    return args


def rooflines(machine: dict, report: dict, folder: str) -> dict:
    """Each side's points against their bounds (bench/roofline.py) for the model in `folder`."""
    context = 12 + NEW_TOKENS // 2  # a story prompt's ~12 tokens, then half the new ones on average
    output_bytes = roofline.served_output_bytes()  # genrpc's; vLLM's output layer is bfloat16
    return {side: roofline.bounds(machine, {p["concurrency"]: p[side]["tokens_per_s"] for p in report["points"]},
                                  context, folder, weight_bytes=roofline.NF4_BYTES if side == "genrpc" else 2.0,
                                  output_bytes=output_bytes if side == "genrpc" else 2.0)
            for side in ("genrpc", "vllm")}


def main() -> None:
    args = workload_args(__doc__.splitlines()[0], rounds=3, least_long=0, large=True)
    machine = roofline.measure()  # before either server starts: nothing else on the cores
    report = run(args.rounds, args.concurrency, args.long_prompt_tokens)
    report["roofline"] = rooflines(machine, report, MODEL)
    if not args.no_large_model:
        large = report["large_model"] = run(args.rounds, args.concurrency, 0, model=large_model())
        large["roofline"] = rooflines(machine, large, LARGE_MODEL)
    report["cpu"] = describe_cpu()
    from bench import readme  # here: it imports this module for its markdown

    name = readme.per_build("peers")
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot(report, os.path.join(RESULTS, f"{name}.png"))

    readme.write()
    for p in report["points"]:
        print(f"N={p['concurrency']:2d}: genrpc {p['genrpc']['tokens_per_s']:.0f} tok/s, vLLM "
              f"{p['vllm']['tokens_per_s']:.0f} tok/s: {p['ratio_tokens_per_s']:.2f}x (rounds "
              f"{', '.join(f'{r:.2f}' for r in p['ratio_per_round'])}); TTFT {p['genrpc']['ttft_p50_s'] * 1000:.0f} "
              f"vs {p['vllm']['ttft_p50_s'] * 1000:.0f} ms")
    for p in report.get("large_model", {}).get("points", []):
        print(f"1B-class model, N={p['concurrency']:2d}: genrpc {p['genrpc']['tokens_per_s']:.1f} tok/s, vLLM "
              f"{p['vllm']['tokens_per_s']:.1f} tok/s: {p['ratio_tokens_per_s']:.2f}x")
    if "long_prompt" in report:
        lp = report["long_prompt"]
        print(f"{lp['prompt_tokens']}-token prompt: first token genrpc {lp['genrpc_ttft_s']:.2f} s, vLLM "
              f"{lp['vllm_ttft_s']:.2f} s: {lp['ttft_ratio']:.2f}x")
    for side in ("genrpc", "vllm"):
        print(f"{side}:\n{roofline.markdown(report['roofline'][side])}")
    sys.exit(0)


if __name__ == "__main__":
    main()
