//! The OpenAPI 3.1 document of the application API, generated from the
//! handlers' `#[utoipa::path]` attributes and the types they answer with,
//! served at `GET /v1/openapi.json` (no token needed).
//!
//! The event streams share one handler per resource across their
//! `…/events` and `…/events/{prefix}` routes, so they are documented here,
//! one operation per route. Every operation that takes a credential also
//! gets the error answers any gRPC status or the token check can produce
//! ([`CommonErrors`]), all with the [`ErrorBody`] schema.
use crate::devices::{
    ClaimRequest, Claimed, CoreInfo, Device, FunctionArgs, FunctionResult, Meta, ProductDevices,
    ProvisionRequest, Provisioned, VariableResult,
};
use crate::error::ErrorBody;
use crate::events::PublishRequest;
use crate::ota::{DeviceUpdate, FlashForm, FlashStarted};
use crate::tokens::{AccountInfo, CurrentToken, Mfa, OAuthToken, OAuthTokenRequest, OkReply, User};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use std::sync::OnceLock;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

/// The document's path.
pub const PATH: &str = "/v1/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Trellis application API",
        description = "Particle-compatible REST and server-sent events: the calls particle-cli 3.51 \
                       and particle-api-js 12 make (README, \"Application API\"). Every request \
                       carries a Trellis token: `Authorization: Bearer TOKEN` (or the \
                       `access_token` query parameter or form field)."
    ),
    paths(
        crate::tokens::oauth_token,
        crate::tokens::user,
        crate::tokens::current,
        crate::tokens::delete_current,
        crate::tokens::delete,
        crate::devices::list_devices,
        crate::devices::claim,
        crate::devices::provision,
        stream_events,
        stream_events_prefix,
        stream_devices_events,
        crate::events::publish,
        stream_devices_events_prefix,
        crate::devices::get_device,
        crate::ota::update_device,
        crate::devices::unclaim,
        stream_device_events,
        stream_device_events_prefix,
        crate::devices::get_variable,
        crate::devices::call_function,
        crate::devices::list_product_devices,
        crate::devices::get_product_device,
        crate::devices::get_product_variable,
        crate::devices::call_product_function,
        stream_product_events,
        crate::events::publish_product,
        stream_product_events_prefix,
        stream_org_events,
        crate::events::publish_org,
        stream_org_events_prefix,
        openapi_json,
        crate::devices::call_function_named_events,
        crate::webhooks::rest::create,
        crate::webhooks::rest::list,
        crate::webhooks::rest::get,
        crate::webhooks::rest::delete,
        crate::webhooks::rest::dead,
        crate::webhooks::rest::replay,
    ),
    components(schemas(
        ErrorBody,
        crate::webhooks::rest::IntegrationRequest,
        crate::webhooks::rest::IntegrationView,
        crate::webhooks::rest::Replayed,
        crate::ota::DeviceUpdated,
        crate::devices::Renamed,
        crate::devices::Signaled,
        Device,
        ProductDevices,
        Meta,
        FunctionResult,
        VariableResult,
        CoreInfo,
        Claimed,
        Provisioned,
        FunctionArgs,
        ClaimRequest,
        ProvisionRequest,
        PublishRequest,
        User,
        AccountInfo,
        Mfa,
        CurrentToken,
        OkReply,
        OAuthToken,
        OAuthTokenRequest,
        FlashStarted,
        FlashForm,
        DeviceUpdate,
    )),
    modifiers(&Security, &CommonErrors),
    security(("bearer" = []), ("access_token" = [])),
    tags(
        (name = "tokens", description = "The caller and their tokens"),
        (name = "devices", description = "Devices, functions, variables, key upload"),
        (name = "events", description = "Publishing events and server-sent event streams"),
        (name = "ota", description = "Flashing a signed release's image"),
    )
)]
pub struct ApiDoc;

/// The credentials: a bearer token (what the clients send), the same
/// token as the `access_token` query parameter, and HTTP Basic client
/// authentication for `/oauth/token`.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A Trellis token (`trellis token create`)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "access_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new("access_token"))),
        );
        components.add_security_scheme(
            "basic",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some(
                        "OAuth client id and secret (particle-cli, particle-api or particle, \
                         secret = id)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The answers any operation may give besides its own: the token check
/// (400 without a token, 401 for a bad one), the one gRPC -> HTTP mapping
/// ([`crate::error::ApiError::from_status`]) and the 502 of a Trellis
/// service refusing a valid token on the way.
struct CommonErrors;

/// Status, description.
const COMMON: [(&str, &str); 10] = [
    (
        "400",
        "No token (`invalid_request`), or the request is invalid",
    ),
    (
        "401",
        "The token is unknown, revoked, expired or malformed (`invalid_token`)",
    ),
    (
        "403",
        "Permission Denied: a device that is not the caller's, or a missing scope",
    ),
    ("408", "A device or service did not answer in time"),
    ("409", "Conflicts with the current state"),
    ("429", "Rate limited"),
    ("500", "An internal error in a Trellis service"),
    ("501", "Not implemented by a Trellis service"),
    (
        "502",
        "A Trellis service refused the request on the way although the token is valid",
    ),
    ("503", "A Trellis service is unavailable"),
];

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.options.as_mut(),
        item.head.as_mut(),
        item.patch.as_mut(),
        item.trace.as_mut(),
    ]
    .into_iter()
    .flatten()
}

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (status, description) in COMMON {
            components.responses.insert(
                format!("Error{status}"),
                RefOr::T(
                    ResponseBuilder::new()
                        .description(description)
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(Ref::from_schema_name("ErrorBody")))
                                .build(),
                        )
                        .build(),
                ),
            );
        }
        for (path, item) in openapi.paths.paths.iter_mut() {
            if path == PATH {
                continue;
            }
            for operation in operations(item) {
                // An operation that takes no credential cannot fail it.
                let anonymous = operation
                    .security
                    .as_ref()
                    .is_some_and(|s| s.iter().all(is_empty_requirement));
                for (status, _) in COMMON {
                    if anonymous && status == "401" {
                        continue;
                    }
                    operation
                        .responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| {
                            RefOr::Ref(Ref::from_response_name(format!("Error{status}")))
                        });
                }
            }
        }
    }
}

