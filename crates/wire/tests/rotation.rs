//! Byte-for-byte tests of the key rotation messages (docs/protocol.md
//! §6.7, §6.8) and of Hello extension 0x03, and the signature checks a
//! device and keyvault make on them.

use rsa::pkcs8::EncodePublicKey;
use trellis_wire::coap::{MessageType, code};
use trellis_wire::message::{self, Incoming, Request, classify};
use trellis_wire::rotation::{
    CLOUD_SIGNATURE_LEN, CloudKeyAnnouncement, DeviceKeyOffer, RotationError,
    cloud_key_signed_bytes, device_key_signed_bytes,
};
use trellis_wire::{DeviceId, Hello, MessageError};

fn hx(s: &str) -> Vec<u8> {
    hex::decode(s).expect("hex")
}

fn request(bytes: &[u8]) -> Request {
    let m = trellis_wire::CoapMessage::decode(bytes).expect("decodes");
    match classify(&m) {
        Ok(Incoming::Request(r)) => r,
        other => panic!("not a request: {other:?}"),
    }
}

#[test]
fn hello_extension_0x03_carries_the_cloud_key_version() {
    let id: DeviceId = "0123456789abcdef01234567".parse().expect("id");
    let hello = Hello {
        product_id: 6,
        firmware_version: 2,
        platform_id: 6,
        device_id: Some(id),
        cloud_key_version: Some(0x0102_0304),
        ..Hello::default()
    };
    let bytes = hello.encode();
    assert_eq!(
        bytes,
        hx("0006000200000006000c0123456789abcdef01234567030401020304")
    );
    assert_eq!(Hello::parse(&bytes).expect("parses"), hello);
    // After the firmware hash, in type order.
    let with_sha = Hello {
        firmware_sha256: Some([0xaa; 32]),
        cloud_key_version: Some(2),
        ..hello.clone()
    };
    let bytes = with_sha.encode();
    assert_eq!(&bytes[22..24], &[0x01, 32]);
    assert_eq!(&bytes[56..], &hx("030400000002")[..]);
    assert_eq!(Hello::parse(&bytes).expect("parses"), with_sha);
    // A legacy Hello has no version.
    let legacy = Hello::parse(&hx("0006000200000006000c0123456789abcdef01234567")).expect("ok");
    assert_eq!(legacy.cloud_key_version, None);
    // Wrong length: refused with the extension named.
    let err = Hello::parse(&hx("0006000200000006000c0123456789abcdef01234567030200 02"
        .replace(' ', "")
        .as_str()))
    .expect_err("length 2");
    assert!(
        matches!(
            err,
            MessageError::HelloExtensionLength {
                ext_type: 0x03,
                len: 2,
                expected: 4
            }
        ),
        "{err:?}"
    );
}

#[test]
fn rotation_messages_have_exact_bytes() {
    let payload = hx("00000002aabbcc");
    let ck = message::cloud_key_announcement(0x0005, 7, &payload);
    assert_eq!(ck.encode(), hx("4102000507b2636bff00000002aabbcc"));
    assert_eq!(request(&ck.encode()), Request::CloudKey(payload.clone()));

    let dk = message::device_key_rotate(0x1234, 9);
    assert_eq!(dk.encode(), hx("4102123409b2646b"));
    assert_eq!(request(&dk.encode()), Request::RotateDeviceKey);
    assert_eq!(Request::RotateDeviceKey.kind(), "rotate_device_key");

    let nk = message::device_key_commit(0x0001, 2, &[0x11; 32]);
    let mut want = hx("4102000102b26e6bff");
    want.extend_from_slice(&[0x11; 32]);
    assert_eq!(nk.encode(), want);
    assert_eq!(
        request(&nk.encode()),
        Request::CommitDeviceKey(vec![0x11; 32])
    );

    let changed = message::piggybacked(0x0005, &[7], code::CHANGED, b"");
    assert_eq!(changed.encode(), hx("6144000507"));
    assert_eq!(changed.mtype, MessageType::Acknowledgement);
    let refused = message::piggybacked(0x0005, &[7], code::FORBIDDEN, b"bad signature");
    let mut want = hx("6183000507ff");
    want.extend_from_slice(b"bad signature");
    assert_eq!(refused.encode(), want);
}

