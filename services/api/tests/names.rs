//! Device names and signal through the REST API (Particle's rename and
//! nyan): a name works wherever an id does, only within its organisation,
//! is unique there, and `signal` reaches the device and comes back
//! acknowledged.
mod common;

use common::json_of;

use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn names_work_wherever_ids_do_and_signal_reaches_the_device() -> anyhow::Result<()> {
    let f = common::Fixture::start().await?;
    let id = f.device(&f.owner, 6, "sensor/temp").await?;
    let other = f.device(&f.owner, 6, "sensor/temp").await?;
    let put = |device: &str, body: Value| {
        f.http
            .put(f.url(&format!("/v1/devices/{device}")))
            .bearer_auth(&f.owner)
            .json(&body)
            .send()
    };

    let (status, body) = json_of(put(&id, json!({"name": "lobby-valve"})).await?).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "lobby-valve");
    assert_eq!(body["id"], id.as_str());

    // The name in place of the id: details, list, call.
    let (status, got) = json_of(
        f.http
            .get(f.url("/v1/devices/lobby-valve"))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["name"], "lobby-valve");
    let (_, list) = json_of(
        f.http
            .get(f.url("/v1/devices"))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert!(
        list.as_array().is_some_and(|l| l
            .iter()
            .any(|d| d["id"] == id.as_str() && d["name"] == "lobby-valve")),
        "{list}"
    );
    let (status, call) = json_of(
        f.http
            .post(f.url("/v1/devices/lobby-valve/add"))
            .bearer_auth(&f.owner)
            .json(&json!({"args": "2,3"}))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{call}");
    assert_eq!(call["return_value"], 5);

    // Unique in the organisation; a bad name is a 400 saying why.
    let (status, body) = json_of(put(&other, json!({"name": "LOBBY-valve"})).await?).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = json_of(put(&other, json!({"name": "no spaces"})).await?).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("letters")),
        "{body}"
    );

    // Another organisation does not see the name.
    let stranger = f.org("elsewhere").await?;
    let (status, body) = json_of(
        f.http
            .get(f.url("/v1/devices/lobby-valve"))
            .bearer_auth(&stranger)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 403, "{body}");

    // Signal on and off, by name; the device acknowledges each.
    for (signal, on) in [("1", true), ("0", false)] {
        let (status, body) = json_of(put("lobby-valve", json!({"signal": signal})).await?).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["signaling"], on);
    }
    let (status, body) = json_of(put(&id, json!({"signal": "rainbow"})).await?).await;
    assert_eq!(status, 400, "{body}");
    f.stop().await;
    Ok(())
}
