//! Signed commands (issue 16), without any I/O: the envelope a customer
//! signs for one function call on one device, its signatures, the policy a
//! device enforces, and the check a device runs before it calls a function.
//!
//! Why: firmware is already safe from a breached cloud (a device installs
//! only what the customer's offline key and the cloud key signed), but a
//! function call is how a device moves a valve or opens a lock, and today
//! whoever controls a gateway can call any. A device with a command policy
//! runs a protected function only when keys the customer holds signed that
//! exact call: organisation, device, function, argument, a validity window
//! and a sequence number. The cloud never holds these keys.
//!
//! The checks run in this order, so nothing in an envelope is believed
//! before its signatures verify: signatures against the policy (threshold,
//! trusted keys, no forged signature), then the device, the call, the time
//! window, and last the sequence number, which must be greater than the
//! last one this device accepted. The sequence is what stops a replay even
//! when the device's clock is wrong: a clock that runs late may accept an
//! expired envelope, but never one whose sequence it has already passed.
//!
//! Signatures are RSA-PSS-SHA256 (the release-key form, [`crate::signing`])
//! over the envelope bytes, which begin with a tag of their own
//! (`TRELLIS-CMD-1`), so a command signature can never pass as a manifest
//! signature or the other way round.
use crate::manifest::ManifestSignature;
use crate::policy::{PolicyError, TrustPolicy};
use crate::signing::{SignError, sign_manifest};
use rsa::PrivateKey;
use serde::{Deserialize, Serialize};

/// The first bytes of every envelope (domain separation).
pub const ENVELOPE_TAG: &[u8] = b"TRELLIS-CMD-1\0";
/// Longest function name (Particle's limit is 64 characters).
pub const MAX_FUNCTION_LEN: usize = 64;
/// Longest argument (Particle's is 622 bytes; room to spare).
pub const MAX_ARGUMENT_LEN: usize = 1024;
const MAX_FIELD_LEN: usize = 1024;
/// Most signatures carried with one command.
pub const MAX_SIGNATURES: usize = 8;

