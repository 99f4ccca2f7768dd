//! `trellis firmware ...`, `trellis release ...` and `trellis policy ...`:
//! the signer's operator commands (thin gRPC clients of the `Signer`
//! service at `--signer-url`, `TRELLIS_SIGNER_URL`), plus the two commands
//! a customer runs on an offline machine, with no network at all:
//! `firmware keygen` (makes the customer's release key) and `firmware sign`
//! (signs the exact manifest bytes that `release manifest` wrote).
//!
//! The signature file `firmware sign` writes and `release add-signature`
//! reads is JSON (see [`SignatureFile`]):
//!
//! ```json
//! {
//!   "format": "trellis-manifest-signature/v1",
//!   "algorithm": "RSA-PSS-SHA256 (MGF1-SHA256, salt 32)",
//!   "key_id": "<hex SHA-256 of the signer's DER SubjectPublicKeyInfo>",
//!   "manifest_sha256": "<hex SHA-256 of the exact manifest bytes signed>",
//!   "product_id": 7,
//!   "version": 3,
//!   "signature": "<hex RSA-PSS signature>"
//! }
//! ```
use crate::cli::Endpoints;
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;
use trellis_core::telemetry::TracedChannel;
use trellis_firmware::{
    FirmwareManifest, ManifestSignature, TrustPolicy, decode_manifest, key_id,
    private_key_from_pem, public_key_from_pem, public_key_to_pem, sign_manifest,
};
use trellis_proto::v1 as pb;
use trellis_proto::v1::key_vault_client::KeyVaultClient;
use trellis_proto::v1::signer_client::SignerClient;

/// The `format` of a signature file.
pub const SIGNATURE_FORMAT: &str = "trellis-manifest-signature/v1";
const ALGORITHM: &str = "RSA-PSS-SHA256 (MGF1-SHA256, salt 32)";
/// The name `policy set --cloud-release-key` gives keyvault's release key.
const CLOUD_RELEASE_NAME: &str = "cloud-release";

#[derive(Debug, Subcommand)]
pub enum FirmwareCommand {
    /// Stream an image to the signer and print its SHA-256; with --version,
    /// also create the release.
    Upload(UploadArgs),
    /// Sign a manifest file OFFLINE with a private key (no network).
    Sign {
        /// The private key (PKCS#8 or PKCS#1 PEM, RSA 2048 bits or more).
        #[arg(long)]
        key: PathBuf,
        /// The manifest bytes, as `trellis release manifest` wrote them.
        manifest: PathBuf,
        /// Where to write the signature file (default: MANIFEST.sig).
        #[arg(short = 'o', long)]
        out: Option<PathBuf>,
    },
    /// Make an offline release key pair (OUT and OUT's .pub.pem).
    Keygen {
        /// The private key file to create (PKCS#8 PEM, mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// RSA modulus size.
        #[arg(long, default_value_t = 3072)]
        bits: usize,
    },
}

