"""`make run`: serves the three services in the foreground.

Starts the tokenizer service, the model service and the gateway as child
processes with their default ports (flags and GENRPC_* variables apply to each),
restarts one that crashes (with backoff), and on Ctrl-C or SIGTERM stops all
three gracefully: each gets SIGTERM and its grace period, then SIGKILL.

The internal hops are secure by default: a throw-away CA, certificates and shared
secret are made for each run in a private temporary folder (removed at the end),
the tokenizer and model services require them (TLS with client certificates, and
the secret as a bearer token), and the gateway presents them.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from genrpc import faults
from genrpc.pki import make_credentials

STOP_TIMEOUT = 15.0


class Child:
    def __init__(self, module: str, flags: list[str]):
        self.module = module
        self.flags = flags
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.next_start = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.flags])
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


def main(argv=None) -> None:
    argparse.ArgumentParser(
        prog="python -m genrpc.supervisor", description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="Each service takes its flags from GENRPC_<FLAG> variables (see `python -m gateway --help`, "
               "`python -m model_svc --help`, `python -m tokenizer_svc --help`).").parse_args(argv)
    if faults.requested():
        raise SystemExit(f"{faults.ENV_SPEC} / {faults.ENV_FILE} arm fault injection, which is for tests only: "
                         "unset them to serve")
    folder = tempfile.mkdtemp(prefix="genrpc-credentials-")
    try:
        credentials = make_credentials(folder)
        supervise([Child("tokenizer_svc", credentials.server_flags()), Child("model_svc", credentials.server_flags()),
                   Child("gateway", credentials.client_flags())])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def supervise(children: list[Child]) -> None:
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