/// One function call on one device, as its owner signs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandEnvelope {
    pub organization: String,
    /// 24 lowercase hex characters.
    pub device_id: String,
    pub function: String,
    pub argument: String,
    /// Valid from (ms since the Unix epoch, the device's clock).
    pub not_before_ms: i64,
    /// Valid until, exclusive.
    pub expires_ms: i64,
    /// Greater than every sequence the device accepted before.
    pub sequence: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not a signed-command envelope (no TRELLIS-CMD-1 tag)")]
    Tag,
    #[error("the envelope ends inside its {0}")]
    Truncated(&'static str),
    #[error("the envelope's {field} is {len} bytes, more than {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("the envelope's {0} is not UTF-8")]
    NotText(&'static str),
    #[error("{0} bytes follow the envelope")]
    Trailing(usize),
    #[error("a signed command carries {0} signatures; at most {MAX_SIGNATURES}")]
    TooManySignatures(usize),
}

fn put_field(out: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    // Lengths are checked by `to_bytes` callers through `validate_lengths`.
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], EnvelopeError> {
        if self.bytes.len() < n {
            return Err(EnvelopeError::Truncated(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u16(&mut self, what: &'static str) -> Result<usize, EnvelopeError> {
        let b = self.take(2, what)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, EnvelopeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn text(&mut self, what: &'static str, max: usize) -> Result<String, EnvelopeError> {
        let len = self.u16(what)?;
        if len > max {
            return Err(EnvelopeError::TooLong {
                field: what,
                len,
                max,
            });
        }
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| EnvelopeError::NotText(what))
    }
}

impl CommandEnvelope {
    fn limits(&self) -> [(&'static str, usize, usize); 4] {
        [
            ("organization", self.organization.len(), MAX_FIELD_LEN),
            ("device id", self.device_id.len(), MAX_FIELD_LEN),
            ("function", self.function.len(), MAX_FUNCTION_LEN),
            ("argument", self.argument.len(), MAX_ARGUMENT_LEN),
        ]
    }

    /// The exact bytes that are signed: the tag, then organisation, device,
    /// function and argument (each a big-endian u16 length and UTF-8),
    /// then not-before, expiry (i64) and sequence (u64), big-endian.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EnvelopeError> {
        for (field, len, max) in self.limits() {
            if len > max {
                return Err(EnvelopeError::TooLong { field, len, max });
            }
        }
        let mut out = Vec::with_capacity(64 + self.argument.len());
        out.extend_from_slice(ENVELOPE_TAG);
        put_field(&mut out, &self.organization);
        put_field(&mut out, &self.device_id);
        put_field(&mut out, &self.function);
        put_field(&mut out, &self.argument);
        out.extend_from_slice(&self.not_before_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        Ok(out)
    }

    /// Parses [`CommandEnvelope::to_bytes`]'s form exactly: nothing may
    /// follow it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let mut r = Reader { bytes };
        if r.take(ENVELOPE_TAG.len(), "tag").ok() != Some(ENVELOPE_TAG) {
            return Err(EnvelopeError::Tag);
        }
        let envelope = CommandEnvelope {
            organization: r.text("organization", MAX_FIELD_LEN)?,
            device_id: r.text("device id", MAX_FIELD_LEN)?,
            function: r.text("function", MAX_FUNCTION_LEN)?,
            argument: r.text("argument", MAX_ARGUMENT_LEN)?,
            not_before_ms: r.u64("validity")? as i64,
            expires_ms: r.u64("validity")? as i64,
            sequence: r.u64("sequence")?,
        };
        if !r.bytes.is_empty() {
            return Err(EnvelopeError::Trailing(r.bytes.len()));
        }
        Ok(envelope)
    }
}

/// An envelope's exact bytes and the signatures over them: what travels
/// with the function call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCommand {
    pub envelope: Vec<u8>,
    pub signatures: Vec<ManifestSignature>,
}

impl SignedCommand {
    /// Wire form: u16 envelope length, the envelope, a count byte, then
    /// per signature a u16 key-id length, the key id (hex), a u16 length
    /// and the signature.
    pub fn encode(&self) -> Result<Vec<u8>, EnvelopeError> {
        if self.signatures.len() > MAX_SIGNATURES {
            return Err(EnvelopeError::TooManySignatures(self.signatures.len()));
        }
        let mut out = Vec::new();
        let len = |n: usize, field: &'static str| {
            u16::try_from(n).map_err(|_| EnvelopeError::TooLong {
                field,
                len: n,
                max: usize::from(u16::MAX),
            })
        };
        out.extend_from_slice(&len(self.envelope.len(), "envelope")?.to_be_bytes());
        out.extend_from_slice(&self.envelope);
        out.push(self.signatures.len() as u8);
        for s in &self.signatures {
            out.extend_from_slice(&len(s.key_id.len(), "key id")?.to_be_bytes());
            out.extend_from_slice(s.key_id.as_bytes());
            out.extend_from_slice(&len(s.signature.len(), "signature")?.to_be_bytes());
            out.extend_from_slice(&s.signature);
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let mut r = Reader { bytes };
        let len = r.u16("envelope")?;
        let envelope = r.take(len, "envelope")?.to_vec();
        let count = usize::from(r.take(1, "signature count")?[0]);
        if count > MAX_SIGNATURES {
            return Err(EnvelopeError::TooManySignatures(count));
        }
        let mut signatures = Vec::with_capacity(count);
        for _ in 0..count {
            let key_id = r.text("key id", 128)?;
            let len = r.u16("signature")?;
            let signature = r.take(len, "signature")?.to_vec();
            signatures.push(ManifestSignature { key_id, signature });
        }
        if !r.bytes.is_empty() {
            return Err(EnvelopeError::Trailing(r.bytes.len()));
        }
        Ok(SignedCommand {
            envelope,
            signatures,
        })
    }
}

/// Signs an envelope with one of the customer's command keys (RSA, at
/// least 2048 bits); several signers each add theirs for a threshold.
pub fn sign_command(
    private_key: &PrivateKey,
    envelope: &CommandEnvelope,
) -> Result<ManifestSignature, SignError> {
    let bytes = envelope
        .to_bytes()
        .map_err(|e| SignError::Rsa(e.to_string()))?;
    sign_manifest(private_key, &bytes)
}

/// Which functions need a signed call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protected {
    All,
    Only(Vec<String>),
}

/// What a device enforces: who may sign commands (keys and threshold, as a
/// [`TrustPolicy`]), which functions need signatures, and the longest
/// validity window an envelope may have.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandPolicy {
    pub signers: TrustPolicy,
    pub protected: Protected,
    pub max_validity_ms: i64,
}

impl CommandPolicy {
    pub fn new(
        signers: TrustPolicy,
        protected: Protected,
        max_validity_ms: i64,
    ) -> Result<Self, PolicyError> {
        if max_validity_ms <= 0 {
            return Err(PolicyError::Json(
                "a command policy needs a positive longest validity".into(),
            ));
        }
        Ok(CommandPolicy {
            signers,
            protected,
            max_validity_ms,
        })
    }

    /// What a device reports in its Hello (docs/protocol.md §7.4) so that an
    /// operator can tell which policy it enforces: SHA-256 over the
    /// threshold, the sorted key ids, the protected functions (sorted, or
    /// `*` for all) and the longest validity, each length-prefixed.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        field(b"TRELLIS-CMD-POLICY-1");
        field(&(self.signers.threshold() as u64).to_be_bytes());
        let mut ids: Vec<&str> = self
            .signers
            .keys()
            .iter()
            .map(|k| k.key_id.as_str())
            .collect();
        ids.sort_unstable();
        for id in ids {
            field(id.as_bytes());
        }
        match &self.protected {
            Protected::All => field(b"*"),
            Protected::Only(names) => {
                let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
                names.sort_unstable();
                for n in names {
                    field(n.as_bytes());
                }
            }
        }
        field(&self.max_validity_ms.to_be_bytes());
        h.finalize().into()
    }

    pub fn protects(&self, function: &str) -> bool {
        match &self.protected {
            Protected::All => true,
            Protected::Only(names) => names.iter().any(|n| n == function),
        }
    }
}