#[derive(Debug, Clone, Args)]
pub struct UploadArgs {
    /// The firmware image.
    pub file: PathBuf,
    /// The product the image is for.
    #[arg(long)]
    pub product: u32,
    /// Also create release PRODUCT-VERSION from the image.
    #[arg(long)]
    pub version: Option<u32>,
    /// Bytes per UploadImage message.
    #[arg(long, default_value_t = 256 * 1024)]
    pub chunk_size: usize,
}

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Create release PRODUCT-VERSION from an uploaded image.
    Create {
        /// The product the release is for (the image's product).
        #[arg(long)]
        product: u32,
        /// The release version (1 or more; each is released once).
        #[arg(long)]
        version: u32,
        /// The image's SHA-256, as `trellis firmware upload` printed it.
        #[arg(long)]
        image: String,
    },
    /// Sign with the cloud release key (keyvault, through the signer).
    Sign {
        /// Release id, PRODUCT-VERSION (`trellis release list`).
        release: String,
    },
    /// Upload a signature file made by `trellis firmware sign`.
    AddSignature {
        /// Release id, PRODUCT-VERSION.
        release: String,
        /// The signature file.
        signature: PathBuf,
    },
    /// Which signatures the product's policy still needs; exits 1 when
    /// the release does not meet it.
    Verify {
        /// Release id, PRODUCT-VERSION.
        release: String,
    },
    /// One release: manifest, image, signatures.
    Show {
        /// Release id, PRODUCT-VERSION.
        release: String,
        /// Print JSON (with the manifest bytes as hex).
        #[arg(long)]
        json: bool,
    },
    /// Every release (of one product).
    List {
        /// Only this product (0: all).
        #[arg(long, default_value_t = 0)]
        product: u32,
    },
    /// Write the exact manifest bytes to a file, to sign them offline.
    Manifest {
        /// Release id, PRODUCT-VERSION.
        release: String,
        /// The file to write the manifest bytes to.
        #[arg(short = 'o', long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Set which keys a product's releases must be signed by, and how many.
    Set {
        /// The product the policy is for.
        #[arg(long)]
        product: u32,
        /// A trusted public key, `NAME=PUB.pem` or `PUB.pem` (named after the
        /// file: customer.pub.pem is "customer"). Repeat for each key.
        #[arg(long = "key", value_name = "[NAME=]PUB.pem")]
        keys: Vec<String>,
        /// Also trust keyvault's cloud release key, as "cloud-release" (read
        /// from --keyvault-url).
        #[arg(long)]
        cloud_release_key: bool,
        /// How many of the keys must have signed (default: all of them).
        #[arg(long)]
        threshold: Option<u32>,
        /// Accept a policy the cloud's own keys can meet alone (only
        /// --cloud-release-key, or a threshold it reaches by itself), which
        /// the signer refuses otherwise: the customer's key is then not
        /// needed to release firmware. Recorded and audited; every release
        /// command on the product warns.
        #[arg(long)]
        allow_cloud_only: bool,
    },
    /// A product's signing policy (its devices' current trust policy), or
    /// a policy release (a rotation) with the signatures it still needs.
    Show {
        /// The product whose policy to show.
        #[arg(long, required_unless_present = "release")]
        product: Option<u32>,
        /// A policy release (`tp-<product>-<version>`) instead.
        #[arg(long, conflicts_with = "product")]
        release: Option<String>,
        /// Print the policy file a device is provisioned with (JSON).
        #[arg(long)]
        json: bool,
    },
    /// Start a trust policy rotation: the product's next device trust
    /// policy, stored as a policy release `tp-<product>-<version>` that must
    /// be signed by a threshold of the CURRENT policy's keys and by a
    /// threshold of the new one's (`trellis policy sign`), then rolled out
    /// (`trellis rollout create --policy-release ID`).
    Rotate {
        #[arg(long)]
        product: u32,
        /// The new policy (policy.json form). Without "version": the
        /// current version + 1.
        #[arg(long = "new", value_name = "POLICY.json")]
        new_policy: PathBuf,
        /// The new policy trusts keyvault's CURRENT release key, as
        /// "cloud-release", in place of any older release key version it
        /// names: how a product moves to a rotated release key (`trellis
        /// keys rotate release`).
        #[arg(long)]
        cloud_release_key: bool,
        /// As `policy set --allow-cloud-only`, for the new policy.
        #[arg(long)]
        allow_cloud_only: bool,
    },
    /// Sign a policy release: with a private key file, locally (the key
    /// never leaves this machine; only the signature is uploaded), or with
    /// the cloud release key (`--cloud`, keyvault signs).
    Sign {
        /// The policy release, `tp-<product>-<version>`.
        release: String,
        /// A private key (PEM) of the current or the new policy.
        #[arg(long, value_name = "KEY.pem", required_unless_present = "cloud")]
        key: Option<PathBuf>,
        /// Sign with keyvault's cloud release key instead.
        #[arg(long, conflicts_with = "key")]
        cloud: bool,
    },
    /// Policy releases (rotations), of one product or all.
    List {
        #[arg(long)]
        product: Option<u32>,
    },
}

impl FirmwareCommand {
    pub fn name(&self) -> &'static str {
        match self {
            FirmwareCommand::Upload(_) => "firmware upload",
            FirmwareCommand::Sign { .. } => "firmware sign",
            FirmwareCommand::Keygen { .. } => "firmware keygen",
        }
    }
}

impl ReleaseCommand {
    pub fn name(&self) -> &'static str {
        match self {
            ReleaseCommand::Create { .. } => "release create",
            ReleaseCommand::Sign { .. } => "release sign",
            ReleaseCommand::AddSignature { .. } => "release add-signature",
            ReleaseCommand::Verify { .. } => "release verify",
            ReleaseCommand::Show { .. } => "release show",
            ReleaseCommand::List { .. } => "release list",
            ReleaseCommand::Manifest { .. } => "release manifest",
        }
    }
}

impl PolicyCommand {
    pub fn name(&self) -> &'static str {
        match self {
            PolicyCommand::Set { .. } => "policy set",
            PolicyCommand::Show { .. } => "policy show",
            PolicyCommand::Rotate { .. } => "policy rotate",
            PolicyCommand::Sign { .. } => "policy sign",
            PolicyCommand::List { .. } => "policy list",
        }
    }
}

