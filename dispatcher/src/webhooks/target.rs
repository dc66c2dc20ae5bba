//! Where a webhook may go. Only `http` and `https` URLs with a host; every address the host resolves to
//! must be public (not loopback, private, link-local, unique-local, CGNAT, multicast, documentation or
//! otherwise reserved) unless private targets are allowed. The check runs before each attempt, and the
//! HTTP client resolves through [`PublicResolver`], which applies the same rule to the addresses it
//! actually connects to, so a DNS answer that changes between the check and the connect (rebinding)
//! gains nothing. Logs name a target by [`redact`]: scheme, host and port, never path or query.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

/// Why a URL is not a webhook target. All are permanent for that URL.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("not a valid URL")]
    Parse,
    #[error("scheme {0:?} is not http or https")]
    Scheme(String),
    #[error("the URL has no host")]
    NoHost,
    #[error("the URL carries credentials")]
    Credentials,
    #[error("the host resolves to no address")]
    NoAddress,
    #[error("the host resolves to a non-public address ({0})")]
    Private(IpAddr),
    #[error("the host does not resolve: {0}")]
    Resolve(String),
}

impl TargetError {
    /// DNS failures may pass; everything else about the URL will not change.
    pub fn is_retryable(&self) -> bool {
        match self {
            TargetError::Resolve(_) | TargetError::NoAddress => true,
            TargetError::Parse
            | TargetError::Scheme(_)
            | TargetError::NoHost
            | TargetError::Credentials
            | TargetError::Private(_) => false,
        }
    }
}

/// `scheme://host[:port]` of `url`, for logs; `<invalid url>` when it does not parse.
pub fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
            (Some(h), None) => format!("{}://{h}", u.scheme()),
            (None, _) => format!("{}://", u.scheme()),
        },
        Err(_) => "<invalid url>".into(),
    }
}

/// Parses and checks `url`; with `allow_private` false every resolved address must be public.
pub async fn check(url: &str, allow_private: bool) -> Result<Url, TargetError> {
    let parsed = Url::parse(url).map_err(|_| TargetError::Parse)?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => return Err(TargetError::Scheme(other.to_string())),
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(TargetError::Credentials);
    }
    let host = parsed.host_str().ok_or(TargetError::NoHost)?;
    if allow_private {
        return Ok(parsed);
    }
    let port = parsed.port_or_known_default().unwrap_or(80);
    // `host_str` keeps IPv6 literals in brackets; lookup_host wants them bare.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| TargetError::Resolve(e.kind().to_string()))?
        .collect();
    all_public(addrs.iter().map(SocketAddr::ip))?;
    Ok(parsed)
}

/// Ok when there is at least one address and every one is public.
fn all_public(addrs: impl IntoIterator<Item = IpAddr>) -> Result<(), TargetError> {
    let mut any = false;
    for ip in addrs {
        any = true;
        if !is_public(ip) {
            return Err(TargetError::Private(ip));
        }
    }
    if any {
        Ok(())
    } else {
        Err(TargetError::NoAddress)
    }
}

/// True for globally routable unicast addresses.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let reserved = ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments 192.0.0/24
        || (a == 198 && (b == 18 || b == 19)) // benchmarking 198.18/15
        || a >= 240; // reserved 240/4
    !reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let seg = ip.segments();
    let reserved = ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
        || (seg[0] & 0xffc0) == 0xfec0 // deprecated site-local fec0::/10
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation 2001:db8::/32
        || (seg[0] == 0x0064 && seg[1] == 0xff9b) // NAT64 64:ff9b::/96 reaches IPv4 targets
        || seg[..6] == [0, 0, 0, 0, 0, 0]; // IPv4-compatible ::a.b.c.d (deprecated)
    !reserved
}

/// The HTTP client's resolver: the system resolver, then the public-address rule (unless allowed).
#[derive(Debug, Clone, Copy)]
pub struct PublicResolver {
    pub allow_private: bool,
}

impl Resolve for PublicResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            if !allow_private {
                all_public(addrs.iter().map(SocketAddr::ip))?;
            }
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(private.parse().expect("ip")), "{private}");
        }
        for public in ["1.1.1.1", "8.8.8.8", "2606:4700:4700::1111"] {
            assert!(is_public(public.parse().expect("ip")), "{public}");
        }
    }

    #[tokio::test]
    async fn urls_are_checked() {
        let refused = [
            ("ftp://example.com/x", "scheme"),
            ("file:///etc/passwd", "scheme"),
            ("http://127.0.0.1:8080/hook", "non-public"),
            ("http://[::1]/hook", "non-public"),
            ("http://localhost/hook", "non-public"),
            ("http://user:pw@1.1.1.1/hook", "credentials"),
            ("not a url", "valid URL"),
        ];
        for (url, why) in refused {
            let err = check(url, false).await.expect_err(url).to_string();
            assert!(err.contains(why), "{url}: {err}");
        }
        assert!(check("http://127.0.0.1:8080/hook", true).await.is_ok());
        assert!(check("http://1.1.1.1/hook", false).await.is_ok());
    }

    #[test]
    fn logs_see_scheme_host_and_port_only() {
        assert_eq!(
            redact("https://hooks.example.com:8443/p/secret-token?sig=abc"),
            "https://hooks.example.com:8443"
        );
        assert_eq!(redact("http://h.example/x"), "http://h.example");
        assert_eq!(redact("::"), "<invalid url>");
    }
}
