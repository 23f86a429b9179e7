"""Time to first token through SMG against genrpc's own gateway, on the same model worker, in the same
minutes: SMG (OpenAI chat completions over HTTP, tokenizing and applying the chat template itself,
then vLLM's engine protocol to the worker) and genrpc's gateway (GenerateStream with the same chat,
through the tokenizer service) at 1, 8 and 32 concurrent streams.

Both front ends reach one worker, in plaintext on loopback (SMG 1.13 cannot use TLS or tokens to a
gRPC worker: docs/routers.md), so the difference is the front end's path. Every request carries a
new tag in its message, so no prompt is ever served from the prefix cache. Each round runs the two
sides in turn at every stream count, forwards then backwards (A B B A); the report keeps each side's
median time to first token over every request of every round, and SMG's over the gateway's.

    python -m bench.routers    (writes bench/results/routers.json and routers.png)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

import grpc

from genrpc.launch import ROOT, describe_cpu, start_service, wait_serving
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
MODEL_ID = "SmolLM2-135M-Instruct"
RESULTS = os.path.join(ROOT, "bench", "results")
STREAMS = (1, 8, 32)
TOKENS = 32
ROUNDS = 2
TARGET = 1.10  # SMG's time to first token at most this times the gateway's


def _question() -> str:
    return f"[{uuid.uuid4().hex[:8]}] Tell me a short story about a lighthouse keeper and the sea."


def smg_ttft(url: str) -> float:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": _question()}], "max_tokens": TOKENS,
            "temperature": 0, "stream": True}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    started = time.perf_counter()
    first = None
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            line = line.decode().strip()
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[len("data: "):]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("SMG streamed no content")
    return first


def gateway_ttft(stub) -> float:
    chat = pb.Chat(messages=[pb.Message(role="user", content=_question())])
    request = pb.GenerateStreamRequest(chat=chat, config=pb.GenerationConfig(max_new_tokens=TOKENS))
    started = time.perf_counter()
    first = None
    for message in stub.GenerateStream(request, timeout=300):
        if first is None and message.token_ids:
            first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the gateway streamed no token")
    return first


def burst(one, n: int) -> list[float]:
    """n streams at once; each one's time to first token."""
    out: list[float] = []
    lock = threading.Lock()

    def run():
        value = one()
        with lock:
            out.append(value)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def start_smg(worker_address: str) -> tuple[subprocess.Popen, str, str]:
    smg = shutil.which("smg", path=os.path.dirname(sys.executable))
    if smg is None:
        raise SystemExit("the smg router is not installed (make setup installs it on x86-64 Linux)")
    port = _free_port()
    log_path = tempfile.mktemp(prefix="genrpc-bench-smg-", suffix=".log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([smg, "launch", "--backend", "vllm", "--host", "127.0.0.1", "--port", str(port),
                                 "--prometheus-port", str(_free_port()), "--worker-urls", f"grpc://{worker_address}",
                                 "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            smg_ttft(url)
            return proc, url, log_path
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"SMG did not serve within 90 s (log: {log_path})")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rounds: int = ROUNDS) -> dict:
    worker = start_service("model_svc", "--model", MODEL)
    tokenizer = start_service("tokenizer_svc", "--model", MODEL)
    gateway = start_service("gateway", "--tokenizer-addrs", tokenizer.address, "--model-addrs", worker.address)
    smg, url, log_path = None, "", ""
    seconds = {side: {n: [] for n in STREAMS} for side in ("smg", "gateway")}
    try:
        wait_serving(gateway.address)
        smg, url, log_path = start_smg(worker.address)
        with grpc.insecure_channel(gateway.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            sides = {"smg": lambda: smg_ttft(url), "gateway": lambda: gateway_ttft(stub)}
            for side in sides.values():  # warm-up: kernels, pools, connections
                burst(side, 2)
            for r in range(rounds):
                order = ["smg", "gateway", "gateway", "smg"] if r % 2 == 0 else ["gateway", "smg", "smg", "gateway"]
                for n in STREAMS:
                    for side in order:
                        seconds[side][n] += burst(sides[side], n)
    finally:
        if smg is not None:
            smg.terminate()
            smg.wait(10)
            os.unlink(log_path)
        for service in (gateway, tokenizer, worker):
            service.stop()
    p50 = {side: {str(n): round(statistics.median(v) * 1000, 1) for n, v in by_n.items()}
           for side, by_n in seconds.items()}
    ratio = {str(n): round(p50["smg"][str(n)] / p50["gateway"][str(n)], 2) for n in STREAMS}
    return {"rounds": rounds, "tokens": TOKENS, "streams": list(STREAMS), "ttft_p50_ms": p50,
            "smg_over_gateway": ratio, "target": TARGET, "smg_version": _smg_version(), "cpu": describe_cpu()}


def _smg_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("smg")
    except PackageNotFoundError:
        return "?"


def markdown(report: dict) -> str:
    rows = ["| streams | gateway TTFT p50 ms | SMG TTFT p50 ms | SMG / gateway | target |", "|---|---|---|---|---|"]
    for n in report["streams"]:
        rows.append(f"| {n} | {report['ttft_p50_ms']['gateway'][str(n)]} | {report['ttft_p50_ms']['smg'][str(n)]} | "
                    f"{report['smg_over_gateway'][str(n)]:.2f}x | <= {report['target']:.2f}x |")
    rows.append(f"\nSMG {report['smg_version']}; {report['tokens']} tokens a stream, {report['rounds']} rounds of "
                f"A B B A, medians over every request; {report['cpu']}.")
    return "\n".join(rows)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    xs = range(len(report["streams"]))
    for offset, side, color in ((-0.2, "gateway", "tab:blue"), (0.2, "smg", "tab:orange")):
        ax.bar([x + offset for x in xs], [report["ttft_p50_ms"][side][str(n)] for n in report["streams"]], 0.4,
               label="genrpc gateway" if side == "gateway" else f"SMG {report['smg_version']}", color=color)
    ax.set_xticks(list(xs), [f"{n} stream{'s' if n > 1 else ''}" for n in report["streams"]])
    ax.set_ylabel("time to first token, p50 (ms)")
    ax.legend()
    ax.set_title("SMG / gateway: " + ", ".join(f"{report['smg_over_gateway'][str(n)]:.2f}x"
                                               for n in report["streams"]), fontsize=9)
    fig.suptitle(f"one genrpc worker, SmolLM2-135M-Instruct; {report['cpu']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> dict:
    result = run()
    plot(result, os.path.join(RESULTS, "routers.png"))
    from bench import readme  # here: it imports this module for its markdown

    readme.save("routers", result)
    print(json.dumps(result, indent=2))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
