//! The `Signer` gRPC service: the rules of each RPC, one tracing span per
//! RPC, typed errors turned into statuses at the edge.
use crate::cloud_keys::CloudReleaseKeys;
use crate::error::{Result, SignerError};
use crate::store::{self, Added, Created, ImageMeta, ReleaseRecord, StoredPolicy};
use crate::validate;
use sha2::{Digest, Sha256};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use trellis_core::audit::{self, AuditRecord};
use trellis_core::redis_conn::Redis;
use trellis_core::telemetry::TracedChannel;
use trellis_core::time::now_ms;
use trellis_firmware::{
    KeyRef, ManifestSignature, PolicyReport, TrustPolicy, TrustedKey, build_manifest,
    encode_manifest, public_key_from_pem, public_key_to_pem, verify_signature,
};
use trellis_proto::v1 as pb;
use trellis_proto::v1::key_vault_client::KeyVaultClient;
use trellis_proto::v1::signer_server::Signer;

/// Who the signer is in keyvault's audit log.
pub const ACTOR: &str = "signer";
/// Keyvault's purpose for release manifests.
pub const RELEASE_PURPOSE: &str = "release";
pub use crate::cloud_keys::CLOUD_RELEASE_KEY_NAME;

#[derive(Clone)]
pub struct SignerService {
    redis: Redis,
    keyvault: KeyVaultClient<TracedChannel>,
    keyvault_url: String,
    max_image_bytes: u64,
}

impl std::fmt::Debug for SignerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignerService")
            .field("keyvault_url", &self.keyvault_url)
            .field("max_image_bytes", &self.max_image_bytes)
            .finish_non_exhaustive()
    }
}

fn status(e: SignerError) -> Status {
    match &e {
        SignerError::Redis(_)
        | SignerError::Internal(_)
        | SignerError::Corrupt(_)
        | SignerError::Keyvault { .. } => tracing::warn!(error = %e, "request failed"),
        _ => tracing::info!(error = %e, "request refused"),
    }
    e.into()
}

impl SignerService {
    pub fn new(
        redis: Redis,
        keyvault: KeyVaultClient<TracedChannel>,
        keyvault_url: impl Into<String>,
        max_image_bytes: u64,
    ) -> Self {
        Self {
            redis,
            keyvault,
            keyvault_url: keyvault_url.into(),
            max_image_bytes,
        }
    }

    /// UploadImage: the header, then data; hashed while it streams; stored
    /// only once the whole declared image arrived within the limit. The
    /// image belongs to its product's organisation (never one the caller
    /// names), and only a caller who sees that organisation may upload.
    pub async fn upload<S>(
        &self,
        mut stream: S,
        principal: &trellis_auth::Principal,
    ) -> Result<ImageMeta>
    where
        S: Stream<Item = Result<pb::UploadImageRequest, Status>> + Unpin,
    {
        use pb::upload_image_request::Part;
        let broke = |received: u64, e: Status| {
            SignerError::Aborted(format!(
                "the upload broke off after {received} bytes ({}); nothing was stored, upload \
                 again",
                e.message()
            ))
        };
        let header = match stream.next().await {
            Some(Ok(pb::UploadImageRequest {
                part: Some(Part::Header(h)),
            })) => h,
            Some(Ok(_)) => {
                return Err(SignerError::InvalidArgument(
                    "the first UploadImage message must be the header (product_id, size)".into(),
                ));
            }
            Some(Err(e)) => return Err(broke(0, e)),
            None => {
                return Err(SignerError::InvalidArgument(
                    "the upload is empty: send a header, then the image".into(),
                ));
            }
        };
        let product_id = validate::product_id(header.product_id)?;
        guard_product(&self.redis, principal, product_id, || {
            not_your_product(product_id)
        })
        .await?;
        let organization = trellis_auth::store::product_org(&mut self.redis.clone(), product_id)
            .await
            .map_err(|e| {
                SignerError::Internal(format!(
                    "cannot read product {product_id}'s organisation: {e}"
                ))
            })?;
        if !header.organization.trim().is_empty()
            && validate::organization(&header.organization)? != organization
        {
            return Err(SignerError::InvalidArgument(format!(
                "product {product_id} belongs to organisation {organization}, not {}; leave the \
                 header's organization empty",
                header.organization.trim()
            )));
        }
        if header.size == 0 {
            return Err(SignerError::InvalidArgument(
                "the image is empty (declared size 0): an empty image is never a release".into(),
            ));
        }
        if header.size > self.max_image_bytes {
            return Err(SignerError::InvalidArgument(format!(
                "the image is {} bytes, over the signer's limit of {} bytes (signer.max_image_bytes)",
                header.size, self.max_image_bytes
            )));
        }
        let declared = header.size;
        let mut hasher = Sha256::new();
        // Bounded by `declared`, itself bounded by max_image_bytes.
        let mut image = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
        while let Some(message) = stream.next().await {
            let received = image.len() as u64;
            match message.map_err(|e| broke(received, e))?.part {
                Some(Part::Data(data)) => {
                    let total = received + data.len() as u64;
                    if total > declared {
                        return Err(SignerError::InvalidArgument(format!(
                            "more data than declared: {total} bytes arrived but the header said \
                             {declared}; nothing was stored"
                        )));
                    }
                    hasher.update(&data);
                    image.extend_from_slice(&data);
                }
                Some(Part::Header(_)) => {
                    return Err(SignerError::InvalidArgument(
                        "a second header in the middle of the upload; send one header, then data"
                            .into(),
                    ));
                }
                None => {}
            }
        }
        let received = image.len() as u64;
        if received == 0 {
            return Err(SignerError::InvalidArgument(
                "the image is empty (no data arrived): an empty image is never a release".into(),
            ));
        }
        if received != declared {
            return Err(SignerError::InvalidArgument(format!(
                "only {received} of the declared {declared} bytes arrived; nothing was stored, \
                 upload again"
            )));
        }
        let sha256 = hex::encode(hasher.finalize());
        let meta = ImageMeta {
            sha256: sha256.clone(),
            size: received,
            product_id,
            organization,
            uploaded_at_ms: now_ms(),
        };
        let mut redis = self.redis.clone();
        let stored = store::put_image(&mut redis, &meta, &image).await?;
        if stored.organization != meta.organization {
            // Another organisation's image: which product is none of
            // this caller's business.
            return Err(SignerError::FailedPrecondition(format!(
                "image {sha256} is already stored for another product; the same bytes cannot be \
                 firmware for product {product_id} too"
            )));
        }
        if stored.product_id != product_id {
            return Err(SignerError::FailedPrecondition(format!(
                "image {sha256} is already stored for product {}; the same bytes cannot be \
                 firmware for product {product_id} too",
                stored.product_id
            )));
        }
        tracing::info!(sha256 = %sha256, size = received, product_id, "image stored");
        Ok(stored)
    }

