//! The gRPC edge: the `KeyVault` service, one tracing span per RPC, typed
//! errors turned into statuses here and nowhere else.
use crate::cloud_keys::{self, SharedKeyring};
use crate::error::KeyvaultError;
use crate::pool::{Pool, PoolError};
use crate::registry;
use crate::release_key::{self, SharedReleaseKeyring};
use crate::session;
use crate::signing;

use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};
use tracing::{Instrument, field};
use trellis_core::audit::AuditRecord;
use trellis_core::redis_conn::Redis;
use trellis_proto::v1 as pb;
use trellis_proto::v1::key_vault_server::KeyVault;

/// Audit records ListAudit returns when the request does not say.
const DEFAULT_AUDIT_LIMIT: usize = 100;
const MAX_AUDIT_LIMIT: usize = 10_000;

#[derive(Clone)]
pub struct KeyVaultService {
    pool: Pool,
    redis: Redis,
    /// Every cloud key version (cloud_keys.rs).
    ring: SharedKeyring,
    /// `keys.retire_grace_days`.
    retire_grace_days: u32,
    /// Every release key version (release_key.rs).
    release: Option<SharedReleaseKeyring>,
    /// `keyvault.max_queue_wait_ms` (None: only the caller's deadline).
    max_queue_wait: Option<Duration>,
}

impl std::fmt::Debug for KeyVaultService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVaultService")
            .field("pool", &self.pool)
            .field("ring", &self.ring)
            .finish_non_exhaustive()
    }
}

impl KeyVaultService {
    pub fn new(pool: Pool, redis: Redis, ring: SharedKeyring) -> Self {
        Self {
            pool,
            redis,
            ring,
            retire_grace_days: trellis_core::config::KeysConfig::default().retire_grace_days,
            release: None,
            max_queue_wait: None,
        }
    }

    /// Drops OpenSession decryptions that waited longer than this in the
    /// queue (`keyvault.max_queue_wait_ms`; zero: no limit of our own).
    pub fn with_max_queue_wait(mut self, wait: Duration) -> Self {
        self.max_queue_wait = (!wait.is_zero()).then_some(wait);
        self
    }

    /// `keys.retire_grace_days`.
    pub fn with_retire_grace_days(mut self, days: u32) -> Self {
        self.retire_grace_days = days;
        self
    }

    /// The cloud key versions.
    pub fn keyring(&self) -> &SharedKeyring {
        &self.ring
    }

    /// Enables Sign and the signing key RPCs for purpose "release".
    pub fn with_release_keys(mut self, release: SharedReleaseKeyring) -> Self {
        self.release = Some(release);
        self
    }

    /// The release key versions.
    pub fn release_keyring(&self) -> Option<&SharedReleaseKeyring> {
        self.release.as_ref()
    }

    fn release_keys(&self) -> Result<SharedReleaseKeyring, Status> {
        self.release.clone().ok_or_else(|| {
            status(KeyvaultError::FailedPrecondition(
                "this keyvault was started without release keys; restart it (version 1 is made on first start)".into(),
            ))
        })
    }

    /// Rotate, retire or unretire a signing key version: checks the
    /// purpose, runs `change`, answers with the version it changed.
    async fn change_signing_key<Fut>(
        &self,
        purpose: &str,
        change: impl FnOnce(Redis, SharedReleaseKeyring) -> Fut,
    ) -> Result<Response<pb::SigningKey>, Status>
    where
        Fut: std::future::Future<Output = crate::error::Result<crate::keyring::VersionMeta>>,
    {
        signing::known_purpose(purpose).map_err(status)?;
        let ring = self.release_keys()?;
        let meta = change(self.redis.clone(), ring.clone())
            .await
            .map_err(status)?;
        tracing::Span::current().record("version", meta.version);
        signing::signing_key(&ring.snapshot(), purpose, meta.version)
            .map(Response::new)
            .map_err(status)
    }

