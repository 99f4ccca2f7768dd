//! Keyvault's release key versions as the signer sees them (docs/protocol.md
//! §7.5). Every version, live or retired, is "the cloud's": a policy that
//! names any of them is checked for being met by the cloud alone. A
//! product's releases are signed with the newest LIVE version its current
//! policy names, so a rotated release key changes nothing for a product
//! until a policy rotation moves the product (and its devices) to it.
use crate::error::SignerError;
use trellis_firmware::{TrustPolicy, TrustedKey, public_key_from_pem};
use trellis_proto::v1 as pb;

/// The name the cloud release key goes by when the signer names it.
pub const CLOUD_RELEASE_KEY_NAME: &str = "cloud-release";

/// One version of keyvault's release key.
#[derive(Debug, Clone)]
pub struct CloudReleaseKey {
    pub version: u32,
    pub live: bool,
    pub current: bool,
    pub key: TrustedKey,
}

/// Every version of keyvault's release key, oldest first.
#[derive(Debug, Clone, Default)]
pub struct CloudReleaseKeys {
    versions: Vec<CloudReleaseKey>,
}

impl CloudReleaseKeys {
    /// From keyvault's answer; every key id is checked against its key.
    pub fn from_proto(keys: Vec<pb::SigningKey>) -> Result<Self, SignerError> {
        let mut versions = Vec::with_capacity(keys.len());
        for k in keys {
            let bad = |e: String| {
                SignerError::Internal(format!(
                    "keyvault's release public key version {}: {e}",
                    k.version
                ))
            };
            let public = public_key_from_pem(&k.public_key_pem).map_err(|e| bad(e.to_string()))?;
            let key =
                TrustedKey::new(CLOUD_RELEASE_KEY_NAME, public).map_err(|e| bad(e.to_string()))?;
            if key.key_id != k.key_id {
                return Err(bad(format!(
                    "keyvault names it {} but the key's id is {}",
                    k.key_id, key.key_id
                )));
            }
            versions.push(CloudReleaseKey {
                version: k.version,
                live: k.retired_ms == 0,
                current: k.current,
                key,
            });
        }
        versions.sort_by_key(|v| v.version);
        Ok(Self { versions })
    }

    pub fn all(&self) -> &[CloudReleaseKey] {
        &self.versions
    }

    pub fn current(&self) -> Option<&CloudReleaseKey> {
        self.versions.iter().find(|v| v.current)
    }

    /// The version whose key id is `key_id`.
    pub fn get(&self, key_id: &str) -> Option<&CloudReleaseKey> {
        self.versions
            .iter()
            .find(|v| v.key.key_id.eq_ignore_ascii_case(key_id))
    }

