//! Operator commands: thin gRPC clients of keyvault and any gateway.
use crate::cli::Command;
use crate::cli::{
    AuditCommand, DeviceCommand, Endpoints, EventsCommand, KeyKind, KeysCommand, PendingCommand,
    QuarantineCommand,
};
use anyhow::{Context, bail};
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use std::path::Path;
use trellis_core::telemetry::{TraceInterceptor, TracedChannel};
use trellis_core::tls::{Role, ServiceTls};
use trellis_proto::v1::device_service_client::DeviceServiceClient;
use trellis_proto::v1::key_vault_client::KeyVaultClient;
use trellis_proto::v1::variable_value::Value;
use trellis_proto::v1::*;
use trellis_wire::DeviceId;

/// Loads the operator certificate `config` names (`tls.*`, by default the
/// one `trellis up` made in `data_dir/tls`); a failure is told when a
/// command first connects.
pub fn load_operator_tls(config: &trellis_core::Config) {
    trellis_core::tls::set_operator(
        ServiceTls::load(config, Role::Operator).map_err(|e| e.to_string()),
    );
}

pub fn operator_tls() -> anyhow::Result<Option<ServiceTls>> {
    trellis_core::tls::operator().map_err(anyhow::Error::msg)
}

pub async fn channel(url: &str, what: &str, flag: &str) -> anyhow::Result<TracedChannel> {
    let tls = operator_tls()?;
    let channel = trellis_core::tls::endpoint(url, tls.as_ref())
        .map_err(|e| anyhow::anyhow!("{flag} {e}"))?
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach {what} at {url} (is `trellis up` running? set {flag})")
        })?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel,
        TraceInterceptor::OPERATOR,
    ))
}

pub async fn keyvault_client(url: &str) -> anyhow::Result<KeyVaultClient<TracedChannel>> {
    Ok(KeyVaultClient::new(
        channel(url, "keyvault", "--keyvault-url").await?,
    ))
}

pub async fn gateway_client(url: &str) -> anyhow::Result<DeviceServiceClient<TracedChannel>> {
    Ok(DeviceServiceClient::new(
        channel(url, "a gateway", "--gateway-url").await?,
    ))
}

/// Runs one operator command.
pub async fn run(endpoints: &Endpoints, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Device(cmd) => device(endpoints, cmd).await,
        Command::Events(cmd) => events(endpoints, cmd).await,
        Command::Keys(cmd) => keys(endpoints, cmd).await,
        Command::Audit(cmd) => audit(endpoints, cmd).await,
        other => anyhow::bail!("{} is not an operator command", other.name()),
    }
}

/// gRPC errors as an operator should read them.
pub fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

/// Makes a key pair, registers the public half, writes both and the cloud
/// key to `out`. Returns the new device ids.
pub async fn provision(
    keyvault: &mut KeyVaultClient<TracedChannel>,
    product: u32,
    ids: Vec<DeviceId>,
    out: &Path,
) -> anyhow::Result<Vec<DeviceId>> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cloud = keyvault
        .get_cloud_public_key(GetCloudPublicKeyRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let cloud_key = rsa::PublicKey::from_public_key_der(&cloud.public_key_der)
        .context("keyvault's cloud key")?;
    trellis_device::identity::write_cloud_key(out, &cloud_key)?;
    let mut made = Vec::with_capacity(ids.len());
    for id in ids {
        let private_key = trellis_device::identity::generate_device_key(&mut rand::rng())?;
        let public_der = private_key
            .to_public_key()
            .to_public_key_der()
            .context("encoding the device public key")?;
        keyvault
            .register_device(RegisterDeviceRequest {
                device_id: id.to_string(),
                product_id: product,
                public_key: public_der.as_bytes().to_vec(),
                organization: String::new(),
            })
            .await
            .map_err(status)?;
        let identity = trellis_device::identity::DeviceIdentity {
            device_id: id,
            private_key,
            cloud_public_key: cloud_key.clone(),
        };
        trellis_device::identity::write_identity(out, &identity)?;
        made.push(id);
    }
    Ok(made)
}

