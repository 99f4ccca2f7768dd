//! `api`: the application API (issue 13) against the gRPC it fronts, in one
//! run on one machine.
//!
//! 1. Function calls through REST (`POST /v1/devices/:id/add`, the API then
//!    gRPC to a gateway) next to the same calls made straight over gRPC to
//!    that gateway: closed loop, the same concurrency, the same devices.
//! 2. Server-sent events fanned out: N subscribers on `/v1/events`, events
//!    published at a fixed rate; each event carries its publish time, and
//!    every subscriber records publish-to-receipt. The figure is events
//!    delivered per second across subscribers and the p99 of that latency.
use crate::cluster::{Cluster, ClusterOptions};
use crate::util::{self, Latencies, micros};
use futures::StreamExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use trellis_core::local_redis::free_port;
use trellis_device::DemoApp;
use trellis_device::identity::DeviceIdentity;
use trellis_device::session::{Session, SessionConfig};
use trellis_proto::v1::{CallFunctionRequest, GetDeviceStateRequest, PublishEventRequest};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Seconds of calls, each way.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Event-stream subscribers.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Events published per second during the fan-out.
    #[arg(long, default_value_t = 20.0)]
    pub event_rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub event_seconds: f64,
}

impl Args {
    pub fn smoke() -> Self {
        Self {
            seconds: 1.0,
            concurrency: 2,
            subscribers: 10,
            event_rate: 10.0,
            event_seconds: 1.0,
        }
    }
}

/// `trellis api` in front of `cluster`, killed on drop.
struct ApiProc(std::process::Child);