/// A signature as `firmware sign` writes it and `release add-signature`
/// reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureFile {
    pub format: String,
    #[serde(default)]
    pub algorithm: String,
    pub key_id: String,
    /// SHA-256 of the manifest bytes signed (checked against the release
    /// before uploading, so a signature of another release is caught here).
    #[serde(default)]
    pub manifest_sha256: String,
    #[serde(default)]
    pub product_id: u32,
    #[serde(default)]
    pub version: u32,
    /// Hex.
    pub signature: String,
}

async fn signer(endpoints: &Endpoints) -> anyhow::Result<SignerClient<TracedChannel>> {
    Ok(SignerClient::new(
        crate::ops::channel(&endpoints.signer_url, "the signer", "--signer-url").await?,
    ))
}

/// gRPC errors as an operator should read them.
fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn read_text(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn describe_manifest(m: &FirmwareManifest) -> String {
    format!(
        "product {}, version {}, image {} bytes, SHA-256 {}",
        m.product_id,
        m.version,
        m.image_size,
        hex::encode(&m.image_sha256)
    )
}

pub async fn firmware(endpoints: &Endpoints, cmd: FirmwareCommand) -> anyhow::Result<()> {
    match cmd {
        FirmwareCommand::Upload(args) => upload(endpoints, args).await,
        FirmwareCommand::Sign { key, manifest, out } => sign_offline(&key, &manifest, out),
        FirmwareCommand::Keygen { out, bits } => keygen(&out, bits),
    }
}

async fn upload(endpoints: &Endpoints, args: UploadArgs) -> anyhow::Result<()> {
    if args.chunk_size == 0 {
        bail!("--chunk-size 0: give the bytes per message (for example 262144)");
    }
    let path = &args.file;
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let size = file
        .metadata()
        .await
        .with_context(|| format!("cannot read the size of {}", path.display()))?
        .len();
    if size == 0 {
        bail!(
            "{} is empty: an empty image is never firmware",
            path.display()
        );
    }
    let mut client = signer(endpoints).await?;

    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message("uploading");
        bar
    } else {
        ProgressBar::hidden()
    };

    // The file is read and sent chunk by chunk; the reader reports its own
    // I/O error, which explains a short upload better than the signer can.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadImageRequest>(4);
    let product_id = args.product;
    let chunk_size = args.chunk_size;
    let reader_bar = bar.clone();
    let display = path.display().to_string();
    let reader = tokio::spawn(async move {
        use pb::upload_image_request::Part;
        let mut hasher = Sha256::new();
        let header = pb::UploadImageRequest {
            part: Some(Part::Header(pb::UploadImageHeader {
                product_id,
                size,
                organization: String::new(),
            })),
        };
        if tx.send(header).await.is_err() {
            return Ok(None);
        }
        let mut sent: u64 = 0;
        loop {
            let mut buf = vec![0u8; chunk_size];
            let n = file
                .read(&mut buf)
                .await
                .with_context(|| format!("reading {display} after {sent} bytes"))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            hasher.update(&buf);
            sent += n as u64;
            let data = pb::UploadImageRequest {
                part: Some(Part::Data(buf)),
            };
            if tx.send(data).await.is_err() {
                // The call ended early; its status says why.
                return Ok(None);
            }
            reader_bar.set_position(sent);
        }
        if sent != size {
            bail!("{display} changed while it was read ({size} bytes, then {sent}); try again");
        }
        anyhow::Ok(Some(hex::encode(hasher.finalize())))
    });
    let result = client
        .upload_image(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let local_sha = match reader.await {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("the file reader stopped: {e}")),
    };
    bar.finish_and_clear();
    let local_sha = local_sha?;
    let image = result.map_err(status)?.into_inner();
    if let Some(local) = local_sha
        && local != image.sha256
    {
        bail!(
            "the signer stored SHA-256 {} but {} hashes to {local}: the upload was altered on \
             the way; upload again",
            image.sha256,
            path.display()
        );
    }
    println!("{}", image.sha256);
    eprintln!(
        "uploaded {}: {} bytes for product {}, SHA-256 {}",
        path.display(),
        image.size,
        image.product_id,
        image.sha256
    );
    if let Some(version) = args.version {
        let release = client
            .create_release(pb::CreateReleaseRequest {
                product_id: args.product,
                version,
                image_sha256: image.sha256.clone(),
            })
            .await
            .map_err(status)?
            .into_inner();
        println!("{}", release.release_id);
        created_hint(&release);
        policy_warning(&release.policy_warning);
    } else {
        eprintln!(
            "next: trellis release create --product {} --version V --image {}",
            image.product_id, image.sha256
        );
    }
    Ok(())
}

fn created_hint(release: &pb::Release) {
    eprintln!(
        "release {} created (product {}, version {}, image {}); next: `trellis release manifest \
         {} -o {}.manifest` to sign it offline, `trellis release sign {}` for the cloud release \
         key",
        release.release_id,
        release.product_id,
        release.version,
        release.image_sha256,
        release.release_id,
        release.release_id,
        release.release_id
    );
}

