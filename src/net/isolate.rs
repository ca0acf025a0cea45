//! Forks: a guest restored from another VM's memory believes it has that
//! VM's address and MAC, while that VM keeps them on the bridge. Such a
//! guest gets a network namespace of its own between its TAP and the
//! bridge: a one-host router that answers the guest's ARP, translates the
//! guest's address (inner) to the one the control plane gave the VM (outer)
//! and back, and never lets the guest's frames onto the bridge. See
//! README.md, "Forks".

use super::firewall::{apply, ip_field, matches};
use super::ipam::BridgeNet;
use super::link;
use crate::vmm::process::netns_path;
use serde_json::{json, Value};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// The namespace's end of the veth pair. Names are per namespace, so every
/// isolation can use the same one.
pub const UPLINK: &str = "uplink";

/// The nftables tables inside the namespace (`ip` for NAT, `netdev` for the
/// TAP's ingress); the namespace is the VM's alone, so the name cannot clash.
const TABLE: &str = "hatch";

/// What one isolated VM's networking consists of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// Name under /run/netns. Those names are host-wide (every daemon on
    /// the host, also the tests' daemons in their own namespaces, shares
    /// them), so it contains the VM id.
    pub netns: String,
    /// The veth end in the daemon's namespace, a port of the bridge.
    pub veth: String,
    /// The guest's TAP, inside the namespace; the VMM opens it there by name.
    pub tap: String,
    /// The VM's own address (its `guest_ip`): what the bridge, the host and
    /// other guests see and use.
    pub outer_ip: Ipv4Addr,
    /// The MAC the bridge sees for `outer_ip` (the namespace's veth end).
    pub outer_mac: String,
    /// The address the guest believes it has (the source VM's).
    pub inner_ip: Ipv4Addr,
}

/// `hatch-<vm id>`.
pub fn netns_name(vm_id: &str) -> String {
    format!("hatch-{vm_id}")
}

/// `hv` + the id's random part, like the TAP's `ht...` (within IFNAMSIZ).
/// `Network::remove_stale_taps` treats `hv*` ports of the bridge as ours.
pub fn veth_name(vm_id: &str) -> String {
    let suffix = vm_id.split_once('_').map(|(_, s)| s).unwrap_or(vm_id);
    let mut name = format!("hv{suffix}");
    name.truncate(15);
    name
}

/// The isolation of VM `vm_id` whose guest believes it is `inner_ip` and
/// must be reached at `outer_ip`, which the bridge sees with `outer_mac`
/// (the VM's own `guest_mac`, so the address keeps the MAC the API reports).
/// Pure: the names come from the id, so the same call finds the same
/// namespace again after a daemon restart.
pub fn isolation_for(
    vm_id: &str,
    tap: &str,
    outer_ip: Ipv4Addr,
    inner_ip: Ipv4Addr,
    outer_mac: &str,
) -> Isolation {
    Isolation {
        netns: netns_name(vm_id),
        veth: veth_name(vm_id),
        tap: tap.to_string(),
        outer_ip,
        outer_mac: outer_mac.to_string(),
        inner_ip,
    }
}

/// The VM id in a name `netns_name` made.
pub fn vm_id_of_netns(netns: &str) -> Option<&str> {
    netns.strip_prefix("hatch-").filter(|id| !id.is_empty())
}

/// Letters, digits, `_`, `.` and `-` only: safe in a path and on a command line.
fn is_plain(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn check_ifname(what: &str, name: &str) -> Result<(), String> {
    let ok = is_plain(name) && name.len() < libc::IFNAMSIZ;
    if ok {
        Ok(())
    } else {
        Err(format!("bad {what} name {name:?}"))
    }
}

/// A namespace name ends up in a path under /run/netns and on `ip`'s
/// command line: only plain ones pass.
pub fn check_netns_name(name: &str) -> Result<(), String> {
    let ok = is_plain(name) && name.len() <= 64 && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!("bad network namespace name {name:?}"))
    }
}

/// The names end up in paths and command lines: only plain ones pass.
pub fn check(iso: &Isolation) -> Result<(), String> {
    check_netns_name(&iso.netns)?;
    check_ifname("veth", &iso.veth)?;
    check_ifname("TAP", &iso.tap)?;
    if iso.tap == UPLINK {
        return Err(format!("the TAP cannot be named {UPLINK}"));
    }
    super::ipam::parse_mac(&iso.outer_mac)?;
    Ok(())
}

fn chain(family: &str, name: &str, kind: &str, hook: &str, prio: i32) -> Value {
    json!({ "add": { "chain": {
        "family": family, "table": TABLE, "name": name,
        "type": kind, "hook": hook, "prio": prio, "policy": "accept"
    } } })
}

