"""The model service beside a busy neighbour and under a CPU quota (part of `make bench`).

For each thread policy, the default (adaptive: model_svc/threads.py) and the previous default (a
fixed pool of every CPU, `--threads <cpus>`), in alternating rounds:
- idle: a 16-token request's latency (median of several, one after another), 8 concurrent streams'
  tokens/s (64 new tokens each), and, for the no-regression check, one 128-token stream's and 16
  concurrent 128-token streams' tokens/s;
- busy: the same two first figures while another process spins on one core (a bounded busy loop);
- quota: the idle figures with the model service in a cgroup allowed 1.5 cores (cgroup v2 `cpu.max`
  or v1 `cpu.cfs_quota_us`), where this machine lets a cgroup be made; otherwise the reason.

    python -m bench.cpu_contention [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

from bench.clients import run_streams
from genrpc.launch import start_stack

MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "SmolLM2-135M-Instruct")
PROMPT = "Write a long story about a lighthouse keeper."
LATENCY_REQUESTS = 7
BUSY_SECONDS = 240  # the neighbour's bound: it ends by itself
SETTLE_S = 2.0  # the adaptive policy measures others' load over 0.5 s windows
QUOTA_CORES = 1.5


def latency_ms(address: str) -> float:
    """Median seconds of a whole 16-token request, one after another."""
    walls = [asyncio.run(run_streams(address, [PROMPT], [16], [0.0]))[1] for _ in range(LATENCY_REQUESTS)]
    return round(statistics.median(walls) * 1000, 1)


def tokens_per_s(address: str, streams: int, new_tokens: int) -> float:
    results, wall = asyncio.run(run_streams(address, [PROMPT] * streams, [new_tokens] * streams, [0.0] * streams))
    return round(sum(r.num_tokens for r in results) / wall, 1)


def busy_neighbour() -> subprocess.Popen:
    code = f"import time\nend = time.time() + {BUSY_SECONDS}\nwhile time.time() < end: pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def cgroup_wrap(cores: float) -> tuple[tuple[str, ...], str]:
    """A command prefix that runs a process in a new cgroup limited to `cores`, and a cleanup path;
    or ((), reason) where this machine does not allow one."""
    name = f"genrpc-bench-{os.getpid()}"
    period = 100_000
    candidates = [("/sys/fs/cgroup", "cpu.max", f"{int(cores * period)} {period}"),  # v2
                  ("/sys/fs/cgroup/cpu", "cpu.cfs_quota_us", str(int(cores * period)))]  # v1
    errors = []
    for root, control, value in candidates:
        folder = os.path.join(root, name)
        try:
            if not os.path.exists(os.path.join(root, "cgroup.procs")):
                raise OSError(f"no cgroup hierarchy at {root}")
            os.makedirs(folder, exist_ok=True)
            if control == "cpu.cfs_quota_us":
                with open(os.path.join(folder, "cpu.cfs_period_us"), "w") as f:
                    f.write(str(period))
            with open(os.path.join(folder, control), "w") as f:
                f.write(value)
            procs = os.path.join(folder, "cgroup.procs")
            return ("sh", "-c", 'echo $$ > "$0" && exec "$@"', procs), folder
        except OSError as exc:
            errors.append(f"{root}: {exc}")
    return (), "; ".join(errors)


def measure(policy_args: tuple[str, ...], busy: bool, wrap: tuple[str, ...] = (), full: bool = False) -> dict:
    stack = start_stack(MODEL, model_args=policy_args, model_wrap=wrap)
    try:
        address = stack.gateway.address
        asyncio.run(run_streams(address, [PROMPT] * 2, [8, 8], [0, 0]))  # warm-up
        out = {"idle": {"latency16_ms": latency_ms(address), "streams8_tokens_per_s": tokens_per_s(address, 8, 64)}}
        if full:
            out["idle"]["stream1_tokens_per_s"] = tokens_per_s(address, 1, 128)
            out["idle"]["streams16_tokens_per_s"] = tokens_per_s(address, 16, 128)
        if busy:
            neighbour = busy_neighbour()
            try:
                time.sleep(SETTLE_S)
                out["busy"] = {"latency16_ms": latency_ms(address),
                               "streams8_tokens_per_s": tokens_per_s(address, 8, 64)}
            finally:
                neighbour.kill()
                neighbour.wait()
        return out
    finally:
        stack.stop()


def run(rounds: int = 2) -> dict:
    cpus = len(os.sched_getaffinity(0))
    policies = {"adaptive": (), f"fixed-{cpus}": ("--threads", str(cpus))}
    per_round: dict[str, list[dict]] = {name: [] for name in policies}
    for i in range(rounds):
        order = list(policies) if i % 2 == 0 else list(reversed(policies))  # both orders
        for name in order:
            result = measure(policies[name], busy=True, full=True)
            per_round[name].append(result)
            print(f"cpu contention round {i + 1}, {name}: {result}", flush=True)
    report: dict = {"cpus": cpus, "rounds": per_round, "quota": {}}
    wrap, folder = cgroup_wrap(QUOTA_CORES)
    if wrap:
        try:
            for name in policies:
                report["quota"][name] = measure(policies[name], busy=False, wrap=wrap)["idle"]
                print(f"cpu quota {QUOTA_CORES} cores, {name}: {report['quota'][name]}", flush=True)
        finally:
            try:
                os.rmdir(folder)
            except OSError:
                pass
    else:
        report["quota"] = {"unavailable": folder}
    report["summary"] = summarize(report)
    return report


def summarize(report: dict) -> dict:
    """Medians over rounds; busy over idle within each policy; adaptive over fixed when idle."""
    def med(policy: str, phase: str, key: str) -> float:
        return statistics.median(r[phase][key] for r in report["rounds"][policy])

    fixed = next(p for p in report["rounds"] if p != "adaptive")
    out = {}
    for policy in report["rounds"]:
        out[policy] = {
            "busy_over_idle_latency16": round(med(policy, "busy", "latency16_ms")
                                              / med(policy, "idle", "latency16_ms"), 2),
            "busy_over_idle_streams8": round(
                med(policy, "busy", "streams8_tokens_per_s") / med(policy, "idle", "streams8_tokens_per_s"), 2),
        }
    for key in ("stream1_tokens_per_s", "streams16_tokens_per_s", "streams8_tokens_per_s"):
        out[f"idle_adaptive_over_{fixed}_{key}"] = round(med("adaptive", "idle", key) / med(fixed, "idle", key), 3)
    out[f"idle_{fixed}_over_adaptive_latency16"] = round(
        med(fixed, "idle", "latency16_ms") / med("adaptive", "idle", "latency16_ms"), 3)
    return out


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(report["rounds"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "latency16_ms", "16-token request, ms (lower is better)"),
                           (axes[1], "streams8_tokens_per_s", "8 streams, tokens/s (higher is better)")):
        phases = ["idle", "busy"] + (["quota"] if "unavailable" not in report["quota"] else [])
        width = 0.8 / len(phases)
        for j, phase in enumerate(phases):
            values = [report["quota"][p][key] if phase == "quota" else
                      statistics.median(r[phase][key] for r in report["rounds"][p]) for p in policies]
            ax.bar([i + j * width for i in range(len(policies))], values, width,
                   label={"idle": "idle", "busy": "one core busy", "quota": f"quota {QUOTA_CORES} cores"}[phase])
        ax.set_xticks([i + width * (len(phases) - 1) / 2 for i in range(len(policies))], policies)
        ax.set(title=label)
        ax.legend()
    fig.suptitle(f"Model service thread policy beside a busy neighbour ({report['cpus']} CPUs, median of "
                 f"{len(report['rounds'][policies[0]])} rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(report: dict) -> str:
    rows = ["| policy | 16-token request idle / busy ms | 8 streams idle / busy tok/s | busy over idle "
            "(latency, throughput) | under a 1.5-core quota (ms, tok/s) |", "|---|---|---|---|---|"]
    for policy, rounds in report["rounds"].items():
        def med(phase, key):
            return statistics.median(r[phase][key] for r in rounds)
        s = report["summary"][policy]
        quota = report["quota"].get(policy)
        rows.append(f"| {policy} | {med('idle', 'latency16_ms')} / {med('busy', 'latency16_ms')} | "
                    f"{med('idle', 'streams8_tokens_per_s')} / {med('busy', 'streams8_tokens_per_s')} | "
                    f"{s['busy_over_idle_latency16']}x, {s['busy_over_idle_streams8']}x | "
                    + (f"{quota['latency16_ms']}, {quota['streams8_tokens_per_s']}" if quota else "n/a") + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    report = run(args.rounds)
    print(json.dumps(report["summary"], indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