    /// The private-key pool (queue depth for metrics).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The durable Redis connection (tokens, organisations).
    pub fn durable(&self) -> Redis {
        self.redis.clone()
    }
}

/// The caller's deadline from the `grpc-timeout` header (gRPC over HTTP/2:
/// at most 8 digits and a unit, H M S m u n), if it sent one.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn status(e: KeyvaultError) -> Status {
    match &e {
        // A full queue is load shedding doing its job: counted by the pool,
        // not logged per request (a storm would flood the log).
        KeyvaultError::Pool(PoolError::Full { .. } | PoolError::Expired { .. }) => {}
        KeyvaultError::Redis(_) | KeyvaultError::Internal(_) | KeyvaultError::Pool(_) => {
            tracing::warn!(error = %e, "request failed")
        }
        _ => tracing::debug!(error = %e, "request refused"),
    }
    e.into()
}

#[tonic::async_trait]
impl KeyVault for KeyVaultService {
    async fn register_device(
        &self,
        request: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let mut req = request.into_inner();
        // A device belongs to the organisation of whoever registers it.
        if req.organization.trim().is_empty() {
            req.organization = principal.org.clone();
        } else if !principal.sees(req.organization.trim()) {
            return Err(Status::permission_denied(
                "devices are registered in your own organisation",
            ));
        }
        let span = tracing::info_span!("keyvault.register_device", device_id = %req.device_id, product_id = req.product_id);
        let mut redis = self.redis.clone();
        async move {
            registry::register(&mut redis, req, &principal.actor())
                .await
                .map(|r| Response::new(r.to_proto()))
                .map_err(status)
        }
        .instrument(span)
        .await
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let span = tracing::debug_span!("keyvault.get_device", device_id = %req.device_id);
        let mut redis = self.redis.clone();
        async move {
            visible_device(&mut redis, &principal, &req.device_id)
                .await
                .map(|r| Response::new(r.to_proto()))
                .map_err(status)
        }
        .instrument(span)
        .await
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let span = tracing::debug_span!("keyvault.list_devices", product_id = req.product_id);
        let mut redis = self.redis.clone();
        async move {
            let devices = registry::list(&mut redis, req.product_id)
                .await
                .map_err(status)?;
            Ok(Response::new(pb::ListDevicesResponse {
                devices: devices
                    .iter()
                    .filter(|d| principal.sees(&d.organization))
                    .map(|d| d.to_proto())
                    .collect(),
            }))
        }
        .instrument(span)
        .await
    }

    async fn revoke_device(
        &self,
        request: Request<pb::RevokeDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!("keyvault.revoke_device", device_id = %req.device_id);
        let mut redis = self.redis.clone();
        async move {
            visible_device(&mut redis, &principal, &req.device_id)
                .await
                .map_err(status)?;
            registry::revoke(&mut redis, &req.device_id, &req.reason, &principal.actor())
                .await
                .map(|r| Response::new(r.to_proto()))
                .map_err(status)
        }
        .instrument(span)
        .await
    }

