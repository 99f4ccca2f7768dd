//! A device handshake for load generation with OpenSSL doing the device's
//! RSA work, byte for byte what `trellis_wire::DeviceHandshake` sends (same
//! plaintext layout, PKCS#1 v1.5 both ways, the reply's signature checked
//! against HMAC-SHA1 of the encrypted material), then the first framed
//! Hello. The SDK does the same with the pure-Rust `rsa` crate at about five
//! times the CPU; on a 2-core machine that cost is taken from the servers
//! being measured, so `handshake` uses this by default and reports the SDK
//! figure beside it with `--device-crypto sdk`.
use anyhow::{Context, ensure};
use openssl::pkey::{Private, Public};
use openssl::rsa::{Padding, Rsa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_wire::frame::SessionCipher;
use trellis_wire::hello::Hello;
use trellis_wire::{DeviceId, NONCE_LEN, SERVER_REPLY_LEN, SessionMaterial, message};

/// Key material shared by every simulated device (one key, many ids).
pub struct FastKeys {
    pub device: Rsa<Private>,
    pub device_public_der: Vec<u8>,
    pub cloud: Rsa<Public>,
}

impl FastKeys {
    pub fn new(device_pkcs8_der: &[u8], cloud_spki_der: &[u8]) -> anyhow::Result<Self> {
        let device = openssl::pkey::PKey::private_key_from_pkcs8(device_pkcs8_der)?.rsa()?;
        let device_public_der =
            openssl::pkey::PKey::from_rsa(device.clone())?.public_key_to_der()?;
        let cloud = Rsa::public_key_from_der(cloud_spki_der)?;
        Ok(Self {
            device,
            device_public_der,
            cloud,
        })
    }

    /// Step 2: the 256 bytes answering `nonce`.
    pub fn on_nonce(&self, id: DeviceId, nonce: &[u8; NONCE_LEN]) -> anyhow::Result<Vec<u8>> {
        let mut plain = Vec::with_capacity(NONCE_LEN + 12 + self.device_public_der.len());
        plain.extend_from_slice(nonce);
        plain.extend_from_slice(&id.0);
        plain.extend_from_slice(&self.device_public_der);
        let mut out = vec![0u8; self.cloud.size() as usize];
        let n = self
            .cloud
            .public_encrypt(&plain, &mut out, Padding::PKCS1)?;
        out.truncate(n);
        Ok(out)
    }

    /// Step 4, device side: the session material, once the signature checks.
    pub fn on_reply(&self, reply: &[u8]) -> anyhow::Result<SessionMaterial> {
        ensure!(
            reply.len() == SERVER_REPLY_LEN,
            "reply of {} bytes",
            reply.len()
        );
        let (encrypted, signature) = reply.split_at(trellis_wire::ENCRYPTED_MATERIAL_LEN);
        let mut buf = vec![0u8; self.device.size() as usize];
        let n = self
            .device
            .private_decrypt(encrypted, &mut buf, Padding::PKCS1)
            .context("decrypting the session material")?;
        let material = SessionMaterial::from_bytes(&buf[..n])?;
        let expected = trellis_wire::session_hmac(&material, encrypted);
        let mut sig = vec![0u8; self.cloud.size() as usize];
        let n = self
            .cloud
            .public_decrypt(signature, &mut sig, Padding::PKCS1)
            .context("checking the cloud signature")?;
        ensure!(
            sig[..n] == expected[..],
            "the cloud signature does not match"
        );
        Ok(material)
    }
}

/// The whole device side over `stream`: nonce, 256 bytes, reply, Hello.
/// Returns the stream and the cipher, ready for the message loop.
pub async fn handshake(
    mut stream: TcpStream,
    keys: &FastKeys,
    id: DeviceId,
    hello: &Hello,
) -> anyhow::Result<(TcpStream, SessionCipher)> {
    stream.set_nodelay(true)?;
    let mut nonce = [0u8; NONCE_LEN];
    stream
        .read_exact(&mut nonce)
        .await
        .context("reading the nonce")?;
    stream.write_all(&keys.on_nonce(id, &nonce)?).await?;
    let mut reply = [0u8; SERVER_REPLY_LEN];
    stream
        .read_exact(&mut reply)
        .await
        .context("reading the reply")?;
    let material = keys.on_reply(&reply)?;
    let mut cipher = SessionCipher::new(&material, trellis_wire::DEFAULT_MAX_FRAME_LEN);
    let mut hello = hello.clone();
    hello.device_id = Some(id);
    let first = material.device_first_message_id();
    let frame = cipher
        .encoder
        .encode(&message::hello_device(first, &hello).encode());
    stream.write_all(&frame).await?;
    Ok((stream, cipher))
}

/// Reads until the server's Hello (`POST /h`) arrives: the point at which a
/// device knows its session is established, not only its handshake.
pub async fn wait_server_hello(
    stream: &mut TcpStream,
    cipher: &mut SessionCipher,
    within: std::time::Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        while let Some(plain) = cipher.decoder.next_message()? {
            let msg = trellis_wire::coap::CoapMessage::decode(&plain)?;
            if msg.uri_path().first() == Some(&b"h".as_slice()) {
                return Ok(());
            }
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .context("no server Hello in time")??;
        ensure!(n > 0, "closed before the server's Hello");
        cipher.decoder.push(&buf[..n]);
    }
}