fn is_empty_requirement(requirement: &utoipa::openapi::security::SecurityRequirement) -> bool {
    serde_json::to_value(requirement)
        .ok()
        .and_then(|v| v.as_object().map(|o| o.is_empty()))
        .unwrap_or(false)
}

/// The document, made once.
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|e| format!("{{\"error\":\"the OpenAPI document failed: {e}\"}}"))
    })
}

/// `GET /v1/openapi.json`: this document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "tokens", security(()),
    responses((status = 200, description = "This OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi_json() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        document(),
    )
        .into_response()
}

// The event streams: `:ok` on open, then one `id:`/`event:`/`data:` frame
// per event (data: JSON `{data, ttl, published_at, coreid}`), a `:`
// keep-alive after 9 s of silence.

#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "Every event of the caller's organisation, as server-sent events", content_type = "text/event-stream", body = String)))]
#[allow(dead_code)]
fn stream_events() {}

#[utoipa::path(get, path = "/v1/events/{prefix}", tag = "events",
    params(("prefix" = String, Path, description = "Event name prefix (URL-encoded; may contain /)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "The caller's events whose name starts with the prefix", content_type = "text/event-stream", body = String)))]
#[allow(dead_code)]
fn stream_events_prefix() {}

#[utoipa::path(get, path = "/v1/devices/events", tag = "events",
    params(("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "Every event of the caller's devices, as server-sent events", content_type = "text/event-stream", body = String)))]
#[allow(dead_code)]
fn stream_devices_events() {}

#[utoipa::path(get, path = "/v1/devices/events/{prefix}", tag = "events",
    params(("prefix" = String, Path, description = "Event name prefix (URL-encoded; may contain /)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "The caller's devices' events whose name starts with the prefix", content_type = "text/event-stream", body = String)))]
#[allow(dead_code)]
fn stream_devices_events_prefix() {}

#[utoipa::path(get, path = "/v1/devices/{id}/events", tag = "events",
    params(("id" = String, Path, description = "Device id or name"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "One device's events, as server-sent events", content_type = "text/event-stream", body = String)))]
#[allow(dead_code)]
fn stream_device_events() {}

#[utoipa::path(get, path = "/v1/devices/{id}/events/{prefix}", tag = "events",
    params(("id" = String, Path, description = "Device id or name"),
        ("prefix" = String, Path, description = "Event name prefix (URL-encoded; may contain /)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "One device's events whose name starts with the prefix", content_type = "text/event-stream", body = String)))]
#[allow(dead_code)]
fn stream_device_events_prefix() {}

#[utoipa::path(get, path = "/v1/products/{p}/events", tag = "events",
    params(("p" = u32, Path, description = "Product id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses(
        (status = 200, description = "The events of one product's devices, as server-sent events", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such product", body = ErrorBody)))]
#[allow(dead_code)]
fn stream_product_events() {}

#[utoipa::path(get, path = "/v1/products/{p}/events/{prefix}", tag = "events",
    params(("p" = u32, Path, description = "Product id"),
        ("prefix" = String, Path, description = "Event name prefix (URL-encoded; may contain /)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses(
        (status = 200, description = "One product's events whose name starts with the prefix", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such product", body = ErrorBody)))]
#[allow(dead_code)]
fn stream_product_events_prefix() {}

#[utoipa::path(get, path = "/v1/orgs/{org}/events", tag = "events",
    params(("org" = String, Path, description = "The token's organisation"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "Every event of the organisation, as server-sent events", content_type = "text/event-stream", body = String)))]
#[allow(dead_code)]
fn stream_org_events() {}

#[utoipa::path(get, path = "/v1/orgs/{org}/events/{prefix}", tag = "events",
    params(("org" = String, Path, description = "The token's organisation"),
        ("prefix" = String, Path, description = "Event name prefix (URL-encoded; may contain /)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "The organisation's events whose name starts with the prefix", content_type = "text/event-stream", body = String)))]
#[allow(dead_code)]
fn stream_org_events_prefix() {}