    async fn delete_device(
        &self,
        request: Request<pb::DeleteDeviceRequest>,
    ) -> Result<Response<pb::DeleteDeviceResponse>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!("keyvault.delete_device", device_id = %req.device_id);
        let mut redis = self.redis.clone();
        async move {
            visible_device(&mut redis, &principal, &req.device_id)
                .await
                .map_err(status)?;
            registry::delete(&mut redis, &req.device_id, &req.reason, &principal.actor())
                .await
                .map(|()| Response::new(pb::DeleteDeviceResponse {}))
                .map_err(status)
        }
        .instrument(span)
        .await
    }

    async fn lift_quarantine(
        &self,
        request: Request<pb::LiftQuarantineRequest>,
    ) -> Result<Response<pb::LiftQuarantineResponse>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!("keyvault.lift_quarantine", device_id = %req.device_id);
        let mut redis = self.redis.clone();
        async move {
            visible_device(&mut redis, &principal, &req.device_id)
                .await
                .map_err(status)?;
            registry::lift_quarantine(&mut redis, &req.device_id, &principal.actor())
                .await
                .map(|was_quarantined| {
                    Response::new(pb::LiftQuarantineResponse { was_quarantined })
                })
                .map_err(status)
        }
        .instrument(span)
        .await
    }

    async fn list_pending(
        &self,
        request: Request<pb::ListPendingRequest>,
    ) -> Result<Response<pb::ListPendingResponse>, Status> {
        let req = request.into_inner();
        let limit = if req.limit == 0 {
            100
        } else {
            req.limit.min(10_000)
        } as usize;
        let mut redis = self.redis.clone();
        registry::list_pending(&mut redis, limit)
            .instrument(tracing::debug_span!("keyvault.list_pending"))
            .await
            .map(|devices| Response::new(pb::ListPendingResponse { devices }))
            .map_err(status)
    }

    async fn approve_pending(
        &self,
        request: Request<pb::ApprovePendingRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let organization = match req.organization.trim() {
            "" => principal.org.clone(),
            org if principal.sees(org) => org.to_string(),
            _ => {
                return Err(Status::permission_denied(
                    "devices are registered in your own organisation",
                ));
            }
        };
        let span = tracing::info_span!("keyvault.approve_pending", device_id = %req.device_id, product_id = req.product_id);
        let mut redis = self.redis.clone();
        async move {
            let pending = registry::get_pending(&mut redis, &req.device_id)
                .await
                .map_err(status)?
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "no pending key for device {} (`trellis device pending list`)",
                        req.device_id
                    ))
                })?;
            // The key reviewed, not one offered since by whoever else
            // claims the id.
            if req.key_id.trim() != pending.key_id {
                return Err(Status::failed_precondition(format!(
                    "device {} now offers key {}, not {:?}: review it again (`trellis device pending list`)",
                    pending.device_id, pending.key_id, req.key_id
                )));
            }
            let actor = principal.actor();
            let device = registry::register(
                &mut redis,
                pb::RegisterDeviceRequest {
                    device_id: pending.device_id.clone(),
                    product_id: req.product_id,
                    public_key: pending.public_key_der.clone(),
                    organization,
                },
                &actor,
            )
            .await
            .map_err(status)?;
            registry::drop_pending(&mut redis, &pending.device_id)
                .await
                .map_err(status)?;
            registry::audit_write(
                &mut redis,
                AuditRecord::new(&actor, "pending_approve", &pending.device_id, "ok")
                    .with("key_id", pending.key_id.clone())
                    .with("product_id", req.product_id.to_string()),
            )
            .await;
            Ok(Response::new(device.to_proto()))
        }
        .instrument(span)
        .await
    }

    async fn reject_pending(
        &self,
        request: Request<pb::RejectPendingRequest>,
    ) -> Result<Response<pb::RejectPendingResponse>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!("keyvault.reject_pending", device_id = %req.device_id);
        let mut redis = self.redis.clone();
        async move {
            if !registry::drop_pending(&mut redis, &req.device_id)
                .await
                .map_err(status)?
            {
                return Err(Status::not_found(format!(
                    "no pending key for device {}",
                    req.device_id
                )));
            }
            registry::audit_write(
                &mut redis,
                AuditRecord::new(&principal.actor(), "pending_reject", &req.device_id, "ok"),
            )
            .await;
            Ok(Response::new(pb::RejectPendingResponse {}))
        }
        .instrument(span)
        .await
    }

    async fn set_device_tags(
        &self,
        request: Request<pb::SetDeviceTagsRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!("keyvault.set_device_tags", device_id = %req.device_id);
        let mut redis = self.redis.clone();
        async move {
            visible_device(&mut redis, &principal, &req.device_id)
                .await
                .map_err(status)?;
            registry::set_tags(&mut redis, &req.device_id, &req.tags, &principal.actor())
                .await
                .map(|r| Response::new(r.to_proto()))
                .map_err(status)
        }
        .instrument(span)
        .await
    }

    async fn set_device_name(
        &self,
        request: Request<pb::SetDeviceNameRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!("keyvault.set_device_name", device_id = %req.device_id);
        let mut redis = self.redis.clone();
        async move {
            let record = visible_device(&mut redis, &principal, &req.device_id)
                .await
                .map_err(status)?;
            registry::set_name(&mut redis, &record.device_id, &req.name, &principal.actor())
                .await
                .map(|r| Response::new(r.to_proto()))
                .map_err(status)
        }
        .instrument(span)
        .await
    }

    async fn get_cloud_public_key(
        &self,
        _request: Request<pb::GetCloudPublicKeyRequest>,
    ) -> Result<Response<pb::CloudPublicKey>, Status> {
        let ring = self.ring.snapshot();
        let current = ring
            .current()
            .ok_or_else(|| Status::internal("no live cloud key version"))?;
        Ok(Response::new(pb::CloudPublicKey {
            public_key_der: current.public_der.clone(),
            key_id: current.meta.key_id.clone(),
            version: current.meta.version,
        }))
    }

    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        // The earlier of our own queue-wait limit and the caller's deadline
        // (grpc-timeout): past it, nobody is waiting for the answer.
        let received = Instant::now();
        let deadline = [self.max_queue_wait, grpc_timeout(request.metadata())]
            .into_iter()
            .flatten()
            .min()
            .map(|wait| received + wait);
        let req = request.into_inner();
        let span = tracing::info_span!(
            "keyvault.open_session",
            gateway_id = %req.gateway_id,
            peer_addr = %req.peer_addr,
            device_id = field::Empty,
            outcome = field::Empty,
        );
        let mut redis = self.redis.clone();
        let pool = self.pool.clone();
        let ring = self.ring.snapshot();
        async move {
            let mut notes = session::Notes::default();
            let result =
                session::open_session(&pool, &ring, &mut redis, &req, deadline, &mut notes).await;
            let span = tracing::Span::current();
            match result {
                Ok((response, outcome, device_id)) => {
                    span.record("device_id", device_id.as_str());
                    span.record("outcome", outcome.as_str());
                    if outcome == session::Outcome::Ok {
                        registry::audit_write(
                            &mut redis,
                            session::audit_record(&req, &device_id, outcome, &notes),
                        )
                        .await;
                    } else {
                        // Counted per source and reason: a flood of these
                        // cannot push key-use records out of the stream.
                        trellis_core::audit::record_refusal_logged(
                            &mut redis,
                            &req.gateway_id,
                            "open_session",
                            outcome.as_str(),
                            &req.peer_addr,
                            &device_id,
                        )
                        .await;
                    }
                    if outcome == session::Outcome::Ok {
                        tracing::debug!("session granted");
                    } else {
                        tracing::info!("session refused");
                    }
                    Ok(Response::new(response))
                }
                Err(e) => {
                    span.record("outcome", "error");
                    // A failure after the private-key step (the registry or
                    // the grant's Redis writes) still used the key: audited.
                    // A full or expired queue and a malformed request never
                    // reached it, and a storm of those must not flood the log.
                    if matches!(e, KeyvaultError::Redis(_) | KeyvaultError::Internal(_)) {
                        registry::audit_write(
                            &mut redis,
                            trellis_core::audit::AuditRecord::new(
                                &req.gateway_id,
                                "open_session",
                                "",
                                "error",
                            )
                            .with("peer_addr", &req.peer_addr)
                            .with("error", e.to_string()),
                        )
                        .await;
                    }
                    Err(status(e))
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn sign(
        &self,
        request: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        let actor = trellis_auth::Principal::of(&request)?.actor();
        let req = request.into_inner();
        let span = tracing::info_span!(
            "keyvault.sign",
            purpose = %req.purpose,
            actor = %req.actor,
            data_len = req.data.len(),
            key_id = field::Empty,
        );
        let mut redis = self.redis.clone();
        let pool = self.pool.clone();
        let release = self.release_keys()?;
        async move {
            // Fresh: another keyvault may have rotated or retired a version
            // a moment ago, and a retired version must not sign (one
            // HGETALL; signing is rare).
            release.reload(&mut redis).await.map_err(status)?;
            let response = signing::sign(&pool, &mut redis, release.snapshot(), req, &actor)
                .await
                .map_err(status)?;
            tracing::Span::current().record("key_id", response.key_id.as_str());
            Ok(Response::new(response))
        }
        .instrument(span)
        .await
    }

    async fn get_signing_key(
        &self,
        request: Request<pb::GetSigningKeyRequest>,
    ) -> Result<Response<pb::SigningKey>, Status> {
        let req = request.into_inner();
        let span = tracing::debug_span!("keyvault.get_signing_key", purpose = %req.purpose);
        let _enter = span.enter();
        signing::signing_key(&self.release_keys()?.snapshot(), &req.purpose, req.version)
            .map(Response::new)
            .map_err(status)
    }

    async fn list_signing_keys(
        &self,
        request: Request<pb::ListSigningKeysRequest>,
    ) -> Result<Response<pb::ListSigningKeysResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::debug_span!("keyvault.list_signing_keys", purpose = %req.purpose);
        let ring = self.release_keys()?;
        let mut redis = self.redis.clone();
        async move {
            // Fresh: another keyvault may have rotated a moment ago.
            ring.reload(&mut redis).await.map_err(status)?;
            signing::signing_keys(&ring.snapshot(), &req.purpose)
                .map(Response::new)
                .map_err(status)
        }
        .instrument(span)
        .await
    }

    async fn rotate_signing_key(
        &self,
        request: Request<pb::RotateSigningKeyRequest>,
    ) -> Result<Response<pb::SigningKey>, Status> {
        let actor = trellis_auth::Principal::of(&request)?.actor();
        let req = request.into_inner();
        let span = tracing::info_span!(
            "keyvault.rotate_signing_key",
            purpose = %req.purpose,
            version = field::Empty
        );
        self.change_signing_key(&req.purpose, move |mut redis, ring| async move {
            crate::keyring::rotate(&mut redis, &ring, &actor).await
        })
        .instrument(span)
        .await
    }

    async fn retire_signing_key(
        &self,
        request: Request<pb::RetireSigningKeyRequest>,
    ) -> Result<Response<pb::SigningKey>, Status> {
        let actor = trellis_auth::Principal::of(&request)?.actor();
        let req = request.into_inner();
        let span = tracing::info_span!(
            "keyvault.retire_signing_key",
            purpose = %req.purpose,
            version = req.version,
            force = req.force
        );
        let (version, force) = (req.version, req.force);
        self.change_signing_key(&req.purpose, move |mut redis, ring| async move {
            release_key::retire(&mut redis, &ring, version, force, &actor).await
        })
        .instrument(span)
        .await
    }

    async fn unretire_signing_key(
        &self,
        request: Request<pb::UnretireSigningKeyRequest>,
    ) -> Result<Response<pb::SigningKey>, Status> {
        let actor = trellis_auth::Principal::of(&request)?.actor();
        let req = request.into_inner();
        let span = tracing::info_span!(
            "keyvault.unretire_signing_key",
            purpose = %req.purpose,
            version = req.version
        );
        let version = req.version;
        self.change_signing_key(&req.purpose, move |mut redis, ring| async move {
            crate::keyring::unretire(&mut redis, &ring, version, &actor).await
        })
        .instrument(span)
        .await
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let (limit, device) = audit_query(req.limit, &req.device_id)?;
        let mut redis = self.redis.clone();
        let mut scope = AuditScope::new(&principal);
        // Another organisation's records are skipped: read further back.
        let scan = if scope.everything() {
            limit
        } else {
            (limit * 10).min(MAX_AUDIT_LIMIT * 10)
        };
        let records = trellis_core::audit::recent(&mut redis, scan, device.as_deref())
            .await
            .map_err(|e| status(e.into()))?;
        let mut visible = Vec::new();
        for r in records.into_iter().rev() {
            if visible.len() < limit && scope.allows(&mut redis, &r.actor, &r.device_id).await {
                visible.push(r);
            }
        }
        visible.reverse();
        Ok(Response::new(pb::ListAuditResponse {
            records: visible
                .into_iter()
                .map(|r| pb::AuditRecord {
                    id: r.id,
                    time_ms: r.time_ms,
                    actor: r.actor,
                    action: r.action,
                    device_id: r.device_id,
                    outcome: r.outcome,
                    detail: r.detail.into_iter().collect(),
                })
                .collect(),
        }))
    }

    async fn list_refusals(
        &self,
        request: Request<pb::ListRefusalsRequest>,
    ) -> Result<Response<pb::ListRefusalsResponse>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let (limit, device) = audit_query(req.limit, &req.device_id)?;
        let mut redis = self.redis.clone();
        let mut scope = AuditScope::new(&principal);
        let scan = if scope.everything() {
            limit
        } else {
            trellis_core::audit::REFUSALS_MAX
        };
        let refusals = trellis_core::audit::refusals(&mut redis, scan, device.as_deref())
            .await
            .map_err(|e| status(e.into()))?;
        let mut visible = Vec::new();
        for r in refusals {
            // Only attempts that claimed one of the organisation's devices.
            if visible.len() < limit && scope.allows(&mut redis, "", &r.last_device).await {
                visible.push(r);
            }
        }
        Ok(Response::new(pb::ListRefusalsResponse {
            refusals: visible
                .into_iter()
                .map(|r| pb::RefusalCount {
                    source: r.source,
                    action: r.action,
                    reason: r.reason,
                    count: r.count,
                    first_ms: r.first_ms,
                    last_ms: r.last_ms,
                    last_device_id: r.last_device,
                    last_actor: r.last_actor,
                })
                .collect(),
        }))
    }
    async fn rotate_cloud_key(
        &self,
        request: Request<pb::RotateCloudKeyRequest>,
    ) -> Result<Response<pb::CloudKeyVersion>, Status> {
        let actor = trellis_auth::Principal::of(&request)?.actor();
        let span = tracing::info_span!("keyvault.rotate_cloud_key", version = field::Empty);
        let mut redis = self.redis.clone();
        let ring = self.ring.clone();
        async move {
            let meta = cloud_keys::rotate(&mut redis, &ring, &actor)
                .await
                .map_err(status)?;
            tracing::Span::current().record("version", meta.version);
            Ok(Response::new(version_proto(&ring, meta.version, None)))
        }
        .instrument(span)
        .await
    }

    async fn cloud_key_status(
        &self,
        _request: Request<pb::CloudKeyStatusRequest>,
    ) -> Result<Response<pb::CloudKeyStatusResponse>, Status> {
        let span = tracing::debug_span!("keyvault.cloud_key_status");
        let mut redis = self.redis.clone();
        let ring = self.ring.clone();
        let grace = self.retire_grace_days;
        async move {
            ring.reload(&mut redis).await.map_err(status)?;
            let holdings = cloud_keys::holdings(&mut redis).await.map_err(status)?;
            let counts = cloud_keys::count(&holdings, grace, trellis_core::time::now_ms());
            let snapshot = ring.snapshot();
            let versions = snapshot
                .all()
                .map(|k| version_proto(&ring, k.meta.version, counts.get(&k.meta.version)))
                .collect();
            Ok(Response::new(pb::CloudKeyStatusResponse {
                versions,
                retire_grace_days: grace,
            }))
        }
        .instrument(span)
        .await
    }

    async fn retire_cloud_key(
        &self,
        request: Request<pb::RetireCloudKeyRequest>,
    ) -> Result<Response<pb::CloudKeyVersion>, Status> {
        let actor = trellis_auth::Principal::of(&request)?.actor();
        let req = request.into_inner();
        let span = tracing::info_span!(
            "keyvault.retire_cloud_key",
            version = req.version,
            force = req.force
        );
        let mut redis = self.redis.clone();
        let ring = self.ring.clone();
        let grace = self.retire_grace_days;
        async move {
            let meta = cloud_keys::retire(&mut redis, &ring, req.version, req.force, grace, &actor)
                .await
                .map_err(status)?;
            Ok(Response::new(version_proto(&ring, meta.version, None)))
        }
        .instrument(span)
        .await
    }

    async fn unretire_cloud_key(
        &self,
        request: Request<pb::UnretireCloudKeyRequest>,
    ) -> Result<Response<pb::CloudKeyVersion>, Status> {
        let actor = trellis_auth::Principal::of(&request)?.actor();
        let req = request.into_inner();
        let span = tracing::info_span!("keyvault.unretire_cloud_key", version = req.version);
        let mut redis = self.redis.clone();
        let ring = self.ring.clone();
        async move {
            let meta = cloud_keys::unretire(&mut redis, &ring, req.version, &actor)
                .await
                .map_err(status)?;
            Ok(Response::new(version_proto(&ring, meta.version, None)))
        }
        .instrument(span)
        .await
    }

    async fn get_cloud_key_announcement(
        &self,
        request: Request<pb::GetCloudKeyAnnouncementRequest>,
    ) -> Result<Response<pb::CloudKeyAnnouncement>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!(
            "keyvault.get_cloud_key_announcement",
            gateway_id = %req.gateway_id,
            signing_version = req.signing_version,
            version = req.version,
        );
        let mut redis = self.redis.clone();
        let pool = self.pool.clone();
        let ring = self.ring.snapshot();
        async move {
            let target = if req.version == 0 {
                ring.current()
            } else {
                ring.get(req.version)
            }
            .filter(|k| k.live())
            .ok_or_else(|| {
                Status::not_found(format!("cloud key version {} is not live", req.version))
            })?;
            let signer = ring
                .get(req.signing_version)
                .filter(|k| k.live())
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "cloud key version {} (the session's) is not live",
                        req.signing_version
                    ))
                })?;
            let message = trellis_wire::rotation::cloud_key_signed_bytes(
                target.meta.version,
                &target.public_der,
            );
            let signature = pool
                .sign_with(signer.key.clone(), cloud_keys::pkcs1_sha256_input(&message))
                .await
                .map_err(|e| status(e.into()))?;
            let payload = trellis_wire::rotation::CloudKeyAnnouncement {
                version: target.meta.version,
                public_key_der: target.public_der.clone(),
                signature,
            }
            .encode();
            registry::audit_write(
                &mut redis,
                AuditRecord::new(&req.gateway_id, "cloud_key_announcement", "", "ok")
                    .with("version", target.meta.version.to_string())
                    .with("signing_version", signer.meta.version.to_string()),
            )
            .await;
            Ok(Response::new(pb::CloudKeyAnnouncement {
                version: target.meta.version,
                payload,
            }))
        }
        .instrument(span)
        .await
    }

    async fn register_next_device_key(
        &self,
        request: Request<pb::RegisterNextDeviceKeyRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!(
            "keyvault.register_next_device_key",
            device_id = %req.device_id,
            gateway_id = %req.gateway_id,
        );
        let mut redis = self.redis.clone();
        async move {
            registry::register_next_key(&mut redis, &req.device_id, &req.offer, &req.gateway_id)
                .await
                .map(|r| Response::new(r.to_proto()))
                .map_err(status)
        }
        .instrument(span)
        .await
    }
}

