//! Organisations, products, users and tokens, in the durable Redis.
//!
//! `trellis:org:<org>` (hash) and `trellis:orgs` (set); `trellis:product:<id>`
//! (hash: org, name) and `trellis:products`; `trellis:user:<org>:<user>`
//! (hash: role) and `trellis:users:<org>`; `trellis:token:<id>` (hash: the
//! secret's SHA-256, org, user, name, scopes, created/expires/
//! revoked times) and `trellis:tokens:<org>`; last use in `trellis:token-use`.
use crate::scope::{Role, Scope};
use crate::token::NewToken;
use redis::AsyncCommands;
use std::collections::HashMap;
use trellis_core::redis_conn::Redis;
use trellis_core::time::now_ms;

// Key names live with every other service's, in one place.
use trellis_core::redis_conn::keys;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Invalid(_) => tonic::Status::invalid_argument(e.to_string()),
            StoreError::Exists(_) => tonic::Status::already_exists(e.to_string()),
            StoreError::NotFound(_) => tonic::Status::not_found(e.to_string()),
            StoreError::Redis(_) => tonic::Status::unavailable(e.to_string()),
        }
    }
}

/// Organisation and user names: 1-64 of `a-z 0-9 . _ -`, starting with a
/// letter or digit (they are parts of Redis keys).
pub fn check_name(what: &str, name: &str) -> Result<(), StoreError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{what} {name:?}: use 1-64 characters of a-z 0-9 . _ -, starting with a letter or digit"
        )))
    }
}

pub async fn create_org(redis: &mut Redis, org: &str) -> Result<(), StoreError> {
    check_name("organisation", org)?;
    let created: bool = redis
        .hset_nx(keys::org(org), "created_ms", now_ms())
        .await?;
    if !created {
        return Err(StoreError::Exists(format!("organisation {org}")));
    }
    let _: () = redis.sadd(keys::ORGS, org).await?;
    Ok(())
}

