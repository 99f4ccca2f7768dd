//! Clone detection end to end: one device key used from two source
//! addresses (127.0.0.2 and 127.0.0.3) on two different gateways, against a
//! real redis-server, keyvault and gateways. Each test runs its cluster in
//! its own region, so the metric series it reads are its own.
use std::net::IpAddr;
use std::time::{Duration, Instant};
use trellis_core::audit::AuditRecord;
use trellis_core::config::ClonePolicy;
use trellis_core::local_redis::{Admin, LocalRedis, RedisData};
use trellis_device::identity::DeviceIdentity;
use trellis_proto::v1::{DeviceState, GetDeviceStateRequest};
use trellis_tests::{Cluster, RawDevice, eventually, test_config};
use trellis_wire::message;

const HOST_A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
const HOST_B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));
const KEEPALIVE_SECS: u64 = 15;

async fn cluster(
    region: &str,
    policy: ClonePolicy,
    quarantine_secs: u64,
) -> anyhow::Result<Cluster> {
    let redis = LocalRedis::start_with_users(RedisData::Ephemeral, Admin::Open)?;
    let mut config = test_config(&redis.url());
    config.region = region.into();
    config.gateway.keepalive_secs = KEEPALIVE_SECS;
    config.gateway.clone_policy = policy;
    config.gateway.clone_quarantine_secs = quarantine_secs;
    Cluster::start_with(redis, config, 2).await
}

