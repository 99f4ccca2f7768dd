//! Signed commands through the REST API (issue 16): `signed_command`
//! (base64, as `trellis command sign` writes it) in the call body reaches
//! the device, which runs the call; without it, or replayed, the device's
//! refusal comes back as 403 with its reason; bytes that are not base64
//! are a 400 that says what to send.
mod common;

use common::json_of;

use base64::Engine;
use serde_json::{Value, json};
use trellis_firmware::command::{
    CommandEnvelope, CommandPolicy, Protected, SignedCommand, sign_command,
};
use trellis_firmware::{TrustPolicy, TrustedKey};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_calls_carry_signed_commands_to_the_device() -> anyhow::Result<()> {
    let f = common::Fixture::start().await?;
    let operator = rsa::PrivateKey::new(&mut rand::rng(), 2048)?;
    let release = rsa::PrivateKey::new(&mut rand::rng(), 2048)?;
    let commands = CommandPolicy::new(
        TrustPolicy::new(
            vec![TrustedKey::new("operator", operator.to_public_key())?],
            1,
        )?,
        Protected::Only(vec!["add".into()]),
        600_000,
    )?;
    let policy = TrustPolicy::new(
        vec![TrustedKey::new("release", release.to_public_key())?],
        1,
    )?
    .with_commands(Some(commands));
    let id = f
        .device_with_policy(&f.owner, 6, "sensor/temp", Some(&policy))
        .await?;
    let now = trellis_core::time::now_ms();
    let envelope = CommandEnvelope {
        organization: "default".into(),
        device_id: id.clone(),
        function: "add".into(),
        argument: "2,3".into(),
        not_before_ms: now - 1_000,
        expires_ms: now + 60_000,
        sequence: 1,
    };
    let signed = SignedCommand {
        envelope: envelope.to_bytes()?,
        signatures: vec![sign_command(&operator, &envelope)?],
    }
    .encode()?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&signed);
    let post = |body: Value| {
        f.http
            .post(f.url(&format!("/v1/devices/{id}/add")))
            .bearer_auth(&f.owner)
            .json(&body)
            .send()
    };

    let (status, body) = json_of(post(json!({"args": "2,3"})).await?).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["info"], "device refused: signature missing", "{body}");

    let (status, body) =
        json_of(post(json!({"args": "2,3", "signed_command": "not base64!"})).await?).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("base64")),
        "{body}"
    );

    let (status, body) = json_of(post(json!({"args": "2,3", "signed_command": b64})).await?).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["return_value"], 5);

    let (status, body) = json_of(post(json!({"args": "2,3", "signed_command": b64})).await?).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["info"], "device refused: replayed", "{body}");

    // An unprotected function needs nothing.
    let (status, body) = json_of(
        f.http
            .post(f.url(&format!("/v1/devices/{id}/led")))
            .bearer_auth(&f.owner)
            .json(&json!({"args": "on"}))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    f.stop().await;
    Ok(())
}
