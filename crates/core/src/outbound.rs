//! Outbound HTTP requests to URLs a customer gives (webhook targets, a
//! rollout's approval URL) and server-side request forgery (SSRF).
//!
//! [`check_url`] resolves the URL's host and refuses every address that
//! points back into the installation's own machine or its cloud: loopback
//! (127.0.0.0/8, ::1), unspecified (0.0.0.0, ::), link-local
//! (169.254.0.0/16, fe80::/10), the cloud metadata addresses
//! (169.254.169.254, fd00:ec2::254), broadcast and multicast, and the
//! IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible and NAT64
//! (`64:ff9b::a.b.c.d`) forms of the IPv4 ones; unless the address is inside one of the allowed CIDRs (a setting:
//! `webhooks.allowed_targets`, `ota.approval_allowed_targets`). Private
//! ranges (10/8, 172.16/12, 192.168/16, fc00::/7 other than the metadata
//! address) are not refused: a self-hosted cloud often calls its own
//! network's services.
//!
//! The caller then connects to the address that was checked
//! ([`Checked::addr`], e.g. reqwest's `ClientBuilder::resolve`), never
//! resolving the name again, so a DNS answer that changes between the
//! check and the connection (rebinding) cannot reach a refused address.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// An address range (`10.0.0.0/8`, `::1/128`; a bare address is /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR (10.0.0.0/8, ::1/128)"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses a setting's list of CIDRs; the error names the bad entry.
pub fn parse_cidrs(list: &[String]) -> Result<Vec<Cidr>, String> {
    list.iter().map(|s| s.parse()).collect()
}

/// An IPv4 address carried in IPv6 (`::ffff:a.b.c.d`, `::a.b.c.d`) as the
/// IPv4 address; everything else unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let seg = v6.segments();
            let o = v6.octets();
            let embedded = IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            // IPv4-compatible (deprecated, ::a.b.c.d), but not :: or ::1.
            if seg[..6] == [0; 6] && u128::from(v6) > 1 {
                return embedded;
            }
            // NAT64's well-known prefix (64:ff9b::/96) reaches the IPv4
            // address it embeds through a NAT64 gateway.
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return embedded;
            }
            ip
        }
        v4 => v4,
    }
}

/// Why an address is refused, or `None` when it may be called.
pub fn refusal(ip: IpAddr) -> Option<&'static str> {
    const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);
    match canonical(ip) {
        IpAddr::V4(v4) => {
            if v4 == Ipv4Addr::new(169, 254, 169, 254) {
                Some("a cloud metadata address")
            } else if v4.is_loopback() {
                Some("a loopback address")
            } else if v4.is_unspecified() || v4.octets()[0] == 0 {
                Some("an unspecified address")
            } else if v4.is_link_local() {
                Some("a link-local address")
            } else if v4.is_broadcast() || v4.is_multicast() {
                Some("a broadcast or multicast address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6 == METADATA_V6 {
                Some("a cloud metadata address")
            } else if v6.is_loopback() {
                Some("a loopback address")
            } else if v6.is_unspecified() {
                Some("an unspecified address")
            } else if v6.segments()[0] & 0xffc0 == 0xfe80 {
                Some("a link-local address")
            } else if v6.is_multicast() {
                Some("a multicast address")
            } else {
                None
            }
        }
    }
}

/// A URL whose host resolved to an address that may be called.
#[derive(Debug, Clone)]
pub struct Checked {
    pub url: url::Url,
    /// The host name as written in the URL (for `Host` and TLS).
    pub host: String,
    /// The address to connect to (pin it: do not resolve `host` again).
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OutboundError {
    #[error("{0}")]
    BadUrl(String),
    #[error("{url}: the host {host} does not resolve: {reason}")]
    Unresolved {
        url: String,
        host: String,
        reason: String,
    },
    #[error(
        "{url}: refused: {host} is {what} ({addr}); outbound requests never go there unless the \
         address is in the allow-list setting ({setting})"
    )]
    Refused {
        url: String,
        host: String,
        addr: IpAddr,
        what: &'static str,
        setting: &'static str,
    },
}