/// `firmware sign`: reads the key and the manifest, signs, writes the file.
/// Nothing here touches the network.
fn sign_offline(key_path: &Path, manifest_path: &Path, out: Option<PathBuf>) -> anyhow::Result<()> {
    let manifest_bytes = read(manifest_path, "the manifest")?;
    let manifest = decode_manifest(&manifest_bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a release manifest ({e}); write it with `trellis release manifest \
             RELEASE -o FILE` and sign that file unchanged",
            manifest_path.display()
        )
    })?;
    let pem = zeroize::Zeroizing::new(read_text(key_path, "the private key")?);
    let key = private_key_from_pem(&pem)
        .with_context(|| format!("{} is not a private key", key_path.display()))?;
    let signature = sign_manifest(&key, &manifest_bytes)
        .with_context(|| format!("signing with {}", key_path.display()))?;
    let file = SignatureFile {
        format: SIGNATURE_FORMAT.into(),
        algorithm: ALGORITHM.into(),
        key_id: signature.key_id.clone(),
        manifest_sha256: hex::encode(Sha256::digest(&manifest_bytes)),
        product_id: manifest.product_id,
        version: manifest.version,
        signature: hex::encode(&signature.signature),
    };
    let out = out.unwrap_or_else(|| {
        let mut name = manifest_path.as_os_str().to_owned();
        name.push(".sig");
        PathBuf::from(name)
    });
    let mut json = serde_json::to_string_pretty(&file).context("encoding the signature file")?;
    json.push('\n');
    std::fs::write(&out, json).with_context(|| format!("cannot write {}", out.display()))?;
    println!("{}", out.display());
    eprintln!(
        "signed {} ({}) with key {}; upload it with `trellis release add-signature {}-{} {}`",
        manifest_path.display(),
        describe_manifest(&manifest),
        signature.key_id,
        manifest.product_id,
        manifest.version,
        out.display()
    );
    Ok(())
}

/// `firmware keygen`: OUT (PKCS#8 PEM, 0600, never overwritten) and its
/// public key beside it.
fn keygen(out: &Path, bits: usize) -> anyhow::Result<()> {
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    if bits < trellis_firmware::MIN_RELEASE_KEY_BITS {
        bail!(
            "--bits {bits}: release keys need at least {} bits",
            trellis_firmware::MIN_RELEASE_KEY_BITS
        );
    }
    if bits > 8192 {
        bail!("--bits {bits}: at most 8192 (3072 is plenty)");
    }
    let public_path = public_path_for(out);
    for p in [out, public_path.as_path()] {
        if p.exists() {
            bail!(
                "{} already exists; refusing to overwrite a key (choose another --out)",
                p.display()
            );
        }
    }
    eprintln!("making an RSA-{bits} key...");
    let key = rsa::PrivateKey::new(&mut rand::rng(), bits)
        .map_err(|e| anyhow::anyhow!("RSA key generation failed: {e}"))?;
    let public = key.to_public_key();
    let private_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("encoding the private key: {e}"))?;
    let public_pem = public_key_to_pem(&public)?;
    write_private(out, private_pem.as_bytes())?;
    std::fs::write(&public_path, public_pem)
        .with_context(|| format!("cannot write {}", public_path.display()))?;
    let id = key_id(&public);
    println!("{id}");
    eprintln!(
        "private key {} (mode 0600: keep it offline), public key {}, key id {id}; trust it with \
         `trellis policy set --product P --key {}`",
        out.display(),
        public_path.display(),
        public_path.display()
    );
    Ok(())
}

/// Creates `path` owner-only (0600) and writes a private key into it; an
/// existing file is never overwritten.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// customer.pem → customer.pub.pem; key → key.pub.pem.
fn public_path_for(private: &Path) -> PathBuf {
    let name = private
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let stem = name.strip_suffix(".pem").unwrap_or(&name);
    private.with_file_name(format!("{stem}.pub.pem"))
}

