//! A real cluster with tokens on: redis-server, keyvault, a gateway,
//! signer, ota and the API on loopback; organisations made through
//! keyvault's Access service; simulated devices running the demo app.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trellis_core::Shutdown;
use trellis_core::config::AuthMode;
use trellis_core::local_redis::{LocalRedis, RedisData};
use trellis_core::shutdown::ShutdownTrigger;
use trellis_device::app::DemoApp;
use trellis_device::identity::DeviceIdentity;
use trellis_device::session::{Session, SessionConfig};
use trellis_proto::v1::access_client::AccessClient;
use trellis_proto::v1::key_vault_client::KeyVaultClient;
use trellis_proto::v1::{CreateOrgRequest, RegisterDeviceRequest};
use trellis_tests::Cluster;

pub struct Fixture {
    pub cluster: Cluster,
    /// `http://127.0.0.1:PORT` of the API.
    pub api: String,
    /// The installation's first owner (organisation `default`, cluster:admin).
    pub owner: String,
    /// The services' credential for each other.
    pub services_token: Option<String>,
    pub signer: SocketAddr,
    pub ota: SocketAddr,
    pub http: reqwest::Client,
    trigger: Option<ShutdownTrigger>,
    devices: CancellationToken,
    _dir: tempfile::TempDir,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// One fixture at a time per test binary: the services' credential for
/// each other (`auth.service_token`, tokens on and TLS off) is a
/// process-wide setting, and each fixture's Redis has its own.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn bearer<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    r
}

