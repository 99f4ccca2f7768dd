//! Keys generated once per test binary (RSA-2048 generation is the slow
//! part), and releases signed with them.
#![allow(dead_code)]

use std::sync::OnceLock;

use rsa::PrivateKey;
use trellis_firmware::{
    FirmwareManifest, SignedManifest, TrustPolicy, TrustedKey, build_manifest, encode_manifest,
    encode_signed_manifest, sign_manifest,
};

pub struct Keys {
    pub customer: PrivateKey,
    pub cloud: PrivateKey,
    pub attacker: PrivateKey,
}

pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut rng = rand::rng();
        Keys {
            customer: PrivateKey::new(&mut rng, 2048).expect("customer key"),
            cloud: PrivateKey::new(&mut rng, 2048).expect("cloud key"),
            attacker: PrivateKey::new(&mut rng, 2048).expect("attacker key"),
        }
    })
}

pub const PRODUCT: u32 = 6;

/// Customer key AND cloud release key.
pub fn policy_2_of_2() -> TrustPolicy {
    let k = keys();
    TrustPolicy::new(
        vec![
            TrustedKey::new("customer", k.customer.to_public_key()).expect("customer"),
            TrustedKey::new("cloud-release", k.cloud.to_public_key()).expect("cloud"),
        ],
        2,
    )
    .expect("policy")
}

pub fn image(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

pub fn manifest(product: u32, version: u32, image: &[u8]) -> FirmwareManifest {
    build_manifest(product, version, image, 1_700_000_000_000, "acme")
}

/// Signs the encoded manifest with each key.
pub fn sign_bytes(manifest_bytes: &[u8], signers: &[&PrivateKey]) -> SignedManifest {
    SignedManifest {
        manifest: manifest_bytes.to_vec(),
        signatures: signers
            .iter()
            .map(|k| sign_manifest(k, manifest_bytes).expect("sign"))
            .collect(),
    }
}

pub fn release(
    product: u32,
    version: u32,
    image: &[u8],
    signers: &[&PrivateKey],
) -> SignedManifest {
    sign_bytes(
        &encode_manifest(&manifest(product, version, image)),
        signers,
    )
}

pub fn release_bytes(product: u32, version: u32, image: &[u8], signers: &[&PrivateKey]) -> Vec<u8> {
    encode_signed_manifest(&release(product, version, image, signers))
}
