//! The release-signing workflow as a customer and an operator run it, with
//! the real `trellis` binary against keyvault and the signer on loopback:
//! keygen → upload → release create → policy set → release manifest →
//! firmware sign (offline) → add-signature → release sign → verify.
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use tokio::net::TcpListener;
use trellis_core::Shutdown;
use trellis_core::shutdown::ShutdownTrigger;
use trellis_tests::Cluster;

struct Env {
    keyvault: String,
    signer: String,
}

fn trellis(env: &Env, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env("TRELLIS_SIGNER_URL", &env.signer)
        .env("TRELLIS_KEYVAULT_URL", &env.keyvault)
        .env_remove("TRELLIS_CONFIG")
        .env("TRELLIS_TLS__MODE", "off")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run trellis")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "trellis failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Fails, and says so on stderr with each of `needles`.
fn refused(out: Output, needles: &[&str]) -> String {
    assert!(
        !out.status.success(),
        "trellis should have failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let err = stderr(&out);
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}: {err}");
    }
    stdout(&out)
}

/// `firmware keygen` of a 2048-bit key at `out` (and `.pub.pem` beside it).
fn keygen(env: &Env, out: &Path) {
    ok(trellis(
        env,
        &["firmware", "keygen", "--out", p(out), "--bits", "2048"],
    ));
}

/// `d/customer.pem` made, and `product`'s policy set to it and the cloud
/// release key (2 of 2).
fn customer_and_cloud_policy(env: &Env, d: &Path, product: &str) {
    keygen(env, &d.join("customer.pem"));
    ok(trellis(
        env,
        &[
            "policy",
            "set",
            "--product",
            product,
            "--key",
            p(&d.join("customer.pub.pem")),
            "--cloud-release-key",
        ],
    ));
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b))
}

