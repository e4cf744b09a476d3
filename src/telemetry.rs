//! OpenTelemetry export, off unless an OTLP endpoint is configured with the standard variables
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SDK_DISABLED=true`
//! turns it off again). Then `kiln serve` and `kiln runner` export their spans over OTLP/gRPC
//! (`opentelemetry-otlp` with tonic, batched), every `tracing` span becoming an OpenTelemetry
//! span (`tracing-opentelemetry`), and the W3C trace context propagator carries a build's trace
//! from the dispatcher to the runner (`Assign.trace_context`). The other variables
//! (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_BSP_*`) are read by the SDK as usual.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// Whether the environment asks for OTLP export.
pub fn configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The exporting tracer provider; dropping it flushes and stops the export.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("kiln: flushing OpenTelemetry spans: {e}");
        }
    }
}

/// Sets up the export for `service` (unless `OTEL_SERVICE_NAME` names it) and returns the
/// `tracing` layer that feeds it. Must be called inside the tokio runtime (tonic's channel).
pub fn init<S>(
    service: &str,
) -> Result<
    (
        Telemetry,
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
    ),
    String,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("OpenTelemetry OTLP exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer("kiln");
    Ok((
        Telemetry { provider },
        tracing_opentelemetry::layer().with_tracer(tracer),
    ))
}