/// One version for `keys status` and the key commands' answers.
fn version_proto(
    ring: &SharedKeyring,
    version: u32,
    counts: Option<&cloud_keys::Counts>,
) -> pb::CloudKeyVersion {
    let snapshot = ring.snapshot();
    let current = snapshot.current().map(|c| c.meta.version);
    let counts = counts.cloned().unwrap_or_default();
    match snapshot.get(version) {
        Some(k) => pb::CloudKeyVersion {
            version,
            key_id: k.meta.key_id.clone(),
            created_ms: k.meta.created_ms,
            retired_ms: k.meta.retired_ms,
            current: current == Some(version),
            devices: counts.devices,
            legacy_devices: counts.legacy,
            recent_devices: counts.recent,
            public_key_der: k.public_der.clone(),
        },
        None => pb::CloudKeyVersion {
            version,
            ..Default::default()
        },
    }
}

/// A ListAudit/ListRefusals request's limit (0: the default, capped) and
/// device filter (empty: none).
fn audit_query(limit: u32, device_id: &str) -> Result<(usize, Option<String>), Status> {
    let limit = match limit as usize {
        0 => DEFAULT_AUDIT_LIMIT,
        n => n.min(MAX_AUDIT_LIMIT),
    };
    let device = (!device_id.is_empty())
        .then(|| registry::parse_device_id(device_id))
        .transpose()
        .map_err(status)?;
    Ok((limit, device))
}