    pub(crate) fn redis(&self) -> Redis {
        self.redis.clone()
    }

    pub(crate) fn keyvault(&self) -> KeyVaultClient<TracedChannel> {
        self.keyvault.clone()
    }

    pub(crate) fn keyvault_url(&self) -> &str {
        &self.keyvault_url
    }

    pub async fn get_image(&self, sha256: &str) -> Result<ImageMeta> {
        let sha256 = validate::sha256_hex("sha256", sha256)?;
        store::get_image_meta(&mut self.redis.clone(), &sha256)
            .await?
            .ok_or_else(|| no_image(&sha256))
    }

    pub async fn create_release(&self, req: pb::CreateReleaseRequest) -> Result<ReleaseRecord> {
        let product_id = validate::product_id(req.product_id)?;
        let version = validate::version(req.version)?;
        let sha256 = validate::sha256_hex("image_sha256", &req.image_sha256)?;
        let release_id = validate::make_release_id(product_id, version);
        let mut redis = self.redis.clone();
        let meta = store::get_image_meta(&mut redis, &sha256)
            .await?
            .ok_or_else(|| no_image(&sha256))?;
        if meta.product_id != product_id {
            return Err(SignerError::FailedPrecondition(format!(
                "image {sha256} was uploaded for product {}, not product {product_id}; upload \
                 the firmware for product {product_id} or create the release for product {}",
                meta.product_id, meta.product_id
            )));
        }
        if store::get_release(&mut redis, &release_id).await?.is_some() {
            return Err(release_exists(&release_id));
        }
        let image = store::get_image_bytes(&mut redis, &sha256)
            .await?
            .ok_or_else(|| no_image(&sha256))?;
        let created_at_ms = now_ms();
        let manifest = build_manifest(
            product_id,
            version,
            &image,
            created_at_ms,
            &meta.organization,
        );
        if hex::encode(&manifest.image_sha256) != sha256 || manifest.image_size != meta.size {
            return Err(SignerError::Corrupt(format!(
                "image {sha256} in storage no longer matches its SHA-256 or size; upload it again \
                 (nothing was created)"
            )));
        }
        let record = ReleaseRecord {
            release_id: release_id.clone(),
            product_id,
            version,
            organization: meta.organization,
            image_sha256: sha256.clone(),
            image_size: meta.size,
            manifest: encode_manifest(&manifest),
            signatures: Vec::new(),
            created_at_ms,
        };
        match store::create_release(&mut redis, &record).await? {
            Created::Stored => {
                tracing::info!(release_id = %release_id, image = %sha256, "release created");
                Ok(record)
            }
            Created::ReleaseExists => Err(release_exists(&release_id)),
            Created::ImageGone => Err(no_image(&sha256)),
        }
    }

    pub async fn get_release(&self, release_id: &str) -> Result<ReleaseRecord> {
        let (release_id, _, _) = validate::release_id(release_id)?;
        load_release(&mut self.redis.clone(), &release_id).await
    }

