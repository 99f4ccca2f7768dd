//! The signer with real parts: a real redis-server, keyvault (holding the
//! cloud release key) and the signer serving gRPC on loopback, and customer
//! keys generated at test time. Every refusal is checked three ways: the gRPC
//! code, the message (it must say what to fix), and Redis (nothing partial
//! left behind).
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Code, Status};
use trellis_core::config::Config;
use trellis_core::local_redis::{LocalRedis, RedisData};
use trellis_core::redis_conn::{self, Redis, keys};
use trellis_core::shutdown::ShutdownTrigger;
use trellis_core::{Shutdown, audit};
use trellis_firmware::{
    ManifestSignature, TrustPolicy, decode_manifest, private_key_from_pem, public_key_to_pem,
    sign_manifest, verify_signature,
};
use trellis_proto::v1 as pb;
use trellis_proto::v1::key_vault_client::KeyVaultClient;
use trellis_proto::v1::signer_client::SignerClient;
use trellis_proto::v1::upload_image_request::Part;

const MAX_IMAGE: u64 = 64 * 1024;

/// Redis, keyvault and the signer, in this process, on loopback.
struct Stack {
    redis: LocalRedis,
    config: Config,
    keyvault: SocketAddr,
    signer: SignerClient<Channel>,
    trigger: Option<ShutdownTrigger>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

fn config(redis_url: &str) -> Config {
    let mut c = Config::default();
    c.auth.mode = trellis_core::config::AuthMode::Off;
    c.tls.mode = trellis_core::config::TlsMode::Off;
    c.redis.url = Some(redis_url.to_string());
    c.keyvault.master_key = Some(hex::encode(rand::random::<[u8; 32]>()));
    c.keyvault.workers = 1;
    c.signer.max_image_bytes = MAX_IMAGE;
    c
}

impl Stack {
    async fn start() -> anyhow::Result<Self> {
        let redis = LocalRedis::start(RedisData::Ephemeral)?;
        let mut config = config(&redis.url());
        let (trigger, shutdown) = Shutdown::new();
        let mut tasks = Vec::new();
        let kv_listener = TcpListener::bind("127.0.0.1:0").await?;
        let keyvault = kv_listener.local_addr()?;
        tasks.push(tokio::spawn(trellis_keyvault::serve_with_listener(
            config.clone(),
            kv_listener,
            shutdown.clone(),
        )));
        config.signer.keyvault_url = format!("http://{keyvault}");
        let signer_listener = TcpListener::bind("127.0.0.1:0").await?;
        let signer_addr = signer_listener.local_addr()?;
        tasks.push(tokio::spawn(trellis_signer::serve_with_listener(
            config.clone(),
            signer_listener,
            shutdown.clone(),
        )));
        let signer = connect_signer(signer_addr).await?;
        // The release key is made on keyvault's first start: wait for it.
        let mut kv = connect_keyvault(keyvault).await?;
        kv.get_signing_key(pb::GetSigningKeyRequest {
            purpose: "release".into(),
            version: 0,
        })
        .await?;
        Ok(Self {
            redis,
            config,
            keyvault,
            signer,
            trigger: Some(trigger),
            tasks,
        })
    }

    async fn redis(&self) -> anyhow::Result<Redis> {
        Ok(redis_conn::connect(&self.redis.url()).await?)
    }

    async fn keyvault(&self) -> anyhow::Result<KeyVaultClient<Channel>> {
        connect_keyvault(self.keyvault).await
    }

    /// Keyvault's release public key (PEM) and key id.
    async fn cloud_release_key(&self) -> anyhow::Result<(String, String)> {
        let k = self
            .keyvault()
            .await?
            .get_signing_key(pb::GetSigningKeyRequest {
                purpose: "release".into(),
                version: 0,
            })
            .await?
            .into_inner();
        Ok((k.public_key_pem, k.key_id))
    }

    /// Every key in Redis, found with SCAN.
    async fn scan_keys(&self) -> anyhow::Result<BTreeSet<String>> {
        let mut r = self.redis().await?;
        let mut out = BTreeSet::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut r)
                .await?;
            out.extend(batch);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// A release's stored hash, field by field.
    async fn release_hash(
        &self,
        release_id: &str,
    ) -> anyhow::Result<std::collections::BTreeMap<String, Vec<u8>>> {
        let mut r = self.redis().await?;
        Ok(redis::cmd("HGETALL")
            .arg(keys::release(release_id))
            .query_async(&mut r)
            .await?)
    }

