//! The firmware release decoders a device and the cloud run on bytes from
//! elsewhere. The first byte picks one, the rest is its input:
//!
//! - 0: `decode_manifest` (a `trellis.v1.FirmwareManifest`);
//! - 1: `decode_signed_manifest` (the envelope with its signatures), then
//!   `verify_update_bytes` against a policy trusting the vectors' cloud key,
//!   so signatures are checked (the seeds carry valid ones);
//! - 2: a trust policy's JSON (`TrustPolicy::from_json` and serde), and the
//!   text as a PEM public key;
//! - 3: `parse_rejection_event` (what a device reports when it refuses);
//! - 4: a signed command (`SignedCommand::decode`, its envelope) and the
//!   check a device with a command policy runs on it;
//! - 5: a signed trust policy (`decode_signed_policy`, `decode_policy`) and
//!   the device's rotation rule (`verify_policy_update_bytes`) against the
//!   vectors' policy.
//!
//! Whatever decodes must encode back to something that decodes the same.

use trellis_firmware::manifest::{
    decode_manifest, decode_signed_manifest, encode_manifest, encode_signed_manifest,
};
use trellis_firmware::{
    TrustPolicy, parse_rejection_event, public_key_from_pem, public_key_to_pem, verify_image,
    verify_update, verify_update_bytes,
};

use crate::vectors::{self, PRODUCT_ID, VERSION_FLOOR};

pub fn run(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 6 {
        0 => manifest(bytes),
        1 => signed_manifest(bytes),
        2 => policy(bytes),
        3 => rejection(bytes),
        4 => signed_command(bytes),
        _ => signed_policy(bytes),
    }
}

fn signed_policy(bytes: &[u8]) {
    use trellis_firmware::rotation::{
        decode_policy, decode_signed_policy, encode_signed_policy, verify_policy_update,
        verify_policy_update_bytes,
    };
    let v = vectors::get();
    let verdict = verify_policy_update_bytes(&v.policy, bytes);
    if let Ok(p) = decode_policy(bytes) {
        // Canonical bytes only: they are exactly what the policy encodes to.
        assert_eq!(p.canonical_bytes().expect("valid policy encodes"), bytes);
    }
    let Ok(signed) = decode_signed_policy(bytes) else {
        assert!(verdict.is_err());
        return;
    };
    let again = decode_signed_policy(&encode_signed_policy(&signed)).expect("own envelope");
    assert_eq!(again, signed);
    assert_eq!(verify_policy_update(&v.policy, &signed), verdict);
    match verdict {
        Ok(new) => {
            assert!(new.version() > v.policy.version());
            assert!(v.policy.evaluate(&signed.policy, &signed.signatures).satisfied());
            assert!(new.evaluate(&signed.policy, &signed.signatures).satisfied());
        }
        Err(r) => {
            let _ = (r.code(), r.coap_code(), r.event_data());
        }
    }
}

fn manifest(bytes: &[u8]) {
    let Ok(m) = decode_manifest(bytes) else {
        return;
    };
    assert_eq!(m.image_sha256.len(), 32);
    assert!(m.image_size > 0);
    assert_eq!(
        decode_manifest(&encode_manifest(&m)).expect("own manifest"),
        m
    );
}

fn signed_manifest(bytes: &[u8]) {
    let v = vectors::get();
    let verdict = verify_update_bytes(bytes, &v.policy, PRODUCT_ID, VERSION_FLOOR);
    let Ok(signed) = decode_signed_manifest(bytes) else {
        assert!(verdict.is_err());
        return;
    };
    assert!(!signed.manifest.is_empty());
    let again = decode_signed_manifest(&encode_signed_manifest(&signed)).expect("own envelope");
    assert_eq!(again, signed);
    assert_eq!(
        verify_update(&signed, &v.policy, PRODUCT_ID, VERSION_FLOOR),
        verdict
    );

    let report = v.policy.evaluate(&signed.manifest, &signed.signatures);
    assert_eq!(report.satisfied(), report.clone().into_result().is_ok());
    match verdict {
        Ok(m) => {
            // Only the cloud key could have signed these bytes.
            assert!(report.satisfied());
            assert_eq!(m.product_id, PRODUCT_ID);
            assert!(m.version > VERSION_FLOOR);
            if let Some(r) = v.releases.iter().find(|r| r.manifest == signed.manifest) {
                assert_eq!(verify_image(&m, &r.image), Ok(()));
            }
        }
        Err(r) => {
            let _ = (r.code(), r.coap_code(), r.event_data());
        }
    }
}

fn policy(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(key) = public_key_from_pem(text) {
        let pem = public_key_to_pem(&key).expect("own key to PEM");
        assert_eq!(public_key_from_pem(&pem).expect("own PEM"), key);
    }
    let parsed = TrustPolicy::from_json(text);
    let via_serde = serde_json::from_str::<TrustPolicy>(text);
    assert_eq!(
        parsed.is_ok(),
        via_serde.is_ok(),
        "from_json and serde disagree"
    );
    let Ok(policy) = parsed else {
        return;
    };
    policy.validate().expect("a parsed policy is valid");
    assert!(policy.threshold() >= 1 && policy.threshold() <= policy.keys().len());
    let json = policy.to_json().expect("own policy to JSON");
    assert_eq!(
        TrustPolicy::from_json(&json).expect("own policy JSON"),
        policy
    );
}

fn rejection(bytes: &[u8]) {
    if let Some((code, message)) = parse_rejection_event(bytes) {
        assert_eq!(format!("{code}: {message}").as_bytes(), bytes);
    }
}

fn signed_command(bytes: &[u8]) {
    use trellis_firmware::command::{
        CommandEnvelope, CommandGuard, CommandPolicy, CommandRefusal, Protected, SignedCommand,
    };
    let v = vectors::get();
    let policy =
        CommandPolicy::new(v.policy.clone(), Protected::All, 3_600_000).expect("a command policy");
    let mut guard = CommandGuard::new("0123456789abcdef01234567", Some(policy), 0);
    let verdict = guard.check("f", "", Some(bytes), 1_800_000_000_000);
    let Ok(signed) = SignedCommand::decode(bytes) else {
        assert_eq!(verdict, Err(CommandRefusal::Malformed));
        return;
    };
    let again = SignedCommand::decode(&signed.encode().expect("own command")).expect("own bytes");
    assert_eq!(again, signed);
    if let Ok(e) = CommandEnvelope::from_bytes(&signed.envelope) {
        let back = CommandEnvelope::from_bytes(&e.to_bytes().expect("own envelope"));
        assert_eq!(back.as_ref(), Ok(&e));
    }
    if verdict.is_ok() {
        // Only the vectors' cloud key could have signed it.
        let report = v.policy.evaluate(&signed.envelope, &signed.signatures);
        assert!(report.satisfied());
        assert!(guard.last_sequence() > 0);
    }
}
