//! Least privilege in Redis: one ACL user per service, allowed only the
//! keys it owns (read and write), the keys of others it reads, and the
//! audit stream, which every service may append to and only keyvault may
//! read or trim by hand. The table below is derived from the key table in
//! docs/architecture.md (section 4); a key a service touches that is not
//! here fails with `NOPERM`, which the tests run into before a user does.
//!
//! Redis applies these rules inside Lua scripts too (7.0+): a script is
//! allowed a key only if the calling user is, and every key a script names
//! in `KEYS` needs both read and write permission.
use super::keys;
use std::fmt::Write as _;

/// A service's Redis identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RedisUser {
    Keyvault,
    Gateway,
    Signer,
    Ota,
    /// The application API: its webhook integrations and their queues.
    Api,
}

/// What a user may do with which keys.
struct Grants {
    /// Read and write (the service's own records).
    own: Vec<&'static str>,
    /// Read only (another service's records this one needs).
    read: Vec<&'static str>,
    /// Streams this service may only append to (`XADD`): no read, no
    /// delete, no trim.
    append: &'static [&'static str],
}

/// The records of organisations, products, users and tokens (crates/auth):
/// written by keyvault's `Access` service, read by every service that
/// checks a token.
const ACCESS_RECORDS: &[&str] = &[
    "trellis:orgs",
    "trellis:org:*",
    "trellis:products",
    "trellis:product:*",
    "trellis:users:*",
    "trellis:user:*",
    "trellis:tokens:*",
    "trellis:token:*",
];

/// When each token was last used: written by every service that checks
/// tokens (a separate key, so that no service but keyvault can change a
/// token's scopes, organisation or revocation).
const TOKEN_USE: &str = keys::TOKEN_USE;
const AUDIT: &str = keys::AUDIT;

impl RedisUser {
    pub const ALL: [RedisUser; 5] = [
        Self::Keyvault,
        Self::Gateway,
        Self::Signer,
        Self::Ota,
        Self::Api,
    ];

