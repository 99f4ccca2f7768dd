//! The gRPC edge: `trellis.v1.Ota`, a thin layer over [`Scheduler`].
use crate::record::RolloutState;
use crate::scheduler::Scheduler;
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use trellis_proto::v1 as pb;
use trellis_proto::v1::ota_server::Ota;

pub struct OtaService {
    scheduler: Scheduler,
    /// How often WatchRollout looks for changes.
    poll: Duration,
    /// Where rollout actions are audited (the durable store).
    audit: trellis_core::redis_conn::Redis,
}

impl OtaService {
    pub fn new(scheduler: Scheduler, tick_ms: u64, audit: trellis_core::redis_conn::Redis) -> Self {
        Self {
            scheduler,
            poll: Duration::from_millis((tick_ms / 2).clamp(20, 500)),
            audit,
        }
    }

    /// Whether `principal` may see product `product_id`'s rollouts (its
    /// organisation's products; every product for a service).
    async fn sees_product(
        &self,
        principal: &trellis_auth::Principal,
        product_id: u32,
    ) -> Result<bool, Status> {
        if principal.is_service() {
            return Ok(true);
        }
        let org = trellis_auth::store::product_org(&mut self.audit.clone(), product_id)
            .await
            .map_err(Status::from)?;
        Ok(principal.sees(&org))
    }

    /// `Ok` when the rollout exists and is the caller's organisation's;
    /// another organisation's rollout answers exactly as a missing one.
    async fn check_rollout(
        &self,
        principal: &trellis_auth::Principal,
        rollout_id: &str,
    ) -> Result<(), Status> {
        let loaded = self.scheduler.load(rollout_id).await?;
        if self.sees_product(principal, loaded.meta.product_id).await? {
            Ok(())
        } else {
            Err(crate::error::OtaError::NotFound(format!(
                "rollout {rollout_id:?} does not exist (trellis rollout list)"
            ))
            .into())
        }
    }

    /// One security record per operator action on a rollout, naming the
    /// authenticated caller; a failed write is logged, the action stands.
    async fn audit(&self, actor: &str, action: &str, rollout: &str, detail: &[(&str, String)]) {
        let mut record =
            trellis_core::audit::AuditRecord::new(actor, action, "", "ok").with("rollout", rollout);
        for (k, v) in detail {
            record = record.with(k, v.clone());
        }
        trellis_core::audit::append_logged(&mut self.audit.clone(), &record).await;
    }
}

/// The product a release id (`<product>-<version>`) names.
fn product_of_release(release_id: &str) -> Option<u32> {
    release_id
        .trim()
        .split_once('-')
        .and_then(|(p, _)| p.parse().ok())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::RolloutStatus, Status>> + Send>>;

#[tonic::async_trait]
impl Ota for OtaService {
    async fn create_rollout(
        &self,
        request: Request<pb::CreateRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let actor = principal.actor();
        let req = request.into_inner();
        let release = req.release_id.clone();
        // "P-V": another organisation's release is as missing as none.
        if let Some(product) = product_of_release(&release)
            && !self.sees_product(&principal, product).await?
        {
            return Err(
                crate::error::OtaError::from(crate::release::ReleaseError::NotFound(
                    release.trim().to_string(),
                ))
                .into(),
            );
        }
        let status = self.scheduler.create(req).await?;
        self.audit(
            &actor,
            "rollout_create",
            &status.rollout_id,
            &[("release", release)],
        )
        .await;
        Ok(Response::new(status))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let id = request.into_inner().rollout_id;
        self.check_rollout(&principal, &id).await?;
        Ok(Response::new(self.scheduler.status(&id, true).await?))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let mut rollouts = Vec::new();
        for r in self.scheduler.list().await? {
            let product = r
                .spec
                .as_ref()
                .and_then(|s| product_of_release(&s.release_id))
                .unwrap_or_default();
            if self.sees_product(&principal, product).await? {
                rollouts.push(r);
            }
        }
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::RolloutAction>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let actor = principal.actor();
        let r = request.into_inner();
        self.check_rollout(&principal, &r.rollout_id).await?;
        let status = self.scheduler.pause(&r.rollout_id, &r.reason).await?;
        self.audit(
            &actor,
            "rollout_pause",
            &r.rollout_id,
            &[("reason", r.reason)],
        )
        .await;
        Ok(Response::new(status))
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutAction>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let actor = principal.actor();
        let r = request.into_inner();
        self.check_rollout(&principal, &r.rollout_id).await?;
        let status = self.scheduler.resume(&r.rollout_id, &r.reason).await?;
        self.audit(
            &actor,
            "rollout_resume",
            &r.rollout_id,
            &[("reason", r.reason)],
        )
        .await;
        Ok(Response::new(status))
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::RolloutAction>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let actor = principal.actor();
        let r = request.into_inner();
        self.check_rollout(&principal, &r.rollout_id).await?;
        let status = self.scheduler.abort(&r.rollout_id, &r.reason).await?;
        self.audit(
            &actor,
            "rollout_abort",
            &r.rollout_id,
            &[("reason", r.reason)],
        )
        .await;
        Ok(Response::new(status))
    }

    type WatchRolloutStream = WatchStream;

    async fn watch_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let id = request.into_inner().rollout_id;
        self.check_rollout(&principal, &id).await?;
        let first = self.scheduler.load(&id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let scheduler = self.scheduler.clone();
        let poll = self.poll;
        tokio::spawn(async move {
            let mut rev = first.meta.rev;
            let ended = first.meta.state.ended();
            if tx.send(Ok(first.to_status(true))).await.is_err() || ended {
                return;
            }
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = tx.closed() => return,
                }
                match scheduler.revision(&id).await {
                    Ok((r, _)) if r == rev => continue,
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
                match scheduler.load(&id).await {
                    Ok(l) => {
                        rev = l.meta.rev;
                        let ended = matches!(
                            l.meta.state,
                            RolloutState::Aborted | RolloutState::Completed
                        );
                        if tx.send(Ok(l.to_status(true))).await.is_err() || ended {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn device_hello(
        &self,
        request: Request<pb::DeviceHelloRequest>,
    ) -> Result<Response<pb::DeviceHelloResponse>, Status> {
        Ok(Response::new(
            self.scheduler.device_hello(request.into_inner()).await?,
        ))
    }

    async fn report_delivery(
        &self,
        request: Request<pb::ReportDeliveryRequest>,
    ) -> Result<Response<pb::ReportDeliveryResponse>, Status> {
        Ok(Response::new(
            self.scheduler.report_delivery(request.into_inner()).await?,
        ))
    }
}