/// Which audit records a caller may read: the installation's first owner
/// (and a service) everything; anyone else what their organisation's users
/// did and what happened to their organisation's devices.
struct AuditScope<'a> {
    principal: &'a trellis_auth::Principal,
    device_orgs: std::collections::HashMap<String, Option<String>>,
}

impl<'a> AuditScope<'a> {
    fn new(principal: &'a trellis_auth::Principal) -> Self {
        Self {
            principal,
            device_orgs: std::collections::HashMap::new(),
        }
    }

    fn everything(&self) -> bool {
        self.principal.is_service() || self.principal.has(trellis_auth::Scope::ClusterAdmin)
    }

    async fn allows(&mut self, redis: &mut Redis, actor: &str, device_id: &str) -> bool {
        if self.everything() {
            return true;
        }
        let org = &self.principal.org;
        // Actors are `user@org` or `user@org (token id)`.
        if let Some((_, rest)) = actor.split_once('@')
            && rest.split(' ').next() == Some(org.as_str())
        {
            return true;
        }
        if device_id.is_empty() {
            return false;
        }
        if !self.device_orgs.contains_key(device_id) {
            let found = registry::get_device(redis, device_id)
                .await
                .ok()
                .map(|d| d.organization);
            self.device_orgs.insert(device_id.to_string(), found);
        }
        self.device_orgs
            .get(device_id)
            .cloned()
            .flatten()
            .as_deref()
            == Some(org.as_str())
    }
}