/// Why a device refused a call. [`CommandRefusal::reason`] is what reaches
/// the caller (`PERMISSION_DENIED: device refused: <reason>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandRefusal {
    #[error("signature missing")]
    SignatureMissing,
    #[error("untrusted key")]
    UntrustedKey,
    #[error("bad signature")]
    BadSignature,
    #[error("malformed envelope")]
    Malformed,
    #[error("wrong device")]
    WrongDevice,
    #[error("wrong call")]
    WrongCall,
    #[error("not yet valid")]
    NotYetValid,
    #[error("expired")]
    Expired,
    #[error("validity too long")]
    ValidityTooLong,
    #[error("replayed")]
    Replayed,
}

impl CommandRefusal {
    pub fn reason(&self) -> String {
        self.to_string()
    }

    /// Parses a reason back (the gateway and the CLI see only the text).
    pub fn from_reason(text: &str) -> Option<Self> {
        use CommandRefusal::*;
        [
            SignatureMissing,
            UntrustedKey,
            BadSignature,
            Malformed,
            WrongDevice,
            WrongCall,
            NotYetValid,
            Expired,
            ValidityTooLong,
            Replayed,
        ]
        .into_iter()
        .find(|r| r.reason() == text)
    }
}

/// A device's side: its policy (if any) and the last sequence it accepted.
/// The device keeps `last_sequence` across restarts (flash); one that
/// forgets it accepts old envelopes again until they expire.
#[derive(Debug, Clone)]
pub struct CommandGuard {
    device_id: String,
    policy: Option<CommandPolicy>,
    last_sequence: u64,
}

impl CommandGuard {
    pub fn new(
        device_id: impl Into<String>,
        policy: Option<CommandPolicy>,
        last_sequence: u64,
    ) -> Self {
        CommandGuard {
            device_id: device_id.into(),
            policy,
            last_sequence,
        }
    }

    pub fn policy(&self) -> Option<&CommandPolicy> {
        self.policy.as_ref()
    }

    /// Replaces the command policy (the `commands` part of an accepted
    /// trust policy rotation). The last accepted sequence is kept, so a
    /// rotation never re-opens old envelopes.
    pub fn set_policy(&mut self, policy: Option<CommandPolicy>) {
        self.policy = policy;
    }

    pub fn last_sequence(&self) -> u64 {
        self.last_sequence
    }

