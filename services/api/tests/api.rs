//! The Particle-compatible API over real HTTP against real services (tokens
//! on), a real redis-server and simulated devices running the demo app.
mod common;

use common::json_of;

use common::Fixture;
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_functions_and_variables() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let id = f.device(&f.owner, 6, "temperature").await?;

    // List: an array with the device, no functions or variables.
    let (status, list) = json_of(
        f.http
            .get(f.url("/v1/devices"))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    let entry = list
        .as_array()
        .and_then(|a| a.iter().find(|d| d["id"] == id.as_str()))
        .unwrap_or_else(|| panic!("device {id} not listed: {list}"));
    assert_eq!(entry["connected"], true);
    assert_eq!(entry["product_id"], 6);
    assert_eq!(entry["platform_id"], 6);
    assert!(entry.get("functions").is_none(), "{entry}");

    // Details: functions and variables with their types.
    let (status, device) = json_of(
        f.http
            .get(f.url(&format!("/v1/devices/{}", id.to_uppercase())))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{device}");
    assert_eq!(device["id"], id.as_str());
    assert!(
        device["functions"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("add"))),
        "{device}"
    );
    assert_eq!(device["variables"]["temp"], "double");
    assert_eq!(device["variables"]["uptime"], "int32");

    // A function call: JSON `args` in, `return_value` out.
    let (status, call) = json_of(
        f.http
            .post(f.url(&format!("/v1/devices/{id}/add")))
            .bearer_auth(&f.owner)
            .json(&json!({"args": "2,3"}))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{call}");
    assert_eq!(call["return_value"], 5);
    assert_eq!(call["id"], id.as_str());
    assert_eq!(call["connected"], true);

    // Particle's older form: a form body with `arg` and the token in it.
    let (status, call) = json_of(
        f.http
            .post(f.url(&format!("/v1/devices/{id}/add")))
            .form(&[("arg", "40,2"), ("access_token", f.owner.as_str())])
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{call}");
    assert_eq!(call["return_value"], 42);

    // A variable: `result`, typed.
    let (status, var) = json_of(
        f.http
            .get(f.url(&format!("/v1/devices/{id}/temp")))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{var}");
    assert_eq!(var["result"], 21.5);
    assert_eq!(var["name"], "temp");
    assert_eq!(var["cmd"], "VarReturn");
    assert_eq!(var["coreInfo"]["deviceID"], id.as_str());

    // The token as a query parameter works too.
    let (status, var) = json_of(
        f.http
            .get(f.url(&format!("/v1/devices/{id}/uptime?access_token={}", f.owner)))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{var}");
    assert!(var["result"].is_i64(), "{var}");

    // Missing function and variable: 404, Particle's bodies.
    let (status, body) = json_of(
        f.http
            .post(f.url(&format!("/v1/devices/{id}/nope")))
            .bearer_auth(&f.owner)
            .json(&json!({"args": "1"}))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["ok"], false);
    let (status, body) = json_of(
        f.http
            .get(f.url(&format!("/v1/devices/{id}/nope")))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "Variable not found");

    // A device nobody has, and a name (Trellis devices have none): 403.
    for unknown in ["0123456789abcdef01234567", "my-photon"] {
        let (status, body) = json_of(
            f.http
                .get(f.url(&format!("/v1/devices/{unknown}")))
                .bearer_auth(&f.owner)
                .send()
                .await?,
        )
        .await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"], "Permission Denied");
    }

    // Removing (unclaiming) is refused with what to do instead; a method a
    // route does not have is a JSON 405.
    let (status, body) = json_of(
        f.http
            .delete(f.url(&format!("/v1/devices/{id}")))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("trellis device revoke")),
        "{body}"
    );
    let (status, body) = json_of(
        f.http
            .patch(f.url("/v1/devices"))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 405, "{body}");
    let (status, body) = json_of(f.http.get(f.url("/v1/nothing/here")).send().await?).await;
    assert_eq!(status, 404, "{body}");

    // Products: the device under its product, and not under another.
    let (status, body) = json_of(
        f.http
            .get(f.url("/v1/products/6/devices?page=1"))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["devices"]
            .as_array()
            .is_some_and(|a| a.iter().any(|d| d["id"] == id.as_str())),
        "{body}"
    );
    let (status, call) = json_of(
        f.http
            .post(f.url(&format!("/v1/products/6/devices/{id}/add")))
            .bearer_auth(&f.owner)
            .json(&json!({"args": "1,1"}))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{call}");
    assert_eq!(call["return_value"], 2);
    let (status, _) = json_of(
        f.http
            .get(f.url(&format!("/v1/products/7/devices/{id}")))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 403);
    f.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_users_and_oauth() -> anyhow::Result<()> {
    let f = Fixture::start().await?;

    // No token: 400 invalid_request (what Particle answers); a bad one: 401.
    let (status, body) = json_of(f.http.get(f.url("/v1/devices")).send().await?).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_request");
    for bad in ["nonsense", "trellis_0011223344556677_notthesecret"] {
        let (status, body) = json_of(
            f.http
                .get(f.url("/v1/devices"))
                .bearer_auth(bad)
                .send()
                .await?,
        )
        .await;
        assert_eq!(status, 401, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_token");
    }

    // Who am I, and when does my token expire (never).
    let (status, user) = json_of(
        f.http
            .get(f.url("/v1/user"))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{user}");
    assert_eq!(user["username"], "owner");
    let (status, current) = json_of(
        f.http
            .get(f.url("/v1/access_tokens/current"))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{current}");
    assert!(current["expires_at"].is_null(), "{current}");

    // Password grant: the password is a Trellis token; the client
    // credentials in the form, as particle-cli sends them.
    let form = |user: &str, password: &str, client: &str| {
        vec![
            ("grant_type".to_string(), "password".to_string()),
            ("username".into(), user.into()),
            ("password".into(), password.into()),
            ("client_id".into(), client.into()),
            ("client_secret".into(), client.into()),
            ("expires_in".into(), "3600".into()),
        ]
    };
    let (status, login) = json_of(
        f.http
            .post(f.url("/oauth/token"))
            .form(&form("owner", &f.owner, "particle-cli"))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{login}");
    assert_eq!(login["expires_in"], 3600);
    let new_token = login["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(new_token.starts_with("trellis_"), "{login}");
    let (status, current) = json_of(
        f.http
            .get(f.url("/v1/access_tokens/current"))
            .bearer_auth(&new_token)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{current}");
    assert!(
        current["expires_at"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z')),
        "{current}"
    );

    // Wrong password, wrong user: 400 invalid_grant; wrong client: 401.
    for (user, password) in [
        ("owner", "trellis_0011223344556677_x"),
        ("bob", f.owner.as_str()),
    ] {
        let (status, body) = json_of(
            f.http
                .post(f.url("/oauth/token"))
                .form(&form(user, password, "particle-api"))
                .send()
                .await?,
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"], "invalid_grant");
        assert_eq!(body["error_description"], "User credentials are invalid");
    }
    let (status, body) = json_of(
        f.http
            .post(f.url("/oauth/token"))
            .form(&form("owner", &f.owner, "someone"))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "invalid_client");
    // HTTP Basic client credentials, as Particle's docs show them.
    let (status, body) = json_of(
        f.http
            .post(f.url("/oauth/token"))
            .basic_auth("particle", Some("particle"))
            .form(&[
                ("grant_type", "password"),
                ("username", "owner"),
                ("password", f.owner.as_str()),
            ])
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Revoking by the token alone (the SDK sends no credentials), then the
    // token is refused with 401.
    let (status, body) = json_of(
        f.http
            .delete(f.url(&format!("/v1/access_tokens/{new_token}")))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    trellis_tests::eventually(
        Duration::from_secs(10),
        "the revoked token is refused",
        || async {
            let r = f
                .http
                .get(f.url("/v1/user"))
                .bearer_auth(&new_token)
                .send()
                .await
                .ok()?;
            (r.status().as_u16() == 401).then_some(())
        },
    )
    .await?;
    // Revoking it again: an error, but never a 401.
    let (status, body) = json_of(
        f.http
            .delete(f.url(&format!("/v1/access_tokens/{new_token}")))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    f.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn organisations_do_not_see_each_other() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let acme = f.org("acme").await?;
    let globex = f.org("globex").await?;
    let theirs = f.device(&acme, 6, "acme/temp").await?;
    let ours = f.device(&globex, 6, "globex/temp").await?;

    let (status, list) = json_of(
        f.http
            .get(f.url("/v1/devices"))
            .bearer_auth(&globex)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = list
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, vec![ours.as_str()], "{list}");

    // Another organisation's device is Particle's "not yours": 403, never
    // a 401, for details, calls, variables and its event stream.
    let requests = [
        f.http.get(f.url(&format!("/v1/devices/{theirs}"))),
        f.http
            .post(f.url(&format!("/v1/devices/{theirs}/add")))
            .json(&json!({"args": "2,3"})),
        f.http.get(f.url(&format!("/v1/devices/{theirs}/temp"))),
        f.http.get(f.url(&format!("/v1/devices/{theirs}/events"))),
    ];
    for request in requests {
        let (status, body) = json_of(request.bearer_auth(&globex).send().await?).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"], "Permission Denied");
    }

    // The event stream of all "my" devices carries only globex's.
    let mut stream = f
        .http
        .get(f.url("/v1/devices/events?nonce=0.5"))
        .bearer_auth(&globex)
        .send()
        .await?;
    assert_eq!(stream.status(), 200);
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, stream.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
    }
    assert!(text.contains("event: globex/temp"), "{text}");
    assert!(!text.contains("acme"), "{text}");
    assert!(!text.contains(&theirs), "{text}");
    drop(stream);

    // An event published through the API reaches the publisher's
    // organisation's stream, not another's, and not a device's stream.
    let open = |token: &str, path: &str| {
        f.http
            .get(f.url(path))
            .bearer_auth(token.to_string())
            .send()
    };
    let mut mine = open(&globex, "/v1/devices/events/hello").await?;
    let mut device = open(&globex, &format!("/v1/devices/{ours}/events/hello")).await?;
    let mut other = open(&acme, "/v1/devices/events/hello").await?;
    for s in [&mine, &device, &other] {
        assert_eq!(s.status(), 200);
    }
    let (status, body) = json_of(
        f.http
            .post(f.url("/v1/devices/events"))
            .bearer_auth(&globex)
            .json(&json!({"name": "hello/world", "data": "hi"}))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"], true);
    let text = read_until(&mut mine, Duration::from_secs(10), |t| {
        t.contains("hello/world")
    })
    .await;
    let events = events_in(&text);
    assert_eq!(events.len(), 1, "{text:?}");
    assert_eq!(events[0].1, "hello/world");
    assert_eq!(events[0].2["data"], "hi");
    assert_eq!(events[0].2["coreid"], "alice@globex");
    for s in [&mut device, &mut other] {
        let text = read_until(s, Duration::from_secs(2), |t| t.contains("hello/world")).await;
        assert!(!text.contains("hello/world"), "{text:?}");
    }

    // The product and organisation forms: a product's stream carries its
    // devices' events and what is published to it; an organisation's
    // routes take only the token's own organisation.
    let mut product = open(&globex, "/v1/products/6/events/prod").await?;
    assert_eq!(product.status(), 200);
    let (status, body) = json_of(
        f.http
            .post(f.url("/v1/products/6/events"))
            .bearer_auth(&globex)
            .json(&json!({"name": "prod/x"}))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let text = read_until(&mut product, Duration::from_secs(10), |t| {
        t.contains("prod/x")
    })
    .await;
    assert!(text.contains("event: prod/x"), "{text:?}");
    let (status, body) = json_of(
        f.http
            .post(f.url("/v1/orgs/acme/events"))
            .bearer_auth(&globex)
            .json(&json!({"name": "x"}))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let r = open(&globex, "/v1/orgs/acme/events").await?;
    assert_eq!(r.status().as_u16(), 403);
    let r = open(&globex, "/v1/orgs/globex/events").await?;
    assert_eq!(r.status().as_u16(), 200);
    f.stop().await;
    Ok(())
}

/// The events in an SSE text: (id, name, data), each block checked to be
/// `id:`, `event:`, `data:` lines.
fn events_in(text: &str) -> Vec<(String, String, Value)> {
    text.split("\n\n")
        .filter(|b| b.contains("event: "))
        .filter(|b| b.ends_with('}'))
        .map(|block| {
            let mut lines = block.lines();
            let id = lines.next().and_then(|l| l.strip_prefix("id: "));
            let name = lines.next().and_then(|l| l.strip_prefix("event: "));
            let data = lines.next().and_then(|l| l.strip_prefix("data: "));
            match (id, name, data) {
                (Some(id), Some(name), Some(data)) => (
                    id.to_string(),
                    name.to_string(),
                    serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {block:?}")),
                ),
                _ => panic!("not an id/event/data block: {block:?}"),
            }
        })
        .collect()
}

/// Reads `stream` until `until` holds or `within` passes; what it read.
async fn read_until(
    stream: &mut reqwest::Response,
    within: Duration,
    until: impl Fn(&str) -> bool,
) -> String {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + within;
    while !until(&text) {
        match tokio::time::timeout_at(deadline, stream.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_streams() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let temp = f.device(&f.owner, 6, "temperature").await?;
    let other = f.device(&f.owner, 6, "a/b").await?;

    // A prefix filter: `temp` gets `temperature`, and the stream opens
    // with `:ok`.
    let mut stream = f
        .http
        .get(f.url("/v1/devices/events/temp?nonce=12.5"))
        .bearer_auth(&f.owner)
        .send()
        .await?;
    assert_eq!(stream.status(), 200);
    assert_eq!(
        stream
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let text = read_until(&mut stream, Duration::from_secs(10), |t| {
        t.matches("event:").count() >= 3
    })
    .await;
    assert!(text.starts_with(":ok\n\n"), "{text:?}");
    let blocks = events_in(&text);
    for (_, name, data) in &blocks {
        assert_eq!(name, "temperature");
        assert_eq!(data["coreid"], temp.as_str());
        assert_eq!(data["data"], "21.5");
        assert_eq!(data["ttl"], 60);
    }
    let events = blocks.len();
    assert!(events >= 2, "{text:?}");
    drop(stream);

    // Resuming with Last-Event-ID: the events after that one, from the
    // Redis stream, with nothing missed in between.
    let (first, _, _) = &blocks[0];
    let later: Vec<&String> = blocks[1..].iter().map(|(id, _, _)| id).collect();
    let mut stream = f
        .http
        .get(f.url("/v1/devices/events/temp"))
        .bearer_auth(&f.owner)
        .header("Last-Event-ID", first.as_str())
        .send()
        .await?;
    let text = read_until(&mut stream, Duration::from_secs(10), |t| {
        events_in(t).len() >= later.len()
    })
    .await;
    let resumed: Vec<String> = events_in(&text).into_iter().map(|(id, _, _)| id).collect();
    assert!(resumed.len() >= later.len(), "{text:?}");
    assert_eq!(
        resumed[..later.len()].iter().collect::<Vec<_>>(),
        later,
        "{text:?}"
    );
    drop(stream);

    // An encoded prefix (`a/b` as the SDK sends it), on /v1/events.
    let mut stream = f
        .http
        .get(f.url("/v1/events/a%2Fb"))
        .bearer_auth(&f.owner)
        .send()
        .await?;
    let text = read_until(&mut stream, Duration::from_secs(10), |t| {
        t.contains("event: a/b")
    })
    .await;
    assert!(text.contains("event: a/b"), "{text:?}");
    assert!(!text.contains("temperature"), "{text:?}");
    drop(stream);

    // One device's stream carries only its events.
    let mut stream = f
        .http
        .get(f.url(&format!("/v1/devices/{other}/events")))
        .bearer_auth(&f.owner)
        .send()
        .await?;
    let text = read_until(&mut stream, Duration::from_secs(10), |t| {
        t.matches("event:").count() >= 2
    })
    .await;
    assert!(text.contains("event: a/b"), "{text:?}");
    assert!(!text.contains(&temp), "{text:?}");
    drop(stream);

    // Token problems come back before the stream opens.
    let r = f.http.get(f.url("/v1/devices/events")).send().await?;
    assert_eq!(r.status().as_u16(), 400);
    let r = f
        .http
        .get(f.url("/v1/devices/events"))
        .bearer_auth("bad")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 401);
    f.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_stream_gets_keepalives() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let mut stream = f
        .http
        .get(f.url("/v1/devices/events/nothing-publishes-this"))
        .bearer_auth(&f.owner)
        .send()
        .await?;
    let started = std::time::Instant::now();
    let text = read_until(&mut stream, Duration::from_secs(15), |t| {
        t.len() > ":ok\n\n".len()
    })
    .await;
    assert!(text.starts_with(":ok\n\n"), "{text:?}");
    assert_eq!(&text[":ok\n\n".len()..], ":\n\n", "{text:?}");
    assert!(
        started.elapsed() < Duration::from_secs(11),
        "{:?}",
        started.elapsed()
    );
    f.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_upload_registers_and_claim_only_confirms() -> anyhow::Result<()> {
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    let f = Fixture::start().await?;
    let identity = f.cluster.unregistered_identity()?;
    let id = identity.device_id.to_string();
    let pem = identity
        .private_key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)?;
    let send = |product: Option<&str>| {
        let mut form = vec![
            ("deviceID", id.clone()),
            ("publicKey", pem.clone()),
            ("filename", "cli".into()),
            ("order", "manual_1".into()),
            ("algorithm", "rsa".into()),
        ];
        if let Some(p) = product {
            form.push(("product_id", p.into()));
        }
        f.http
            .post(f.url(&format!("/v1/provisioning/{id}")))
            .bearer_auth(&f.owner)
            .form(&form)
            .send()
    };
    // A new device needs its product.
    let (status, body) = json_of(send(None).await?).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("product_id")),
        "{body}"
    );
    let (status, body) = json_of(send(Some("6")).await?).await;
    assert_eq!(status, 200, "{body}");
    // Sending the same key again is fine, the product is the device's.
    let (status, body) = json_of(send(None).await?).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["product_id"], 6);
    let (status, device) = json_of(
        f.http
            .get(f.url(&format!("/v1/devices/{id}")))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{device}");
    assert_eq!(device["connected"], false);

    // Claiming: one's own device is confirmed, anything else refused (not
    // with a 401, and not as "someone else's").
    let claim = |id: String| {
        f.http
            .post(f.url("/v1/devices"))
            .bearer_auth(&f.owner)
            .json(&json!({"id": id, "request_transfer": false}))
            .send()
    };
    let (status, body) = json_of(claim(id.clone()).await?).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"], true);
    let (status, body) = json_of(claim("0123456789abcdef01234567".into()).await?).await;
    assert_eq!(status, 400, "{body}");
    assert!(!body.to_string().contains("someone else"), "{body}");
    f.stop().await;
    Ok(())
}

/// A service that refuses another service's credential (here: the
/// gateway's, for keyvault) must not look like a bad user token: a 401
/// would make particle-cli forget its login.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_internal_credential_problem_is_not_a_401() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let r = f
        .http
        .get(f.url("/v1/devices"))
        .bearer_auth(&f.owner)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    // The services' credential (process-wide, tokens on and TLS off) now
    // names no token: the gateway's calls to keyvault are refused.
    trellis_core::telemetry::set_service_credential(Some("trellis_00112233445566aa_bogus"))
        .map_err(anyhow::Error::msg)?;
    let (status, body) = json_of(
        f.http
            .get(f.url("/v1/devices"))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    let restored = trellis_core::telemetry::set_service_credential(f.services_token.as_deref());
    assert_eq!(status, 502, "{body}");
    assert!(
        !body
            .to_string()
            .to_ascii_lowercase()
            .contains("access token"),
        "{body}"
    );
    restored.map_err(anyhow::Error::msg)?;
    // A bad user token is still a 401.
    let r = f
        .http
        .get(f.url("/v1/devices"))
        .bearer_auth("trellis_00112233445566aa_x")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 401);
    f.stop().await;
    Ok(())
}
