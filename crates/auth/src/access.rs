//! The access rule of every gRPC method, and the tower layer that applies
//! it in front of every service. A method without a rule is refused
//! (PERMISSION_DENIED), and a test enumerates every method of every proto
//! service so that a new RPC cannot ship without one.
use crate::authenticator::{Authenticator, Principal};
use crate::scope::Scope;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::Status;

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Anyone (public keys).
    Public,
    /// Any valid token; the handler decides the rest (tokens, whoami).
    Authenticated,
    /// A token carrying this scope (a service credential's scopes are
    /// never operator scopes).
    Scope(Scope),
    /// A service credential of this kind.
    Service(Scope),
    /// An operator with the scope, or one of these services.
    ScopeOrService(Scope, &'static [Scope]),
}

impl Rule {
    /// `Ok` when `principal` may call a method with this rule.
    pub fn check(self, principal: &Principal) -> Result<(), Status> {
        let allowed = match self {
            Rule::Public | Rule::Authenticated => true,
            Rule::Scope(s) | Rule::Service(s) => principal.has(s),
            Rule::ScopeOrService(s, services) => {
                principal.has(s) || services.iter().any(|svc| principal.has(*svc))
            }
        };
        if allowed {
            return Ok(());
        }
        Err(Status::permission_denied(match self {
            Rule::Scope(s) => format!("this needs a token with the {s} scope"),
            Rule::Service(s) => format!("only a service credential with {s} may call this"),
            Rule::ScopeOrService(s, _) => format!("this needs a token with the {s} scope"),
            Rule::Public | Rule::Authenticated => unreachable_rule(),
        }))
    }
}

fn unreachable_rule() -> String {
    "refused".into()
}

use Rule::*;
use Scope::*;