    /// The keys of `policy` that are the cloud's (any version).
    pub fn held_in<'a>(&self, policy: &'a TrustPolicy) -> Vec<&'a TrustedKey> {
        policy
            .keys()
            .iter()
            .filter(|k| self.get(&k.key_id).is_some())
            .collect()
    }

    /// Whether the cloud's keys alone meet `policy`'s threshold.
    pub fn meet_alone(&self, policy: &TrustPolicy) -> bool {
        self.held_in(policy).len() >= policy.threshold()
    }

    /// The version that signs a release of a product whose policy is
    /// `policy`: the newest live version the policy names; with no policy,
    /// or one that names no version, the current one. A policy that names
    /// only retired versions is an error that says what to do.
    pub fn for_policy(&self, policy: Option<&TrustPolicy>) -> Result<&CloudReleaseKey, String> {
        let named: Vec<&CloudReleaseKey> = match policy {
            Some(p) => self
                .versions
                .iter()
                .filter(|v| p.key(&v.key.key_id).is_some())
                .collect(),
            None => Vec::new(),
        };
        if named.is_empty() {
            return self.current().ok_or_else(|| {
                "keyvault has no live release key version; unretire one (`trellis keys unretire release N`) or rotate (`trellis keys rotate release`)".to_string()
            });
        }
        named
            .iter()
            .rev()
            .find(|v| v.live)
            .copied()
            .ok_or_else(|| {
                let versions: Vec<String> = named.iter().map(|v| v.version.to_string()).collect();
                format!(
                    "the product's policy trusts only retired release key version(s) {}; unretire one (`trellis keys unretire release N`) until a policy rotation (`trellis policy rotate`) moves the product to the current version",
                    versions.join(", ")
                )
            })
    }

    /// The live versions a policy rotation from `previous` to `new` is
    /// signed with: every live version either policy names, oldest first.
    pub fn for_rotation(&self, previous: &TrustPolicy, new: &TrustPolicy) -> Vec<&CloudReleaseKey> {
        self.versions
            .iter()
            .filter(|v| {
                v.live
                    && (previous.key(&v.key.key_id).is_some() || new.key(&v.key.key_id).is_some())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_firmware::public_key_to_pem;

    fn version(v: u32, live: bool, current: bool) -> (rsa::PrivateKey, pb::SigningKey) {
        let private = rsa::PrivateKey::new(&mut rand::rng(), 2048).unwrap();
        let pem = public_key_to_pem(&private.to_public_key()).unwrap();
        let key = TrustedKey::new("x", private.to_public_key()).unwrap();
        let proto = pb::SigningKey {
            purpose: "release".into(),
            key_id: key.key_id.clone(),
            public_key_der: Vec::new(),
            public_key_pem: pem,
            version: v,
            current,
            created_ms: 0,
            retired_ms: if live { 0 } else { 1 },
        };
        (private, proto)
    }

    #[test]
    fn a_product_signs_with_the_newest_live_version_its_policy_names() {
        let (_, v1) = version(1, true, false);
        let (_, v2) = version(2, true, false);
        let (_, v3) = version(3, true, true);
        let (customer, _) = version(9, true, false);
        let cloud = CloudReleaseKeys::from_proto(vec![v3.clone(), v1.clone(), v2.clone()]).unwrap();
        assert_eq!(cloud.all()[0].version, 1);
        let key = |k: &CloudReleaseKey| k.key.clone();
        let customer = TrustedKey::new("customer", customer.to_public_key()).unwrap();
        let names_1_and_2 = TrustPolicy::new(
            vec![customer.clone(), key(&cloud.all()[0]), key(&cloud.all()[1])],
            2,
        )
        .unwrap();
        assert_eq!(cloud.for_policy(Some(&names_1_and_2)).unwrap().version, 2);
        assert_eq!(cloud.for_policy(None).unwrap().version, 3);
        let customer_only = TrustPolicy::new(vec![customer.clone()], 1).unwrap();
        assert_eq!(cloud.for_policy(Some(&customer_only)).unwrap().version, 3);
        assert_eq!(cloud.held_in(&names_1_and_2).len(), 2);
        assert!(cloud.meet_alone(&names_1_and_2));
        assert!(!cloud.meet_alone(&customer_only));
        let rotation = cloud.for_rotation(&names_1_and_2, &customer_only);
        assert_eq!(
            rotation.iter().map(|v| v.version).collect::<Vec<_>>(),
            [1, 2]
        );

        // Version 2 retired: version 1 signs; both retired: an error.
        let mut v2_retired = v2.clone();
        v2_retired.retired_ms = 5;
        let cloud = CloudReleaseKeys::from_proto(vec![v1.clone(), v2_retired, v3.clone()]).unwrap();
        assert_eq!(cloud.for_policy(Some(&names_1_and_2)).unwrap().version, 1);
        let mut v1_retired = v1;
        v1_retired.retired_ms = 5;
        let mut v2_retired = v2;
        v2_retired.retired_ms = 5;
        let cloud = CloudReleaseKeys::from_proto(vec![v1_retired, v2_retired, v3]).unwrap();
        let err = cloud.for_policy(Some(&names_1_and_2)).unwrap_err();
        assert!(
            err.contains("only retired release key version(s) 1, 2"),
            "{err}"
        );
    }

    #[test]
    fn a_key_id_that_does_not_match_its_key_is_refused() {
        let (_, mut v1) = version(1, true, true);
        v1.key_id = "00".repeat(32);
        assert!(CloudReleaseKeys::from_proto(vec![v1]).is_err());
    }
}
