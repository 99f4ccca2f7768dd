//! Trust policy rotation end to end (docs/protocol.md §7.5): real Redis,
//! keyvault, signer, scheduler and gateways on loopback, simulated devices
//! that judge every signed policy against the policy they hold, keys made at
//! test time.
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;
use trellis_device::sim::DeviceReport;
use trellis_firmware::{TrustPolicy, TrustedKey, sign_manifest, sign_policy};
use trellis_proto::v1::*;
use trellis_records::policy_release::{PolicyReleaseRecord, make_policy_release_id};
use trellis_tests::Cluster;
use trellis_tests::ota::*;

const PRODUCT: u32 = 11;

fn stage(name: &str, device_count: u32, percent: u32, soak_secs: u32) -> Stage {
    Stage {
        name: name.into(),
        device_count,
        percent,
        soak_secs,
        min_success_ratio: 0.9,
    }
}

async fn new_key() -> anyhow::Result<rsa::PrivateKey> {
    Ok(tokio::task::spawn_blocking(|| rsa::PrivateKey::new(&mut rand::rng(), 2048)).await??)
}

/// A directory for the devices' persisted state, removed on drop.
struct StateDir(PathBuf);

impl StateDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "trellis-policy-test-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        Self(dir)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn policy_reports(fleet: &Fleet) -> (HashSet<String>, Vec<(String, String)>) {
    let reports = fleet.reports.lock().map(|v| v.clone()).unwrap_or_default();
    let mut accepted = HashSet::new();
    let mut rejected = Vec::new();
    for r in reports {
        match r {
            DeviceReport::PolicyAccepted { device_id, .. } => {
                accepted.insert(device_id.to_string());
            }
            DeviceReport::PolicyRejected {
                device_id,
                reason_code,
                ..
            } => rejected.push((device_id.to_string(), reason_code)),
            _ => {}
        }
    }
    (accepted, rejected)
}

/// The policy reports once `settled` holds for them. A device sends its
/// answer before it records the report, so a test that has just seen the
/// answer waits for the report rather than racing it. After 10 s it returns
/// what there is, for the caller's assertion to show.
async fn policy_reports_once(
    fleet: &Fleet,
    settled: impl Fn(&HashSet<String>, &[(String, String)]) -> bool,
) -> (HashSet<String>, Vec<(String, String)>) {
    trellis_tests::eventually(Duration::from_secs(10), "policy reports", || async {
        let (accepted, rejected) = policy_reports(fleet);
        settled(&accepted, &rejected).then_some((accepted, rejected))
    })
    .await
    .unwrap_or_else(|_| policy_reports(fleet))
}

/// The policy each online device reports (version, sha256 hex).
async fn reported_policies(
    cluster: &Cluster,
    ids: &[String],
) -> anyhow::Result<Vec<(String, u64, String)>> {
    let states = device_states(cluster).await?;
    Ok(ids
        .iter()
        .map(|id| {
            let s = states.iter().find(|s| &s.device_id == id);
            (
                id.clone(),
                s.map_or(0, |s| s.trust_policy_version),
                s.map(|s| s.trust_policy_sha256.clone()).unwrap_or_default(),
            )
        })
        .collect())
}

