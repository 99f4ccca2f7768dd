//! Delivering a release to a device. The scheduler only decides *when*; the
//! gateway that owns the device's session does the transfer. The real
//! [`Deliverer`] calls `DeviceService.DeliverUpdate` on any gateway, which
//! routes the request to the owner; tests put a simulated fleet here.
use futures::future::BoxFuture;
use std::time::Duration;
use trellis_core::telemetry::{TraceInterceptor, TracedChannel};
use trellis_proto::v1::device_service_client::DeviceServiceClient;
use trellis_proto::v1::{DeliverUpdateRequest, DeliverUpdateResponse, DeliveryOutcome};

pub trait Deliverer: Send + Sync + 'static {
    /// Sends `release_id` to `device_id` and returns when the device took
    /// the image (SENT), refused it (REJECTED) or the transfer broke
    /// (FAILED). An `Err` is treated as FAILED with its message.
    fn deliver<'a>(
        &'a self,
        device_id: &'a str,
        release_id: &'a str,
        rollout_id: &'a str,
    ) -> BoxFuture<'a, Result<DeliverUpdateResponse, String>>;
}

/// `DeviceService.DeliverUpdate` on a gateway (`ota.gateway_url`).
#[derive(Clone)]
pub struct GatewayDeliverer {
    client: DeviceServiceClient<TracedChannel>,
    timeout_ms: u32,
}

impl GatewayDeliverer {
    /// Connects lazily: the scheduler starts even while gateways do not.
    pub fn new(
        gateway_url: &str,
        tls: Option<&trellis_core::tls::ServiceTls>,
    ) -> anyhow::Result<Self> {
        let endpoint = trellis_core::tls::endpoint(gateway_url, tls)
            .map_err(|e| anyhow::anyhow!("ota.gateway_url {gateway_url:?} is not a URL: {e}"))?
            .connect_timeout(Duration::from_secs(5));
        Ok(Self {
            client: DeviceServiceClient::with_interceptor(
                endpoint.connect_lazy(),
                TraceInterceptor::SERVICE,
            ),
            timeout_ms: 0,
        })
    }
}

impl Deliverer for GatewayDeliverer {
    fn deliver<'a>(
        &'a self,
        device_id: &'a str,
        release_id: &'a str,
        rollout_id: &'a str,
    ) -> BoxFuture<'a, Result<DeliverUpdateResponse, String>> {
        let mut client = self.client.clone();
        let request = DeliverUpdateRequest {
            device_id: device_id.to_string(),
            release_id: release_id.to_string(),
            rollout_id: rollout_id.to_string(),
            timeout_ms: self.timeout_ms,
        };
        Box::pin(async move {
            match client.deliver_update(request).await {
                Ok(r) => Ok(r.into_inner()),
                // The device is not online anywhere: a broken transfer, retried
                // when it next connects.
                Err(e) => Err(format!("{:?}: {}", e.code(), e.message())),
            }
        })
    }
}

/// A FAILED response with `reason` (for errors that never reached a device).
pub fn failed(reason: &str, message: String) -> DeliverUpdateResponse {
    DeliverUpdateResponse {
        outcome: DeliveryOutcome::Failed as i32,
        reason: reason.to_string(),
        message,
        bytes_sent: 0,
        gateway_id: String::new(),
    }
}