    /// Keyvault's release key versions, each a trusted key named
    /// "cloud-release". Asked each time (release operations are rare, and
    /// a rotation must show at once); a keyvault from before release key
    /// versions answers with its one key.
    pub async fn cloud_release_keys(&self) -> Result<CloudReleaseKeys> {
        let mut keyvault = self.keyvault.clone();
        let listed = keyvault
            .list_signing_keys(pb::ListSigningKeysRequest {
                purpose: RELEASE_PURPOSE.into(),
            })
            .await;
        let keys = match listed {
            Ok(list) => list.into_inner().keys,
            Err(e) if e.code() == tonic::Code::Unimplemented => {
                let mut one = keyvault
                    .get_signing_key(pb::GetSigningKeyRequest {
                        purpose: RELEASE_PURPOSE.into(),
                        version: 0,
                    })
                    .await
                    .map_err(|e| SignerError::keyvault(&self.keyvault_url, &e))?
                    .into_inner();
                one.current = true;
                vec![one]
            }
            Err(e) => return Err(SignerError::keyvault(&self.keyvault_url, &e)),
        };
        CloudReleaseKeys::from_proto(keys)
    }

    /// SignRelease: keyvault signs the exact manifest bytes with the cloud
    /// release key; the signature is checked, then stored.
    /// Signs with the cloud release key through keyvault, which audits the
    /// signer's credential as the actor and `on_behalf_of` as who asked.
    pub async fn sign_release(
        &self,
        release_id: &str,
        on_behalf_of: &str,
    ) -> Result<ReleaseRecord> {
        let (release_id, product_id, _) = validate::release_id(release_id)?;
        let mut redis = self.redis.clone();
        let release = load_release(&mut redis, &release_id).await?;
        let policy = store::get_policy(&mut redis, product_id).await?;
        let keys = self.cloud_release_keys().await?;
        let cloud = &keys
            .for_policy(policy.as_ref().map(|p| &p.policy))
            .map_err(SignerError::FailedPrecondition)?
            .key;
        if release.signatures.iter().any(|s| s.key_id == cloud.key_id) {
            return Ok(release);
        }
        let signed = self
            .keyvault
            .clone()
            .sign(pb::SignRequest {
                purpose: RELEASE_PURPOSE.into(),
                data: release.manifest.clone(),
                actor: format!("{ACTOR} for {on_behalf_of}"),
                key_id: cloud.key_id.clone(),
            })
            .await
            .map_err(|e| SignerError::keyvault(&self.keyvault_url, &e))?
            .into_inner();
        let signature = ManifestSignature {
            key_id: signed.key_id,
            signature: signed.signature,
        };
        verify_signature(&cloud.public_key, &release.manifest, &signature).map_err(|e| {
            SignerError::Internal(format!("keyvault's release signature does not check: {e}"))
        })?;
        self.store_signature(&mut redis, &release_id, &signature)
            .await
    }

    /// AddSignature: a signature made elsewhere, checked against the
    /// product's policy before it is stored.
    pub async fn add_signature(
        &self,
        release_id: &str,
        signature: Option<pb::ManifestSignature>,
    ) -> Result<ReleaseRecord> {
        let (release_id, _, _) = validate::release_id(release_id)?;
        let signature = signature.ok_or_else(|| {
            SignerError::InvalidArgument(
                "no signature given: send {key_id, signature} (a `trellis firmware sign` file)"
                    .into(),
            )
        })?;
        let key_id = validate::key_id(&signature.key_id)?;
        if signature.signature.is_empty() {
            return Err(SignerError::InvalidArgument(format!(
                "the signature by key {key_id} is empty"
            )));
        }
        let signature = ManifestSignature {
            key_id,
            signature: signature.signature,
        };
        let mut redis = self.redis.clone();
        let release = load_release(&mut redis, &release_id).await?;
        let policy = store::get_policy(&mut redis, release.product_id)
            .await?
            .ok_or_else(|| {
                SignerError::FailedPrecondition(format!(
                    "product {} has no signing policy, so no key can be checked: set one with \
                     `trellis policy set --product {} --key NAME=PUB.pem ... --threshold N` first",
                    release.product_id, release.product_id
                ))
            })?
            .policy;
        let Some(key) = policy.key(&signature.key_id) else {
            return Err(SignerError::FailedPrecondition(format!(
                "key {} is not in product {}'s signing policy (it trusts {}); sign with one of \
                 those keys, or add this key with `trellis policy set`",
                signature.key_id,
                release.product_id,
                describe_keys(&policy)
            )));
        };
        if release.signatures.contains(&signature) {
            return Ok(release);
        }
        verify_signature(&key.public_key, &release.manifest, &signature).map_err(|e| {
            SignerError::InvalidArgument(format!(
                "bad signature for release {release_id}: {e}. Sign the exact manifest bytes from \
                 `trellis release manifest {release_id} -o FILE` with \
                 `trellis firmware sign --key KEY.pem FILE`"
            ))
        })?;
        self.store_signature(&mut redis, &release_id, &signature)
            .await
    }

