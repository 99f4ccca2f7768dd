//! Webhooks (Particle "integrations"): per organisation, an event name
//! prefix (optionally one product or one device) sends an HTTP request to
//! the integration's URL for every matching event.
//!
//! - [`rest`]: `/v1/integrations` (create, list, get, delete) and the
//!   Trellis additions `/v1/integrations/{id}/dead` and `.../replay`;
//! - [`deliver`]: the dispatcher (event stream -> per-integration queues)
//!   and the workers (queue -> HTTP, at least once, in order);
//! - here: the integration record, the body template and the signature.
//!
//! Every key lives in the api's region Redis (`redis.url`, next to the
//! event stream they are made from), under the api's own ACL user
//! `trellis-api` (docs/architecture.md §4).
//!
//! ## Signature
//! Every request carries `X-Trellis-Timestamp: <unix seconds>` and
//! `X-Trellis-Signature: sha256=<hex>`, the HMAC-SHA256 with the
//! integration's secret over `<timestamp>.<raw body>`. A receiver
//! recomputes it over the exact bytes it received, compares in constant
//! time, and refuses a timestamp older than it tolerates (replays).
//! `X-Trellis-Delivery` is the event's id: the same on every attempt, so
//! a receiver can drop duplicates (delivery is at least once).
pub mod deliver;
pub mod rest;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::collections::HashMap;
use trellis_core::redis_conn::keys;

/// One integration as stored (hash `trellis:webhook:<id>`).
#[derive(Debug, Clone, PartialEq)]
pub struct Integration {
    pub id: String,
    pub org: String,
    /// Event name prefix ("" = every event).
    pub event: String,
    /// Only this device's events ("" = any device).
    pub device: String,
    /// Only devices of this product (0 = any).
    pub product: u32,
    pub url: String,
    pub method: String,
    pub headers: BTreeMap<String, String>,
    /// Body template; `None`: the default JSON body.
    pub body: Option<String>,
    /// Deliveries per second at most (0 = no limit).
    pub rate_limit: f64,
    pub secret: String,
    pub created_ms: i64,
    /// Failed attempts so far.
    pub errors: u64,
    pub last_error: String,
    pub last_error_ms: i64,
    pub delivered: u64,
}

impl Integration {
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("org", self.org.clone()),
            ("event", self.event.clone()),
            ("device", self.device.clone()),
            ("product", self.product.to_string()),
            ("url", self.url.clone()),
            ("method", self.method.clone()),
            (
                "headers",
                serde_json::to_string(&self.headers).unwrap_or_else(|_| "{}".into()),
            ),
            ("body", self.body.clone().unwrap_or_default()),
            (
                "has_body",
                if self.body.is_some() { "1" } else { "0" }.into(),
            ),
            ("rate_limit", self.rate_limit.to_string()),
            ("secret", self.secret.clone()),
            ("created_ms", self.created_ms.to_string()),
        ]
    }

    /// The record of an HGETALL answer; `None` when empty or damaged.
    pub fn from_hash(map: &HashMap<String, String>) -> Option<Self> {
        let get = |k: &str| map.get(k).cloned().unwrap_or_default();
        let id = get("id");
        if id.is_empty() {
            return None;
        }
        Some(Self {
            id,
            org: get("org"),
            event: get("event"),
            device: get("device"),
            product: get("product").parse().unwrap_or(0),
            url: get("url"),
            method: match get("method") {
                m if m.is_empty() => "POST".into(),
                m => m,
            },
            headers: serde_json::from_str(&get("headers")).unwrap_or_default(),
            body: (get("has_body") == "1").then(|| get("body")),
            rate_limit: get("rate_limit").parse().unwrap_or(0.0),
            secret: get("secret"),
            created_ms: get("created_ms").parse().unwrap_or(0),
            errors: get("errors").parse().unwrap_or(0),
            last_error: get("last_error"),
            last_error_ms: get("last_error_ms").parse().unwrap_or(0),
            delivered: get("delivered").parse().unwrap_or(0),
        })
    }

    /// Whether an event of `org`, named `name`, from `device` (empty:
    /// published through the API) of `product` goes to this integration.
    pub fn matches(&self, org: &str, name: &str, device: &str, product: Option<u32>) -> bool {
        self.org == org
            && name.starts_with(&self.event)
            && (self.device.is_empty() || self.device == device)
            && (self.product == 0 || product == Some(self.product))
    }

    /// As the REST API and `trellis webhook list` show it (no secret).
    pub fn view(&self, queued: u64, dead: u64) -> Value {
        json!({
            "id": self.id,
            "integration_type": "Webhook",
            "event": self.event,
            "url": self.url,
            "requestType": self.method,
            "deviceID": if self.device.is_empty() { Value::Null } else { json!(self.device) },
            "product_id": if self.product == 0 { Value::Null } else { json!(self.product) },
            "headers": self.headers,
            "body": self.body,
            "rate_limit": self.rate_limit,
            "created_at": crate::iso_time(self.created_ms),
            "errors": self.errors,
            "last_error": if self.last_error.is_empty() { Value::Null } else { json!(self.last_error) },
            "last_error_at": if self.last_error_ms == 0 { Value::Null } else { json!(crate::iso_time(self.last_error_ms)) },
            "delivered": self.delivered,
            "queued": queued,
            "dead": dead,
        })
    }
}

