//! The device registry over real gRPC.
mod common;

use common::*;
use trellis_proto::v1 as pb;

fn req(device_id: &str, product_id: u32, key: Vec<u8>) -> pb::RegisterDeviceRequest {
    pb::RegisterDeviceRequest {
        device_id: device_id.into(),
        product_id,
        public_key: key,
        organization: String::new(),
    }
}

/// The device's newest audit records (at most 10), oldest first.
async fn audit_of(c: &mut Client, device_id: &str) -> Vec<pb::AuditRecord> {
    c.list_audit(pb::ListAuditRequest {
        limit: 10,
        device_id: device_id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .records
}

#[tokio::test]
async fn register_get_list_revoke() {
    let redis = start_redis();
    let mut kv = Keyvault::start(config(&redis, &master_hex(7)))
        .await
        .unwrap();
    let c = &mut kv.client;
    let a = Device::new();
    let b = Device::new();

    // Bad ids.
    for bad in [
        "",
        "abc",
        "zz0000000000000000000000",
        "00112233445566778899aabbcc",
    ] {
        let err = c
            .register_device(req(bad, 1, a.der.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        assert!(err.message().contains("24 hex"), "{}", err.message());
    }
    // Bad keys: empty, garbage, not RSA-1024.
    let err = c
        .register_device(req(&a.id_string(), 1, vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("public_key"), "{}", err.message());
    let err = c
        .register_device(req(&a.id_string(), 1, b"not a key".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("BEGIN PUBLIC KEY"),
        "{}",
        err.message()
    );
    let cloud_der = c
        .get_cloud_public_key(pb::GetCloudPublicKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .public_key_der;
    let err = c
        .register_device(req(&a.id_string(), 1, cloud_der))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("RSA-2048"), "{}", err.message());

    // PEM works, upper-case ids are normalised, re-registering is idempotent.
    let pem = {
        use rsa::pkcs8::EncodePublicKey;
        a.key
            .to_public_key()
            .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap()
    };
    let first = c
        .register_device(req(&a.id_string().to_uppercase(), 5, pem.into_bytes()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.device_id, a.id_string());
    assert_eq!(first.public_key_der, a.der);
    assert_eq!(first.organization, "default");
    assert!(!first.revoked);
    let again = c
        .register_device(req(&a.id_string(), 5, a.der.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first);
    // A different key for a live device is refused.
    let err = c
        .register_device(req(&a.id_string(), 5, b.der.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("revoke"), "{}", err.message());

    register(c, &b, 9).await;
    let all = c
        .list_devices(pb::ListDevicesRequest { product_id: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.devices.len(), 2);
    let nine = c
        .list_devices(pb::ListDevicesRequest { product_id: 9 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nine.devices.len(), 1);
    assert_eq!(nine.devices[0].device_id, b.id_string());

    let got = c
        .get_device(pb::GetDeviceRequest {
            device_id: b.id_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.product_id, 9);
    let err = c
        .get_device(pb::GetDeviceRequest {
            device_id: "00".repeat(12),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Revoke: kept, marked; twice is fine; unknown is NOT_FOUND.
    let revoked = c
        .revoke_device(pb::RevokeDeviceRequest {
            device_id: a.id_string(),
            reason: "lost".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);
    assert!(revoked.revoked_at_ms > 0);
    let twice = c
        .revoke_device(pb::RevokeDeviceRequest {
            device_id: a.id_string(),
            reason: "again".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(twice, revoked);
    let err = c
        .revoke_device(pb::RevokeDeviceRequest {
            device_id: "00".repeat(12),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // The revoked key is never trusted again; a new key re-enables the device.
    let err = c
        .register_device(req(&a.id_string(), 5, a.der.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let rekeyed = Device::new();
    let back = c
        .register_device(req(&a.id_string(), 5, rekeyed.der.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(!back.revoked);
    assert_eq!(back.public_key_der, rekeyed.der);

    // Every change is audited with the authenticated caller as actor: with
    // auth off (these tests), the stand-in that says nobody was checked.
    let audit = audit_of(c, &a.id_string()).await;
    let seen: Vec<(&str, &str, &str)> = audit
        .iter()
        .map(|r| (r.actor.as_str(), r.action.as_str(), r.outcome.as_str()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("unauthenticated@default", "register", "ok"),
            ("unauthenticated@default", "revoke", "ok"),
            ("unauthenticated@default", "register", "replaced_revoked"),
        ]
    );
    kv.stop().await.unwrap();
}

#[tokio::test]
async fn redis_going_away_is_unavailable_not_a_panic() {
    let mut redis = start_redis();
    let mut kv = Keyvault::start(config(&redis, &master_hex(8)))
        .await
        .unwrap();
    redis.kill();
    let err = kv
        .client
        .list_devices(pb::ListDevicesRequest { product_id: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("redis"), "{}", err.message());
    // The server is still up.
    kv.client
        .get_cloud_public_key(pb::GetCloudPublicKeyRequest {})
        .await
        .unwrap();
    kv.stop().await.unwrap();
}

#[tokio::test]
async fn tags_are_set_normalised_validated_and_audited() {
    let redis = start_redis();
    let mut kv = Keyvault::start(config(&redis, &master_hex(8)))
        .await
        .unwrap();
    let c = &mut kv.client;
    let a = Device::new();
    c.register_device(req(&a.id_string(), 3, a.der.clone()))
        .await
        .unwrap();
    let set = |tags: &[&str]| pb::SetDeviceTagsRequest {
        device_id: a.id_string(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    };

    // Lowercased, sorted, duplicates folded; GetDevice shows the same.
    let d = c
        .set_device_tags(set(&["Site-A", "lobby", "site-a", "rev.2_b"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.tags, vec!["lobby", "rev.2_b", "site-a"]);
    let got = c
        .get_device(pb::GetDeviceRequest {
            device_id: a.id_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.tags, d.tags);

    // Bad tags are refused and change nothing.
    for bad in ["a,b", "", "with space", "ünï"] {
        let err = c.set_device_tags(set(&[bad])).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
    }
    let many: Vec<String> = (0..17).map(|i| format!("t{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let err = c.set_device_tags(set(&refs)).await.unwrap_err();
    assert!(err.message().contains("at most 16"), "{}", err.message());
    let unchanged = c
        .get_device(pb::GetDeviceRequest {
            device_id: a.id_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.tags, vec!["lobby", "rev.2_b", "site-a"]);

    // An unknown device: NOT_FOUND. An empty set clears the tags.
    let err = c
        .set_device_tags(pb::SetDeviceTagsRequest {
            device_id: Device::new().id_string(),
            tags: vec!["x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let cleared = c.set_device_tags(set(&[])).await.unwrap().into_inner();
    assert!(cleared.tags.is_empty());

    let audit = audit_of(c, &a.id_string()).await;
    let actions: Vec<&str> = audit.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, vec!["register", "set_tags", "set_tags"]);
    kv.stop().await.unwrap();
}

#[tokio::test]
async fn names_are_unique_resolve_to_ids_and_are_freed_by_delete() {
    let redis = start_redis();
    let mut kv = Keyvault::start(config(&redis, &master_hex(8)))
        .await
        .unwrap();
    let c = &mut kv.client;
    let (a, b) = (Device::new(), Device::new());
    for d in [&a, &b] {
        c.register_device(req(&d.id_string(), 3, d.der.clone()))
            .await
            .unwrap();
    }
    let name = |d: &Device, n: &str| pb::SetDeviceNameRequest {
        device_id: d.id_string(),
        name: n.into(),
    };
    let named = c
        .set_device_name(name(&a, "lobby-plant_1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(named.name, "lobby-plant_1");
    // A name stands for the id wherever GetDevice takes one, any case.
    for n in ["lobby-plant_1", "LOBBY-PLANT_1"] {
        let got = c
            .get_device(pb::GetDeviceRequest {
                device_id: n.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.device_id, a.id_string());
        assert_eq!(got.name, "lobby-plant_1");
    }
    // Unique within the organisation, whatever the case.
    let taken = c
        .set_device_name(name(&b, "Lobby-Plant_1"))
        .await
        .unwrap_err();
    assert_eq!(taken.code(), tonic::Code::FailedPrecondition, "{taken:?}");
    // Invalid names, and a name that reads as an id, are refused.
    for bad in [
        "with space",
        "ünï",
        &"x".repeat(65),
        "0123456789abcdef01234567",
    ] {
        let err = c.set_device_name(name(&b, bad)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
    }
    // Renaming frees the old name; an unknown name is NOT_FOUND.
    c.set_device_name(name(&a, "atrium")).await.unwrap();
    let gone = c
        .get_device(pb::GetDeviceRequest {
            device_id: "lobby-plant_1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    c.set_device_name(name(&b, "lobby-plant_1")).await.unwrap();
    // Deleting a device frees its name.
    c.delete_device(pb::DeleteDeviceRequest {
        device_id: a.id_string(),
        reason: "test".into(),
    })
    .await
    .unwrap();
    c.set_device_name(name(&b, "atrium")).await.unwrap();
    let audit = audit_of(c, &b.id_string()).await;
    assert!(audit.iter().any(|r| r.action == "set_name"), "{audit:?}");
    kv.stop().await.unwrap();
}