/// `trellis_clone_suspicions_total` summed over this region's series (read
/// from the Prometheus text the admin port serves).
fn clone_suspicions(region: &str) -> f64 {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let families = trellis_core::telemetry::registry().gather();
    if prometheus::TextEncoder::new()
        .encode(&families, &mut buf)
        .is_err()
    {
        return f64::NAN;
    }
    let region_label = format!("region=\"{region}\"");
    String::from_utf8_lossy(&buf)
        .lines()
        .filter(|l| l.starts_with("trellis_clone_suspicions_total{") && l.contains(&region_label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn connect(
    cluster: &Cluster,
    gateway: usize,
    host: IpAddr,
    identity: &DeviceIdentity,
) -> anyhow::Result<RawDevice> {
    let mut d = RawDevice::connect_from(cluster.gateways[gateway].devices, host, identity).await?;
    d.hello(identity.device_id, [7; 32]).await?;
    Ok(d)
}

/// The device answers a ping: its session is alive.
async fn alive(d: &mut RawDevice) -> anyhow::Result<bool> {
    let id = d.take_id();
    d.send(&message::ping(id)).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match d.recv(Duration::from_secs(5)).await {
            Ok(Some(m)) if m.message_id == id => return Ok(true),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return Ok(false),
        }
    }
    Ok(false)
}

async fn show(cluster: &Cluster, device: &str) -> anyhow::Result<DeviceState> {
    Ok(cluster
        .gateway_client(0)
        .await?
        .get_device_state(GetDeviceStateRequest {
            device_id: device.into(),
        })
        .await?
        .into_inner())
}

fn peer_ips(state: &DeviceState) -> Vec<String> {
    state
        .recent_sessions
        .iter()
        .map(|s| {
            s.peer_addr
                .rsplit_once(':')
                .map(|(ip, _)| ip.to_string())
                .unwrap_or_default()
        })
        .collect()
}

/// The device's first `clone_suspected` audit record, waited for.
async fn clone_record(
    cluster: &Cluster,
    device: &str,
    within: Duration,
) -> anyhow::Result<AuditRecord> {
    eventually(within, "clone_suspected audit record", || async {
        cluster
            .audit(Some(device))
            .await
            .ok()?
            .into_iter()
            .find(|r| r.action == "clone_suspected")
    })
    .await
}

/// One detail of an audit record ("" when absent).
async fn online_at(cluster: &Cluster, device: &str, host: IpAddr) -> anyhow::Result<()> {
    let prefix = format!("{host}:");
    eventually(Duration::from_secs(5), "device online", || async {
        let s = show(cluster, device).await.ok()?;
        (s.online && s.peer_addr.starts_with(&prefix)).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_used_from_two_addresses_is_flagged_and_a_reconnect_is_not() -> anyhow::Result<()> {
    let region = "clones-newest-wins";
    let cluster = cluster(region, ClonePolicy::NewestWins, 300).await?;
    let identity = cluster.provision(1).await?;
    let id = identity.device_id.to_string();

    // A reconnect from the same address is not a clone: once after a clean
    // drop, and once while the old session is still open (a silent drop
    // the gateway has not noticed yet).
    let first = connect(&cluster, 0, HOST_A, &identity).await?;
    online_at(&cluster, &id, HOST_A).await?;
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut stale = connect(&cluster, 0, HOST_A, &identity).await?;
    online_at(&cluster, &id, HOST_A).await?;
    let mut a = connect(&cluster, 0, HOST_A, &identity).await?;
    assert!(
        stale.closed_within(Duration::from_secs(5)).await,
        "the older session from the same address is closed"
    );
    assert!(alive(&mut a).await?, "the reconnected session works");
    let audit = cluster.audit(Some(&id)).await?;
    assert!(
        audit.iter().any(|r| r.action == "duplicate_session"),
        "the overlapping reconnect is audited as a duplicate session"
    );
    assert!(
        !audit.iter().any(|r| r.action == "clone_suspected"),
        "a reconnect from the same address is not flagged: {audit:?}"
    );
    assert_eq!(clone_suspicions(region), 0.0);
    let state = show(&cluster, &id).await?;
    assert!(state.clone_flags.is_empty(), "{:?}", state.clone_flags);
    assert_eq!(
        state.recent_sessions.len(),
        3,
        "{:?}",
        state.recent_sessions
    );

    // The same key from another address, through the other gateway, while
    // the first session is live: a suspected clone.
    let started = Instant::now();
    let mut b = connect(&cluster, 1, HOST_B, &identity).await?;
    let keepalive = Duration::from_secs(KEEPALIVE_SECS);
    let record = clone_record(&cluster, &id, keepalive).await?;
    let detected = started.elapsed();
    eprintln!("clone detected {detected:?} after the second connect");
    assert!(detected < keepalive);
    assert_eq!(record.outcome, "previous_closed");
    let detail = |k: &str| record.detail(k).unwrap_or_default();
    assert!(detail("old_peer").starts_with("127.0.0.2:"), "{record:?}");
    assert!(detail("new_peer").starts_with("127.0.0.3:"), "{record:?}");
    assert_eq!(detail("old_gateway"), cluster.gateways[0].id);
    assert_eq!(detail("new_gateway"), cluster.gateways[1].id);
    assert_eq!(detail("policy"), "newest_wins");
    eventually(keepalive, "clone metric", || async {
        (clone_suspicions(region) == 1.0).then_some(())
    })
    .await?;

    // Newest wins: the older session (other gateway) is closed within a
    // keepalive interval, the newer one keeps working.
    assert!(
        a.closed_within(keepalive).await,
        "the older session must be closed"
    );
    assert!(alive(&mut b).await?, "the newer session works");

    // The operator's view: addresses with time and gateway, and the flag.
    let state = show(&cluster, &id).await?;
    assert_eq!(
        peer_ips(&state),
        ["127.0.0.3", "127.0.0.2", "127.0.0.2", "127.0.0.2"]
    );
    assert_eq!(state.recent_sessions[0].gateway_id, cluster.gateways[1].id);
    assert_eq!(state.recent_sessions[1].gateway_id, cluster.gateways[0].id);
    assert!(state.recent_sessions.iter().all(|s| s.time_ms > 0));
    assert_eq!(state.clone_flags.len(), 1);
    let flag = &state.clone_flags[0];
    assert!(flag.peer_addr.starts_with("127.0.0.3:"), "{flag:?}");
    assert!(flag.other_peer_addr.starts_with("127.0.0.2:"), "{flag:?}");
    assert_eq!(flag.gateway_id, cluster.gateways[1].id);
    assert_eq!(flag.other_gateway_id, cluster.gateways[0].id);
    assert_eq!(flag.action, "newest_wins");
    assert_eq!(state.quarantined_until_ms, 0);

    // The history is a capped list with a TTL.
    let mut redis = cluster.redis().await?;
    let ttl: i64 = redis::cmd("TTL")
        .arg(trellis_core::redis_conn::keys::session_history(&id))
        .query_async(&mut redis)
        .await?;
    assert!(ttl > 0, "history has a TTL ({ttl})");
    for _ in 0..12 {
        drop(b);
        b = connect(&cluster, 1, HOST_B, &identity).await?;
    }
    let state = show(&cluster, &id).await?;
    assert_eq!(
        state.recent_sessions.len(),
        cluster.config.gateway.session_history_len,
        "capped"
    );
    drop(b);
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_closes_both_and_refuses_the_identity_for_a_while() -> anyhow::Result<()> {
    let region = "clones-quarantine";
    let quarantine_secs = 4;
    let cluster = cluster(region, ClonePolicy::Quarantine, quarantine_secs).await?;
    let identity = cluster.provision(1).await?;
    let bystander = cluster.provision(1).await?;
    let id = identity.device_id.to_string();

    let mut other = connect(&cluster, 0, HOST_A, &bystander).await?;
    let mut a = connect(&cluster, 0, HOST_A, &identity).await?;
    online_at(&cluster, &id, HOST_A).await?;
    let started = Instant::now();
    // The clone's handshake completes (the key is genuine), then the
    // gateway closes it, and the first session too.
    let mut b = connect(&cluster, 1, HOST_B, &identity).await?;
    let keepalive = Duration::from_secs(KEEPALIVE_SECS);
    assert!(
        b.closed_within(keepalive).await,
        "the newer session is closed"
    );
    assert!(
        a.closed_within(keepalive).await,
        "the older session is closed"
    );
    eprintln!(
        "both sessions closed {:?} after the second connect",
        started.elapsed()
    );
    let record = eventually(keepalive, "clone_suspected audit record", || async {
        cluster
            .audit(Some(&id))
            .await
            .ok()?
            .into_iter()
            .find(|r| r.action == "clone_suspected")
    })
    .await?;
    assert_eq!(record.outcome, "quarantined");
    assert_eq!(clone_suspicions(region), 1.0);

    // Refused at the handshake from either address, on either gateway,
    // before keyvault signs anything; audited.
    for (gw, host) in [(0, HOST_A), (1, HOST_B)] {
        let r = RawDevice::connect_from(cluster.gateways[gw].devices, host, &identity).await;
        assert!(
            r.is_err(),
            "a quarantined identity is refused at the handshake"
        );
    }
    let counted = cluster.refusals(Some(&id)).await?;
    let refusals: u64 = counted
        .iter()
        .filter(|r| r.action == "open_session" && r.reason == "quarantined")
        .map(|r| r.count)
        .sum();
    assert_eq!(refusals, 2, "{counted:?}");
    let state = show(&cluster, &id).await?;
    assert!(!state.online);
    assert!(state.quarantined_until_ms > trellis_core::time::now_ms());
    assert_eq!(state.clone_flags.len(), 1);
    assert_eq!(state.clone_flags[0].action, "quarantine");

    // Other devices are not affected.
    assert!(alive(&mut other).await?);

    // The quarantine ends by itself.
    tokio::time::sleep(Duration::from_secs(quarantine_secs)).await;
    let mut back = eventually(Duration::from_secs(5), "quarantine over", || async {
        connect(&cluster, 0, HOST_A, &identity).await.ok()
    })
    .await?;
    assert!(alive(&mut back).await?);
    cluster.stop().await;
    Ok(())
}

/// The same key in session in two regions from two addresses: the older
/// region's gateway sees the newer claim at its next ownership refresh
/// (half a keepalive), flags a suspected clone and closes its session. A
/// device that fails over from the same address is not flagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_in_another_region_is_flagged_within_one_keepalive() -> anyhow::Result<()> {
    let region = "clones-cross-a";
    let cluster = Cluster::start_configured(1, |c| {
        c.region = region.into();
        c.gateway.keepalive_secs = 4;
    })
    .await?;
    let (gw_b, _regional_b, stop_b) = cluster.gateway_in_region("clones-cross-b").await?;
    let keepalive = Duration::from_secs(4);

    // Failover from the same address: superseded, not a clone.
    let mover = cluster.provision(1).await?;
    let mover_id = mover.device_id.to_string();
    let mut in_a = connect(&cluster, 0, HOST_A, &mover).await?;
    online_at(&cluster, &mover_id, HOST_A).await?;
    let mut in_b = RawDevice::connect_from(gw_b, HOST_A, &mover).await?;
    in_b.hello(mover.device_id, [7; 32]).await?;
    assert!(
        in_a.closed_within(keepalive).await,
        "region A closes the session region B took over"
    );
    assert!(alive(&mut in_b).await?);
    let audit = cluster.audit(Some(&mover_id)).await?;
    assert!(
        audit.iter().any(|r| r.action == "session_superseded"),
        "{audit:?}"
    );
    assert!(
        !audit.iter().any(|r| r.action == "clone_suspected"),
        "a failover from the same address is not a clone: {audit:?}"
    );

    // The same key from another address in the other region: a clone.
    let identity = cluster.provision(1).await?;
    let id = identity.device_id.to_string();
    let mut original = connect(&cluster, 0, HOST_A, &identity).await?;
    online_at(&cluster, &id, HOST_A).await?;
    let started = Instant::now();
    let mut clone = RawDevice::connect_from(gw_b, HOST_B, &identity).await?;
    clone.hello(identity.device_id, [7; 32]).await?;
    let record = clone_record(&cluster, &id, keepalive).await?;
    eprintln!(
        "cross-region clone detected {:?} after the second connect",
        started.elapsed()
    );
    assert!(started.elapsed() < keepalive);
    let detail = |k: &str| record.detail(k).unwrap_or_default();
    assert_eq!(detail("scope"), "cross_region");
    assert_eq!(detail("old_region"), region);
    assert_eq!(detail("new_region"), "clones-cross-b");
    assert!(detail("old_peer").starts_with("127.0.0.2:"), "{record:?}");
    assert!(detail("new_peer").starts_with("127.0.0.3:"), "{record:?}");
    assert!(
        original.closed_within(keepalive).await,
        "the older session is closed"
    );
    assert!(
        alive(&mut clone).await?,
        "newest wins: the newer session goes on"
    );
    let state = show(&cluster, &id).await?;
    assert_eq!(state.clone_flags.len(), 1, "{:?}", state.clone_flags);
    assert_eq!(clone_suspicions(region), 1.0);
    drop(stop_b);
    cluster.stop().await;
    Ok(())
}
