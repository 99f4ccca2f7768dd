//! The end of `trellis up --demo`: a signed, staged firmware rollout to the
//! simulated fleet. It walks the path an operator and a customer take:
//! the customer's offline key and the cloud release key both sign, the
//! devices trust exactly those two (threshold 2), the scheduler opens a
//! canary stage then the rest, and each device counts as updated only when
//! it reconnects running the new image.
use anyhow::{Context, bail};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use std::path::Path;
use std::time::{Duration, Instant};
use trellis_core::telemetry::{TraceInterceptor, TracedChannel};
use trellis_firmware::{TrustPolicy, TrustedKey, public_key_from_pem, sign_manifest};
use trellis_proto::v1::key_vault_client::KeyVaultClient;
use trellis_proto::v1::ota_client::OtaClient;
use trellis_proto::v1::signer_client::SignerClient;
use trellis_proto::v1::upload_image_request::Part;
use trellis_proto::v1::*;

/// Demo firmware images are padded to this size so the transfer is more
/// than a handful of chunks.
const DEMO_IMAGE_BYTES: usize = 48 * 1024;

pub fn demo_image(version: u32) -> Vec<u8> {
    let mut image = format!("trellis simulated firmware, version {version}\n").into_bytes();
    let mut filler = 0u8;
    while image.len() < DEMO_IMAGE_BYTES {
        image.push(filler);
        filler = filler.wrapping_mul(31).wrapping_add(7);
    }
    image
}

/// The customer's offline release key: made once, kept in the data
/// directory (a real customer keeps it off the cloud entirely).
pub async fn customer_key(data_dir: &Path) -> anyhow::Result<rsa::PrivateKey> {
    let path = data_dir.join("demo-customer-release.pem");
    if let Ok(pem) = std::fs::read_to_string(&path) {
        // Made by a release that wrote it world-readable: make it private.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot make {} private (chmod 600)", path.display()))?;
        }
        return rsa::PrivateKey::from_pkcs8_pem(&pem)
            .with_context(|| format!("{} is not a PKCS#8 private key", path.display()));
    }
    let key = tokio::task::spawn_blocking(|| rsa::PrivateKey::new(&mut rand::rng(), 2048))
        .await
        .context("key generation task")?
        .context("generating the demo customer key")?;
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .context("encoding the demo customer key")?;
    crate::firmware_cli::write_private(&path, pem.as_bytes())?;
    Ok(key)
}

/// Writes the fleet's trust policy (customer key AND cloud release key)
/// into the demo key directory, where the simulated devices read it, and
/// sets the same policy on the signer. Returns the policy.
pub async fn provision_trust(
    keyvault: &mut KeyVaultClient<TracedChannel>,
    signer: &mut SignerClient<TracedChannel>,
    customer: &rsa::PrivateKey,
    product: u32,
    fleet_dir: &Path,
) -> anyhow::Result<TrustPolicy> {
    let cloud = keyvault
        .get_signing_key(GetSigningKeyRequest {
            purpose: "release".into(),
            version: 0,
        })
        .await
        .map_err(|e| anyhow::anyhow!("keyvault has no release key: {}", e.message()))?
        .into_inner();
    let cloud_key = public_key_from_pem(&cloud.public_key_pem)?;
    let customer_pub = customer.to_public_key();
    let policy = TrustPolicy::new(
        vec![
            TrustedKey::new("customer-offline", customer_pub.clone())?,
            TrustedKey::new("cloud-release", cloud_key)?,
        ],
        2,
    )?;
    trellis_device::write_trust_policy(fleet_dir, &policy)?;
    signer
        .set_policy(SetPolicyRequest {
            policy: Some(SigningPolicy {
                product_id: product,
                keys: vec![
                    PolicyKey {
                        name: "customer-offline".into(),
                        public_key_pem: trellis_firmware::public_key_to_pem(&customer_pub)?,
                        ..Default::default()
                    },
                    PolicyKey {
                        name: "cloud-release".into(),
                        public_key_pem: cloud.public_key_pem.clone(),
                        ..Default::default()
                    },
                ],
                threshold: 2,
                cloud_only: false,
                version: 0,
                policy_json: String::new(),
            }),
            allow_cloud_only: false,
        })
        .await
        .map_err(|e| anyhow::anyhow!("signer refused the policy: {}", e.message()))?;
    Ok(policy)
}

