"""Command-line flags that can also be set from the environment.

Every flag `--some-flag` reads `GENRPC_SOME_FLAG` when it is not given on the
command line, so a container can be configured with environment variables alone; a repeatable flag
reads comma-separated values (`GENRPC_LORA=a=/x,b=/y`), and the command line's add to them.
"""

from __future__ import annotations

import argparse
import os

from genrpc.security import add_server_flags


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose long options default to `GENRPC_<FLAG>` variables."""

    def add_argument(self, *names, **kwargs):  # type: ignore[override]
        long_names = [n for n in names if n.startswith("--")]
        if long_names:
            env = "GENRPC_" + long_names[0][2:].upper().replace("-", "_")
            raw = os.environ.get(env)
            if kwargs.get("action") == "store_true":
                if raw is not None:
                    kwargs["default"] = raw.lower() in ("1", "true", "yes", "on")
            elif kwargs.get("action") == "append":  # a repeatable flag: comma-separated values
                if raw is not None:
                    kind = kwargs.get("type") or str
                    kwargs["default"] = [kind(v) for v in raw.split(",") if v]
            elif raw is not None:
                kind = kwargs.get("type")
                kwargs["default"] = kind(raw) if kind else raw
                kwargs["required"] = False
            kwargs["help"] = f"{kwargs.get('help', '')} [env {env}]".strip()
        return super().add_argument(*names, **kwargs)


def server_parser(description: str, default_port: int, default_metrics_port: int) -> EnvArgumentParser:
    """The flags every genrpc server takes: where to listen and where to serve metrics."""
    parser = EnvArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=default_port, help="gRPC port (0 picks a free one)")
    parser.add_argument(
        "--metrics-port", type=int, default=default_metrics_port,
        help="Prometheus /metrics HTTP port (0 picks a free one, -1 disables)",
    )
    parser.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on SIGTERM")
    parser.add_argument("--port-file", default="", help="write the bound gRPC and metrics ports here (JSON)")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    parser.add_argument("--trace-exporter", default="none",
                        help="OpenTelemetry spans: none, console, jsonl:PATH or otlp")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text, or one JSON object a line")
    add_server_flags(parser)
    return parser
