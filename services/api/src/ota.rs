//! `PUT /v1/devices/:id`: OTA by upload (multipart `file`); the JSON forms
//! (rename, signal) go to [`crate::devices::rename`] and
//! [`crate::devices::signal`].
//!
//! OTA keeps the security model: the uploaded bytes are never sent
//! anywhere. Their SHA-256 must be the image of a release of the device's
//! product whose signatures satisfy the product's policy (signer
//! VerifyRelease); the API then starts a one-device rollout of that
//! release (ota CreateRollout), and the device gets the signed release.
use crate::AppState;
use crate::devices::{body_fields, resolve};
use crate::error::ApiError;
use crate::grpc::Token;
use axum::Json;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use trellis_proto::v1::{
    CreateRolloutRequest, ListReleasesRequest, RolloutTarget, Stage, VerifyReleaseRequest,
};

/// Largest upload taken (the signer's default image limit is 16 MiB).
pub const MAX_UPLOAD: usize = 64 * 1024 * 1024;

fn how_to_sign(product: u32, sha: &str) -> String {
    format!(
        "Trellis sends only signed releases to devices, and this image (SHA-256 {sha}) is not the \
         image of a release of product {product} that meets the product's signing policy. Sign it \
         first: `trellis firmware upload FILE --product {product} --version V`, then \
         `trellis release manifest {product}-V -o M`, `trellis firmware sign --key KEY.pem M` \
         (offline), `trellis release add-signature {product}-V M.sig`, \
         `trellis release sign {product}-V` and `trellis release verify {product}-V`; then flash \
         the same file again"
    )
}

/// `PUT /v1/devices/:id` with a firmware image: the update started.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FlashStarted {
    pub id: String,
    /// The signed release whose image was uploaded.
    pub release_id: String,
    /// The one-device rollout that updates the device.
    pub rollout_id: String,
    /// Always `Update started`.
    pub status: String,
}

/// The multipart form of a flash.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct FlashForm {
    /// The firmware image: that of a signed release of the device's product.
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream")]
    pub file: Vec<u8>,
}

/// The JSON or form forms of `PUT /v1/devices/:id`: rename, signal.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct DeviceUpdate {
    /// A new name: unique in the organisation regardless of case, 1 to 64
    /// of letters, digits, `_` and `-`, not 24 hex digits; empty removes it.
    pub name: Option<String>,
    /// `"1"` to make the device signal, `"0"` to stop.
    pub signal: Option<String>,
}

/// What `PUT /v1/devices/:id` answers: a flash started, a rename, or a
/// signal the device acknowledged.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum DeviceUpdated {
    Flash(FlashStarted),
    Renamed(crate::devices::Renamed),
    Signaled(crate::devices::Signaled),
}

/// `PUT /v1/devices/:id`.
#[utoipa::path(put, path = "/v1/devices/{id}", tag = "ota",
    params(("id" = String, Path, description = "Device id or name")),
    request_body(content(
        (FlashForm = "multipart/form-data"),
        (DeviceUpdate = "application/json"),
        (DeviceUpdate = "application/x-www-form-urlencoded"))),
    responses(
        (status = 200, description = "The image is a signed release's: a one-device rollout started; or the device renamed; or its signal acknowledged", body = DeviceUpdated),
        (status = 413, description = "The upload is larger than 64 MiB", content_type = "text/plain")))]
