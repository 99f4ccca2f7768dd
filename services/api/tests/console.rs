//! The web console's files, headers, session and JSON endpoints over real
//! HTTP against real services (tokens on), a real redis-server and a
//! simulated device. The browser end-to-end test is ci/console/check.sh.
mod common;

use common::json_of;

use common::Fixture;
use reqwest::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use serde_json::{Value, json};

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// The `trellis_console=...` pair of a Set-Cookie header.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_carry_the_security_headers_and_revalidate() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let r = f.http.get(f.url("/")).send().await?;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&r, "content-security-policy"), CSP);
    assert_eq!(header(&r, "x-content-type-options"), "nosniff");
    assert_eq!(header(&r, "referrer-policy"), "no-referrer");
    assert_eq!(header(&r, "cache-control"), "no-cache");
    let html = r.text().await?;
    assert!(html.contains("/console/assets/app.js"), "{html}");

    for (file, kind) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("api.js", "text/javascript; charset=utf-8"),
        ("pages.js", "text/javascript; charset=utf-8"),
        ("console.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ] {
        let r = f
            .http
            .get(f.url(&format!("/console/assets/{file}")))
            .send()
            .await?;
        assert_eq!(r.status(), 200, "{file}");
        assert_eq!(header(&r, "content-type"), kind, "{file}");
        assert_eq!(header(&r, "content-security-policy"), CSP, "{file}");
        let etag = header(&r, "etag");
        assert!(etag.len() == 66 && etag.starts_with('"'), "{file}: {etag}");
        // Revalidation: the same ETag answers 304 without a body.
        let again = f
            .http
            .get(f.url(&format!("/console/assets/{file}")))
            .header("if-none-match", &etag)
            .send()
            .await?;
        assert_eq!(again.status(), 304, "{file}");
        assert!(again.bytes().await?.is_empty());
    }
    let missing = f.http.get(f.url("/console/assets/nope.js")).send().await?;
    assert_eq!(missing.status(), 404);
    assert_eq!(header(&missing, "x-content-type-options"), "nosniff");
    // The console's JSON carries them too.
    let r = f
        .http
        .get(f.url("/v1/trellis/fleet"))
        .bearer_auth(&f.owner)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-security-policy"), CSP);
    f.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_session_cookie_needs_the_console_header() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let session = f.url("/v1/trellis/session");

    // Sign-in without the console's header: refused (no login CSRF).
    let r = f
        .http
        .post(&session)
        .json(&json!({"token": f.owner}))
        .send()
        .await?;
    assert_eq!(r.status(), 403);
    assert!(r.headers().get(SET_COOKIE).is_none());

    // A wrong token: 401, no cookie.
    let r = f
        .http
        .post(&session)
        .header("x-trellis-console", "1")
        .json(&json!({"token": "trellis_0123456789abcdef_wrong"}))
        .send()
        .await?;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get(SET_COOKIE).is_none());

    // The owner's token: the cookie is HttpOnly, SameSite=Strict, not
    // Secure over plain HTTP.
    let r = f
        .http
        .post(&session)
        .header("x-trellis-console", "1")
        .json(&json!({"token": f.owner}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let set = header(&r, "set-cookie");
    assert!(set.starts_with("trellis_console="), "{set}");
    assert!(set.contains("; HttpOnly"), "{set}");
    assert!(set.contains("; SameSite=Strict"), "{set}");
    assert!(set.contains("; Path=/"), "{set}");
    assert!(!set.contains("Secure"), "{set}");
    let (_, me) = json_of(r).await;
    assert_eq!(me["user"], "owner");
    assert_eq!(me["org"], "default");
    let cookie = cookie_pair(&set);

    // The cookie alone is not a credential; with the header it is, for
    // every route (the Particle routes too).
    let r = f.http.get(&session).header(COOKIE, &cookie).send().await?;
    assert_eq!(
        r.status(),
        400,
        "the cookie without the header must not count"
    );
    let r = f
        .http
        .get(f.url("/v1/devices"))
        .header(COOKIE, &cookie)
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    let (status, me) = json_of(
        f.http
            .get(&session)
            .header(COOKIE, &cookie)
            .header("x-trellis-console", "1")
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["user"], "owner");
    let r = f
        .http
        .get(f.url("/v1/devices"))
        .header(COOKIE, &cookie)
        .header("x-trellis-console", "1")
        .send()
        .await?;
    assert_eq!(r.status(), 200);

    // Behind a proxy that terminated HTTPS the cookie is Secure.
    let r = f
        .http
        .post(&session)
        .header("x-trellis-console", "1")
        .header("x-forwarded-proto", "https")
        .json(&json!({"token": f.owner}))
        .send()
        .await?;
    assert!(header(&r, "set-cookie").contains("; Secure"));

    // Password sign-in (the password is a token of the user): a new
    // token in the cookie, revoked by sign-out.
    let r = f
        .http
        .post(&session)
        .header("x-trellis-console", "1")
        .json(&json!({"username": "owner", "password": f.owner}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let minted = cookie_pair(&header(&r, "set-cookie"));
    let token = minted
        .strip_prefix("trellis_console=")
        .unwrap_or_default()
        .to_string();
    assert!(
        token.starts_with("trellis_") && token != f.owner,
        "{minted}"
    );
    let r = f
        .http
        .post(&session)
        .header("x-trellis-console", "1")
        .json(&json!({"username": "somebody-else", "password": f.owner}))
        .send()
        .await?;
    assert_eq!(r.status(), 401, "another user's name must not sign in");
    let r = f
        .http
        .delete(&session)
        .header(COOKIE, &minted)
        .header("x-trellis-console", "1")
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let cleared = header(&r, "set-cookie");
    assert!(
        cleared.starts_with("trellis_console=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    trellis_tests::eventually(
        std::time::Duration::from_secs(10),
        "the minted token is revoked",
        || async {
            let r = f
                .http
                .get(f.url("/v1/user"))
                .bearer_auth(&token)
                .send()
                .await
                .ok()?;
            (r.status() == 401).then_some(())
        },
    )
    .await?;
    // Signing out of a token session leaves the token alone.
    let r = f
        .http
        .delete(&session)
        .header(COOKIE, &cookie)
        .header("x-trellis-console", "1")
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let r = f
        .http
        .get(f.url("/v1/user"))
        .bearer_auth(&f.owner)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    f.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_device_audit_and_organisation_isolation() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let id = f.device(&f.owner, 6, "temperature").await?;
    let acme = f.org("acme").await?;

    // The fleet: the device, online, with its firmware and gateway.
    let (status, fleet) = json_of(
        f.http
            .get(f.url("/v1/trellis/fleet"))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{fleet}");
    let entry = fleet["devices"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["id"] == id.as_str()))
        .unwrap_or_else(|| panic!("{id} not in {fleet}"));
    assert_eq!(entry["online"], true);
    assert_eq!(entry["product_id"], 6);
    assert_eq!(entry["tags"], json!([]));
    assert!(entry["gateway_id"].as_str().is_some_and(|g| !g.is_empty()));
    assert!(
        entry["last_seen"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(fleet["counts"]["online"], 1);
    assert_eq!(fleet["counts"]["total"], 1);

    // Tags, then the device's record shows them.
    let (status, tagged) = json_of(
        f.http
            .post(f.url(&format!("/v1/trellis/devices/{id}/tags")))
            .bearer_auth(&f.owner)
            .json(&json!({"tags": ["Lab", "floor-2"]}))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{tagged}");
    assert_eq!(tagged["tags"], json!(["floor-2", "lab"]));
    let (status, device) = json_of(
        f.http
            .get(f.url(&format!("/v1/trellis/devices/{id}")))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{device}");
    assert_eq!(device["record"]["tags"], json!(["floor-2", "lab"]));
    assert_eq!(device["record"]["organization"], "default");
    assert_eq!(device["online"], true);
    assert!(
        device["functions"]
            .as_array()
            .is_some_and(|f| f.contains(&json!("add")))
    );
    assert_eq!(device["variables"]["temp"], "double");
    assert!(
        device["recent_sessions"]
            .as_array()
            .is_some_and(|s| !s.is_empty()),
        "{device}"
    );
    assert_eq!(device["clone_flags"], json!([]));
    assert_eq!(device["quarantined_until"], Value::Null);
    let (status, lifted) = json_of(
        f.http
            .post(f.url(&format!("/v1/trellis/devices/{id}/lift-quarantine")))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{lifted}");
    assert_eq!(lifted["was_quarantined"], false);

    // Audit: the tag change, by kind and by device.
    let (status, audit) = json_of(
        f.http
            .get(f.url(&format!(
                "/v1/trellis/audit?kind=set_tags&device={id}&limit=5"
            )))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{audit}");
    let records = audit["records"].as_array().cloned().unwrap_or_default();
    assert!(!records.is_empty(), "{audit}");
    assert!(
        records
            .iter()
            .all(|r| r["action"] == "set_tags" && r["device_id"] == id.as_str())
    );
    let (status, none) = json_of(
        f.http
            .get(f.url("/v1/trellis/audit?actor=nobody-has-this-name"))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(none["records"], json!([]));
    let r = f
        .http
        .get(f.url("/v1/trellis/audit?limit=0"))
        .bearer_auth(&f.owner)
        .send()
        .await?;
    assert_eq!(r.status(), 400);

    // Another organisation: an empty fleet, and our device is "not found
    // or not yours" for every console route.
    let (status, theirs) = json_of(
        f.http
            .get(f.url("/v1/trellis/fleet"))
            .bearer_auth(&acme)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{theirs}");
    assert_eq!(theirs["devices"], json!([]));
    let (status, body) = json_of(
        f.http
            .get(f.url(&format!("/v1/trellis/devices/{id}")))
            .bearer_auth(&acme)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(!body.to_string().contains("lab"), "{body}");
    for path in ["tags", "revoke", "lift-quarantine"] {
        let r = f
            .http
            .post(f.url(&format!("/v1/trellis/devices/{id}/{path}")))
            .bearer_auth(&acme)
            .json(&json!({"tags": ["x"], "reason": "not theirs"}))
            .send()
            .await?;
        assert_eq!(r.status(), 403, "{path}");
    }
    let (_, theirs) = json_of(
        f.http
            .get(f.url(&format!("/v1/trellis/audit?device={id}")))
            .bearer_auth(&acme)
            .send()
            .await?,
    )
    .await;
    assert_eq!(theirs["records"], json!([]), "{theirs}");
    // Still ours, not revoked.
    let (_, device) = json_of(
        f.http
            .get(f.url(&format!("/v1/trellis/devices/{id}")))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(device["revoked"], false);
    assert_eq!(device["record"]["tags"], json!(["floor-2", "lab"]));

    // No token, a wrong token.
    let r = f.http.get(f.url("/v1/trellis/fleet")).send().await?;
    assert_eq!(r.status(), 400);
    let r = f
        .http
        .get(f.url("/v1/trellis/fleet"))
        .bearer_auth("trellis_0123456789abcdef_wrong")
        .send()
        .await?;
    assert_eq!(r.status(), 401);

    // Releases and rollouts: none yet; an unknown rollout is 404.
    let (status, releases) = json_of(
        f.http
            .get(f.url("/v1/trellis/releases"))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{releases}");
    assert_eq!(releases["releases"], json!([]));
    let (status, rollouts) = json_of(
        f.http
            .get(f.url("/v1/trellis/rollouts"))
            .bearer_auth(&f.owner)
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{rollouts}");
    assert_eq!(rollouts["rollouts"], json!([]));
    let r = f
        .http
        .get(f.url("/v1/trellis/rollouts/r-does-not-exist"))
        .bearer_auth(&f.owner)
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let r = f
        .http
        .post(f.url("/v1/trellis/rollouts/r-does-not-exist/explode"))
        .bearer_auth(&f.owner)
        .send()
        .await?;
    assert_eq!(r.status(), 404);

    // Revoke (last: it ends the device's session).
    let (status, revoked) = json_of(
        f.http
            .post(f.url(&format!("/v1/trellis/devices/{id}/revoke")))
            .bearer_auth(&f.owner)
            .json(&json!({"reason": "console test"}))
            .send()
            .await?,
    )
    .await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["revoked"], true);
    f.stop().await;
    Ok(())
}

/// Releases against their policy and a rollout's progress and actions,
/// through the console's JSON (auth off here, as in ota.rs: the OTA
/// fixtures of `trellis-tests` run without tokens; the token checks are
/// above).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn releases_against_the_policy_and_rollout_progress() -> anyhow::Result<()> {
    use trellis_proto::v1::{CreateRolloutRequest, RolloutTarget, Stage};
    use trellis_tests::Cluster;
    use trellis_tests::ota::{
        Fleet, ReleaseKeys, Signers, all_online, device_config, make_release, test_image,
    };
    const PRODUCT: u32 = 7;
    let (cluster, stack) = Cluster::start_with_ota(1, |_| {}).await?;
    let keys = ReleaseKeys::provision(&cluster, &stack, &[PRODUCT]).await?;
    let fleet = Fleet::start(
        &cluster,
        2,
        PRODUCT,
        device_config(PRODUCT, 1, &keys.policy),
        vec![cluster.gateways[0].devices.to_string()],
    )
    .await?;
    all_online(&cluster, &fleet.ids(), std::time::Duration::from_secs(60)).await?;
    let mut config = cluster.config.clone();
    config.api.gateway_url = format!("http://{}", cluster.gateways[0].grpc);
    config.api.keyvault_url = format!("http://{}", cluster.keyvault);
    config.api.signer_url = format!("http://{}", stack.signer);
    config.api.ota_url = format!("http://{}", stack.ota);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api = format!("http://{}", listener.local_addr()?);
    let (trigger, shutdown) = trellis_core::Shutdown::new();
    tokio::spawn(trellis_api::serve_with_listener(config, listener, shutdown));
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let get = |path: String| {
        let http = http.clone();
        let url = format!("{api}{path}");
        async move {
            Ok::<_, reqwest::Error>(
                json_of(http.get(url).bearer_auth("auth-is-off").send().await?).await,
            )
        }
    };
    // Only a ready API answers.
    trellis_tests::eventually(
        std::time::Duration::from_secs(30),
        "the api answers",
        || async { (get("/v1/trellis/fleet".into()).await.ok()?.0 == 200).then_some(()) },
    )
    .await?;

    // A release the cloud alone signed is short of the customer's key; one
    // both signed meets the policy.
    let (short, _) = make_release(
        &stack,
        &keys,
        PRODUCT,
        3,
        &test_image(PRODUCT, 3, 4096),
        Signers::CloudOnly,
    )
    .await?;
    let (good, _) = make_release(
        &stack,
        &keys,
        PRODUCT,
        2,
        &test_image(PRODUCT, 2, 8192),
        Signers::Both,
    )
    .await?;
    let (status, releases) = get(format!("/v1/trellis/releases?product={PRODUCT}")).await?;
    assert_eq!(status, 200, "{releases}");
    let find = |id: &str| {
        releases["releases"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["release_id"] == id).cloned())
            .unwrap_or_else(|| panic!("{id} not in {releases}"))
    };
    let s = find(&short);
    assert_eq!(s["policy_check"]["satisfied"], false, "{s}");
    assert_eq!(s["policy_check"]["missing"], json!(["customer"]), "{s}");
    assert_eq!(s["policy_check"]["threshold"], 2);
    let g = find(&good);
    assert_eq!(g["policy_check"]["satisfied"], true, "{g}");
    assert_eq!(g["policy_check"]["missing"], json!([]), "{g}");
    assert_eq!(g["signatures"], 2);
    let policy = &releases["policies"][PRODUCT.to_string()];
    assert_eq!(policy["threshold"], 2, "{releases}");
    assert_eq!(policy["keys"].as_array().map(Vec::len), Some(2));

    // A two-stage rollout: paused and resumed through the console's
    // routes, then followed to the end.
    let mut ota = stack.ota_client().await?;
    let rollout = ota
        .create_rollout(CreateRolloutRequest {
            release_id: good.clone(),
            target: Some(RolloutTarget {
                product_id: PRODUCT,
                ..Default::default()
            }),
            stages: vec![
                Stage {
                    name: "canary".into(),
                    device_count: 1,
                    ..Default::default()
                },
                Stage {
                    name: "rest".into(),
                    percent: 100,
                    ..Default::default()
                },
            ],
            max_failure_ratio: 0.5,
            max_concurrent: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .rollout_id;
    let act = |action: &str| {
        let http = http.clone();
        let url = format!("{api}/v1/trellis/rollouts/{rollout}/{action}");
        async move {
            Ok::<_, reqwest::Error>(
                json_of(
                    http.post(url)
                        .bearer_auth("auth-is-off")
                        .json(&json!({"reason": "console test"}))
                        .send()
                        .await?,
                )
                .await,
            )
        }
    };
    let (status, paused) = act("pause").await?;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["state"], "paused");
    let (status, resumed) = act("resume").await?;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["state"], "running");
    let (_, listed) = get("/v1/trellis/rollouts".into()).await?;
    assert!(
        listed["rollouts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r["rollout_id"] == rollout.as_str())),
        "{listed}"
    );
    let done = trellis_tests::eventually(
        std::time::Duration::from_secs(90),
        "the rollout completes",
        || async {
            let (_, r) = get(format!("/v1/trellis/rollouts/{rollout}")).await.ok()?;
            (r["state"] == "completed").then_some(r)
        },
    )
    .await?;
    assert_eq!(done["release_id"], good.as_str());
    assert_eq!(done["max_failure_ratio"], 0.5);
    assert_eq!(done["failure_ratio"], 0.0);
    assert_eq!(done["totals"]["applied"], 2, "{done}");
    assert_eq!(done["not_applied"], json!([]), "{done}");
    let stages = done["stages"].as_array().cloned().unwrap_or_default();
    assert_eq!(stages.len(), 2, "{done}");
    assert!(
        stages
            .iter()
            .all(|s| s["applied"] == 1 && s["completed_at"].is_string()),
        "{done}"
    );
    // Ended: abort is refused, not a silent success.
    let (status, refused) = act("abort").await?;
    assert!(status == 400 || status == 409, "{status} {refused}");

    drop(trigger);
    fleet.stop().await;
    stack.stop().await;
    cluster.stop().await;
    Ok(())
}
