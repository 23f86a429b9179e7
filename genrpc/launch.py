"""Starting the services as processes on free ports, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genrpc.pki import Credentials, make_credentials
from genrpc.security import ClientSecurity, TokenSet, channel_credentials

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Service:
    module: str
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: str
    health_port: int = -1  # with --health-port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_service(module: str, *args: str, timeout: float = 120, env: dict | None = None,
                  wrap: tuple[str, ...] = ()) -> Service:
    """Starts `python -m module` on free ports (port 0) and waits for it to report them. `wrap`: a
    command that runs it (e.g. one that first moves itself into a cgroup)."""
    workdir = tempfile.mkdtemp(prefix=f"genrpc-{module}-")
    port_file = os.path.join(workdir, "ports.json")
    log_path = os.path.join(workdir, "log.txt")
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", module, "--port", "0", "--metrics-port", "0", "--port-file", port_file,
             "--grace", "3", *args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=full_env,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"{module} exited with {proc.returncode}:\n{f.read()[-4000:]}")
        if os.path.exists(port_file) and os.path.getsize(port_file) > 0:
            with open(port_file) as f:
                ports = json.load(f)
            return Service(module, proc, ports["port"], ports["metrics_port"], log_path, ports.get("health_port", -1))
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{module} did not start within {timeout}s")


def metric(port: int, name: str, labels: dict | None = None) -> float:
    """The value of one Prometheus sample from a service's /metrics (0 when absent)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if labels and not all(f'{k}="{v}"' in head for k, v in labels.items()):
            continue
        total += float(value)
    return total


def wait_serving(address: str, timeout: float = 120, credentials=None) -> None:
    deadline = time.monotonic() + timeout
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{address} did not become SERVING within {timeout}s")


@dataclass
class Stack:
    tokenizer: Service
    model: Service
    gateway: Service
    credentials: Credentials | None = None  # what the internal hops use
    credentials_folder: str = ""  # made for this stack: removed when it stops

    @property
    def services(self) -> list[Service]:
        return [self.tokenizer, self.model, self.gateway]

    def internal_credentials(self) -> grpc.ChannelCredentials | None:
        """What the gateway presents to the tokenizer and model services (None: they are open)."""
        c = self.credentials
        return channel_credentials(c.ca, c.client_cert, c.client_key, c.token_file) if c else None

    def internal_security(self) -> ClientSecurity:
        """What the gateway uses to reach the internal services (TLS; the token added per call)."""
        c = self.credentials
        if c is None:
            return ClientSecurity()
        return ClientSecurity(channel_credentials(c.ca, c.client_cert, c.client_key), TokenSet(path=c.token_file))

    def channel(self, service: Service) -> grpc.Channel:
        """A (blocking) channel to one of the services, with the credentials it needs."""
        credentials = self.internal_credentials() if service is not self.gateway else None
        return grpc.secure_channel(service.address, credentials) if credentials else grpc.insecure_channel(
            service.address)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        if self.credentials_folder:
            shutil.rmtree(self.credentials_folder, ignore_errors=True)


def start_stack(model: str, model_args: tuple[str, ...] = (), gateway_args: tuple[str, ...] = (),
                credentials: Credentials | None = None, model_wrap: tuple[str, ...] = (),
                env: dict | None = None, timeout: float = 120) -> Stack:
    """The three services as `make run` starts them: the internal hops over TLS with client
    certificates and a shared secret, from throw-away credentials (`credentials`, or new ones).
    `env`: variables added to each service's environment; `timeout`: seconds each may take to start."""
    folder = "" if credentials else tempfile.mkdtemp(prefix="genrpc-credentials-")
    credentials = credentials or make_credentials(folder)
    tokenizer = start_service("tokenizer_svc", "--model", model, *credentials.server_flags(), env=env)
    worker = start_service("model_svc", "--model", model, *credentials.server_flags(), *model_args, wrap=model_wrap,
                           env=env, timeout=timeout)
    gateway = start_service("gateway", "--tokenizer-addrs", tokenizer.address, "--model-addrs", worker.address,
                            *credentials.client_flags(), *gateway_args, env=env)
    wait_serving(gateway.address)
    return Stack(tokenizer, worker, gateway, credentials, folder)


def cpu_model_and_flags(path: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """The CPU's model name and flags, from /proc/cpuinfo ("?" and none where it cannot be read). A
    name without a number ("AMD EPYC" in some VMs) gains its family and model numbers, which tell
    the generations apart (x86: family 23 model 1 is Zen 1, model 49 Zen 2)."""
    model, flags, family, number = "?", set(), "", ""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and model == "?" and value:
                    model = value
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif key == "cpu family" and not family:
                    family = value
                elif key == "model" and not number:
                    number = value
    except OSError:
        pass
    if model != "?" and family and number and not any(ch.isdigit() for ch in model):
        model = f"{model} family {family} model {number}"
    return model, flags


def available_memory() -> int | None:
    """Bytes this process could still take: the kernel's MemAvailable, or less under a cgroup (v2)
    memory limit (a container's); None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                found.append(max(0, int(limit) - int(f.read().strip())))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def describe_cpu() -> str:
    """The CPU a figure was measured on: its model, the instruction sets that choose kernels, cores."""
    name, flags = cpu_model_and_flags()
    kinds = [k for k in ("amx_bf16", "avx512_bf16", "avx2") if k in flags]
    return f"{name} ({', '.join(kinds) or 'none of AMX, AVX-512 BF16, AVX2'}), {os.cpu_count()} cores"