pub async fn update_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Result<Json<DeviceUpdated>, ApiError> {
    let headers = request.headers().clone();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if !content_type.starts_with("multipart/form-data") {
        let body = axum::body::to_bytes(request.into_body(), 64 * 1024)
            .await
            .map_err(|e| ApiError::bad_request(format!("cannot read the body: {e}")))?;
        let fields = body_fields(&headers, &body)?;
        let token = Token::from_request(&headers, &query, Some(&fields))?;
        let device = resolve(&state, &token, &id, None).await?;
        if let Some(name) = fields.get("name") {
            let renamed = crate::devices::rename(&state, &token, &device, name).await?;
            return Ok(Json(DeviceUpdated::Renamed(renamed)));
        }
        if let Some(signal) = fields.get("signal") {
            let signaled = crate::devices::signal(&state, &token, &device, signal).await?;
            return Ok(Json(DeviceUpdated::Signaled(signaled)));
        }
        return Err(ApiError::bad_request(
            "give a firmware file as multipart field `file` to flash the device, `name` to \
             rename it or `signal` (\"1\"/\"0\") to make it signal",
        ));
    }
    let mut multipart = Multipart::from_request(request, &state)
        .await
        .map_err(|e| ApiError::bad_request(format!("the multipart body is malformed: {e}")))?;
    // The image is hashed as it arrives, never held: only its SHA-256 and
    // size matter (the device gets the signed release, not these bytes).
    let mut image: Option<(String, u64)> = None;
    let mut form = HashMap::new();
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("the multipart body is malformed: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let read_error = |e: axum::extract::multipart::MultipartError| {
            ApiError::bad_request(format!("cannot read multipart field {name}: {e}"))
        };
        if name == "file" {
            if image.is_some() {
                return Err(ApiError::bad_request(
                    "flash one image at a time: Trellis releases are one signed image",
                ));
            }
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = field.chunk().await.map_err(read_error)? {
                size += chunk.len() as u64;
                hasher.update(&chunk);
            }
            image = Some((hex::encode(hasher.finalize()), size));
        } else if name.starts_with("file") {
            return Err(ApiError::bad_request(
                "flash one image at a time: Trellis releases are one signed image",
            ));
        } else {
            let bytes = field.bytes().await.map_err(read_error)?;
            if bytes.len() <= 4096 {
                form.insert(name, String::from_utf8_lossy(&bytes).into_owned());
            }
        }
    }
    let token = Token::from_request(&headers, &query, Some(&form))?;
    let device = resolve(&state, &token, &id, None).await?;
    let Some((sha, size)) = image.filter(|(_, size)| *size > 0) else {
        return Err(ApiError::bad_request(
            "no firmware: give the image as multipart field `file`",
        ));
    };
    tracing::info!(device = %device.device_id, product = device.product_id, sha256 = %sha, bytes = size, "flash requested");
    let mut releases = state
        .services
        .signer()
        .list_releases(token.request(ListReleasesRequest {
            product_id: device.product_id,
        }))
        .await?
        .into_inner()
        .releases;
    releases
        .retain(|r| r.product_id == device.product_id && r.image_sha256.eq_ignore_ascii_case(&sha));
    // Newest version first: the one a reflash most likely means.
    releases.sort_by_key(|r| std::cmp::Reverse(r.version));
    let mut refusals = Vec::new();
    for release in releases {
        let verdict = state
            .services
            .signer()
            .verify_release(token.request(VerifyReleaseRequest {
                release_id: release.release_id.clone(),
            }))
            .await?
            .into_inner();
        if !verdict.satisfied {
            refusals.push(format!(
                "release {} is not signed enough ({}; missing: {})",
                release.release_id,
                verdict.message,
                verdict.missing.join(", ")
            ));
            continue;
        }
        let rollout = state
            .services
            .ota()
            .create_rollout(token.request(CreateRolloutRequest {
                release_id: release.release_id.clone(),
                target: Some(RolloutTarget {
                    product_id: device.product_id,
                    device_ids: vec![device.device_id.clone()],
                    percent: 0,
                    tag: String::new(),
                }),
                stages: vec![Stage {
                    name: "api".into(),
                    device_count: 0,
                    percent: 100,
                    soak_secs: 0,
                    min_success_ratio: 0.0,
                }],
                max_failure_ratio: 1.0,
                max_concurrent: 1,
                ..Default::default()
            }))
            .await?
            .into_inner();
        tracing::info!(device = %device.device_id, release = %release.release_id, rollout = %rollout.rollout_id, "flash started");
        return Ok(Json(DeviceUpdated::Flash(FlashStarted {
            id: device.device_id,
            release_id: release.release_id,
            rollout_id: rollout.rollout_id,
            status: "Update started".into(),
        })));
    }
    let mut message = how_to_sign(device.product_id, &sha);
    if !refusals.is_empty() {
        message = format!("{}. {message}", refusals.join("; "));
    }
    Err(ApiError::Other(StatusCode::BAD_REQUEST, message))
}
