//! Who may call what: organisations, their users and roles, scoped API
//! tokens, and the access rule of every gRPC method of every service.
//!
//! - [`scope`]: the scopes a token carries and the roles that grant them;
//! - [`token`]: the token format (shown once), its hash (all we keep);
//! - [`store`]: organisations, products, users and tokens in Redis;
//! - [`authenticator`]: bearer token -> [`Principal`], with a short cache,
//!   last-use times and a rate limit per token;
//! - [`access`]: the rule of every RPC (deny by default) and the tower
//!   layer every service's gRPC server runs behind;
//! - [`pki`]: the installation's CA and the role certificates of mutual
//!   TLS (`trellis certs`, `trellis up`).
pub mod access;
pub mod authenticator;
pub mod pki;
pub mod scope;
pub mod service;
pub mod setup;
pub mod store;
pub mod token;

pub use access::{AuthLayer, Rule, rule_for};
pub use authenticator::{Authenticator, Principal};
pub use scope::{Role, Scope};
pub use service::AccessService;

/// The organisation single-tenant data belongs to (migrated on first start).
pub const DEFAULT_ORG: &str = "default";
