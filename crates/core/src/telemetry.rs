//! Logging, traces and metrics for every service. `init` installs one
//! `tracing` subscriber: log lines to stderr, and, when
//! `telemetry.otlp_endpoint` is set, spans exported over OTLP/gRPC through
//! `tracing-opentelemetry`. Metrics are OpenTelemetry instruments read by two
//! readers: a Prometheus registry (served on the admin port's `/metrics`) and
//! an OTLP exporter when an endpoint is set. W3C trace context crosses gRPC
//! (interceptor + server span, below) and Redis stream entries
//! ([`inject_fields`] / [`extract_fields`]).
use crate::config::Config;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{KeyValue, global};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::collections::HashMap;
use std::sync::OnceLock;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Libraries whose info lines ("Global meter provider is set", connection
/// chatter) mean nothing to an operator: warnings and errors only, unless
/// `telemetry.log` names them or `RUST_LOG` is set.
const QUIET_DEPENDENCIES: &[&str] = &[
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "opentelemetry-otlp",
    "opentelemetry_prometheus",
    "h2",
    "hyper",
    "hyper_util",
    "tower",
    "tonic",
    "redis",
];

/// `telemetry.log` with the quiet dependencies added at `warn`.
fn log_directives(log: &str) -> String {
    let mut out = log.to_string();
    for dep in QUIET_DEPENDENCIES {
        let named = log
            .split(',')
            .any(|d| d.trim().split('=').next() == Some(*dep));
        if !named {
            out.push_str(&format!(",{dep}=warn"));
        }
    }
    out
}

/// Keeps the exporters alive; dropping it flushes what is buffered.
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

static REGISTRY: OnceLock<prometheus::Registry> = OnceLock::new();

/// The Prometheus registry every metric lands in (served by `/metrics`).
pub fn registry() -> &'static prometheus::Registry {
    REGISTRY.get_or_init(prometheus::Registry::new)
}

impl Telemetry {
    /// Pushes buffered spans and metrics out now (tests, short CLI runs).
    pub fn flush(&self) {
        if let Some(p) = &self.tracer_provider {
            let _ = p.force_flush();
        }
        if let Some(p) = &self.meter_provider {
            let _ = p.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.tracer_provider.take() {
            let _ = p.shutdown();
        }
        if let Some(p) = self.meter_provider.take() {
            let _ = p.shutdown();
        }
    }
}

fn resource(service: &str, config: &Config) -> Resource {
    let instance = format!(
        "{}-{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into()),
        std::process::id()
    );
    Resource::builder()
        .with_service_name(format!("trellis-{service}"))
        .with_attributes([
            KeyValue::new("service.instance.id", instance),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new(
                "deployment.environment",
                config.telemetry.environment.clone(),
            ),
            KeyValue::new("cloud.region", config.region.clone()),
        ])
        .build()
}

/// Installs logging, tracing and metrics for `service`. Only the first call
/// in a process takes effect (tests start many services in one process);
/// later calls return a handle that owns nothing.
pub fn init(service: &str, config: &Config) -> Telemetry {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.set(()).is_err() {
        return Telemetry {
            tracer_provider: None,
            meter_provider: None,
        };
    }
    global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = resource(service, config);

    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(log_directives(&config.telemetry.log)))
        .unwrap_or_else(|_| EnvFilter::new(log_directives("info")));
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(std::io::stderr);

    let endpoint = config
        .telemetry
        .otlp_endpoint
        .clone()
        .filter(|e| !e.is_empty());
    let tracer_provider = endpoint.as_ref().and_then(|endpoint| {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build();
        match exporter {
            Ok(exporter) => Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource.clone())
                    .build(),
            ),
            Err(e) => {
                eprintln!("telemetry: cannot export spans to {endpoint}: {e}");
                None
            }
        }
    });
    // The log filter applies to log lines only: spans at info and above are
    // exported whatever the log level (a quiet CLI still traces).
    let otel_layer = tracer_provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("trellis"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel_layer)
        .try_init();
    if let Some(p) = &tracer_provider {
        global::set_tracer_provider(p.clone());
    }

    let mut meters = SdkMeterProvider::builder().with_resource(resource);
    match opentelemetry_prometheus::exporter()
        .with_registry(registry().clone())
        .without_units()
        .without_counter_suffixes()
        .without_target_info()
        .scope_info_enabled(false)
        .build()
    {
        Ok(reader) => meters = meters.with_reader(reader),
        Err(e) => eprintln!("telemetry: no Prometheus metrics: {e}"),
    }
    if let Some(endpoint) = &endpoint {
        match opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
        {
            Ok(exporter) => meters = meters.with_periodic_exporter(exporter),
            Err(e) => eprintln!("telemetry: cannot export metrics to {endpoint}: {e}"),
        }
    }
    let meter_provider = meters.build();
    global::set_meter_provider(meter_provider.clone());
    tracing::debug!(service, otlp = ?endpoint, "telemetry initialised");
    Telemetry {
        tracer_provider,
        meter_provider: Some(meter_provider),
    }
}