    async fn stop(mut self) {
        if let Some(t) = self.trigger.take() {
            t.trigger();
        }
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

async fn connect_keyvault(addr: SocketAddr) -> anyhow::Result<KeyVaultClient<Channel>> {
    let url = format!("http://{addr}");
    for _ in 0..200 {
        if let Ok(c) = KeyVaultClient::connect(url.clone()).await {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("keyvault at {addr} did not come up")
}

async fn connect_signer(addr: SocketAddr) -> anyhow::Result<SignerClient<Channel>> {
    let url = format!("http://{addr}");
    for _ in 0..200 {
        if let Ok(c) = SignerClient::connect(url.clone()).await {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("signer at {addr} did not come up")
}

fn header(product_id: u32, size: u64) -> pb::UploadImageRequest {
    pb::UploadImageRequest {
        part: Some(Part::Header(pb::UploadImageHeader {
            product_id,
            size,
            organization: String::new(),
        })),
    }
}

fn data(bytes: &[u8]) -> pb::UploadImageRequest {
    pb::UploadImageRequest {
        part: Some(Part::Data(bytes.to_vec())),
    }
}

/// The header and then `image` in chunks of `chunk` bytes.
fn upload_messages(product_id: u32, image: &[u8], chunk: usize) -> Vec<pb::UploadImageRequest> {
    let mut m = vec![header(product_id, image.len() as u64)];
    m.extend(image.chunks(chunk).map(data));
    m
}

async fn upload(
    signer: &mut SignerClient<Channel>,
    messages: Vec<pb::UploadImageRequest>,
) -> Result<pb::Image, Status> {
    signer
        .upload_image(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

fn image_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A customer's offline release key, made now.
fn customer_key() -> anyhow::Result<(rsa::PrivateKey, String)> {
    let key = rsa::PrivateKey::new(&mut rand::rng(), 2048)?;
    let pem = public_key_to_pem(&key.to_public_key())?;
    Ok((key, pem))
}

fn assert_refused<T: std::fmt::Debug>(
    r: Result<T, Status>,
    code: Code,
    needles: &[&str],
) -> Status {
    let status = match r {
        Ok(v) => panic!("expected {code:?}, got success: {v:?}"),
        Err(s) => s,
    };
    assert_eq!(
        status.code(),
        code,
        "wrong code; message: {}",
        status.message()
    );
    for n in needles {
        assert!(
            status.message().contains(n),
            "message {:?} should mention {n:?}",
            status.message()
        );
    }
    status
}

async fn create(
    signer: &mut SignerClient<Channel>,
    product_id: u32,
    version: u32,
    sha: &str,
) -> Result<pb::Release, Status> {
    signer
        .create_release(pb::CreateReleaseRequest {
            product_id,
            version,
            image_sha256: sha.to_string(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn add_sig(
    signer: &mut SignerClient<Channel>,
    release_id: &str,
    signature: ManifestSignature,
) -> Result<pb::Release, Status> {
    signer
        .add_signature(pb::AddSignatureRequest {
            release_id: release_id.into(),
            signature: Some(signature),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn verify(
    signer: &mut SignerClient<Channel>,
    release_id: &str,
) -> anyhow::Result<pb::VerifyReleaseResponse> {
    Ok(signer
        .verify_release(pb::VerifyReleaseRequest {
            release_id: release_id.into(),
        })
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_is_hashed_and_stored_whole() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut signer = stack.signer.clone();
    let image = image_bytes(10_000, 7);
    // 10,000 bytes in chunks of 1,024: ten data messages, the last short.
    let messages = upload_messages(4, &image, 1024);
    assert_eq!(messages.len(), 11);
    let got = upload(&mut signer, messages).await?;
    assert_eq!(got.sha256, sha_hex(&image));
    assert_eq!(got.size, 10_000);
    assert_eq!(got.product_id, 4);
    assert!(got.uploaded_at_ms > 0);

    // Stored whole, byte for byte, under its SHA-256, with meta and index.
    let mut r = stack.redis().await?;
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(keys::image(&got.sha256))
        .query_async(&mut r)
        .await?;
    assert_eq!(stored, image);
    let indexed: bool = redis::cmd("SISMEMBER")
        .arg(keys::IMAGE_INDEX)
        .arg(&got.sha256)
        .query_async(&mut r)
        .await?;
    assert!(indexed);
    let meta = signer
        .get_image(pb::GetImageRequest {
            sha256: got.sha256.to_uppercase(),
        })
        .await?
        .into_inner();
    assert_eq!(meta, got);

    // The same bytes in other chunk sizes are the same image (idempotent).
    let again = upload(&mut signer, upload_messages(4, &image, 4096)).await?;
    assert_eq!(again.sha256, got.sha256);
    assert_eq!(
        again.uploaded_at_ms, got.uploaded_at_ms,
        "kept as first stored"
    );

    // ...but not firmware for another product.
    let before = stack.scan_keys().await?;
    assert_refused(
        upload(&mut signer, upload_messages(5, &image, 4096)).await,
        Code::FailedPrecondition,
        &["already stored for product 4"],
    );
    assert_eq!(stack.scan_keys().await?, before);

    // An image of exactly the limit is accepted.
    let at_limit = image_bytes(MAX_IMAGE as usize, 1);
    let got = upload(&mut signer, upload_messages(4, &at_limit, 16 * 1024)).await?;
    assert_eq!(got.sha256, sha_hex(&at_limit));
    assert_eq!(got.size, MAX_IMAGE);
    stack.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_and_leave_nothing() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut signer = stack.signer.clone();
    let before = stack.scan_keys().await?;
    assert!(
        before.contains(keys::RELEASE_KEY),
        "SCAN sees keyvault's keys: {before:?}"
    );
    let image = image_bytes(5_000, 3);

    // Empty: declared size 0.
    assert_refused(
        upload(&mut signer, vec![header(4, 0)]).await,
        Code::InvalidArgument,
        &["empty"],
    );
    // Empty: a header that promises bytes, then none.
    assert_refused(
        upload(&mut signer, vec![header(4, 100)]).await,
        Code::InvalidArgument,
        &["empty", "no data arrived"],
    );
    // No messages at all.
    assert_refused(
        upload(&mut signer, vec![]).await,
        Code::InvalidArgument,
        &["send a header"],
    );
    // Over signer.max_image_bytes, as declared.
    let big = image_bytes(MAX_IMAGE as usize + 1, 9);
    assert_refused(
        upload(&mut signer, upload_messages(4, &big, 16 * 1024)).await,
        Code::InvalidArgument,
        &[
            &format!("{} bytes", MAX_IMAGE + 1),
            &format!("limit of {MAX_IMAGE} bytes"),
            "signer.max_image_bytes",
        ],
    );
    // Over what was declared (a lying header cannot get past the limit).
    let mut lying = vec![header(4, 1000)];
    lying.extend(big.chunks(16 * 1024).map(data));
    assert_refused(
        upload(&mut signer, lying).await,
        Code::InvalidArgument,
        &["more data than declared", "nothing was stored"],
    );
    // Data before the header, or a second header.
    assert_refused(
        upload(&mut signer, vec![data(&image), header(4, 5000)]).await,
        Code::InvalidArgument,
        &["first UploadImage message must be the header"],
    );
    let mut two = upload_messages(4, &image, 1000);
    two.insert(2, header(4, 5000));
    assert_refused(
        upload(&mut signer, two).await,
        Code::InvalidArgument,
        &["second header"],
    );
    // Product 0.
    assert_refused(
        upload(&mut signer, upload_messages(0, &image, 1000)).await,
        Code::InvalidArgument,
        &["product_id is 0"],
    );
    // The stream ends cleanly halfway (the client gave up): short.
    let mut half = upload_messages(4, &image, 1000);
    half.truncate(3);
    assert_refused(
        upload(&mut signer, half).await,
        Code::InvalidArgument,
        &[
            "only 2000 of the declared 5000 bytes arrived",
            "upload again",
        ],
    );

    // The client's stream breaks with an error halfway: this is what the
    // gRPC handler runs on its request stream (an Err item is what tonic
    // yields when the client resets the stream).
    let service = trellis_signer::build(&stack.config).await?;
    let mut items: Vec<Result<pb::UploadImageRequest, Status>> = upload_messages(4, &image, 1000)
        .into_iter()
        .map(Ok)
        .collect();
    items.truncate(3);
    items.push(Err(Status::cancelled("connection reset by peer")));
    items.push(Ok(data(&image[2000..])));
    let err = service
        .upload(
            tokio_stream::iter(items),
            &trellis_auth::Principal::unauthenticated(),
        )
        .await
        .expect_err("a broken stream must not be stored");
    let status: Status = err.into();
    assert_eq!(status.code(), Code::Aborted, "{}", status.message());
    for needle in [
        "broke off after 2000 bytes",
        "connection reset by peer",
        "nothing was stored",
        "upload again",
    ] {
        assert!(status.message().contains(needle), "{}", status.message());
    }

    // Over gRPC: the client drops the call after two chunks.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadImageRequest>(8);
    let mut dropped = signer.clone();
    let call = tokio::spawn(async move {
        dropped
            .upload_image(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    for m in upload_messages(4, &image, 1000).into_iter().take(3) {
        tx.send(m).await?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    call.abort();
    let _ = call.await;
    drop(tx);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // None of these left a key behind: no image, no meta, no index entry.
    let after = stack.scan_keys().await?;
    assert_eq!(before, after, "refused uploads must leave Redis as it was");
    for k in &after {
        assert!(!k.starts_with("trellis:image"), "{k}");
    }

    // And the signer still works: the same image, whole, is stored.
    let got = upload(&mut signer, upload_messages(4, &image, 1000)).await?;
    assert_eq!(got.sha256, sha_hex(&image));
    stack.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_releases_are_refused_and_leave_nothing() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut signer = stack.signer.clone();
    let image = image_bytes(3_000, 5);
    let sha = upload(&mut signer, upload_messages(4, &image, 512))
        .await?
        .sha256;
    let before = stack.scan_keys().await?;

    let missing = sha_hex(b"never uploaded");
    assert_refused(
        create(&mut signer, 4, 1, &missing).await,
        Code::NotFound,
        &[&missing, "upload it first"],
    );
    assert_refused(
        create(&mut signer, 0, 1, &sha).await,
        Code::InvalidArgument,
        &["product_id is 0"],
    );
    assert_refused(
        create(&mut signer, 4, 0, &sha).await,
        Code::InvalidArgument,
        &["version is 0"],
    );
    assert_refused(
        create(&mut signer, 4, 1, "abc").await,
        Code::InvalidArgument,
        &["not a SHA-256", "64 hex characters"],
    );
    assert_refused(
        create(&mut signer, 4, 1, &"z".repeat(64)).await,
        Code::InvalidArgument,
        &["not a SHA-256"],
    );
    // An image of product 4 is not a release of product 5.
    assert_refused(
        create(&mut signer, 5, 1, &sha).await,
        Code::FailedPrecondition,
        &["uploaded for product 4, not product 5"],
    );
    assert_eq!(stack.scan_keys().await?, before, "no release record");

    let first = create(&mut signer, 4, 1, &sha).await?;
    let stored = stack.release_hash("4-1").await?;
    // A duplicate (same product and version), even with another image.
    let other = upload(&mut signer, upload_messages(4, &image_bytes(2_000, 6), 512))
        .await?
        .sha256;
    let before = stack.scan_keys().await?;
    assert_refused(
        create(&mut signer, 4, 1, &sha).await,
        Code::AlreadyExists,
        &["release 4-1 already exists", "use a new version"],
    );
    assert_refused(
        create(&mut signer, 4, 1, &other).await,
        Code::AlreadyExists,
        &["release 4-1 already exists"],
    );
    assert_eq!(stack.scan_keys().await?, before);
    assert_eq!(
        stack.release_hash("4-1").await?,
        stored,
        "the first release is untouched"
    );
    let got = signer
        .get_release(pb::GetReleaseRequest {
            release_id: "4-1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(got, first);

    // Malformed release ids are refused by every RPC that takes one.
    for bad in ["4", "4-x", "0-1", "4-1-2", ""] {
        assert_refused(
            signer
                .get_release(pb::GetReleaseRequest {
                    release_id: bad.into(),
                })
                .await,
            Code::InvalidArgument,
            &["<product_id>-<version>"],
        );
        assert_refused(
            signer
                .sign_release(pb::SignReleaseRequest {
                    release_id: bad.into(),
                })
                .await,
            Code::InvalidArgument,
            &["<product_id>-<version>"],
        );
    }
    assert_refused(
        signer
            .sign_release(pb::SignReleaseRequest {
                release_id: "4-9".into(),
            })
            .await,
        Code::NotFound,
        &["no release 4-9"],
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_signed_by_customer_and_cloud_meets_policy_and_is_delivered() -> anyhow::Result<()>
{
    let stack = Stack::start().await?;
    let mut signer = stack.signer.clone();
    let image = image_bytes(20_000, 11);
    let sha = upload(&mut signer, upload_messages(7, &image, 4096))
        .await?
        .sha256;

    let release = create(&mut signer, 7, 3, &sha).await?;
    assert_eq!(release.release_id, "7-3");
    assert_eq!(release.image_sha256, sha);
    assert_eq!(release.image_size, 20_000);
    let manifest_bytes = release.signed.clone().unwrap_or_default().manifest;
    assert!(
        release
            .signed
            .as_ref()
            .is_some_and(|s| s.signatures.is_empty())
    );
    let manifest = decode_manifest(&manifest_bytes).expect("a manifest");
    assert_eq!(manifest.product_id, 7);
    assert_eq!(manifest.version, 3);
    assert_eq!(manifest.image_size, 20_000);
    assert_eq!(hex::encode(&manifest.image_sha256), sha);
    assert_eq!(manifest.organization, "default");
    let indexed: bool = redis::cmd("SISMEMBER")
        .arg(keys::RELEASE_INDEX)
        .arg("7-3")
        .query_async(&mut stack.redis().await?)
        .await?;
    assert!(indexed);

    // Without a policy there is nothing to check a signature against.
    let (customer, customer_pem) = customer_key()?;
    let signature = sign_manifest(&customer, &manifest_bytes)?;
    assert_refused(
        add_sig(&mut signer, "7-3", signature.clone()).await,
        Code::FailedPrecondition,
        &["product 7 has no signing policy", "trellis policy set"],
    );
    let v = verify(&mut signer, "7-3").await?;
    assert!(!v.satisfied);
    assert!(v.message.contains("no signing policy"), "{}", v.message);

    // Policy: the customer's offline key AND the cloud release key.
    let (cloud_pem, cloud_id) = stack.cloud_release_key().await?;
    let policy = signer
        .set_policy(pb::SetPolicyRequest {
            policy: Some(pb::SigningPolicy {
                product_id: 7,
                keys: vec![
                    pb::PolicyKey {
                        name: "customer".into(),
                        public_key_pem: customer_pem.clone(),
                        key_id: String::new(),
                    },
                    pb::PolicyKey {
                        name: "cloud-release".into(),
                        public_key_pem: cloud_pem.clone(),
                        key_id: cloud_id.clone(),
                    },
                ],
                threshold: 2,
                cloud_only: false,
                version: 0,
                policy_json: String::new(),
            }),
            allow_cloud_only: false,
        })
        .await?
        .into_inner();
    assert_eq!(policy.threshold, 2);
    assert!(!policy.cloud_only, "the customer's key is needed too");
    assert_eq!(policy.keys[0].key_id, signature.key_id, "ids filled in");
    assert_eq!(policy.keys[1].key_id, cloud_id);
    let shown = signer
        .get_policy(pb::GetPolicyRequest { product_id: 7 })
        .await?
        .into_inner();
    assert_eq!(shown, policy);
    // Stored in the firmware crate's policy JSON (what devices are given).
    let json: String = redis::cmd("GET")
        .arg(keys::policy(7))
        .query_async(&mut stack.redis().await?)
        .await?;
    let parsed = TrustPolicy::from_json(&json).expect("policy JSON");
    assert_eq!(parsed.threshold(), 2);
    assert_eq!(parsed.keys().len(), 2);
    assert!(!json.contains("allow_cloud_only"), "{json}");

    let v = verify(&mut signer, "7-3").await?;
    assert!(!v.satisfied);
    assert_eq!(v.threshold, 2);
    assert!(v.signed_by.is_empty());
    assert_eq!(v.missing, vec!["customer", "cloud-release"]);
    assert!(v.message.contains("2 more needed"), "{}", v.message);

    // Refused signatures, none stored.
    let stored = stack.release_hash("7-3").await?;
    let keys_before = stack.scan_keys().await?;
    let (stranger, _) = customer_key()?;
    let by_stranger = sign_manifest(&stranger, &manifest_bytes)?;
    assert_refused(
        add_sig(&mut signer, "7-3", by_stranger.clone()).await,
        Code::FailedPrecondition,
        &[
            &format!(
                "key {} is not in product 7's signing policy",
                by_stranger.key_id
            ),
            "customer",
            "cloud-release",
        ],
    );
    let other_bytes = {
        let mut m = manifest.clone();
        m.version = 4;
        trellis_firmware::encode_manifest(&m)
    };
    let over_other = sign_manifest(&customer, &other_bytes)?;
    assert_refused(
        add_sig(&mut signer, "7-3", over_other).await,
        Code::InvalidArgument,
        &["bad signature for release 7-3", "does not verify"],
    );
    let mut garbled = signature.clone();
    garbled.signature = vec![0x5a; 17];
    assert_refused(
        add_sig(&mut signer, "7-3", garbled).await,
        Code::InvalidArgument,
        &["bad signature for release 7-3"],
    );
    let mut flipped = signature.clone();
    flipped.signature[100] ^= 1;
    assert_refused(
        add_sig(&mut signer, "7-3", flipped).await,
        Code::InvalidArgument,
        &["does not verify"],
    );
    let mut empty = signature.clone();
    empty.signature.clear();
    assert_refused(
        add_sig(&mut signer, "7-3", empty).await,
        Code::InvalidArgument,
        &["is empty"],
    );
    let mut bad_id = signature.clone();
    bad_id.key_id = "not-a-key-id".into();
    assert_refused(
        add_sig(&mut signer, "7-3", bad_id).await,
        Code::InvalidArgument,
        &["is not a key id"],
    );
    assert_refused(
        signer
            .add_signature(pb::AddSignatureRequest {
                release_id: "7-3".into(),
                signature: None,
            })
            .await,
        Code::InvalidArgument,
        &["no signature given"],
    );
    assert_refused(
        add_sig(&mut signer, "7-9", signature.clone()).await,
        Code::NotFound,
        &["no release 7-9"],
    );
    assert_eq!(stack.release_hash("7-3").await?, stored, "nothing stored");
    assert_eq!(stack.scan_keys().await?, keys_before);

    // The customer's offline signature.
    let r = add_sig(&mut signer, "7-3", signature.clone()).await?;
    let sigs = r.signed.clone().unwrap_or_default().signatures;
    assert_eq!(sigs, vec![signature.clone()]);
    let v = verify(&mut signer, "7-3").await?;
    assert!(!v.satisfied);
    assert_eq!(v.signed_by, vec!["customer"]);
    assert_eq!(v.missing, vec!["cloud-release"]);
    assert!(v.message.contains("1 more needed"), "{}", v.message);
    // Adding it again changes nothing.
    let r = add_sig(&mut signer, "7-3", signature.clone()).await?;
    assert_eq!(r.signed.unwrap_or_default().signatures.len(), 1);

    // The cloud release key, through keyvault's Sign.
    let r = signer
        .sign_release(pb::SignReleaseRequest {
            release_id: "7-3".into(),
        })
        .await?
        .into_inner();
    let signed = r.signed.clone().unwrap_or_default();
    assert_eq!(signed.manifest, manifest_bytes, "the bytes never change");
    assert_eq!(signed.signatures.len(), 2);
    let cloud_sig = signed.signatures[1].clone();
    assert_eq!(cloud_sig.key_id, cloud_id);
    let cloud_public = trellis_firmware::public_key_from_pem(&cloud_pem)?;
    verify_signature(&cloud_public, &manifest_bytes, &cloud_sig)?;
    // Keyvault audited the use of the release key, naming the signer.
    let records = audit::recent(&mut stack.redis().await?, 100, None).await?;
    let manifest_digest = sha_hex(&manifest_bytes);
    assert!(
        // The authenticated caller (auth off here: the stand-in), and who
        // the signer says it acts for.
        records.iter().any(|r| r.actor == "unauthenticated@default"
            && r.detail
                .iter()
                .any(|(k, v)| k == "requested_by" && v == "signer for unauthenticated@default")
            && r.outcome == "ok"
            && r.detail
                .iter()
                .any(|(k, v)| k == "key_id" && *v == cloud_id)
            && r.detail
                .iter()
                .any(|(k, v)| k == "sha256" && *v == manifest_digest)),
        "no audit record of the release signature: {records:?}"
    );
    // Signing again is a no-op, not a second signature.
    let r = signer
        .sign_release(pb::SignReleaseRequest {
            release_id: "7-3".into(),
        })
        .await?
        .into_inner();
    assert_eq!(r.signed.unwrap_or_default().signatures.len(), 2);

    let v = verify(&mut signer, "7-3").await?;
    assert!(v.satisfied, "{}", v.message);
    assert!(v.policy_warning.is_empty(), "{}", v.policy_warning);
    assert!(r.policy_warning.is_empty(), "{}", r.policy_warning);
    assert!(v.missing.is_empty());
    assert_eq!(v.signed_by, vec!["customer", "cloud-release"]);
    assert!(v.message.contains("meets its policy"), "{}", v.message);

    // The stored signatures decode from Redis exactly as added.
    let stored = stack.release_hash("7-3").await?;
    assert_eq!(stored.get("manifest"), Some(&manifest_bytes));

    // What a gateway delivers: the exact signed bytes and the image.
    let mut r = stack.redis().await?;
    let delivery = trellis_signer::load_release_for_delivery(&mut r, "7-3").await?;
    assert_eq!(delivery.release_id, "7-3");
    assert_eq!((delivery.product_id, delivery.version), (7, 3));
    assert_eq!(delivery.image, image);
    assert_eq!(delivery.image_sha256, sha);
    assert!(delivery.image_matches());
    assert_eq!(delivery.signed.manifest, manifest_bytes);
    assert_eq!(delivery.signed.signatures, vec![signature, cloud_sig]);
    let envelope = trellis_firmware::decode_signed_manifest(&delivery.signed_manifest_bytes())
        .expect("envelope");
    assert_eq!(envelope, delivery.signed);
    // A device holding the same policy accepts it.
    trellis_firmware::verify_update(&envelope, &parsed, 7, 2)
        .expect("a device with this policy accepts the release");
    let err = trellis_signer::load_release_for_delivery(&mut r, "7-4")
        .await
        .expect_err("no such release");
    assert!(err.to_string().contains("no release 7-4"), "{err}");

    let list = signer
        .list_releases(pb::ListReleasesRequest { product_id: 7 })
        .await?
        .into_inner();
    assert_eq!(list.releases.len(), 1);
    assert_eq!(list.releases[0].release_id, "7-3");
    let none = signer
        .list_releases(pb::ListReleasesRequest { product_id: 8 })
        .await?
        .into_inner();
    assert!(none.releases.is_empty());
    stack.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policies_are_refused() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut signer = stack.signer.clone();
    let (_, pem) = customer_key()?;
    let short = rsa::PrivateKey::new(&mut rand::rng(), 1024)?;
    let short_pem = public_key_to_pem(&short.to_public_key())?;
    let key = |name: &str, pem: &str| pb::PolicyKey {
        name: name.into(),
        public_key_pem: pem.into(),
        key_id: String::new(),
    };
    let set = |keys: Vec<pb::PolicyKey>, threshold: u32| pb::SetPolicyRequest {
        policy: Some(pb::SigningPolicy {
            product_id: 7,
            keys,
            threshold,
            cloud_only: false,
            version: 0,
            policy_json: String::new(),
        }),
        allow_cloud_only: false,
    };
    let before = stack.scan_keys().await?;
    for (req, needle) in [
        (set(vec![], 1), "trusts no keys"),
        (set(vec![key("customer", &pem)], 2), "threshold 2"),
        (set(vec![key("customer", &pem)], 0), "threshold 0"),
        (set(vec![key("customer", "not pem")], 1), "not a PEM"),
        (set(vec![key("customer", &short_pem)], 1), "too short"),
        (set(vec![key("a", &pem), key("a", &pem)], 1), "used twice"),
        (set(vec![key(" ", &pem)], 1), "has no name"),
    ] {
        assert_refused(
            signer.set_policy(req).await,
            Code::InvalidArgument,
            &["signing policy for product 7", needle],
        );
    }
    assert_refused(
        signer
            .get_policy(pb::GetPolicyRequest { product_id: 7 })
            .await,
        Code::NotFound,
        &["product 7 has no signing policy"],
    );
    assert_eq!(stack.scan_keys().await?, before, "no policy stored");
    stack.stop().await;
    Ok(())
}

/// The `set_policy` audit records, oldest first.
async fn policy_audit(stack: &Stack) -> anyhow::Result<Vec<audit::AuditRecord>> {
    let mut records = audit::recent(&mut stack.redis().await?, 1000, None).await?;
    records.retain(|r| r.action == "set_policy");
    Ok(records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_only_policies_need_allow_cloud_only_and_then_warn() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut signer = stack.signer.clone();
    let (cloud_pem, cloud_id) = stack.cloud_release_key().await?;
    let (customer, customer_pem) = customer_key()?;
    let (_, other_pem) = customer_key()?;
    let key = |name: &str, pem: &str| pb::PolicyKey {
        name: name.into(),
        public_key_pem: pem.into(),
        key_id: String::new(),
    };
    let set =
        |keys: Vec<pb::PolicyKey>, threshold: u32, allow_cloud_only: bool| pb::SetPolicyRequest {
            policy: Some(pb::SigningPolicy {
                product_id: 9,
                keys,
                threshold,
                cloud_only: false,
                version: 0,
                policy_json: String::new(),
            }),
            allow_cloud_only,
        };

    // Policies the cloud's own key meets alone are refused, whatever the
    // key is called, and nothing is stored or audited.
    let before = stack.scan_keys().await?;
    for (req, needle) in [
        (
            set(vec![key("cloud-release", &cloud_pem)], 1, false),
            "it requires 1 signature and the cloud holds 1 of its 1 keys (cloud-release (key",
        ),
        (
            set(
                vec![key("customer", &customer_pem), key("ops", &cloud_pem)],
                1,
                false,
            ),
            "it requires 1 signature and the cloud holds 1 of its 2 keys (ops (key",
        ),
    ] {
        assert_refused(
            signer.set_policy(req).await,
            Code::InvalidArgument,
            &[
                "signing policy for product 9",
                "the cloud alone could release firmware",
                needle,
                &cloud_id[..16],
                "the customer's offline key AND the cloud release key",
                "trellis policy set --product 9 --key customer.pub.pem --cloud-release-key",
                "--allow-cloud-only",
            ],
        );
    }
    assert_eq!(stack.scan_keys().await?, before, "no policy stored");
    assert!(policy_audit(&stack).await?.is_empty());

    // Policies that need a key the cloud does not hold are fine, with or
    // without the flag (which then changes nothing).
    for (req, threshold) in [
        (set(vec![key("customer", &customer_pem)], 1, false), 1),
        (
            set(
                vec![
                    key("customer", &customer_pem),
                    key("cloud-release", &cloud_pem),
                ],
                2,
                true,
            ),
            2,
        ),
        (
            set(
                vec![
                    key("customer", &customer_pem),
                    key("other", &other_pem),
                    key("cloud-release", &cloud_pem),
                ],
                2,
                false,
            ),
            2,
        ),
    ] {
        let p = signer.set_policy(req).await?.into_inner();
        assert_eq!(p.threshold, threshold);
        assert!(!p.cloud_only, "{p:?}");
    }
    let last = policy_audit(&stack).await?;
    let last = last.last().expect("audited");
    assert_eq!(last.detail("cloud_only"), Some("false"));
    assert_eq!(last.detail("allow_cloud_only"), Some("false"));

    // A release made while the policy needs the customer: no warning.
    let image = image_bytes(5_000, 3);
    let sha = upload(&mut signer, upload_messages(9, &image, 4096))
        .await?
        .sha256;
    let r = create(&mut signer, 9, 1, &sha).await?;
    assert!(r.policy_warning.is_empty(), "{}", r.policy_warning);

    // With --allow-cloud-only the cloud-only policy is accepted and recorded.
    let p = signer
        .set_policy(set(
            vec![
                key("customer", &customer_pem),
                key("cloud-release", &cloud_pem),
            ],
            1,
            true,
        ))
        .await?
        .into_inner();
    assert!(p.cloud_only);
    assert_eq!(p.threshold, 1);
    let shown = signer
        .get_policy(pb::GetPolicyRequest { product_id: 9 })
        .await?
        .into_inner();
    assert_eq!(shown, p);
    let json: String = redis::cmd("GET")
        .arg(keys::policy(9))
        .query_async(&mut stack.redis().await?)
        .await?;
    let record: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(record["allow_cloud_only"], true, "{json}");
    // Still the policy file a device is given (the flag is ignored there).
    let device_policy = TrustPolicy::from_json(&json).expect("a device policy");
    assert_eq!(device_policy.threshold(), 1);
    let audited = policy_audit(&stack).await?;
    let audited = audited.last().expect("audited");
    assert_eq!(audited.actor, "unauthenticated@default");
    assert_eq!(audited.detail("product_id"), Some("9"));
    assert_eq!(audited.detail("allow_cloud_only"), Some("true"));
    assert_eq!(audited.detail("cloud_only"), Some("true"));

    // Every release operation on the product now says so.
    let says_cloud_only = |w: &str| {
        assert!(
            w.contains("product 9's signing policy can be met by the cloud's keys alone")
                && w.contains("(set with --allow-cloud-only)")
                && w.contains("do not need the customer's offline key")
                && w.contains("trellis policy set --product 9"),
            "warning: {w:?}"
        );
    };
    let r = create(&mut signer, 9, 2, &sha).await?;
    says_cloud_only(&r.policy_warning);
    let manifest = r.signed.unwrap_or_default().manifest;
    let r = add_sig(&mut signer, "9-2", sign_manifest(&customer, &manifest)?).await?;
    says_cloud_only(&r.policy_warning);
    let v = verify(&mut signer, "9-2").await?;
    assert!(
        v.satisfied,
        "the customer alone meets 1 of 2: {}",
        v.message
    );
    says_cloud_only(&v.policy_warning);
    let r = signer
        .sign_release(pb::SignReleaseRequest {
            release_id: "9-1".into(),
        })
        .await?
        .into_inner();
    says_cloud_only(&r.policy_warning);
    let v = verify(&mut signer, "9-1").await?;
    assert!(v.satisfied, "the cloud alone meets it: {}", v.message);
    assert_eq!(v.signed_by, vec!["cloud-release"]);
    says_cloud_only(&v.policy_warning);
    // Other products are not affected.
    let other = image_bytes(3_000, 4);
    let other_sha = upload(&mut signer, upload_messages(8, &other, 4096))
        .await?
        .sha256;
    let r = create(&mut signer, 8, 1, &other_sha).await?;
    assert!(r.policy_warning.is_empty(), "{}", r.policy_warning);

    // A cloud-only policy stored before such policies were refused (no
    // allow_cloud_only in the record) warns too: the check is against the
    // keys, not the flag.
    let legacy = TrustPolicy::new(
        vec![trellis_firmware::TrustedKey::new(
            "cloud-release",
            trellis_firmware::public_key_from_pem(&cloud_pem)?,
        )?],
        1,
    )?
    .to_json()?;
    let _: () = redis::cmd("SET")
        .arg(keys::policy(9))
        .arg(&legacy)
        .query_async(&mut stack.redis().await?)
        .await?;
    let v = verify(&mut signer, "9-1").await?;
    assert!(
        v.policy_warning
            .contains("can be met by the cloud's keys alone")
            && !v.policy_warning.contains("--allow-cloud-only"),
        "{}",
        v.policy_warning
    );
    let shown = signer
        .get_policy(pb::GetPolicyRequest { product_id: 9 })
        .await?
        .into_inner();
    assert!(shown.cloud_only);

    // Requiring the customer again ends the warnings.
    let p = signer
        .set_policy(set(
            vec![
                key("customer", &customer_pem),
                key("cloud-release", &cloud_pem),
            ],
            2,
            false,
        ))
        .await?
        .into_inner();
    assert!(!p.cloud_only);
    let v = verify(&mut signer, "9-2").await?;
    assert!(!v.satisfied);
    assert!(v.policy_warning.is_empty(), "{}", v.policy_warning);
    let r = create(&mut signer, 9, 3, &sha).await?;
    assert!(r.policy_warning.is_empty(), "{}", r.policy_warning);
    stack.stop().await;
    Ok(())
}

#[test]
fn private_keys_from_openssl_style_pem_sign() -> anyhow::Result<()> {
    // PKCS#8 PEM (what `trellis firmware keygen` and `openssl genpkey` write)
    // round-trips into a key whose signatures verify.
    use rsa::pkcs8::EncodePrivateKey;
    let (key, pem) = customer_key()?;
    let private_pem = key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)?;
    let parsed = private_key_from_pem(&private_pem)?;
    let s = sign_manifest(&parsed, b"manifest")?;
    verify_signature(
        &trellis_firmware::public_key_from_pem(&pem)?,
        b"manifest",
        &s,
    )?;
    Ok(())
}