/// A signer on loopback next to `cluster`'s keyvault, and the URLs the CLI
/// is given.
async fn start_signer(
    cluster: &Cluster,
) -> anyhow::Result<(
    Env,
    ShutdownTrigger,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let mut config = cluster.config.clone();
    config.signer.keyvault_url = format!("http://{}", cluster.keyvault);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let signer_addr = listener.local_addr()?;
    let (trigger, shutdown) = Shutdown::new();
    let signer_task = tokio::spawn(trellis_signer::serve_with_listener(
        config, listener, shutdown,
    ));
    let env = Env {
        keyvault: format!("http://{}", cluster.keyvault),
        signer: format!("http://{signer_addr}"),
    };
    Ok((env, trigger, signer_task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_upload_policy_sign_offline_and_in_cloud_then_verify() -> anyhow::Result<()> {
    let cluster = Cluster::start(0).await?;
    let (env, trigger, signer_task) = start_signer(&cluster).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();

    // The customer makes an offline key.
    let customer = d.join("customer.pem");
    let key_id = ok(trellis(
        &env,
        &[
            "firmware",
            "keygen",
            "--out",
            p(&customer),
            "--bits",
            "2048",
        ],
    ));
    let public_pem = std::fs::read_to_string(d.join("customer.pub.pem"))?;
    let public = trellis_firmware::public_key_from_pem(&public_pem)?;
    assert_eq!(key_id, trellis_firmware::key_id(&public));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&customer)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the private key is owner-only");
    }
    assert!(std::fs::read_to_string(&customer)?.contains("BEGIN PRIVATE KEY"));
    refused(
        trellis(&env, &["firmware", "keygen", "--out", p(&customer)]),
        &["already exists", "refusing to overwrite"],
    );

    // Upload in several chunks (not a TTY: no progress bar on stderr).
    let image: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let image_path = d.join("fw-1.bin");
    std::fs::write(&image_path, &image)?;
    let out = trellis(
        &env,
        &[
            "firmware",
            "upload",
            p(&image_path),
            "--product",
            "7",
            "--chunk-size",
            "65536",
        ],
    );
    assert!(
        !stderr(&out).contains('\r'),
        "no progress bar when not a TTY"
    );
    let sha = ok(out);
    assert_eq!(sha, sha_hex(&image));

    // Empty files never reach the signer.
    let empty = d.join("empty.bin");
    std::fs::write(&empty, b"")?;
    refused(
        trellis(&env, &["firmware", "upload", p(&empty), "--product", "7"]),
        &["is empty"],
    );

    let release = ok(trellis(
        &env,
        &[
            "release",
            "create",
            "--product",
            "7",
            "--version",
            "1",
            "--image",
            &sha,
        ],
    ));
    assert_eq!(release, "7-1");
    refused(
        trellis(
            &env,
            &[
                "release",
                "create",
                "--product",
                "7",
                "--version",
                "1",
                "--image",
                &sha,
            ],
        ),
        &["release 7-1 already exists", "(AlreadyExists)"],
    );

    // Upload with --version makes the release in one go.
    let image2 = b"firmware version two".repeat(100);
    let image2_path = d.join("fw-2.bin");
    std::fs::write(&image2_path, &image2)?;
    let out = ok(trellis(
        &env,
        &[
            "firmware",
            "upload",
            p(&image2_path),
            "--product",
            "7",
            "--version",
            "2",
        ],
    ));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![sha_hex(&image2).as_str(), "7-2"]
    );

    // Policy: the customer's key AND the cloud release key.
    let out = ok(trellis(
        &env,
        &[
            "policy",
            "set",
            "--product",
            "7",
            "--key",
            p(&d.join("customer.pub.pem")),
            "--cloud-release-key",
        ],
    ));
    assert!(out.contains("2 of 2 keys must sign"), "{out}");
    assert!(out.contains("customer") && out.contains(&key_id), "{out}");
    assert!(out.contains("cloud-release"), "{out}");
    let shown: serde_json::Value = serde_json::from_str(&ok(trellis(
        &env,
        &["policy", "show", "--product", "7", "--json"],
    )))?;
    assert_eq!(shown["threshold"], 2);
    assert_eq!(shown["keys"][0]["name"], "customer");
    assert_eq!(shown["keys"][0]["key_id"], key_id.as_str());
    assert_eq!(shown["keys"][1]["name"], "cloud-release");
    // The JSON is the policy file a device is provisioned with.
    let policy = trellis_firmware::TrustPolicy::from_json(&shown.to_string())
        .expect("policy show --json is a device policy file");
    assert_eq!(policy.threshold(), 2);

    // Not signed yet: verify names both missing keys and exits non-zero.
    let out = refused(
        trellis(&env, &["release", "verify", "7-1"]),
        &["not completely signed", "customer", "cloud-release"],
    );
    assert!(out.contains("does not meet its policy"), "{out}");

    // The customer fetches the exact manifest bytes ...
    let manifest_path = d.join("7-1.manifest");
    let manifest_sha = ok(trellis(
        &env,
        &["release", "manifest", "7-1", "-o", p(&manifest_path)],
    ));
    let manifest = std::fs::read(&manifest_path)?;
    assert_eq!(manifest_sha, sha_hex(&manifest));
    let decoded = trellis_firmware::decode_manifest(&manifest).expect("a manifest");
    assert_eq!((decoded.product_id, decoded.version), (7, 1));
    assert_eq!(hex::encode(&decoded.image_sha256), sha);
    assert_eq!(decoded.image_size, 300_000);

    // ... and signs them offline: no service is reachable for this command.
    let offline = Env {
        keyvault: "http://127.0.0.1:9".into(),
        signer: "http://127.0.0.1:9".into(),
    };
    let sig_path = ok(trellis(
        &offline,
        &["firmware", "sign", "--key", p(&customer), p(&manifest_path)],
    ));
    assert_eq!(sig_path, format!("{}.sig", p(&manifest_path)));
    let sig: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sig_path)?)?;
    assert_eq!(sig["format"], "trellis-manifest-signature/v1");
    assert_eq!(sig["key_id"], key_id.as_str());
    assert_eq!(sig["manifest_sha256"], manifest_sha.as_str());
    let signature = trellis_firmware::ManifestSignature {
        key_id: key_id.clone(),
        signature: hex::decode(sig["signature"].as_str().unwrap_or_default())?,
    };
    trellis_firmware::verify_signature(&public, &manifest, &signature)?;
    // Signing something that is not a manifest is refused.
    refused(
        trellis(
            &offline,
            &["firmware", "sign", "--key", p(&customer), p(&image2_path)],
        ),
        &["is not a release manifest", "trellis release manifest"],
    );

    // A signature of release 7-2's manifest is not one of 7-1's.
    let manifest2 = d.join("7-2.manifest");
    ok(trellis(
        &env,
        &["release", "manifest", "7-2", "-o", p(&manifest2)],
    ));
    let sig2 = d.join("7-2.sig");
    ok(trellis(
        &offline,
        &[
            "firmware",
            "sign",
            "--key",
            p(&customer),
            p(&manifest2),
            "-o",
            p(&sig2),
        ],
    ));
    refused(
        trellis(&env, &["release", "add-signature", "7-1", p(&sig2)]),
        &["not release 7-1's manifest", "trellis release manifest 7-1"],
    );
    // A key the policy does not trust is refused by the signer.
    let stranger = d.join("stranger.pem");
    ok(trellis(
        &env,
        &[
            "firmware",
            "keygen",
            "--out",
            p(&stranger),
            "--bits",
            "2048",
        ],
    ));
    let sig3 = d.join("stranger.sig");
    ok(trellis(
        &offline,
        &[
            "firmware",
            "sign",
            "--key",
            p(&stranger),
            p(&manifest_path),
            "-o",
            p(&sig3),
        ],
    ));
    refused(
        trellis(&env, &["release", "add-signature", "7-1", p(&sig3)]),
        &[
            "is not in product 7's signing policy",
            "(FailedPrecondition)",
        ],
    );

    // The customer's signature is accepted; the cloud's is still missing.
    let out = ok(trellis(
        &env,
        &["release", "add-signature", "7-1", &sig_path],
    ));
    assert!(out.contains("missing:   cloud-release"), "{out}");
    let out = refused(
        trellis(&env, &["release", "verify", "7-1"]),
        &["missing cloud-release"],
    );
    assert!(out.contains("signed by: customer"), "{out}");

    // The cloud release key signs through keyvault.
    let signed = trellis(&env, &["release", "sign", "7-1"]);
    assert!(
        !stderr(&signed).contains("warning"),
        "the policy needs the customer: {}",
        stderr(&signed)
    );
    ok(signed);
    let out = ok(trellis(&env, &["release", "verify", "7-1"]));
    assert!(out.contains("meets its policy"), "{out}");
    assert!(out.contains("signed by: customer, cloud-release"), "{out}");
    assert!(out.contains("missing:   -"), "{out}");

    let shown: serde_json::Value =
        serde_json::from_str(&ok(trellis(&env, &["release", "show", "7-1", "--json"])))?;
    assert_eq!(shown["manifest_hex"], hex::encode(&manifest));
    assert_eq!(shown["signatures"].as_array().map(Vec::len), Some(2));
    assert_eq!(shown["signatures"][0]["key_id"], key_id.as_str());
    let table = ok(trellis(&env, &["release", "show", "7-1"]));
    assert!(table.contains(&sha) && table.contains(&key_id), "{table}");
    let list = ok(trellis(&env, &["release", "list", "--product", "7"]));
    assert_eq!(list.lines().count(), 3, "header + 7-1 + 7-2: {list}");
    assert!(list.contains("7-1") && list.contains("7-2"), "{list}");

    // What a gateway would deliver is what the customer signed.
    let mut redis = cluster.redis().await?;
    let delivery = trellis_signer::load_release_for_delivery(&mut redis, "7-1").await?;
    assert_eq!(delivery.signed.manifest, manifest);
    assert_eq!(delivery.image, image);
    trellis_firmware::verify_update(&delivery.signed, &policy, 7, 0)
        .expect("a device with this policy accepts release 7-1");

    // A signer that is not there gets a message that says what to set.
    refused(
        trellis(&offline, &["release", "list"]),
        &["cannot reach the signer", "--signer-url"],
    );

    trigger.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(10), signer_task).await;
    cluster.stop().await;
    Ok(())
}

