//! Address decisions, kept pure so they can be tested without a host:
//! the bridge network, which guest IPs are usable, MACs, TAP names, ports.

use std::collections::HashSet;
use std::net::Ipv4Addr;

/// The bridge's own address and the network it serves, e.g. `172.16.0.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeNet {
    pub bridge_ip: Ipv4Addr,
    pub prefix: u8,
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

impl BridgeNet {
    /// Parses `A.B.C.D/P`. When the address is the network address itself,
    /// the bridge takes the first host address.
    pub fn parse(s: &str) -> Result<BridgeNet, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR like 172.16.0.1/24"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{s:?}: bad IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{s:?}: bad prefix length"))?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("{s:?}: the prefix length must be between 8 and 30"));
        }
        let net = u32::from(ip) & mask(prefix);
        let bridge_ip = if u32::from(ip) == net {
            Ipv4Addr::from(net + 1)
        } else {
            ip
        };
        let b = BridgeNet { bridge_ip, prefix };
        if bridge_ip == b.broadcast() {
            return Err(format!(
                "{s:?}: the bridge cannot take the broadcast address"
            ));
        }
        Ok(b)
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.bridge_ip) & mask(self.prefix))
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !mask(self.prefix))
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network())
    }

    /// `172.16.0.0/24`
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.network(), self.prefix)
    }

    /// Is `ip` one a guest may have? (In the network; not its network,
    /// broadcast or bridge address.)
    pub fn check_guest_ip(&self, ip: Ipv4Addr) -> Result<(), String> {
        if !self.contains(ip) {
            return Err(format!(
                "guest_ip {ip} is outside the bridge network {}",
                self.cidr()
            ));
        }
        if ip == self.network() {
            return Err(format!(
                "guest_ip {ip} is the network address of {}",
                self.cidr()
            ));
        }
        if ip == self.broadcast() {
            return Err(format!(
                "guest_ip {ip} is the broadcast address of {}",
                self.cidr()
            ));
        }
        if ip == self.bridge_ip {
            return Err(format!("guest_ip {ip} is the bridge's own address"));
        }
        Ok(())
    }

    /// The lowest free guest address. Automatic allocation starts at the
    /// tenth host address (as the seeds show, `.10`), leaving the first ones
    /// for the host side, when the network is big enough.
    pub fn first_free(&self, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let first_host = u32::from(self.network()) + 1;
        let last_host = u32::from(self.broadcast()) - 1;
        let start = if last_host - first_host >= 64 {
            first_host + 9
        } else {
            first_host
        };
        (start..=last_host)
            .map(Ipv4Addr::from)
            .find(|ip| *ip != self.bridge_ip && !used.contains(ip))
    }
}

