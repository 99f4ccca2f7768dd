//! A keyvault with the wrong master key refuses to start and leaves the
//! sealed cloud key alone; the right key still opens it afterwards.
mod common;

use common::*;
use trellis_keyvault::cloud_key;

#[tokio::test]
async fn wrong_master_key_refuses_to_start_and_keeps_the_record() {
    let redis = start_redis();
    let mut kv = Keyvault::start(config(&redis, &master_hex(0x11)))
        .await
        .unwrap();
    let before = kv
        .client
        .get_cloud_public_key(trellis_proto::v1::GetCloudPublicKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.version, 1);
    assert_eq!(
        before.key_id,
        trellis_core::keys::key_id(&before.public_key_der)
    );
    kv.stop().await.unwrap();

    let mut conn = trellis_core::redis_conn::connect(&redis.url())
        .await
        .unwrap();
    let raw = |conn: &mut trellis_core::redis_conn::Redis| {
        let mut conn = conn.clone();
        async move {
            redis::AsyncCommands::get::<_, Option<String>>(
                &mut conn,
                trellis_core::redis_conn::keys::CLOUD_KEY,
            )
            .await
            .unwrap()
            .expect("a stored cloud key")
        }
    };
    let stored = raw(&mut conn).await;
    let record = cloud_key::read_record(&mut conn).await.unwrap().unwrap();
    assert_eq!(record.key_id, before.key_id);

    // Through the real entry point.
    let err = match Keyvault::start(config(&redis, &master_hex(0x22))).await {
        Ok(_) => panic!("keyvault started with the wrong master key"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(&before.key_id), "{err}");
    assert!(err.contains("master key"), "{err}");
    assert_eq!(
        raw(&mut conn).await,
        stored,
        "the stored record must not change"
    );

    // No master key at all: says how to make one.
    let mut none = config(&redis, "");
    none.keyvault.master_key = None;
    let err = format!("{:#}", trellis_keyvault::build(&none).await.unwrap_err());
    assert!(err.contains("openssl rand -hex 32"), "{err}");

    // The right key still works, and it is the same cloud key.
    let mut kv = Keyvault::start(config(&redis, &master_hex(0x11)))
        .await
        .unwrap();
    let after = kv
        .client
        .get_cloud_public_key(trellis_proto::v1::GetCloudPublicKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, before);
    assert_eq!(raw(&mut conn).await, stored);
    kv.stop().await.unwrap();
}

#[tokio::test]
async fn two_keyvaults_starting_at_once_keep_one_cloud_key() {
    let redis = start_redis();
    let config = config(&redis, &master_hex(0x33));
    let (a, b) = tokio::join!(
        trellis_keyvault::build(&config),
        trellis_keyvault::build(&config)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    use trellis_proto::v1::key_vault_server::KeyVault;
    let ka = a
        .get_cloud_public_key(tonic::Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    let kb = b
        .get_cloud_public_key(tonic::Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ka, kb);
}

#[tokio::test]
async fn missing_redis_url_is_a_clear_error() {
    let mut config = trellis_core::Config::default();
    config.auth.mode = trellis_core::config::AuthMode::Off;
    config.tls.mode = trellis_core::config::TlsMode::Off;
    config.keyvault.master_key = Some(master_hex(1));
    let err = format!("{:#}", trellis_keyvault::build(&config).await.unwrap_err());
    assert!(err.contains("TRELLIS_REDIS__URL"), "{err}");
}
