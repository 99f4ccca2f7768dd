//! One trace follows an operator's command from the CLI through gateway B,
//! Redis and gateway A to the device and back; a handshake's trace holds
//! keyvault's span. Spans are received by an OTLP gRPC server in this test.
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trellis_device::sim::{SimConfig, run_fleet};
use trellis_tests::{Cluster, RawDevice, eventually, test_config};

#[derive(Clone, Default)]
struct Receiver {
    /// (service.name, span)
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    fn trace(&self, trace_id: &[u8]) -> Vec<(String, Span)> {
        let spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        spans
            .iter()
            .filter(|(_, s)| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
    fn all(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn values(span: &Span) -> Vec<String> {
    span.attributes
        .iter()
        .chain(span.events.iter().flat_map(|e| e.attributes.iter()))
        .filter_map(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            AnyValue::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
        .chain(span.events.iter().map(|e| e.name.clone()))
        .collect()
}

/// Every span but the root has its parent in the same trace; returns the
/// chain of names from `name` up to the root.
fn chain_to_root(trace: &[(String, Span)], name: &str) -> Vec<String> {
    let by_id: HashMap<&[u8], &Span> = trace
        .iter()
        .map(|(_, s)| (s.span_id.as_slice(), s))
        .collect();
    let mut out = Vec::new();
    let mut cur = trace.iter().find(|(_, s)| s.name == name).map(|(_, s)| s);
    while let Some(s) = cur {
        out.push(s.name.clone());
        cur = by_id.get(s.parent_span_id.as_slice()).copied();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_cli_through_two_gateways_to_the_device() -> anyhow::Result<()> {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let otlp = format!("http://{}", listener.local_addr()?);
    let server = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    let redis = trellis_core::local_redis::LocalRedis::start(
        trellis_core::local_redis::RedisData::Ephemeral,
    )?;
    let mut config = test_config(&redis.url());
    config.telemetry.otlp_endpoint = Some(otlp.clone());
    config.telemetry.log = "info".into();
    let telemetry = trellis_core::telemetry::init("tests", &config);
    let cluster = Cluster::start_with(redis, config, 2).await?;

    // A device that answers calls, on gateway 1.
    let device = cluster.provision(1).await?;
    let id = device.device_id.to_string();
    let stop = CancellationToken::new();
    let (tx, _reports) = tokio::sync::mpsc::unbounded_channel();
    run_fleet(
        vec![device],
        SimConfig::default(),
        vec![cluster.gateways[0].devices.to_string()],
        stop.clone(),
        tx,
    );
    // A raw session too, whose key must never show up in a span.
    let raw_identity = cluster.provision(1).await?;
    let raw = RawDevice::connect(cluster.gateways[0].devices, &raw_identity).await?;
    let mut gw = cluster.gateway_client(1).await?;
    eventually(Duration::from_secs(20), "device online", || {
        let mut gw = gw.clone();
        let id = id.clone();
        async move {
            let s = gw
                .get_device_state(trellis_proto::v1::GetDeviceStateRequest { device_id: id })
                .await
                .ok()?
                .into_inner();
            (s.online && !s.functions.is_empty()).then_some(())
        }
    })
    .await?;
    let _ = &mut gw;

    // The operator's call, through gateway 2, from a separate CLI process.
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["device", "call", &id, "add", "2,3", "--trace"])
        .env("TRELLIS_TLS__MODE", "off")
        .env(
            "TRELLIS_GATEWAY_URL",
            format!("http://{}", cluster.gateways[1].grpc),
        )
        .env("TRELLIS_TELEMETRY__OTLP_ENDPOINT", &otlp)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5");
    let trace_hex = stderr
        .lines()
        .find_map(|l| l.strip_prefix("trace id: "))
        .expect("--trace prints the trace id")
        .trim()
        .to_string();
    let trace_id = hex::decode(&trace_hex)?;
    assert_ne!(trace_id, vec![0u8; 16], "the CLI exported a real trace");

    let expected = [
        "cli.command",
        "trellis.v1.DeviceService/CallFunction",
        "rpc.call_function",
        "command.route",
        "redis.publish",
        "command.deliver",
        "device.command",
    ];
    let trace = eventually(Duration::from_secs(20), "the whole command trace", || {
        telemetry.flush();
        let trace = receiver.trace(&trace_id);
        let names: Vec<&str> = trace.iter().map(|(_, s)| s.name.as_str()).collect();
        let complete = expected.iter().all(|e| names.contains(e));
        async move { complete.then_some(trace) }
    })
    .await?;

    // One trace id, correct parent links: the device exchange on gateway 1
    // descends from the delivery, which descends (through Redis) from
    // gateway 2's routing, its RPC, and the CLI's root span.
    let chain = chain_to_root(&trace, "device.command");
    assert_eq!(
        chain,
        vec![
            "device.command",
            "command.deliver",
            "command.attempt",
            "command.route",
            "rpc.call_function",
            "trellis.v1.DeviceService/CallFunction",
            "cli.command"
        ],
        "parent chain"
    );
    let gateways: Vec<String> = trace
        .iter()
        .filter(|(_, s)| s.name == "command.route" || s.name == "command.deliver")
        .flat_map(|(_, s)| values(s))
        .filter(|v| v.starts_with("gw-"))
        .collect();
    assert!(
        gateways.contains(&"gw-1".to_string()) && gateways.contains(&"gw-2".to_string()),
        "{gateways:?}"
    );
    let roots: Vec<_> = trace
        .iter()
        .filter(|(_, s)| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root");
    assert_eq!(roots[0].0, "trellis-cli");

    // A handshake's trace contains keyvault's OpenSession span as a child.
    let all = receiver.all();
    let handshake = all
        .iter()
        .find(|(_, s)| s.name == "device.handshake")
        .map(|(_, s)| s.trace_id.clone())
        .expect("a handshake span");
    let hs_trace: Vec<(String, Span)> = all
        .iter()
        .filter(|(_, s)| s.trace_id == handshake)
        .cloned()
        .collect();
    let chain = chain_to_root(&hs_trace, "trellis.v1.KeyVault/OpenSession");
    assert_eq!(
        chain.last().map(String::as_str),
        Some("device.handshake"),
        "{chain:?}"
    );

    // Each message a gateway handles has its span, named by what it is.
    let operations: Vec<String> = all
        .iter()
        .filter(|(_, s)| s.name == "device.message")
        .flat_map(|(_, s)| {
            s.attributes
                .iter()
                .filter(|a| a.key == "messaging.operation.name")
                .filter_map(|a| match a.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(v) => Some(v.clone()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    for op in ["hello", "response"] {
        assert!(
            operations.iter().any(|o| o == op),
            "no device.message span for {op}: {operations:?}"
        );
    }

    // No secret in any span attribute or event of the run.
    let secrets = raw.session_secrets_hex.clone();
    for (_, span) in &all {
        for v in values(span) {
            let lower = v.to_lowercase();
            assert!(!lower.contains("private key"), "{}: {v}", span.name);
            for secret in &secrets {
                assert!(
                    !lower.contains(secret),
                    "session secret in span {}",
                    span.name
                );
            }
        }
    }
    assert!(!stderr.to_lowercase().contains("private key"));
    stop.cancel();
    cluster.stop().await;
    Ok(())
}
