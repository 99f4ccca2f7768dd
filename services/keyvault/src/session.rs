//! OpenSession: handshake steps 3 and 4 (PROTOCOL.md) for a gateway.
//!
//! Decrypt the device's 256 bytes with the cloud key, check the nonce, look
//! the device up, make fresh session material, encrypt it to the device key
//! and sign its HMAC with the cloud key. Refusals are normal answers; each
//! call leaves one audit record.
//!
//! No padding oracle: the backend decrypts with implicit rejection, so a
//! ciphertext with bad padding yields a synthetic plaintext and then fails
//! the nonce check like any wrong nonce. A plaintext too short to parse, a
//! ciphertext the backend refuses, and a wrong nonce all end in the same
//! refusal (BAD_HANDSHAKE, one message, no device id) after the same work.
use crate::cloud_keys::{Keyring, RingKey};
use crate::error::{KeyvaultError, Result};
use crate::pool::Pool;
use crate::registry::{self, DeviceRecord};
use rand::rand_core::UnwrapErr;
use rand::rngs::SysRng;
use trellis_core::audit::AuditRecord;
use trellis_core::redis_conn::Redis;
use trellis_proto::v1 as pb;
use trellis_wire::handshake::{
    HandshakePlaintext, SessionMaterial, assemble_server_reply, encrypt_session_material,
    nonce_matches, session_hmac,
};
use trellis_wire::{HANDSHAKE_CIPHERTEXT_LEN, NONCE_LEN};

/// The one message for every handshake that does not decrypt to our nonce.
pub const BAD_HANDSHAKE_MESSAGE: &str = "the handshake did not decrypt to this connection's nonce";

/// Outcome names as written to the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    BadHandshake,
    UnknownDevice,
    Revoked,
    KeyMismatch,
    Quarantined,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::BadHandshake => "bad_handshake",
            Outcome::UnknownDevice => "unknown_device",
            Outcome::Revoked => "revoked",
            Outcome::KeyMismatch => "key_mismatch",
            Outcome::Quarantined => "quarantined",
        }
    }

    fn reason(self) -> pb::RefusalReason {
        match self {
            Outcome::Ok => pb::RefusalReason::Unspecified,
            Outcome::BadHandshake => pb::RefusalReason::BadHandshake,
            Outcome::UnknownDevice => pb::RefusalReason::UnknownDevice,
            Outcome::Revoked => pb::RefusalReason::Revoked,
            Outcome::KeyMismatch => pb::RefusalReason::KeyMismatch,
            Outcome::Quarantined => pb::RefusalReason::Quarantined,
        }
    }
}

fn refused(outcome: Outcome, device_id: &str, message: String) -> pb::OpenSessionResponse {
    pb::OpenSessionResponse {
        outcome: Some(pb::open_session_response::Outcome::Refused(pb::Refusal {
            reason: outcome.reason() as i32,
            device_id: device_id.to_string(),
            message,
        })),
    }
}

/// What one OpenSession did besides its answer, for the audit record.
#[derive(Debug, Clone, Default)]
pub struct Notes {
    /// The cloud key version the handshake was made under.
    pub cloud_key_version: u32,
    /// The device's next key became its key (device key rotation).
    pub promoted_key_id: Option<String>,
}

