"""Trace context through gRPC metadata, with an in-memory exporter."""

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from genrpc import tracing


class FakeContext:
    """What a servicer's context offers for this: the caller's metadata."""

    def __init__(self, metadata):
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata


def test_context_crosses_the_metadata():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("client") as client:
        metadata = tracing.outgoing_metadata([("x-request-id", "r1")])
    assert ("x-request-id", "r1") in metadata
    assert any(key == "traceparent" for key, _ in metadata)
    with tracer.start_as_current_span("server", context=tracing.incoming_context(FakeContext(metadata))):
        pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["server"].context.trace_id == client.get_span_context().trace_id
    assert spans["server"].parent.span_id == client.get_span_context().span_id


def test_no_metadata_starts_a_new_trace():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("server", context=tracing.incoming_context(FakeContext([]))):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.parent is None


def test_off_by_default_records_nothing():
    tracing.setup_tracing("genrpc-test", "none")
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)  # nothing installed
    with tracing.tracer().start_as_current_span("x") as span:
        assert not span.is_recording()