    async fn store_signature(
        &self,
        redis: &mut Redis,
        release_id: &str,
        signature: &ManifestSignature,
    ) -> Result<ReleaseRecord> {
        match store::add_signature(redis, release_id, signature).await? {
            Added::Added => {
                tracing::info!(release_id, key_id = %signature.key_id, "signature added")
            }
            Added::AlreadySigned => {
                tracing::debug!(release_id, key_id = %signature.key_id, "already signed by this key")
            }
            Added::ReleaseGone => return Err(no_release(release_id)),
        }
        load_release(redis, release_id).await
    }

    pub async fn list_releases(&self, product_id: u32) -> Result<Vec<ReleaseRecord>> {
        Ok(store::list_releases(&mut self.redis.clone(), product_id).await?)
    }

    /// SetPolicy: every PEM parsed, key ids computed (and checked when
    /// given), names distinct, threshold 1..=keys, and not met by the
    /// cloud's own keys alone unless `allow_cloud_only` (then recorded in
    /// the policy and its audit record).
    pub async fn set_policy(
        &self,
        policy: Option<pb::SigningPolicy>,
        allow_cloud_only: bool,
        actor: &str,
    ) -> Result<pb::SigningPolicy> {
        let policy = policy.ok_or_else(|| {
            SignerError::InvalidArgument("no policy given: send product_id, keys, threshold".into())
        })?;
        let product_id = validate::product_id(policy.product_id)?;
        let bad = |what: String| {
            SignerError::InvalidArgument(format!("signing policy for product {product_id}: {what}"))
        };
        if policy.keys.is_empty() {
            return Err(bad(
                "it trusts no keys: give at least one public key (customer, cloud-release)".into(),
            ));
        }
        let mut trusted = Vec::with_capacity(policy.keys.len());
        for (i, k) in policy.keys.iter().enumerate() {
            let name = k.name.trim();
            if name.is_empty() {
                return Err(bad(format!("key {} has no name; name every key", i + 1)));
            }
            if policy.keys[..i].iter().any(|o| o.name.trim() == name) {
                return Err(bad(format!("the name {name:?} is used twice")));
            }
            let public = public_key_from_pem(&k.public_key_pem)
                .map_err(|e| bad(format!("key {name:?}: {e}")))?;
            let key =
                TrustedKey::new(name, public).map_err(|e| bad(format!("key {name:?}: {e}")))?;
            if !k.key_id.trim().is_empty() && !k.key_id.trim().eq_ignore_ascii_case(&key.key_id) {
                return Err(bad(format!(
                    "key {name:?}: key_id {} does not match its public key ({})",
                    k.key_id, key.key_id
                )));
            }
            trusted.push(key);
        }
        let threshold = policy.threshold as usize;
        let checked = TrustPolicy::new(trusted, threshold).map_err(|e| bad(e.to_string()))?;
        // Which keys are the cloud's: keyvault's release key. Without
        // knowing it the policy cannot be checked, so it is refused, unless
        // the operator allowed a cloud-only policy anyway.
        let cloud_only = match self.cloud_release_keys().await {
            Ok(cloud) => {
                let held = cloud.held_in(&checked);
                let cloud_only = held.len() >= checked.threshold();
                if cloud_only && !allow_cloud_only {
                    return Err(bad(format!(
                        "the cloud alone could release firmware with it: it requires {} and the \
                         cloud holds {} of its {} keys ({}), but a release must need the \
                         customer's offline key AND the cloud release key. Add the customer's \
                         key and require it (`trellis policy set --product {product_id} --key \
                         customer.pub.pem --cloud-release-key` requires both), or pass \
                         --allow-cloud-only (SetPolicyRequest.allow_cloud_only) if the cloud \
                         alone is meant to release this product's firmware",
                        signatures(checked.threshold()),
                        held.len(),
                        checked.keys().len(),
                        held.iter()
                            .map(|k| k.key_ref().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                cloud_only
            }
            Err(e) if allow_cloud_only => {
                tracing::warn!(
                    error = %e,
                    product_id,
                    "keyvault's release key is unknown; the policy is recorded as cloud-only \
                     (allow_cloud_only)"
                );
                true
            }
            Err(SignerError::Keyvault { url, code, message }) => {
                return Err(SignerError::Keyvault {
                    url,
                    code,
                    message: format!(
                        "{message} (the signer needs keyvault's release key to check that the \
                         cloud alone cannot meet product {product_id}'s policy; nothing was set)"
                    ),
                });
            }
            Err(e) => return Err(e),
        };
        let mut redis = self.redis.clone();
        // SetPolicy provisions; the version only moves with a rotation.
        let version = store::get_policy(&mut redis, product_id)
            .await
            .ok()
            .flatten()
            .map_or(trellis_firmware::DEFAULT_POLICY_VERSION, |p| {
                p.policy.version()
            });
        let stored = StoredPolicy {
            policy: checked.with_version(version),
            allow_cloud_only: cloud_only,
        };
        store::put_policy(&mut redis, product_id, &stored).await?;
        let checked = &stored.policy;
        let record = AuditRecord::new(actor, "set_policy", "", "ok")
            .with("product_id", product_id.to_string())
            .with("threshold", threshold.to_string())
            .with(
                "keys",
                checked
                    .keys()
                    .iter()
                    .map(|k| format!("{}={}", k.name, k.key_id))
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .with("allow_cloud_only", allow_cloud_only.to_string())
            .with("cloud_only", cloud_only.to_string());
        if let Err(e) = audit::append(&mut redis, &record).await {
            tracing::error!(error = %e, product_id, "audit record for set_policy not written");
        }
        if cloud_only {
            tracing::warn!(
                product_id,
                threshold,
                keys = checked.keys().len(),
                "signing policy set that cloud keys alone can meet (allow_cloud_only): the \
                 customer's offline key is not needed to release firmware for this product"
            );
        } else {
            tracing::info!(
                product_id,
                threshold,
                keys = checked.keys().len(),
                "signing policy set"
            );
        }
        policy_to_proto(product_id, &stored.policy, cloud_only)
    }

    /// Whether cloud keys alone meet `stored`'s threshold, checked against
    /// keyvault's release key; when keyvault cannot be asked, the stored
    /// `allow_cloud_only` decides.
    async fn cloud_only(&self, stored: &StoredPolicy) -> bool {
        match self.cloud_release_keys().await {
            Ok(cloud) => cloud.meet_alone(&stored.policy),
            Err(_) => stored.allow_cloud_only,
        }
    }

    /// The warning every release operation on `product_id` carries while
    /// its policy can be met by cloud keys alone (logged here too), or
    /// `None`.
    async fn cloud_only_warning(
        &self,
        product_id: u32,
        policy: Option<&StoredPolicy>,
    ) -> Option<String> {
        let stored = policy?;
        let cloud_only = self.cloud_only(stored).await;
        if !cloud_only {
            return None;
        }
        tracing::warn!(
            product_id,
            allow_cloud_only = stored.allow_cloud_only,
            "release operation on a product whose signing policy cloud keys alone can meet"
        );
        Some(format!(
            "product {product_id}'s signing policy can be met by the cloud's keys alone{}: its \
             releases do not need the customer's offline key. Require it with `trellis policy \
             set --product {product_id} --key customer.pub.pem --cloud-release-key`",
            if stored.allow_cloud_only {
                " (set with --allow-cloud-only)"
            } else {
                ""
            }
        ))
    }

    /// `cloud_only_warning` for a release's product (its policy read here).
    /// The release operation itself already succeeded, so a policy that
    /// cannot be read now costs the warning, not the reply.
    async fn release_warning(&self, release: &ReleaseRecord) -> Option<String> {
        let policy = match store::get_policy(&mut self.redis.clone(), release.product_id).await {
            Ok(policy) => policy,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    product_id = release.product_id,
                    "cannot read the signing policy to check it for a cloud-only warning"
                );
                None
            }
        };
        self.cloud_only_warning(release.product_id, policy.as_ref())
            .await
    }

    /// The release as the reply carries it, with the policy warning.
    async fn release_reply(&self, release: ReleaseRecord) -> pb::Release {
        let mut reply = release.to_proto();
        reply.policy_warning = self.release_warning(&release).await.unwrap_or_default();
        reply
    }

    pub async fn get_policy(&self, product_id: u32) -> Result<pb::SigningPolicy> {
        let product_id = validate::product_id(product_id)?;
        let policy = store::get_policy(&mut self.redis.clone(), product_id)
            .await?
            .ok_or_else(|| {
                SignerError::NotFound(format!(
                    "product {product_id} has no signing policy; set one with `trellis policy set`"
                ))
            })?;
        let cloud_only = self.cloud_only(&policy).await;
        policy_to_proto(product_id, &policy.policy, cloud_only)
    }

    /// VerifyRelease: the stored signatures against the product's policy.
    pub async fn verify_release(&self, release_id: &str) -> Result<pb::VerifyReleaseResponse> {
        let (release_id, _, _) = validate::release_id(release_id)?;
        let mut redis = self.redis.clone();
        let release = load_release(&mut redis, &release_id).await?;
        let Some(policy) = store::get_policy(&mut redis, release.product_id).await? else {
            return Ok(pb::VerifyReleaseResponse {
                satisfied: false,
                signed_by: Vec::new(),
                missing: Vec::new(),
                threshold: 0,
                message: format!(
                    "product {} has no signing policy: no device could be told which signatures \
                     to require. Set one with `trellis policy set`",
                    release.product_id
                ),
                policy_warning: String::new(),
            });
        };
        let report = policy
            .policy
            .evaluate(&release.manifest, &release.signatures);
        let mut response = verify_response(&release_id, &report);
        response.policy_warning = self
            .cloud_only_warning(release.product_id, Some(&policy))
            .await
            .unwrap_or_default();
        Ok(response)
    }
}

/// Runs one RPC's work in its span, so the refusal is logged inside it.
async fn in_span<T>(
    span: tracing::Span,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T, Status> {
    async move { work.await.map_err(status) }
        .instrument(span)
        .await
}

fn name_of(k: &KeyRef) -> String {
    if k.name.is_empty() {
        k.key_id.clone()
    } else {
        k.name.clone()
    }
}

/// The keys of `policy` whose private half the cloud holds: keyvault's
/// release key (the only key keyvault signs releases with).
/// "1 signature", "2 signatures".
fn signatures(n: usize) -> String {
    if n == 1 {
        "1 signature".into()
    } else {
        format!("{n} signatures")
    }
}

fn describe_keys(policy: &TrustPolicy) -> String {
    policy
        .keys()
        .iter()
        .map(|k| k.key_ref().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn verify_response(release_id: &str, report: &PolicyReport) -> pb::VerifyReleaseResponse {
    let satisfied = report.satisfied();
    let signed_by: Vec<String> = report.valid.iter().map(name_of).collect();
    let missing: Vec<String> = report.missing.iter().map(name_of).collect();
    let mut message = if satisfied {
        format!(
            "release {release_id} meets its policy: {} of the {} required signatures ({})",
            report.valid.len(),
            report.threshold,
            signed_by.join(", ")
        )
    } else {
        let need = report.threshold.saturating_sub(report.valid.len());
        format!(
            "release {release_id} does not meet its policy: {} valid of {} required; {} more \
             needed from: {}",
            report.valid.len(),
            report.threshold,
            need,
            report
                .missing
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    if !report.invalid.is_empty() {
        message.push_str(&format!(
            "; signatures that do not verify (manifest altered?): {}",
            report
                .invalid
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !report.unknown.is_empty() {
        message.push_str(&format!(
            "; signatures by keys the policy no longer trusts: {}",
            report.unknown.join(", ")
        ));
    }
    pb::VerifyReleaseResponse {
        satisfied,
        signed_by,
        missing,
        threshold: u32::try_from(report.threshold).unwrap_or(u32::MAX),
        message,
        policy_warning: String::new(),
    }
}

fn policy_to_proto(
    product_id: u32,
    policy: &TrustPolicy,
    cloud_only: bool,
) -> Result<pb::SigningPolicy> {
    let keys = policy
        .keys()
        .iter()
        .map(|k| {
            Ok(pb::PolicyKey {
                name: k.name.clone(),
                public_key_pem: public_key_to_pem(&k.public_key)
                    .map_err(|e| SignerError::Internal(e.to_string()))?,
                key_id: k.key_id.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(pb::SigningPolicy {
        product_id,
        keys,
        version: policy.version(),
        threshold: u32::try_from(policy.threshold()).unwrap_or(u32::MAX),
        cloud_only,
        policy_json: policy
            .to_json()
            .map_err(|e| SignerError::Internal(e.to_string()))?,
    })
}

async fn load_release(redis: &mut Redis, release_id: &str) -> Result<ReleaseRecord> {
    store::get_release(redis, release_id)
        .await?
        .ok_or_else(|| no_release(release_id))
}

/// Whether `principal` may see product `product_id`'s firmware: its own
/// organisation's products (one never registered is the default
/// organisation's), every product for a service. Refused with `hidden`,
/// the error a missing record gives, so another organisation's releases
/// and policies cannot be told apart from none.
/// What a caller is told about a product of another organisation (or none):
/// the same as for a product that does not exist.
fn not_your_product(product: u32) -> SignerError {
    SignerError::NotFound(format!(
        "product {product} is not one of your organisation's: `trellis product create {product}` first"
    ))
}

async fn guard_product(
    redis: &Redis,
    principal: &trellis_auth::Principal,
    product_id: u32,
    hidden: impl FnOnce() -> SignerError,
) -> Result<()> {
    if principal.is_service() {
        return Ok(());
    }
    let org = trellis_auth::store::product_org(&mut redis.clone(), product_id)
        .await
        .map_err(|e| match e {
            trellis_auth::store::StoreError::Redis(e) => SignerError::Redis(e),
            other => SignerError::Internal(format!(
                "cannot read product {product_id}'s organisation: {other}"
            )),
        })?;
    if principal.sees(&org) {
        Ok(())
    } else {
        Err(hidden())
    }
}

/// As [`guard_product`] for the product a release id names.
async fn guard_release(
    redis: &Redis,
    principal: &trellis_auth::Principal,
    release_id: &str,
) -> Result<()> {
    let (release_id, product_id, _) = validate::release_id(release_id)?;
    guard_product(redis, principal, product_id, || no_release(&release_id)).await
}

/// As [`guard_product`] for the product a policy release id names.
async fn guard_policy_release(
    redis: &Redis,
    principal: &trellis_auth::Principal,
    release_id: &str,
) -> Result<()> {
    let (id, product_id, _) = trellis_records::policy_release::parse_policy_release_id(release_id)?;
    guard_product(redis, principal, product_id, || {
        SignerError::NotFound(format!(
            "no policy release {id}; `trellis policy list` shows them"
        ))
    })
    .await
}

fn no_image(sha256: &str) -> SignerError {
    SignerError::NotFound(format!(
        "no image with SHA-256 {sha256}: upload it first with `trellis firmware upload FILE \
         --product P`"
    ))
}

fn no_release(release_id: &str) -> SignerError {
    SignerError::NotFound(format!(
        "no release {release_id}; `trellis release list` shows the releases"
    ))
}

fn release_exists(release_id: &str) -> SignerError {
    SignerError::AlreadyExists(format!(
        "release {release_id} already exists (a version is released once); use a new version"
    ))
}

#[tonic::async_trait]
impl Signer for SignerService {
    async fn upload_image(
        &self,
        request: Request<Streaming<pb::UploadImageRequest>>,
    ) -> Result<Response<pb::Image>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let span = tracing::info_span!("signer.upload_image");
        in_span(span, self.upload(request.into_inner(), &principal))
            .await
            .map(|m| Response::new(m.to_proto()))
    }

    async fn get_image(
        &self,
        request: Request<pb::GetImageRequest>,
    ) -> Result<Response<pb::Image>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let span = tracing::debug_span!("signer.get_image", sha256 = %req.sha256);
        in_span(span, async {
            let meta = SignerService::get_image(self, &req.sha256).await?;
            // Another organisation's image is exactly as missing as none.
            if principal.sees(&meta.organization) {
                Ok(meta)
            } else {
                Err(no_image(&meta.sha256))
            }
        })
        .await
        .map(|m| Response::new(m.to_proto()))
    }

    async fn create_release(
        &self,
        request: Request<pb::CreateReleaseRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let product = req.product_id;
        guard_product(&self.redis, &principal, product, || {
            not_your_product(product)
        })
        .await?;
        let span = tracing::info_span!(
            "signer.create_release",
            product_id = req.product_id,
            version = req.version,
            image = %req.image_sha256
        );
        in_span(span, async {
            let release = SignerService::create_release(self, req).await?;
            Ok(self.release_reply(release).await)
        })
        .await
        .map(Response::new)
    }

    async fn sign_release(
        &self,
        request: Request<pb::SignReleaseRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let actor = principal.actor();
        let req = request.into_inner();
        guard_release(&self.redis, &principal, &req.release_id).await?;
        let span = tracing::info_span!("signer.sign_release", release_id = %req.release_id);
        in_span(span, async {
            let release = SignerService::sign_release(self, &req.release_id, &actor).await?;
            Ok(self.release_reply(release).await)
        })
        .await
        .map(Response::new)
    }

    async fn add_signature(
        &self,
        request: Request<pb::AddSignatureRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        guard_release(&self.redis, &principal, &req.release_id).await?;
        let span = tracing::info_span!(
            "signer.add_signature",
            release_id = %req.release_id,
            key_id = %req.signature.as_ref().map(|s| s.key_id.as_str()).unwrap_or_default()
        );
        in_span(span, async {
            let release =
                SignerService::add_signature(self, &req.release_id, req.signature).await?;
            Ok(self.release_reply(release).await)
        })
        .await
        .map(Response::new)
    }

    async fn get_release(
        &self,
        request: Request<pb::GetReleaseRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        guard_release(&self.redis, &principal, &req.release_id).await?;
        let span = tracing::debug_span!("signer.get_release", release_id = %req.release_id);
        in_span(span, SignerService::get_release(self, &req.release_id))
            .await
            .map(|r| Response::new(r.to_proto()))
    }

    async fn list_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let span = tracing::debug_span!("signer.list_releases", product_id = req.product_id);
        let list = in_span(span, SignerService::list_releases(self, req.product_id)).await?;
        // Another organisation's releases are not listed.
        let mut visible = Vec::with_capacity(list.len());
        let mut seen: std::collections::HashMap<u32, bool> = std::collections::HashMap::new();
        for r in &list {
            let ok = match seen.get(&r.product_id) {
                Some(ok) => *ok,
                None => {
                    let ok = guard_product(&self.redis, &principal, r.product_id, || {
                        SignerError::NotFound(String::new())
                    })
                    .await
                    .is_ok();
                    seen.insert(r.product_id, ok);
                    ok
                }
            };
            if ok {
                visible.push(r.to_proto());
            }
        }
        Ok(Response::new(pb::ListReleasesResponse {
            releases: visible,
        }))
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SigningPolicy>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let actor = principal.actor();
        let req = request.into_inner();
        let product = req
            .policy
            .as_ref()
            .map(|p| p.product_id)
            .unwrap_or_default();
        guard_product(&self.redis, &principal, product, || {
            not_your_product(product)
        })
        .await?;
        let span = tracing::info_span!(
            "signer.set_policy",
            product_id = req
                .policy
                .as_ref()
                .map(|p| p.product_id)
                .unwrap_or_default(),
            allow_cloud_only = req.allow_cloud_only
        );
        in_span(
            span,
            SignerService::set_policy(self, req.policy, req.allow_cloud_only, &actor),
        )
        .await
        .map(Response::new)
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::SigningPolicy>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let product_id = req.product_id;
        guard_product(&self.redis, &principal, product_id, || {
            SignerError::NotFound(format!(
                "product {product_id} has no signing policy; set one with `trellis policy set`"
            ))
        })
        .await?;
        let span = tracing::debug_span!("signer.get_policy", product_id = req.product_id);
        in_span(span, SignerService::get_policy(self, req.product_id))
            .await
            .map(Response::new)
    }

    async fn verify_release(
        &self,
        request: Request<pb::VerifyReleaseRequest>,
    ) -> Result<Response<pb::VerifyReleaseResponse>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        guard_release(&self.redis, &principal, &req.release_id).await?;
        let span = tracing::info_span!("signer.verify_release", release_id = %req.release_id);
        in_span(span, SignerService::verify_release(self, &req.release_id))
            .await
            .map(Response::new)
    }

    async fn create_policy_release(
        &self,
        request: Request<pb::CreatePolicyReleaseRequest>,
    ) -> Result<Response<pb::PolicyRelease>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let product = req.product_id;
        guard_product(&self.redis, &principal, product, || {
            not_your_product(product)
        })
        .await?;
        let span = tracing::info_span!("signer.create_policy_release", product_id = product);
        in_span(span, async {
            let record = SignerService::create_policy_release(self, req).await?;
            self.policy_release_reply(&record).await
        })
        .await
        .map(Response::new)
    }

    async fn sign_policy_release(
        &self,
        request: Request<pb::SignReleaseRequest>,
    ) -> Result<Response<pb::PolicyRelease>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let actor = principal.actor();
        let req = request.into_inner();
        guard_policy_release(&self.redis, &principal, &req.release_id).await?;
        let span = tracing::info_span!("signer.sign_policy_release", release_id = %req.release_id);
        in_span(span, async {
            let record = SignerService::sign_policy_release(self, &req.release_id, &actor).await?;
            self.policy_release_reply(&record).await
        })
        .await
        .map(Response::new)
    }

    async fn add_policy_signature(
        &self,
        request: Request<pb::AddSignatureRequest>,
    ) -> Result<Response<pb::PolicyRelease>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let actor = principal.actor();
        let req = request.into_inner();
        guard_policy_release(&self.redis, &principal, &req.release_id).await?;
        let span = tracing::info_span!(
            "signer.add_policy_signature",
            release_id = %req.release_id,
            key_id = %req.signature.as_ref().map(|s| s.key_id.as_str()).unwrap_or_default()
        );
        in_span(span, async {
            let record =
                SignerService::add_policy_signature(self, &req.release_id, req.signature, &actor)
                    .await?;
            self.policy_release_reply(&record).await
        })
        .await
        .map(Response::new)
    }

    async fn get_policy_release(
        &self,
        request: Request<pb::GetReleaseRequest>,
    ) -> Result<Response<pb::PolicyRelease>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        guard_policy_release(&self.redis, &principal, &req.release_id).await?;
        let span = tracing::debug_span!("signer.get_policy_release", release_id = %req.release_id);
        in_span(span, async {
            let record = SignerService::get_policy_release(self, &req.release_id).await?;
            self.policy_release_reply(&record).await
        })
        .await
        .map(Response::new)
    }

    async fn list_policy_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListPolicyReleasesResponse>, Status> {
        let principal = trellis_auth::Principal::of(&request)?;
        let req = request.into_inner();
        let span = tracing::debug_span!("signer.list_policy_releases", product_id = req.product_id);
        in_span(span, async {
            let list = SignerService::list_policy_releases(self, req.product_id).await?;
            let mut out = Vec::with_capacity(list.len());
            for r in &list {
                let visible = guard_product(&self.redis, &principal, r.product_id, || {
                    SignerError::NotFound(String::new())
                })
                .await
                .is_ok();
                if visible {
                    out.push(self.policy_release_reply(r).await?);
                }
            }
            Ok(pb::ListPolicyReleasesResponse { releases: out })
        })
        .await
        .map(Response::new)
    }
}
