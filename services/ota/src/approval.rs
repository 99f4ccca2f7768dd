//! The customer's approval hook. Before a device is updated the scheduler
//! POSTs `{"device": "<id>", "product": <n>, "release": "<id>", "rollout":
//! "<id>"}` to the rollout's `approval_url`; only HTTP 200 with a JSON body
//! `{"approve": true}` is a yes. `{"approve": false, "reason": "..."}` is a
//! no (the reason is shown); any other status, a body that is not that JSON,
//! a connection error or no answer within `approval_timeout_ms` is also a
//! no, shown as such. A no leaves the device HELD.
//!
//! The URL is checked before every call by the shared SSRF guard
//! (`trellis_core::outbound`): a host that resolves to loopback, link-local,
//! unspecified or a cloud metadata address is refused (the device is held
//! with `approval_refused: ...`) unless the address is in
//! `ota.approval_allowed_targets`; the request goes to the checked address.
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What the scheduler sends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApprovalRequest {
    pub device: String,
    pub product: u32,
    pub release: String,
    pub rollout: String,
}

/// What the hook answers.
#[derive(Debug, Clone, Deserialize)]
struct ApprovalAnswer {
    approve: bool,
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Approved,
    /// Held: a reason code and message (`approval_denied: ...`,
    /// `approval_timeout: approval timed out after 5000 ms`, ...).
    Held(String),
}

pub trait Approver: Send + Sync + 'static {
    fn approve<'a>(
        &'a self,
        url: &'a str,
        request: &'a ApprovalRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Decision>;
}

/// The real hook caller (reqwest, HTTP; see the README for https).
#[derive(Clone, Default)]
pub struct HttpApprover {
    /// Addresses allowed although the SSRF guard refuses them.
    allowed: Vec<trellis_core::outbound::Cidr>,
}

impl HttpApprover {
    /// Refuses every loopback, link-local, unspecified and metadata address.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows `allowed` (`ota.approval_allowed_targets`) past the guard.
    pub fn with_allowed(allowed: Vec<trellis_core::outbound::Cidr>) -> Self {
        Self { allowed }
    }

    /// As configured: `ota.approval_allowed_targets`.
    pub fn from_config(config: &trellis_core::Config) -> anyhow::Result<Self> {
        let allowed = trellis_core::outbound::parse_cidrs(&config.ota.approval_allowed_targets)
            .map_err(|e| anyhow::anyhow!("ota.approval_allowed_targets: {e}"))?;
        Ok(Self::with_allowed(allowed))
    }
}

impl Approver for HttpApprover {
    fn approve<'a>(
        &'a self,
        url: &'a str,
        request: &'a ApprovalRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Decision> {
        Box::pin(async move {
            let ms = timeout.as_millis();
            let call = async {
                let target = trellis_core::outbound::check_url(
                    url,
                    &self.allowed,
                    "ota.approval_allowed_targets",
                )
                .await
                .map_err(|e| format!("approval_refused: {e}"))?;
                // Connect to the address that was checked, never a second
                // DNS answer (rebinding).
                let client = reqwest::Client::builder()
                    .resolve(&target.host, target.addr)
                    .build()
                    .map_err(|e| format!("approval_error: {e}"))?;
                let response = client
                    .post(url)
                    .json(request)
                    .send()
                    .await
                    .map_err(|e| format!("approval_error: {url} could not be reached: {e}"))?;
                let status = response.status();
                if status != reqwest::StatusCode::OK {
                    return Err(format!("approval_error: {url} answered HTTP {status}"));
                }
                let answer: ApprovalAnswer = response.json().await.map_err(|e| {
                    format!("approval_error: {url} did not answer {{\"approve\": true|false}}: {e}")
                })?;
                Ok(answer)
            };
            match tokio::time::timeout(timeout, call).await {
                Err(_) => Decision::Held(format!(
                    "approval_timeout: approval timed out after {ms} ms"
                )),
                Ok(Err(reason)) => Decision::Held(reason),
                Ok(Ok(a)) if a.approve => Decision::Approved,
                Ok(Ok(a)) if a.reason.is_empty() => {
                    Decision::Held("approval_denied: the approval URL said no".into())
                }
                Ok(Ok(a)) => Decision::Held(format!("approval_denied: {}", a.reason)),
            }
        })
    }
}
