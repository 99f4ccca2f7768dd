//! Access control against a real `trellis up` with tokens on (its
//! default), every service behind its auth layer:
//! - every method of every service, enumerated from the proto descriptors,
//!   has an access rule (a new RPC without one fails here), and refuses
//!   no credentials, revoked and expired tokens (UNAUTHENTICATED) and a
//!   token without the scope or service kind it needs (PERMISSION_DENIED),
//!   changing nothing;
//! - a device of another organisation is NOT_FOUND, exactly like one that
//!   does not exist, and never listed;
//! - the CLI finds the first owner's token by itself, and makes, uses and
//!   revokes scoped tokens.
mod common;

use common::{Proc, UpAddrs, addr, command_without_trellis_env};
use prost::Message;
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::Code;
use trellis_auth::{Rule, Scope, rule_for};
use trellis_core::tls::{Role as TlsRole, ServiceTls, files_in};

struct Up {
    dir: tempfile::TempDir,
    keyvault: String,
    gateway: String,
    signer: String,
    ota: String,
    _proc: Proc,
}

impl Drop for Up {
    /// SIGTERM, so `trellis up` stops the redis-server it started (SIGKILL,
    /// the process's own drop, would leave it running).
    fn drop(&mut self) {
        self._proc.terminate(Duration::from_secs(15));
    }
}