/// Uploads `image`, creates release product-version (or reuses it), signs
/// it with the customer key here and the cloud key in keyvault, and checks
/// the policy is met. Returns the release id.
pub async fn signed_release(
    signer: &mut SignerClient<TracedChannel>,
    customer: &rsa::PrivateKey,
    product: u32,
    version: u32,
    image: Vec<u8>,
) -> anyhow::Result<String> {
    let size = image.len() as u64;
    let mut parts = vec![UploadImageRequest {
        part: Some(Part::Header(UploadImageHeader {
            product_id: product,
            size,
            organization: String::new(),
        })),
    }];
    parts.extend(image.chunks(16 * 1024).map(|c| UploadImageRequest {
        part: Some(Part::Data(c.to_vec())),
    }));
    let uploaded = signer
        .upload_image(tokio_stream::iter(parts))
        .await
        .map_err(|e| anyhow::anyhow!("upload refused: {}", e.message()))?
        .into_inner();
    let release_id = format!("{product}-{version}");
    let release = match signer
        .create_release(CreateReleaseRequest {
            product_id: product,
            version,
            image_sha256: uploaded.sha256.clone(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(e) if e.code() == tonic::Code::AlreadyExists => signer
            .get_release(GetReleaseRequest {
                release_id: release_id.clone(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("release {release_id}: {}", e.message()))?
            .into_inner(),
        Err(e) => bail!("release {release_id} not created: {}", e.message()),
    };
    if release.image_sha256 != uploaded.sha256 {
        bail!(
            "release {release_id} already exists with another image ({}); remove the data directory to start over",
            release.image_sha256
        );
    }
    let manifest = release
        .signed
        .as_ref()
        .map(|s| s.manifest.clone())
        .context("the signer returned a release without its manifest")?;
    let signature = sign_manifest(customer, &manifest)?;
    signer
        .add_signature(AddSignatureRequest {
            release_id: release_id.clone(),
            signature: Some(signature),
        })
        .await
        .map_err(|e| anyhow::anyhow!("customer signature refused: {}", e.message()))?;
    signer
        .sign_release(SignReleaseRequest {
            release_id: release_id.clone(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("cloud signature failed: {}", e.message()))?;
    let verdict = signer
        .verify_release(VerifyReleaseRequest {
            release_id: release_id.clone(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("verify failed: {}", e.message()))?
        .into_inner();
    if !verdict.satisfied {
        bail!(
            "release {release_id} does not meet its policy: {}",
            verdict.message
        );
    }
    Ok(release_id)
}

pub async fn signer_client(url: &str) -> anyhow::Result<SignerClient<TracedChannel>> {
    let channel = connect(url, "the signer").await?;
    Ok(SignerClient::new(channel))
}

pub async fn ota_client(url: &str) -> anyhow::Result<OtaClient<TracedChannel>> {
    let channel = connect(url, "the OTA scheduler").await?;
    Ok(OtaClient::new(channel))
}

async fn connect(url: &str, what: &str) -> anyhow::Result<TracedChannel> {
    let tls = crate::ops::operator_tls()?;
    let endpoint = trellis_core::tls::endpoint(url, tls.as_ref()).map_err(anyhow::Error::msg)?;
    let mut last = None;
    // `trellis up` starts services concurrently; give them a moment.
    for _ in 0..50 {
        match endpoint.connect().await {
            Ok(channel) => {
                return Ok(tonic::service::interceptor::InterceptedService::new(
                    channel,
                    TraceInterceptor::OPERATOR,
                ));
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow::anyhow!("cannot reach {what} at {url}: {last:?}"))
}

/// Rolls `release_id` out to `devices` in two stages (a one-device canary,
/// then everyone) and prints each change until the rollout ends.
pub async fn two_stage_rollout(
    ota: &mut OtaClient<TracedChannel>,
    release_id: &str,
    product: u32,
    devices: Vec<String>,
    within: Duration,
) -> anyhow::Result<RolloutStatus> {
    let created = ota
        .create_rollout(CreateRolloutRequest {
            release_id: release_id.to_string(),
            target: Some(RolloutTarget {
                product_id: product,
                device_ids: devices,
                percent: 0,
                tag: String::new(),
            }),
            stages: vec![
                Stage {
                    name: "canary".into(),
                    device_count: 1,
                    soak_secs: 1,
                    min_success_ratio: 1.0,
                    ..Default::default()
                },
                Stage {
                    name: "everyone".into(),
                    percent: 100,
                    min_success_ratio: 0.9,
                    ..Default::default()
                },
            ],
            max_failure_ratio: 0.2,
            max_concurrent: 10,
            apply_timeout_secs: 60,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("rollout refused: {}", e.message()))?
        .into_inner();
    println!(
        "demo: rollout {} of release {release_id}: canary (1 device), then everyone",
        created.rollout_id
    );
    let started = Instant::now();
    let mut last_line = String::new();
    loop {
        let status = ota
            .get_rollout(GetRolloutRequest {
                rollout_id: created.rollout_id.clone(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("rollout status: {}", e.message()))?
            .into_inner();
        let line = status
            .stages
            .iter()
            .map(|s| {
                format!(
                    "{} {}/{} applied{}{}",
                    s.name,
                    s.applied,
                    s.devices,
                    if s.failed > 0 {
                        format!(", {} failed", s.failed)
                    } else {
                        String::new()
                    },
                    if s.completed_at_ms > 0 {
                        " (done)"
                    } else if s.open {
                        " (open)"
                    } else {
                        ""
                    }
                )
            })
            .collect::<Vec<_>>()
            .join(" | ");
        if line != last_line {
            println!(
                "demo: rollout {:>5.1} s: {line}",
                started.elapsed().as_secs_f64()
            );
            last_line = line;
        }
        match status.state() {
            RolloutState::Completed => return Ok(status),
            RolloutState::Aborted | RolloutState::Paused => {
                bail!("rollout {} stopped: {}", status.rollout_id, status.message)
            }
            _ => {}
        }
        if started.elapsed() > within {
            bail!(
                "rollout {} not complete after {} s: {}",
                status.rollout_id,
                within.as_secs(),
                status.message
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
