"""Shared fixtures: the real default model, and the real services as processes on free ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass
class Service:
    module: str
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_service(module: str, *args: str, timeout: float = 120) -> Service:
    """Starts `python -m module` on free ports (port 0) and waits for it to report them."""
    workdir = tempfile.mkdtemp(prefix=f"genrpc-{module}-")
    port_file = os.path.join(workdir, "ports.json")
    log_path = os.path.join(workdir, "log.txt")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--port", "0", "--metrics-port", "0", "--port-file", port_file,
             "--grace", "3", *args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path) as f:
                raise RuntimeError(f"{module} exited with {proc.returncode}:\n{f.read()[-4000:]}")
        if os.path.exists(port_file) and os.path.getsize(port_file) > 0:
            with open(port_file) as f:
                ports = json.load(f)
            return Service(module, proc, ports["port"], ports["metrics_port"], log_path)
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{module} did not start within {timeout}s")


def wait_serving(address: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
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

    @property
    def services(self) -> list[Service]:
        return [self.tokenizer, self.model, self.gateway]


def start_stack(*model_args: str) -> Stack:
    tokenizer = start_service("tokenizer_svc", "--model", MODEL)
    model = start_service("model_svc", "--model", MODEL, *model_args)
    gateway = start_service(
        "gateway", "--tokenizer-addrs", tokenizer.address, "--model-addrs", model.address)
    wait_serving(gateway.address)
    return Stack(tokenizer, model, gateway)


@pytest.fixture(scope="session")
def stack():
    """The three services with the default model, default dtype (bfloat16) and quantization (4bit)."""
    s = start_stack()
    yield s
    for service in reversed(s.services):
        service.stop()


@pytest.fixture(scope="session")
def channel(stack):
    with grpc.insecure_channel(stack.gateway.address) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel):
    from genrpc.v1 import generation_pb2_grpc

    return generation_pb2_grpc.GenerationStub(channel)


@pytest.fixture(scope="session")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL, padding_side="left")


@pytest.fixture(scope="session")
def reference_model():
    """In-process transformers model, loaded as the model service loads it by default."""
    from model_svc.loader import load_model

    return load_model(MODEL, "bfloat16", "4bit", "cpu")
