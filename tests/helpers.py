"""What tests share besides fixtures (those are in conftest.py): the model's path, starting the
services, waiting for them, credentials."""

from __future__ import annotations

import dataclasses
import os
import time

from genrpc.launch import ROOT, metric, start_service, start_stack, wait_serving  # noqa: F401 (for tests)
from genrpc.pki import make_credentials

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> float:
    """Polls until predicate() is true; returns the seconds it took, fails after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - started


def make_certificates(directory) -> dict:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate (PEM files)."""
    return dataclasses.asdict(make_credentials(str(directory)))
