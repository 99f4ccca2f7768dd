//! The OpenAPI document: served without a token at `/v1/openapi.json`,
//! valid OpenAPI 3.1 JSON whose references all resolve, documenting every
//! route of `trellis_api::router` (read from its source) with every
//! method, and nothing the router does not answer.
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::net::TcpListener;
use trellis_api::{AppState, Services};
use trellis_core::{Config, Shutdown};

/// `(path, method)` of every `.route(...)` in the router's source, axum's
/// `{*prefix}` written as OpenAPI's `{prefix}`.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let source = include_str!("../src/lib.rs");
    let start = source.find("pub fn router(").expect("lib.rs has fn router");
    let body = &source[start..];
    let end = body.find("\n}\n").expect("the end of fn router");
    let body = &body[..end];
    let mut routes = BTreeSet::new();
    let mut rest = body;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        // The call's text, up to its closing parenthesis.
        let mut depth = 1;
        let mut close = 0;
        for (i, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        close = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let call = &rest[..close];
        let (first, handlers) = call.split_once(',').expect("route(path, handler)");
        let first = first.trim();
        let path = if first == "openapi::PATH" {
            trellis_api::openapi::PATH.to_string()
        } else {
            first.trim_matches('"').replace("{*", "{")
        };
        assert!(
            path.starts_with('/'),
            "cannot read the path of .route({call})"
        );
        let mut methods = 0;
        for method in ["get", "post", "put", "delete", "patch"] {
            let needle = format!("{method}(");
            let mut from = 0;
            while let Some(i) = handlers[from..].find(&needle) {
                let i = from + i;
                let before = handlers[..i].chars().last();
                if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    routes.insert((path.clone(), method.to_string()));
                    methods += 1;
                }
                from = i + needle.len();
            }
        }
        assert!(methods > 0, "no method in .route({call})");
        rest = &rest[close..];
    }
    routes
}

fn routes_in_document(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "post", "put", "delete", "patch"] {
            if item.get(method).is_some() {
                routes.insert((path.clone(), method.to_string()));
            }
        }
    }
    routes
}

/// Every `$ref` in `value`, each of which must name something in `doc`.
fn check_refs(doc: &Value, value: &Value, bad: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                let target = r
                    .strip_prefix("#/")
                    .map(|p| p.split('/').try_fold(doc, |v, k| v.get(k)));
                if !matches!(target, Some(Some(_))) {
                    bad.push(r.clone());
                }
            }
            for v in map.values() {
                check_refs(doc, v, bad);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| check_refs(doc, v, bad)),
        _ => {}
    }
}

