//! No secret leaves a service in telemetry. Keyvault, two gateways, signer
//! and ota run as separate `trellis` processes with debug logs and spans
//! exported to an OTLP receiver in this test; after handshakes (one whose
//! session key this test knows), a call routed across gateways, a refused
//! handshake, events and a release signature, no span name, attribute or
//! event, and no line any process (services, simulator, CLI) printed,
//! contains a session key or IV, the master key, a device private key or a
//! PEM private-key marker.
mod common;

use common::{Options, Proc, Services, ok};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use trellis_proto::v1 as pb;
use trellis_tests::{RawDevice, eventually};

/// Every exported span as (service.name, text of everything it carries).
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, String, String)>>>,
}

fn text(attrs: &[KeyValue]) -> Vec<String> {
    attrs
        .iter()
        .flat_map(|a| {
            let v = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            [a.key.clone(), v]
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| text(&r.attributes)).unwrap_or_default();
            let service = resource
                .windows(2)
                .find(|w| w[0] == "service.name")
                .map(|w| w[1].clone())
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let mut all = resource.clone();
                    all.push(span.name.clone());
                    all.extend(text(&span.attributes));
                    for e in &span.events {
                        all.push(e.name.clone());
                        all.extend(text(&e.attributes));
                    }
                    if let Some(status) = &span.status {
                        all.push(status.message.clone());
                    }
                    spans.push((service.clone(), span.name.clone(), all.join("\n")));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    fn all(&self) -> Vec<(String, String, String)> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The ways a secret could be written: hex in either case, and the byte
/// array as `{:?}` prints it.
fn forms(secret_hex: &str) -> Vec<String> {
    let mut out = vec![secret_hex.to_lowercase()];
    if let Ok(bytes) = hex::decode(secret_hex) {
        out.push(format!("{bytes:?}").to_lowercase());
        out.push(
            format!("{:?}", bytes)
                .trim_matches(['[', ']'])
                .to_lowercase(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_any_span_or_log_line() -> anyhow::Result<()> {
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

    let redis = trellis_core::local_redis::LocalRedis::start_with_users(
        trellis_core::local_redis::RedisData::Ephemeral,
        trellis_core::local_redis::Admin::Open,
    )?;
    let dir = tempfile::tempdir()?;
    // Debug logs from every Trellis crate: the most a service ever prints.
    let log = "info,trellis=debug,trellis_core=debug,trellis_gateway=debug,trellis_keyvault=debug,trellis_signer=debug,trellis_ota=debug,trellis_device=debug";
    let mut services = Services::start(Options {
        redis: &redis,
        dir: dir.path(),
        otlp: Some(&otlp),
        log,
    })
    .await?;
    let telemetry_env = vec![
        ("TRELLIS_TELEMETRY__OTLP_ENDPOINT", otlp.clone()),
        ("TRELLIS_TELEMETRY__LOG", log.to_string()),
    ];
    let mut cli_output = String::new();
    let mut cli = |gateway: usize, args: &[&str]| {
        let out = services.cli(gateway, args, &telemetry_env);
        cli_output.push_str(&String::from_utf8_lossy(&out.stdout));
        cli_output.push_str(&String::from_utf8_lossy(&out.stderr));
        ok(out)
    };

    // Devices: one simulated in its own process, one driven by hand.
    let keys = dir.path().join("keys");
    let keys_s = keys.display().to_string();
    let ids: Vec<String> = cli(
        0,
        &[
            "device",
            "provision",
            "--product",
            "1",
            "--count",
            "2",
            "--out",
            &keys_s,
        ],
    )
    .lines()
    .map(str::to_string)
    .collect();
    assert_eq!(ids.len(), 2);
    let sim_keys = dir.path().join("sim-keys");
    std::fs::create_dir_all(&sim_keys)?;
    for f in [format!("{}.pem", ids[0]), "cloud.pub.pem".to_string()] {
        std::fs::copy(keys.join(&f), sim_keys.join(&f))?;
    }
    let mut sim = Proc::spawn(
        "sim",
        dir.path(),
        &[
            "sim",
            "--keys",
            &sim_keys.display().to_string(),
            "--gateway",
            &services.gateways[0].devices,
            "--event-interval",
            "1",
        ],
        &[("RUST_LOG", log.to_string())],
    );
    let identities = trellis_device::identity::load_fleet(&keys, None, None)?;
    let raw_identity = identities
        .iter()
        .find(|i| i.device_id.to_string() == ids[1])
        .expect("the second device's key");
    let mut raw = RawDevice::connect(services.gateways[0].devices.parse()?, raw_identity).await?;
    raw.hello(raw_identity.device_id, [7; 32]).await?;
    let _ = raw.recv(Duration::from_secs(5)).await?;

    let mut gw2 = pb::device_service_client::DeviceServiceClient::connect(format!(
        "http://{}",
        services.gateways[1].grpc
    ))
    .await?;
    eventually(
        Duration::from_secs(60),
        "the simulated device online",
        || {
            let mut gw2 = gw2.clone();
            let id = ids[0].clone();
            async move {
                let s = gw2
                    .get_device_state(pb::GetDeviceStateRequest { device_id: id })
                    .await
                    .ok()?
                    .into_inner();
                (s.online && !s.functions.is_empty()).then_some(())
            }
        },
    )
    .await?;
    let _ = &mut gw2;
    assert_eq!(
        cli(1, &["--trace", "device", "call", &ids[0], "add", "2,3"]),
        "5"
    );
    cli(1, &["device", "get", &ids[0], "temp"]);

    // A refused handshake.
    let stranger = trellis_device::identity::DeviceIdentity {
        device_id: trellis_wire::DeviceId(rand::random()),
        private_key: trellis_device::identity::generate_device_key(&mut rand::rng())?,
        cloud_public_key: raw_identity.cloud_public_key.clone(),
    };
    assert!(
        RawDevice::connect(services.gateways[1].devices.parse()?, &stranger)
            .await
            .is_err()
    );

    // A release signed with the cloud release key (a keyvault private-key use).
    let mut signer =
        pb::signer_client::SignerClient::connect(format!("http://{}", services.signer)).await?;
    let image = b"trellis secrets test firmware".to_vec();
    let uploaded = signer
        .upload_image(tokio_stream::iter(vec![
            pb::UploadImageRequest {
                part: Some(pb::upload_image_request::Part::Header(
                    pb::UploadImageHeader {
                        product_id: 1,
                        size: image.len() as u64,
                        organization: String::new(),
                    },
                )),
            },
            pb::UploadImageRequest {
                part: Some(pb::upload_image_request::Part::Data(image.clone())),
            },
        ]))
        .await?
        .into_inner();
    let release = signer
        .create_release(pb::CreateReleaseRequest {
            product_id: 1,
            version: 2,
            image_sha256: uploaded.sha256,
        })
        .await?
        .into_inner();
    signer
        .sign_release(pb::SignReleaseRequest {
            release_id: release.release_id,
        })
        .await?;

    // Spans from the handshake (gateway and keyvault) have arrived.
    eventually(Duration::from_secs(30), "handshake spans exported", || {
        let all = receiver.all();
        let ok = all.iter().any(|(_, name, _)| name == "device.handshake")
            && all.iter().any(|(s, _, _)| s == "trellis-keyvault");
        async move { ok.then_some(()) }
    })
    .await?;
    let session_secrets = raw.session_secrets_hex.clone();
    drop(raw);
    sim.terminate(Duration::from_secs(10));
    services.terminate();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // What must never appear.
    let mut secrets: Vec<(String, String)> = Vec::new();
    for (i, s) in session_secrets.iter().enumerate() {
        for f in forms(s) {
            secrets.push((format!("session secret {i}"), f));
        }
    }
    for f in forms(&services.master_key_hex) {
        secrets.push(("the master key".into(), f));
    }
    // Each service's Redis password (the services log their Redis URLs).
    for user in trellis_core::redis_conn::acl::RedisUser::ALL {
        let password = redis.password_for(user).expect("a Redis user per service");
        secrets.push((format!("{}'s Redis password", user.name()), password.into()));
    }
    secrets.push(("a PEM private-key marker".into(), "private key".into()));
    for id in &ids {
        let pem = std::fs::read_to_string(keys.join(format!("{id}.pem")))?;
        assert!(pem.contains("PRIVATE KEY"), "a PEM private key");
        for line in pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 40)
        {
            secrets.push((format!("device {id}'s private key"), line.to_lowercase()));
        }
    }

    let mut outputs = services.outputs();
    outputs.push(("sim".into(), sim.output()));
    outputs.push(("cli".into(), cli_output));
    let spans = receiver.all();
    assert!(spans.len() > 10, "only {} spans exported", spans.len());
    let mut leaks = Vec::new();
    for (what, secret) in &secrets {
        for (service, name, text) in &spans {
            if text.to_lowercase().contains(secret.as_str()) {
                leaks.push(format!("{what} in span {name} of {service}"));
            }
        }
        for (process, output) in &outputs {
            for line in output.lines() {
                if line.to_lowercase().contains(secret.as_str()) {
                    leaks.push(format!("{what} in a log line of {process}: {line}"));
                }
            }
        }
    }
    // The haystack holds the hand-driven session: its device id (not a
    // secret) is in spans and in the gateway's log.
    assert!(
        spans.iter().any(|(_, _, t)| t.contains(&ids[1])),
        "no span mentions device {}",
        ids[1]
    );
    assert!(
        outputs
            .iter()
            .any(|(p, o)| p.starts_with("gw-") && o.contains(&ids[1])),
        "no gateway log line mentions device {}",
        ids[1]
    );
    let logged: usize = outputs.iter().map(|(_, o)| o.lines().count()).sum();
    assert!(logged > 20, "only {logged} log lines captured");
    assert!(
        leaks.is_empty(),
        "secrets leaked:\n  {}",
        leaks.join("\n  ")
    );
    Ok(())
}