fn cloud_key() -> rsa::PrivateKey {
    rsa::PrivateKey::new(&mut rand::rng(), 2048).expect("key")
}

#[test]
fn announcement_layout_and_signature() {
    let old = cloud_key();
    let new = cloud_key();
    let der = new.to_public_key().to_public_key_der().expect("der");
    let a = CloudKeyAnnouncement::sign(&old, 2, der.as_bytes()).expect("signs");
    let bytes = a.encode();
    assert_eq!(&bytes[..4], &[0, 0, 0, 2]);
    assert_eq!(&bytes[4..bytes.len() - CLOUD_SIGNATURE_LEN], der.as_bytes());
    assert_eq!(bytes.len(), 4 + der.as_bytes().len() + 256);
    let mut signed = b"trellis-cloud-key-announcement-v1".to_vec();
    signed.extend_from_slice(&[0, 0, 0, 2]);
    signed.extend_from_slice(der.as_bytes());
    assert_eq!(cloud_key_signed_bytes(2, der.as_bytes()), signed);
    // PKCS#1 v1.5 SHA-256: deterministic, and what any RSA library makes.
    assert_eq!(
        CloudKeyAnnouncement::sign(&old, 2, der.as_bytes())
            .expect("signs")
            .signature,
        a.signature
    );

    let parsed = CloudKeyAnnouncement::parse(&bytes).expect("parses");
    assert_eq!(parsed, a);
    let key = parsed.verify(&old.to_public_key()).expect("verifies");
    assert_eq!(key, new.to_public_key());

    // Signed by a key that is not the session's: refused.
    let forged = CloudKeyAnnouncement::sign(&new, 2, der.as_bytes()).expect("signs");
    assert_eq!(
        forged.verify(&old.to_public_key()),
        Err(RotationError::BadSignature)
    );
    // A changed version breaks the signature.
    let mut bumped = a.clone();
    bumped.version = 3;
    assert_eq!(
        bumped.verify(&old.to_public_key()),
        Err(RotationError::BadSignature)
    );
    assert!(matches!(
        CloudKeyAnnouncement::parse(&[0; 260]),
        Err(RotationError::TooShort { .. })
    ));
}

#[test]
fn device_key_offer_layout_and_signature() {
    let id = DeviceId([3; 12]);
    let old = rsa::PrivateKey::new(&mut rand::rng(), 1024).expect("key");
    let new = rsa::PrivateKey::new(&mut rand::rng(), 1024).expect("key");
    let der = new.to_public_key().to_public_key_der().expect("der");
    let offer = DeviceKeyOffer::sign(&old, id, der.as_bytes()).expect("signs");
    let bytes = offer.encode();
    let len = der.as_bytes().len();
    assert_eq!(
        &bytes[..2],
        &u16::try_from(len).expect("fits").to_be_bytes()
    );
    assert_eq!(&bytes[2..2 + len], der.as_bytes());
    assert_eq!(bytes.len(), 2 + len + 128);
    let mut signed = b"trellis-device-key-rotation-v1".to_vec();
    signed.extend_from_slice(&[3; 12]);
    signed.extend_from_slice(der.as_bytes());
    assert_eq!(device_key_signed_bytes(id, der.as_bytes()), signed);

    let parsed = DeviceKeyOffer::parse(&bytes).expect("parses");
    assert_eq!(parsed, offer);
    assert_eq!(
        parsed.verify(&old.to_public_key(), id).expect("verifies"),
        new.to_public_key()
    );
    // Signed by the new key itself, or for another device: refused.
    let self_signed = DeviceKeyOffer::sign(&new, id, der.as_bytes()).expect("signs");
    assert_eq!(
        self_signed.verify(&old.to_public_key(), id),
        Err(RotationError::BadSignature)
    );
    assert_eq!(
        parsed.verify(&old.to_public_key(), DeviceId([4; 12])),
        Err(RotationError::BadSignature)
    );
    assert!(DeviceKeyOffer::parse(&[0, 200, 1, 2]).is_err());
}
