//! The services the API calls, and the caller's token on every call.
//!
//! The API keeps no credential of its own: each request's Particle access
//! token is sent as the gRPC bearer token, and the services decide what it
//! may see (organisation scoping) and do (scopes). Over mutual TLS the API
//! shows the `operator` certificate, which grants nothing by itself.
use crate::error::ApiError;
use axum::http::HeaderMap;
use std::collections::HashMap;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use trellis_core::Config;
use trellis_core::tls::{Role, ServiceTls};
use trellis_proto::v1::access_client::AccessClient;
use trellis_proto::v1::device_service_client::DeviceServiceClient;
use trellis_proto::v1::key_vault_client::KeyVaultClient;
use trellis_proto::v1::ota_client::OtaClient;
use trellis_proto::v1::signer_client::SignerClient;

/// Lazily connected channels to the services (cheap to clone).
#[derive(Clone, Debug)]
pub struct Services {
    gateway: Channel,
    keyvault: Channel,
    signer: Channel,
    ota: Channel,
}

impl Services {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let tls = ServiceTls::load(config, Role::Operator)?;
        let channel = |what: &str, url: &str| -> anyhow::Result<Channel> {
            Ok(trellis_core::tls::endpoint(url, tls.as_ref())
                .map_err(|e| anyhow::anyhow!("api.{what}: {e}"))?
                .connect_timeout(std::time::Duration::from_secs(5))
                .tcp_nodelay(true)
                .connect_lazy())
        };
        Ok(Self {
            gateway: channel("gateway_url", &config.api.gateway_url)?,
            keyvault: channel("keyvault_url", &config.api.keyvault_url)?,
            signer: channel("signer_url", &config.api.signer_url)?,
            ota: channel("ota_url", &config.api.ota_url)?,
        })
    }

    pub fn devices(&self) -> DeviceServiceClient<Channel> {
        DeviceServiceClient::new(self.gateway.clone())
    }

    pub fn keyvault(&self) -> KeyVaultClient<Channel> {
        KeyVaultClient::new(self.keyvault.clone())
    }

    pub fn access(&self) -> AccessClient<Channel> {
        AccessClient::new(self.keyvault.clone())
    }

    pub fn signer(&self) -> SignerClient<Channel> {
        SignerClient::new(self.signer.clone()).max_decoding_message_size(64 * 1024 * 1024)
    }

    pub fn ota(&self) -> OtaClient<Channel> {
        OtaClient::new(self.ota.clone())
    }
}

/// A caller's token, checked only for being sendable as a header value;
/// the services check everything else.
#[derive(Clone)]
pub struct Token(MetadataValue<Ascii>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    pub fn new(token: &str) -> Result<Self, ApiError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(ApiError::MissingToken);
        }
        format!("Bearer {token}")
            .parse::<MetadataValue<Ascii>>()
            .map(Token)
            .map_err(|_| ApiError::InvalidToken)
    }

    /// The token from `Authorization: Bearer T`, else an `access_token`
    /// query parameter, else an `access_token` form field (Particle's cloud
    /// accepts all three; its own clients use the header).
    pub fn from_request(
        headers: &HeaderMap,
        query: &HashMap<String, String>,
        form: Option<&HashMap<String, String>>,
    ) -> Result<Self, ApiError> {
        if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
            let value = value.to_str().map_err(|_| ApiError::InvalidToken)?.trim();
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .ok_or(ApiError::InvalidToken)?;
            return Self::new(token);
        }
        if let Some(t) = query.get("access_token") {
            return Self::new(t);
        }
        if let Some(t) = form.and_then(|f| f.get("access_token")) {
            return Self::new(t);
        }
        Err(ApiError::MissingToken)
    }

    /// `message` as a gRPC request carrying this token.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = self.stream_request(message);
        request.set_timeout(std::time::Duration::from_secs(30));
        request
    }

    /// As [`Self::request`], without a deadline (streams). The current
    /// span's trace context goes along, so the service's span joins the
    /// HTTP request's trace.
    pub fn stream_request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        for (key, value) in trellis_core::telemetry::inject_fields() {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::<Ascii>::from_bytes(key.as_bytes()),
                value.parse::<MetadataValue<Ascii>>(),
            ) {
                metadata.insert(key, value);
            }
        }
        metadata.insert("authorization", self.0.clone());
        request
    }
}

/// The record id of a Trellis token (`trellis_<id>_<secret>`), if it is one.
pub fn token_id(token: &str) -> Option<String> {
    let rest = token.trim().strip_prefix("trellis_")?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && !secret.is_empty())
        .then(|| id.to_ascii_lowercase())
}