/// Every method's rule, by gRPC path (`/package.Service/Method`).
pub const RULES: &[(&str, Rule)] = &[
    // Key vault: registry, keys, audit.
    ("/trellis.v1.KeyVault/RegisterDevice", Scope(DevicesAdmin)),
    (
        "/trellis.v1.KeyVault/GetDevice",
        ScopeOrService(DevicesRead, &[ServiceGateway, ServiceOta]),
    ),
    (
        "/trellis.v1.KeyVault/ListDevices",
        ScopeOrService(DevicesRead, &[ServiceGateway, ServiceOta]),
    ),
    ("/trellis.v1.KeyVault/RevokeDevice", Scope(DevicesAdmin)),
    ("/trellis.v1.KeyVault/DeleteDevice", Scope(DevicesAdmin)),
    ("/trellis.v1.KeyVault/LiftQuarantine", Scope(DevicesAdmin)),
    ("/trellis.v1.KeyVault/ListPending", Scope(ClusterAdmin)),
    ("/trellis.v1.KeyVault/ApprovePending", Scope(DevicesAdmin)),
    ("/trellis.v1.KeyVault/RejectPending", Scope(ClusterAdmin)),
    ("/trellis.v1.KeyVault/SetDeviceTags", Scope(DevicesAdmin)),
    ("/trellis.v1.KeyVault/SetDeviceName", Scope(DevicesAdmin)),
    ("/trellis.v1.KeyVault/GetCloudPublicKey", Public),
    ("/trellis.v1.KeyVault/OpenSession", Service(ServiceGateway)),
    ("/trellis.v1.KeyVault/Sign", Service(ServiceSigner)),
    ("/trellis.v1.KeyVault/GetSigningKey", Public),
    ("/trellis.v1.KeyVault/ListSigningKeys", Public),
    // Release key versions are the installation's, like the cloud key's.
    ("/trellis.v1.KeyVault/RotateSigningKey", Scope(ClusterAdmin)),
    ("/trellis.v1.KeyVault/RetireSigningKey", Scope(ClusterAdmin)),
    (
        "/trellis.v1.KeyVault/UnretireSigningKey",
        Scope(ClusterAdmin),
    ),
    ("/trellis.v1.KeyVault/ListAudit", Scope(AuditRead)),
    ("/trellis.v1.KeyVault/ListRefusals", Scope(AuditRead)),
    // Cloud key versions are the installation's, not an organisation's.
    ("/trellis.v1.KeyVault/RotateCloudKey", Scope(ClusterAdmin)),
    ("/trellis.v1.KeyVault/CloudKeyStatus", Scope(ClusterAdmin)),
    ("/trellis.v1.KeyVault/RetireCloudKey", Scope(ClusterAdmin)),
    ("/trellis.v1.KeyVault/UnretireCloudKey", Scope(ClusterAdmin)),
    (
        "/trellis.v1.KeyVault/GetCloudKeyAnnouncement",
        Service(ServiceGateway),
    ),
    (
        "/trellis.v1.KeyVault/RegisterNextDeviceKey",
        Service(ServiceGateway),
    ),
    // Organisations, users, tokens (served by keyvault).
    ("/trellis.v1.Access/WhoAmI", Authenticated),
    ("/trellis.v1.Access/CreateOrg", Scope(ClusterAdmin)),
    ("/trellis.v1.Access/ListOrgs", Authenticated),
    ("/trellis.v1.Access/CreateProduct", Scope(OrgAdmin)),
    ("/trellis.v1.Access/ListProducts", Scope(DevicesRead)),
    ("/trellis.v1.Access/AddUser", Scope(OrgAdmin)),
    ("/trellis.v1.Access/ListUsers", Scope(OrgAdmin)),
    ("/trellis.v1.Access/RemoveUser", Scope(OrgAdmin)),
    ("/trellis.v1.Access/CreateToken", Authenticated),
    ("/trellis.v1.Access/ListTokens", Authenticated),
    ("/trellis.v1.Access/RevokeToken", Authenticated),
    // Gateways: devices in session.
    ("/trellis.v1.DeviceService/ListDevices", Scope(DevicesRead)),
    (
        "/trellis.v1.DeviceService/GetDeviceState",
        Scope(DevicesRead),
    ),
    ("/trellis.v1.DeviceService/CallFunction", Scope(DevicesCall)),
    ("/trellis.v1.DeviceService/GetVariable", Scope(DevicesRead)),
    ("/trellis.v1.DeviceService/StreamEvents", Scope(DevicesRead)),
    (
        "/trellis.v1.DeviceService/DeliverUpdate",
        Service(ServiceOta),
    ),
    // Events from users and apps, seen by their organisation only.
    ("/trellis.v1.DeviceService/PublishEvent", Scope(DevicesCall)),
    ("/trellis.v1.DeviceService/SignalDevice", Scope(DevicesCall)),
    (
        "/trellis.v1.DeviceService/RotateDeviceKey",
        Scope(DevicesAdmin),
    ),
    // Signer: images, releases, policies.
    ("/trellis.v1.Signer/UploadImage", Scope(FirmwareWrite)),
    (
        "/trellis.v1.Signer/GetImage",
        ScopeOrService(DevicesRead, &[ServiceOta]),
    ),
    ("/trellis.v1.Signer/CreateRelease", Scope(FirmwareWrite)),
    ("/trellis.v1.Signer/SignRelease", Scope(ReleasesSign)),
    ("/trellis.v1.Signer/AddSignature", Scope(ReleasesSign)),
    (
        "/trellis.v1.Signer/GetRelease",
        ScopeOrService(DevicesRead, &[ServiceOta]),
    ),
    ("/trellis.v1.Signer/ListReleases", Scope(DevicesRead)),
    ("/trellis.v1.Signer/SetPolicy", Scope(ReleasesSign)),
    (
        "/trellis.v1.Signer/GetPolicy",
        ScopeOrService(DevicesRead, &[ServiceOta]),
    ),
    (
        "/trellis.v1.Signer/VerifyRelease",
        ScopeOrService(DevicesRead, &[ServiceOta]),
    ),
    // Trust policy rotation: policy releases, signed like releases.
    (
        "/trellis.v1.Signer/CreatePolicyRelease",
        Scope(ReleasesSign),
    ),
    ("/trellis.v1.Signer/SignPolicyRelease", Scope(ReleasesSign)),
    ("/trellis.v1.Signer/AddPolicySignature", Scope(ReleasesSign)),
    (
        "/trellis.v1.Signer/GetPolicyRelease",
        ScopeOrService(DevicesRead, &[ServiceOta]),
    ),
    ("/trellis.v1.Signer/ListPolicyReleases", Scope(DevicesRead)),
    // OTA scheduler: rollouts.
    ("/trellis.v1.Ota/CreateRollout", Scope(RolloutsWrite)),
    ("/trellis.v1.Ota/GetRollout", Scope(DevicesRead)),
    ("/trellis.v1.Ota/ListRollouts", Scope(DevicesRead)),
    ("/trellis.v1.Ota/PauseRollout", Scope(RolloutsWrite)),
    ("/trellis.v1.Ota/ResumeRollout", Scope(RolloutsWrite)),
    ("/trellis.v1.Ota/AbortRollout", Scope(RolloutsWrite)),
    ("/trellis.v1.Ota/WatchRollout", Scope(DevicesRead)),
    ("/trellis.v1.Ota/DeviceHello", Service(ServiceGateway)),
    ("/trellis.v1.Ota/ReportDelivery", Service(ServiceGateway)),
];

