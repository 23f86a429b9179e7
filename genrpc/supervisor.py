"""`make run`: serves the three services in the foreground.

Starts the tokenizer service, the model service and the gateway as child
processes with their default ports (flags and GENRPC_* variables apply to each),
restarts one that crashes (with backoff), and on Ctrl-C or SIGTERM stops all
three gracefully: each gets SIGTERM and its grace period, then SIGKILL.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

SERVICES = ("tokenizer_svc", "model_svc", "gateway")
STOP_TIMEOUT = 15.0


class Child:
    def __init__(self, module: str):
        self.module = module
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.next_start = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", self.module])
        print(f"[supervisor] started {self.module} (pid {self.proc.pid})", flush=True)

    def check(self) -> None:
        """Restarts the process if it exited on its own."""
        if self.proc is not None and self.proc.poll() is None:
            return
        if self.proc is not None:
            code = self.proc.returncode
            self.proc = None
            self.restarts += 1
            delay = min(2 ** min(self.restarts, 5) * 0.5, 15.0)
            self.next_start = time.monotonic() + delay
            print(f"[supervisor] {self.module} exited with {code}; restarting in {delay:.1f}s", flush=True)
        if time.monotonic() >= self.next_start:
            self.start()


def main() -> None:
    children = [Child(m) for m in SERVICES]
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for child in children:
        child.start()
    print("[supervisor] gateway on 127.0.0.1:50051 once the model is loaded; Ctrl-C stops all", flush=True)
    while not stopping:
        time.sleep(0.5)
        for child in children:
            if not stopping:
                child.check()
    print("[supervisor] stopping", flush=True)
    for child in reversed(children):  # the gateway first: it stops taking calls
        if child.proc and child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()
    print("[supervisor] stopped", flush=True)


if __name__ == "__main__":
    main()
