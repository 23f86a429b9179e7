"""The roofline of a decode step on this machine (part of `make bench` and `make bench-peers`).

A decode step reads every weight once, whatever the number of streams, plus each stream's keys and
values; it computes ~2 FLOPs per weight per stream. So a point of N streams is bound by
  bandwidth:  N x (measured read bandwidth) / (bytes a step reads)        tokens/s
  compute:    (measured peak FLOP/s) / (FLOPs a token costs)              tokens/s
whichever is lower, and its fraction of that bound says how much is left. The bandwidth is a
STREAM-like probe (a sum over an array far larger than the last-level cache, on every core); the
peak is the best of the library's float32 and bfloat16 matrix products on large squares (our
kernels use one of the two, by CPU: see docs/engine.md). Bytes per step follow the served format:
nf4 layers 0.5 byte a weight plus a float32 scale per 64, the (tied) output embedding as served:
int8 with a float32 scale per 64 where the native kernel's int8 product runs (`--output-layer auto`),
else bfloat16.

    python -m bench.roofline
"""

from __future__ import annotations

import json
import os
import time

import torch

from genrpc.launch import ROOT, describe_cpu

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
NF4_BYTES = 0.5 + 4 / 64  # a 4-bit code, and a float32 absmax per block of 64 (bitsandbytes' CPU default)
INT8_BYTES = 1 + 4 / 64  # an int8 code, and a float32 scale per column and 64 inputs (--output-layer int8)


def served_output_bytes() -> float:
    """Bytes a weight of the output layer genrpc serves by default: int8 where the native kernel has
    the int8 product (`--output-layer auto`), else bfloat16."""
    from model_svc.engine import gemm

    return INT8_BYTES if gemm.int8_kernel() is not None else 2.0


def read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes a second that summing a float32 array reads, best of `repeats` (all threads)."""
    data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best


def peak_flops(size: int = 1024, repeats: int = 3) -> tuple[float, str]:
    """FLOP/s of the library's best large matrix product here, and its dtype. A dtype the CPU has no
    instructions for (bfloat16 without AVX-512 BF16 or AMX) runs orders slower: one timing is enough."""
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        best = _timed(lambda: a @ b)  # warm-up, and a first figure
        if best < 1.0:
            best = min(best, *(_timed(lambda: a @ b) for _ in range(repeats)))
        results.append((2 * size**3 / best, str(dtype).removeprefix("torch.")))
    return max(results)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def model_shape(folder: str = MODEL) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    q = config["num_attention_heads"] * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * config["intermediate_size"]
    return {"layer_weights": per_layer * layers, "output_weights": hidden * config["vocab_size"],
            "kv_bytes_per_token": 2 * layers * kv * 2, "num_layers": layers, "attention_width": q}


def step_bytes(shape: dict, num_streams: int, context: int, weight_bytes: float = NF4_BYTES,
               output_bytes: float = 2.0) -> float:
    """Bytes one decode step reads: the layers (nf4 by default; 2.0 for bfloat16), the output
    embedding (bfloat16 by default; INT8_BYTES for int8), the streams' keys and values."""
    return (shape["layer_weights"] * weight_bytes + shape["output_weights"] * output_bytes
            + num_streams * context * shape["kv_bytes_per_token"])


def token_flops(shape: dict, context: int) -> float:
    """FLOPs one token costs: 2 a weight, and attention's 4 a key per layer and query width."""
    return 2 * (shape["layer_weights"] + shape["output_weights"]) + 4 * shape["num_layers"] * shape[
        "attention_width"] * context


def measure() -> dict:
    """This machine's side of the roofline (a few seconds; run it with nothing else busy)."""
    flops, dtype = peak_flops()
    return {"cpu": describe_cpu(), "read_bandwidth_gb_s": round(read_bandwidth() / 1e9, 1),
            "peak_gflop_s": round(flops / 1e9, 1), "peak_dtype": dtype, "threads": torch.get_num_threads()}


def bounds(machine: dict, tokens_per_s: dict[int, float], context: int, folder: str = MODEL,
           weight_bytes: float = NF4_BYTES, output_bytes: float = 2.0) -> dict:
    """Each point (streams -> measured tokens/s) against its bound, and which bound it is."""
    shape = model_shape(folder)
    points = {}
    for n, measured in sorted(tokens_per_s.items()):
        by_bytes = n * machine["read_bandwidth_gb_s"] * 1e9 / step_bytes(shape, n, context, weight_bytes, output_bytes)
        by_flops = machine["peak_gflop_s"] * 1e9 / token_flops(shape, context)
        bound = min(by_bytes, by_flops)
        points[str(n)] = {"tokens_per_s": measured, "bound_tokens_per_s": round(bound, 1),
                          "bound": "bandwidth" if by_bytes <= by_flops else "compute",
                          "fraction": round(measured / bound, 2)}
    one = step_bytes(shape, 1, context, weight_bytes, output_bytes)
    return {"machine": machine, "context_tokens": context, "weight_bytes": weight_bytes,
            "output_bytes": round(output_bytes, 4), "step_mb_one_stream": round(one / 1e6, 1),
            "output_layer_share": round(shape["output_weights"] * output_bytes / one, 2), "points": points}


def markdown(report: dict) -> str:
    m = report["machine"]
    rows = [f"{m['cpu']}: read bandwidth {m['read_bandwidth_gb_s']} GB/s, peak {m['peak_gflop_s']} GFLOP/s "
            f"({m['peak_dtype']} matrix products, {m['threads']} threads). A one-stream step reads "
            f"{report['step_mb_one_stream']} MB ({report['output_layer_share']:.0%} of it the output layer); "
            f"{report['context_tokens']} tokens of context a stream.", "",
            "| streams | tokens/s | bound tokens/s | bound by | fraction |", "|---|---|---|---|---|"]
    for n, p in report["points"].items():
        rows.append(f"| {n} | {p['tokens_per_s']} | {p['bound_tokens_per_s']} | {p['bound']} | {p['fraction']:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    machine = measure()
    print(json.dumps(machine, indent=2))
    print(json.dumps({k: v for k, v in model_shape().items()}, indent=2))