    /// The ACL user name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Keyvault => "trellis-keyvault",
            Self::Gateway => "trellis-gateway",
            Self::Signer => "trellis-signer",
            Self::Ota => "trellis-ota",
            Self::Api => "trellis-api",
        }
    }

    pub fn service(self) -> &'static str {
        match self {
            Self::Keyvault => "keyvault",
            Self::Gateway => "gateway",
            Self::Signer => "signer",
            Self::Ota => "ota",
            Self::Api => "api",
        }
    }

    pub fn from_service(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|u| u.service() == name)
    }

    fn grants(self) -> Grants {
        match self {
            Self::Keyvault => Grants {
                // The access records (its `Access` service writes them) and:
                own: with_access(&[
                    "trellis:device:*",
                    "trellis:devices",
                    "trellis:device-names:*",
                    "trellis:pending:*",
                    keys::PENDING_INDEX,
                    "trellis:cloudkey:*",
                    "trellis:releasekey:*",
                    keys::REVOCATIONS,
                    // Handshakes check the gateways' quarantine records;
                    // `trellis device quarantine lift` deletes one.
                    "trellis:quarantine:*",
                    TOKEN_USE,
                    // keyvault answers ListAudit: the one reader of the log.
                    AUDIT,
                    keys::AUDIT_REFUSALS,
                    keys::AUDIT_REFUSAL_COUNTS,
                ]),
                // Sign signs only a manifest the signer stored; cloud key
                // status and retirement count what the gateways recorded;
                // retiring a release key checks no product's policy still
                // trusts it.
                read: vec![
                    "trellis:release:*",
                    keys::CLOUD_KEY_DEVICES,
                    keys::POLICY_PATTERN,
                ],
                append: &[],
            },
            Self::Gateway => Grants {
                own: vec![
                    "trellis:session:*",
                    "trellis:epoch:*",
                    "trellis:state:*",
                    "trellis:events",
                    "trellis:gw:*",
                    "trellis:cmd:*",
                    "trellis:reply:*",
                    "trellis:sessions:*",
                    "trellis:clones:*",
                    "trellis:home:*",
                    "trellis:quarantine:*",
                    keys::CLOUD_KEY_DEVICES,
                    TOKEN_USE,
                    keys::AUDIT_REFUSALS,
                    keys::AUDIT_REFUSAL_COUNTS,
                ],
                // Deliveries read the signer's releases and images; every
                // gateway follows keyvault's revocations.
                read: with_access(&["trellis:release:*", "trellis:image:*", keys::REVOCATIONS]),
                append: &[AUDIT],
            },
            Self::Signer => Grants {
                own: vec![
                    "trellis:image:*",
                    "trellis:images",
                    "trellis:release:*",
                    "trellis:releases",
                    "trellis:policy:*",
                    TOKEN_USE,
                ],
                read: ACCESS_RECORDS.to_vec(),
                append: &[AUDIT],
            },
            Self::Ota => Grants {
                own: vec![
                    "trellis:rollout:*",
                    "trellis:rollouts",
                    "trellis:rollouts:active",
                    "trellis:ota:device:*",
                    TOKEN_USE,
                ],
                // Targets come from keyvault's registry; whether a device
                // is online and what it runs, from the gateways' records.
                read: with_access(&[
                    "trellis:device:*",
                    "trellis:devices",
                    "trellis:session:*",
                    "trellis:state:*",
                ]),
                append: &[AUDIT],
            },
            Self::Api => Grants {
                // Webhook integrations, their delivery queues, dead
                // letters and leases, the dispatcher's cursor and lease.
                own: vec![
                    "trellis:webhook:*",
                    keys::WEBHOOK_INDEX,
                    "trellis:webhooks:*",
                ],
                // The event stream the deliveries come from, and the
                // registry (a device's organisation and product).
                read: vec![keys::EVENTS, "trellis:device:*"],
                append: &[],
            },
        }
    }

    /// The `ACL SETUSER` arguments (also an ACL file line after
    /// `user <name>`), without the password: commands are everything but
    /// Redis's `@dangerous` category (KEYS, FLUSHALL, CONFIG, DEBUG, ...),
    /// plus `INFO` (Sentinel setups check a server's role with it); no
    /// pub/sub channels.
    pub fn rules(self) -> Vec<String> {
        let grants = self.grants();
        let mut rules = vec![
            "resetkeys".to_string(),
            "resetchannels".to_string(),
            "-@all".to_string(),
            "+@all".to_string(),
            "-@dangerous".to_string(),
            "+info".to_string(),
        ];
        rules.extend(grants.own.iter().map(|k| format!("~{k}")));
        rules.extend(grants.read.iter().map(|k| format!("%R~{k}")));
        // A selector of its own: XADD on the stream and nothing else (the
        // root permissions above do not name these keys at all).
        for stream in grants.append {
            rules.push(format!("(%W~{stream} -@all +xadd)"));
        }
        rules
    }

    /// One line of a Redis ACL file for this user with the SHA-256 of its
    /// password (the file never holds the password itself).
    pub fn acl_file_line(self, password: &str) -> String {
        let mut line = format!("user {} on #{}", self.name(), password_hash(password));
        for rule in self.rules() {
            let _ = write!(line, " {rule}");
        }
        line
    }
}

