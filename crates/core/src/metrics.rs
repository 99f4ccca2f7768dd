//! The metrics every service exports, in one place so dashboards and code
//! agree on names (charts/trellis/dashboards/METRICS.txt lists the same).
//! Names are the final Prometheus names: the exporter adds no suffixes.
use opentelemetry::KeyValue;
use opentelemetry::global;
use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};
use std::sync::OnceLock;

pub struct Metrics {
    pub sessions_open: UpDownCounter<i64>,
    pub handshakes: Counter<u64>,
    pub handshake_duration: Histogram<f64>,
    pub private_op_duration: Histogram<f64>,
    pub routed_command_duration: Histogram<f64>,
    pub device_events: Counter<u64>,
    pub redis_errors: Counter<u64>,
    pub redis_reconnects: Counter<u64>,
    pub clone_suspicions: Counter<u64>,
}

/// Latency buckets in seconds, from 100 µs to 30 s.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

fn meter() -> Meter {
    global::meter("trellis")
}

/// The instruments. Created on first use, after [`crate::telemetry::init`]
/// has installed the meter provider.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let m = meter();
        let seconds = |name: &'static str, help: &'static str| {
            m.f64_histogram(name)
                .with_description(help)
                .with_boundaries(SECONDS.to_vec())
                .build()
        };
        Metrics {
            sessions_open: m
                .i64_up_down_counter("trellis_gateway_sessions_open")
                .with_description("Device sessions open on this gateway")
                .build(),
            handshakes: m
                .u64_counter("trellis_handshakes_total")
                .with_description("Device handshakes by outcome and refusal reason")
                .build(),
            handshake_duration: seconds(
                "trellis_handshake_duration_seconds",
                "Device handshake latency",
            ),
            private_op_duration: seconds(
                "trellis_keyvault_private_op_duration_seconds",
                "RSA private-key operation latency, queue wait included",
            ),
            routed_command_duration: seconds(
                "trellis_routed_command_duration_seconds",
                "Operator command round trip to the device, routing included",
            ),
            device_events: m
                .u64_counter("trellis_device_events_total")
                .with_description("Events published by devices")
                .build(),
            redis_errors: m
                .u64_counter("trellis_redis_errors_total")
                .with_description("Redis commands that failed")
                .build(),
            redis_reconnects: m
                .u64_counter("trellis_redis_reconnects_total")
                .with_description("Redis connections re-established")
                .build(),
            clone_suspicions: m
                .u64_counter("trellis_clone_suspicions_total")
                .with_description("Second live sessions for one device identity")
                .build(),
        }
    })
}

/// Registers an observable gauge whose value is read at scrape time.
pub fn gauge(
    name: &'static str,
    help: &'static str,
    read: impl Fn() -> i64 + Send + Sync + 'static,
) {
    // The callback stays registered with the meter provider; the handle
    // itself need not be kept.
    let _gauge = meter()
        .i64_observable_gauge(name)
        .with_description(help)
        .with_callback(move |o| o.observe(read(), &[]))
        .build();
}

/// Registers an observable gauge with labels: `read` returns every
/// (value, labels) series at scrape time (for example
/// `trellis_ota_devices{rollout,state}`).
pub fn labeled_gauge(
    name: &'static str,
    help: &'static str,
    read: impl Fn() -> Vec<(i64, Vec<KeyValue>)> + Send + Sync + 'static,
) {
    let _gauge = meter()
        .i64_observable_gauge(name)
        .with_description(help)
        .with_callback(move |o| {
            for (value, labels) in read() {
                o.observe(value, &labels);
            }
        })
        .build();
}

pub fn kv(key: &'static str, value: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(key, value)
}

/// Makes `service`'s Redis series (`trellis_redis_errors_total`,
/// `trellis_redis_reconnects_total`, label `service`) exist at 0 from the
/// start, so dashboards and alerts see the first error as an increase
/// rather than as a series appearing out of nowhere.
pub fn service_started(service: &'static str) {
    let m = metrics();
    m.redis_errors.add(0, &[kv("service", service)]);
    m.redis_reconnects.add(0, &[kv("service", service)]);
}

/// Counts a failed Redis command for `service`. A connection-level failure
/// also counts as a reconnect: the connection manager re-establishes the
/// connection on its own after one.
pub fn redis_error(service: &'static str, e: &redis::RedisError) {
    let m = metrics();
    m.redis_errors.add(1, &[kv("service", service)]);
    if e.is_connection_dropped() || e.is_connection_refusal() || e.is_io_error() || e.is_timeout() {
        m.redis_reconnects.add(1, &[kv("service", service)]);
    }
}
