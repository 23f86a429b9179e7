"""Named fault points that tests arm in real processes, to prove every failure path ends its requests.

Code calls `faults.check("point")` where a real failure could happen; armed, the call raises
`InjectedFault`. Nothing is armed unless the process starts with one of:

- `GENRPC_FAULTS="runner.execute=once,tokenizer.encode=after:2"`: armed for the process's life;
- `GENRPC_FAULTS_FILE=/path`: the same text in a file, re-read whenever the file changes (each
  re-read arms afresh), so one running stack can be armed and disarmed point by point.

Modes: `once` (the next call raises), `always` (every call), `after:N` (N calls pass, the next
raises, once), `from:N` (N calls pass, every later one raises). An unknown point or mode stops
the process at start. `make run` (genrpc.supervisor) refuses to start with either variable set:
fault injection is for tests, never for production. Unarmed, `check` is one global test.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

log = logging.getLogger("genrpc.faults")

ENV_SPEC = "GENRPC_FAULTS"
ENV_FILE = "GENRPC_FAULTS_FILE"

POINTS = {
    "scheduler.schedule": "model service: the scheduler picks a step's sequences",
    "scheduler.update": "model service: the scheduler records a step's tokens",
    "runner.execute": "model service: the forward pass",
    "sampler.sample": "model service: token selection",
    "grammar.compile": "model service: a structured-output grammar is compiled (Submit)",
    "model.dispatch": "model service: a step's tokens go out on the Events streams",
    "tokenizer.encode": "tokenizer service: Encode",
    "tokenizer.detokenize": "tokenizer service: DecodeStream",
    "gateway.tokenizer_call": "gateway: any call to a tokenizer replica",
    "gateway.model_stream": "gateway: a step message read from a model worker's Events stream",
}


class InjectedFault(RuntimeError):
    """Raised by an armed fault point."""


@dataclass
class _Arm:
    raise_from: int  # calls before this many pass
    repeat: bool  # raise on every call from then on, or once
    calls: int = 0

    def fire(self) -> bool:
        self.calls += 1
        if self.calls <= self.raise_from:
            return False
        return self.repeat or self.calls == self.raise_from + 1


def parse(spec: str) -> dict[str, _Arm]:
    """`point=mode,...` as arms; raises ValueError naming what is wrong."""
    arms = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        point, _, mode = entry.partition("=")
        point, mode = point.strip(), mode.strip()
        if point not in POINTS:
            raise ValueError(f"{ENV_SPEC}: unknown fault point {point!r}; known: {', '.join(sorted(POINTS))}")
        kind, _, count = mode.partition(":")
        if kind in ("once", "always") and not count:
            arms[point] = _Arm(0, kind == "always")
        elif kind in ("after", "from") and count.isdigit():
            arms[point] = _Arm(int(count), kind == "from")
        else:
            raise ValueError(f"{ENV_SPEC}: {entry!r}: the mode must be once, always, after:N or from:N")
    return arms


class _Faults:
    def __init__(self, spec: str, path: str):
        self.path = path
        self.enabled = bool(spec or path)
        self._lock = threading.Lock()
        self._arms = parse(spec)
        self._stamp: tuple | None = None
        if self.enabled:
            log.warning("fault injection is on (%s): armed points raise InjectedFault; never do this in production",
                        f"{ENV_FILE}={path}" if path else f"{ENV_SPEC}={spec}")

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            stamp, text = None, ""
        else:
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp == self._stamp:
                return
            with open(self.path) as f:
                text = f.read()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._arms = parse(text)
            except ValueError as exc:
                log.error("%s: %s (nothing armed)", self.path, exc)
                self._arms = {}
            log.warning("faults armed: %s", text.strip() or "none")

    def check(self, point: str) -> None:
        with self._lock:
            if self.path:
                self._refresh()
            arm = self._arms.get(point)
            fired = arm is not None and arm.fire()
        if fired:
            raise InjectedFault(f"injected fault at {point}")


_faults = _Faults(os.environ.get(ENV_SPEC, ""), os.environ.get(ENV_FILE, ""))


def check(point: str) -> None:
    """Raises InjectedFault when `point` is armed (see the module docstring); else nothing."""
    if _faults.enabled:
        _faults.check(point)


def requested() -> bool:
    """Whether this process's environment asks for fault injection."""
    return bool(os.environ.get(ENV_SPEC) or os.environ.get(ENV_FILE))