/// Makes the organisation if it is not there (first start, migration).
pub async fn ensure_org(redis: &mut Redis, org: &str) -> Result<(), StoreError> {
    match create_org(redis, org).await {
        Ok(()) | Err(StoreError::Exists(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

pub async fn org_exists(redis: &mut Redis, org: &str) -> Result<bool, StoreError> {
    Ok(redis.sismember(keys::ORGS, org).await?)
}

pub async fn list_orgs(redis: &mut Redis) -> Result<Vec<String>, StoreError> {
    let mut orgs: Vec<String> = redis.smembers(keys::ORGS).await?;
    orgs.sort();
    Ok(orgs)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    pub id: u32,
    pub org: String,
    pub name: String,
}

pub async fn create_product(
    redis: &mut Redis,
    org: &str,
    id: u32,
    name: &str,
) -> Result<Product, StoreError> {
    if id == 0 {
        return Err(StoreError::Invalid("product id 0 is reserved".into()));
    }
    let key = keys::product(id);
    let created: bool = redis.hset_nx(&key, "org", org).await?;
    if !created {
        let owner: Option<String> = redis.hget(&key, "org").await?;
        // Another organisation's product is reported as taken, not named.
        return Err(StoreError::Exists(if owner.as_deref() == Some(org) {
            format!("product {id}")
        } else {
            format!("product id {id} (choose another)")
        }));
    }
    let _: () = redis
        .hset_multiple(
            &key,
            &[
                ("name", name.to_string()),
                ("created_ms", now_ms().to_string()),
            ],
        )
        .await?;
    let _: () = redis.sadd(keys::PRODUCTS, id).await?;
    Ok(Product {
        id,
        org: org.into(),
        name: name.into(),
    })
}

/// The organisation that owns product `id`; products made before
/// organisations existed belong to [`crate::DEFAULT_ORG`].
pub async fn product_org(redis: &mut Redis, id: u32) -> Result<String, StoreError> {
    let org: Option<String> = redis.hget(keys::product(id), "org").await?;
    Ok(org.unwrap_or_else(|| crate::DEFAULT_ORG.to_string()))
}

pub async fn list_products(redis: &mut Redis, org: &str) -> Result<Vec<Product>, StoreError> {
    let ids: Vec<u32> = redis.smembers(keys::PRODUCTS).await?;
    let mut out = Vec::new();
    for id in ids {
        let h: HashMap<String, String> = redis.hgetall(keys::product(id)).await?;
        if h.get("org").map(String::as_str) == Some(org) {
            out.push(Product {
                id,
                org: org.into(),
                name: h.get("name").cloned().unwrap_or_default(),
            });
        }
    }
    out.sort_by_key(|p| p.id);
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub org: String,
    pub name: String,
    pub role: Role,
}

pub async fn add_user(
    redis: &mut Redis,
    org: &str,
    name: &str,
    role: Role,
) -> Result<User, StoreError> {
    check_name("user", name)?;
    if !org_exists(redis, org).await? {
        return Err(StoreError::NotFound(format!("organisation {org}")));
    }
    let created: bool = redis
        .hset_nx(keys::user(org, name), "role", role.as_str())
        .await?;
    if !created {
        return Err(StoreError::Exists(format!("user {name} in {org}")));
    }
    let _: () = redis
        .hset(keys::user(org, name), "created_ms", now_ms())
        .await?;
    let _: () = redis.sadd(keys::users(org), name).await?;
    Ok(User {
        org: org.into(),
        name: name.into(),
        role,
    })
}

pub async fn get_user(
    redis: &mut Redis,
    org: &str,
    name: &str,
) -> Result<Option<User>, StoreError> {
    let role: Option<String> = redis.hget(keys::user(org, name), "role").await?;
    Ok(role.and_then(|r| r.parse().ok()).map(|role| User {
        org: org.into(),
        name: name.into(),
        role,
    }))
}

pub async fn list_users(redis: &mut Redis, org: &str) -> Result<Vec<User>, StoreError> {
    let mut names: Vec<String> = redis.smembers(keys::users(org)).await?;
    names.sort();
    let mut out = Vec::new();
    for name in names {
        if let Some(u) = get_user(redis, org, &name).await? {
            out.push(u);
        }
    }
    Ok(out)
}

/// Removes the user and revokes every token they hold.
pub async fn remove_user(redis: &mut Redis, org: &str, name: &str) -> Result<usize, StoreError> {
    let removed: usize = redis.del(keys::user(org, name)).await?;
    if removed == 0 {
        return Err(StoreError::NotFound(format!("user {name} in {org}")));
    }
    let _: () = redis.srem(keys::users(org), name).await?;
    let mut revoked = 0;
    for t in list_tokens(redis, org).await? {
        if t.user == name && t.revoked_ms == 0 {
            revoke_token(redis, &t.id).await?;
            revoked += 1;
        }
    }
    Ok(revoked)
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    pub org: String,
    pub user: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub created_ms: i64,
    /// 0: never expires.
    pub expires_ms: i64,
    pub last_used_ms: i64,
    /// 0: not revoked.
    pub revoked_ms: i64,
}

impl TokenRecord {
    fn from_hash(id: &str, h: &HashMap<String, String>) -> Option<Self> {
        let num = |k: &str| h.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        Some(Self {
            id: id.to_string(),
            secret_sha256: h.get("secret_sha256")?.clone(),
            org: h.get("org")?.clone(),
            user: h.get("user").cloned().unwrap_or_default(),
            name: h.get("name").cloned().unwrap_or_default(),
            scopes: Scope::parse_list(h.get("scopes").map(String::as_str).unwrap_or(""))
                .unwrap_or_default(),
            created_ms: num("created_ms"),
            expires_ms: num("expires_ms"),
            last_used_ms: num("last_used_ms"),
            revoked_ms: num("revoked_ms"),
        })
    }

    pub fn expired_at(&self, now_ms: i64) -> bool {
        self.expires_ms != 0 && now_ms >= self.expires_ms
    }
}

pub struct TokenRequest<'a> {
    pub org: &'a str,
    pub user: &'a str,
    pub name: &'a str,
    pub scopes: &'a [Scope],
    /// 0: never expires.
    pub expires_ms: i64,
}

/// Stores a new token's hash and returns the token (its bearer string is
/// in nobody's hands but the caller's from here on).
pub async fn create_token(
    redis: &mut Redis,
    req: TokenRequest<'_>,
) -> Result<(NewToken, TokenRecord), StoreError> {
    if req.scopes.is_empty() {
        return Err(StoreError::Invalid(
            "a token needs at least one scope".into(),
        ));
    }
    let token = NewToken::generate();
    let record = TokenRecord {
        id: token.id.clone(),
        secret_sha256: token.secret_sha256.clone(),
        org: req.org.into(),
        user: req.user.into(),
        name: req.name.into(),
        scopes: req.scopes.to_vec(),
        created_ms: now_ms(),
        expires_ms: req.expires_ms,
        last_used_ms: 0,
        revoked_ms: 0,
    };
    let _: () = redis
        .hset_multiple(
            keys::token(&record.id),
            &[
                ("secret_sha256", record.secret_sha256.clone()),
                ("org", record.org.clone()),
                ("user", record.user.clone()),
                ("name", record.name.clone()),
                ("scopes", Scope::join(&record.scopes)),
                ("created_ms", record.created_ms.to_string()),
                ("expires_ms", record.expires_ms.to_string()),
                ("revoked_ms", "0".into()),
            ],
        )
        .await?;
    let _: () = redis.sadd(keys::tokens(&record.org), &record.id).await?;
    Ok((token, record))
}

pub async fn get_token(redis: &mut Redis, id: &str) -> Result<Option<TokenRecord>, StoreError> {
    let (h, used): (HashMap<String, String>, Option<i64>) = redis::pipe()
        .hgetall(keys::token(id))
        .hget(keys::TOKEN_USE, id)
        .query_async(redis)
        .await?;
    Ok(TokenRecord::from_hash(id, &h).map(|mut t| {
        // Tokens made before last use moved out of the record carry it there.
        t.last_used_ms = t.last_used_ms.max(used.unwrap_or(0));
        t
    }))
}

pub async fn list_tokens(redis: &mut Redis, org: &str) -> Result<Vec<TokenRecord>, StoreError> {
    let ids: Vec<String> = redis.smembers(keys::tokens(org)).await?;
    let mut out = Vec::new();
    for id in ids {
        if let Some(t) = get_token(redis, &id).await? {
            out.push(t);
        }
    }
    out.sort_by_key(|t| t.created_ms);
    Ok(out)
}

pub async fn revoke_token(redis: &mut Redis, id: &str) -> Result<(), StoreError> {
    let exists: bool = redis.exists(keys::token(id)).await?;
    if !exists {
        return Err(StoreError::NotFound(format!("token {id}")));
    }
    let _: () = redis.hset(keys::token(id), "revoked_ms", now_ms()).await?;
    Ok(())
}

/// Records a token's last use in `trellis:token-use`, not in the token's
/// record: every service checks tokens, and none but keyvault may write
/// the records (scopes, organisation, revocation).
pub async fn touch_token(redis: &mut Redis, id: &str, at_ms: i64) -> Result<(), StoreError> {
    let _: () = redis.hset(keys::TOKEN_USE, id, at_ms).await?;
    Ok(())
}