impl Drop for ApiProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_api(bin: &std::path::Path, cluster: &Cluster, port: u16) -> anyhow::Result<ApiProc> {
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TRELLIS_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .arg("api")
        .env("TRELLIS_AUTH__MODE", "off")
        .env("TRELLIS_TLS__MODE", "off")
        .env("TRELLIS_TELEMETRY__LOG", "warn")
        .env("TRELLIS_TELEMETRY__ADMIN_LISTEN", "")
        .env("TRELLIS_REDIS__URL", cluster.redis.url())
        .env("TRELLIS_API__LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "TRELLIS_API__GATEWAY_URL",
            format!("http://{}", cluster.gateways[0].grpc),
        )
        .env(
            "TRELLIS_API__KEYVAULT_URL",
            format!("http://{}", cluster.keyvault_addr),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(ApiProc(child))
}

/// Runs `op` from `concurrency` workers for `seconds`; latencies and failures.
async fn closed_loop<F, Fut>(concurrency: usize, seconds: f64, op: F) -> (Latencies, u64, f64)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let op = op.clone();
        workers.push(tokio::spawn(async move {
            let (mut lat, mut failed, mut i) = (Vec::new(), 0u64, w as u64 * 1_000_000);
            while Instant::now() < end {
                let t = Instant::now();
                match op(i).await {
                    Ok(()) => lat.push(micros(t.elapsed())),
                    Err(_) => failed += 1,
                }
                i += 1;
            }
            (lat, failed)
        }));
    }
    let (mut all, mut failed) = (Vec::new(), 0);
    for w in workers {
        if let Ok((lat, f)) = w.await {
            all.extend(lat);
            failed += f;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    (Latencies::new(all), failed, secs)
}

pub async fn run(args: &Args, trellis_bin: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    println!("== application API ({})", util::machine());
    let bin = crate::cluster::trellis_binary(trellis_bin.as_deref())?;
    let mut cluster = Cluster::start(&ClusterOptions {
        gateways: 1,
        keyvaults: 1,
        keepalive_secs: 15,
        log: "warn".into(),
        trellis_bin: Some(bin.clone()),
        signer: false,
        gateway_env: Vec::new(),
        admission: false,
        auth: false,
    })
    .await?;
    let port = free_port()?;
    let _api = start_api(&bin, &cluster, port)?;
    let base = format!("http://127.0.0.1:{port}");
    trellis_core::outbound::install_tls_provider();
    let http = reqwest::Client::builder().build()?;

    // Devices on the gateway, described.
    let key = crate::handshake::device_key()?;
    let ids = cluster.register_many(&key, 4, 8).await?;
    let stop = CancellationToken::new();
    let app = Arc::new(DemoApp::default());
    for id in &ids {
        let identity = DeviceIdentity {
            device_id: *id,
            private_key: key.clone(),
            cloud_public_key: cluster.cloud_public_key.clone(),
        };
        let stream = tokio::net::TcpStream::connect(cluster.gateways[0].devices).await?;
        let session = Session::connect(stream, &identity, SessionConfig::default()).await?;
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move { session.run(&*app, stop, |_| {}).await });
    }
    let mut gw = cluster.gateway_client(0).await?;
    let ready = Instant::now();
    for id in &ids {
        loop {
            let s = gw
                .get_device_state(GetDeviceStateRequest {
                    device_id: id.to_string(),
                })
                .await
                .map(|s| s.into_inner());
            if s.as_ref()
                .is_ok_and(|s| s.online && !s.functions.is_empty())
            {
                break;
            }
            anyhow::ensure!(
                ready.elapsed() < Duration::from_secs(20),
                "devices did not come online"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let api_up = Instant::now();
    while http
        .get(format!("{base}/v1/openapi.json"))
        .send()
        .await
        .is_err()
    {
        anyhow::ensure!(
            api_up.elapsed() < Duration::from_secs(20),
            "trellis api did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Arc<Vec<String>> = Arc::new(ids.iter().map(|i| i.to_string()).collect());

    // 1. REST and gRPC, same shape.
    let rest = {
        let (http, base, ids) = (http.clone(), base.clone(), ids.clone());
        move |i: u64| {
            let (http, base, ids) = (http.clone(), base.clone(), ids.clone());
            async move {
                let id = &ids[(i as usize) % ids.len()];
                let v: serde_json::Value = http
                    .post(format!("{base}/v1/devices/{id}/add"))
                    .bearer_auth("bench")
                    .json(&serde_json::json!({"args": format!("{},1", i % 1000)}))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                anyhow::ensure!(
                    v["return_value"] == (i % 1000) as i64 + 1,
                    "wrong answer {v}"
                );
                Ok(())
            }
        }
    };
    let grpc = {
        let (gw, ids) = (gw.clone(), ids.clone());
        move |i: u64| {
            let (mut gw, ids) = (gw.clone(), ids.clone());
            async move {
                let r = gw
                    .call_function(CallFunctionRequest {
                        device_id: ids[(i as usize) % ids.len()].clone(),
                        function: "add".into(),
                        argument: format!("{},1", i % 1000),
                        timeout_ms: 5_000,
                        signed_command: Vec::new(),
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(
                    i64::from(r.return_value) == (i % 1000) as i64 + 1,
                    "wrong answer"
                );
                Ok(())
            }
        }
    };
    let _ = closed_loop(args.concurrency, args.seconds.min(1.0), rest.clone()).await;
    let (r_lat, r_failed, r_secs) = closed_loop(args.concurrency, args.seconds, rest).await;
    let (g_lat, g_failed, g_secs) = closed_loop(args.concurrency, args.seconds, grpc).await;
    let r_rate = r_lat.len() as f64 / r_secs;
    let g_rate = g_lat.len() as f64 / g_secs;
    println!(
        "function calls, {} in flight, {} s each: REST {:.0}/s p50 {:.3} ms p99 {:.3} ms (failed {r_failed}); gRPC {:.0}/s p50 {:.3} ms p99 {:.3} ms (failed {g_failed}); REST/gRPC rate {:.2}",
        args.concurrency,
        args.seconds,
        r_rate,
        r_lat.pct_ms(50.0),
        r_lat.pct_ms(99.0),
        g_rate,
        g_lat.pct_ms(50.0),
        g_lat.pct_ms(99.0),
        r_rate / g_rate
    );
    println!(
        "RESULT api_calls rest_per_s={r_rate:.0} rest_p50_ms={:.3} rest_p99_ms={:.3} grpc_per_s={g_rate:.0} grpc_p50_ms={:.3} grpc_p99_ms={:.3}",
        r_lat.pct_ms(50.0),
        r_lat.pct_ms(99.0),
        g_lat.pct_ms(50.0),
        g_lat.pct_ms(99.0)
    );

    // 2. SSE fan-out.
    let base_time = Instant::now();
    let expected = (args.event_rate * args.event_seconds).round() as usize;
    let opened = Arc::new(tokio::sync::Semaphore::new(0));
    let mut subscribers = Vec::new();
    for _ in 0..args.subscribers {
        let (http, base, opened) = (http.clone(), base.clone(), opened.clone());
        subscribers.push(tokio::spawn(async move {
            let response = http
                .get(format!("{base}/v1/events/bench"))
                .bearer_auth("bench")
                .send()
                .await?
                .error_for_status()?;
            opened.add_permits(1);
            let mut body = response.bytes_stream();
            let mut buffer = String::new();
            let mut lat = Vec::with_capacity(expected);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while lat.len() < expected {
                let chunk = match tokio::time::timeout_at(deadline, body.next()).await {
                    Ok(Some(Ok(c))) => c,
                    _ => break,
                };
                let now = micros(base_time.elapsed());
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let frame: String = buffer.drain(..end + 2).collect();
                    if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                        let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
                        if let Some(sent) = v["data"].as_str().and_then(|d| d.parse::<u64>().ok()) {
                            lat.push(now.saturating_sub(sent));
                        }
                    }
                }
            }
            anyhow::Ok(lat)
        }));
    }
    let open_wait = Instant::now();
    while opened.available_permits() < args.subscribers {
        anyhow::ensure!(
            open_wait.elapsed() < Duration::from_secs(60),
            "only {} of {} event streams opened",
            opened.available_permits(),
            args.subscribers
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{} event streams open after {:.1} s",
        args.subscribers,
        open_wait.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pids = [
        cluster.gateways[0].proc.pid(),
        _api.0.id(),
        cluster.redis.pid(),
    ];
    let c0 = util::sample_cpu(&pids)?;
    let period = Duration::from_secs_f64(1.0 / args.event_rate);
    let t0 = Instant::now();
    for n in 0..expected {
        tokio::time::sleep_until((t0 + period.mul_f64(n as f64)).into()).await;
        gw.publish_event(PublishEventRequest {
            name: "bench/tick".into(),
            data: micros(base_time.elapsed()).to_string().into_bytes(),
            private: true,
        })
        .await?;
    }
    let mut all = Vec::new();
    let mut short = 0usize;
    for s in subscribers {
        match s.await {
            Ok(Ok(lat)) => {
                if lat.len() < expected {
                    short += 1;
                }
                all.extend(lat);
            }
            _ => short += 1,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = util::sample_cpu(&pids)?.delta(&c0);
    let delivered = all.len();
    let lat = Latencies::new(all);
    println!(
        "event fan-out: {} subscribers, {} events at {}/s: {} deliveries ({:.0}/s), publish to receipt p50 {:.1} ms p99 {:.1} ms max {:.1} ms; {short} subscribers missed events; cpu gateway {:.0} %, api {:.0} %, redis {:.0} % of a core",
        args.subscribers,
        expected,
        args.event_rate,
        delivered,
        delivered as f64 / secs,
        lat.pct_ms(50.0),
        lat.pct_ms(99.0),
        lat.max_ms(),
        cpu[0] / secs * 100.0,
        cpu[1] / secs * 100.0,
        cpu[2] / secs * 100.0
    );
    println!(
        "RESULT sse_fanout subscribers={} deliveries_per_s={:.0} p50_ms={:.1} p99_ms={:.1} missed_subscribers={short}",
        args.subscribers,
        delivered as f64 / secs,
        lat.pct_ms(50.0),
        lat.pct_ms(99.0)
    );
    stop.cancel();
    cluster.check_alive()?;
    if r_failed > 0 || g_failed > 0 || short > 0 {
        anyhow::bail!("failures: REST {r_failed}, gRPC {g_failed}, subscribers short {short}");
    }
    Ok(())
}
