"""OpenTelemetry set-up: OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set, otherwise off.

"Off" keeps the API's no-op tracer, so spans cost next to nothing; tests install an in-memory
exporter through `install_tracer_provider`.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from libs.settings import Settings

_installed = False


def install_tracer_provider(service: str, processors: list[SpanProcessor]) -> TracerProvider:
    global _installed
    provider = TracerProvider(resource=Resource.create({"service.name": f"loyalty-{service}"}))
    for processor in processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _installed = True
    return provider


def tracing_enabled() -> bool:
    """Whether spans go anywhere: instrumentation that costs something per operation even with the
    no-op tracer (database spans) is only switched on then."""
    return _installed


def configure_tracing(service: str, settings: Settings) -> TracerProvider | None:
    if not settings.otel_exporter_otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=settings.otel_exporter_otlp_endpoint, insecure=True)
    return install_tracer_provider(service, [BatchSpanProcessor(exporter)])
