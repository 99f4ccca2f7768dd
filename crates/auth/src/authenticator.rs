//! From a request's `authorization: Bearer <token>` to the [`Principal`]
//! it names: the token record read from Redis (cached for a moment, so a
//! revocation or expiry takes effect within [`CACHE_FOR`]), its secret
//! compared in constant time, its expiry and revocation checked, its last
//! use recorded (at most once a minute) and a rate limit applied per token.
use crate::scope::Scope;
use crate::store::{self, TokenRecord};
use crate::token::Presented;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Status;
use trellis_core::redis_conn::Redis;
use trellis_core::time::now_ms;

/// How long a token record read from Redis is trusted.
pub const CACHE_FOR: Duration = Duration::from_secs(2);
/// How often a token's last-use time is written.
const TOUCH_EVERY_MS: i64 = 60_000;

/// Who is calling: from a verified token, or, with authentication off,
/// the development stand-in.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub token_id: String,
    pub org: String,
    pub user: String,
    pub scopes: Vec<Scope>,
}

impl Principal {
    /// With `auth.mode = "off"`: everything allowed, in the default
    /// organisation, and the audit says so.
    pub fn unauthenticated() -> Self {
        Self {
            token_id: String::new(),
            org: crate::DEFAULT_ORG.into(),
            user: "unauthenticated".into(),
            scopes: Scope::ALL.to_vec(),
        }
    }

    /// A service known by its certificate's role; `None` for roles that
    /// grant nothing by themselves (operator, keyvault).
    pub fn of_service_role(role: trellis_core::tls::Role) -> Option<Self> {
        use trellis_core::tls::Role;
        let scope = match role {
            Role::Gateway => Scope::ServiceGateway,
            Role::Signer => Scope::ServiceSigner,
            Role::Ota => Scope::ServiceOta,
            Role::Keyvault | Role::Operator => return None,
        };
        Some(Self {
            token_id: String::new(),
            org: "system".into(),
            user: format!("{role} (mTLS certificate)"),
            scopes: vec![scope],
        })
    }

    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// What the audit log names as the actor: never a value the caller sent.
    pub fn actor(&self) -> String {
        if self.token_id.is_empty() {
            format!("{}@{}", self.user, self.org)
        } else {
            format!("{}@{} (token {})", self.user, self.org, self.token_id)
        }
    }

    /// A service credential (acts across organisations).
    pub fn is_service(&self) -> bool {
        self.scopes.iter().any(|s| s.is_service())
    }

    /// Whether a record of organisation `org` is visible to this caller:
    /// its own organisation's, or any for a service.
    pub fn sees(&self, org: &str) -> bool {
        self.is_service() || self.org == org
    }

    /// The principal a handler was given by the [`crate::AuthLayer`].
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Principal, Status> {
        request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| {
                Status::internal("no principal: the service runs without its auth layer")
            })
    }
}

type Limiter = governor::DefaultKeyedRateLimiter<String>;

pub struct Authenticator {
    redis: Redis,
    cache: Mutex<HashMap<String, (TokenRecord, Instant)>>,
    limiter: Option<Limiter>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    /// `rate` requests per second per operator token (burst `burst`); 0:
    /// no limit. Service credentials are never limited: they carry the
    /// fleet's handshakes.
    pub fn new(redis: Redis, rate: u32, burst: u32) -> Arc<Self> {
        let limiter = NonZeroU32::new(rate).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst))
        });
        Arc::new(Self {
            redis,
            cache: Mutex::new(HashMap::new()),
            limiter,
        })
    }

    /// The principal behind an `authorization` header value.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Principal, Status> {
        let header = header.ok_or_else(|| {
            Status::unauthenticated(
                "no credentials: send `authorization: Bearer <token>` (trellis login, --token or TRELLIS_TOKEN)",
            )
        })?;
        let bearer = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header is not `Bearer <token>`")
            })?;
        let presented = Presented::parse(bearer)
            .ok_or_else(|| Status::unauthenticated("not a Trellis token"))?;
        let record = self.record(&presented.id).await?;
        // One answer for an unknown id and a wrong secret: which ids exist
        // is nobody's business.
        let Some(record) = record.filter(|r| presented.matches(&r.secret_sha256)) else {
            return Err(Status::unauthenticated("unknown token"));
        };
        let now = now_ms();
        if record.revoked_ms != 0 {
            return Err(Status::unauthenticated(format!(
                "token {} was revoked",
                record.id
            )));
        }
        if record.expired_at(now) {
            return Err(Status::unauthenticated(format!(
                "token {} has expired",
                record.id
            )));
        }
        let principal = Principal {
            token_id: record.id.clone(),
            org: record.org.clone(),
            user: record.user.clone(),
            scopes: record.scopes.clone(),
        };
        if !principal.is_service()
            && let Some(limiter) = &self.limiter
            && limiter.check_key(&record.id).is_err()
        {
            return Err(Status::resource_exhausted(format!(
                "token {} is over its request rate; slow down",
                record.id
            )));
        }
        if now - record.last_used_ms >= TOUCH_EVERY_MS {
            self.touch(&record.id, now);
        }
        Ok(principal)
    }

    async fn record(&self, id: &str) -> Result<Option<TokenRecord>, Status> {
        if let Some((record, at)) = self.lock().get(id)
            && at.elapsed() < CACHE_FOR
        {
            return Ok(Some(record.clone()));
        }
        let mut redis = self.redis.clone();
        let record = store::get_token(&mut redis, id)
            .await
            .map_err(|e| Status::unavailable(format!("cannot check the token: {e}")))?;
        let mut cache = self.lock();
        if cache.len() > 10_000 {
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_FOR);
        }
        if let Some(r) = &record {
            cache.insert(id.to_string(), (r.clone(), Instant::now()));
        }
        Ok(record)
    }

    fn touch(&self, id: &str, now: i64) {
        if let Some((record, _)) = self.lock().get_mut(id) {
            record.last_used_ms = now;
        }
        let mut redis = self.redis.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            if let Err(e) = store::touch_token(&mut redis, &id, now).await {
                tracing::debug!(token = %id, error = %e, "last-use time not written");
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (TokenRecord, Instant)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}
