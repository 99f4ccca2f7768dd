//! Where releases come from. A rollout records the release's product,
//! version and image SHA-256 when it is created (a device counts as updated
//! when it reports that SHA-256); the real source is the signer's
//! `GetRelease`, tests use [`MemoryReleases`].
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use trellis_core::telemetry::{TraceInterceptor, TracedChannel};
use trellis_proto::v1::GetReleaseRequest;
use trellis_proto::v1::signer_client::SignerClient;
use trellis_records::policy_release::is_policy_release_id;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseInfo {
    pub release_id: String,
    pub product_id: u32,
    pub version: u32,
    /// Lowercase hex.
    pub image_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("release {0:?} does not exist (create it with `trellis release create`)")]
    NotFound(String),
    #[error("cannot read release {id:?} from the signer: {message}")]
    Unavailable { id: String, message: String },
    /// A policy release whose signatures devices would not accept yet.
    #[error("{0}")]
    Incomplete(String),
}

pub trait ReleaseSource: Send + Sync + 'static {
    fn get<'a>(&'a self, release_id: &'a str) -> BoxFuture<'a, Result<ReleaseInfo, ReleaseError>>;
}

/// The signer's `GetRelease` (`ota.signer_url`).
#[derive(Clone)]
pub struct SignerReleases {
    client: SignerClient<TracedChannel>,
}

impl SignerReleases {
    pub fn new(
        signer_url: &str,
        tls: Option<&trellis_core::tls::ServiceTls>,
    ) -> anyhow::Result<Self> {
        let endpoint = trellis_core::tls::endpoint(signer_url, tls)
            .map_err(|e| anyhow::anyhow!("ota.signer_url {signer_url:?} is not a URL: {e}"))?
            .connect_timeout(Duration::from_secs(5));
        Ok(Self {
            client: SignerClient::with_interceptor(
                endpoint.connect_lazy(),
                TraceInterceptor::SERVICE,
            ),
        })
    }
}

impl ReleaseSource for SignerReleases {
    fn get<'a>(&'a self, release_id: &'a str) -> BoxFuture<'a, Result<ReleaseInfo, ReleaseError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let request = GetReleaseRequest {
                release_id: release_id.to_string(),
            };
            if is_policy_release_id(release_id) {
                // A trust policy rotation: "updated" is the device reporting
                // the policy's SHA-256 (Hello extension 0x04).
                return match client.get_policy_release(request).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        if !r.complete {
                            return Err(ReleaseError::Incomplete(format!(
                                "policy release {} is not fully signed yet (devices would refuse \
                                 it); `trellis policy show --release {}` says which signatures \
                                 are missing",
                                r.release_id, r.release_id
                            )));
                        }
                        Ok(ReleaseInfo {
                            release_id: r.release_id,
                            product_id: r.product_id,
                            version: u32::try_from(r.version).unwrap_or(u32::MAX),
                            image_sha256: r.policy_sha256.to_ascii_lowercase(),
                        })
                    }
                    Err(e) if e.code() == tonic::Code::NotFound => {
                        Err(ReleaseError::NotFound(release_id.to_string()))
                    }
                    Err(e) => Err(ReleaseError::Unavailable {
                        id: release_id.to_string(),
                        message: format!("{:?}: {}", e.code(), e.message()),
                    }),
                };
            }
            match client.get_release(request).await {
                Ok(r) => {
                    let r = r.into_inner();
                    Ok(ReleaseInfo {
                        release_id: r.release_id,
                        product_id: r.product_id,
                        version: r.version,
                        image_sha256: r.image_sha256.to_ascii_lowercase(),
                    })
                }
                Err(e) if e.code() == tonic::Code::NotFound => {
                    Err(ReleaseError::NotFound(release_id.to_string()))
                }
                Err(e) => Err(ReleaseError::Unavailable {
                    id: release_id.to_string(),
                    message: format!("{:?}: {}", e.code(), e.message()),
                }),
            }
        })
    }
}

/// Releases held in memory (tests, demos).
#[derive(Debug, Clone, Default)]
pub struct MemoryReleases {
    releases: Arc<Mutex<HashMap<String, ReleaseInfo>>>,
}

impl MemoryReleases {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, release: ReleaseInfo) {
        self.releases
            .lock()
            .expect("releases lock")
            .insert(release.release_id.clone(), release);
    }
}

impl ReleaseSource for MemoryReleases {
    fn get<'a>(&'a self, release_id: &'a str) -> BoxFuture<'a, Result<ReleaseInfo, ReleaseError>> {
        let found = self
            .releases
            .lock()
            .expect("releases lock")
            .get(release_id)
            .cloned();
        Box::pin(async move { found.ok_or_else(|| ReleaseError::NotFound(release_id.to_string())) })
    }
}