/// The device's record if the caller may see it; another organisation's
/// device is not found, exactly as one that does not exist.
async fn visible_device(
    redis: &mut Redis,
    principal: &trellis_auth::Principal,
    device_id: &str,
) -> Result<registry::DeviceRecord, KeyvaultError> {
    // A name of the caller's organisation stands for its device's id.
    let resolved;
    let device_id = if device_id.trim().parse::<trellis_wire::DeviceId>().is_err()
        && registry::parse_name(device_id).is_ok_and(|n| !n.is_empty())
    {
        match registry::id_for_name(redis, &principal.org, device_id).await? {
            Some(id) => {
                resolved = id;
                resolved.as_str()
            }
            None => {
                return Err(KeyvaultError::NotFound(format!(
                    "no device is named {:?}",
                    device_id.trim()
                )));
            }
        }
    } else {
        device_id
    };
    let record = registry::get_device(redis, device_id).await?;
    if principal.sees(&record.organization) {
        Ok(record)
    } else {
        Err(KeyvaultError::NotFound(format!(
            "device {} is not registered",
            record.device_id
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_is_read_in_every_unit() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        for (v, d) in [
            ("2S", Duration::from_secs(2)),
            ("1500m", Duration::from_millis(1500)),
            ("3M", Duration::from_secs(180)),
            ("10u", Duration::from_micros(10)),
        ] {
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m), Some(d), "{v}");
        }
        m.insert("grpc-timeout", "12X".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }
}