/// `policy set` refuses a policy the cloud release key meets alone unless
/// `--allow-cloud-only` is given; then every release command warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_only_policy_needs_allow_cloud_only_and_every_release_command_warns()
-> anyhow::Result<()> {
    let cluster = Cluster::start(0).await?;
    let (env, trigger, signer_task) = start_signer(&cluster).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let customer = d.join("customer.pem");
    ok(trellis(
        &env,
        &[
            "firmware",
            "keygen",
            "--out",
            p(&customer),
            "--bits",
            "2048",
        ],
    ));
    let customer_pub = d.join("customer.pub.pem");

    // The cloud release key alone, or with a threshold it meets alone.
    for args in [
        vec!["policy", "set", "--product", "5", "--cloud-release-key"],
        vec![
            "policy",
            "set",
            "--product",
            "5",
            "--key",
            p(&customer_pub),
            "--cloud-release-key",
            "--threshold",
            "1",
        ],
    ] {
        refused(
            trellis(&env, &args),
            &[
                "signing policy for product 5",
                "the cloud alone could release firmware",
                "the customer's offline key AND the cloud release key",
                "trellis policy set --product 5 --key customer.pub.pem --cloud-release-key",
                "--allow-cloud-only",
                "(InvalidArgument)",
            ],
        );
    }
    refused(
        trellis(&env, &["policy", "show", "--product", "5"]),
        &["product 5 has no signing policy"],
    );

    // Allowed explicitly: accepted, shown, and warned about.
    let set = trellis(
        &env,
        &[
            "policy",
            "set",
            "--product",
            "5",
            "--cloud-release-key",
            "--allow-cloud-only",
        ],
    );
    let warning = "warning: product 5's signing policy can be met by the cloud's keys alone";
    assert!(stderr(&set).contains(warning), "{}", stderr(&set));
    let out = ok(set);
    assert!(out.contains("1 of 1 keys must sign"), "{out}");
    let shown = trellis(&env, &["policy", "show", "--product", "5"]);
    assert!(stderr(&shown).contains(warning), "{}", stderr(&shown));
    ok(shown);

    let image = d.join("fw.bin");
    std::fs::write(&image, b"cloud-only firmware".repeat(50))?;
    let sha = ok(trellis(
        &env,
        &["firmware", "upload", p(&image), "--product", "5"],
    ));
    let release_warning = "warning: product 5's signing policy can be met by the cloud's keys \
                           alone (set with --allow-cloud-only)";
    for args in [
        vec![
            "release",
            "create",
            "--product",
            "5",
            "--version",
            "1",
            "--image",
            sha.as_str(),
        ],
        vec!["release", "sign", "5-1"],
        vec!["release", "verify", "5-1"],
    ] {
        let out = trellis(&env, &args);
        let err = stderr(&out);
        assert!(
            err.lines().any(|l| l.starts_with(release_warning)),
            "{args:?} should warn: {err}"
        );
        ok(out);
    }

    // Requiring the customer's key again: no more warnings.
    let set = trellis(
        &env,
        &[
            "policy",
            "set",
            "--product",
            "5",
            "--key",
            p(&customer_pub),
            "--cloud-release-key",
        ],
    );
    assert!(!stderr(&set).contains("warning"), "{}", stderr(&set));
    assert!(ok(set).contains("2 of 2 keys must sign"));
    let out = refused(
        trellis(&env, &["release", "verify", "5-1"]),
        &["missing customer"],
    );
    assert!(out.contains("does not meet its policy"), "{out}");
    let out = trellis(&env, &["release", "verify", "5-1"]);
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));

    trigger.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(10), signer_task).await;
    cluster.stop().await;
    Ok(())
}