/// A locally administered unicast MAC derived from the guest IP
/// (`02:fc:` + the four address bytes), so it is unique whenever the IP is.
pub fn mac_for_ip(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:fc:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// Parses and normalizes (lowercase) a MAC; it must be a unicast, non-zero address.
pub fn parse_mac(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bytes: Option<Vec<u8>> = (parts.len() == 6)
        .then(|| {
            parts
                .iter()
                .map(|p| {
                    (p.len() == 2)
                        .then(|| u8::from_str_radix(p, 16).ok())
                        .flatten()
                })
                .collect()
        })
        .flatten();
    let Some(bytes) = bytes else {
        return Err(format!(
            "guest_mac {s:?} is not a MAC address like 02:fc:00:00:00:0a"
        ));
    };
    if bytes[0] & 1 == 1 {
        return Err(format!("guest_mac {s} is a multicast address"));
    }
    if bytes.iter().all(|b| *b == 0) {
        return Err(format!("guest_mac {s} is all zeros"));
    }
    Ok(bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// The TAP device of a VM: `ht` + the id's random part (14 characters, within IFNAMSIZ).
pub fn tap_name(vm_id: &str) -> String {
    let suffix = vm_id.split_once('_').map(|(_, s)| s).unwrap_or(vm_id);
    let mut name = format!("ht{suffix}");
    name.truncate(15);
    name
}

/// Parses `16000-16999`.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a port range like 16000-16999"))?;
    let a: u16 = a.trim().parse().map_err(|_| format!("{s:?}: bad port"))?;
    let b: u16 = b.trim().parse().map_err(|_| format!("{s:?}: bad port"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: the range must be low-high with low >= 1"));
    }
    Ok((a, b))
}

pub fn first_free_port((lo, hi): (u16, u16), used: &HashSet<u16>) -> Option<u16> {
    (lo..=hi).find(|p| !used.contains(p))
}

/// Parses a comma-separated list of IPv4 CIDRs (`0.0.0.0/0`, `10.0.0.0/8,192.168.1.7/32`).
pub fn parse_cidr_list(s: &str) -> Result<Vec<String>, String> {
    let mut out = vec![];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (ip, prefix) = part.split_once('/').unwrap_or((part, "32"));
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{part:?} is not an IPv4 CIDR"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{part:?}: bad prefix"))?;
        let net = Ipv4Addr::from(u32::from(ip) & mask(prefix));
        out.push(format!("{net}/{prefix}"));
    }
    if out.is_empty() {
        return Err("the list of allowed source ranges is empty".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> BridgeNet {
        BridgeNet::parse("172.16.0.1/24").unwrap()
    }

    #[test]
    fn parses_bridge_cidrs() {
        let n = net();
        assert_eq!(n.bridge_ip, Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(n.network(), Ipv4Addr::new(172, 16, 0, 0));
        assert_eq!(n.broadcast(), Ipv4Addr::new(172, 16, 0, 255));
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        let netmask = |cidr: &str| BridgeNet::parse(cidr).unwrap().netmask();
        assert_eq!(netmask("10.1.0.1/16"), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(netmask("10.1.0.1/30"), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(n.cidr(), "172.16.0.0/24");
        // The network address given: the bridge takes .1.
        assert_eq!(
            BridgeNet::parse("10.9.0.0/16").unwrap().bridge_ip,
            Ipv4Addr::new(10, 9, 0, 1)
        );
        for bad in [
            "172.16.0.1",
            "x/24",
            "172.16.0.1/33",
            "172.16.0.1/31",
            "172.16.0.255/24",
        ] {
            assert!(BridgeNet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn guest_ips_must_be_usable_hosts() {
        let n = net();
        assert!(n.check_guest_ip(Ipv4Addr::new(172, 16, 0, 50)).is_ok());
        let e = |ip| n.check_guest_ip(ip).unwrap_err();
        assert!(e(Ipv4Addr::new(10, 0, 0, 5)).contains("outside"));
        assert!(e(Ipv4Addr::new(172, 16, 0, 0)).contains("network address"));
        assert!(e(Ipv4Addr::new(172, 16, 0, 255)).contains("broadcast"));
        assert!(e(Ipv4Addr::new(172, 16, 0, 1)).contains("bridge"));
    }

    #[test]
    fn allocation_starts_at_10_and_skips_used() {
        let n = net();
        let mut used = HashSet::new();
        assert_eq!(n.first_free(&used), Some(Ipv4Addr::new(172, 16, 0, 10)));
        used.insert(Ipv4Addr::new(172, 16, 0, 10));
        used.insert(Ipv4Addr::new(172, 16, 0, 11));
        assert_eq!(n.first_free(&used), Some(Ipv4Addr::new(172, 16, 0, 12)));
        // A small network uses every host address but the bridge's.
        let small = BridgeNet::parse("192.168.5.1/29").unwrap();
        let got: Vec<_> = {
            let mut used = HashSet::new();
            std::iter::from_fn(|| {
                let ip = small.first_free(&used)?;
                used.insert(ip);
                Some(ip.octets()[3])
            })
            .collect()
        };
        assert_eq!(got, vec![2, 3, 4, 5, 6]);
    }

    #[test]
    fn macs() {
        assert_eq!(
            mac_for_ip(Ipv4Addr::new(172, 16, 0, 10)),
            "02:fc:ac:10:00:0a"
        );
        assert_eq!(parse_mac("02:FC:00:00:00:0A").unwrap(), "02:fc:00:00:00:0a");
        assert!(parse_mac("01:00:5e:00:00:01")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_mac("00:00:00:00:00:00")
            .unwrap_err()
            .contains("zeros"));
        for bad in [
            "02:fc:00:00:00",
            "02:fc:00:00:00:0g",
            "02fc0000000a",
            "02:fc:00:00:00:000",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_ports_and_ranges() {
        assert_eq!(tap_name("vm_abc123def456"), "htabc123def456");
        assert!(tap_name("vm_abc123def456xyz").len() <= 15);
        assert_eq!(parse_port_range("16000-16002").unwrap(), (16000, 16002));
        assert!(parse_port_range("5-1").is_err());
        let used: HashSet<u16> = [16000, 16001].into();
        assert_eq!(first_free_port((16000, 16002), &used), Some(16002));
        assert_eq!(first_free_port((16000, 16001), &used), None);
        assert_eq!(parse_cidr_list("0.0.0.0/0").unwrap(), vec!["0.0.0.0/0"]);
        assert_eq!(
            parse_cidr_list("10.1.2.3/8, 192.168.1.7").unwrap(),
            vec!["10.0.0.0/8", "192.168.1.7/32"]
        );
        assert!(parse_cidr_list("").is_err());
        assert!(parse_cidr_list("10.0.0.0/40").is_err());
    }
}
