//! The `Access` gRPC service: organisations, products, users and tokens.
//! The [`crate::AuthLayer`] has checked each method's rule before a handler
//! runs; handlers check what depends on the request (whose token, which
//! organisation, which scopes).
use crate::authenticator::Principal;
use crate::scope::{Role, Scope};
use crate::store::{self, StoreError, TokenRecord, TokenRequest};
use tonic::{Request, Response, Status};
use trellis_core::audit::{self, AuditRecord};
use trellis_core::redis_conn::Redis;
use trellis_core::time::now_ms;
use trellis_proto::v1 as pb;

pub struct AccessService {
    redis: Redis,
}

impl AccessService {
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    async fn audit(&self, principal: &Principal, action: &str, detail: &[(&str, String)]) {
        let mut record =
            AuditRecord::new(&principal.actor(), action, "", "ok").with("org", &principal.org);
        for (k, v) in detail {
            record = record.with(k, v.clone());
        }
        audit::append_logged(&mut self.redis.clone(), &record).await;
    }
}

fn info(t: &TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id.clone(),
        org: t.org.clone(),
        user: t.user.clone(),
        name: t.name.clone(),
        scopes: t.scopes.iter().map(|s| s.to_string()).collect(),
        created_ms: t.created_ms,
        expires_ms: t.expires_ms,
        last_used_ms: t.last_used_ms,
        revoked_ms: t.revoked_ms,
    }
}

fn expiry(expires_in_secs: u64) -> i64 {
    if expires_in_secs == 0 {
        0
    } else {
        now_ms()
            .saturating_add(i64::try_from(expires_in_secs.saturating_mul(1000)).unwrap_or(i64::MAX))
    }
}

