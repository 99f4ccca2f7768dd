//! The web console's files: `/` (the app shell) and `/console/assets/*`,
//! embedded in the binary (`services/api/console/`), so `trellis up` serves
//! the console with nothing else installed. Plain HTML, CSS and JavaScript
//! ES modules; no build step.
//!
//! Every console response (these files and the `/v1/trellis/...` JSON of
//! [`crate::console_api`]) carries [`security_headers`]: a strict
//! Content-Security-Policy (no inline script or style, nothing from another
//! origin, no framing), `X-Content-Type-Options: nosniff` and
//! `Referrer-Policy: no-referrer`.
//!
//! Caching: every file has a strong `ETag` (its SHA-256) and
//! `Cache-Control: no-cache`, so a browser revalidates (a `304` without a
//! body) and never runs a stale script after an upgrade.
use axum::body::Body;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

/// The console's Content-Security-Policy.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
form-action 'self'";

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../console/index.html"),
    },
    Asset {
        name: "console.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../console/console.css"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/api.js"),
    },
    Asset {
        name: "pages.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/pages.js"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../console/favicon.svg"),
    },
];

/// Each asset's ETag (quoted hex SHA-256), computed once.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| format!("\"{}\"", hex::encode(Sha256::digest(a.body))))
            .collect()
    })
}

/// Adds the console's security headers to a response.
pub fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|a| a.name == name) else {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "Not found",
        )
            .into_response();
    };
    let asset = &ASSETS[index];
    let etag = &etags()[index];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut response = if fresh {
        Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
    } else {
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, asset.content_type)
            .body(Body::from(asset.body))
    }
    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    response
}

/// `GET /`: the app shell.
pub async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

/// `GET /console/assets/{file}`.
pub async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    // The shell only under `/`, so there is one URL for it.
    if file == "index.html" {
        return serve("", &headers);
    }
    serve(&file, &headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_referenced_without_inline_code() {
        let html = std::str::from_utf8(ASSETS[0].body).expect("utf8");
        assert!(!html.contains("<style"), "inline style");
        assert!(!html.contains("style=\""), "inline style attribute");
        assert!(!html.contains("onclick"), "inline handler");
        for line in html.lines().filter(|l| l.contains("<script")) {
            assert!(line.contains("src=\"/console/assets/"), "{line}");
        }
        // Nothing names another origin (the SVG namespace is a name, not
        // a request).
        for asset in ASSETS {
            let text =
                String::from_utf8_lossy(asset.body).replace("http://www.w3.org/2000/svg", "");
            assert!(
                !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
                "{} must not reach another origin",
                asset.name
            );
        }
    }
}