/// One event to deliver (an entry of an integration's queue).
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The event's id in `trellis:events` (`X-Trellis-Delivery`).
    pub event_id: String,
    pub name: String,
    pub data: String,
    /// The device, or the publisher for events published through the API.
    pub coreid: String,
    pub time_ms: i64,
    /// When it was queued (a replay queues it again); the age limit
    /// counts from here.
    pub queued_ms: i64,
}

impl Delivery {
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("event_id", self.event_id.clone()),
            ("name", self.name.clone()),
            ("data", self.data.clone()),
            ("coreid", self.coreid.clone()),
            ("time_ms", self.time_ms.to_string()),
            ("queued_ms", self.queued_ms.to_string()),
        ]
    }

    pub fn from_map(map: &HashMap<String, String>) -> Self {
        let get = |k: &str| map.get(k).cloned().unwrap_or_default();
        Self {
            event_id: get("event_id"),
            name: get("name"),
            data: get("data"),
            coreid: get("coreid"),
            time_ms: get("time_ms").parse().unwrap_or(0),
            queued_ms: get("queued_ms").parse().unwrap_or(0),
        }
    }
}

/// The request body for `delivery`: the integration's template rendered,
/// or the default JSON `{"event","data","published_at","coreid"}`; and its
/// content type.
pub fn render(integration: &Integration, delivery: &Delivery) -> (String, &'static str) {
    let published_at = crate::iso_time(delivery.time_ms);
    match &integration.body {
        None => (
            json!({
                "event": delivery.name,
                "data": delivery.data,
                "published_at": published_at,
                "coreid": delivery.coreid,
            })
            .to_string(),
            "application/json",
        ),
        Some(template) => {
            let vars = [
                ("PARTICLE_EVENT_NAME", delivery.name.as_str()),
                ("PARTICLE_EVENT_VALUE", delivery.data.as_str()),
                ("PARTICLE_DEVICE_ID", delivery.coreid.as_str()),
                ("PARTICLE_PUBLISHED_AT", published_at.as_str()),
            ];
            let body = render_template(template, &vars);
            let kind = if serde_json::from_str::<Value>(&body).is_ok() {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            };
            (body, kind)
        }
    }
}

/// Mustache as Particle's templates use it: `{{{NAME}}}` is the value as
/// is, `{{NAME}}` the value HTML-escaped; an unknown name is empty.
pub fn render_template(template: &str, vars: &[(&str, &str)]) -> String {
    let lookup = |name: &str| {
        vars.iter()
            .find(|(k, _)| *k == name.trim())
            .map(|(_, v)| *v)
            .unwrap_or("")
    };
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(inner) = after.strip_prefix("{{{")
            && let Some(end) = inner.find("}}}")
        {
            out.push_str(lookup(&inner[..end]));
            rest = &inner[end + 3..];
        } else if let Some(inner) = after.strip_prefix("{{")
            && let Some(end) = inner.find("}}")
        {
            out.push_str(&html_escape(lookup(&inner[..end])));
            rest = &inner[end + 2..];
        } else {
            out.push_str(after);
            rest = "";
        }
    }
    out.push_str(rest);
    out
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '/' => out.push_str("&#x2F;"),
            c => out.push(c),
        }
    }
    out
}