/// The rule of a method path, `None` for a method nobody gave one.
pub fn rule_for(path: &str) -> Option<Rule> {
    RULES.iter().find(|(p, _)| *p == path).map(|(_, r)| *r)
}

/// How a service checks its callers.
#[derive(Clone)]
pub enum Mode {
    /// Every method's rule applies.
    Enforce(Arc<Authenticator>),
    /// Nobody is checked (`auth.mode = "off"`, development only; logged
    /// as a warning at every start).
    Off,
}

/// Tower layer for a tonic server: finds the method's rule, authenticates
/// the caller, checks the rule and hands the [`Principal`] to the handler
/// in the request's extensions; refuses otherwise, before the handler
/// runs.
#[derive(Clone)]
pub struct AuthLayer {
    mode: Mode,
}

impl AuthLayer {
    pub fn new(mode: Mode) -> Self {
        Self { mode }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            mode: self.mode.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    mode: Mode,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The ready service handles this request; a fresh clone waits for
        // the next (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let mode = self.mode.clone();
        let path = request.uri().path().to_string();
        let header = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let peer = Peer::of(request.extensions());
        Box::pin(async move {
            match admit(&mode, &path, header.as_deref(), peer).await {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// What the transport says of the caller.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The certificates the server verified when the call came over
    /// mutual TLS (leaf first); `None` on plaintext.
    certs: Option<Arc<Vec<tonic::transport::CertificateDer<'static>>>>,
}

impl Peer {
    fn of(extensions: &http::Extensions) -> Self {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let certs = extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .map(|info| info.peer_certs().unwrap_or_default());
        Peer { certs }
    }

    fn tls(&self) -> bool {
        self.certs.is_some()
    }

    /// The role the leaf certificate names. Parsed only when asked: calls
    /// that carry a token never need it.
    fn role(&self) -> Option<trellis_core::tls::Role> {
        self.certs
            .as_ref()?
            .first()
            .and_then(|leaf| crate::pki::role_of(leaf))
    }
}

/// Who the caller is. Over mutual TLS a service is its certificate's role
/// and nothing else: a token's service scopes count only on a plaintext
/// installation, so a stolen service token is useless without the key of
/// a service certificate. Operators always need a token.
pub async fn admit(
    mode: &Mode,
    path: &str,
    header: Option<&str>,
    peer: Peer,
) -> Result<Principal, Status> {
    let Mode::Enforce(authenticator) = mode else {
        return Ok(Principal::unauthenticated());
    };
    let Some(rule) = rule_for(path) else {
        return Err(Status::permission_denied(format!(
            "{path} has no access rule"
        )));
    };
    if rule == Rule::Public {
        return Ok(Principal {
            token_id: String::new(),
            org: String::new(),
            user: "anonymous".into(),
            scopes: Vec::new(),
        });
    }
    let service = match header {
        None => peer.role().and_then(Principal::of_service_role),
        Some(_) => None,
    };
    let principal = match service {
        Some(service) => service,
        None => {
            let mut principal = authenticator.authenticate(header).await?;
            if peer.tls() {
                principal.scopes.retain(|s| !s.is_service());
            }
            principal
        }
    };
    rule.check(&principal)?;
    Ok(principal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_has_one_rule() {
        let mut paths: Vec<&str> = RULES.iter().map(|(p, _)| *p).collect();
        paths.sort();
        let before = paths.len();
        paths.dedup();
        assert_eq!(before, paths.len(), "a path listed twice");
    }

    #[test]
    fn rules_check_scopes_and_service_kinds() {
        let viewer = Principal {
            token_id: "t".into(),
            org: "o".into(),
            user: "u".into(),
            scopes: vec![Scope::DevicesRead],
        };
        assert!(Rule::Scope(Scope::DevicesRead).check(&viewer).is_ok());
        let e = Rule::Scope(Scope::DevicesCall).check(&viewer).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("devices:call"));
        assert!(Rule::Service(Scope::ServiceGateway).check(&viewer).is_err());
        let gateway = Principal {
            scopes: vec![Scope::ServiceGateway],
            ..viewer.clone()
        };
        assert!(Rule::Service(Scope::ServiceGateway).check(&gateway).is_ok());
        assert!(Rule::Service(Scope::ServiceSigner).check(&gateway).is_err());
        assert!(Rule::Scope(Scope::DevicesRead).check(&gateway).is_err());
        assert!(gateway.sees("any-org") && !viewer.sees("other"));
    }

    #[test]
    fn key_rotation_needs_its_scopes() {
        let caller = |scopes: Vec<Scope>| Principal {
            token_id: "t".into(),
            org: "o".into(),
            user: "u".into(),
            scopes,
        };
        let check = |path: &str, p: &Principal| rule_for(path).expect("a rule").check(p);
        // Device key rotation: devices:admin; a caller who may only call
        // functions is refused.
        let rotate = "/trellis.v1.DeviceService/RotateDeviceKey";
        let e = check(
            rotate,
            &caller(vec![Scope::DevicesRead, Scope::DevicesCall]),
        )
        .expect_err("refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("devices:admin"), "{}", e.message());
        assert!(check(rotate, &caller(vec![Scope::DevicesAdmin])).is_ok());
        // Cloud key versions: the installation's admin only; an
        // organisation's owner (every role scope) is refused.
        for m in [
            "RotateCloudKey",
            "CloudKeyStatus",
            "RetireCloudKey",
            "UnretireCloudKey",
            "RotateSigningKey",
            "RetireSigningKey",
            "UnretireSigningKey",
        ] {
            let path = format!("/trellis.v1.KeyVault/{m}");
            assert!(
                check(&path, &caller(crate::Role::Owner.scopes())).is_err(),
                "{m}"
            );
            assert!(
                check(&path, &caller(vec![Scope::ClusterAdmin])).is_ok(),
                "{m}"
            );
        }
        // What gateways ask of keyvault: their service credential only.
        for m in ["GetCloudKeyAnnouncement", "RegisterNextDeviceKey"] {
            let path = format!("/trellis.v1.KeyVault/{m}");
            assert!(
                check(&path, &caller(crate::Role::Owner.scopes())).is_err(),
                "{m}"
            );
            assert!(
                check(&path, &caller(vec![Scope::ServiceGateway])).is_ok(),
                "{m}"
            );
        }
    }
}