    /// Decides whether `function(argument)` may run now. `signed` is the
    /// encoded [`SignedCommand`] that came with the call, if any. Accepting
    /// a signed call moves the sequence forward.
    pub fn check(
        &mut self,
        function: &str,
        argument: &str,
        signed: Option<&[u8]>,
        now_ms: i64,
    ) -> Result<(), CommandRefusal> {
        let Some(policy) = &self.policy else {
            return Ok(());
        };
        if !policy.protects(function) {
            return Ok(());
        }
        let signed = signed.ok_or(CommandRefusal::SignatureMissing)?;
        let signed = SignedCommand::decode(signed).map_err(|_| CommandRefusal::Malformed)?;
        // Signatures first: nothing in the envelope is believed before.
        let report = policy
            .signers
            .evaluate(&signed.envelope, &signed.signatures);
        if !report.invalid.is_empty() {
            return Err(CommandRefusal::BadSignature);
        }
        if !report.satisfied() {
            return Err(if report.unknown.is_empty() {
                CommandRefusal::SignatureMissing
            } else {
                CommandRefusal::UntrustedKey
            });
        }
        let envelope =
            CommandEnvelope::from_bytes(&signed.envelope).map_err(|_| CommandRefusal::Malformed)?;
        if !envelope.device_id.eq_ignore_ascii_case(&self.device_id) {
            return Err(CommandRefusal::WrongDevice);
        }
        if envelope.function != function || envelope.argument != argument {
            return Err(CommandRefusal::WrongCall);
        }
        if envelope.expires_ms.saturating_sub(envelope.not_before_ms) > policy.max_validity_ms {
            return Err(CommandRefusal::ValidityTooLong);
        }
        if now_ms < envelope.not_before_ms {
            return Err(CommandRefusal::NotYetValid);
        }
        if now_ms >= envelope.expires_ms {
            return Err(CommandRefusal::Expired);
        }
        if envelope.sequence <= self.last_sequence {
            return Err(CommandRefusal::Replayed);
        }
        self.last_sequence = envelope.sequence;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::TrustedKey;

    const DEVICE: &str = "0123456789abcdef01234567";
    const NOW: i64 = 1_800_000_000_000;

    fn key() -> PrivateKey {
        PrivateKey::new(&mut rand::rng(), 2048).expect("RSA key")
    }

    fn envelope(sequence: u64) -> CommandEnvelope {
        CommandEnvelope {
            organization: "acme".into(),
            device_id: DEVICE.into(),
            function: "open".into(),
            argument: "valve-3".into(),
            not_before_ms: NOW - 1_000,
            expires_ms: NOW + 60_000,
            sequence,
        }
    }

    fn signed(e: &CommandEnvelope, keys: &[&PrivateKey]) -> Vec<u8> {
        SignedCommand {
            envelope: e.to_bytes().unwrap(),
            signatures: keys.iter().map(|k| sign_command(k, e).unwrap()).collect(),
        }
        .encode()
        .unwrap()
    }

    fn guard(keys: &[&PrivateKey], threshold: usize, protected: Protected) -> CommandGuard {
        let trusted = keys
            .iter()
            .enumerate()
            .map(|(i, k)| TrustedKey::new(format!("k{i}"), k.to_public_key()).unwrap())
            .collect();
        let policy = CommandPolicy::new(
            TrustPolicy::new(trusted, threshold).unwrap(),
            protected,
            3_600_000,
        )
        .unwrap();
        CommandGuard::new(DEVICE, Some(policy), 0)
    }

    #[test]
    fn envelopes_round_trip_and_refuse_damage() {
        let e = envelope(7);
        let bytes = e.to_bytes().unwrap();
        assert!(bytes.starts_with(ENVELOPE_TAG));
        assert_eq!(CommandEnvelope::from_bytes(&bytes).unwrap(), e);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            CommandEnvelope::from_bytes(&longer),
            Err(EnvelopeError::Trailing(1))
        );
        for cut in 0..bytes.len() {
            assert!(
                CommandEnvelope::from_bytes(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let long = CommandEnvelope {
            function: "f".repeat(MAX_FUNCTION_LEN + 1),
            ..e
        };
        assert!(matches!(
            long.to_bytes(),
            Err(EnvelopeError::TooLong { .. })
        ));
    }

    #[test]
    fn a_device_checks_signatures_device_call_time_and_sequence() {
        let (a, b, stranger) = (key(), key(), key());
        let mut g = guard(&[&a, &b], 2, Protected::Only(vec!["open".into()]));
        // Unprotected functions and devices without a policy: as today.
        assert_eq!(g.check("led", "on", None, NOW), Ok(()));
        assert_eq!(
            CommandGuard::new(DEVICE, None, 0).check("open", "x", None, NOW),
            Ok(())
        );
        use CommandRefusal::*;
        assert_eq!(g.check("open", "valve-3", None, NOW), Err(SignatureMissing));
        assert_eq!(
            g.check("open", "valve-3", Some(b"junk"), NOW),
            Err(Malformed)
        );
        // One of two: below the threshold.
        assert_eq!(
            g.check("open", "valve-3", Some(&signed(&envelope(1), &[&a])), NOW),
            Err(SignatureMissing)
        );
        assert_eq!(
            g.check(
                "open",
                "valve-3",
                Some(&signed(&envelope(1), &[&a, &stranger])),
                NOW
            ),
            Err(UntrustedKey)
        );
        // A signature by a trusted key over other bytes.
        let mut forged = SignedCommand::decode(&signed(&envelope(1), &[&a, &b])).unwrap();
        forged.envelope = envelope(2).to_bytes().unwrap();
        assert_eq!(
            g.check("open", "valve-3", Some(&forged.encode().unwrap()), NOW),
            Err(BadSignature)
        );
        let other_device = CommandEnvelope {
            device_id: "ffffffffffffffffffffffff".into(),
            ..envelope(1)
        };
        assert_eq!(
            g.check(
                "open",
                "valve-3",
                Some(&signed(&other_device, &[&a, &b])),
                NOW
            ),
            Err(WrongDevice)
        );
        assert_eq!(
            g.check(
                "open",
                "valve-4",
                Some(&signed(&envelope(1), &[&a, &b])),
                NOW
            ),
            Err(WrongCall)
        );
        let ok = signed(&envelope(1), &[&a, &b]);
        assert_eq!(
            g.check("open", "valve-3", Some(&ok), NOW - 5_000),
            Err(NotYetValid)
        );
        assert_eq!(
            g.check("open", "valve-3", Some(&ok), NOW + 60_000),
            Err(Expired)
        );
        let forever = CommandEnvelope {
            expires_ms: NOW + 10 * 3_600_000,
            ..envelope(1)
        };
        assert_eq!(
            g.check("open", "valve-3", Some(&signed(&forever, &[&a, &b])), NOW),
            Err(ValidityTooLong)
        );
        // Accepted once; the same envelope again is a replay, even inside
        // its window, and so is an older sequence.
        assert_eq!(g.check("open", "valve-3", Some(&ok), NOW), Ok(()));
        assert_eq!(g.last_sequence(), 1);
        assert_eq!(g.check("open", "valve-3", Some(&ok), NOW), Err(Replayed));
        let later = signed(&envelope(5), &[&b, &a]);
        assert_eq!(g.check("open", "valve-3", Some(&later), NOW), Ok(()));
        assert_eq!(
            g.check(
                "open",
                "valve-3",
                Some(&signed(&envelope(4), &[&a, &b])),
                NOW
            ),
            Err(Replayed)
        );
        // Refusals do not move the sequence.
        assert_eq!(g.last_sequence(), 5);
    }

    #[test]
    fn reasons_read_back() {
        for r in [
            CommandRefusal::SignatureMissing,
            CommandRefusal::Expired,
            CommandRefusal::Replayed,
            CommandRefusal::WrongDevice,
            CommandRefusal::UntrustedKey,
        ] {
            assert_eq!(CommandRefusal::from_reason(&r.reason()), Some(r.clone()));
        }
        assert_eq!(CommandRefusal::from_reason("whatever"), None);
    }

    #[test]
    fn a_command_signature_is_not_a_manifest_signature() {
        let k = key();
        let e = envelope(1);
        let sig = sign_command(&k, &e).unwrap();
        // The signed bytes carry the command tag, which no manifest has.
        let policy =
            TrustPolicy::new(vec![TrustedKey::new("k", k.to_public_key()).unwrap()], 1).unwrap();
        let manifest_like = &e.to_bytes().unwrap()[ENVELOPE_TAG.len()..];
        assert!(!policy.evaluate(manifest_like, &[sig]).satisfied());
    }
}