/// Makes ring the process's rustls provider unless one is installed
/// already. reqwest is built with `rustls-no-provider` (https targets
/// without a second crypto library): every process that builds a reqwest
/// client calls this first; [`check_url`] does.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Parses `url` (http or https only), resolves its host and returns the
/// first address that is allowed: not refused by [`refusal`], or inside
/// `allowed`. `setting` names the allow-list in the error.
pub async fn check_url(
    url: &str,
    allowed: &[Cidr],
    setting: &'static str,
) -> Result<Checked, OutboundError> {
    install_tls_provider();
    let parsed = url::Url::parse(url).map_err(|e| OutboundError::BadUrl(format!("{url}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(OutboundError::BadUrl(format!(
            "{url}: only http and https URLs are called"
        )));
    }
    let host = match parsed.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(a)) => a.to_string(),
        Some(url::Host::Ipv6(a)) => a.to_string(),
        None => return Err(OutboundError::BadUrl(format!("{url}: no host"))),
    };
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| OutboundError::BadUrl(format!("{url}: no port")))?;
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| OutboundError::Unresolved {
                url: url.to_string(),
                host: host.clone(),
                reason: e.to_string(),
            })?
            .collect(),
    };
    let mut first_refusal = None;
    for addr in &addrs {
        let ip = addr.ip();
        match refusal(ip) {
            Some(what) if !allowed.iter().any(|c| c.contains(ip)) => {
                first_refusal.get_or_insert(OutboundError::Refused {
                    url: url.to_string(),
                    host: host.clone(),
                    addr: ip,
                    what,
                    setting,
                });
            }
            _ => {
                return Ok(Checked {
                    url: parsed.clone(),
                    host,
                    addr: SocketAddr::new(canonical(ip), port),
                });
            }
        }
    }
    Err(first_refusal.unwrap_or(OutboundError::Unresolved {
        url: url.to_string(),
        host,
        reason: "no addresses".into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn refuses_what_the_rule_names_in_every_form() {
        for bad in [
            "127.0.0.1",
            "127.8.9.10",
            "::1",
            "0.0.0.0",
            "::",
            "169.254.1.2",
            "169.254.169.254",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "255.255.255.255",
            "224.0.0.1",
        ] {
            assert!(refusal(ip(bad)).is_some(), "{bad} must be refused");
        }
        for good in [
            "93.184.216.34",
            "10.1.2.3",
            "192.168.1.1",
            "2001:db8::1",
            "fd00::1",
            "::ffff:93.184.216.34",
        ] {
            assert_eq!(refusal(ip(good)), None, "{good} must be allowed");
        }
        assert_eq!(
            refusal(ip("fd00:ec2::254")),
            Some("a cloud metadata address")
        );
        assert_eq!(
            refusal(ip("169.254.169.254")),
            Some("a cloud metadata address")
        );
    }

    #[test]
    fn cidrs_contain_mapped_forms_and_reject_nonsense() {
        let c: Cidr = "127.0.0.0/8".parse().expect("cidr");
        assert!(c.contains(ip("127.0.0.1")));
        assert!(c.contains(ip("::ffff:127.0.0.1")));
        assert!(!c.contains(ip("128.0.0.1")));
        let one: Cidr = "::1".parse().expect("cidr");
        assert!(one.contains(ip("::1")));
        assert!(!one.contains(ip("::2")));
        let all: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains(ip("8.8.8.8")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[tokio::test]
    async fn check_url_refuses_loopback_unless_allowed_and_pins_the_address() {
        let err = check_url("http://127.0.0.1:9/x", &[], "test.allowed")
            .await
            .expect_err("loopback refused");
        assert!(err.to_string().contains("loopback"), "{err}");
        assert!(err.to_string().contains("test.allowed"), "{err}");
        let err = check_url("http://localhost:9/x", &[], "t")
            .await
            .expect_err("a name resolving to loopback is refused");
        assert!(matches!(err, OutboundError::Refused { .. }), "{err}");
        let err = check_url("http://[::ffff:169.254.169.254]/latest", &[], "t")
            .await
            .expect_err("mapped metadata refused");
        assert!(err.to_string().contains("metadata"), "{err}");
        let allowed = parse_cidrs(&["127.0.0.0/8".into()]).expect("cidrs");
        let ok = check_url("http://127.0.0.1:9/x", &allowed, "t")
            .await
            .expect("allowed by the list");
        assert_eq!(ok.addr, "127.0.0.1:9".parse().expect("addr"));
        assert!(
            check_url("file:///etc/passwd", &allowed, "t")
                .await
                .is_err()
        );
    }
}
