//! Scopes a token may carry, and the roles (owner, admin, developer,
//! viewer) whose users get them.
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Devices, their state, variables and events; releases, policies and
    /// rollouts (the fleet as seen, nothing changed).
    DevicesRead,
    /// Call device functions.
    DevicesCall,
    /// Register, revoke and tag devices.
    DevicesAdmin,
    /// Upload firmware images, create releases.
    FirmwareWrite,
    /// Sign releases (cloud key), add signatures, set signing policies.
    ReleasesSign,
    /// Create, pause, resume and abort rollouts.
    RolloutsWrite,
    /// Read the audit log and refusal counts.
    AuditRead,
    /// Users, products and every token of the organisation.
    OrgAdmin,
    /// Create organisations and service tokens: the installation's first
    /// owner only.
    ClusterAdmin,
    /// Service credentials: what one service may ask of another.
    ServiceGateway,
    ServiceSigner,
    ServiceOta,
}

impl Scope {
    pub const ALL: [Scope; 12] = [
        Scope::DevicesRead,
        Scope::DevicesCall,
        Scope::DevicesAdmin,
        Scope::FirmwareWrite,
        Scope::ReleasesSign,
        Scope::RolloutsWrite,
        Scope::AuditRead,
        Scope::OrgAdmin,
        Scope::ClusterAdmin,
        Scope::ServiceGateway,
        Scope::ServiceSigner,
        Scope::ServiceOta,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::DevicesRead => "devices:read",
            Scope::DevicesCall => "devices:call",
            Scope::DevicesAdmin => "devices:admin",
            Scope::FirmwareWrite => "firmware:write",
            Scope::ReleasesSign => "releases:sign",
            Scope::RolloutsWrite => "rollouts:write",
            Scope::AuditRead => "audit:read",
            Scope::OrgAdmin => "org:admin",
            Scope::ClusterAdmin => "cluster:admin",
            Scope::ServiceGateway => "service:gateway",
            Scope::ServiceSigner => "service:signer",
            Scope::ServiceOta => "service:ota",
        }
    }

    /// A service credential's scope (never granted by a role).
    pub fn is_service(self) -> bool {
        matches!(
            self,
            Scope::ServiceGateway | Scope::ServiceSigner | Scope::ServiceOta
        )
    }

    /// Parses a space- or comma-separated list.
    pub fn parse_list(text: &str) -> Result<Vec<Scope>, UnknownScope> {
        let mut out: Vec<Scope> = text
            .split([' ', ','])
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        out.sort();
        out.dedup();
        Ok(out)
    }

    pub fn join(scopes: &[Scope]) -> String {
        scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unknown scope {0:?}; scopes are devices:read, devices:call, devices:admin, firmware:write, releases:sign, rollouts:write, audit:read, org:admin"
)]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| UnknownScope(s.to_string()))
    }
}

/// A user's role in an organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Owner,
    Admin,
    Developer,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Developer => "developer",
            Role::Viewer => "viewer",
        }
    }

    /// What a user with this role may do (and so the most a token they
    /// create may carry).
    pub fn scopes(self) -> Vec<Scope> {
        use Scope::*;
        match self {
            Role::Owner => vec![
                DevicesRead,
                DevicesCall,
                DevicesAdmin,
                FirmwareWrite,
                ReleasesSign,
                RolloutsWrite,
                AuditRead,
                OrgAdmin,
            ],
            Role::Admin => vec![
                DevicesRead,
                DevicesCall,
                DevicesAdmin,
                FirmwareWrite,
                ReleasesSign,
                RolloutsWrite,
                AuditRead,
            ],
            Role::Developer => vec![DevicesRead, DevicesCall, FirmwareWrite, RolloutsWrite],
            Role::Viewer => vec![DevicesRead],
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "owner" => Ok(Role::Owner),
            "admin" => Ok(Role::Admin),
            "developer" => Ok(Role::Developer),
            "viewer" => Ok(Role::Viewer),
            other => Err(format!(
                "unknown role {other:?}; roles are owner, admin, developer, viewer"
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_and_unknown_ones_are_named() {
        for s in Scope::ALL {
            assert_eq!(s.as_str().parse::<Scope>().unwrap(), s);
        }
        let list = Scope::parse_list("devices:read, audit:read devices:read").unwrap();
        assert_eq!(list, vec![Scope::DevicesRead, Scope::AuditRead]);
        let err = Scope::parse_list("devices:write").unwrap_err().to_string();
        assert!(err.contains("devices:write"), "{err}");
    }

    #[test]
    fn roles_grant_nested_scopes_and_never_service_ones() {
        let owner = Role::Owner.scopes();
        for role in [Role::Admin, Role::Developer, Role::Viewer] {
            assert!(role.scopes().iter().all(|s| owner.contains(s)), "{role}");
        }
        assert!(!Role::Admin.scopes().contains(&Scope::OrgAdmin));
        assert!(
            owner
                .iter()
                .all(|s| !s.is_service() && *s != Scope::ClusterAdmin)
        );
    }
}