/// The README's "Rotating release keys" walk-through with the real binary:
/// a new customer key, `policy rotate` from the shown policy, signatures
/// under the current and the new policy (two local keys, the cloud), and
/// the product's policy advancing once both thresholds are met.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_rotate_sign_show_and_list() -> anyhow::Result<()> {
    let cluster = Cluster::start(0).await?;
    let (env, trigger, signer_task) = start_signer(&cluster).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    for name in ["customer", "customer-2027", "stranger", "operator"] {
        if name != "customer" {
            keygen(&env, &d.join(format!("{name}.pem")));
        }
    }
    customer_and_cloud_policy(&env, d, "9");
    let mut shown: serde_json::Value = serde_json::from_str(&ok(trellis(
        &env,
        &["policy", "show", "--product", "9", "--json"],
    )))?;
    assert_eq!(shown["version"], 1);
    // Edit: the new customer key in place of the old one, no version.
    let new_pem = std::fs::read_to_string(d.join("customer-2027.pub.pem"))?;
    shown["keys"][0] = serde_json::json!({ "name": "customer-2027", "public_key": new_pem });
    shown.as_object_mut().map(|o| o.remove("version"));
    // ... and a command policy (signed commands), which `policy show
    // --json` must carry on to the next rotation.
    shown["commands"] = serde_json::json!({
        "threshold": 1,
        "keys": [{
            "name": "operator",
            "public_key": std::fs::read_to_string(d.join("operator.pub.pem"))?,
        }],
        "protected": "all",
        "max_validity_secs": 300,
    });
    let new_file = d.join("policy.json");
    std::fs::write(&new_file, shown.to_string())?;

    let out = ok(trellis(
        &env,
        &["policy", "rotate", "--product", "9", "--new", p(&new_file)],
    ));
    assert!(out.contains("policy release tp-9-2"), "{out}");
    assert!(out.contains("rotates from version 1"), "{out}");
    assert!(out.contains("missing: customer, cloud-release"), "{out}");
    assert!(
        out.contains("missing: customer-2027, cloud-release"),
        "{out}"
    );
    assert!(out.contains("not complete"), "{out}");

    // A key of neither policy is refused by the signer.
    refused(
        trellis(
            &env,
            &[
                "policy",
                "sign",
                "tp-9-2",
                "--key",
                p(&d.join("stranger.pem")),
            ],
        ),
        &["in neither the current policy"],
    );
    for key in ["customer.pem", "customer-2027.pem"] {
        ok(trellis(
            &env,
            &["policy", "sign", "tp-9-2", "--key", p(&d.join(key))],
        ));
    }
    let out = ok(trellis(&env, &["policy", "sign", "tp-9-2", "--cloud"]));
    assert!(
        out.contains("complete: devices on the current policy accept it"),
        "{out}"
    );
    let out = ok(trellis(&env, &["policy", "show", "--release", "tp-9-2"]));
    assert!(
        out.contains("2 of 2 signed (customer, cloud-release)"),
        "{out}"
    );
    assert!(
        out.contains("2 of 2 signed (customer-2027, cloud-release)"),
        "{out}"
    );
    let out = ok(trellis(&env, &["policy", "list", "--product", "9"]));
    assert!(out.contains("tp-9-2") && out.contains("complete"), "{out}");
    // The product's policy advanced: version 2, the new key.
    let out = ok(trellis(&env, &["policy", "show", "--product", "9"]));
    assert!(out.contains("policy version 2"), "{out}");
    assert!(out.contains("customer-2027"), "{out}");
    let advanced: serde_json::Value = serde_json::from_str(&ok(trellis(
        &env,
        &["policy", "show", "--product", "9", "--json"],
    )))?;
    assert_eq!(advanced["version"], 2, "{advanced}");
    assert_eq!(
        advanced["commands"]["keys"][0]["name"], "operator",
        "the command policy is in the shown policy file: {advanced}"
    );
    // A rotation that is not above the current version is refused.
    shown["version"] = serde_json::json!(2);
    std::fs::write(&new_file, shown.to_string())?;
    refused(
        trellis(
            &env,
            &["policy", "rotate", "--product", "9", "--new", p(&new_file)],
        ),
        &["version 2 is not above the current version 2"],
    );

    trigger.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(10), signer_task).await;
    cluster.stop().await;
    Ok(())
}