#[tonic::async_trait]
impl pb::access_server::Access for AccessService {
    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        let p = Principal::of(&request)?;
        Ok(Response::new(pb::Identity {
            org: p.org,
            user: p.user,
            scopes: p.scopes.iter().map(|s| s.to_string()).collect(),
            token_id: p.token_id,
        }))
    }

    async fn create_org(
        &self,
        request: Request<pb::CreateOrgRequest>,
    ) -> Result<Response<pb::CreatedToken>, Status> {
        let p = Principal::of(&request)?;
        let req = request.into_inner();
        let owner = if req.owner.is_empty() {
            "owner"
        } else {
            &req.owner
        };
        store::check_name("user", owner)?;
        let mut redis = self.redis.clone();
        store::create_org(&mut redis, &req.name).await?;
        store::add_user(&mut redis, &req.name, owner, Role::Owner).await?;
        let (token, record) = store::create_token(
            &mut redis,
            TokenRequest {
                org: &req.name,
                user: owner,
                name: "first owner",
                scopes: &Role::Owner.scopes(),
                expires_ms: 0,
            },
        )
        .await?;
        self.audit(
            &p,
            "create_org",
            &[("name", req.name.clone()), ("owner", owner.to_string())],
        )
        .await;
        Ok(Response::new(pb::CreatedToken {
            info: Some(info(&record)),
            token: token.bearer,
        }))
    }

    async fn list_orgs(
        &self,
        request: Request<pb::ListOrgsRequest>,
    ) -> Result<Response<pb::ListOrgsResponse>, Status> {
        let p = Principal::of(&request)?;
        let mut redis = self.redis.clone();
        let orgs = if p.has(Scope::ClusterAdmin) {
            store::list_orgs(&mut redis).await?
        } else {
            vec![p.org]
        };
        Ok(Response::new(pb::ListOrgsResponse { orgs }))
    }

    async fn create_product(
        &self,
        request: Request<pb::CreateProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let p = Principal::of(&request)?;
        let req = request.into_inner();
        let mut redis = self.redis.clone();
        let product = store::create_product(&mut redis, &p.org, req.id, &req.name).await?;
        self.audit(
            &p,
            "create_product",
            &[("product", req.id.to_string()), ("name", req.name)],
        )
        .await;
        Ok(Response::new(pb::Product {
            id: product.id,
            org: product.org,
            name: product.name,
        }))
    }

    async fn list_products(
        &self,
        request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        let p = Principal::of(&request)?;
        let mut redis = self.redis.clone();
        let products = store::list_products(&mut redis, &p.org)
            .await?
            .into_iter()
            .map(|p| pb::Product {
                id: p.id,
                org: p.org,
                name: p.name,
            })
            .collect();
        Ok(Response::new(pb::ListProductsResponse { products }))
    }

    async fn add_user(
        &self,
        request: Request<pb::AddUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let p = Principal::of(&request)?;
        let req = request.into_inner();
        let role: Role = req.role.parse().map_err(Status::invalid_argument)?;
        let mut redis = self.redis.clone();
        let user = store::add_user(&mut redis, &p.org, &req.name, role).await?;
        self.audit(
            &p,
            "add_user",
            &[("user", req.name), ("role", role.to_string())],
        )
        .await;
        Ok(Response::new(pb::User {
            org: user.org,
            name: user.name,
            role: user.role.to_string(),
        }))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let p = Principal::of(&request)?;
        let mut redis = self.redis.clone();
        let users = store::list_users(&mut redis, &p.org)
            .await?
            .into_iter()
            .map(|u| pb::User {
                org: u.org,
                name: u.name,
                role: u.role.to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListUsersResponse { users }))
    }

    async fn remove_user(
        &self,
        request: Request<pb::RemoveUserRequest>,
    ) -> Result<Response<pb::RemoveUserResponse>, Status> {
        let p = Principal::of(&request)?;
        let req = request.into_inner();
        if req.name == p.user {
            return Err(Status::failed_precondition(
                "you cannot remove yourself; another owner of the organisation can",
            ));
        }
        let mut redis = self.redis.clone();
        let revoked = store::remove_user(&mut redis, &p.org, &req.name).await?;
        self.audit(
            &p,
            "remove_user",
            &[("user", req.name), ("tokens_revoked", revoked.to_string())],
        )
        .await;
        Ok(Response::new(pb::RemoveUserResponse {
            tokens_revoked: u32::try_from(revoked).unwrap_or(u32::MAX),
        }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreatedToken>, Status> {
        let p = Principal::of(&request)?;
        let req = request.into_inner();
        let mut redis = self.redis.clone();
        let requested = Scope::parse_list(&req.scopes.join(" "))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (org, user, allowed): (String, String, Vec<Scope>) = if !req.service.is_empty() {
            if !p.has(Scope::ClusterAdmin) {
                return Err(Status::permission_denied(
                    "service credentials need a token with cluster:admin",
                ));
            }
            let scope = match req.service.as_str() {
                "gateway" => Scope::ServiceGateway,
                "signer" => Scope::ServiceSigner,
                "ota" => Scope::ServiceOta,
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown service {other:?}; services are gateway, signer, ota"
                    )));
                }
            };
            (
                "system".into(),
                format!("service:{}", req.service),
                vec![scope],
            )
        } else {
            let org = if req.org.is_empty() {
                p.org.clone()
            } else {
                req.org.clone()
            };
            if org != p.org && !p.has(Scope::ClusterAdmin) {
                // Exactly as for an organisation that does not exist.
                return Err(Status::not_found(format!("organisation {org} not found")));
            }
            let user = if req.user.is_empty() {
                p.user.clone()
            } else {
                req.user.clone()
            };
            if (user != p.user || org != p.org)
                && !p.has(Scope::OrgAdmin)
                && !p.has(Scope::ClusterAdmin)
            {
                return Err(Status::permission_denied(
                    "tokens for other users need org:admin",
                ));
            }
            let Some(u) = store::get_user(&mut redis, &org, &user).await? else {
                return Err(Status::not_found(format!("user {user} not found in {org}")));
            };
            let mut allowed = u.role.scopes();
            // A token never carries more than the token that made it,
            // except the installation's first owner minting for others.
            if !p.has(Scope::ClusterAdmin) {
                allowed.retain(|s| p.has(*s));
            }
            (org, user, allowed)
        };
        let scopes = if requested.is_empty() {
            allowed.clone()
        } else {
            requested
        };
        if let Some(extra) = scopes.iter().find(|s| !allowed.contains(s)) {
            return Err(Status::permission_denied(format!(
                "{extra} is not among the scopes this token may carry ({})",
                Scope::join(&allowed)
            )));
        }
        let (token, record) = store::create_token(
            &mut redis,
            TokenRequest {
                org: &org,
                user: &user,
                name: &req.name,
                scopes: &scopes,
                expires_ms: expiry(req.expires_in_secs),
            },
        )
        .await
        .map_err(Status::from)?;
        self.audit(
            &p,
            "create_token",
            &[
                ("token", record.id.clone()),
                ("for", format!("{user}@{org}")),
                ("scopes", Scope::join(&scopes)),
            ],
        )
        .await;
        Ok(Response::new(pb::CreatedToken {
            info: Some(info(&record)),
            token: token.bearer,
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let p = Principal::of(&request)?;
        let mut redis = self.redis.clone();
        let tokens = store::list_tokens(&mut redis, &p.org)
            .await?
            .iter()
            .filter(|t| p.has(Scope::OrgAdmin) || t.user == p.user)
            .map(info)
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let p = Principal::of(&request)?;
        let req = request.into_inner();
        let mut redis = self.redis.clone();
        let not_found = || Status::not_found(format!("token {} not found", req.id));
        let Some(record) = store::get_token(&mut redis, &req.id)
            .await
            .map_err(Status::from)?
        else {
            return Err(not_found());
        };
        let mine = record.org == p.org && record.user == p.user;
        let admin_of_it =
            (record.org == p.org && p.has(Scope::OrgAdmin)) || p.has(Scope::ClusterAdmin);
        if !mine && !admin_of_it {
            return Err(not_found());
        }
        store::revoke_token(&mut redis, &req.id)
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => not_found(),
                other => other.into(),
            })?;
        self.audit(&p, "revoke_token", &[("token", req.id.clone())])
            .await;
        let record = store::get_token(&mut redis, &req.id)
            .await?
            .ok_or_else(not_found)?;
        Ok(Response::new(info(&record)))
    }
}
