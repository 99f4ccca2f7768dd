//! Master key rewrap: interrupted half way (one key re-sealed, the others
//! not) and run again, every key (every cloud and release key version too)
//! opens under
//! the new master key and none
//! under the old; the keys themselves never change; a wrong old key
//! changes nothing; keyvault then starts with the new key only.
mod common;

use common::*;
use trellis_keyvault::cloud_key::{self, read_record_in};
use trellis_keyvault::cloud_keys;
use trellis_keyvault::keyring;
use trellis_keyvault::master_key::MasterKey;
use trellis_keyvault::release_key;
use trellis_keyvault::rewrap::{Outcome, RewrapError, SLOTS, rewrap_all, rewrap_slot, slots};

fn key(byte: u8) -> MasterKey {
    MasterKey::from_bytes([byte; 32])
}

#[tokio::test]
async fn an_interrupted_rewrap_resumes_and_every_key_opens() {
    let redis = start_redis();
    let (old, new) = (key(0x11), key(0x22));
    let mut conn = trellis_core::redis_conn::connect(&redis.url())
        .await
        .unwrap();
    // What keyvault made at its first start, under the old key.
    let mut public = Vec::new();
    for slot in SLOTS {
        let made = cloud_key::load_or_create_in(&mut conn, slot, &old)
            .await
            .unwrap();
        public.push(made.key_id.clone());
    }
    // A rotated cloud key: version 2, sealed under the old key too.
    let ring = cloud_keys::SharedKeyring::new(
        &cloud_keys::CLOUD,
        cloud_keys::load(&mut conn, &old, None).await.unwrap(),
        std::sync::Arc::new(key(0x11)),
    );
    let v2 = cloud_keys::rotate(&mut conn, &ring, "test").await.unwrap();
    assert_eq!(v2.version, 2);
    public.push(v2.key_id.clone());
    // A rotated release key: version 2, under the old key too.
    let release = release_key::SharedReleaseKeyring::new(
        &release_key::RELEASE,
        release_key::load(&mut conn, &old).await.unwrap(),
        std::sync::Arc::new(key(0x11)),
    );
    let r2 = keyring::rotate(&mut conn, &release, "test").await.unwrap();
    assert_eq!(r2.version, 2);
    public.push(r2.key_id.clone());
    let all = slots(&mut conn).await.unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all[2].location, "trellis:cloudkey:v2");
    assert_eq!(all[3].location, "trellis:releasekey:v2");

    // A wrong "old" key: refused before anything is written.
    let before: Vec<_> = {
        let mut v = Vec::new();
        for slot in all.iter().copied() {
            v.push(read_record_in(&mut conn, slot).await.unwrap());
        }
        v
    };
    let err = rewrap_all(&mut conn, &key(0x33), &new, "test", |_, _| {})
        .await
        .expect_err("a wrong current master key");
    assert!(matches!(err, RewrapError::Key(_)), "{err}");
    for (slot, was) in all.iter().zip(&before) {
        assert_eq!(
            &read_record_in(&mut conn, *slot).await.unwrap(),
            was,
            "{}",
            slot.what
        );
    }
    assert!(matches!(
        rewrap_all(&mut conn, &old, &key(0x11), "test", |_, _| {}).await,
        Err(RewrapError::SameKey)
    ));

    // Interrupted after the first key.
    assert_eq!(
        rewrap_slot(&mut conn, SLOTS[0], &old, &new).await.unwrap(),
        Outcome::Rewrapped
    );
    // Resumed: the first is left alone, the second re-sealed.
    let mut seen = Vec::new();
    let done = rewrap_all(&mut conn, &old, &new, "test", |slot, outcome| {
        seen.push((slot.what, outcome.clone()))
    })
    .await
    .unwrap();
    assert_eq!(done.len(), 4);
    assert_eq!(
        seen,
        [
            (SLOTS[0].what, Outcome::AlreadyNew),
            (SLOTS[1].what, Outcome::Rewrapped),
            (all[2].what, Outcome::Rewrapped),
            (all[3].what, Outcome::Rewrapped)
        ]
    );
    for (slot, key_id) in all.iter().zip(&public) {
        let record = read_record_in(&mut conn, *slot).await.unwrap().unwrap();
        let opened = record
            .open_in(*slot, &new)
            .expect("opens under the new key");
        assert_eq!(&opened.key_id, key_id, "the {} itself changed", slot.what);
        assert!(
            record.open_in(*slot, &old).is_err(),
            "the old key still opens the {}",
            slot.what
        );
    }
    // Once more: nothing to do.
    let again = rewrap_all(&mut conn, &old, &new, "test", |_, _| {})
        .await
        .unwrap();
    assert!(again.iter().all(|(_, o)| *o == Outcome::AlreadyNew));

    // keyvault: the new key starts, the old one is refused.
    let refused = Keyvault::start(config(&redis, &master_hex(0x11))).await;
    assert!(refused.is_err(), "keyvault started with the old master key");
    let mut kv = Keyvault::start(config(&redis, &master_hex(0x22)))
        .await
        .unwrap();
    let cloud = kv
        .client
        .get_cloud_public_key(trellis_proto::v1::GetCloudPublicKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    // Version 2 is the current one, and it opened under the new key.
    assert_eq!(cloud.key_id, public[2]);
    assert_eq!(cloud.version, 2);
    // Release key version 2 is the current one, opened under the new key.
    let release = kv
        .client
        .get_signing_key(trellis_proto::v1::GetSigningKeyRequest {
            purpose: "release".into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (release.key_id.as_str(), release.version),
        (public[3].as_str(), 2)
    );
    assert!(release.current);
    kv.stop().await.unwrap();
}