/// A router whose services are nowhere (nothing here reaches them).
async fn serve_router() -> anyhow::Result<(String, trellis_core::shutdown::ShutdownTrigger)> {
    let mut config = Config::default();
    config.tls.mode = trellis_core::config::TlsMode::Off;
    for url in [
        &mut config.api.gateway_url,
        &mut config.api.keyvault_url,
        &mut config.api.signer_url,
        &mut config.api.ota_url,
    ] {
        *url = "http://127.0.0.1:1".into();
    }
    let (trigger, shutdown) = Shutdown::new();
    let app = trellis_api::router(AppState {
        services: Services::new(&config)?,
        shutdown,
        https: false,
        webhooks: None,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{addr}"), trigger))
}

#[tokio::test]
async fn the_document_is_served_and_documents_every_route() -> anyhow::Result<()> {
    let (base, _stop) = serve_router().await?;
    trellis_core::outbound::install_tls_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;

    // Served without a token, as JSON.
    let response = http.get(format!("{base}/v1/openapi.json")).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let doc: Value = response.json().await?;

    // OpenAPI 3.1, with what a document must have.
    let version = doc["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3.1."), "openapi: {version}");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let mut bad = Vec::new();
    check_refs(&doc, &doc, &mut bad);
    assert!(bad.is_empty(), "unresolved $refs: {bad:?}");
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["access_token"]["in"], "query");

    // Every route of the router, every method, and nothing else.
    let source = routes_in_source();
    assert!(
        source.len() >= 30,
        "{} routes read from lib.rs",
        source.len()
    );
    let documented = routes_in_document(&doc);
    let undocumented: Vec<_> = source.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "routes not in the document: {undocumented:?}"
    );
    let unrouted: Vec<_> = documented.difference(&source).collect();
    assert!(
        unrouted.is_empty(),
        "documented but not routed: {unrouted:?}"
    );

    for (path, method) in &documented {
        let operation = &doc["paths"][path][method];
        let responses = operation["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|s| s.starts_with('2') || s == "400"),
            "{method} {path}: no success answer"
        );
        let bodies: Vec<&Value> = responses
            .values()
            .map(|r| {
                r.get("$ref")
                    .and_then(Value::as_str)
                    .and_then(|r| r.strip_prefix("#/components/responses/"))
                    .map_or(r, |name| &doc["components"]["responses"][name])
            })
            .collect();
        assert!(
            bodies.iter().all(|r| r["description"].is_string()),
            "{method} {path}: a response without a description"
        );
        // The server answers every documented operation (anything but the
        // fallback's "Not found" or a 405), here refusing for want of a
        // token, which it must answer as documented.
        let url = format!(
            "{base}{}",
            path.replace("{id}", "0123456789abcdef01234567")
                .replace("{p}", "6")
                .replace("{name}", "add")
                .replace("{prefix}", "temp")
                .replace("{org}", "default")
                .replace("{token}", "trellis_0123456789abcdef_x")
        );
        let response = http
            .request(method.to_uppercase().parse()?, &url)
            .send()
            .await?;
        let status = response.status().as_u16();
        let body = response.text().await?;
        assert_ne!(status, 405, "{method} {path}: {body}");
        assert!(
            !body.contains("\"Not found\""),
            "{method} {path} is not routed: {status} {body}"
        );
        assert!(
            responses.contains_key(&status.to_string()),
            "{method} {path} answered {status}, which it does not document"
        );
    }

    // The event streams are server-sent events; the flash is a multipart
    // upload; bodies are JSON or form-encoded.
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let stream = item["get"]["responses"]["200"]["content"]
            .as_object()
            .is_some_and(|c| c.contains_key("text/event-stream"));
        assert_eq!(
            stream,
            path.contains("/events") && item.get("get").is_some(),
            "{path}"
        );
    }
    // A template whose last segment is a parameter must not promise its
    // answer for a literal sibling that another operation answers
    // (`GET /v1/devices/{id}/events` is a stream, not the variable
    // `events`): the parameter's pattern excludes that literal, or a
    // generated request reaches the sibling and gets an undocumented answer.
    let overlaps = documented.iter().filter_map(|(path, method)| {
        let (parent, last) = path.rsplit_once('/')?;
        let name = last.strip_prefix('{')?.strip_suffix('}')?;
        Some((path, method, parent, name))
    });
    let mut checked = 0;
    let mut overlapping = Vec::new();
    for (path, method, parent, name) in overlaps {
        for (sibling, sibling_method) in &documented {
            let Some(literal) = sibling
                .strip_prefix(parent)
                .and_then(|s| s.strip_prefix('/'))
            else {
                continue;
            };
            if sibling_method != method || literal.contains('/') || literal.starts_with('{') {
                continue;
            }
            // A sibling that answers as the template does is the same
            // operation under its own route (POST …/events calls the
            // function `events`).
            let success = |p: &str| &doc["paths"][p][method]["responses"]["200"]["content"];
            if success(sibling) == success(path) {
                continue;
            }
            let parameters = doc["paths"][path][method]["parameters"]
                .as_array()
                .expect("parameters");
            let pattern = parameters
                .iter()
                .find(|p| p["name"] == name)
                .and_then(|p| p["schema"]["pattern"].as_str())
                .unwrap_or_default();
            if !pattern.contains(&format!("(?!{literal}$)")) {
                overlapping.push(format!(
                    "{method} {path}: {{{name}}} = {literal:?} is {method} {sibling}, \
                     but the pattern {pattern:?} allows it"
                ));
            }
            checked += 1;
        }
    }
    assert!(checked >= 1, "no overlapping template found to check");
    assert!(overlapping.is_empty(), "{overlapping:#?}");
    let put = &doc["paths"]["/v1/devices/{id}"]["put"]["requestBody"]["content"];
    assert!(put["multipart/form-data"]["schema"].is_object());
    let call = &doc["paths"]["/v1/devices/{id}/{name}"]["post"]["requestBody"]["content"];
    assert!(call["application/json"].is_object());
    assert!(call["application/x-www-form-urlencoded"].is_object());
    Ok(())
}

#[test]
fn the_source_reader_finds_the_routes() {
    let routes = routes_in_source();
    for (path, method) in [
        ("/oauth/token", "post"),
        ("/v1/access_tokens/current", "delete"),
        ("/v1/devices/{id}", "put"),
        ("/v1/devices/{id}", "delete"),
        ("/v1/devices/events/{prefix}", "get"),
        ("/v1/orgs/{org}/events", "post"),
        ("/v1/openapi.json", "get"),
    ] {
        assert!(
            routes.contains(&(path.to_string(), method.to_string())),
            "{method} {path} not read from lib.rs: {routes:?}"
        );
    }
}
