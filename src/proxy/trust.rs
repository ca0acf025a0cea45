//! Which forwarding headers reach a guest: the proxy's own, unless the peer
//! is a proxy the operator trusts (HATCH_PROXY_TRUSTED_PROXIES).

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

/// An IPv4 or IPv6 network, `addr/prefix` (a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix must be 0 to {max}"))?,
        };
        Ok(Cidr {
            net: mask(ip, prefix),
            prefix,
        })
    }

    /// A comma-separated list; empty text is an empty list.
    pub fn parse_list(s: &str) -> Result<Vec<Cidr>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(Cidr::parse)
            .collect()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        ip.is_ipv4() == self.net.is_ipv4() && mask(ip, self.prefix) == self.net
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - prefix as u32).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// One header's values joined by `, ` (a header may be sent several times).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// Sets the forwarding headers of a request from `peer` for `host` (a
/// checked host name). An untrusted peer's own values are dropped whole, so
/// a guest can believe them; a trusted peer's are kept and our hop added.
pub fn set_forwarding_headers(headers: &mut HeaderMap, peer: IpAddr, host: &str, trusted: bool) {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
        v4 => v4,
    };
    // The peer's address is formatted once: this runs on every request.
    let peer_text = peer.to_string();
    let ours = match peer {
        IpAddr::V4(_) => format!("for={peer_text};host=\"{host}\";proto=http"),
        IpAddr::V6(_) => format!("for=\"[{peer_text}]\";host=\"{host}\";proto=http"),
    };
    let (xff, forwarded) = if trusted {
        let xff = match joined(headers, &X_FORWARDED_FOR) {
            Some(prev) => format!("{prev}, {peer_text}"),
            None => peer_text.clone(),
        };
        let fwd = match joined(headers, &FORWARDED) {
            Some(prev) => format!("{prev}, {ours}"),
            None => ours,
        };
        (xff, fwd)
    } else {
        for h in [&X_FORWARDED_HOST, &X_FORWARDED_PROTO, &X_REAL_IP] {
            headers.remove(h);
        }
        (peer_text.clone(), ours)
    };
    let mut values = vec![
        (X_FORWARDED_FOR, xff.as_str()),
        (FORWARDED, forwarded.as_str()),
    ];
    for (name, ours) in [
        (X_FORWARDED_HOST, host),
        (X_FORWARDED_PROTO, "http"),
        (X_REAL_IP, peer_text.as_str()),
    ] {
        if !headers.contains_key(&name) {
            values.push((name, ours));
        }
    }
    for (name, value) in values {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    }
}

/// Is `host` (from `Host` or `:authority`) a plausible `name[:port]`? A
/// longer or stranger one is refused before any lookup, and never echoed.
pub fn plausible_host(host: &str) -> bool {
    // 253 for the DNS name, `:` and a port of up to 5 digits.
    host.len() <= 253 + 6
        && !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let list = Cidr::parse_list("10.0.0.0/8, 192.168.1.7 ,fd00::/8").unwrap();
        let has = |ip: &str| list.iter().any(|c| c.contains(ip.parse().unwrap()));
        assert!(has("10.200.3.4"));
        assert!(has("192.168.1.7"));
        assert!(!has("192.168.1.8"));
        assert!(has("fd12::1"));
        assert!(has("::ffff:10.1.2.3"), "an IPv4 peer on an IPv6 socket");
        assert!(!has("11.0.0.1"));
        assert!(!has("::1"));
        assert!(Cidr::parse_list("").unwrap().is_empty());
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "host", "10.0.0.0/x", "/8"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    fn spoofed() -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-host", "bank.example"),
            ("x-forwarded-proto", "https"),
            ("x-real-ip", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9;proto=https"),
        ] {
            h.insert(k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn an_untrusted_peer_gets_our_values_only() {
        let mut h = spoofed();
        set_forwarding_headers(&mut h, "10.77.0.2".parse().unwrap(), "app.localhost", false);
        assert_eq!(h["x-forwarded-for"], "10.77.0.2");
        assert_eq!(h["x-forwarded-host"], "app.localhost");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-real-ip"], "10.77.0.2");
        assert_eq!(
            h["forwarded"],
            "for=10.77.0.2;host=\"app.localhost\";proto=http"
        );
        let mut h = HeaderMap::new();
        set_forwarding_headers(&mut h, "::1".parse().unwrap(), "a.localhost", false);
        assert_eq!(
            h["forwarded"],
            "for=\"[::1]\";host=\"a.localhost\";proto=http"
        );
    }

    #[test]
    fn a_trusted_peer_keeps_its_values_and_we_add_our_hop() {
        let mut h = spoofed();
        set_forwarding_headers(&mut h, "127.0.0.1".parse().unwrap(), "app.localhost", true);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(h["x-forwarded-host"], "bank.example");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-real-ip"], "203.0.113.9");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.9;proto=https, for=127.0.0.1;host=\"app.localhost\";proto=http"
        );
    }

    #[test]
    fn hosts() {
        assert!(plausible_host("app.localhost:8081"));
        assert!(plausible_host("[::1]:8081"));
        assert!(!plausible_host(""));
        assert!(!plausible_host(&"a".repeat(60_000)));
        assert!(!plausible_host("app.localhost\"><script>"));
        assert!(!plausible_host("app localhost"));
    }
}
