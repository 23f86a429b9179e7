"""Small helpers for tests against live services."""

from __future__ import annotations

import dataclasses
import time
import urllib.request

from genrpc.pki import make_credentials


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