/// The current span's trace id as hex (all zeros when spans are not exported).
pub fn current_trace_id() -> String {
    use opentelemetry::trace::TraceContextExt;
    tracing::Span::current()
        .context()
        .span()
        .span_context()
        .trace_id()
        .to_string()
}

struct MapCarrier<'a>(&'a mut HashMap<String, String>);
impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}
struct MapReader<'a>(&'a HashMap<String, String>);
impl Extractor for MapReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The current span's W3C trace context (`traceparent`, `tracestate`) as
/// fields for a Redis stream entry.
pub fn inject_fields() -> Vec<(String, String)> {
    let mut map = HashMap::new();
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MapCarrier(&mut map));
    map.into_iter().collect()
}

/// Makes `span` a child of the trace context carried in stream fields.
pub fn extract_fields(span: &tracing::Span, fields: &HashMap<String, String>) {
    let cx = TraceContextPropagator::new().extract(&MapReader(fields));
    let _ = span.set_parent(cx);
}

struct HeaderInjector<'a>(&'a mut tonic::metadata::MetadataMap);
impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}
struct HeaderExtractor<'a>(&'a http::HeaderMap);
impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Whose credential a client's requests carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// This process's service credential (gateway, signer, ota calling
    /// another service): [`set_service_credential`].
    Service,
    /// The operator's token (CLI, demo): [`set_operator_credential`].
    Operator,
}

type Bearer = tonic::metadata::MetadataValue<tonic::metadata::Ascii>;
static SERVICE_CREDENTIAL: std::sync::RwLock<Option<Bearer>> = std::sync::RwLock::new(None);
static OPERATOR_CREDENTIAL: std::sync::RwLock<Option<Bearer>> = std::sync::RwLock::new(None);

fn set_credential(
    slot: &std::sync::RwLock<Option<Bearer>>,
    token: Option<&str>,
) -> Result<(), String> {
    let value = match token {
        Some(t) => Some(
            format!("Bearer {}", t.trim())
                .parse::<Bearer>()
                .map_err(|_| "the token holds characters a header cannot carry".to_string())?,
        ),
        None => None,
    };
    *slot.write().unwrap_or_else(|p| p.into_inner()) = value;
    Ok(())
}

/// The token this process's services send when they call other services.
pub fn set_service_credential(token: Option<&str>) -> Result<(), String> {
    set_credential(&SERVICE_CREDENTIAL, token)
}

/// Whether this process already has a service credential.
pub fn has_service_credential() -> bool {
    SERVICE_CREDENTIAL
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .is_some()
}

/// Whether this process already has an operator credential.
pub fn has_operator_credential() -> bool {
    OPERATOR_CREDENTIAL
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .is_some()
}

/// The token this process's operator clients (CLI, demo) send.
pub fn set_operator_credential(token: Option<&str>) -> Result<(), String> {
    set_credential(&OPERATOR_CREDENTIAL, token)
}

/// Client interceptor: sends the current span's trace context as gRPC
/// metadata, so the server's span joins the caller's trace, and the
/// credential of its kind (`authorization: Bearer`), when this process
/// has one.
#[derive(Debug, Clone, Copy)]
pub struct TraceInterceptor(Credential);

impl TraceInterceptor {
    pub const SERVICE: Self = Self(Credential::Service);
    pub const OPERATOR: Self = Self(Credential::Operator);
}

impl tonic::service::Interceptor for TraceInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let cx = tracing::Span::current().context();
        TraceContextPropagator::new()
            .inject_context(&cx, &mut HeaderInjector(request.metadata_mut()));
        let slot = match self.0 {
            Credential::Service => &SERVICE_CREDENTIAL,
            Credential::Operator => &OPERATOR_CREDENTIAL,
        };
        if let Some(bearer) = slot.read().unwrap_or_else(|p| p.into_inner()).clone() {
            request.metadata_mut().insert("authorization", bearer);
        }
        Ok(request)
    }
}

/// A channel whose requests carry trace context.
pub type TracedChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TraceInterceptor>;

/// Server side: a span per gRPC request, child of the caller's context, with
/// OpenTelemetry RPC semantic-convention attributes. Use with tonic's
/// `Server::builder().trace_fn(grpc_server_span)`.
pub fn grpc_server_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default().to_string();
    let method = parts.next().unwrap_or_default().to_string();
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %format!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
    let _ = span.set_parent(cx);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_are_quiet_unless_named() {
        let d = log_directives("info");
        assert!(d.starts_with("info,"), "{d}");
        assert!(d.contains(",opentelemetry=warn"), "{d}");
        assert!(EnvFilter::try_new(&d).is_ok(), "{d}");
        let d = log_directives("info,opentelemetry=debug");
        assert!(!d.contains("opentelemetry=warn"), "{d}");
        assert!(d.contains("opentelemetry_sdk=warn"), "{d}");
    }
}
