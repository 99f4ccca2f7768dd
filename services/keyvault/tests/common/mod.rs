//! Test harness: a real redis-server, keyvault serving gRPC on 127.0.0.1:0,
//! and keys made at test time.
#![allow(dead_code)]
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use trellis_core::local_redis::{LocalRedis, RedisData};
use trellis_core::shutdown::ShutdownTrigger;
use trellis_core::{Config, Shutdown};
use trellis_proto::v1::key_vault_client::KeyVaultClient;

pub type Client = KeyVaultClient<Channel>;

pub fn master_hex(byte: u8) -> String {
    hex::encode([byte; 32])
}

pub fn config(redis: &LocalRedis, master: &str) -> Config {
    let mut config = Config::default();
    config.auth.mode = trellis_core::config::AuthMode::Off;
    config.tls.mode = trellis_core::config::TlsMode::Off;
    config.redis.url = Some(redis.url());
    config.keyvault.master_key = Some(master.to_string());
    config.keyvault.workers = 2;
    config.keyvault.queue_depth = 64;
    config
}

pub struct Keyvault {
    pub client: Client,
    pub addr: std::net::SocketAddr,
    trigger: ShutdownTrigger,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Keyvault {
    pub async fn start(config: Config) -> anyhow::Result<Keyvault> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (trigger, shutdown) = Shutdown::new();
        let task = tokio::spawn(trellis_keyvault::serve_with_listener(
            config, listener, shutdown,
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if task.is_finished() {
                return Err(task
                    .await?
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("keyvault stopped")));
            }
            // The listener accepts TCP before the service is built; only an
            // answered RPC shows keyvault is up.
            if let Ok(mut client) = KeyVaultClient::connect(format!("http://{addr}")).await
                && client
                    .get_cloud_public_key(trellis_proto::v1::GetCloudPublicKeyRequest {})
                    .await
                    .is_ok()
            {
                return Ok(Keyvault {
                    client,
                    addr,
                    trigger,
                    task,
                });
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "keyvault did not come up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.trigger.trigger();
        tokio::time::timeout(Duration::from_secs(10), self.task).await??
    }
}

pub fn start_redis() -> LocalRedis {
    LocalRedis::start(RedisData::Ephemeral).expect("redis-server (apt-get install redis-server)")
}

pub fn rng() -> rand::rand_core::UnwrapErr<rand::rngs::SysRng> {
    rand::rand_core::UnwrapErr(rand::rngs::SysRng)
}

/// A device: an RSA-1024 key pair and a random id.
pub struct Device {
    pub id: trellis_wire::DeviceId,
    pub key: rsa::PrivateKey,
    pub der: Vec<u8>,
}

impl Device {
    pub fn new() -> Device {
        use rsa::pkcs8::EncodePublicKey;
        let key = rsa::PrivateKey::new(&mut rng(), 1024).expect("RSA-1024 key");
        let der = key
            .to_public_key()
            .to_public_key_der()
            .unwrap()
            .as_bytes()
            .to_vec();
        let mut id = [0u8; 12];
        trellis_keyvault::os_random(&mut id).unwrap();
        Device {
            id: trellis_wire::DeviceId(id),
            key,
            der,
        }
    }

    pub fn id_string(&self) -> String {
        self.id.to_string()
    }

    /// Step 2: the device's 256 bytes for `nonce`, under the cloud key.
    pub fn handshake(
        &self,
        cloud: &rsa::PublicKey,
        nonce: &[u8; 40],
        offer_key: Option<&[u8]>,
    ) -> Vec<u8> {
        let plaintext = trellis_wire::handshake::HandshakePlaintext {
            nonce: *nonce,
            device_id: self.id,
            public_key_der: offer_key.map(<[u8]>::to_vec),
        };
        cloud
            .encrypt(&mut rng(), rsa::Pkcs1v15Encrypt, &plaintext.to_bytes())
            .expect("encrypt under cloud key")
    }
}

pub async fn register(
    client: &mut Client,
    device: &Device,
    product_id: u32,
) -> trellis_proto::v1::Device {
    client
        .register_device(trellis_proto::v1::RegisterDeviceRequest {
            device_id: device.id_string(),
            product_id,
            public_key: device.der.clone(),
            organization: String::new(),
        })
        .await
        .expect("register")
        .into_inner()
}

pub async fn cloud_public_key(client: &mut Client) -> rsa::PublicKey {
    use rsa::pkcs8::DecodePublicKey;
    let key = client
        .get_cloud_public_key(trellis_proto::v1::GetCloudPublicKeyRequest {})
        .await
        .expect("cloud key")
        .into_inner();
    rsa::PublicKey::from_public_key_der(&key.public_key_der).expect("cloud key DER")
}

pub fn nonce() -> [u8; 40] {
    let mut n = [0u8; 40];
    trellis_keyvault::os_random(&mut n).unwrap();
    n
}