/// `sha256=<hex>`: HMAC-SHA256 with `secret` over `<timestamp>.<body>`.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What a receiver does: recompute the signature over the received bytes
/// and compare in constant time.
pub fn verify(secret: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
    let Some(hex_mac) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(given) = hex::decode(hex_mac) else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// The Redis keys an integration owns (deleted with it).
pub fn owned_keys(id: &str) -> [String; 5] {
    [
        keys::webhook(id),
        keys::webhook_queue(id),
        keys::webhook_head(id),
        keys::webhook_dead(id),
        keys::webhook_lease(id),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn integration(body: Option<&str>) -> Integration {
        Integration {
            id: "w1".into(),
            org: "acme".into(),
            event: "temp".into(),
            device: String::new(),
            product: 0,
            url: "http://example.com/".into(),
            method: "POST".into(),
            headers: BTreeMap::new(),
            body: body.map(str::to_string),
            rate_limit: 0.0,
            secret: "s3cret".into(),
            created_ms: 0,
            errors: 0,
            last_error: String::new(),
            last_error_ms: 0,
            delivered: 0,
        }
    }

    fn delivery() -> Delivery {
        Delivery {
            event_id: "1-0".into(),
            name: "temp/room".into(),
            data: "<21.5>".into(),
            coreid: "0123456789abcdef01234567".into(),
            time_ms: 1_700_000_000_123,
            queued_ms: 1_700_000_000_200,
        }
    }

    #[test]
    fn templates_render_triple_raw_double_escaped_unknown_empty() {
        let (body, kind) = render(
            &integration(Some(
                r#"{"n":"{{{PARTICLE_EVENT_NAME}}}","v":"{{{PARTICLE_EVENT_VALUE}}}","e":"{{PARTICLE_EVENT_VALUE}}","d":"{{{PARTICLE_DEVICE_ID}}}","t":"{{{PARTICLE_PUBLISHED_AT}}}","x":"{{{NOPE}}}"}"#,
            )),
            &delivery(),
        );
        assert_eq!(kind, "application/json");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["n"], "temp/room");
        assert_eq!(v["v"], "<21.5>");
        assert_eq!(v["e"], "&lt;21.5&gt;");
        assert_eq!(v["d"], "0123456789abcdef01234567");
        assert_eq!(v["t"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["x"], "");
        assert_eq!(render_template("a {{{ b", &[]), "a {{{ b");
    }

    #[test]
    fn the_default_body_is_particles_json() {
        let (body, kind) = render(&integration(None), &delivery());
        assert_eq!(kind, "application/json");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["event"], "temp/room");
        assert_eq!(v["data"], "<21.5>");
        assert_eq!(v["coreid"], "0123456789abcdef01234567");
        assert_eq!(v["published_at"], "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let sig = signature("k", 1700, b"body");
        assert!(verify("k", 1700, b"body", &sig));
        assert!(!verify("k", 1701, b"body", &sig));
        assert!(!verify("k", 1700, b"bodY", &sig));
        assert!(!verify("other", 1700, b"body", &sig));
        assert!(!verify("k", 1700, b"body", "sha256=zz"));
    }

    #[test]
    fn filters_match_org_prefix_device_and_product() {
        let mut i = integration(None);
        assert!(i.matches("acme", "temp/room", "d1", Some(6)));
        assert!(!i.matches("other", "temp/room", "d1", Some(6)));
        assert!(!i.matches("acme", "humidity", "d1", Some(6)));
        i.device = "d1".into();
        assert!(!i.matches("acme", "temp", "d2", Some(6)));
        i.device.clear();
        i.product = 6;
        assert!(i.matches("acme", "temp", "d1", Some(6)));
        assert!(!i.matches("acme", "temp", "d1", Some(7)));
        assert!(!i.matches("acme", "temp", "", None));
    }
}
