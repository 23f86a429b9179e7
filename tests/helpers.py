"""Small helpers for tests against live services."""

from __future__ import annotations

import dataclasses
import time

from genrpc.launch import metric  # noqa: F401 (re-exported for tests)
from genrpc.pki import make_credentials


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
