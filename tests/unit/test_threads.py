"""The model service's thread policy: pool size from affinity and cgroup quota, and how it
shrinks and grows with other processes' load (fake /proc files and clock)."""

from __future__ import annotations

import pytest

from model_svc.threads import (
    LoadMonitor,
    ThreadPolicy,
    busy_jiffies,
    cgroup_cpu_max,
    own_jiffies,
    policy_from,
    quota_cores,
    usable_threads,
)


def test_quota_from_cpu_max():
    assert quota_cores("max 100000\n") is None
    assert quota_cores(None) is None
    assert quota_cores("150000 100000\n") == 1.5
    assert quota_cores("400000 200000") == 2.0


@pytest.mark.parametrize("cpus,cpu_max,threads", [
    (2, None, 2), (2, "max 100000", 2), (8, "150000 100000", 1), (8, "200000 100000", 2),
    (2, "400000 100000", 2), (4, "50000 100000", 1), (1, None, 1),
])
def test_pool_size_from_affinity_and_quota(cpus, cpu_max, threads):
    assert usable_threads(cpus, cpu_max) == threads
    policy = policy_from(0, set(range(cpus)), cpu_max)
    assert policy.adaptive and policy.max_threads == threads and policy.threads == threads
    assert f"{cpus} CPUs" in policy.describe


def test_quota_read_from_cgroup_v2_and_v1():
    v2 = {"/sys/fs/cgroup/kubepods/pod1/cpu.max": "150000 100000\n"}
    assert cgroup_cpu_max("0::/kubepods/pod1\n", v2.get) == "150000 100000\n"
    v1 = {"/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
          "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}
    assert quota_cores(cgroup_cpu_max("4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n", v1.get)) == 2.5
    unlimited = {"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"}
    assert quota_cores(cgroup_cpu_max("1:cpu:/\n0::/\n", unlimited.get)) is None
    assert cgroup_cpu_max(None) is None


def test_threads_flag_fixes_the_pool():
    policy = policy_from(3, {0, 1}, "150000 100000")
    assert not policy.adaptive and policy.threads == 3
    assert "fixed: 3 threads" in policy.describe


def test_drops_a_thread_per_busy_core_and_restores_with_hysteresis():
    policy = ThreadPolicy(4, adaptive=True, reason="test")
    assert policy.want(0.0) == 4 and policy.want(0.55) == 4
    assert policy.want(0.6) == 3 and policy.want(1.6) == 2 and policy.want(9.0) == 1
    policy.threads = 3
    assert policy.want(0.5) == 3  # between the thresholds: stays
    assert policy.want(0.3) == 4


STAT = """cpu  0 0 0 0 0 0 0 0 0 0
cpu0 {a} 0 {b} 500 0 0 0 0 0 0
cpu1 {c} 0 0 500 0 0 0 0 0 0
cpu2 999 0 999 500 0 0 0 0 0 0
intr 1
"""
SELF = "123 (python -m (x)) R 1 " + " ".join(["0"] * 9) + " {u} {s} 0 0"


def test_parses_proc_files():
    assert busy_jiffies(STAT.format(a=10, b=5, c=7), {0, 1}) == 22
    assert own_jiffies(SELF.format(u=30, s=4)) == 34


def test_monitor_resizes_the_pool_from_others_load():
    files = {"/proc/stat": STAT.format(a=0, b=0, c=0), "/proc/self/stat": SELF.format(u=0, s=0)}
    now = [0.0]
    applied = []
    policy = ThreadPolicy(2, adaptive=True, reason="test")
    monitor = LoadMonitor(policy, {0, 1}, applied.append, read_file=files.get, clock=lambda: now[0])
    monitor.ticks_per_s = 100
    assert applied == [2]
    monitor.tick()  # first sample

    def window(ours: int, total: int) -> None:
        now[0] += 1.0
        a = int(files["/proc/stat"].split("cpu0 ")[1].split()[0]) + total
        u = own_jiffies(files["/proc/self/stat"]) + ours
        files["/proc/stat"] = STAT.format(a=a, b=0, c=0)
        files["/proc/self/stat"] = SELF.format(u=u, s=0)
        monitor.tick()

    window(ours=190, total=200)  # others: 0.1 core
    assert policy.threads == 2
    window(ours=130, total=200)  # a neighbour spins: 0.7 core
    assert policy.threads == 1 and applied[-1] == 1
    window(ours=100, total=150)  # 0.5 core: not enough to come back
    assert policy.threads == 1
    window(ours=180, total=200)  # 0.2 core: back to two
    assert policy.threads == 2 and applied == [2, 1, 2]
    now[0] += 0.1
    monitor.tick()  # within a window: nothing is read
    assert policy.threads == 2


def test_fixed_policy_never_reads_the_load():
    reads = []
    policy = ThreadPolicy(2, adaptive=False, reason="test")
    monitor = LoadMonitor(policy, {0, 1}, lambda n: None, read_file=lambda p: reads.append(p))
    monitor.tick()
    assert reads == []