impl Up {
    /// The development CA and certificates `trellis up` made.
    fn tls_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("trellis-data/tls")
    }

    /// The service that serves `package.Service`.
    fn addr_of(&self, service: &str) -> &str {
        match service {
            "trellis.v1.KeyVault" | "trellis.v1.Access" => &self.keyvault,
            "trellis.v1.DeviceService" => &self.gateway,
            "trellis.v1.Signer" => &self.signer,
            "trellis.v1.Ota" => &self.ota,
            other => panic!("no address for service {other}: add it here"),
        }
    }

    /// Runs the CLI in the directory `trellis up` runs in, with no token
    /// unless `token` is given (it then finds `./trellis-data/owner.token`).
    fn cli(&self, token: Option<&str>, args: &[&str]) -> std::process::Output {
        self.cli_env(token, args, &[])
    }

    fn cli_env(
        &self,
        token: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> std::process::Output {
        let mut cmd = command_without_trellis_env();
        cmd.args(args)
            .current_dir(self.dir.path())
            // A login file of the machine's user must not be found.
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env("TRELLIS_KEYVAULT_URL", format!("http://{}", self.keyvault))
            .env("TRELLIS_GATEWAY_URL", format!("http://{}", self.gateway))
            .env("TRELLIS_SIGNER_URL", format!("http://{}", self.signer))
            .env("TRELLIS_OTA_URL", format!("http://{}", self.ota))
            .env_remove("RUST_LOG");
        if let Some(t) = token {
            cmd.env("TRELLIS_TOKEN", t);
        }
        cmd.envs(env.iter().copied());
        cmd.output().expect("run trellis")
    }

    /// The last stdout line of a CLI run that must succeed.
    fn ok(&self, token: Option<&str>, args: &[&str]) -> String {
        let out = self.cli(token, args);
        assert!(
            out.status.success(),
            "trellis {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

async fn up() -> anyhow::Result<Up> {
    let dir = tempfile::tempdir()?;
    let addrs = UpAddrs::new();
    let proc = addrs.up_with_defaults(dir.path()).await?;
    Ok(Up {
        dir,
        keyvault: addrs.keyvault,
        gateway: addrs.grpc,
        signer: addrs.signer,
        ota: addrs.ota,
        _proc: proc,
    })
}

/// Every `(service, method)` the proto files declare.
fn every_method() -> Vec<(String, String)> {
    let set = prost_types::FileDescriptorSet::decode(trellis_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let mut out = Vec::new();
    for file in set.file {
        let package = file.package().to_string();
        for service in &file.service {
            for method in &service.method {
                out.push((
                    format!("{package}.{}", service.name()),
                    method.name().to_string(),
                ));
            }
        }
    }
    out
}

/// A channel to `addr` over mutual TLS, showing `role`'s certificate from
/// the development CA `trellis up` made.
async fn tls_channel(
    up: &Up,
    role: TlsRole,
    addr: &str,
) -> anyhow::Result<tonic::transport::Channel> {
    let tls = ServiceTls::from_files(&files_in(&up.tls_dir(), role), role)?;
    Ok(
        trellis_core::tls::endpoint(&format!("http://{addr}"), Some(&tls))
            .map_err(anyhow::Error::msg)?
            .connect()
            .await?,
    )
}

/// Calls `path` on `addr` with an empty request message, `role`'s
/// certificate and `token` (if any); the gRPC code it answers with.
async fn call(up: &Up, role: TlsRole, addr: &str, path: &str, token: Option<&str>) -> Code {
    let channel = tls_channel(up, role, addr).await.expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(tokio_stream::once(()));
    if let Some(t) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path: http::uri::PathAndQuery = path.parse().expect("path");
    match grpc.streaming(request, path, codec).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// `None` when `path`, called as an operator with `token`, answers `want`;
/// else what went wrong.
async fn expect(
    up: &Up,
    addr: &str,
    path: &str,
    what: &str,
    token: Option<&str>,
    want: Code,
) -> Option<(String, String)> {
    expect_as(up, TlsRole::Operator, addr, path, what, token, want).await
}

async fn expect_as(
    up: &Up,
    role: TlsRole,
    addr: &str,
    path: &str,
    what: &str,
    token: Option<&str>,
    want: Code,
) -> Option<(String, String)> {
    let got = call(up, role, addr, path, token).await;
    (got != want).then(|| (format!("{path} {what}"), format!("{got:?}, want {want:?}")))
}

fn device_count(up: &Up, token: &str) -> usize {
    let out = up.cli(Some(token), &["device", "list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or_else(|| text.lines().count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_checks_who_calls() -> anyhow::Result<()> {
    let up = up().await?;
    let owner_file = up.dir.path().join("trellis-data/owner.token");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&owner_file)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "owner token file mode {mode:o}");
    }
    let owner = std::fs::read_to_string(&owner_file)?.trim().to_string();

    // The CLI on this machine finds the owner token with no flag.
    let who = up.cli(None, &["whoami"]);
    let who_out = String::from_utf8_lossy(&who.stdout);
    assert!(
        who.status.success() && who_out.contains("owner@default"),
        "{who:?}"
    );

    // A device, so "nothing changed" has something to compare.
    up.ok(
        None,
        &[
            "device",
            "provision",
            "--product",
            "7",
            "--count",
            "1",
            "--out",
            "keys",
        ],
    );
    let devices_before = device_count(&up, &owner);
    assert_eq!(devices_before, 1);

    // Tokens to refuse: revoked, expired, and one per scope lacking.
    let revoked = up.ok(None, &["token", "create", "--name", "to-revoke"]);
    let revoked_id = revoked.split('_').nth(1).expect("token id").to_string();
    up.ok(None, &["token", "revoke", &revoked_id]);
    let expired = up.ok(None, &["token", "create", "--expires-in", "1"]);
    let audit_only = up.ok(None, &["token", "create", "--scope", "audit:read"]);
    let viewer = up.ok(None, &["token", "create", "--scope", "devices:read"]);
    // Past the expiry and the authenticators' cache.
    tokio::time::sleep(Duration::from_millis(1000 + 2_500)).await;

    let methods = every_method();
    assert!(methods.len() >= 40, "only {} methods found", methods.len());
    let mut missing = Vec::new();
    let mut wrong: BTreeMap<String, String> = BTreeMap::new();
    for (service, method) in &methods {
        let path = format!("/{service}/{method}");
        let Some(rule) = rule_for(&path) else {
            missing.push(path);
            continue;
        };
        if rule == Rule::Public {
            continue;
        }
        let addr = up.addr_of(service);
        let mut checks = vec![
            expect(
                &up,
                addr,
                &path,
                "without credentials",
                None,
                Code::Unauthenticated,
            )
            .await,
            expect(
                &up,
                addr,
                &path,
                "with a revoked token",
                Some(&revoked),
                Code::Unauthenticated,
            )
            .await,
            expect(
                &up,
                addr,
                &path,
                "with an expired token",
                Some(&expired),
                Code::Unauthenticated,
            )
            .await,
            expect(
                &up,
                addr,
                &path,
                "with a malformed token",
                Some("trellis_nonsense"),
                Code::Unauthenticated,
            )
            .await,
        ];
        // A token without what the rule needs.
        let lacking = match rule {
            Rule::Scope(Scope::DevicesRead) | Rule::ScopeOrService(Scope::DevicesRead, _) => {
                Some(audit_only.as_str())
            }
            Rule::Scope(_) | Rule::ScopeOrService(_, _) => Some(viewer.as_str()),
            // The owner holds every operator scope and no service kind.
            Rule::Service(_) => Some(owner.as_str()),
            Rule::Authenticated | Rule::Public => None,
        };
        // A certificate of the wrong role, without a token: a service
        // role is only what its rule names, keyvault and operator
        // certificates are nobody without a token.
        for role in TlsRole::ALL {
            let service = trellis_auth::Principal::of_service_role(role);
            let allowed = service.as_ref().is_some_and(|p| rule.check(p).is_ok());
            if allowed {
                continue;
            }
            let want = if service.is_some() {
                Code::PermissionDenied
            } else {
                Code::Unauthenticated
            };
            checks.push(
                expect_as(
                    &up,
                    role,
                    addr,
                    &path,
                    &format!("with the {role} certificate and no token"),
                    None,
                    want,
                )
                .await,
            );
        }
        if let Some(token) = lacking {
            checks.push(
                expect(
                    &up,
                    addr,
                    &path,
                    "without the scope it needs",
                    Some(token),
                    Code::PermissionDenied,
                )
                .await,
            );
        }
        for (what, got) in checks.into_iter().flatten() {
            wrong.insert(what, got);
        }
    }
    assert!(
        missing.is_empty(),
        "RPCs without an access rule: {missing:?}"
    );
    assert!(wrong.is_empty(), "wrong answers:\n{wrong:#?}");
    assert_eq!(
        device_count(&up, &owner),
        devices_before,
        "a refused call changed the registry"
    );

    // The scoped token does what its scope allows, and no more, from the CLI.
    let out = up.cli(Some(&viewer), &["device", "list"]);
    assert!(out.status.success(), "{out:?}");
    let out = up.cli(
        Some(&viewer),
        &["device", "revoke", "0123456789abcdef01234567"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("PermissionDenied") && err.contains("devices:admin"),
        "{err}"
    );
    let out = up.cli(Some(&revoked), &["device", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Unauthenticated") && err.contains("revoked"),
        "{err}"
    );
    // A token never carries more than the one that made it.
    let out = up.cli(
        Some(&viewer),
        &["token", "create", "--scope", "devices:call"],
    );
    assert!(
        !out.status.success(),
        "a viewer made a devices:call token: {out:?}"
    );

    // Services are their certificates: a gateway's cannot have anything
    // signed, and even the signer's only gets manifests of stored releases
    // signed; the signer's cannot open device sessions.
    let manifest = trellis_firmware::encode_manifest(&trellis_proto::v1::FirmwareManifest {
        product_id: 7,
        version: 42,
        image_size: 10,
        image_sha256: vec![7; 32],
        created_at_ms: 1,
        organization: "default".into(),
    });
    let sign = |role: TlsRole, token: Option<String>, data: Vec<u8>| {
        let up = &up;
        async move {
            let channel = tls_channel(up, role, &up.keyvault).await?;
            let mut kv = trellis_proto::v1::key_vault_client::KeyVaultClient::new(channel);
            let mut request = tonic::Request::new(trellis_proto::v1::SignRequest {
                purpose: "release".into(),
                data,
                actor: "test".into(),
                key_id: String::new(),
            });
            if let Some(token) = token {
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse()?);
            }
            anyhow::Ok(kv.sign(request).await.map(|_| ()).map_err(|s| s.code()))
        }
    };
    assert_eq!(
        sign(TlsRole::Gateway, None, manifest.clone()).await?,
        Err(Code::PermissionDenied),
        "a gateway certificate had something signed"
    );
    assert_eq!(
        sign(TlsRole::Signer, None, b"arbitrary bytes".to_vec()).await?,
        Err(Code::InvalidArgument),
        "keyvault signed bytes that are no manifest"
    );
    assert_eq!(
        sign(TlsRole::Signer, None, manifest.clone()).await?,
        Err(Code::FailedPrecondition),
        "keyvault signed a manifest no release holds"
    );
    // A service token is worth nothing over mutual TLS without the
    // service's certificate: its service scopes do not count there.
    let signer_token = up.ok(None, &["token", "create", "--service", "signer"]);
    assert_eq!(
        sign(TlsRole::Operator, Some(signer_token), manifest).await?,
        Err(Code::PermissionDenied),
        "a signer token without the signer certificate had a manifest checked"
    );
    let open_session = |role: TlsRole| {
        let up = &up;
        async move {
            let channel = tls_channel(up, role, &up.keyvault).await?;
            let mut kv = trellis_proto::v1::key_vault_client::KeyVaultClient::new(channel);
            let request = trellis_proto::v1::OpenSessionRequest::default();
            anyhow::Ok(
                kv.open_session(request)
                    .await
                    .map(|_| ())
                    .map_err(|s| s.code()),
            )
        }
    };
    assert_eq!(
        open_session(TlsRole::Signer).await?,
        Err(Code::PermissionDenied),
        "keyvault opened a session for the signer's certificate"
    );
    assert_ne!(
        open_session(TlsRole::Gateway).await?,
        Err(Code::PermissionDenied),
        "keyvault refused the gateway's certificate"
    );

    // Without `trellis up`: the first owner straight from Redis, and a
    // service that refuses to start without its credential.
    let log = up._proc.output();
    let redis_addr = log
        .lines()
        .find_map(|l| l.strip_prefix("redis: started redis-server on "))
        .and_then(|l| l.split_whitespace().next())
        .expect("trellis up names its Redis")
        .to_string();
    // Its administrator, as the line it prints says.
    let admin = std::fs::read_to_string(up.dir.path().join("trellis-data/redis-admin.password"))?;
    let redis_url = format!("redis://default:{}@{redis_addr}/", admin.trim());
    let out = up.cli_env(
        None,
        &["token", "bootstrap", "--out", "boot.token"],
        &[("TRELLIS_REDIS__URL", &redis_url)],
    );
    assert!(out.status.success(), "{out:?}");
    let boot = std::fs::read_to_string(up.dir.path().join("boot.token"))?;
    let who = String::from_utf8_lossy(&up.cli(Some(boot.trim()), &["whoami"]).stdout).to_string();
    assert!(who.contains("cluster:admin"), "{who}");
    // A gateway started alone needs an identity: over mutual TLS (the
    // default) its certificate, on plaintext a service token.
    let (devices, grpc) = (addr(), addr());
    let gateway_alone = |extra: &[(&str, &str)]| {
        let mut env = vec![
            ("TRELLIS_REDIS__URL", redis_url.as_str()),
            ("TRELLIS_GATEWAY__DEVICE_LISTEN", devices.as_str()),
            ("TRELLIS_GATEWAY__GRPC_LISTEN", grpc.as_str()),
            ("TRELLIS_TELEMETRY__ADMIN_LISTEN", ""),
        ];
        env.extend_from_slice(extra);
        let out = up.cli_env(None, &["gateway"], &env);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let empty = up.dir.path().join("no-certificates");
    let (ok, err) = gateway_alone(&[("TRELLIS_TLS__DIR", empty.to_str().expect("utf-8 path"))]);
    assert!(
        !ok && err.contains("trellis certs issue --role gateway"),
        "a gateway without a certificate: {err}"
    );
    let (ok, err) = gateway_alone(&[("TRELLIS_TLS__MODE", "off")]);
    assert!(
        !ok && err.contains("token create --service gateway"),
        "a plaintext gateway without a credential: {err}"
    );
    Ok(())
}

/// GetCloudPublicKey (a public method) through `endpoint`: whether the
/// call got an answer at all.
async fn public_call_answers(endpoint: tonic::transport::Endpoint) -> bool {
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    trellis_proto::v1::key_vault_client::KeyVaultClient::new(channel)
        .get_cloud_public_key(trellis_proto::v1::GetCloudPublicKeyRequest {})
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certificates_of_the_installation_ca_get_through_tls() -> anyhow::Result<()> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let up = up().await?;
    let url = format!("https://{}", up.keyvault);
    let ca = std::fs::read(trellis_core::tls::ca_in(&up.tls_dir()))?;
    let trusting = || ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca));

    // The control: the operator certificate gets an answer.
    let operator = ServiceTls::from_files(
        &files_in(&up.tls_dir(), TlsRole::Operator),
        TlsRole::Operator,
    )?;
    assert!(
        public_call_answers(
            trellis_core::tls::endpoint(&url, Some(&operator)).map_err(anyhow::Error::msg)?
        )
        .await,
        "the operator certificate was refused"
    );
    // Plaintext gRPC: nothing.
    assert!(
        !public_call_answers(Endpoint::from_shared(format!("http://{}", up.keyvault))?).await,
        "keyvault answered plaintext gRPC"
    );
    // TLS without a client certificate: the server ends the handshake.
    assert!(
        !public_call_answers(Endpoint::from_shared(url.clone())?.tls_config(trusting())?).await,
        "keyvault answered a client without a certificate"
    );
    // A gateway certificate from another CA: refused just the same.
    let other_ca = trellis_auth::pki::new_ca("someone else's CA", 10)?;
    let forged = trellis_auth::pki::issue(
        &other_ca.cert_pem,
        &other_ca.key_pem,
        TlsRole::Gateway,
        &["127.0.0.1".to_string()],
        10,
    )?;
    let forged_tls = trusting().identity(Identity::from_pem(&forged.cert_pem, &forged.key_pem));
    assert!(
        !public_call_answers(Endpoint::from_shared(url.clone())?.tls_config(forged_tls)?).await,
        "keyvault answered a certificate of another CA"
    );
    // And the services are refused by a client that trusts another CA.
    let wrong_trust = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&other_ca.cert_pem))
        .identity(Identity::from_pem(&forged.cert_pem, &forged.key_pem));
    assert!(
        !public_call_answers(Endpoint::from_shared(url)?.tls_config(wrong_trust)?).await,
        "a client accepted keyvault's certificate without trusting its CA"
    );
    // What trellis up made: keys 0600, every role's certificate naming it.
    use std::os::unix::fs::PermissionsExt;
    for role in TlsRole::ALL {
        let files = files_in(&up.tls_dir(), role);
        let mode = std::fs::metadata(&files.key)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", files.key.display());
        let pem = std::fs::read_to_string(&files.cert)?;
        assert!(trellis_auth::pki::days_left(&pem)? > 300, "{role}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organisations_never_see_each_other() -> anyhow::Result<()> {
    let up = up().await?;
    // The installation's first owner makes a second organisation.
    let acme = up.ok(None, &["org", "create", "acme", "--owner", "alice"]);
    let who = up.ok(Some(&acme), &["whoami"]);
    assert!(who.contains("scopes:") || !who.is_empty());
    let orgs = String::from_utf8_lossy(&up.cli(None, &["org", "list"]).stdout).to_string();
    assert!(orgs.contains("acme") && orgs.contains("default"), "{orgs}");
    let acme_orgs =
        String::from_utf8_lossy(&up.cli(Some(&acme), &["org", "list"]).stdout).to_string();
    assert_eq!(
        acme_orgs.trim(),
        "acme",
        "an organisation's owner sees only their own"
    );

    // One device in each organisation.
    let ours = up.ok(
        None,
        &["device", "provision", "--product", "7", "--out", "ours"],
    );
    let theirs = up.ok(
        Some(&acme),
        &["device", "provision", "--product", "8", "--out", "theirs"],
    );
    let listed =
        String::from_utf8_lossy(&up.cli(Some(&acme), &["device", "list"]).stdout).to_string();
    assert!(
        listed.contains(&theirs) && !listed.contains(&ours),
        "{listed}"
    );
    let listed = String::from_utf8_lossy(&up.cli(None, &["device", "list"]).stdout).to_string();
    assert!(
        listed.contains(&ours) && !listed.contains(&theirs),
        "{listed}"
    );

    // Another organisation's device answers exactly as one that does not exist.
    let nobody = "00112233445566778899aabb";
    for (args, what) in [
        (vec!["device", "revoke", &ours], "revoke"),
        (vec!["device", "tag", &ours, "x"], "tag"),
        (vec!["device", "show", &ours], "show"),
        (vec!["device", "call", &ours, "add", "2,3"], "call"),
        (vec!["device", "get", &ours, "temp"], "get"),
    ] {
        let out = up.cli(Some(&acme), &args);
        let err = String::from_utf8_lossy(&out.stderr).replace(&ours, "ID");
        let mut args_nobody = args.clone();
        args_nobody[2] = nobody;
        let none = up.cli(Some(&acme), &args_nobody);
        let err_none = String::from_utf8_lossy(&none.stderr).replace(nobody, "ID");
        assert!(
            !out.status.success(),
            "{what} of another organisation's device succeeded"
        );
        assert!(err.contains("NotFound"), "{what}: {err}");
        assert_eq!(
            err, err_none,
            "{what}: another organisation's device is told apart from none"
        );
    }
    // Still ours, untouched.
    let listed =
        String::from_utf8_lossy(&up.cli(None, &["device", "list", "--json"]).stdout).to_string();
    assert!(
        listed.contains(&ours) && !listed.contains("\"revoked\": true"),
        "{listed}"
    );

    // Releases, policies and rollouts of another organisation's product
    // answer exactly as missing ones, and are never listed.
    std::fs::write(
        up.dir.path().join("fw.bin"),
        b"firmware of the default organisation",
    )?;
    let uploaded = up.ok(
        None,
        &[
            "firmware",
            "upload",
            "fw.bin",
            "--product",
            "7",
            "--version",
            "2",
        ],
    );
    assert_eq!(uploaded, "7-2");
    for (theirs_args, none_args, what) in [
        (
            vec!["release", "show", "7-2"],
            vec!["release", "show", "7-9"],
            "release show",
        ),
        (
            vec!["release", "verify", "7-2"],
            vec!["release", "verify", "7-9"],
            "release verify",
        ),
        (
            vec!["release", "sign", "7-2"],
            vec!["release", "sign", "7-9"],
            "release sign",
        ),
        (
            vec!["rollout", "create", "--release", "7-2"],
            vec!["rollout", "create", "--release", "7-9"],
            "rollout create",
        ),
    ] {
        let out = up.cli(Some(&acme), &theirs_args);
        let none = up.cli(Some(&acme), &none_args);
        let err = String::from_utf8_lossy(&out.stderr).replace("7-2", "R");
        let err_none = String::from_utf8_lossy(&none.stderr).replace("7-9", "R");
        assert!(
            !out.status.success() && err.contains("NotFound"),
            "{what}: {err}"
        );
        assert_eq!(
            err, err_none,
            "{what}: another organisation's release is told apart from none"
        );
    }
    let releases =
        String::from_utf8_lossy(&up.cli(Some(&acme), &["release", "list"]).stdout).to_string();
    assert!(!releases.contains("7-2"), "{releases}");
    let releases = String::from_utf8_lossy(&up.cli(None, &["release", "list"]).stdout).to_string();
    assert!(releases.contains("7-2"), "{releases}");
    // A product of its own: acme registers it, then releases it.
    up.ok(
        Some(&acme),
        &["product", "create", "8", "--name", "acme-widget"],
    );
    std::fs::write(up.dir.path().join("acme.bin"), b"acme firmware")?;
    let acme_release = up.ok(
        Some(&acme),
        &[
            "firmware",
            "upload",
            "acme.bin",
            "--product",
            "8",
            "--version",
            "1",
        ],
    );
    assert_eq!(acme_release, "8-1");
    // Data stays inside its organisation even for the installation's first
    // owner (cluster:admin is for organisations, service credentials and
    // the installation's audit).
    let out = up.cli(None, &["release", "show", "8-1"]);
    assert!(
        !out.status.success(),
        "the default organisation sees acme's release: {out:?}"
    );
    std::fs::write(
        up.dir.path().join("acme7.bin"),
        b"acme firmware for product 7",
    )?;
    let out = up.cli(
        Some(&acme),
        &[
            "firmware",
            "upload",
            "acme7.bin",
            "--product",
            "7",
            "--version",
            "5",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("NotFound"),
        "acme released for product 7: {err}"
    );
    // Images too: an image belongs to its product's organisation, never
    // one the uploader names; another organisation's is as missing as none,
    // and a refused upload stores nothing.
    let show = up.cli(Some(&acme), &["release", "show", "8-1", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout)
        .unwrap_or_else(|e| panic!("release show --json: {e}: {show:?}"));
    assert_eq!(shown["organization"], "acme", "{shown}");
    let get_image = |token: String, bytes: &'static [u8]| {
        let up = &up;
        async move {
            use sha2::Digest;
            let channel = tls_channel(up, TlsRole::Operator, &up.signer).await?;
            let mut signer = trellis_proto::v1::signer_client::SignerClient::new(channel);
            let mut request = tonic::Request::new(trellis_proto::v1::GetImageRequest {
                sha256: hex::encode(sha2::Sha256::digest(bytes)),
            });
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
            anyhow::Ok(
                signer
                    .get_image(request)
                    .await
                    .map(|_| ())
                    .map_err(|s| s.code()),
            )
        }
    };
    let owner = std::fs::read_to_string(up.dir.path().join("trellis-data/owner.token"))?
        .trim()
        .to_string();
    assert_eq!(
        get_image(owner.clone(), b"firmware of the default organisation").await?,
        Ok(())
    );
    assert_eq!(
        get_image(acme.clone(), b"firmware of the default organisation").await?,
        Err(Code::NotFound),
        "acme read the default organisation's image"
    );
    assert_eq!(
        get_image(owner, b"acme firmware for product 7").await?,
        Err(Code::NotFound),
        "a refused upload stored its image"
    );

    // Users and tokens stay inside the organisation too.
    up.ok(Some(&acme), &["user", "add", "bob", "--role", "viewer"]);
    let users = String::from_utf8_lossy(&up.cli(None, &["user", "list"]).stdout).to_string();
    assert!(
        !users.contains("bob") && !users.contains("alice"),
        "{users}"
    );
    let bob = up.ok(Some(&acme), &["token", "create", "--user", "bob"]);

    // The audit names the authenticated caller, and stays in its organisation.
    let acme_audit = String::from_utf8_lossy(
        &up.cli(Some(&acme), &["audit", "tail", "--limit", "500"])
            .stdout,
    )
    .to_string();
    assert!(
        acme_audit
            .lines()
            .any(|l| l.contains("add_user") && l.contains("alice@acme (token ")),
        "{acme_audit}"
    );
    assert!(
        acme_audit
            .lines()
            .any(|l| l.contains("register") && l.contains(&theirs)),
        "{acme_audit}"
    );
    assert!(
        !acme_audit.contains(&ours),
        "another organisation's records: {acme_audit}"
    );
    assert!(
        !acme_audit.contains("@default"),
        "another organisation's records: {acme_audit}"
    );
    let all_audit =
        String::from_utf8_lossy(&up.cli(None, &["audit", "tail", "--limit", "500"]).stdout)
            .to_string();
    assert!(
        all_audit.lines().any(|l| l.contains("register")
            && l.contains(&ours)
            && l.contains("owner@default (token ")),
        "{all_audit}"
    );
    assert!(
        all_audit.contains(&theirs),
        "the first owner sees every organisation: {all_audit}"
    );
    let out = up.cli(Some(&bob), &["device", "list"]);
    assert!(out.status.success(), "{out:?}");
    let removed = up.ok(Some(&acme), &["user", "remove", "bob"]);
    assert!(removed.contains("1 token(s) revoked"), "{removed}");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let out = up.cli(Some(&bob), &["device", "list"]);
    assert!(!out.status.success(), "a removed user's token still works");
    Ok(())
}
