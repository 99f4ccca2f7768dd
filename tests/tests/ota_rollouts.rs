//! Signed firmware end to end: real Redis, keyvault, signer, scheduler and
//! gateways on loopback, simulated devices that verify what they are sent
//! against the trust policy they were provisioned with.
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::Channel;
use trellis_proto::v1::device_service_client::DeviceServiceClient;
use trellis_proto::v1::*;
use trellis_tests::Cluster;
use trellis_tests::ota::*;

const PRODUCT: u32 = 7;

fn stage(name: &str, device_count: u32, percent: u32) -> Stage {
    Stage {
        name: name.into(),
        device_count,
        percent,
        soak_secs: 0,
        min_success_ratio: 0.9,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_devices_take_a_dual_signed_release_in_stages() -> anyhow::Result<()> {
    let (cluster, stack) = Cluster::start_with_ota(2, |_| {}).await?;
    let keys = ReleaseKeys::provision(&cluster, &stack, &[PRODUCT]).await?;
    let config = device_config(PRODUCT, 1, &keys.policy);
    // Half the fleet on each gateway: the scheduler delivers through the
    // first, so half the deliveries cross gateways through Redis.
    let g = |n: usize| cluster.gateways[n].devices.to_string();
    let a = Fleet::start(&cluster, 25, PRODUCT, config.clone(), vec![g(0), g(1)]).await?;
    let b = Fleet::start(&cluster, 25, PRODUCT, config, vec![g(1), g(0)]).await?;
    let ids: Vec<String> = a.ids().into_iter().chain(b.ids()).collect();
    all_online(&cluster, &ids, Duration::from_secs(60)).await?;

    let image = test_image(PRODUCT, 2, 64 * 1024);
    let (release, sha) = make_release(&stack, &keys, PRODUCT, 2, &image, Signers::Both).await?;
    let mut ota = stack.ota_client().await?;
    let created = ota
        .create_rollout(CreateRolloutRequest {
            release_id: release.clone(),
            target: Some(RolloutTarget {
                product_id: PRODUCT,
                device_ids: vec![],
                percent: 0,
                tag: String::new(),
            }),
            stages: vec![
                stage("canary", 2, 0),
                stage("half", 0, 50),
                stage("all", 0, 100),
            ],
            max_failure_ratio: 0.1,
            max_concurrent: 10,
            apply_timeout_secs: 60,
            ..Default::default()
        })
        .await?
        .into_inner();
    let sizes: Vec<u32> = created.stages.iter().map(|s| s.devices).collect();
    assert_eq!(sizes, vec![2, 23, 25], "stage sizes are cumulative shares");

    // While it runs: no device of a later stage is touched before every
    // device of the earlier stages has applied the release.
    let started = std::time::Instant::now();
    let done = loop {
        let s = ota
            .get_rollout(GetRolloutRequest {
                rollout_id: created.rollout_id.clone(),
            })
            .await?
            .into_inner();
        for d in &s.devices {
            if d.state() == DeviceUpdateState::Pending {
                continue;
            }
            for earlier in s.devices.iter().filter(|e| e.stage < d.stage) {
                assert_eq!(
                    earlier.state(),
                    DeviceUpdateState::Applied,
                    "{} of stage {} started while {} of stage {} was {:?}",
                    d.device_id,
                    d.stage,
                    earlier.device_id,
                    earlier.stage,
                    earlier.state()
                );
            }
        }
        match s.state() {
            RolloutState::Completed => break s,
            RolloutState::Running => {}
            other => panic!("rollout ended {other:?}: {}", s.message),
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "rollout not complete: {:?}",
            s.stages
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done.devices.len(), 50);
    for d in &done.devices {
        assert_eq!(d.state(), DeviceUpdateState::Applied, "{}", d.device_id);
        assert_eq!(d.attempts, 1, "{} delivered more than once", d.device_id);
    }
    // Applied means the device came back reporting the release's SHA-256.
    let states = device_states(&cluster).await?;
    for id in &ids {
        let st = states
            .iter()
            .find(|s| &s.device_id == id)
            .unwrap_or_else(|| panic!("{id} is not online"));
        assert_eq!(st.firmware_sha256, sha, "{id} runs another image");
        assert_eq!(st.firmware_version, 2, "{id}");
        let fleet = if a.ids().contains(id) { &a } else { &b };
        assert_eq!(fleet.applied_count(id), 1, "{id} applied more than once");
    }
    a.stop().await;
    b.stop().await;
    stack.stop().await;
    cluster.stop().await;
    Ok(())
}

async fn deliver(
    gw: &mut DeviceServiceClient<Channel>,
    device: &str,
    release: &str,
) -> anyhow::Result<DeliverUpdateResponse> {
    Ok(gw
        .deliver_update(DeliverUpdateRequest {
            device_id: device.to_string(),
            release_id: release.to_string(),
            rollout_id: String::new(),
            timeout_ms: 60_000,
        })
        .await?
        .into_inner())
}

/// `trellis/ota/rejected` events so far, by device: the reason codes.
async fn rejection_events(
    gw: &mut DeviceServiceClient<Channel>,
) -> anyhow::Result<HashMap<String, Vec<String>>> {
    let mut stream = gw
        .stream_events(StreamEventsRequest {
            device_id: String::new(),
            prefix: trellis_firmware::REJECTED_EVENT.into(),
            from_start: true,
        })
        .await?
        .into_inner();
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    while let Ok(Ok(Some(e))) =
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await
    {
        if let Some((code, _)) = trellis_firmware::parse_rejection_event(&e.data) {
            out.entry(e.device_id).or_default().push(code);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_refuses_what_it_must_and_a_failing_rollout_aborts() -> anyhow::Result<()> {
    let (cluster, stack) = Cluster::start_with_ota(1, |_| {}).await?;
    let keys = ReleaseKeys::provision(&cluster, &stack, &[PRODUCT, PRODUCT + 1]).await?;
    // The devices run version 3: anything at or below it is a rollback.
    let config = device_config(PRODUCT, 3, &keys.policy);
    let gw_addr = cluster.gateways[0].devices.to_string();
    let fleet = Fleet::start(&cluster, 12, PRODUCT, config.clone(), vec![gw_addr]).await?;
    let ids = fleet.ids();
    // One more device behind a proxy that alters two firmware chunks.
    let proxy = Proxy::start(cluster.gateways[0].devices, ProxyMode::TamperChunks(2)).await?;
    let tampered = Fleet::start(&cluster, 1, PRODUCT, config, vec![proxy.addr.to_string()]).await?;
    let mut all = ids.clone();
    all.extend(tampered.ids());
    all_online(&cluster, &all, Duration::from_secs(60)).await?;
    let old_sha = device_states(&cluster)
        .await?
        .into_iter()
        .find(|s| s.device_id == ids[0])
        .map(|s| s.firmware_sha256)
        .unwrap_or_default();
    assert_eq!(old_sha.len(), 64, "devices report their image SHA-256");

    let size = 16 * 1024;
    let mut made = Vec::new();
    for (product, version, signers) in [
        (PRODUCT, 4, Signers::CloudOnly),
        (PRODUCT + 1, 4, Signers::Both),
        (PRODUCT, 2, Signers::Both),
        (PRODUCT, 5, Signers::Both),
    ] {
        let image = test_image(product, version, size);
        made.push(make_release(&stack, &keys, product, version, &image, signers).await?);
    }
    let [cloud_only, other_product, rollback, altered] = made
        .iter()
        .map(|(release, _)| release.clone())
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| anyhow::anyhow!("four releases"))?;
    let altered_sha = made[3].1.clone();
    // Someone with access to storage swaps bytes of the signed image.
    {
        use redis::AsyncCommands;
        let mut r = cluster.redis().await?;
        let key = format!("trellis:image:{altered_sha}");
        let mut bytes: Vec<u8> = r.get(&key).await?;
        assert_eq!(bytes.len(), size, "the image is stored under {key}");
        bytes[size / 2] ^= 0xff;
        let () = r.set(&key, bytes).await?;
    }

    let mut gw = cluster.gateway_client(0).await?;
    let cases = [
        (&cloud_only, "insufficient_signatures"),
        (&other_product, "wrong_product"),
        (&rollback, "rollback"),
        (&altered, "hash_mismatch"),
    ];
    for (n, (release, reason)) in cases.iter().enumerate() {
        let r = deliver(&mut gw, &ids[n], release).await?;
        assert_eq!(
            r.outcome(),
            DeliveryOutcome::Rejected,
            "{release}: {}",
            r.message
        );
        assert_eq!(&r.reason, reason, "{release}: {}", r.message);
    }
    // Each refusal was also reported by the device as an event, and every
    // device still runs its old image.
    let events = trellis_tests::eventually(Duration::from_secs(10), "rejection events", || {
        let mut gw = gw.clone();
        async move {
            let e = rejection_events(&mut gw).await.ok()?;
            (e.len() >= cases.len()).then_some(e)
        }
    })
    .await?;
    for (n, (_, reason)) in cases.iter().enumerate() {
        assert_eq!(
            events.get(&ids[n]).map(|v| v.as_slice()),
            Some(&[reason.to_string()][..]),
            "event of {}",
            ids[n]
        );
    }
    let states = device_states(&cluster).await?;
    for id in &ids {
        let st = states.iter().find(|s| &s.device_id == id);
        assert_eq!(
            st.map(|s| s.firmware_sha256.as_str()),
            Some(old_sha.as_str()),
            "{id} kept its image"
        );
    }

    // Chunks altered in flight are caught by their CRC, asked for again,
    // and the update still completes.
    let (good, good_sha) = make_release(
        &stack,
        &keys,
        PRODUCT,
        6,
        &test_image(PRODUCT, 6, 64 * 1024),
        Signers::Both,
    )
    .await?;
    let victim = tampered.ids()[0].clone();
    let r = deliver(&mut gw, &victim, &good).await?;
    assert_eq!(r.outcome(), DeliveryOutcome::Sent, "{}", r.message);
    assert_eq!(proxy.tampered.load(std::sync::atomic::Ordering::Relaxed), 2);
    trellis_tests::eventually(Duration::from_secs(20), "tampered device updated", || {
        let cluster = &cluster;
        let (victim, good_sha) = (&victim, &good_sha);
        async move {
            let s = device_states(cluster).await.ok()?;
            s.iter()
                .any(|d| &d.device_id == victim && &d.firmware_sha256 == good_sha)
                .then_some(())
        }
    })
    .await?;

    // A rollout of the cloud-only release (the "cloud breached" case):
    // the canary refuses it, the failure ratio aborts the rollout, and no
    // device past the canary is touched.
    let mut ota = stack.ota_client().await?;
    let created = ota
        .create_rollout(CreateRolloutRequest {
            release_id: cloud_only.clone(),
            target: Some(RolloutTarget {
                product_id: PRODUCT,
                device_ids: ids.clone(),
                percent: 0,
                tag: String::new(),
            }),
            stages: vec![
                stage("canary", 3, 0),
                stage("half", 0, 50),
                stage("all", 0, 100),
            ],
            max_failure_ratio: 0.3,
            max_concurrent: 3,
            ..Default::default()
        })
        .await?
        .into_inner();
    let end = rollout_until(
        &stack,
        &created.rollout_id,
        &[RolloutState::Aborted, RolloutState::Completed],
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(end.state(), RolloutState::Aborted, "{}", end.message);
    for d in &end.devices {
        if d.stage == 0 {
            assert!(
                matches!(
                    d.state(),
                    DeviceUpdateState::RejectedByDevice | DeviceUpdateState::Skipped
                ),
                "canary {} is {:?}",
                d.device_id,
                d.state()
            );
        } else {
            assert_eq!(d.attempts, 0, "{} past the canary was touched", d.device_id);
            assert!(
                matches!(
                    d.state(),
                    DeviceUpdateState::Pending | DeviceUpdateState::Skipped
                ),
                "{} past the canary is {:?}",
                d.device_id,
                d.state()
            );
        }
    }
    let rejected = end
        .devices
        .iter()
        .filter(|d| d.state() == DeviceUpdateState::RejectedByDevice)
        .collect::<Vec<_>>();
    assert!(!rejected.is_empty(), "the canary refused");
    for d in rejected {
        assert!(
            d.reason.contains("insufficient_signatures"),
            "{}: {}",
            d.device_id,
            d.reason
        );
    }
    let states = device_states(&cluster).await?;
    for id in &ids {
        let st = states.iter().find(|s| &s.device_id == id);
        assert_eq!(
            st.map(|s| s.firmware_sha256.as_str()),
            Some(old_sha.as_str()),
            "{id} kept its image"
        );
    }
    fleet.stop().await;
    tampered.stop().await;
    drop(proxy);
    stack.stop().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_scheduler_carries_on_and_updates_no_device_twice() -> anyhow::Result<()> {
    let (cluster, mut stack) = Cluster::start_with_ota(1, |_| {}).await?;
    let keys = ReleaseKeys::provision(&cluster, &stack, &[PRODUCT]).await?;
    let config = device_config(PRODUCT, 1, &keys.policy);
    let gw_addr = cluster.gateways[0].devices.to_string();
    let fleet = Fleet::start(&cluster, 20, PRODUCT, config, vec![gw_addr]).await?;
    let ids = fleet.ids();
    all_online(&cluster, &ids, Duration::from_secs(60)).await?;
    let (release, _) = make_release(
        &stack,
        &keys,
        PRODUCT,
        2,
        &test_image(PRODUCT, 2, 32 * 1024),
        Signers::Both,
    )
    .await?;
    let mut ota = stack.ota_client().await?;
    let created = ota
        .create_rollout(CreateRolloutRequest {
            release_id: release,
            target: Some(RolloutTarget {
                product_id: PRODUCT,
                device_ids: ids.clone(),
                percent: 0,
                tag: String::new(),
            }),
            stages: vec![stage("all", 0, 100)],
            max_failure_ratio: 0.2,
            max_concurrent: 2,
            apply_timeout_secs: 60,
            ..Default::default()
        })
        .await?
        .into_inner();
    // Stop the scheduler once some, but not all, devices are done.
    let rollout_id = created.rollout_id.clone();
    trellis_tests::eventually(Duration::from_secs(60), "some devices applied", || {
        let mut ota = ota.clone();
        let rollout_id = rollout_id.clone();
        async move {
            let s = ota
                .get_rollout(GetRolloutRequest { rollout_id })
                .await
                .ok()?
                .into_inner();
            let applied = s.stages.first()?.applied;
            (applied >= 3).then_some(())
        }
    })
    .await?;
    stack.stop_ota().await;
    let mid = {
        let mut r = cluster.redis().await?;
        let _: () = redis::cmd("PING").query_async(&mut r).await?;
        fleet.reports.lock().map(|v| v.len()).unwrap_or(0)
    };
    assert!(mid > 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.start_ota().await?;
    let end = rollout_until(
        &stack,
        &created.rollout_id,
        &[RolloutState::Completed, RolloutState::Aborted],
        Duration::from_secs(90),
    )
    .await?;
    assert_eq!(end.state(), RolloutState::Completed, "{}", end.message);
    for id in &ids {
        assert_eq!(fleet.applied_count(id), 1, "{id} applied the update once");
    }
    for d in &end.devices {
        assert_eq!(d.state(), DeviceUpdateState::Applied, "{}", d.device_id);
    }
    fleet.stop().await;
    stack.stop().await;
    cluster.stop().await;
    Ok(())
}

/// `gateway.ota_chunk_size`: the gateway announces larger chunks in
/// UpdateBegin, the devices take the size from there, and an image that is
/// not a whole number of chunks arrives whole (SHA-256 checked on the
/// device). A size whose frame cannot fit is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn larger_chunks_are_announced_and_taken() -> anyhow::Result<()> {
    let (cluster, stack) = Cluster::start_with_ota(1, |c| c.gateway.ota_chunk_size = 2048).await?;
    let keys = ReleaseKeys::provision(&cluster, &stack, &[PRODUCT]).await?;
    let config = device_config(PRODUCT, 1, &keys.policy);
    let gw_addr = cluster.gateways[0].devices.to_string();
    let fleet = Fleet::start(&cluster, 3, PRODUCT, config, vec![gw_addr]).await?;
    let ids = fleet.ids();
    all_online(&cluster, &ids, Duration::from_secs(30)).await?;
    let image = test_image(PRODUCT, 2, 3 * 2048 * 5 + 123);
    let (release, sha) = make_release(&stack, &keys, PRODUCT, 2, &image, Signers::Both).await?;
    let mut gw = cluster.gateway_client(0).await?;
    for id in &ids {
        let r = deliver(&mut gw, id, &release).await?;
        assert_eq!(r.outcome(), DeliveryOutcome::Sent, "{id}: {r:?}");
        assert_eq!(r.bytes_sent, image.len() as u64, "{id}: {r:?}");
    }
    trellis_tests::eventually(
        Duration::from_secs(30),
        "every device runs the image",
        || async {
            let states = device_states(&cluster).await.ok()?;
            ids.iter()
                .all(|id| {
                    states
                        .iter()
                        .any(|s| &s.device_id == id && s.online && s.firmware_sha256 == sha)
                })
                .then_some(())
        },
    )
    .await?;
    fleet.stop().await;
    stack.stop().await;
    cluster.stop().await;

    // 4,000-byte chunks cannot fit in a 4,096-byte frame with their framing.
    let redis = trellis_core::local_redis::LocalRedis::start(
        trellis_core::local_redis::RedisData::Ephemeral,
    )?;
    let mut bad = trellis_tests::test_config(&redis.url());
    bad.gateway.ota_chunk_size = 4000;
    let devices = trellis_gateway::bind_device_listener("127.0.0.1:0").await?;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (_trigger, shutdown) = trellis_core::shutdown::Shutdown::new();
    let err = trellis_gateway::serve_with_listeners(bad, devices, grpc, shutdown)
        .await
        .expect_err("a chunk size whose frame cannot fit is refused");
    assert!(err.to_string().contains("gateway.ota_chunk_size"), "{err}");
    Ok(())
}
