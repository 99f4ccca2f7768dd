//! Fixed inputs the targets need and a fuzzer cannot make: the published
//! test keys and the handshake of `tests/vectors/protocol-v1.json`, and a
//! small firmware release signed with the vectors' 2048-bit cloud key.

use std::sync::OnceLock;

use rsa::PrivateKey;
use trellis_firmware::manifest::{
    SignedManifest, build_manifest, encode_manifest, encode_signed_manifest,
};
use trellis_firmware::{TrustPolicy, TrustedKey, private_key_from_pem, sign_manifest};
use trellis_wire::{NONCE_LEN, SERVER_REPLY_LEN, SESSION_MATERIAL_LEN};

const PROTOCOL_V1: &str = include_str!("../../tests/vectors/protocol-v1.json");

/// The product the firmware releases are for.
pub const PRODUCT_ID: u32 = 6;
/// Releases must be above this version.
pub const VERSION_FLOOR: u32 = 1;

pub struct Frame {
    pub from_device: bool,
    pub coap: Vec<u8>,
    pub frame: Vec<u8>,
}

/// One signed release: the image, the manifest bytes and the envelope.
pub struct Release {
    pub image: Vec<u8>,
    pub manifest: Vec<u8>,
    pub signed: SignedManifest,
    pub signed_bytes: Vec<u8>,
}

pub struct Vectors {
    pub cloud_key: PrivateKey,
    pub cloud_public_pem: String,
    pub device_public_pem: String,
    pub nonce: [u8; NONCE_LEN],
    pub device_plaintext: Vec<u8>,
    pub device_ciphertext: Vec<u8>,
    pub session_material: [u8; SESSION_MATERIAL_LEN],
    pub server_reply: [u8; SERVER_REPLY_LEN],
    pub conversation: Vec<Frame>,
    /// The policy a device is provisioned with: the cloud key, threshold 1.
    pub policy: TrustPolicy,
    /// [0] valid (product 6, version 2, 300 bytes); [1] for product 7;
    /// [2] version 1, at the floor (a rollback).
    pub releases: Vec<Release>,
}

fn hex_field(v: &serde_json::Value, key: &str) -> Vec<u8> {
    hex::decode(v[key].as_str().expect(key)).expect(key)
}

fn release(key: &PrivateKey, product: u32, version: u32, image: Vec<u8>) -> Release {
    let manifest = encode_manifest(&build_manifest(
        product,
        version,
        &image,
        1_700_000_000_000,
        "fuzz",
    ));
    let signature = sign_manifest(key, &manifest).expect("sign");
    let signed = SignedManifest {
        manifest: manifest.clone(),
        signatures: vec![signature],
    };
    let signed_bytes = encode_signed_manifest(&signed);
    Release {
        image,
        manifest,
        signed,
        signed_bytes,
    }
}

fn load() -> Vectors {
    let v: serde_json::Value = serde_json::from_str(PROTOCOL_V1).expect("protocol-v1.json");
    let cloud_key =
        private_key_from_pem(v["cloud_private_pem"].as_str().expect("pem")).expect("cloud key");
    let conversation = v["conversation"]
        .as_array()
        .expect("conversation")
        .iter()
        .map(|m| Frame {
            from_device: m["from"] == "device",
            coap: hex_field(m, "coap"),
            frame: hex_field(m, "frame"),
        })
        .collect();
    let device_ciphertext = hex_field(&v, "device_ciphertext");
    let device_plaintext = hex_field(&v, "device_plaintext");
    let decrypted = cloud_key
        .decrypt(rsa::Pkcs1v15Encrypt, &device_ciphertext)
        .expect("decrypt the vectors' ciphertext");
    assert_eq!(decrypted, device_plaintext, "the vectors' plaintext");
    let cloud_public = cloud_key.to_public_key();
    let policy = TrustPolicy::new(
        vec![TrustedKey::new("cloud-release", cloud_public).expect("trusted key")],
        1,
    )
    .expect("policy");
    let image: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
    let releases = vec![
        release(&cloud_key, PRODUCT_ID, 2, image.clone()),
        release(&cloud_key, PRODUCT_ID + 1, 2, image.clone()),
        release(&cloud_key, PRODUCT_ID, VERSION_FLOOR, image),
    ];
    Vectors {
        cloud_public_pem: v["cloud_public_pem"].as_str().expect("pem").to_owned(),
        device_public_pem: v["device_public_pem"].as_str().expect("pem").to_owned(),
        nonce: hex_field(&v, "nonce").try_into().expect("nonce"),
        device_plaintext,
        device_ciphertext,
        session_material: hex_field(&v, "session_material")
            .try_into()
            .expect("material"),
        server_reply: hex_field(&v, "server_reply").try_into().expect("reply"),
        conversation,
        policy,
        releases,
        cloud_key,
    }
}

/// Loaded once per process (signing three releases takes a few ms).
pub fn get() -> &'static Vectors {
    static V: OnceLock<Vectors> = OnceLock::new();
    V.get_or_init(load)
}

impl Vectors {
    /// The device's frames of the conversation, back to back, as the
    /// server reads them after the handshake.
    pub fn device_stream(&self) -> Vec<u8> {
        self.stream(true)
    }

    pub fn stream(&self, from_device: bool) -> Vec<u8> {
        self.conversation
            .iter()
            .filter(|f| f.from_device == from_device)
            .flat_map(|f| f.frame.iter().copied())
            .collect()
    }

    pub fn session_key_iv(&self) -> ([u8; 16], [u8; 16]) {
        let m = &self.session_material;
        (
            m[..16].try_into().expect("key"),
            m[16..32].try_into().expect("iv"),
        )
    }
}
