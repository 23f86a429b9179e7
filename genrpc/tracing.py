"""OpenTelemetry tracing across gateway -> tokenizer -> model, with the context carried in
gRPC metadata (W3C `traceparent`).

Off by default (`--trace-exporter none`: the API's no-op tracer, nothing recorded). Other
exporters: `console` (spans printed as JSON), `jsonl:PATH` (one JSON object a line, appended to
PATH; what the tests read), `otlp` (an OTLP/gRPC collector at OTEL_EXPORTER_OTLP_ENDPOINT; needs
the opentelemetry-exporter-otlp package).
"""

from __future__ import annotations

import json
import threading
from typing import Sequence

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from genrpc.errors import ConfigError

TRACER_NAME = "genrpc"


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span to a file as one JSON object a line."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            lines.append(json.dumps({
                "name": span.name, "service": span.resource.attributes.get("service.name"),
                "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
                "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                "kind": span.kind.name, "attributes": dict(span.attributes or {}),
                "status": span.status.status_code.name,
            }))
        with self._lock, open(self.path, "a") as f:
            f.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS


def setup_tracing(service_name: str, exporter: str) -> None:
    """Installs a tracer provider for this process, unless the exporter is `none`."""
    if exporter in ("", "none"):
        return
    if exporter == "console":
        span_exporter: SpanExporter = ConsoleSpanExporter()
    elif exporter.startswith("jsonl:"):
        span_exporter = JsonLinesSpanExporter(exporter[len("jsonl:"):])
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ConfigError("--trace-exporter otlp needs: pip install opentelemetry-exporter-otlp") from exc
        span_exporter = OTLPSpanExporter()
    else:
        raise ConfigError(f"--trace-exporter {exporter!r}: allowed none, console, jsonl:PATH, otlp")
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter == "otlp":
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    else:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)


_TRACER: trace.Tracer | None = None


def tracer() -> trace.Tracer:
    """This process's tracer. Made once: before a provider is installed it is the API's proxy,
    which hands over to the provider's tracer once one is (get_tracer per call is not free)."""
    global _TRACER
    if _TRACER is None:
        _TRACER = trace.get_tracer(TRACER_NAME)
    return _TRACER


def outgoing_metadata(extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Metadata for a call to another service: the current trace context, plus `extra`."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [*carrier.items(), *extra]


def incoming_context(grpc_context) -> context.Context:
    """The trace context a caller sent in its metadata (an empty one when it sent none)."""
    carrier = {}
    for key, value in grpc_context.invocation_metadata() or ():
        carrier[key] = value if isinstance(value, str) else value.decode(errors="replace")
    return propagate.extract(carrier)