/// `ACCESS_RECORDS` followed by `more`.
fn with_access(more: &[&'static str]) -> Vec<&'static str> {
    ACCESS_RECORDS.iter().chain(more).copied().collect()
}

/// Lowercase hex SHA-256, the form Redis ACL files take (`#<hash>`).
pub fn password_hash(password: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(password.as_bytes()))
}

/// A fresh random password: 32 bytes as hex (URL-safe, no escaping).
pub fn new_password() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// A whole ACL file: `default` (no password: open, for tests on loopback;
/// with one: the administrator's) and one user per service.
pub fn acl_file(admin_password: Option<&str>, passwords: &[(RedisUser, String)]) -> String {
    let mut out = String::new();
    match admin_password {
        Some(p) => {
            let _ = writeln!(out, "user default on #{} ~* &* +@all", password_hash(p));
        }
        None => out.push_str("user default on nopass ~* &* +@all\n"),
    }
    for (user, password) in passwords {
        out.push_str(&user.acl_file_line(password));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local_redis::{Admin, LocalRedis, RedisData};
    use redis::AsyncCommands;

    /// Redis's glob, as far as these patterns use it (`*` only).
    fn matches(pattern: &str, key: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == key,
            Some((head, tail)) => {
                key.len() >= head.len() + tail.len() && key.starts_with(head) && {
                    let rest = &key[head.len()..];
                    (0..=rest.len()).any(|i| rest.is_char_boundary(i) && matches(tail, &rest[i..]))
                }
            }
        }
    }

    fn owners(key: &str) -> Vec<RedisUser> {
        RedisUser::ALL
            .into_iter()
            .filter(|u| u.grants().own.iter().any(|p| matches(p, key)))
            .collect()
    }

    /// Every key name in `keys` has a writer, and the ones the key table
    /// gives a single writer have exactly that one.
    #[test]
    fn every_key_has_the_writer_the_key_table_names() {
        use RedisUser::*;
        let d = "0123456789abcdef01234567";
        let expected: Vec<(String, Vec<RedisUser>)> = vec![
            (keys::device(d), vec![Keyvault]),
            (keys::DEVICE_INDEX.into(), vec![Keyvault]),
            (keys::pending_device(d), vec![Keyvault]),
            (keys::PENDING_INDEX.into(), vec![Keyvault]),
            (keys::CLOUD_KEY.into(), vec![Keyvault]),
            (keys::RELEASE_KEY.into(), vec![Keyvault]),
            (keys::cloud_key_record(2), vec![Keyvault]),
            (keys::CLOUD_KEY_VERSIONS.into(), vec![Keyvault]),
            (keys::release_key_record(2), vec![Keyvault]),
            (keys::RELEASE_KEY_VERSIONS.into(), vec![Keyvault]),
            (keys::CLOUD_KEY_DEVICES.into(), vec![Gateway]),
            (keys::image("ab"), vec![Signer]),
            (keys::image_meta("ab"), vec![Signer]),
            (keys::IMAGE_INDEX.into(), vec![Signer]),
            (keys::release("6-1"), vec![Signer]),
            (keys::RELEASE_INDEX.into(), vec![Signer]),
            (keys::release("tp-6-2"), vec![Signer]),
            (keys::POLICY_RELEASE_INDEX.into(), vec![Signer]),
            (keys::policy_release_by_sha("ab"), vec![Signer]),
            (keys::policy(6), vec![Signer]),
            (keys::AUDIT.into(), vec![Keyvault]),
            (keys::AUDIT_REFUSALS.into(), vec![Keyvault, Gateway]),
            (keys::AUDIT_REFUSAL_COUNTS.into(), vec![Keyvault, Gateway]),
            (keys::session(d), vec![Gateway]),
            (keys::session_epoch(d), vec![Gateway]),
            (keys::device_state(d), vec![Gateway]),
            (keys::session_history(d), vec![Gateway]),
            (keys::clone_flags(d), vec![Gateway]),
            (keys::home(d), vec![Gateway]),
            (keys::quarantine(d), vec![Keyvault, Gateway]),
            (keys::REVOCATIONS.into(), vec![Keyvault]),
            (keys::EVENTS.into(), vec![Gateway]),
            (keys::gateway_commands("gw-1"), vec![Gateway]),
            (keys::command_reply("r"), vec![Gateway]),
            (keys::command_delivery("r"), vec![Gateway]),
            (keys::ORGS.into(), vec![Keyvault]),
            (keys::org("acme"), vec![Keyvault]),
            (keys::PRODUCTS.into(), vec![Keyvault]),
            (keys::product(6), vec![Keyvault]),
            (keys::users("acme"), vec![Keyvault]),
            (keys::user("acme", "ann"), vec![Keyvault]),
            (keys::tokens("acme"), vec![Keyvault]),
            (keys::token("t1"), vec![Keyvault]),
            (keys::TOKEN_USE.into(), vec![Keyvault, Gateway, Signer, Ota]),
            (keys::rollout("r1"), vec![Ota]),
            (keys::rollout_devices("r1"), vec![Ota]),
            (keys::rollout_lease("r1"), vec![Ota]),
            (keys::rollout_fence("r1"), vec![Ota]),
            (keys::ROLLOUT_INDEX.into(), vec![Ota]),
            (keys::ROLLOUT_ACTIVE.into(), vec![Ota]),
            (keys::ota_device(d), vec![Ota]),
            (keys::webhook("w1"), vec![Api]),
            (keys::webhook_queue("w1"), vec![Api]),
            (keys::webhook_head("w1"), vec![Api]),
            (keys::webhook_dead("w1"), vec![Api]),
            (keys::webhook_lease("w1"), vec![Api]),
            (keys::WEBHOOK_INDEX.into(), vec![Api]),
            (keys::webhooks_of("acme"), vec![Api]),
            (keys::WEBHOOK_CURSOR.into(), vec![Api]),
            (keys::WEBHOOK_DISPATCH_LEASE.into(), vec![Api]),
        ];
        for (key, want) in expected {
            assert_eq!(owners(&key), want, "writers of {key}");
        }
    }

    #[test]
    fn the_acl_file_holds_hashes_not_passwords() {
        let file = acl_file(
            Some("admin-secret"),
            &[(RedisUser::Gateway, "gateway-secret".to_string())],
        );
        assert!(!file.contains("secret"), "{file}");
        assert!(file.contains(&password_hash("gateway-secret")));
        assert!(file.contains("user trellis-gateway on #"));
        assert!(file.contains("(%W~trellis:audit -@all +xadd)"), "{file}");
    }

    async fn as_user(server: &LocalRedis, user: RedisUser) -> crate::redis_conn::Redis {
        crate::redis_conn::connect(&server.url_for(user))
            .await
            .expect("connect as the service's user")
    }

    fn refused<T: std::fmt::Debug>(result: redis::RedisResult<T>, what: &str) {
        match result {
            Err(e) if e.to_string().to_ascii_uppercase().contains("NOPERM") => {}
            other => panic!("{what}: expected NOPERM, got {other:?}"),
        }
    }

    /// The issue's test: a gateway's Redis user cannot write a registry
    /// key or delete an audit record, on a real redis-server with ACLs.
    #[tokio::test]
    async fn each_service_user_reaches_only_its_own_keys_on_a_real_server() {
        let server =
            LocalRedis::start_with_users(RedisData::Ephemeral, Admin::Open).expect("redis-server");
        let mut admin = crate::redis_conn::connect(&server.url())
            .await
            .expect("admin");
        let device = keys::device("0123456789abcdef01234567");
        let _: () = admin.hset(&device, "product_id", "6").await.expect("seed");
        let id: String = admin
            .xadd(keys::AUDIT, "*", &[("action", "seed")])
            .await
            .expect("seed audit");

        let mut gateway = as_user(&server, RedisUser::Gateway).await;
        refused(
            gateway.hset::<_, _, _, ()>(&device, "revoked", "0").await,
            "gateway writes the registry",
        );
        refused(
            gateway.del::<_, ()>(&device).await,
            "gateway deletes a registry record",
        );
        refused(
            gateway.xdel::<_, _, ()>(keys::AUDIT, &[&id]).await,
            "gateway deletes an audit record",
        );
        refused(
            gateway.del::<_, ()>(keys::AUDIT).await,
            "gateway deletes the audit log",
        );
        refused(
            redis::cmd("XTRIM")
                .arg(keys::AUDIT)
                .arg("MAXLEN")
                .arg(0)
                .query_async::<()>(&mut gateway)
                .await,
            "gateway trims the audit log",
        );
        refused(
            gateway.xrange_all::<_, redis::Value>(keys::AUDIT).await,
            "gateway reads the audit log",
        );
        refused(
            redis::cmd("FLUSHALL").query_async::<()>(&mut gateway).await,
            "gateway flushes everything",
        );
        refused(
            gateway
                .hset::<_, _, _, ()>(keys::token("t1"), "scopes", "org:admin")
                .await,
            "gateway widens a token",
        );
        // What it needs works: its own records, appending audit records,
        // reading releases, a script over its own keys.
        let _: () = gateway
            .hset(keys::session("0123456789abcdef01234567"), "epoch", 1)
            .await
            .expect("gateway writes a session record");
        let _: String = gateway
            .xadd(keys::AUDIT, "*", &[("action", "gateway")])
            .await
            .expect("gateway appends to the audit log");
        let _: Option<String> = gateway
            .hget(keys::release("6-1"), "manifest")
            .await
            .expect("gateway reads a release");
        let n: i64 = redis::Script::new("return redis.call('INCR', KEYS[1])")
            .key(keys::session_epoch("0123456789abcdef01234567"))
            .invoke_async(&mut gateway)
            .await
            .expect("a script over the gateway's own keys");
        assert_eq!(n, 1);
        refused(
            redis::Script::new("return redis.call('HSET', KEYS[1], 'revoked', '0')")
                .key(&device)
                .invoke_async::<i64>(&mut gateway)
                .await,
            "a gateway script writes the registry",
        );

        let mut signer = as_user(&server, RedisUser::Signer).await;
        refused(
            signer.hset::<_, _, _, ()>(&device, "revoked", "0").await,
            "signer writes the registry",
        );
        let mut ota = as_user(&server, RedisUser::Ota).await;
        let product: String = ota
            .hget(&device, "product_id")
            .await
            .expect("ota reads the registry");
        assert_eq!(product, "6");
        refused(
            ota.hset::<_, _, _, ()>(&device, "revoked", "0").await,
            "ota writes the registry",
        );
        let mut keyvault = as_user(&server, RedisUser::Keyvault).await;
        refused(
            keyvault
                .hset::<_, _, _, ()>(keys::session("0123456789abcdef01234567"), "epoch", 9)
                .await,
            "keyvault writes a session record",
        );
        let records: redis::streams::StreamRangeReply = keyvault
            .xrange_all(keys::AUDIT)
            .await
            .expect("keyvault reads the audit log");
        assert_eq!(
            records.ids.len(),
            2,
            "the seed and the gateway's record, none deleted"
        );
    }
}
