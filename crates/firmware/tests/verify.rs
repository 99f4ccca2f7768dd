//! Manifests, signatures, trust policies and every rejection reason, with
//! keys generated at test time.

mod common;

use common::{PRODUCT, image, keys, manifest, policy_2_of_2, release, sign_bytes};
use proptest::prelude::*;
use rsa::PrivateKey;
use trellis_firmware::{
    KeyError, PolicyError, Rejection, SignError, SignatureError, TrustPolicy, TrustedKey,
    decode_manifest, decode_signed_manifest, encode_manifest, encode_signed_manifest, key_id,
    parse_rejection_event, public_key_from_pem, public_key_to_pem, sign_manifest, verify_image,
    verify_signature, verify_update, verify_update_bytes,
};

#[test]
fn release_signed_by_customer_and_cloud_is_accepted() {
    let k = keys();
    let img = image(1000);
    let signed = release(PRODUCT, 2, &img, &[&k.customer, &k.cloud]);
    let m = verify_update(&signed, &policy_2_of_2(), PRODUCT, 1).expect("accepted");
    assert_eq!((m.product_id, m.version, m.image_size), (PRODUCT, 2, 1000));
    assert_eq!(m.organization, "acme");
    verify_image(&m, &img).expect("image matches");
    // The exact bytes survive the envelope's round trip.
    let bytes = encode_signed_manifest(&signed);
    assert_eq!(decode_signed_manifest(&bytes).expect("decode"), signed);
    assert_eq!(
        verify_update_bytes(&bytes, &policy_2_of_2(), PRODUCT, 1).expect("bytes"),
        m
    );
}

#[test]
fn cloud_key_alone_is_insufficient_and_names_the_missing_customer_key() {
    let k = keys();
    let signed = release(PRODUCT, 2, &image(10), &[&k.cloud]);
    let err = verify_update(&signed, &policy_2_of_2(), PRODUCT, 1).unwrap_err();
    assert_eq!(err.code(), "insufficient_signatures");
    let Rejection::InsufficientSignatures {
        threshold,
        valid,
        missing,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*threshold, 2);
    assert_eq!(valid.len(), 1);
    assert_eq!(valid[0].name, "cloud-release");
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0].name, "customer");
    assert_eq!(missing[0].key_id, key_id(&k.customer.to_public_key()));
    assert!(err.to_string().contains("customer"), "{err}");
    // The customer alone is not enough either.
    let signed = release(PRODUCT, 2, &image(10), &[&k.customer]);
    let err = verify_update(&signed, &policy_2_of_2(), PRODUCT, 1).unwrap_err();
    assert_eq!(err.code(), "insufficient_signatures");
    // No signature at all.
    let signed = release(PRODUCT, 2, &image(10), &[]);
    let err = verify_update(&signed, &policy_2_of_2(), PRODUCT, 1).unwrap_err();
    assert_eq!(err.code(), "insufficient_signatures");
    // The same signature twice counts once.
    let mut signed = release(PRODUCT, 2, &image(10), &[&k.cloud]);
    signed.signatures.push(signed.signatures[0].clone());
    let err = verify_update(&signed, &policy_2_of_2(), PRODUCT, 1).unwrap_err();
    assert_eq!(err.code(), "insufficient_signatures");
}