fn rule(family: &str, chain: &str, expr: Vec<Value>) -> Value {
    json!({ "add": { "rule": {
        "family": family, "table": TABLE, "chain": chain, "expr": expr
    } } })
}

fn ifname(key: &str, name: &str) -> Value {
    matches(json!({ "meta": { "key": key } }), "==", json!(name))
}

/// The namespace's firewall, applied once when it is made.
pub fn ruleset(iso: &Isolation) -> Value {
    let outer = iso.outer_ip.to_string();
    let inner = iso.inner_ip.to_string();
    let cmds = vec![
        json!({ "add": { "table": { "family": "ip", "name": TABLE } } }),
        chain("ip", "prerouting", "nat", "prerouting", -100),
        chain("ip", "postrouting", "nat", "postrouting", 100),
        // Whatever reaches the VM's address from the bridge is for the guest.
        rule(
            "ip",
            "prerouting",
            vec![
                ifname("iifname", UPLINK),
                matches(ip_field("daddr"), "==", json!(outer)),
                json!({ "dnat": { "family": "ip", "addr": inner } }),
            ],
        ),
        // What the guest starts leaves with the VM's address; answers to
        // connections from outside are translated back by conntrack.
        rule(
            "ip",
            "postrouting",
            vec![
                ifname("oifname", UPLINK),
                matches(ip_field("saddr"), "==", json!(inner)),
                json!({ "snat": { "family": "ip", "addr": outer } }),
            ],
        ),
        // The guest's ARP cache still holds the MACs it learned on the
        // bridge (the gateway's, other guests'), and it keeps sending to
        // them. Those frames reach the TAP addressed to another host, and
        // the IP and ARP input paths drop such frames. Marking them as ours
        // before either sees them makes the namespace route them (and
        // answer ARP for them) until the guest's cache has refreshed; a
        // restored guest works from its first packet, not after its
        // neighbour entries time out.
        json!({ "add": { "table": { "family": "netdev", "name": TABLE } } }),
        json!({ "add": { "chain": {
            "family": "netdev", "table": TABLE, "name": "guest_in",
            "type": "filter", "hook": "ingress", "dev": iso.tap, "prio": 0,
            "policy": "accept"
        } } }),
        rule(
            "netdev",
            "guest_in",
            vec![
                matches(
                    json!({ "meta": { "key": "pkttype" } }),
                    "==",
                    json!("other"),
                ),
                json!({ "mangle": { "key": { "meta": { "key": "pkttype" } }, "value": "host" } }),
            ],
        ),
    ];
    json!({ "nftables": cmds })
}

/// The `ip -batch` script that gives the namespace its addresses and routes.
pub fn ip_script(iso: &Isolation, net: &BridgeNet) -> String {
    format!(
        "link set lo up\n\
         address add {outer}/{prefix} dev {UPLINK}\n\
         link set {UPLINK} up\n\
         route add default via {gw} dev {UPLINK}\n\
         link set {tap} up\n\
         route add {inner}/32 dev {tap}\n",
        outer = iso.outer_ip,
        prefix = net.prefix,
        gw = net.bridge_ip,
        tap = iso.tap,
        inner = iso.inner_ip,
    )
}

/// Runs a command, failing with its stderr.
fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<(), String> {
    let what = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
    // Written and closed before waiting, and the child is waited for even
    // when writing failed, so it never lingers.
    let written = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            use std::io::Write;
            pipe.write_all(text.as_bytes())
        }
        _ => Ok(()),
    };
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    written.map_err(|e| format!("{what}: writing its input: {e}"))
}

/// Runs `f` on a thread of its own that has joined the network namespace
/// `netns` (a name under /run/netns). Only that short-lived thread changes
/// namespace: setns(2) on a runtime's worker would leave the worker, and
/// every task later scheduled on it, in the namespace. Sockets, TAPs and
/// /proc/sys/net files opened there, and processes spawned there, belong to
/// the namespace.
pub fn in_netns<T: Send>(
    netns: &str,
    f: impl FnOnce() -> Result<T, String> + Send,
) -> Result<T, String> {
    let ns =
        File::open(netns_path(netns)).map_err(|e| format!("network namespace {netns}: {e}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) with an open nsfs file and CLONE_NEWNET; it
            // only changes this thread, which ends when `f` returns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "entering network namespace {netns}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            f()
        })
        .join()
        .map_err(|_| format!("the worker in network namespace {netns} panicked"))?
    })
}