/// Runs one OpenSession; returns the response and the outcome (for the
/// span and the audit record, which the caller writes).
///
/// Cloud key versions: the live versions are tried in
/// [`Keyring::candidates`] order (the gateway's hint first, then newest
/// first) until one decrypts to the nonce. A refusal tries them all, so
/// every refusal costs the same work whatever the device sent.
pub async fn open_session(
    pool: &Pool,
    ring: &Keyring,
    redis: &mut Redis,
    req: &pb::OpenSessionRequest,
    deadline: Option<std::time::Instant>,
    notes: &mut Notes,
) -> Result<(pb::OpenSessionResponse, Outcome, String)> {
    let nonce: [u8; NONCE_LEN] = req.nonce.as_slice().try_into().map_err(|_| {
        KeyvaultError::InvalidArgument(format!(
            "nonce must be the {NONCE_LEN} bytes the gateway sent, got {} bytes",
            req.nonce.len()
        ))
    })?;
    if req.ciphertext.len() != HANDSHAKE_CIPHERTEXT_LEN {
        return Err(KeyvaultError::InvalidArgument(format!(
            "ciphertext must be the device's {HANDSHAKE_CIPHERTEXT_LEN} bytes, got {} bytes",
            req.ciphertext.len()
        )));
    }

    // Room for the whole handshake (decrypt and sign), or RESOURCE_EXHAUSTED
    // now, before any RSA work.
    let _slot = pool.reserve_handshake()?;

    // Step 3: decrypt on the pool, under each live cloud key version in
    // turn. A backend error (a ciphertext not below the modulus) is treated
    // exactly like bad padding. A request still queued at `deadline` is
    // dropped unworked.
    let dummy = [0u8; NONCE_LEN];
    let mut found: Option<(HandshakePlaintext, std::sync::Arc<RingKey>)> = None;
    for (i, key) in ring
        .candidates(req.cloud_key_version_hint)
        .into_iter()
        .enumerate()
    {
        let decrypted = match pool
            .decrypt_with(key.key.clone(), req.ciphertext.clone(), deadline, i > 0)
            .await
        {
            Ok(plaintext) => Some(plaintext),
            Err(crate::pool::PoolError::Backend(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let parsed = decrypted
            .as_deref()
            .and_then(|p| HandshakePlaintext::parse(p).ok());
        // Compare in constant time in every case, against a dummy when
        // nothing parsed.
        let got = parsed.as_ref().map_or(&dummy, |p| &p.nonce);
        let nonce_ok = nonce_matches(&nonce, got) & parsed.is_some();
        if let Some(p) = parsed
            && nonce_ok
        {
            found = Some((p, key));
            break;
        }
    }
    let Some((plaintext, cloud_key)) = found else {
        return Ok((
            refused(Outcome::BadHandshake, "", BAD_HANDSHAKE_MESSAGE.into()),
            Outcome::BadHandshake,
            String::new(),
        ));
    };
    notes.cloud_key_version = cloud_key.meta.version;
    let device_id = plaintext.device_id.to_string();

    let (record, quarantine_left) = registry::get_with_quarantine(redis, &device_id).await?;
    let Some(mut record) = record else {
        if let Some(der) = &plaintext.public_key_der {
            registry::keep_pending(redis, &device_id, der, &req.gateway_id, &req.peer_addr).await?;
        }
        let message = format!(
            "device {device_id} is not registered{}",
            if plaintext.public_key_der.is_some() {
                "; its offered key is kept as a pending registration for an operator to review"
            } else {
                ""
            }
        );
        return Ok((
            refused(Outcome::UnknownDevice, &device_id, message),
            Outcome::UnknownDevice,
            device_id,
        ));
    };
    if record.revoked {
        let message = format!("device {device_id} is revoked");
        return Ok((
            refused(Outcome::Revoked, &device_id, message),
            Outcome::Revoked,
            device_id,
        ));
    }
    // Device key rotation: the first handshake under the registered next
    // key makes it the device's key, and the old one is refused from now on.
    if let Some(offered) = &plaintext.public_key_der
        && !record.next_public_key_der.is_empty()
        && !same_key(offered, &record.public_key_der)
        && same_key(offered, &record.next_public_key_der)
        && let Some(promoted) = registry::promote_next_key(redis, &record).await?
    {
        notes.promoted_key_id = Some(trellis_core::keys::key_id(&promoted.public_key_der));
        record = promoted;
    }
    if let Some(offered) = &plaintext.public_key_der
        && !same_key(offered, &record.public_key_der)
    {
        let message = format!(
            "device {device_id} offered a public key (key id {}) that differs from its registered one (key id {})",
            trellis_core::keys::key_id(offered),
            trellis_core::keys::key_id(&record.public_key_der)
        );
        return Ok((
            refused(Outcome::KeyMismatch, &device_id, message),
            Outcome::KeyMismatch,
            device_id,
        ));
    }

    // A suspected clone under quarantine (set by a gateway's clone
    // policy) is refused here, before the signature: no more RSA work.
    if let Some(left_secs) = quarantine_left {
        let until = if left_secs < 0 {
            "until an operator lifts it".to_string()
        } else {
            format!("for {left_secs} more seconds")
        };
        let message = format!(
            "device {device_id} is quarantined as a suspected clone (in session from two \
             addresses at once) {until}"
        );
        return Ok((
            refused(Outcome::Quarantined, &device_id, message),
            Outcome::Quarantined,
            device_id,
        ));
    }

    // Step 4, signed with the version the device encrypted to.
    let grant = grant(pool, &cloud_key, &record).await?;
    Ok((
        pb::OpenSessionResponse {
            outcome: Some(pb::open_session_response::Outcome::Granted(grant)),
        },
        Outcome::Ok,
        device_id,
    ))
}

async fn grant(pool: &Pool, key: &RingKey, record: &DeviceRecord) -> Result<pb::SessionGrant> {
    let device_key = trellis_core::keys::parse_public_key(&record.public_key_der).map_err(|e| {
        KeyvaultError::Internal(format!(
            "the registered key of device {} does not parse ({e}); re-register it",
            record.device_id
        ))
    })?;
    // 40 bytes from the OS CSPRNG (getrandom). The OS RNG failing is not
    // something a caller can cause; UnwrapErr panics only then.
    let mut rng = UnwrapErr(SysRng);
    let material = SessionMaterial::generate(&mut rng);
    let encrypted = encrypt_session_material(&material, &device_key, &mut rng).map_err(|e| {
        KeyvaultError::FailedPrecondition(format!(
            "cannot encrypt to the registered key of device {}: {e}",
            record.device_id
        ))
    })?;
    let hmac = session_hmac(&material, &encrypted);
    let signature = pool.sign_with(key.key.clone(), hmac.to_vec()).await?;
    let reply = assemble_server_reply(&encrypted, &signature).map_err(|e| {
        KeyvaultError::FailedPrecondition(format!(
            "device {}: {e} (devices must have RSA-1024 keys)",
            record.device_id
        ))
    })?;
    Ok(pb::SessionGrant {
        device_id: record.device_id.clone(),
        session_material: material.to_bytes().to_vec(),
        reply: reply.to_vec(),
        product_id: record.product_id,
        organization: record.organization.clone(),
        cloud_key_version: key.meta.version,
    })
}

/// The offered DER equals the registered one, or encodes the same key.
fn same_key(offered: &[u8], registered: &[u8]) -> bool {
    if offered == registered {
        return true;
    }
    match (
        trellis_core::keys::parse_public_key(offered),
        trellis_core::keys::parse_public_key(registered),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The audit record for one OpenSession.
pub fn audit_record(
    req: &pb::OpenSessionRequest,
    device_id: &str,
    outcome: Outcome,
    notes: &Notes,
) -> AuditRecord {
    let mut r = AuditRecord::new(&req.gateway_id, "open_session", device_id, outcome.as_str())
        .with("peer_addr", &req.peer_addr)
        .with("cloud_key_version", notes.cloud_key_version.to_string());
    if let Some(k) = &notes.promoted_key_id {
        r = r.with("promoted_key_id", k.clone());
    }
    r
}