#[test]
fn a_key_the_device_does_not_trust_is_unknown_key() {
    let k = keys();
    let signed = release(PRODUCT, 2, &image(10), &[&k.attacker, &k.cloud]);
    let err = verify_update(&signed, &policy_2_of_2(), PRODUCT, 1).unwrap_err();
    assert_eq!(err.code(), "unknown_key", "{err}");
    let Rejection::UnknownKey {
        key_ids, missing, ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(key_ids, &[key_id(&k.attacker.to_public_key())]);
    assert_eq!(missing[0].name, "customer");
    // An extra untrusted signature does not spoil a release that meets the policy.
    let signed = release(
        PRODUCT,
        2,
        &image(10),
        &[&k.customer, &k.attacker, &k.cloud],
    );
    verify_update(&signed, &policy_2_of_2(), PRODUCT, 1).expect("threshold met");
}

#[test]
fn a_forged_signature_claiming_a_trusted_key_is_bad_signature() {
    let k = keys();
    let bytes = encode_manifest(&manifest(PRODUCT, 2, &image(10)));
    let mut signed = sign_bytes(&bytes, &[&k.attacker, &k.cloud]);
    signed.signatures[0].key_id = key_id(&k.customer.to_public_key());
    let err = verify_update(&signed, &policy_2_of_2(), PRODUCT, 1).unwrap_err();
    assert_eq!(err.code(), "bad_signature");
    assert!(err.to_string().contains("customer"), "{err}");
    // Bad even when the threshold is met by the others.
    let mut signed = sign_bytes(&bytes, &[&k.customer, &k.cloud, &k.cloud]);
    signed.signatures[2].signature[10] ^= 1;
    assert_eq!(
        verify_update(&signed, &policy_2_of_2(), PRODUCT, 1)
            .unwrap_err()
            .code(),
        "bad_signature"
    );
    // A signature over other bytes.
    let other = encode_manifest(&manifest(PRODUCT, 3, &image(10)));
    let mut signed = sign_bytes(&bytes, &[&k.customer]);
    signed
        .signatures
        .push(sign_manifest(&k.cloud, &other).expect("sign"));
    assert_eq!(
        verify_update(&signed, &policy_2_of_2(), PRODUCT, 1)
            .unwrap_err()
            .code(),
        "bad_signature"
    );
}

#[test]
fn wrong_product_and_rollback() {
    let k = keys();
    let signed = release(PRODUCT + 1, 2, &image(10), &[&k.customer, &k.cloud]);
    let err = verify_update(&signed, &policy_2_of_2(), PRODUCT, 1).unwrap_err();
    assert_eq!(
        err,
        Rejection::WrongProduct {
            device: PRODUCT,
            manifest: PRODUCT + 1
        }
    );
    assert_eq!(err.code(), "wrong_product");
    for (version, floor) in [(4, 5), (5, 5), (0, 0)] {
        let signed = release(PRODUCT, version, &image(10), &[&k.customer, &k.cloud]);
        let err = verify_update(&signed, &policy_2_of_2(), PRODUCT, floor).unwrap_err();
        assert_eq!(err, Rejection::Rollback { version, floor });
        assert_eq!(err.code(), "rollback");
    }
    let signed = release(PRODUCT, 6, &image(10), &[&k.customer, &k.cloud]);
    verify_update(&signed, &policy_2_of_2(), PRODUCT, 5).expect("above the floor");
}

#[test]
fn policy_is_checked_before_the_manifest_is_read() {
    let k = keys();
    // Garbage, signed by nobody trusted: the policy answers, not the decoder.
    let signed = sign_bytes(b"\xff\xff\xff garbage", &[&k.attacker]);
    assert_eq!(
        verify_update(&signed, &policy_2_of_2(), PRODUCT, 0)
            .unwrap_err()
            .code(),
        "unknown_key"
    );
    // A wrong product signed only by the cloud: insufficient, not wrong_product.
    let signed = release(PRODUCT + 1, 9, &image(10), &[&k.cloud]);
    assert_eq!(
        verify_update(&signed, &policy_2_of_2(), PRODUCT, 0)
            .unwrap_err()
            .code(),
        "insufficient_signatures"
    );
}

#[test]
fn malformed_manifests() {
    let k = keys();
    let both = [&k.customer, &k.cloud];
    // Properly signed bytes that are not a manifest.
    let signed = sign_bytes(b"\xff\xff\xff garbage", &both);
    let err = verify_update(&signed, &policy_2_of_2(), PRODUCT, 0).unwrap_err();
    assert_eq!(err.code(), "malformed_manifest", "{err}");
    // A SHA-256 of the wrong length.
    let mut m = manifest(PRODUCT, 2, &image(10));
    m.image_sha256.pop();
    let signed = sign_bytes(&encode_manifest(&m), &both);
    assert_eq!(
        verify_update(&signed, &policy_2_of_2(), PRODUCT, 0)
            .unwrap_err()
            .code(),
        "malformed_manifest"
    );
    // An empty image.
    let m = manifest(PRODUCT, 2, b"");
    let signed = sign_bytes(&encode_manifest(&m), &both);
    assert_eq!(
        verify_update(&signed, &policy_2_of_2(), PRODUCT, 0)
            .unwrap_err()
            .code(),
        "malformed_manifest"
    );
    // An envelope that does not decode, or holds no manifest.
    assert_eq!(
        decode_signed_manifest(b"\x0a\xff").unwrap_err().code(),
        "malformed_manifest"
    );
    assert_eq!(
        decode_signed_manifest(b"").unwrap_err().code(),
        "malformed_manifest"
    );
    assert_eq!(
        decode_manifest(b"").unwrap_err().code(),
        "malformed_manifest"
    );
}

#[test]
fn image_size_and_hash() {
    let img = image(300);
    let m = manifest(PRODUCT, 2, &img);
    assert_eq!(
        verify_image(&m, &img[..299]).unwrap_err(),
        Rejection::SizeMismatch {
            expected: 300,
            actual: 299
        }
    );
    let mut altered = img.clone();
    altered[100] ^= 0x40;
    let err = verify_image(&m, &altered).unwrap_err();
    assert_eq!(err.code(), "hash_mismatch");
    assert!(err.to_string().contains(&hex::encode(&m.image_sha256)));
}

#[test]
fn one_of_two_accepts_either_key() {
    let k = keys();
    let policy = TrustPolicy::new(policy_2_of_2().keys().to_vec(), 1).expect("valid");
    for signer in [&k.customer, &k.cloud] {
        let signed = release(PRODUCT, 2, &image(10), &[signer]);
        verify_update(&signed, &policy, PRODUCT, 0).expect("one is enough");
    }
    let report = policy_2_of_2().evaluate(
        &release(PRODUCT, 2, &image(10), &[&k.cloud]).manifest,
        &release(PRODUCT, 2, &image(10), &[&k.cloud]).signatures,
    );
    // PSS is randomised but both signatures are over the same bytes only if
    // the manifests are equal: they are (same fields).
    assert!(!report.satisfied());
    assert_eq!(report.missing.len(), 1);
}

#[test]
fn signatures_verify_and_name_their_key() {
    let k = keys();
    let bytes = encode_manifest(&manifest(PRODUCT, 2, &image(10)));
    let sig = sign_manifest(&k.customer, &bytes).expect("sign");
    assert_eq!(sig.key_id, key_id(&k.customer.to_public_key()));
    assert_eq!(sig.key_id.len(), 64);
    verify_signature(&k.customer.to_public_key(), &bytes, &sig).expect("verifies");
    assert!(matches!(
        verify_signature(&k.cloud.to_public_key(), &bytes, &sig),
        Err(SignatureError::KeyIdMismatch { .. })
    ));
    let mut other = bytes.clone();
    other[0] ^= 1;
    assert!(matches!(
        verify_signature(&k.customer.to_public_key(), &other, &sig),
        Err(SignatureError::Invalid { .. })
    ));
    assert!(matches!(
        sign_manifest(&k.customer, b""),
        Err(SignError::Empty)
    ));
}

#[test]
fn short_keys_are_refused() {
    let short = PrivateKey::new(&mut rand::rng(), 1024).expect("1024");
    assert!(matches!(
        sign_manifest(&short, b"x"),
        Err(SignError::Key(KeyError::TooShort { bits: 1024 }))
    ));
    assert!(matches!(
        TrustedKey::new("short", short.to_public_key()),
        Err(PolicyError::Key(KeyError::TooShort { .. }))
    ));
}

#[test]
fn policy_json_round_trip_and_validation() {
    let k = keys();
    let policy = policy_2_of_2();
    let json = policy.to_json().expect("json");
    assert!(json.contains("BEGIN PUBLIC KEY"), "{json}");
    assert_eq!(TrustPolicy::from_json(&json).expect("parse"), policy);

    // key_id is optional on input and checked when present.
    let pem = public_key_to_pem(&k.customer.to_public_key()).expect("pem");
    assert_eq!(
        public_key_from_pem(&pem).expect("pem back"),
        k.customer.to_public_key()
    );
    let no_id =
        serde_json::json!({"threshold": 1, "keys": [{"name": "customer", "public_key": pem}]});
    let p = TrustPolicy::from_json(&no_id.to_string()).expect("no key_id");
    assert_eq!(p.keys()[0].key_id, key_id(&k.customer.to_public_key()));
    let wrong_id = serde_json::json!({"threshold": 1, "keys": [{"name": "customer", "key_id": "00", "public_key": pem}]});
    assert!(matches!(
        TrustPolicy::from_json(&wrong_id.to_string()),
        Err(PolicyError::KeyIdMismatch { .. })
    ));
    for threshold in [0, 2] {
        let j =
            serde_json::json!({"threshold": threshold, "keys": [{"name": "c", "public_key": pem}]});
        assert!(matches!(
            TrustPolicy::from_json(&j.to_string()),
            Err(PolicyError::Threshold { .. })
        ));
    }
    let dup = serde_json::json!({"threshold": 1, "keys": [{"name": "a", "public_key": pem}, {"name": "b", "public_key": pem}]});
    assert!(matches!(
        TrustPolicy::from_json(&dup.to_string()),
        Err(PolicyError::DuplicateKey { .. })
    ));
    let empty = serde_json::json!({"threshold": 1, "keys": []});
    assert!(matches!(
        TrustPolicy::from_json(&empty.to_string()),
        Err(PolicyError::NoKeys)
    ));
    let bad_pem =
        serde_json::json!({"threshold": 1, "keys": [{"name": "c", "public_key": "nope"}]});
    let err = TrustPolicy::from_json(&bad_pem.to_string()).unwrap_err();
    assert!(err.to_string().contains("\"c\""), "{err}");
    assert!(matches!(
        TrustPolicy::from_json("{"),
        Err(PolicyError::Json(_))
    ));
}

#[test]
fn no_policy_accepts_unsigned_firmware_however_it_is_made() {
    let k = keys();
    let customer = TrustedKey::new("customer", k.customer.to_public_key()).expect("key");
    // The constructor refuses every policy that could accept too little.
    assert!(matches!(
        TrustPolicy::new(vec![], 0),
        Err(PolicyError::NoKeys)
    ));
    assert!(matches!(
        TrustPolicy::new(vec![], 1),
        Err(PolicyError::NoKeys)
    ));
    assert!(matches!(
        TrustPolicy::new(vec![customer.clone()], 0),
        Err(PolicyError::Threshold {
            threshold: 0,
            keys: 1
        })
    ));
    assert!(matches!(
        TrustPolicy::new(vec![customer.clone()], 2),
        Err(PolicyError::Threshold {
            threshold: 2,
            keys: 1
        })
    ));
    assert!(matches!(
        TrustPolicy::new(vec![customer.clone(), customer.clone()], 1),
        Err(PolicyError::DuplicateKey { .. })
    ));
    let mut renamed = customer.clone();
    renamed.key_id = key_id(&k.cloud.to_public_key());
    assert!(matches!(
        TrustPolicy::new(vec![renamed], 1),
        Err(PolicyError::KeyIdMismatch { .. })
    ));

    // serde goes through the same checks as from_json.
    let good = policy_2_of_2();
    let value = serde_json::to_value(&good).expect("serialize");
    assert_eq!(value["threshold"], 2);
    assert_eq!(
        serde_json::from_value::<TrustPolicy>(value.clone()).expect("valid"),
        good
    );
    for bad in [
        serde_json::json!({"threshold": 0, "keys": []}),
        serde_json::json!({"threshold": 0, "keys": value["keys"].clone()}),
        serde_json::json!({"threshold": 3, "keys": value["keys"].clone()}),
    ] {
        let err = serde_json::from_value::<TrustPolicy>(bad.clone()).unwrap_err();
        assert!(
            err.to_string().contains("trusts no keys") || err.to_string().contains("threshold"),
            "{bad}: {err}"
        );
        assert!(TrustPolicy::from_json(&bad.to_string()).is_err(), "{bad}");
    }
    // Inside a larger document too (a device config holding its policy).
    #[derive(serde::Deserialize)]
    struct Device {
        #[allow(dead_code)]
        policy: TrustPolicy,
    }
    assert!(
        serde_json::from_value::<Device>(serde_json::json!({
            "policy": {"threshold": 0, "keys": []}
        }))
        .is_err()
    );

    // A report that asks for no signature (however it was put together) is
    // never met: unsigned firmware is refused, not accepted.
    let unsigned = release(PRODUCT, 2, &image(10), &[]);
    assert!(unsigned.signatures.is_empty());
    let report = trellis_firmware::PolicyReport {
        threshold: 0,
        valid: vec![],
        missing: vec![],
        invalid: vec![],
        unknown: vec![],
    };
    assert!(!report.satisfied());
    let err = report.into_result().unwrap_err();
    assert_eq!(err.code(), "invalid_trust_policy");
    assert!(err.to_string().contains("accepts no firmware"), "{err}");
    // And a valid policy refuses the unsigned release as it always did.
    assert_eq!(
        verify_update(&unsigned, &good, PRODUCT, 1)
            .unwrap_err()
            .code(),
        "insufficient_signatures"
    );
}

#[test]
fn event_data_carries_code_and_message() {
    let r = Rejection::Rollback {
        version: 3,
        floor: 5,
    };
    let data = r.event_data();
    assert_eq!(
        data,
        "rollback: version 3 is not above this device's version floor 5"
    );
    assert_eq!(
        parse_rejection_event(data.as_bytes()),
        Some(("rollback".into(), r.to_string()))
    );
    assert_eq!(parse_rejection_event(b"no colon"), None);
}

fn flip(bytes: &mut [u8], index: usize, bit: u8) {
    let i = index % bytes.len();
    bytes[i] ^= 1 << (bit % 8);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any single bit flipped in the signed manifest bytes, or in either
    /// signature, and the update is refused.
    #[test]
    fn any_flip_in_manifest_or_signature_fails(
        index in any::<usize>(),
        bit in any::<u8>(),
        target in 0usize..3,
    ) {
        let k = keys();
        static SIGNED: std::sync::OnceLock<trellis_firmware::SignedManifest> =
            std::sync::OnceLock::new();
        let signed = SIGNED
            .get_or_init(|| release(PRODUCT, 2, &image(700), &[&k.customer, &k.cloud]))
            .clone();
        prop_assert!(verify_update(&signed, &policy_2_of_2(), PRODUCT, 1).is_ok());
        let mut tampered = signed.clone();
        match target {
            0 => flip(&mut tampered.manifest, index, bit),
            n => flip(&mut tampered.signatures[n - 1].signature, index, bit),
        }
        let err = verify_update(&tampered, &policy_2_of_2(), PRODUCT, 1).unwrap_err();
        prop_assert_eq!(err.code(), "bad_signature");
    }
}