pub async fn release(endpoints: &Endpoints, cmd: ReleaseCommand) -> anyhow::Result<()> {
    let mut client = signer(endpoints).await?;
    match cmd {
        ReleaseCommand::Create {
            product,
            version,
            image,
        } => {
            let release = client
                .create_release(pb::CreateReleaseRequest {
                    product_id: product,
                    version,
                    image_sha256: image,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", release.release_id);
            created_hint(&release);
            policy_warning(&release.policy_warning);
        }
        ReleaseCommand::Sign { release } => {
            let r = client
                .sign_release(pb::SignReleaseRequest {
                    release_id: release,
                })
                .await
                .map_err(status)?
                .into_inner();
            eprintln!("release {} signed with the cloud release key", r.release_id);
            print_verify(&mut client, &r.release_id).await?;
        }
        ReleaseCommand::AddSignature { release, signature } => {
            let file: SignatureFile =
                serde_json::from_str(&read_text(&signature, "the signature file")?).with_context(
                    || {
                        format!(
                            "{} is not a signature file (JSON written by `trellis firmware sign`)",
                            signature.display()
                        )
                    },
                )?;
            if file.format != SIGNATURE_FORMAT {
                bail!(
                    "{}: format {:?} is not {SIGNATURE_FORMAT:?}",
                    signature.display(),
                    file.format
                );
            }
            let bytes = hex::decode(file.signature.trim())
                .with_context(|| format!("{}: the signature is not hex", signature.display()))?;
            let current = client
                .get_release(pb::GetReleaseRequest {
                    release_id: release.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let manifest = current.signed.clone().unwrap_or_default().manifest;
            let manifest_sha = hex::encode(Sha256::digest(&manifest));
            if !file.manifest_sha256.is_empty() && file.manifest_sha256 != manifest_sha {
                bail!(
                    "{} signs manifest {} (product {}, version {}), not release {}'s manifest {}; \
                     write this release's with `trellis release manifest {} -o FILE` and sign \
                     that",
                    signature.display(),
                    file.manifest_sha256,
                    file.product_id,
                    file.version,
                    current.release_id,
                    manifest_sha,
                    current.release_id
                );
            }
            let r = client
                .add_signature(pb::AddSignatureRequest {
                    release_id: current.release_id.clone(),
                    signature: Some(ManifestSignature {
                        key_id: file.key_id.clone(),
                        signature: bytes,
                    }),
                })
                .await
                .map_err(status)?
                .into_inner();
            eprintln!(
                "signature by key {} added to release {}",
                file.key_id, r.release_id
            );
            print_verify(&mut client, &r.release_id).await?;
        }
        ReleaseCommand::Verify { release } => {
            let v = print_verify(&mut client, &release).await?;
            if !v.satisfied {
                if v.missing.is_empty() {
                    bail!("release {release} does not meet its signing policy");
                }
                bail!(
                    "release {release} is not completely signed: missing {}",
                    v.missing.join(", ")
                );
            }
        }
        ReleaseCommand::Show { release, json } => {
            let r = client
                .get_release(pb::GetReleaseRequest {
                    release_id: release,
                })
                .await
                .map_err(status)?
                .into_inner();
            show_release(&r, json)?;
        }
        ReleaseCommand::List { product } => {
            let list = client
                .list_releases(pb::ListReleasesRequest {
                    product_id: product,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "{:<14} {:>8} {:>8} {:>10} {:>5}  IMAGE SHA-256",
                "RELEASE", "PRODUCT", "VERSION", "SIZE", "SIGS"
            );
            for r in list.releases {
                println!(
                    "{:<14} {:>8} {:>8} {:>10} {:>5}  {}",
                    r.release_id,
                    r.product_id,
                    r.version,
                    r.image_size,
                    r.signed.map(|s| s.signatures.len()).unwrap_or(0),
                    r.image_sha256
                );
            }
        }
        ReleaseCommand::Manifest { release, out } => {
            let r = client
                .get_release(pb::GetReleaseRequest {
                    release_id: release,
                })
                .await
                .map_err(status)?
                .into_inner();
            let manifest = r.signed.unwrap_or_default().manifest;
            if manifest.is_empty() {
                bail!("release {} holds no manifest", r.release_id);
            }
            std::fs::write(&out, &manifest)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("{}", hex::encode(Sha256::digest(&manifest)));
            eprintln!(
                "wrote the {} manifest bytes of release {} to {}; sign them offline with \
                 `trellis firmware sign --key KEY.pem {}`",
                manifest.len(),
                r.release_id,
                out.display(),
                out.display()
            );
        }
    }
    Ok(())
}

async fn print_verify(
    client: &mut SignerClient<TracedChannel>,
    release: &str,
) -> anyhow::Result<pb::VerifyReleaseResponse> {
    let v = client
        .verify_release(pb::VerifyReleaseRequest {
            release_id: release.to_string(),
        })
        .await
        .map_err(status)?
        .into_inner();
    println!("{}", v.message);
    policy_warning(&v.policy_warning);
    if v.threshold > 0 {
        println!(
            "signed by: {}",
            if v.signed_by.is_empty() {
                "-".to_string()
            } else {
                v.signed_by.join(", ")
            }
        );
        println!(
            "missing:   {}",
            if v.missing.is_empty() {
                "-".to_string()
            } else {
                v.missing.join(", ")
            }
        );
    }
    Ok(v)
}

/// The signer's warning that a product's policy can be met by cloud keys
/// alone (`policy set --allow-cloud-only`), on stderr; nothing when empty.
fn policy_warning(warning: &str) {
    if !warning.is_empty() {
        eprintln!("warning: {warning}");
    }
}

fn show_release(r: &pb::Release, json: bool) -> anyhow::Result<()> {
    let signed = r.signed.clone().unwrap_or_default();
    let manifest = decode_manifest(&signed.manifest).ok();
    if json {
        let v = serde_json::json!({
            "release_id": r.release_id,
            "product_id": r.product_id,
            "version": r.version,
            "image_sha256": r.image_sha256,
            "image_size": r.image_size,
            "created_at_ms": r.created_at_ms,
            "manifest_sha256": hex::encode(Sha256::digest(&signed.manifest)),
            "manifest_hex": hex::encode(&signed.manifest),
            "organization": manifest.as_ref().map(|m| m.organization.clone()),
            "signatures": signed
                .signatures
                .iter()
                .map(|s| serde_json::json!({
                    "key_id": s.key_id,
                    "signature_hex": hex::encode(&s.signature),
                }))
                .collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("release     {}", r.release_id);
    println!("product     {}", r.product_id);
    println!("version     {}", r.version);
    println!("image       {} ({} bytes)", r.image_sha256, r.image_size);
    println!("created     {} ms", r.created_at_ms);
    println!(
        "manifest    {} bytes, SHA-256 {}",
        signed.manifest.len(),
        hex::encode(Sha256::digest(&signed.manifest))
    );
    match &manifest {
        Some(m) => println!("            {}", describe_manifest(m)),
        None => println!("            (does not decode as a manifest)"),
    }
    if signed.signatures.is_empty() {
        println!("signatures  none");
    }
    for (i, s) in signed.signatures.iter().enumerate() {
        println!(
            "{}  key {}",
            if i == 0 { "signatures" } else { "          " },
            s.key_id
        );
    }
    Ok(())
}

/// `NAME=PUB.pem` or `PUB.pem`.
pub(crate) fn parse_key_arg(arg: &str) -> anyhow::Result<(String, PathBuf)> {
    let (name, path) = match arg.split_once('=') {
        Some((n, p)) if !n.trim().is_empty() => (n.trim().to_string(), PathBuf::from(p)),
        Some(_) => bail!("--key {arg:?}: the name before '=' is empty; give NAME=PUB.pem"),
        None => {
            let path = PathBuf::from(arg);
            let file = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let mut stem = file.as_str();
            for suffix in [".pem", ".pub", ".public"] {
                stem = stem.strip_suffix(suffix).unwrap_or(stem);
            }
            if stem.is_empty() {
                bail!("--key {arg:?}: cannot name this key from its file; give NAME=PUB.pem");
            }
            (stem.to_string(), path)
        }
    };
    Ok((name, path))
}

/// `policy_json` with every key that is a version of keyvault's release key
/// (`versions`) replaced by the current version, named "cloud-release".
fn with_current_release_key(
    policy_json: &str,
    versions: &[pb::SigningKey],
) -> anyhow::Result<String> {
    let current = versions
        .iter()
        .find(|k| k.current)
        .context("keyvault has no live release key version (`trellis keys status`)")?;
    let mut doc: serde_json::Value = serde_json::from_str(policy_json).context("not JSON")?;
    let keys = doc
        .get_mut("keys")
        .and_then(|k| k.as_array_mut())
        .context("no \"keys\" list")?;
    let mut kept = Vec::with_capacity(keys.len() + 1);
    for k in keys.drain(..) {
        let pem = k.get("public_key").and_then(|p| p.as_str()).unwrap_or("");
        let key_id = public_key_from_pem(pem)
            .ok()
            .and_then(|p| trellis_firmware::TrustedKey::new("k", p).ok())
            .map(|t| t.key_id);
        let is_cloud = key_id
            .as_deref()
            .is_some_and(|id| versions.iter().any(|v| v.key_id == id));
        let name = k.get("name").and_then(|n| n.as_str()).unwrap_or("");
        if !is_cloud && name != CLOUD_RELEASE_NAME {
            kept.push(k);
        }
    }
    kept.push(serde_json::json!({
        "name": CLOUD_RELEASE_NAME,
        "key_id": current.key_id,
        "public_key": current.public_key_pem,
    }));
    *keys = kept;
    Ok(serde_json::to_string_pretty(&doc)?)
}

pub async fn policy(endpoints: &Endpoints, cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Set {
            product,
            keys,
            cloud_release_key,
            threshold,
            allow_cloud_only,
        } => {
            let mut policy_keys = Vec::new();
            for arg in &keys {
                let (name, path) = parse_key_arg(arg)?;
                let pem = read_text(&path, "the public key")?;
                public_key_from_pem(&pem).with_context(|| {
                    format!(
                        "--key {arg}: {} is not a PEM public key (BEGIN PUBLIC KEY); give the \
                         .pub.pem file, never the private key",
                        path.display()
                    )
                })?;
                policy_keys.push(pb::PolicyKey {
                    name,
                    public_key_pem: pem,
                    key_id: String::new(),
                });
            }
            if cloud_release_key {
                let mut kv = KeyVaultClient::new(
                    crate::ops::channel(&endpoints.keyvault_url, "keyvault", "--keyvault-url")
                        .await?,
                );
                let key = kv
                    .get_signing_key(pb::GetSigningKeyRequest {
                        purpose: "release".into(),
                        version: 0,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                policy_keys.push(pb::PolicyKey {
                    name: CLOUD_RELEASE_NAME.into(),
                    public_key_pem: key.public_key_pem,
                    key_id: key.key_id,
                });
            }
            if policy_keys.is_empty() {
                bail!("no keys: give --key [NAME=]PUB.pem (repeat it) and/or --cloud-release-key");
            }
            let threshold = threshold.unwrap_or(policy_keys.len() as u32);
            let set = signer(endpoints)
                .await?
                .set_policy(pb::SetPolicyRequest {
                    policy: Some(pb::SigningPolicy {
                        product_id: product,
                        keys: policy_keys,
                        threshold,
                        cloud_only: false,
                        version: 0,
                        policy_json: String::new(),
                    }),
                    allow_cloud_only,
                })
                .await
                .map_err(status)?
                .into_inner();
            print_policy(&set);
        }
        PolicyCommand::Show {
            release: Some(release),
            json,
            ..
        } => {
            let r = signer(endpoints)
                .await?
                .get_policy_release(pb::GetReleaseRequest {
                    release_id: release,
                })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                println!("{}", r.policy_json);
            } else {
                print_policy_release(&r);
            }
        }
        PolicyCommand::Rotate {
            product,
            new_policy,
            cloud_release_key,
            allow_cloud_only,
        } => {
            let mut text = read_text(&new_policy, "the new policy")?;
            if cloud_release_key {
                let mut kv = KeyVaultClient::new(
                    crate::ops::channel(&endpoints.keyvault_url, "keyvault", "--keyvault-url")
                        .await?,
                );
                let versions = kv
                    .list_signing_keys(pb::ListSigningKeysRequest {
                        purpose: "release".into(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .keys;
                text = with_current_release_key(&text, &versions)
                    .with_context(|| format!("{}", new_policy.display()))?;
            }
            // Checked here too, so a typo is caught before the network.
            TrustPolicy::from_json(&text)
                .with_context(|| format!("{} is not a trust policy", new_policy.display()))?;
            let r = signer(endpoints)
                .await?
                .create_policy_release(pb::CreatePolicyReleaseRequest {
                    product_id: product,
                    policy_json: text,
                    allow_cloud_only,
                })
                .await
                .map_err(status)?
                .into_inner();
            print_policy_release(&r);
            eprintln!(
                "sign it with `trellis policy sign {} --key KEY.pem` (each offline key) and/or \
                 `--cloud`, then roll it out with `trellis rollout create --policy-release {}`",
                r.release_id, r.release_id
            );
        }
        PolicyCommand::Sign {
            release,
            key,
            cloud,
        } => {
            let mut client = signer(endpoints).await?;
            let r = if cloud {
                client
                    .sign_policy_release(pb::SignReleaseRequest {
                        release_id: release,
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
            } else {
                let key_path = key.context("give --key KEY.pem or --cloud")?;
                let current = client
                    .get_policy_release(pb::GetReleaseRequest {
                        release_id: release.clone(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                let bytes = current.signed.map(|s| s.policy).unwrap_or_default();
                // What is signed is checked to be the policy shown, locally.
                let policy = trellis_firmware::decode_policy(&bytes).map_err(|e| {
                    anyhow::anyhow!("the signer sent bytes that are not a trust policy: {e}")
                })?;
                if hex::encode(Sha256::digest(&bytes)) != current.policy_sha256 {
                    bail!(
                        "the policy bytes do not hash to the release's policy_sha256; not signing"
                    );
                }
                let pem = zeroize::Zeroizing::new(read_text(&key_path, "the private key")?);
                let private = private_key_from_pem(&pem)
                    .with_context(|| format!("{} is not a private key", key_path.display()))?;
                let signature = trellis_firmware::sign_policy(&private, &bytes)
                    .with_context(|| format!("signing with {}", key_path.display()))?;
                eprintln!(
                    "signing policy version {} ({} of {} keys) with key {}",
                    policy.version(),
                    policy.threshold(),
                    policy.keys().len(),
                    signature.key_id
                );
                client
                    .add_policy_signature(pb::AddSignatureRequest {
                        release_id: release,
                        signature: Some(signature),
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
            };
            print_policy_release(&r);
        }
        PolicyCommand::List { product } => {
            let list = signer(endpoints)
                .await?
                .list_policy_releases(pb::ListReleasesRequest {
                    product_id: product.unwrap_or(0),
                })
                .await
                .map_err(status)?
                .into_inner();
            if list.releases.is_empty() {
                println!("no policy releases");
            }
            for r in &list.releases {
                println!(
                    "{:<14} v{} (from v{})  {}  {}",
                    r.release_id,
                    r.version,
                    r.previous_version,
                    &r.policy_sha256.get(..16).unwrap_or(&r.policy_sha256),
                    if r.complete {
                        "complete"
                    } else {
                        "needs signatures"
                    }
                );
            }
        }
        PolicyCommand::Show { product, json, .. } => {
            let product = product.context("give --product P or --release ID")?;
            let p = signer(endpoints)
                .await?
                .get_policy(pb::GetPolicyRequest {
                    product_id: product,
                })
                .await
                .map_err(status)?
                .into_inner();
            if json && !p.policy_json.is_empty() {
                // The firmware crate's policy file, command policy included:
                // what a device is given, and what `policy rotate` starts from.
                println!("{}", p.policy_json);
                cloud_only_warning(&p);
            } else if json {
                // A signer from before policy_json: keys and threshold only.
                let v = serde_json::json!({
                    "version": p.version,
                    "threshold": p.threshold,
                    "keys": p.keys.iter().map(|k| serde_json::json!({
                        "name": k.name,
                        "key_id": k.key_id,
                        "public_key": k.public_key_pem,
                    })).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                cloud_only_warning(&p);
            } else {
                print_policy(&p);
            }
        }
    }
    Ok(())
}

fn print_policy_release(r: &pb::PolicyRelease) {
    println!(
        "policy release {}: product {}, version {} (rotates from version {}), sha256 {}",
        r.release_id, r.product_id, r.version, r.previous_version, r.policy_sha256
    );
    for (what, st) in [
        ("current policy", &r.under_current),
        ("new policy", &r.under_new),
    ] {
        if let Some(st) = st {
            println!(
                "  under the {what}: {} of {} signed ({}){}",
                st.signed_by.len(),
                st.threshold,
                if st.signed_by.is_empty() {
                    "none".to_string()
                } else {
                    st.signed_by.join(", ")
                },
                if st.satisfied {
                    String::new()
                } else {
                    format!("; missing: {}", st.missing.join(", "))
                }
            );
        }
    }
    println!(
        "  {}",
        if r.complete {
            "complete: devices on the current policy accept it; the product's policy advanced"
        } else {
            "not complete: devices would refuse it"
        }
    );
    if !r.policy_warning.is_empty() {
        policy_warning(&r.policy_warning);
    }
}

fn print_policy(p: &pb::SigningPolicy) {
    println!(
        "product {}: {} of {} keys must sign (policy version {})",
        p.product_id,
        p.threshold,
        p.keys.len(),
        p.version
    );
    for k in &p.keys {
        println!("  {:<16} {}", k.name, k.key_id);
    }
    cloud_only_warning(p);
}

/// A policy the cloud's keys meet alone: said on stderr.
fn cloud_only_warning(p: &pb::SigningPolicy) {
    if p.cloud_only {
        policy_warning(&format!(
            "product {}'s signing policy can be met by the cloud's keys alone: its releases do \
             not need the customer's offline key",
            p.product_id
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_args_and_paths() {
        let (n, p) = parse_key_arg("customer.pub.pem").unwrap();
        assert_eq!(
            (n.as_str(), p),
            ("customer", PathBuf::from("customer.pub.pem"))
        );
        let (n, p) = parse_key_arg("ops=/k/a.pem").unwrap();
        assert_eq!((n.as_str(), p), ("ops", PathBuf::from("/k/a.pem")));
        assert!(parse_key_arg("=a.pem").is_err());
        assert!(parse_key_arg(".pem").is_err());
        assert_eq!(
            public_path_for(Path::new("/x/customer.pem")),
            PathBuf::from("/x/customer.pub.pem")
        );
        assert_eq!(
            public_path_for(Path::new("key")),
            PathBuf::from("key.pub.pem")
        );
    }

    #[test]
    fn signature_file_round_trips() {
        let f = SignatureFile {
            format: SIGNATURE_FORMAT.into(),
            algorithm: ALGORITHM.into(),
            key_id: "ab".repeat(32),
            manifest_sha256: "cd".repeat(32),
            product_id: 7,
            version: 3,
            signature: "00ff".into(),
        };
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(serde_json::from_str::<SignatureFile>(&json).unwrap(), f);
    }
}
