"""How many threads the model service computes with, and when it uses fewer.

Every parallel kernel (bitsandbytes' 4-bit product, PyTorch's ops) splits its work over an OpenMP
team and waits at a barrier for the slowest thread. When another process wants one of our cores,
the thread that shares it is descheduled for a time slice at a time and every barrier of the step
waits for it (a few times slower; bounding OpenMP's spin made it worse). One thread fewer than that
is steady, but costs when the cores are free (figures: README, "Measured costs behind the design").
So the pool is:

1. sized from the CPUs the process may really use: its affinity mask and its cgroup quota
   (`cpu.max`: 1.5 cores of quota make 1 thread, since a team larger than the quota is throttled
   as a whole at the end of each period);
2. shrunk while other processes keep our CPUs busy: between steps, at most every `WINDOW_S`, the
   busy time of our CPUs (/proc/stat) minus our own (/proc/self/stat) says how many cores the others
   use; at 0.6 core or more one thread is dropped per such core, and it comes back once they use
   under 0.4 (the gap keeps it from flapping).

`--threads N` fixes the pool at N and turns adaptation off.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("genrpc.threads")

WINDOW_S = 0.5  # how often the others' load is measured
DROP_AT = 0.6  # cores the others use before one thread is dropped ...
RESTORE_BELOW = 0.4  # ... and under which it comes back
CGROUP_ROOT = "/sys/fs/cgroup"


def quota_cores(cpu_max: str | None) -> float | None:
    """Cores a cgroup v2 `cpu.max` ("150000 100000", or "max 100000") allows; None without a quota."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100_000
    return int(parts[0]) / period


def usable_threads(num_affinity_cpus: int, cpu_max: str | None) -> int:
    """The most threads worth running: the CPUs we may run on, capped by the quota (rounded down,
    at least one)."""
    quota = quota_cores(cpu_max)
    cores = num_affinity_cpus if quota is None else min(num_affinity_cpus, math.floor(quota))
    return max(1, cores)


def busy_jiffies(proc_stat: str, cpus: set[int]) -> int:
    """Busy time (user, nice, system, irq, softirq, steal) of `cpus`, from /proc/stat's per-CPU lines."""
    total = 0
    for line in proc_stat.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *values = line.split()
        if int(name[3:]) in cpus:
            v = [int(x) for x in values]
            total += v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    return total


def own_jiffies(self_stat: str) -> int:
    """This process's user + system time, from /proc/self/stat (fields 14 and 15)."""
    fields = self_stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


@dataclass
class ThreadPolicy:
    """The pool size now, and how it was decided (logged at start, in WorkerInfo and metrics)."""

    max_threads: int
    adaptive: bool
    reason: str
    threads: int = 0  # in use now

    def __post_init__(self):
        self.threads = self.threads or self.max_threads

    @property
    def describe(self) -> str:
        threads = f"{self.max_threads} thread{'s' if self.max_threads != 1 else ''}"
        if not self.adaptive:
            return f"fixed: {threads} ({self.reason})"
        return (f"adaptive: up to {threads} ({self.reason}); one fewer per core other processes keep busy "
                f"(>= {DROP_AT} core)")

    def want(self, others_cores: float) -> int:
        """The pool size for the others' load: one thread fewer per core they use (rounded so that
        0.6 drops one), but one comes back only once they use under 0.4 of a core per thread."""
        drop = math.floor(others_cores + 1 - DROP_AT)
        target = max(1, self.max_threads - drop)
        if target > self.threads:  # growing back: only with room to spare
            target = max(self.threads, min(target, self.max_threads - math.floor(others_cores + 1 - RESTORE_BELOW)))
        return target


def policy_from(threads_flag: int, affinity: set[int], cpu_max: str | None) -> ThreadPolicy:
    """The policy the --threads flag and the machine give."""
    quota = quota_cores(cpu_max)
    quota_text = "no cgroup quota" if quota is None else f"cgroup quota {quota:g} cores"
    if threads_flag > 0:
        return ThreadPolicy(threads_flag, adaptive=False, reason=f"--threads; {len(affinity)} CPUs, {quota_text}")
    return ThreadPolicy(usable_threads(len(affinity), cpu_max), adaptive=True,
                        reason=f"{len(affinity)} CPUs in the affinity mask, {quota_text}")


class LoadMonitor:
    """Measures the cores other processes use on our CPUs, and applies the policy's pool size."""

    def __init__(self, policy: ThreadPolicy, cpus: set[int], apply: Callable[[int], None],
                 read_file: Callable[[str], str | None] = read, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.cpus = cpus
        self.apply = apply
        self.read_file = read_file
        self.clock = clock
        self.ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last: tuple[float, int, int] | None = None
        apply(policy.threads)

    def _sample(self) -> tuple[float, int, int] | None:
        stat, own = self.read_file("/proc/stat"), self.read_file("/proc/self/stat")
        if stat is None or own is None:
            return None
        return self.clock(), busy_jiffies(stat, self.cpus), own_jiffies(own)

    def tick(self) -> None:
        """Called between steps: re-measures once a window has passed and resizes the pool."""
        if not self.policy.adaptive:
            return
        if self._last is not None and self.clock() - self._last[0] < WINDOW_S:
            return
        sample = self._sample()
        if sample is None:
            return
        last, self._last = self._last, sample
        if last is None:
            return
        seconds = sample[0] - last[0]
        others = max(0, (sample[1] - last[1]) - (sample[2] - last[2])) / self.ticks_per_s / seconds
        want = self.policy.want(others)
        if want != self.policy.threads:
            log.info("other processes use %.2f cores of ours: %d compute threads (was %d)",
                     others, want, self.policy.threads)
            self.policy.threads = want
            self.apply(want)


def cgroup_cpu_max(self_cgroup: str | None, read_file: Callable[[str], str | None] = read,
                   root: str = CGROUP_ROOT) -> str | None:
    """This process's CPU quota as cgroup v2's `cpu.max` text ("quota period" or "max period"),
    from cgroup v2 or from v1's cpu controller (cpu.cfs_quota_us, -1 for none); None if unknown."""
    for line in (self_cgroup or "").splitlines():
        _, controllers, path = line.split(":", 2)
        path = path.rstrip("/")
        if controllers == "":  # v2
            text = read_file(f"{root}{path}/cpu.max") or read_file(f"{root}/cpu.max")
            if text:
                return text
        elif "cpu" in controllers.split(","):  # v1
            for mount in (f"{root}/cpu", f"{root}/cpu,cpuacct", f"{root}/cpuacct,cpu"):
                quota = read_file(f"{mount}{path}/cpu.cfs_quota_us")
                period = read_file(f"{mount}{path}/cpu.cfs_period_us")
                if quota and period:
                    quota = quota.strip()
                    return f"{'max' if quota == '-1' else quota} {period.strip()}"
    return None


def machine_policy(threads_flag: int) -> tuple[ThreadPolicy, set[int]]:
    """The policy for this process on this machine (affinity mask and cgroup quota)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    return policy_from(threads_flag, cpus, cgroup_cpu_max(read("/proc/self/cgroup"))), cpus