/// Creates the namespace and the veth pair, the namespace's end named
/// `UPLINK` and carrying `outer_mac`. Runs in the daemon's namespace.
pub fn create(iso: &Isolation) -> Result<(), String> {
    run(Command::new("ip").args(["netns", "add", &iso.netns]), None)?;
    run(
        Command::new("ip").args([
            "link",
            "add",
            &iso.veth,
            "type",
            "veth",
            "peer",
            "name",
            UPLINK,
            "address",
            &iso.outer_mac,
            "netns",
            &iso.netns,
        ]),
        None,
    )
}

/// Everything inside the namespace: forwarding, the TAP, proxy ARP,
/// addresses, routes, NAT. Must run on a thread in the namespace (`in_netns`).
pub fn configure_inside(iso: &Isolation, net: &BridgeNet) -> Result<(), String> {
    link::sysctl("net/ipv4/ip_forward", "1")?;
    // A gratuitous ARP when the uplink comes up updates at once the bridge
    // neighbours that still cache another MAC for the outer address.
    link::sysctl(&format!("net/ipv4/conf/{UPLINK}/arp_notify"), "1")?;
    link::make_persistent_tap(&iso.tap)?;
    // The TAP has no address: the namespace answers the guest's ARP for
    // anything it routes elsewhere (its gateway, other guests) itself, and
    // at once (the default proxy delay is up to 0.8 s per request).
    link::sysctl(&format!("net/ipv4/conf/{}/proxy_arp", iso.tap), "1")?;
    link::sysctl(&format!("net/ipv4/neigh/{}/proxy_delay", iso.tap), "0")?;
    run(
        Command::new("ip").args(["-batch", "-"]),
        Some(&ip_script(iso, net)),
    )?;
    apply(&ruleset(iso))
}

/// Deletes the namespace `name` (its TAP and veth end go with it, once no
/// process holds it any more); one that is not there is fine.
pub fn delete_netns(name: &str) -> Result<(), String> {
    if std::fs::symlink_metadata(netns_path(name)).is_err() {
        return Ok(());
    }
    run(Command::new("ip").args(["netns", "del", name]), None)
}

/// Namespaces, scratch directories and a runtime inside a namespace, for
/// tests that build their own networks. The file lives with the integration
/// tests (tests/fork_isolation.rs uses it too).
#[cfg(test)]
#[path = "../../tests/netns/mod.rs"]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::*;
    use nftables::schema::Nftables;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn names_come_from_the_vm_id() {
        let iso = isolation_for(
            "vm_k3j9x0a1b2c3",
            "htk3j9x0a1b2c3",
            ip("172.16.0.11"),
            ip("172.16.0.10"),
            "02:fc:ac:10:00:0b",
        );
        assert_eq!(iso.netns, "hatch-vm_k3j9x0a1b2c3");
        assert_eq!(iso.veth, "hvk3j9x0a1b2c3");
        assert_eq!(vm_id_of_netns(&iso.netns), Some("vm_k3j9x0a1b2c3"));
        assert_eq!(vm_id_of_netns("other"), None);
        assert!(check(&iso).is_ok());
        assert_eq!(veth_name("vm_0123456789abcdefgh").len(), 15);
        let mut bad = iso.clone();
        bad.netns = "../etc".into();
        assert!(check(&bad).is_err());
        let mut bad = iso.clone();
        bad.tap = "a b".into();
        assert!(check(&bad).is_err());
        let mut bad = iso.clone();
        bad.veth = "hv0123456789abcd".into(); // 16 characters
        assert!(check(&bad).is_err());
        let mut bad = iso;
        bad.outer_mac = "03:00:00:00:00:01".into(); // multicast
        assert!(check(&bad).is_err());
    }

    #[test]
    fn the_namespace_ruleset_parses_as_nftables_json() {
        let iso = isolation_for(
            "vm_a",
            "hta",
            ip("172.16.0.11"),
            ip("172.16.0.10"),
            "02:fc:ac:10:00:0b",
        );
        let doc = ruleset(&iso);
        let typed: Nftables = serde_json::from_value(doc.clone()).expect("valid nftables JSON");
        // 2 tables, 3 chains, 3 rules.
        assert_eq!(typed.objects.len(), 8);
        let text = doc.to_string();
        assert!(text.contains(r#""dnat":{"addr":"172.16.0.10""#), "{text}");
        assert!(text.contains(r#""snat":{"addr":"172.16.0.11""#), "{text}");
        assert!(text.contains(r#""dev":"hta""#), "{text}");
        let script = ip_script(&iso, &BridgeNet::parse("172.16.0.1/24").unwrap());
        assert!(script.contains("address add 172.16.0.11/24 dev uplink"));
        assert!(script.contains("route add default via 172.16.0.1 dev uplink"));
        assert!(script.contains("route add 172.16.0.10/32 dev hta"));
    }
}
