//! OpenSession over real gRPC against a real Redis.
mod common;

use common::*;
use std::time::{Duration, Instant};
use trellis_proto::v1::{self as pb, RefusalReason, open_session_response::Outcome};

fn request(nonce: &[u8; 40], ciphertext: Vec<u8>) -> pb::OpenSessionRequest {
    pb::OpenSessionRequest {
        nonce: nonce.to_vec(),
        ciphertext,
        gateway_id: "gw-test".into(),
        peer_addr: "192.0.2.7:40000".into(),
        cloud_key_version_hint: 0,
    }
}

async fn refusal(client: &mut Client, req: pb::OpenSessionRequest) -> pb::Refusal {
    match client
        .open_session(req)
        .await
        .expect("rpc")
        .into_inner()
        .outcome
    {
        Some(Outcome::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The most recently counted refusal (claiming `device_id`, or any).
async fn last_refusal(client: &mut Client, device_id: &str) -> pb::RefusalCount {
    client
        .list_refusals(pb::ListRefusalsRequest {
            limit: 1,
            device_id: device_id.into(),
        })
        .await
        .expect("refusals")
        .into_inner()
        .refusals
        .into_iter()
        .next()
        .expect("a refusal counted")
}

async fn last_audit(client: &mut Client, device_id: &str) -> pb::AuditRecord {
    let records = client
        .list_audit(pb::ListAuditRequest {
            limit: 1,
            device_id: device_id.into(),
        })
        .await
        .expect("audit")
        .into_inner()
        .records;
    records.into_iter().last().expect("an audit record")
}

#[tokio::test]
async fn full_handshake_grant_verifies_on_the_device() {
    let redis = start_redis();
    let mut kv = Keyvault::start(config(&redis, &master_hex(1)))
        .await
        .unwrap();
    let cloud = cloud_public_key(&mut kv.client).await;
    let device = Device::new();
    register(&mut kv.client, &device, 6).await;

    for offer in [Some(device.der.as_slice()), None] {
        let nonce = nonce();
        let ct = device.handshake(&cloud, &nonce, offer);
        let response = kv
            .client
            .open_session(request(&nonce, ct))
            .await
            .unwrap()
            .into_inner();
        let Some(Outcome::Granted(grant)) = response.outcome else {
            panic!("expected a grant, got {response:?}");
        };
        assert_eq!(grant.device_id, device.id_string());
        assert_eq!(grant.product_id, 6);
        assert_eq!(grant.organization, "default");
        assert_eq!(grant.session_material.len(), 40);
        assert_eq!(grant.reply.len(), 384);

        // What the device does with the 384 bytes (PROTOCOL.md step 4).
        let (c, s) = grant.reply.split_at(128);
        let material = device.key.decrypt(rsa::Pkcs1v15Encrypt, c).unwrap();
        assert_eq!(material, grant.session_material);
        let material = trellis_wire::SessionMaterial::from_bytes(&material).unwrap();
        let hmac = trellis_wire::handshake::session_hmac(&material, c);
        cloud
            .verify(rsa::Pkcs1v15Sign::new_unprefixed(), &hmac, s)
            .expect("signature verifies");
        // And the wire crate's own device-side check agrees.
        let reply: [u8; 384] = grant.reply.as_slice().try_into().unwrap();
        trellis_wire::handshake::verify_server_reply(&cloud, &device.key, &reply).unwrap();

        let audit = last_audit(&mut kv.client, &device.id_string()).await;
        assert_eq!(
            (
                audit.actor.as_str(),
                audit.action.as_str(),
                audit.outcome.as_str()
            ),
            ("gw-test", "open_session", "ok")
        );
        assert_eq!(
            audit.detail.get("peer_addr").map(String::as_str),
            Some("192.0.2.7:40000")
        );
    }
    kv.stop().await.unwrap();
}

#[tokio::test]
async fn refusals_are_answers_and_are_audited() {
    let redis = start_redis();
    let mut kv = Keyvault::start(config(&redis, &master_hex(2)))
        .await
        .unwrap();
    let cloud = cloud_public_key(&mut kv.client).await;

    // Unknown device: refused, offered key kept as pending, never trusted.
    let stranger = Device::new();
    let nonce = nonce();
    let r = refusal(
        &mut kv.client,
        request(
            &nonce,
            stranger.handshake(&cloud, &nonce, Some(&stranger.der)),
        ),
    )
    .await;
    assert_eq!(r.reason(), RefusalReason::UnknownDevice);
    assert_eq!(r.device_id, stranger.id_string());
    assert_eq!(
        last_refusal(&mut kv.client, &stranger.id_string())
            .await
            .reason,
        "unknown_device"
    );
    let mut conn = trellis_core::redis_conn::connect(&redis.url())
        .await
        .unwrap();
    let pending: std::collections::HashMap<String, String> = redis::AsyncCommands::hgetall(
        &mut conn,
        trellis_core::redis_conn::keys::pending_device(&stranger.id_string()),
    )
    .await
    .unwrap();
    assert_eq!(
        pending.get("public_key_der"),
        Some(&hex::encode(&stranger.der))
    );
    assert_eq!(
        pending.get("gateway_id").map(String::as_str),
        Some("gw-test")
    );
    let err = kv
        .client
        .get_device(pb::GetDeviceRequest {
            device_id: stranger.id_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::NotFound,
        "a pending key is not a registration"
    );

    // Key mismatch: the device offers a key other than its registered one.
    let device = Device::new();
    register(&mut kv.client, &device, 1).await;
    let other = Device::new();
    let nonce_a = common::nonce();
    let r = refusal(
        &mut kv.client,
        request(
            &nonce_a,
            device.handshake(&cloud, &nonce_a, Some(&other.der)),
        ),
    )
    .await;
    assert_eq!(r.reason(), RefusalReason::KeyMismatch);
    assert_eq!(
        last_refusal(&mut kv.client, &device.id_string())
            .await
            .reason,
        "key_mismatch"
    );

    // Wrong nonce and bad padding: indistinguishable.
    let sent = common::nonce();
    let echoed = common::nonce();
    let wrong_nonce = refusal(
        &mut kv.client,
        request(&sent, device.handshake(&cloud, &echoed, None)),
    )
    .await;
    let counted = last_refusal(&mut kv.client, "").await;
    assert_eq!(
        (counted.reason.as_str(), counted.last_device_id.as_str()),
        ("bad_handshake", "")
    );
    let mut garbage = vec![0u8; 256];
    trellis_keyvault::os_random(&mut garbage).unwrap();
    garbage[0] &= 0x7f; // below the modulus, so only the padding is wrong
    let bad_padding = refusal(&mut kv.client, request(&sent, garbage)).await;
    let counted = last_refusal(&mut kv.client, "").await;
    assert_eq!(
        (counted.reason.as_str(), counted.last_device_id.as_str()),
        ("bad_handshake", "")
    );
    assert_eq!(wrong_nonce.reason(), RefusalReason::BadHandshake);
    assert_eq!(wrong_nonce, bad_padding, "no padding oracle");
    // Even a ciphertext above the modulus gets the same answer.
    let above = refusal(&mut kv.client, request(&sent, vec![0xff; 256])).await;
    assert_eq!(above, wrong_nonce);

    // Revoked.
    kv.client
        .revoke_device(pb::RevokeDeviceRequest {
            device_id: device.id_string(),
            reason: "stolen".into(),
        })
        .await
        .unwrap();
    let nonce_b = common::nonce();
    let r = refusal(
        &mut kv.client,
        request(
            &nonce_b,
            device.handshake(&cloud, &nonce_b, Some(&device.der)),
        ),
    )
    .await;
    assert_eq!(r.reason(), RefusalReason::Revoked);
    assert_eq!(
        last_refusal(&mut kv.client, &device.id_string())
            .await
            .reason,
        "revoked"
    );

    // Malformed requests are the gateway's bug: INVALID_ARGUMENT.
    let err = kv
        .client
        .open_session(request(&sent, vec![0; 255]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let mut short_nonce = request(&sent, vec![0; 256]);
    short_nonce.nonce.pop();
    let err = kv.client.open_session(short_nonce).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    kv.stop().await.unwrap();
}

#[tokio::test]
async fn full_queue_answers_resource_exhausted_at_once() {
    let redis = start_redis();
    let mut config = config(&redis, &master_hex(3));
    config.keyvault.workers = 1;
    config.keyvault.queue_depth = 1;
    let kv = Keyvault::start(config).await.unwrap();

    let nonce = common::nonce();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let mut client = kv.client.clone();
        let mut ct = vec![0u8; 256];
        trellis_keyvault::os_random(&mut ct).unwrap();
        ct[0] &= 0x7f;
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = client.open_session(request(&nonce, ct)).await;
            (r.map(|_| ()), t.elapsed())
        }));
    }
    let mut exhausted = 0;
    let mut served = 0;
    for t in tasks {
        let (result, elapsed) = t.await.unwrap();
        match result {
            Ok(()) => served += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
                assert!(
                    status.message().contains("queue_depth"),
                    "{}",
                    status.message()
                );
                assert!(elapsed < Duration::from_secs(5), "refusal took {elapsed:?}");
                exhausted += 1;
            }
        }
    }
    assert!(
        exhausted > 0,
        "200 concurrent requests never filled a queue of 1"
    );
    assert!(served > 0);
    assert!(started.elapsed() < Duration::from_secs(20));
    kv.stop().await.unwrap();
}
