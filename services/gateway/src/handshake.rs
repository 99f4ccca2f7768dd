//! The gateway's half of the handshake (PROTOCOL.md steps 1-4): send the
//! nonce, collect the device's 256 bytes, let keyvault do every private-key
//! operation, send its 384-byte reply. Each step has a deadline; the whole
//! handshake has one too.
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use trellis_proto::v1::{OpenSessionRequest, RefusalReason, open_session_response::Outcome};
use trellis_wire::frame::SessionCipher;
use trellis_wire::handshake::ServerHandshake;
use trellis_wire::{NONCE_LEN, SessionMaterial};

use crate::Gateway;

pub struct Established {
    pub device_id: String,
    pub product_id: u32,
    pub cipher: SessionCipher,
    /// The cloud key version the handshake was made under.
    pub cloud_key_version: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    #[error("timed out waiting for the device's handshake bytes")]
    StepTimeout,
    #[error("the handshake took longer than its deadline")]
    Timeout,
    #[error("connection closed by the device during the handshake")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed handshake: {0}")]
    Malformed(String),
    #[error("refused ({reason}): {message}")]
    Refused {
        reason: &'static str,
        message: String,
    },
    #[error("keyvault is saturated; device turned away")]
    Overloaded,
    #[error("keyvault unavailable: {0}")]
    Keyvault(String),
}

impl HandshakeFailure {
    /// A short, stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::StepTimeout | Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::Io(_) => "io",
            Self::Malformed(_) => "malformed",
            Self::Refused { reason, .. } => reason,
            Self::Overloaded => "overloaded",
            Self::Keyvault(_) => "keyvault_unavailable",
        }
    }
}

pub async fn run(
    gw: &Gateway,
    stream: &mut TcpStream,
    peer: SocketAddr,
) -> Result<Established, HandshakeFailure> {
    let deadline = Duration::from_millis(gw.config.handshake_timeout_ms);
    tokio::time::timeout(deadline, steps(gw, stream, peer))
        .await
        .map_err(|_| HandshakeFailure::Timeout)?
}

async fn steps(
    gw: &Gateway,
    stream: &mut TcpStream,
    peer: SocketAddr,
) -> Result<Established, HandshakeFailure> {
    let step = Duration::from_millis(gw.config.handshake_step_timeout_ms);
    let nonce: [u8; NONCE_LEN] = rand::random();
    let mut hs = ServerHandshake::new(nonce).with_max_frame_len(gw.config.max_frame_len);
    stream.write_all(hs.nonce()).await?;

    let mut buf = [0u8; 512];
    let ciphertext = loop {
        let n = tokio::time::timeout(step, stream.read(&mut buf))
            .await
            .map_err(|_| HandshakeFailure::StepTimeout)??;
        if n == 0 {
            return Err(HandshakeFailure::Closed);
        }
        if let Some(ct) = hs
            .receive(&buf[..n])
            .map_err(|e| HandshakeFailure::Malformed(e.to_string()))?
        {
            break ct;
        }
    };

    let request = OpenSessionRequest {
        nonce: nonce.to_vec(),
        ciphertext: ciphertext.to_vec(),
        gateway_id: gw.id.clone(),
        peer_addr: peer.to_string(),
        cloud_key_version_hint: gw.cloud_keys.hint(peer.ip()),
    };
    // The deadline travels as grpc-timeout: keyvault drops the request
    // unworked if it is still queued when we would have given up anyway.
    let mut request = tonic::Request::new(request);
    request.set_timeout(step);
    let mut keyvault = gw.keyvault.clone();
    let response = tokio::time::timeout(step, keyvault.open_session(request))
        .await
        .map_err(|_| HandshakeFailure::Keyvault("no answer in time".into()))?;
    let response = match response {
        Ok(r) => r.into_inner(),
        Err(status) if status.code() == Code::ResourceExhausted => {
            return Err(HandshakeFailure::Overloaded);
        }
        Err(status) => return Err(HandshakeFailure::Keyvault(status.message().to_string())),
    };
    match response.outcome {
        Some(Outcome::Granted(grant)) => {
            let material = SessionMaterial::from_bytes(&grant.session_material)
                .map_err(|e| HandshakeFailure::Keyvault(format!("bad session material: {e}")))?;
            let (reply, cipher) = hs
                .accept(material, &grant.reply)
                .map_err(|e| HandshakeFailure::Keyvault(format!("bad reply: {e}")))?;
            stream.write_all(&reply).await?;
            gw.cloud_keys.remember(peer.ip(), grant.cloud_key_version);
            Ok(Established {
                device_id: grant.device_id,
                product_id: grant.product_id,
                cipher,
                cloud_key_version: grant.cloud_key_version,
            })
        }
        Some(Outcome::Refused(refusal)) => Err(HandshakeFailure::Refused {
            reason: refusal_label(refusal.reason()),
            message: refusal.message,
        }),
        None => Err(HandshakeFailure::Keyvault("empty answer".into())),
    }
}

pub fn refusal_label(reason: RefusalReason) -> &'static str {
    match reason {
        RefusalReason::BadHandshake => "bad_handshake",
        RefusalReason::UnknownDevice => "unknown_device",
        RefusalReason::Revoked => "revoked",
        RefusalReason::KeyMismatch => "key_mismatch",
        RefusalReason::Quarantined => "quarantined",
        RefusalReason::Unspecified => "refused",
    }
}