/// A release of `version` signed with `keys` (customer and cloud), rolled
/// out to everyone: it completes and every device in `ids` runs it. The
/// image's SHA-256 (hex).
async fn install_everywhere(
    cluster: &Cluster,
    stack: &OtaStack,
    keys: &ReleaseKeys,
    version: u32,
    ids: &[String],
) -> anyhow::Result<String> {
    let image = test_image(PRODUCT, version, 16 * 1024);
    let (release, sha) = make_release(stack, keys, PRODUCT, version, &image, Signers::Both).await?;
    let r = stack
        .ota_client()
        .await?
        .create_rollout(CreateRolloutRequest {
            release_id: release,
            stages: vec![stage("all", 0, 100, 0)],
            max_failure_ratio: 0.5,
            max_concurrent: 10,
            apply_timeout_secs: 60,
            ..Default::default()
        })
        .await?
        .into_inner();
    let done = rollout_until(
        stack,
        &r.rollout_id,
        &[RolloutState::Completed, RolloutState::Aborted],
        Duration::from_secs(120),
    )
    .await?;
    assert_eq!(done.state(), RolloutState::Completed, "{}", done.message);
    let states = device_states(cluster).await?;
    for id in ids {
        let st = states.iter().find(|s| &s.device_id == id);
        assert_eq!(
            st.map(|s| s.firmware_sha256.as_str()),
            Some(sha.as_str()),
            "{id}"
        );
    }
    Ok(sha)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_devices_rotate_to_a_new_customer_key_through_a_rollout() -> anyhow::Result<()> {
    let (cluster, stack) = Cluster::start_with_ota(2, |_| {}).await?;
    let keys = ReleaseKeys::provision(&cluster, &stack, &[PRODUCT]).await?;
    let state = StateDir::new();
    let mut config = device_config(PRODUCT, 1, &keys.policy);
    config.state_dir = Some(state.0.clone());
    let g = |n: usize| cluster.gateways[n].devices.to_string();
    let fleet = Fleet::start(&cluster, 20, PRODUCT, config.clone(), vec![g(0), g(1)]).await?;
    let ids = fleet.ids();
    all_online(&cluster, &ids, Duration::from_secs(60)).await?;
    // Every Hello announces policy version 1 and its hash (extension 0x04).
    let v1_sha = hex::encode(keys.policy.sha256());
    trellis_tests::eventually(Duration::from_secs(10), "v1 reported", || async {
        let r = reported_policies(&cluster, &ids).await.ok()?;
        r.iter()
            .all(|(_, v, s)| *v == 1 && *s == v1_sha)
            .then_some(())
    })
    .await?;

    // The customer rotates its offline key: new customer + cloud, 2 of 2.
    let new_customer = new_key().await?;
    let cloud = trellis_firmware::public_key_from_pem(&keys.cloud_pem)?;
    let new_policy = TrustPolicy::new(
        vec![
            TrustedKey::new("customer-2027", new_customer.to_public_key())?,
            TrustedKey::new("cloud-release", cloud)?,
        ],
        2,
    )?;
    // No "version" in the file: the signer makes it the current one + 1.
    let mut json: serde_json::Value = serde_json::from_str(&new_policy.to_json()?)?;
    json.as_object_mut().map(|o| o.remove("version"));
    let mut signer = stack.signer_client().await?;
    let created = signer
        .create_policy_release(CreatePolicyReleaseRequest {
            product_id: PRODUCT,
            policy_json: json.to_string(),
            allow_cloud_only: false,
        })
        .await?
        .into_inner();
    assert_eq!(created.release_id, format!("tp-{PRODUCT}-2"));
    assert_eq!((created.version, created.previous_version), (2, 1));
    assert!(!created.complete);
    let missing_now = created.under_current.clone().unwrap_or_default().missing;
    assert_eq!(missing_now, vec!["customer", "cloud-release"]);
    let missing_new = created.under_new.clone().unwrap_or_default().missing;
    assert_eq!(missing_new, vec!["customer-2027", "cloud-release"]);

    // An incomplete rotation cannot be rolled out.
    let mut ota = stack.ota_client().await?;
    let refused = ota
        .create_rollout(CreateRolloutRequest {
            release_id: created.release_id.clone(),
            stages: vec![stage("all", 0, 100, 0)],
            ..Default::default()
        })
        .await
        .expect_err("an incomplete policy release is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");

    // Signatures: the old customer key and the new one, locally; the cloud
    // through keyvault.
    let bytes = created.signed.clone().unwrap_or_default().policy;
    for key in [&keys.customer, &new_customer] {
        signer
            .add_policy_signature(AddSignatureRequest {
                release_id: created.release_id.clone(),
                signature: Some(sign_policy(key, &bytes)?),
            })
            .await?;
    }
    let signed = signer
        .sign_policy_release(SignReleaseRequest {
            release_id: created.release_id.clone(),
        })
        .await?
        .into_inner();
    assert!(signed.complete, "{signed:?}");
    // The signer's policy for the product advanced.
    let current = signer
        .get_policy(GetPolicyRequest {
            product_id: PRODUCT,
        })
        .await?
        .into_inner();
    assert_eq!(current.version, 2);

    // Staged: a canary of 2 that soaks for an hour, aborted while it soaks.
    let canary = ota
        .create_rollout(CreateRolloutRequest {
            release_id: created.release_id.clone(),
            stages: vec![stage("canary", 2, 0, 3600), stage("all", 0, 100, 0)],
            max_failure_ratio: 0.1,
            max_concurrent: 10,
            apply_timeout_secs: 60,
            ..Default::default()
        })
        .await?
        .into_inner();
    let canary_ids: Vec<String> =
        trellis_tests::eventually(Duration::from_secs(60), "canary applied", || async {
            let s = stack
                .ota_client()
                .await
                .ok()?
                .get_rollout(GetRolloutRequest {
                    rollout_id: canary.rollout_id.clone(),
                })
                .await
                .ok()?
                .into_inner();
            let first: Vec<_> = s.devices.iter().filter(|d| d.stage == 0).collect();
            first
                .iter()
                .all(|d| d.state() == DeviceUpdateState::Applied)
                .then(|| first.iter().map(|d| d.device_id.clone()).collect())
        })
        .await?;
    assert_eq!(canary_ids.len(), 2);
    ota.abort_rollout(RolloutAction {
        rollout_id: canary.rollout_id.clone(),
        reason: "test: stop after the canary".into(),
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let aborted = ota
        .get_rollout(GetRolloutRequest {
            rollout_id: canary.rollout_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(aborted.state(), RolloutState::Aborted);
    for d in aborted.devices.iter().filter(|d| d.stage > 0) {
        assert_ne!(d.state(), DeviceUpdateState::Applied, "{}", d.device_id);
        assert_ne!(d.state(), DeviceUpdateState::Delivering, "{}", d.device_id);
    }
    let (accepted, _) = policy_reports(&fleet);
    assert_eq!(
        accepted,
        canary_ids.iter().cloned().collect::<HashSet<_>>(),
        "only the canary took the policy"
    );
    for (id, v, _) in reported_policies(&cluster, &ids).await? {
        assert_eq!(v, if canary_ids.contains(&id) { 2 } else { 1 }, "{id}");
    }

    // The whole fleet now: the canary counts as done already.
    let all = ota
        .create_rollout(CreateRolloutRequest {
            release_id: created.release_id.clone(),
            stages: vec![stage("all", 0, 100, 0)],
            max_failure_ratio: 0.1,
            max_concurrent: 10,
            apply_timeout_secs: 60,
            ..Default::default()
        })
        .await?
        .into_inner();
    let done = rollout_until(
        &stack,
        &all.rollout_id,
        &[
            RolloutState::Completed,
            RolloutState::Aborted,
            RolloutState::Paused,
        ],
        Duration::from_secs(90),
    )
    .await?;
    assert_eq!(done.state(), RolloutState::Completed, "{}", done.message);
    assert_eq!(done.devices.len(), 20);
    for d in &done.devices {
        assert_eq!(
            d.state(),
            DeviceUpdateState::Applied,
            "{}: {}",
            d.device_id,
            d.reason
        );
    }
    let (accepted, rejected) = policy_reports_once(&fleet, |a, _| a.len() >= 20).await;
    assert_eq!(accepted.len(), 20, "every device accepted once");
    assert!(rejected.is_empty(), "{rejected:?}");

    // Restarted with only the provisioned (v1) policy.json, the devices use
    // the policy they persisted: their Hello says version 2.
    let devices = fleet.devices.clone();
    fleet.stop().await;
    let fleet = Fleet::run(devices, config, vec![g(1), g(0)]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    all_online(&cluster, &ids, Duration::from_secs(60)).await?;
    let v2_sha = signed.policy_sha256.clone();
    trellis_tests::eventually(
        Duration::from_secs(20),
        "v2 reported after restart",
        || async {
            let r = reported_policies(&cluster, &ids).await.ok()?;
            r.iter()
                .all(|(_, v, s)| *v == 2 && *s == v2_sha)
                .then_some(())
        },
    )
    .await?;

    // A release signed with the new customer key (and the cloud, the new
    // threshold) installs everywhere.
    let rotated = ReleaseKeys {
        customer: new_customer,
        cloud_pem: keys.cloud_pem.clone(),
        policy: new_policy,
    };
    let sha = install_everywhere(&cluster, &stack, &rotated, 2, &ids).await?;

    // One signed with the OLD customer key (and the cloud) only: the signer
    // no longer takes that signature, so it is written straight into the
    // record, as a compromised signer could. Every device refuses it.
    let image3 = test_image(PRODUCT, 3, 16 * 1024);
    let (release3, _) =
        make_release(&stack, &keys, PRODUCT, 3, &image3, Signers::CloudOnly).await?;
    let mut redis = cluster.redis().await?;
    let mut record = trellis_records::release::get_release(&mut redis, &release3)
        .await?
        .ok_or_else(|| anyhow::anyhow!("release {release3} not stored"))?;
    record
        .signatures
        .push(sign_manifest(&keys.customer, &record.manifest)?);
    let _: () = redis::AsyncCommands::hset(
        &mut redis,
        trellis_core::redis_conn::keys::release(&release3),
        "signatures",
        trellis_records::release::signatures_json(&record.signatures)?,
    )
    .await?;
    let r = ota
        .create_rollout(CreateRolloutRequest {
            release_id: release3,
            stages: vec![stage("all", 0, 100, 0)],
            max_failure_ratio: 1.0,
            max_concurrent: 10,
            apply_timeout_secs: 60,
            ..Default::default()
        })
        .await?
        .into_inner();
    let done = trellis_tests::eventually(Duration::from_secs(90), "all refused", || async {
        let s = stack
            .ota_client()
            .await
            .ok()?
            .get_rollout(GetRolloutRequest {
                rollout_id: r.rollout_id.clone(),
            })
            .await
            .ok()?
            .into_inner();
        s.devices
            .iter()
            .all(|d| d.state() == DeviceUpdateState::RejectedByDevice)
            .then_some(s)
    })
    .await?;
    for d in &done.devices {
        assert!(
            d.reason.starts_with("unknown_key"),
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
            Some(sha.as_str()),
            "{id} kept v2"
        );
    }
    fleet.stop().await;
    stack.stop().await;
    cluster.stop().await;
    Ok(())
}

/// A policy release written straight into Redis (as a compromised or buggy
/// signer could), signed by `by`.
async fn forge(
    cluster: &Cluster,
    policy: &TrustPolicy,
    previous: &TrustPolicy,
    by: &[&rsa::PrivateKey],
    tag: u32,
) -> anyhow::Result<String> {
    let bytes = policy.canonical_bytes()?;
    let signatures = by
        .iter()
        .map(|k| sign_policy(k, &bytes))
        .collect::<Result<Vec<_>, _>>()?;
    // Product `tag` keeps each forged record's id apart.
    let record = PolicyReleaseRecord {
        release_id: make_policy_release_id(tag, policy.version()),
        product_id: PRODUCT,
        version: policy.version(),
        organization: String::new(),
        policy: bytes,
        signatures,
        previous_version: previous.version(),
        previous_sha256: hex::encode(previous.sha256()),
        previous_policy: previous.canonical_bytes()?,
        created_at_ms: 0,
    };
    let mut redis = cluster.redis().await?;
    assert!(trellis_signer::store::create_policy_release(&mut redis, &record).await?);
    Ok(record.release_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policies_that_break_the_rule_are_refused_by_every_device_with_the_reason()
-> anyhow::Result<()> {
    let (cluster, stack) = Cluster::start_with_ota(1, |_| {}).await?;
    let keys = ReleaseKeys::provision(&cluster, &stack, &[PRODUCT]).await?;
    // The devices hold version 5 of (customer, cloud), 2 of 2.
    let current = keys.policy.clone().with_version(5);
    let config = device_config(PRODUCT, 1, &current);
    let fleet = Fleet::start(
        &cluster,
        20,
        PRODUCT,
        config,
        vec![cluster.gateways[0].devices.to_string()],
    )
    .await?;
    let ids = fleet.ids();
    all_online(&cluster, &ids, Duration::from_secs(60)).await?;

    let new_customer = new_key().await?;
    let other = new_key().await?;
    let cloud = trellis_firmware::public_key_from_pem(&keys.cloud_pem)?;
    let rotated = |version: u64| -> anyhow::Result<TrustPolicy> {
        Ok(TrustPolicy::new(
            vec![
                TrustedKey::new("customer-2027", new_customer.to_public_key())?,
                TrustedKey::new("cloud-release", cloud.clone())?,
            ],
            2,
        )?
        .with_version(version))
    };
    let only_new = TrustPolicy::new(
        vec![
            TrustedKey::new("customer-2027", new_customer.to_public_key())?,
            TrustedKey::new("other", other.to_public_key())?,
        ],
        2,
    )?
    .with_version(6);
    // The cloud's signatures are keyvault's: it signs the bytes of a stored
    // policy release (forge stores them first).

    let mut cases: Vec<(&str, String, &str)> = Vec::new();
    // Signed only by new keys the devices do not know.
    cases.push((
        "only the new keys",
        forge(&cluster, &only_new, &current, &[&new_customer, &other], 101).await?,
        "unknown_key",
    ));
    // The cloud alone (threshold 2): keyvault signs the stored bytes.
    let id = forge(&cluster, &rotated(6)?, &current, &[], 102).await?;
    let mut kv = cluster.keyvault_client().await?;
    let bytes = rotated(6)?.canonical_bytes()?;
    let cloud_sig = kv
        .sign(SignRequest {
            purpose: "release".into(),
            data: bytes.clone(),
            actor: "test".into(),
            key_id: String::new(),
        })
        .await?
        .into_inner();
    let cloud_sig = trellis_firmware::ManifestSignature {
        key_id: cloud_sig.key_id,
        signature: cloud_sig.signature,
    };
    let mut redis = cluster.redis().await?;
    let _: () = redis::AsyncCommands::hset(
        &mut redis,
        trellis_core::redis_conn::keys::release(&id),
        "signatures",
        trellis_records::release::signatures_json(std::slice::from_ref(&cloud_sig))?,
    )
    .await?;
    cases.push(("the cloud alone", id, "insufficient_signatures"));
    // Everything signed, but not above version 5.
    let all_sign = |p: &TrustPolicy| -> anyhow::Result<Vec<trellis_firmware::ManifestSignature>> {
        let b = p.canonical_bytes()?;
        Ok(vec![
            sign_policy(&keys.customer, &b)?,
            sign_policy(&new_customer, &b)?,
        ])
    };
    for (what, version, tag) in [("an equal version", 5, 103), ("a lower version", 4, 104)] {
        let p = rotated(version)?;
        let id = forge(
            &cluster,
            &p,
            &current,
            &[&keys.customer, &new_customer],
            tag,
        )
        .await?;
        let mut sigs = all_sign(&p)?;
        let c = kv
            .sign(SignRequest {
                purpose: "release".into(),
                data: p.canonical_bytes()?,
                actor: "test".into(),
                key_id: String::new(),
            })
            .await?
            .into_inner();
        sigs.push(trellis_firmware::ManifestSignature {
            key_id: c.key_id,
            signature: c.signature,
        });
        let _: () = redis::AsyncCommands::hset(
            &mut redis,
            trellis_core::redis_conn::keys::release(&id),
            "signatures",
            trellis_records::release::signatures_json(&sigs)?,
        )
        .await?;
        cases.push((what, id, "rollback"));
    }
    // Signed by the current keys, but not by the new customer key: it could
    // lock the fleet out.
    let id = forge(&cluster, &rotated(7)?, &current, &[&keys.customer], 105).await?;
    let sigs = vec![
        sign_policy(&keys.customer, &rotated(7)?.canonical_bytes()?)?,
        {
            let c = kv
                .sign(SignRequest {
                    purpose: "release".into(),
                    data: rotated(7)?.canonical_bytes()?,
                    actor: "test".into(),
                    key_id: String::new(),
                })
                .await?
                .into_inner();
            trellis_firmware::ManifestSignature {
                key_id: c.key_id,
                signature: c.signature,
            }
        },
    ];
    let _: () = redis::AsyncCommands::hset(
        &mut redis,
        trellis_core::redis_conn::keys::release(&id),
        "signatures",
        trellis_records::release::signatures_json(&sigs)?,
    )
    .await?;
    cases.push(("the new keys did not sign", id, "new_policy_unsigned"));

    let gateway = cluster.gateway_client(0).await?;
    for (what, release_id, reason) in &cases {
        let answers = futures_answers(&gateway, &ids, release_id).await;
        for (id, answer) in ids.iter().zip(answers) {
            let answer = answer?;
            assert_eq!(
                answer.outcome(),
                DeliveryOutcome::Rejected,
                "{what}: {id}: {answer:?}"
            );
            assert_eq!(answer.reason, *reason, "{what}: {id}: {}", answer.message);
        }
    }
    // Each device said why, as an event and a report, once per case.
    let want_reports = ids.len() * cases.len();
    let (accepted, rejected) = policy_reports_once(&fleet, |_, r| r.len() >= want_reports).await;
    assert!(accepted.is_empty(), "{accepted:?}");
    for id in &ids {
        let mine: Vec<&str> = rejected
            .iter()
            .filter(|(d, _)| d == id)
            .map(|(_, r)| r.as_str())
            .collect();
        let want: Vec<&str> = cases.iter().map(|(_, _, r)| *r).collect();
        assert_eq!(mine, want, "{id}");
    }
    // Still on version 5.
    for (id, v, _) in reported_policies(&cluster, &ids).await? {
        assert_eq!(v, 5, "{id}");
    }

    // And the rule is not "refuse everything": a proper rotation (version 6,
    // current and new keys) is accepted by all of them.
    let good = rotated(6)?;
    let id = forge(
        &cluster,
        &good,
        &current,
        &[&keys.customer, &new_customer],
        106,
    )
    .await?;
    let mut sigs = all_sign(&good)?;
    let c = kv
        .sign(SignRequest {
            purpose: "release".into(),
            data: good.canonical_bytes()?,
            actor: "test".into(),
            key_id: String::new(),
        })
        .await?
        .into_inner();
    sigs.push(trellis_firmware::ManifestSignature {
        key_id: c.key_id,
        signature: c.signature,
    });
    let _: () = redis::AsyncCommands::hset(
        &mut redis,
        trellis_core::redis_conn::keys::release(&id),
        "signatures",
        trellis_records::release::signatures_json(&sigs)?,
    )
    .await?;
    let answers = futures_answers(&gateway, &ids, &id).await;
    for (dev, answer) in ids.iter().zip(answers) {
        let answer = answer?;
        assert_eq!(answer.outcome(), DeliveryOutcome::Sent, "{dev}: {answer:?}");
    }
    let good_sha = hex::encode(good.sha256());
    for (dev, v, sha) in reported_policies(&cluster, &ids).await? {
        assert_eq!((v, sha.as_str()), (6, good_sha.as_str()), "{dev}");
    }
    fleet.stop().await;
    stack.stop().await;
    cluster.stop().await;
    Ok(())
}

/// DeliverUpdate of `release_id` to every device at once.
async fn futures_answers(
    gateway: &trellis_proto::v1::device_service_client::DeviceServiceClient<
        tonic::transport::Channel,
    >,
    ids: &[String],
    release_id: &str,
) -> Vec<anyhow::Result<DeliverUpdateResponse>> {
    let mut tasks = Vec::new();
    for id in ids {
        let mut g = gateway.clone();
        let req = DeliverUpdateRequest {
            device_id: id.clone(),
            release_id: release_id.to_string(),
            rollout_id: String::new(),
            timeout_ms: 10_000,
        };
        tasks.push(tokio::spawn(async move {
            anyhow::Ok(g.deliver_update(req).await?.into_inner())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(match t.await {
            Ok(r) => r,
            Err(e) => Err(e.into()),
        });
    }
    out
}

/// A release signed with `cloud` (a release key version, by key id) and the
/// customer key, written straight into the release record as a forger with
/// Redis access would: what the devices judge, whatever the signer thinks.
async fn release_signed_with(
    cluster: &Cluster,
    stack: &OtaStack,
    customer: &rsa::PrivateKey,
    cloud_key_id: &str,
    version: u32,
) -> anyhow::Result<String> {
    let image = test_image(PRODUCT, version, 8 * 1024);
    let release = upload_release(stack, PRODUCT, version, &image).await?;
    let manifest = release.signed.unwrap_or_default().manifest;
    let cloud = cluster
        .keyvault_client()
        .await?
        .sign(SignRequest {
            purpose: "release".into(),
            data: manifest.clone(),
            actor: "test".into(),
            key_id: cloud_key_id.into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        cloud.key_id, cloud_key_id,
        "keyvault signed with the version asked for"
    );
    let sigs = vec![
        sign_manifest(customer, &manifest)?,
        trellis_firmware::ManifestSignature {
            key_id: cloud.key_id,
            signature: cloud.signature,
        },
    ];
    let mut redis = cluster.redis().await?;
    let _: () = redis::AsyncCommands::hset(
        &mut redis,
        trellis_core::redis_conn::keys::release(&release.release_id),
        "signatures",
        trellis_records::release::signatures_json(&sigs)?,
    )
    .await?;
    Ok(release.release_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_release_key_rotates_through_a_policy_rotation_and_the_old_one_is_refused()
-> anyhow::Result<()> {
    let (cluster, stack) = Cluster::start_with_ota(1, |_| {}).await?;
    let keys = ReleaseKeys::provision(&cluster, &stack, &[PRODUCT]).await?;
    let config = device_config(PRODUCT, 1, &keys.policy);
    let fleet = Fleet::start(
        &cluster,
        6,
        PRODUCT,
        config,
        vec![cluster.gateways[0].devices.to_string()],
    )
    .await?;
    let ids = fleet.ids();
    all_online(&cluster, &ids, Duration::from_secs(60)).await?;
    let mut kv = cluster.keyvault_client().await?;
    let release_versions = |list: ListSigningKeysResponse| -> Vec<(u32, String, bool, bool)> {
        list.keys
            .into_iter()
            .map(|k| (k.version, k.key_id, k.current, k.retired_ms == 0))
            .collect()
    };
    let before = release_versions(
        kv.list_signing_keys(ListSigningKeysRequest {
            purpose: "release".into(),
        })
        .await?
        .into_inner(),
    );
    assert_eq!(before.len(), 1, "{before:?}");
    let v1_id = before[0].1.clone();
    assert_eq!(keys.policy.keys()[1].key_id, v1_id);

    // Rotate: version 2 is made and becomes the current one.
    let v2 = kv
        .rotate_signing_key(RotateSigningKeyRequest {
            purpose: "release".into(),
        })
        .await?
        .into_inner();
    assert_eq!((v2.version, v2.current), (2, true));
    assert_ne!(v2.key_id, v1_id);
    let after = release_versions(
        kv.list_signing_keys(ListSigningKeysRequest {
            purpose: "release".into(),
        })
        .await?
        .into_inner(),
    );
    assert_eq!(
        after,
        vec![
            (1, v1_id.clone(), false, true),
            (2, v2.key_id.clone(), true, true)
        ]
    );
    // Neither version can be retired yet: v2 is current, and product 11's
    // policy (what its devices hold) still trusts v1.
    let refused = kv
        .retire_signing_key(RetireSigningKeyRequest {
            purpose: "release".into(),
            version: 2,
            force: false,
        })
        .await
        .expect_err("the current version");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("current"),
        "{}",
        refused.message()
    );
    let refused = kv
        .retire_signing_key(RetireSigningKeyRequest {
            purpose: "release".into(),
            version: 1,
            force: false,
        })
        .await
        .expect_err("a version a product's policy trusts");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains(&PRODUCT.to_string())
            && refused.message().contains("still trusts"),
        "{}",
        refused.message()
    );

    // Until the product's policy moves, its releases are signed with v1
    // (the version its devices trust), not the current v2.
    let mut signer = stack.signer_client().await?;
    let image = test_image(PRODUCT, 2, 8 * 1024);
    let (before_move, _) = make_release(&stack, &keys, PRODUCT, 2, &image, Signers::Both).await?;
    let r = signer
        .get_release(GetReleaseRequest {
            release_id: before_move,
        })
        .await?
        .into_inner();
    let signed_by: Vec<String> = r
        .signed
        .unwrap_or_default()
        .signatures
        .iter()
        .map(|s| s.key_id.clone())
        .collect();
    assert!(signed_by.contains(&v1_id), "{signed_by:?}");
    assert!(!signed_by.contains(&v2.key_id), "{signed_by:?}");

    // The policy rotation: same customer key, the cloud's v2 in place of v1.
    let cloud_v2 = trellis_firmware::public_key_from_pem(&v2.public_key_pem)?;
    let new_policy = TrustPolicy::new(
        vec![
            TrustedKey::new("customer", keys.customer.to_public_key())?,
            TrustedKey::new("cloud-release", cloud_v2)?,
        ],
        2,
    )?
    .with_version(2);
    let created = signer
        .create_policy_release(CreatePolicyReleaseRequest {
            product_id: PRODUCT,
            policy_json: new_policy.to_json()?,
            allow_cloud_only: false,
        })
        .await?
        .into_inner();
    let bytes = created.signed.clone().unwrap_or_default().policy;
    signer
        .add_policy_signature(AddSignatureRequest {
            release_id: created.release_id.clone(),
            signature: Some(sign_policy(&keys.customer, &bytes)?),
        })
        .await?;
    // One request: keyvault signs with v1 (the current policy's) and v2
    // (the new one's).
    let signed = signer
        .sign_policy_release(SignReleaseRequest {
            release_id: created.release_id.clone(),
        })
        .await?
        .into_inner();
    assert!(signed.complete, "{signed:?}");
    let policy_signers: Vec<String> = signed
        .signed
        .clone()
        .unwrap_or_default()
        .signatures
        .iter()
        .map(|s| s.key_id.clone())
        .collect();
    assert!(policy_signers.contains(&v1_id), "{policy_signers:?}");
    assert!(policy_signers.contains(&v2.key_id), "{policy_signers:?}");

    let mut ota = stack.ota_client().await?;
    let rollout = ota
        .create_rollout(CreateRolloutRequest {
            release_id: created.release_id.clone(),
            stages: vec![stage("all", 0, 100, 0)],
            max_failure_ratio: 0.1,
            max_concurrent: 10,
            apply_timeout_secs: 60,
            ..Default::default()
        })
        .await?
        .into_inner();
    let done = rollout_until(
        &stack,
        &rollout.rollout_id,
        &[RolloutState::Completed, RolloutState::Aborted],
        Duration::from_secs(90),
    )
    .await?;
    assert_eq!(done.state(), RolloutState::Completed, "{}", done.message);
    let (accepted, rejected) = policy_reports_once(&fleet, |a, _| a.len() >= ids.len()).await;
    assert_eq!(accepted.len(), ids.len(), "{rejected:?}");

    // Now v1 can be retired: no product's policy trusts it any more.
    let retired = kv
        .retire_signing_key(RetireSigningKeyRequest {
            purpose: "release".into(),
            version: 1,
            force: false,
        })
        .await?
        .into_inner();
    assert_ne!(retired.retired_ms, 0);

    // A release signed by the customer and the new key installs everywhere.
    let rotated = ReleaseKeys {
        customer: keys.customer,
        cloud_pem: v2.public_key_pem.clone(),
        policy: new_policy.clone(),
    };
    install_everywhere(&cluster, &stack, &rotated, 3, &ids).await?;

    // The old key is refused: keyvault no longer signs with retired v1 ...
    let retired_sign = kv
        .sign(SignRequest {
            purpose: "release".into(),
            data: new_policy.canonical_bytes()?,
            actor: "test".into(),
            key_id: v1_id.clone(),
        })
        .await
        .expect_err("a retired version signs nothing");
    assert_eq!(retired_sign.code(), tonic::Code::FailedPrecondition);
    assert!(
        retired_sign.message().contains("retired"),
        "{}",
        retired_sign.message()
    );
    // ... and a release the customer signed with a v1 signature beside it
    // (made while v1 was unretired for the purpose) is refused by every
    // device: its policy no longer trusts v1.
    kv.unretire_signing_key(UnretireSigningKeyRequest {
        purpose: "release".into(),
        version: 1,
    })
    .await?;
    let forged = release_signed_with(&cluster, &stack, &rotated.customer, &v1_id, 4).await?;
    let gateway = cluster.gateway_client(0).await?;
    for (id, answer) in ids
        .iter()
        .zip(futures_answers(&gateway, &ids, &forged).await)
    {
        let answer = answer?;
        assert_eq!(
            answer.outcome(),
            DeliveryOutcome::Rejected,
            "{id}: {answer:?}"
        );
        assert_eq!(answer.reason, "unknown_key", "{id}: {}", answer.message);
    }
    fleet.stop().await;
    Ok(())
}
