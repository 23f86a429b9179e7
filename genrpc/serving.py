"""What every genrpc server does the same way: health, reflection, metrics,
request metrics, and a graceful stop on SIGTERM/SIGINT.

A service builds its servicers, then calls `serve()` with a function that
registers them; `serve()` returns when the server has stopped.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter, Histogram

from genrpc import tracing
from genrpc.metrics_server import serve_metrics
from genrpc.security import ServerSecurity

log = logging.getLogger("genrpc")

REQUESTS = Counter(
    "genrpc_requests_total", "gRPC requests handled, by method and status code", ["service", "method", "code"]
)
REQUEST_SECONDS = Histogram(
    "genrpc_request_duration_seconds", "gRPC request duration, by method",
    ["service", "method"], buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

# Generous but explicit: a batch of long prompts fits, a runaway payload does not.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # Clients ping every 10 s to notice a dead peer; accept that instead of answering GOAWAY.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect to a restarted worker within a second or two, not grpc's default of up to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Around every call: a server span (child of the caller's trace context, if it sent one),
    the call counted by method and final status code, and timed."""

    def __init__(self, service: str):
        self._service = service

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full_method = handler_call_details.method
        method = full_method.rsplit("/", 1)[-1]
        service = self._service

        def start_span(context):
            """A server span made current for the rest of this call. Each call runs in a task of its
            own, so the context is not detached afterwards: a stream's generator may be closed from
            another context, where detaching fails."""
            span = tracing.tracer().start_span(
                full_method.lstrip("/"), context=tracing.incoming_context(context), kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.method": method, "genrpc.service": service})
            otel_context.attach(trace.set_span_in_context(span))
            return span

        def record(context, started: float, span, cancelled: bool = False) -> None:
            code = context.code()
            name = code.name if isinstance(code, grpc.StatusCode) else "OK" if code in (None, 0) else str(code)
            if cancelled:
                name = "CANCELLED"
            REQUESTS.labels(service, method, name).inc()
            REQUEST_SECONDS.labels(service, method).observe(time.perf_counter() - started)
            span.set_attribute("rpc.grpc.status_code", name)
            if name not in ("OK", "CANCELLED"):
                span.set_status(Status(StatusCode.ERROR, name))

        if handler.unary_unary:
            inner_unary = handler.unary_unary

            async def unary(request, context):
                started = time.perf_counter()
                span = start_span(context)
                cancelled = False
                try:
                    return await inner_unary(request, context)
                except asyncio.CancelledError:
                    cancelled = True
                    raise
                finally:
                    record(context, started, span, cancelled)
                    span.end()

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                started = time.perf_counter()
                span = start_span(context)
                cancelled = False
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except (asyncio.CancelledError, GeneratorExit):
                    cancelled = True
                    raise
                finally:
                    record(context, started, span, cancelled)
                    span.end()

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


@dataclass
class ServerHandle:
    """A started server: its ports and the pieces a graceful stop needs."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    metrics_port: int
    service_names: list[str] = field(default_factory=list)
    health_port: int = -1  # plaintext health-only port beside a TLS one (-1: none)
    name: str = ""  # the service, as its log lines name it

    async def set_ready(self, ready: bool) -> None:
        """Readiness: the overall status ("") and each service's, what load balancers and
        readiness probes ask."""
        for name in ["", *self.service_names]:
            await self.health.set(name, _health_status(ready))

    async def set_serving(self, serving: bool) -> None:
        """Readiness and liveness ("liveness": the process is up; only a shutdown clears it)."""
        await self.set_ready(serving)
        await self.health.set("liveness", _health_status(serving))


def _health_status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


def freeze_start_up_objects() -> int:
    """Moves every object alive now (modules, a loaded model's, a tokenizer's: ~480K in the model
    service) out of the garbage collector's reach and returns how many are frozen. A full collection
    scanned them all, ~250 ms with every stream of the process stopped, every few hundred requests
    (docs/measurements.md); they live as long as the process does. For a service's process only:
    frozen objects that later become cyclic garbage are never freed."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def start_server(
    name: str,
    register: Callable[[grpc.aio.Server], list[str]],
    host: str,
    port: int,
    metrics_port: int,
    security: ServerSecurity | None = None,
) -> ServerHandle:
    """Starts an aio server with health, reflection and metrics, then freezes the objects alive at
    start-up (freeze_start_up_objects: a service's process only).

    `register` adds the servicers and returns their full service names. `security` (from the
    server's flags) adds TLS, token checks and the plaintext health port.
    """
    server = grpc.aio.server(
        interceptors=[ObservingInterceptor(name), *(security.interceptors if security else [])],
        options=SERVER_OPTIONS,
    )
    service_names = register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = f"{host}:{port}"
    credentials = security.credentials if security else None
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"could not listen on {address}")
    bound_health = -1
    if security and security.health_port >= 0:  # plaintext, health only (AuthInterceptor refuses the rest)
        bound_health = server.add_insecure_port(f"{host}:{security.health_port}")
        if bound_health == 0:
            raise RuntimeError(f"could not listen on {host}:{security.health_port}")
    bound_metrics = -1
    if metrics_port >= 0:
        tls = (security.metrics_tls if security else None) or ("", "")
        bound_metrics = serve_metrics(host, metrics_port, security.metrics_tokens if security else None, *tls)
    await server.start()
    frozen = freeze_start_up_objects()
    log.info("%s: %d objects alive at start-up frozen (collections no longer scan them)", name, frozen)
    handle = ServerHandle(server, health_servicer, bound, bound_metrics, service_names, bound_health, name)
    await handle.set_serving(True)
    log.info("%s serving on %s:%d (%s; metrics on %d%s)", name, host, bound,
             security.describe if security else "plaintext, no authentication", bound_metrics,
             f"; health in plaintext on {bound_health}" if bound_health >= 0 else "")
    return handle


async def run_until_signal(
    handle: ServerHandle, grace: float, port_file: str = "", on_stop: Callable[[], Awaitable[None]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serves until SIGTERM or SIGINT (or until `stop` is set, for a loop that is not on the main
    thread), then stops gracefully: health goes NOT_SERVING, new calls are refused, in-flight calls
    get `grace` seconds."""
    if port_file:
        with open(port_file, "w") as f:
            json.dump({"port": handle.port, "metrics_port": handle.metrics_port, "health_port": handle.health_port}, f)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    server_done = asyncio.ensure_future(handle.server.wait_for_termination())
    stop_wait = asyncio.ensure_future(stop.wait())
    await asyncio.wait([server_done, stop_wait], return_when=asyncio.FIRST_COMPLETED)
    log.info("%s stopping: health NOT_SERVING, %.1fs grace for in-flight calls", handle.name, grace)
    await handle.set_serving(False)
    await handle.server.stop(grace)
    if on_stop is not None:
        await on_stop()
    stop_wait.cancel()
    log.info("%s stopped", handle.name)