impl Fixture {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_inner(false, |_| {}).await
    }

    /// As [`Fixture::start`] on a Redis with one ACL user per service, the
    /// api as its own user (`trellis-api`), with `tweak` applied to the
    /// api's configuration (webhook settings).
    pub async fn start_with(tweak: impl FnOnce(&mut trellis_core::Config)) -> anyhow::Result<Self> {
        Self::start_inner(true, tweak).await
    }

    async fn start_inner(
        users: bool,
        tweak: impl FnOnce(&mut trellis_core::Config),
    ) -> anyhow::Result<Self> {
        let serial = SERIAL.lock().await;
        // reqwest (rustls-no-provider) needs the process's provider.
        trellis_core::outbound::install_tls_provider();
        let redis = if users {
            LocalRedis::start_with_users(
                RedisData::Ephemeral,
                trellis_core::local_redis::Admin::Open,
            )?
        } else {
            LocalRedis::start(RedisData::Ephemeral)?
        };
        let mut config = trellis_tests::test_config(&redis.url());
        config.auth.mode = AuthMode::Tokens;
        config.auth.token_rate = 0;
        config.ota.tick_ms = 200;
        let dir = tempfile::tempdir()?;
        let mut durable = trellis_core::redis_conn::connect(&redis.url()).await?;
        use trellis_auth::setup::{Bootstrap, bootstrap_token};
        let (owner, _) = bootstrap_token(
            &mut durable,
            &dir.path().join("owner.token"),
            Bootstrap::FirstOwner,
        )
        .await?;
        let (services, _) = bootstrap_token(
            &mut durable,
            &dir.path().join("services.token"),
            Bootstrap::Services,
        )
        .await?;
        config.auth.service_token = Some(services.clone());
        let cluster = Cluster::start_with(redis, config, 1).await?;
        let mut config = cluster.config.clone();
        let (trigger, shutdown) = Shutdown::new();
        let signer_listener = TcpListener::bind("127.0.0.1:0").await?;
        let signer = signer_listener.local_addr()?;
        let ota_listener = TcpListener::bind("127.0.0.1:0").await?;
        let ota = ota_listener.local_addr()?;
        let api_listener = TcpListener::bind("127.0.0.1:0").await?;
        let api = api_listener.local_addr()?;
        let gateway = format!("http://{}", cluster.gateways[0].grpc);
        config.signer.keyvault_url = format!("http://{}", cluster.keyvault);
        config.ota.signer_url = format!("http://{signer}");
        config.ota.gateway_url = gateway.clone();
        config.api.gateway_url = gateway;
        config.api.keyvault_url = format!("http://{}", cluster.keyvault);
        config.api.signer_url = format!("http://{signer}");
        config.api.ota_url = format!("http://{ota}");
        tokio::spawn(trellis_signer::serve_with_listener(
            config.clone(),
            signer_listener,
            shutdown.clone(),
        ));
        tokio::spawn(trellis_ota::serve_with_listener(
            config.clone(),
            ota_listener,
            shutdown.clone(),
        ));
        let mut api_config = trellis_tests::as_user(
            &cluster.redis,
            &config,
            trellis_core::redis_conn::acl::RedisUser::Api,
        );
        tweak(&mut api_config);
        tokio::spawn(trellis_api::serve_with_listener(
            api_config,
            api_listener,
            shutdown.clone(),
        ));
        let fixture = Self {
            cluster,
            api: format!("http://{api}"),
            owner,
            services_token: Some(services),
            signer,
            ota,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            trigger: Some(trigger),
            devices: CancellationToken::new(),
            _dir: dir,
            _serial: serial,
        };
        // Ready when the API answers through the gateway.
        trellis_tests::eventually(Duration::from_secs(30), "the api answers", || async {
            let r = fixture
                .http
                .get(format!("{}/v1/devices", fixture.api))
                .bearer_auth(&fixture.owner)
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await?;
        Ok(fixture)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }

    /// A new organisation; its owner's token.
    pub async fn org(&self, name: &str) -> anyhow::Result<String> {
        let mut access = AccessClient::connect(format!("http://{}", self.cluster.keyvault)).await?;
        let created = access
            .create_org(bearer(
                &self.owner,
                CreateOrgRequest {
                    name: name.into(),
                    owner: "alice".into(),
                },
            ))
            .await?
            .into_inner();
        Ok(created.token)
    }

    /// A device registered (by `token`, in its organisation) for `product`
    /// and running the demo app (`add`, `led`, `uptime`, `temp`),
    /// publishing `event` every 200 ms; its id once it is in session.
    pub async fn device(&self, token: &str, product: u16, event: &str) -> anyhow::Result<String> {
        self.device_with_policy(token, product, event, None).await
    }

    /// As [`Fixture::device`], the device provisioned with `policy` (its
    /// command policy, if it has one, guards every function call).
    pub async fn device_with_policy(
        &self,
        token: &str,
        product: u16,
        event: &str,
        policy: Option<&trellis_firmware::TrustPolicy>,
    ) -> anyhow::Result<String> {
        let identity = self.cluster.unregistered_identity()?;
        self.register(token, &identity, product).await?;
        let id = identity.device_id.to_string();
        let addr = self.cluster.gateways[0].devices;
        let cancel = self.devices.clone();
        let config = SessionConfig {
            product_id: product,
            platform_id: 6,
            event_interval: Some(Duration::from_millis(200)),
            event_name: event.to_string(),
            command_guard: trellis_device::session::command_guard_for(
                &identity.device_id.to_string(),
                policy,
            ),
            ..SessionConfig::default()
        };
        let app = Arc::new(DemoApp::new(21.5));
        tokio::spawn(async move {
            while !cancel.is_cancelled() {
                if let Ok(stream) = tokio::net::TcpStream::connect(addr).await
                    && let Ok(session) = Session::connect(stream, &identity, config.clone()).await
                {
                    let _ = session.run(app.as_ref(), cancel.clone(), |_| {}).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        // Online, and described (functions and variables arrive after Hello).
        trellis_tests::eventually(Duration::from_secs(30), "the device is online", || async {
            let r = self
                .http
                .get(self.url(&format!("/v1/devices/{id}")))
                .bearer_auth(token)
                .send()
                .await
                .ok()?;
            let v: serde_json::Value = r.json().await.ok()?;
            let described = v["functions"].as_array().is_some_and(|f| !f.is_empty());
            (v["connected"] == true && described).then_some(())
        })
        .await?;
        Ok(id)
    }

    pub async fn register(
        &self,
        token: &str,
        identity: &DeviceIdentity,
        product: u16,
    ) -> anyhow::Result<()> {
        use rsa::pkcs8::EncodePublicKey;
        let der = identity.private_key.to_public_key().to_public_key_der()?;
        let mut kv = KeyVaultClient::connect(format!("http://{}", self.cluster.keyvault)).await?;
        kv.register_device(bearer(
            token,
            RegisterDeviceRequest {
                device_id: identity.device_id.to_string(),
                product_id: u32::from(product),
                public_key: der.as_bytes().to_vec(),
                organization: String::new(),
            },
        ))
        .await?;
        Ok(())
    }

    pub async fn stop(mut self) {
        self.devices.cancel();
        if let Some(t) = self.trigger.take() {
            t.trigger();
        }
        self.cluster.stop().await;
    }
}

/// A response's status and JSON body (a body that is not JSON fails the
/// test, naming the status and the text).
pub async fn json_of(r: reqwest::Response) -> (u16, serde_json::Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
    (status, value)
}