pub async fn device(endpoints: &Endpoints, cmd: DeviceCommand) -> anyhow::Result<()> {
    match cmd {
        DeviceCommand::Provision {
            product,
            id,
            count,
            out,
        } => {
            let ids: Vec<DeviceId> = match id {
                Some(id) if count == 1 => vec![
                    id.parse()
                        .map_err(|e| anyhow::anyhow!("--id {id:?}: {e}"))?,
                ],
                Some(_) => bail!("--id names one device; drop it or use --count 1"),
                None => (0..count).map(|_| DeviceId(rand::random())).collect(),
            };
            let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
            for id in provision(&mut kv, product, ids, &out).await? {
                println!("{id}");
            }
            eprintln!("keys and cloud.pub.pem written to {}", out.display());
        }
        DeviceCommand::Register {
            id,
            product,
            public_key,
        } => {
            let key = std::fs::read(&public_key)
                .with_context(|| format!("cannot read {}", public_key.display()))?;
            let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
            let device = kv
                .register_device(RegisterDeviceRequest {
                    device_id: id,
                    product_id: product,
                    public_key: key,
                    organization: String::new(),
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "registered {} (product {})",
                device.device_id, device.product_id
            );
        }
        DeviceCommand::List {
            product,
            online,
            json,
        } => {
            let mut gw = gateway_client(&endpoints.gateway_url).await?;
            let list = gw
                .list_devices(ListDeviceStatesRequest {
                    product_id: product,
                    online_only: online,
                })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                let rows: Vec<_> = list.devices.iter().map(state_json).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<24}  {:>7}  {:<7}  {:>8}  {:<16}  FIRMWARE SHA-256",
                    "DEVICE", "PRODUCT", "ONLINE", "FIRMWARE", "GATEWAY"
                );
                for d in &list.devices {
                    println!(
                        "{:<24}  {:>7}  {:<7}  {:>8}  {:<16}  {}",
                        d.device_id,
                        d.product_id,
                        if d.revoked {
                            "revoked"
                        } else if d.online {
                            "yes"
                        } else {
                            "no"
                        },
                        d.firmware_version,
                        d.gateway_id,
                        d.firmware_sha256
                    );
                }
            }
        }
        DeviceCommand::Show { id } => {
            let mut gw = gateway_client(&endpoints.gateway_url).await?;
            let state = gw
                .get_device_state(GetDeviceStateRequest {
                    device_id: id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let mut json = state_json(&state);
            // The key and a rotated one not yet used, from the registry.
            let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
            let record = kv
                .get_device(GetDeviceRequest { device_id: id })
                .await
                .map_err(status)?
                .into_inner();
            json["key_id"] = serde_json::json!(record.key_id);
            json["next_key_id"] = serde_json::json!(record.next_key_id);
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        DeviceCommand::RotateKey { id, timeout_ms } => {
            let mut gw = gateway_client(&endpoints.gateway_url).await?;
            let r = gw
                .rotate_device_key(RotateDeviceKeyRequest {
                    device_id: id.clone(),
                    timeout_ms,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "{id}: new key {} registered as the next key (via {}); the device uses it from its next handshake",
                r.next_key_id, r.gateway_id
            );
        }
        DeviceCommand::Call {
            id,
            function,
            argument,
            timeout_ms,
            sign_with,
            valid_for,
            envelope,
        } => {
            let mut gw = gateway_client(&endpoints.gateway_url).await?;
            let signed_command = signed_command_for(
                endpoints,
                &mut gw,
                &id,
                &function,
                &argument,
                sign_with,
                valid_for.into(),
                envelope,
            )
            .await?;
            let r = gw
                .call_function(CallFunctionRequest {
                    device_id: id,
                    function,
                    argument,
                    timeout_ms,
                    signed_command,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", r.return_value);
        }
        DeviceCommand::Get {
            id,
            variable,
            timeout_ms,
        } => {
            let mut gw = gateway_client(&endpoints.gateway_url).await?;
            let r = gw
                .get_variable(GetVariableRequest {
                    device_id: id,
                    name: variable,
                    timeout_ms,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", format_value(&r));
        }
        DeviceCommand::Revoke { id, reason } => {
            let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
            let d = kv
                .revoke_device(RevokeDeviceRequest {
                    device_id: id,
                    reason,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("revoked {}", d.device_id);
        }
        DeviceCommand::Delete { id, reason } => {
            let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
            kv.delete_device(DeleteDeviceRequest {
                device_id: id.clone(),
                reason,
            })
            .await
            .map_err(status)?;
            println!("deleted {id}");
        }
        DeviceCommand::Pending(PendingCommand::List { limit }) => {
            let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
            let r = kv
                .list_pending(ListPendingRequest { limit })
                .await
                .map_err(status)?
                .into_inner();
            if r.devices.is_empty() {
                println!("no pending keys");
            }
            for d in r.devices {
                println!(
                    "{}  key {}  attempts {}  last {} via {} from {}",
                    d.device_id,
                    d.key_id,
                    d.attempts,
                    trellis_core::time::format_ms(d.last_seen_ms),
                    d.gateway_id,
                    d.peer_addr
                );
            }
        }
        DeviceCommand::Pending(PendingCommand::Approve {
            id,
            product,
            key_id,
            org,
        }) => {
            let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
            let d = kv
                .approve_pending(ApprovePendingRequest {
                    device_id: id,
                    product_id: product,
                    organization: org,
                    key_id,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("registered {} in product {}", d.device_id, d.product_id);
        }
        DeviceCommand::Pending(PendingCommand::Reject { id }) => {
            let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
            kv.reject_pending(RejectPendingRequest {
                device_id: id.clone(),
            })
            .await
            .map_err(status)?;
            println!("rejected the pending key of {id}");
        }
        DeviceCommand::Quarantine(QuarantineCommand::Lift { id }) => {
            let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
            let r = kv
                .lift_quarantine(LiftQuarantineRequest {
                    device_id: id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if r.was_quarantined {
                println!("quarantine lifted for {id}");
            } else {
                println!("{id} was not quarantined");
            }
        }
        DeviceCommand::Tag { id, tags } => {
            let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
            let d = kv
                .set_device_tags(SetDeviceTagsRequest {
                    device_id: id,
                    tags,
                })
                .await
                .map_err(status)?
                .into_inner();
            if d.tags.is_empty() {
                println!("{}: no tags", d.device_id);
            } else {
                println!("{}: {}", d.device_id, d.tags.join(" "));
            }
        }
        DeviceCommand::Signal {
            id,
            state,
            timeout_ms,
        } => {
            let mut gw = gateway_client(&endpoints.gateway_url).await?;
            let on = state == "on";
            gw.signal_device(SignalDeviceRequest {
                device_id: id.clone(),
                on,
                timeout_ms,
            })
            .await
            .map_err(status)?;
            println!(
                "{id}: {}",
                if on {
                    "signalling"
                } else {
                    "signalling stopped"
                }
            );
        }
        DeviceCommand::Rename { id, name } => {
            let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
            let d = kv
                .set_device_name(SetDeviceNameRequest {
                    device_id: id,
                    name,
                })
                .await
                .map_err(status)?
                .into_inner();
            if d.name.is_empty() {
                println!("{}: no name", d.device_id);
            } else {
                println!("{}: {}", d.device_id, d.name);
            }
        }
    }
    Ok(())
}

/// Keyvault's purpose for the release key.
const RELEASE_PURPOSE: &str = "release";

/// `trellis keys ...` (cloud and release key versions, keyvault).
pub async fn keys(endpoints: &Endpoints, cmd: KeysCommand) -> anyhow::Result<()> {
    let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
    match cmd {
        KeysCommand::Rotate {
            which: KeyKind::Release,
        } => {
            let v = kv
                .rotate_signing_key(RotateSigningKeyRequest {
                    purpose: RELEASE_PURPOSE.into(),
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "release key version {} made (key id {}); it is the current one. Each product's releases are still signed with the version its policy trusts: move a product to it with `trellis policy rotate --product P --new POLICY.json --cloud-release-key` and a rollout, then retire the old version (`trellis keys retire release N`)",
                v.version, v.key_id
            );
        }
        KeysCommand::Retire {
            which: KeyKind::Release,
            version,
            force,
        } => {
            let v = kv
                .retire_signing_key(RetireSigningKeyRequest {
                    purpose: RELEASE_PURPOSE.into(),
                    version,
                    force,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "release key version {} retired{}; keyvault no longer signs with it",
                v.version,
                if force { " (forced)" } else { "" }
            );
        }
        KeysCommand::Unretire {
            which: KeyKind::Release,
            version,
        } => {
            let v = kv
                .unretire_signing_key(UnretireSigningKeyRequest {
                    purpose: RELEASE_PURPOSE.into(),
                    version,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "release key version {} is live again: keyvault signs with it for products whose policy trusts it",
                v.version
            );
        }
        KeysCommand::Rotate {
            which: KeyKind::Cloud,
        } => {
            let v = kv
                .rotate_cloud_key(RotateCloudKeyRequest {})
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "cloud key version {} made (key id {}); it is the current one. Gateways announce it to devices with rotation support; follow with `trellis keys status`",
                v.version, v.key_id
            );
        }
        KeysCommand::Status { json } => {
            let s = kv
                .cloud_key_status(CloudKeyStatusRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let release = kv
                .list_signing_keys(ListSigningKeysRequest {
                    purpose: RELEASE_PURPOSE.into(),
                })
                .await
                .map_err(status)?
                .into_inner()
                .keys;
            if json {
                let release_rows: Vec<serde_json::Value> = release
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "version": k.version,
                            "key_id": k.key_id,
                            "created": ms_text(k.created_ms),
                            "state": key_state(k.retired_ms, k.current),
                            "current": k.current,
                        })
                    })
                    .collect();
                let rows: Vec<serde_json::Value> = s
                    .versions
                    .iter()
                    .map(|v| {
                        serde_json::json!({
                            "version": v.version,
                            "key_id": v.key_id,
                            "created": ms_text(v.created_ms),
                            "state": version_state(v),
                            "current": v.current,
                            "devices": v.devices,
                            "legacy_devices": v.legacy_devices,
                            "recent_devices": v.recent_devices,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "retire_grace_days": s.retire_grace_days,
                        "versions": rows,
                        "release_versions": release_rows,
                    }))?
                );
            } else {
                println!("cloud key");
                println!(
                    "{:<8} {:<18} {:<25} {:<17} {:>8} {:>8} {:>8}",
                    "VERSION", "KEY ID", "CREATED", "STATE", "DEVICES", "LEGACY", "RECENT"
                );
                for v in &s.versions {
                    println!(
                        "{:<8} {:<18} {:<25} {:<17} {:>8} {:>8} {:>8}",
                        v.version,
                        v.key_id.get(..16).unwrap_or(&v.key_id),
                        ms_text(v.created_ms),
                        version_state(v),
                        v.devices,
                        v.legacy_devices,
                        v.recent_devices
                    );
                }
                println!(
                    "(devices: holding that version now; legacy: of those, without rotation support; recent: seen within keys.retire_grace_days = {})",
                    s.retire_grace_days
                );
                println!();
                println!("release key");
                println!(
                    "{:<8} {:<18} {:<25} {:<17}",
                    "VERSION", "KEY ID", "CREATED", "STATE"
                );
                for k in &release {
                    println!(
                        "{:<8} {:<18} {:<25} {:<17}",
                        k.version,
                        k.key_id.get(..16).unwrap_or(&k.key_id),
                        ms_text(k.created_ms),
                        key_state(k.retired_ms, k.current)
                    );
                }
            }
        }
        KeysCommand::Retire {
            which: KeyKind::Cloud,
            version,
            force,
        } => {
            let v = kv
                .retire_cloud_key(RetireCloudKeyRequest { version, force })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "cloud key version {} retired{}; handshakes under it are refused from now on",
                v.version,
                if force { " (forced)" } else { "" }
            );
        }
        KeysCommand::Unretire {
            which: KeyKind::Cloud,
            version,
        } => {
            let v = kv
                .unretire_cloud_key(UnretireCloudKeyRequest { version })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "cloud key version {} is live again: devices holding it can connect, and are told of the current version",
                v.version
            );
        }
    }
    Ok(())
}

fn version_state(v: &CloudKeyVersion) -> String {
    key_state(v.retired_ms, v.current)
}

fn key_state(retired_ms: i64, current: bool) -> String {
    if retired_ms != 0 {
        format!("retired {}", ms_text(retired_ms))
    } else if current {
        "live (current)".into()
    } else {
        "live".into()
    }
}

fn ms_text(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    trellis_api::iso_time(ms)
}

pub fn format_value(r: &GetVariableResponse) -> String {
    match r.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::StringValue(s)) => s.clone(),
        None => format!("0x{} (type {:?})", hex::encode(&r.raw), r.r#type),
    }
}

/// The signed command for `device call`, if it is to carry one: read from
/// --envelope (checked against the call), or made now with --sign-with,
/// its sequence above the last one the device accepted.
#[allow(clippy::too_many_arguments)]
async fn signed_command_for(
    endpoints: &Endpoints,
    gw: &mut DeviceServiceClient<TracedChannel>,
    id: &str,
    function: &str,
    argument: &str,
    sign_with: Vec<std::path::PathBuf>,
    valid_for: std::time::Duration,
    envelope: Option<std::path::PathBuf>,
) -> anyhow::Result<Vec<u8>> {
    use crate::command_cli;
    if let Some(path) = envelope {
        let (e, signed) = command_cli::read_file(&path)?;
        if !e.device_id.eq_ignore_ascii_case(id) || e.function != function || e.argument != argument
        {
            anyhow::bail!(
                "{} signs {}({:?}) on device {}, not {function}({argument:?}) on {id}",
                path.display(),
                e.function,
                e.argument,
                e.device_id
            );
        }
        return signed.encode().map_err(|e| anyhow::anyhow!("{e}"));
    }
    if sign_with.is_empty() {
        return Ok(Vec::new());
    }
    let state = gw
        .get_device_state(GetDeviceStateRequest {
            device_id: id.to_string(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let now = trellis_core::time::now_ms();
    let sequence = u64::try_from(now)
        .unwrap_or(0)
        .max(state.command_sequence.saturating_add(1));
    let org = match crate::access_cli::who_am_i(endpoints).await {
        Ok(me) => me.org,
        Err(_) => trellis_auth::DEFAULT_ORG.to_string(),
    };
    let e = command_cli::envelope(&org, id, function, argument, now, valid_for, sequence);
    let (_, signed) = command_cli::make(e, &sign_with)?;
    signed.encode().map_err(|e| anyhow::anyhow!("{e}"))
}

fn state_json(d: &DeviceState) -> serde_json::Value {
    serde_json::json!({
        "device_id": d.device_id,
        "name": d.name,
        "region": d.region,
        "product_id": d.product_id,
        "online": d.online,
        "revoked": d.revoked,
        "gateway": d.gateway_id,
        "epoch": d.epoch,
        "firmware_version": d.firmware_version,
        "firmware_sha256": d.firmware_sha256,
        "platform_id": d.platform_id,
        "peer": d.peer_addr,
        "connected_at_ms": d.connected_at_ms,
        "last_seen_ms": d.last_seen_ms,
        "functions": d.functions,
        "variables": d.variables,
        "recent_sessions": d.recent_sessions.iter().map(|s| serde_json::json!({
            "time_ms": s.time_ms,
            "gateway": s.gateway_id,
            "peer": s.peer_addr,
            "epoch": s.epoch,
        })).collect::<Vec<_>>(),
        "clone_flags": d.clone_flags.iter().map(|f| serde_json::json!({
            "time_ms": f.time_ms,
            "gateway": f.gateway_id,
            "peer": f.peer_addr,
            "other_gateway": f.other_gateway_id,
            "other_peer": f.other_peer_addr,
            "action": f.action,
        })).collect::<Vec<_>>(),
        "quarantined_until_ms": d.quarantined_until_ms,
        "command_policy_sha256": d.command_policy_sha256,
        "command_sequence": d.command_sequence,
    })
}

pub async fn events(endpoints: &Endpoints, cmd: EventsCommand) -> anyhow::Result<()> {
    let EventsCommand::Tail {
        device,
        prefix,
        from_start,
        count,
    } = cmd;
    let mut gw = gateway_client(&endpoints.gateway_url).await?;
    let mut stream = gw
        .stream_events(StreamEventsRequest {
            device_id: device.unwrap_or_default(),
            prefix,
            from_start,
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut seen = 0usize;
    while let Some(event) = stream.message().await.map_err(status)? {
        println!(
            "{}  {}  {}{}  {}",
            event.id,
            // Events published through the API have no device: their publisher.
            if event.device_id.is_empty() {
                &event.publisher
            } else {
                &event.device_id
            },
            if event.public { "" } else { "(private) " },
            event.name,
            String::from_utf8_lossy(&event.data)
        );
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(())
}

pub async fn audit(endpoints: &Endpoints, cmd: AuditCommand) -> anyhow::Result<()> {
    let (limit, device) = match cmd {
        AuditCommand::Tail { limit, device } => (limit, device),
        AuditCommand::Refusals { limit, device } => {
            return refusals(endpoints, limit, device).await;
        }
    };
    let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
    let records = kv
        .list_audit(ListAuditRequest {
            limit,
            device_id: device.unwrap_or_default(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .records;
    for r in records {
        let detail: Vec<String> = r.detail.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{}  {:<18} {:<20} {:<24} {:<16} {}",
            r.id,
            r.actor,
            r.action,
            r.device_id,
            r.outcome,
            detail.join(" ")
        );
    }
    Ok(())
}

async fn refusals(endpoints: &Endpoints, limit: u32, device: Option<String>) -> anyhow::Result<()> {
    let mut kv = keyvault_client(&endpoints.keyvault_url).await?;
    let refusals = kv
        .list_refusals(ListRefusalsRequest {
            limit,
            device_id: device.unwrap_or_default(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .refusals;
    println!(
        "{:<40} {:<13} {:<16} {:>9}  {:<24} {:<24} {:<24} by",
        "source", "action", "reason", "count", "first", "last", "last device"
    );
    for r in refusals {
        println!(
            "{:<40} {:<13} {:<16} {:>9}  {:<24} {:<24} {:<24} {}",
            r.source,
            r.action,
            r.reason,
            r.count,
            trellis_core::time::format_ms(r.first_ms),
            trellis_core::time::format_ms(r.last_ms),
            if r.last_device_id.is_empty() {
                "-"
            } else {
                &r.last_device_id
            },
            r.last_actor
        );
    }
    Ok(())
}

/// `trellis keyvault rewrap --new-master-key FILE`.
pub async fn rewrap(
    config: &trellis_core::Config,
    new_key_file: &std::path::Path,
) -> anyhow::Result<()> {
    use trellis_keyvault::master_key::MasterKey;
    let old = MasterKey::from_config(&config.keyvault)?;
    let new = MasterKey::from_config(&trellis_core::config::KeyvaultConfig {
        master_key: None,
        master_key_file: Some(new_key_file.to_path_buf()),
        ..config.keyvault.clone()
    })?;
    let mut redis = trellis_core::redis_conn::connect_durable(&config.redis)
        .await
        .context("keyvault rewrap writes to Redis: set redis.url (TRELLIS_REDIS__URL)")?;
    let actor = format!("operator@{} (keyvault rewrap)", hostname());
    let done =
        trellis_keyvault::rewrap::rewrap_all(&mut redis, &old, &new, &actor, |slot, outcome| {
            use trellis_keyvault::rewrap::Outcome;
            let what = match outcome {
                Outcome::Rewrapped => "re-sealed under the new master key",
                Outcome::AlreadyNew => "already under the new master key",
                Outcome::Absent => "not made yet (nothing to do)",
            };
            println!("rewrap: {} ({}): {what}", slot.what, slot.location);
        })
        .await?;
    let rewrapped = done
        .iter()
        .filter(|(_, o)| *o == trellis_keyvault::rewrap::Outcome::Rewrapped)
        .count();
    println!(
        "rewrap: done ({rewrapped} of {} keys re-sealed now); restart keyvault with keyvault.master_key_file = {}",
        done.len(),
        new_key_file.display()
    );
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