/// Key rotation as an operator runs it: `keys rotate release`, `keys
/// status`, retirement refused while a product's policy trusts the old
/// version, `policy rotate --cloud-release-key`, `policy sign --cloud`
/// (keyvault signs with both versions), then retirement allowed; and the
/// cloud key's rotate, retire (refused for the current version and an
/// unknown one) and unretire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_through_the_cli() -> anyhow::Result<()> {
    let cluster = Cluster::start(0).await?;
    let (env, trigger, signer_task) = start_signer(&cluster).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    customer_and_cloud_policy(&env, d, "12");
    let out = ok(trellis(&env, &["keys", "rotate", "release"]));
    assert!(out.contains("release key version 2 made"), "{out}");
    let status: serde_json::Value =
        serde_json::from_str(&ok(trellis(&env, &["keys", "status", "--json"])))?;
    let versions = status["release_versions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(versions.len(), 2, "{status}");
    assert_eq!(versions[1]["version"], 2);
    assert_eq!(versions[1]["current"], true);
    assert_eq!(versions[0]["state"], "live");
    let v1 = versions[0]["key_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let v2 = versions[1]["key_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let table = ok(trellis(&env, &["keys", "status"]));
    assert!(
        table.contains("release key") && table.contains("live (current)"),
        "{table}"
    );

    refused(
        trellis(&env, &["keys", "retire", "release", "1"]),
        &["product(s) 12 still trusts release key version 1"],
    );
    refused(
        trellis(&env, &["keys", "retire", "release", "2"]),
        &["is the current one"],
    );

    // The product moves to v2: its shown policy, the cloud key swapped.
    let mut shown: serde_json::Value = serde_json::from_str(&ok(trellis(
        &env,
        &["policy", "show", "--product", "12", "--json"],
    )))?;
    assert_eq!(shown["keys"][1]["key_id"], v1.as_str());
    shown.as_object_mut().map(|o| o.remove("version"));
    let file = d.join("policy.json");
    std::fs::write(&file, shown.to_string())?;
    let out = ok(trellis(
        &env,
        &[
            "policy",
            "rotate",
            "--product",
            "12",
            "--new",
            p(&file),
            "--cloud-release-key",
        ],
    ));
    assert!(out.contains("policy release tp-12-2"), "{out}");
    ok(trellis(
        &env,
        &[
            "policy",
            "sign",
            "tp-12-2",
            "--key",
            p(&d.join("customer.pem")),
        ],
    ));
    let out = ok(trellis(&env, &["policy", "sign", "tp-12-2", "--cloud"]));
    assert!(
        out.contains("complete: devices on the current policy accept it"),
        "{out}"
    );
    let shown: serde_json::Value = serde_json::from_str(&ok(trellis(
        &env,
        &["policy", "show", "--product", "12", "--json"],
    )))?;
    assert_eq!(shown["version"], 2);
    assert_eq!(shown["keys"][1]["key_id"], v2.as_str());

    // No product trusts v1 now: it retires, and comes back when asked.
    let out = ok(trellis(&env, &["keys", "retire", "release", "1"]));
    assert!(out.contains("release key version 1 retired"), "{out}");
    let status: serde_json::Value =
        serde_json::from_str(&ok(trellis(&env, &["keys", "status", "--json"])))?;
    assert!(
        status["release_versions"][0]["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("retired")),
        "{status}"
    );
    let out = ok(trellis(&env, &["keys", "unretire", "release", "1"]));
    assert!(out.contains("live again"), "{out}");

    // The cloud key's commands, with no device holding any version.
    let out = ok(trellis(&env, &["keys", "rotate", "cloud"]));
    assert!(out.contains("cloud key version 2 made"), "{out}");
    refused(
        trellis(&env, &["keys", "retire", "cloud", "2"]),
        &["is the current one"],
    );
    refused(
        trellis(&env, &["keys", "retire", "cloud", "7"]),
        &["there is no cloud key version 7"],
    );
    let out = ok(trellis(&env, &["keys", "retire", "cloud", "1"]));
    assert!(out.contains("cloud key version 1 retired"), "{out}");
    let status: serde_json::Value =
        serde_json::from_str(&ok(trellis(&env, &["keys", "status", "--json"])))?;
    let cloud = status["versions"].as_array().cloned().unwrap_or_default();
    assert_eq!(cloud.len(), 2, "{status}");
    assert!(
        cloud[0]["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("retired")),
        "{status}"
    );
    assert_eq!(cloud[1]["current"], true);
    let out = ok(trellis(&env, &["keys", "unretire", "cloud", "1"]));
    assert!(out.contains("cloud key version 1 is live again"), "{out}");

    trigger.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(10), signer_task).await;
    cluster.stop().await;
    Ok(())
}
