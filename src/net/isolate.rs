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

/// Helpers for tests that build their own networks: namespaces that are
/// removed when the test ends (also when it panics) and code run inside them.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// The daemon's default network settings, for tests that set networking up for real.
    pub fn test_net_config() -> crate::net::NetConfig {
        crate::net::NetConfig {
            bridge: "hatch0".into(),
            net: BridgeNet::parse("172.16.0.1/24").unwrap(),
            ssh_ports: (16000, 16999),
            ssh_allowed_sources: vec!["0.0.0.0/0".into()],
            guest_to_guest: Default::default(),
        }
    }
    use std::path::PathBuf;

    /// A network namespace made for a test; deleted when dropped.
    pub struct Netns(pub String);

    impl Netns {
        /// `hatch-t<pid>-<tag>`: unique among tests running at the same time.
        pub fn new(tag: &str) -> Netns {
            let name = format!("hatch-t{}-{tag}", std::process::id());
            let _ = delete_netns(&name);
            run(Command::new("ip").args(["netns", "add", &name]), None).unwrap();
            Netns(name)
        }

        /// `ip -n NAME ARGS`; panics when it fails, returns stdout.
        pub fn ip(&self, args: &[&str]) -> String {
            let out = self.try_ip(args);
            assert!(
                out.status.success(),
                "ip -n {} {args:?}: {}",
                self.0,
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        pub fn try_ip(&self, args: &[&str]) -> std::process::Output {
            Command::new("ip")
                .args(["-n", &self.0])
                .args(args)
                .output()
                .expect("running ip")
        }

        /// Gives the namespace one interface `ifname` with `mac`, `cidr` and
        /// a default route via `gw`: a host on a LAN.
        pub fn host(&self, ifname: &str, mac: &str, cidr: &str, gw: &str) {
            self.ip(&["link", "set", "lo", "up"]);
            self.ip(&["link", "set", ifname, "address", mac]);
            self.ip(&["address", "add", cidr, "dev", ifname]);
            self.ip(&["link", "set", ifname, "up"]);
            self.ip(&["route", "add", "default", "via", gw]);
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = delete_netns(&self.0);
        }
    }

    /// Deletes a namespace made by the code under test, should the test end
    /// before the code does.
    pub struct NetnsCleanup(pub String);

    impl Drop for NetnsCleanup {
        fn drop(&mut self) {
            let _ = delete_netns(&self.0);
        }
    }

    /// A scratch directory; processes naming it (dnsmasq, a VMM) are killed
    /// and it is removed when dropped.
    pub struct TestDir(pub PathBuf);

    impl TestDir {
        pub fn new(tag: &str) -> TestDir {
            let dir = std::env::temp_dir().join(format!("hatch-t{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            crate::vmm::process::kill_all_under(&self.0);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Runs `body` on a thread inside the namespace `netns`, with a
    /// single-threaded runtime of its own: everything the body creates
    /// (netlink sockets, TAPs, child processes, blocking-pool threads,
    /// which are spawned from it) lives in that namespace. Panics propagate.
    pub fn block_on_in<F>(netns: &str, body: impl FnOnce() -> F + Send) -> F::Output
    where
        F: std::future::Future,
        F::Output: Send,
    {
        let ns = File::open(netns_path(netns)).unwrap();
        std::thread::scope(|s| {
            let worker = s.spawn(|| {
                // SAFETY: setns(2) with an open nsfs file; changes this thread only.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(body())
            });
            match worker.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::net::firewall::{Forward, Guest};
    use crate::net::Network;
    use nftables::schema::Nftables;
    use std::collections::HashSet;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

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

    /// Carries frames between two TAP queues, both ways: what a VMM does
    /// between the TAP and the guest's NIC. The far TAP lives in a namespace
    /// whose kernel stack plays the guest.
    struct Wire {
        stop: Arc<AtomicBool>,
        threads: Vec<JoinHandle<()>>,
    }

    impl Wire {
        fn new(a: File, b: File) -> Wire {
            let (a, b) = (Arc::new(a), Arc::new(b));
            let stop = Arc::new(AtomicBool::new(false));
            let threads = [(a.clone(), b.clone()), (b, a)]
                .into_iter()
                .map(|(from, to)| {
                    let stop = stop.clone();
                    std::thread::spawn(move || pump(&from, &to, &stop))
                })
                .collect();
            Wire { stop, threads }
        }
    }

    fn pump(from: &File, to: &File, stop: &AtomicBool) {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: from.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, 50) };
            if n <= 0 {
                continue;
            }
            // One read is one frame.
            match (&*from).read(&mut buf) {
                Ok(len) if len > 0 => {
                    let _ = (&*to).write(&buf[..len]);
                }
                _ => return, // the TAP went away
            }
        }
    }

    impl Drop for Wire {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    /// A TCP server answering every line with `NAME PEER-IP LINE`, and a UDP
    /// one answering every datagram with `NAME PEER-IP`.
    struct Server {
        stop: Arc<AtomicBool>,
        threads: Vec<JoinHandle<()>>,
    }

    impl Server {
        /// Listens on `addr` inside `netns` (or where the caller is).
        fn start(netns: Option<&str>, name: &'static str, addr: &str) -> Server {
            let addr: SocketAddr = addr.parse().unwrap();
            let bind = move || {
                let tcp = TcpListener::bind(addr).map_err(|e| e.to_string())?;
                let udp = UdpSocket::bind(addr).map_err(|e| e.to_string())?;
                Ok((tcp, udp))
            };
            let (tcp, udp) = match netns {
                Some(ns) => in_netns(ns, bind).unwrap(),
                None => bind().unwrap(),
            };
            tcp.set_nonblocking(true).unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let s1 = stop.clone();
            let tcp_thread = std::thread::spawn(move || {
                while !s1.load(Ordering::Relaxed) {
                    let Ok((conn, peer)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    std::thread::spawn(move || {
                        conn.set_nonblocking(false).unwrap();
                        let mut lines = BufReader::new(conn.try_clone().unwrap()).lines();
                        let mut conn = conn;
                        while let Some(Ok(line)) = lines.next() {
                            let _ = writeln!(conn, "{name} {} {line}", peer.ip());
                        }
                    });
                }
            });
            let s2 = stop.clone();
            let udp_thread = std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !s2.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(format!("{name} {}", peer.ip()).as_bytes(), peer);
                    }
                }
            });
            Server {
                stop,
                threads: vec![tcp_thread, udp_thread],
            }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    struct Conn(BufReader<TcpStream>);

    impl Conn {
        fn open(addr: &str) -> Result<Conn, String> {
            let addr: SocketAddr = addr.parse().unwrap();
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .map_err(|e| format!("connecting to {addr}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            Ok(Conn(BufReader::new(s)))
        }

        fn ask(&mut self, line: &str) -> String {
            writeln!(self.0.get_mut(), "{line}").unwrap();
            let mut answer = String::new();
            self.0.read_line(&mut answer).unwrap();
            answer.trim().to_string()
        }
    }

    /// One question on a new connection, from the calling thread's namespace.
    fn ask(addr: &str) -> Result<String, String> {
        Ok(Conn::open(addr)?.ask("hello"))
    }

    fn ask_udp(addr: &str) -> Result<String, String> {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(b"hello", addr).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).map_err(|e| format!("udp {addr}: {e}"))?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    fn mac_of(ns: &Netns, ifname: &str) -> String {
        let out = ns.ip(&["-j", "link", "show", "dev", ifname]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v[0]["address"].as_str().unwrap().to_string()
    }

    fn neighbour(ns: &Netns, addr: &str) -> String {
        ns.ip(&["neigh", "show", addr])
    }

    fn bridge_ports(ns: &Netns) -> Vec<String> {
        let out = ns.ip(&["-j", "link", "show", "master", "hatch0"]);
        let v: Vec<Value> = serde_json::from_str(&out).unwrap_or_default();
        v.iter()
            .filter_map(|l| l["ifname"].as_str().map(String::from))
            .collect()
    }

    const SOURCE_MAC: &str = "02:fc:ac:10:00:0a";

    /// The whole picture in namespaces: the daemon's side (bridge, dnsmasq,
    /// firewall, set up by the real `Network`), a source VM at .10, and a
    /// fork isolated by `Network::isolate` whose guest also believes it is
    /// .10 with the source's MAC, behind a real TAP.
    #[test]
    fn a_fork_and_its_source_are_reachable_at_their_own_addresses() {
        let pid = std::process::id();
        let daemon = Netns::new("daemon");
        let source = Netns::new("source");
        let guest = Netns::new("guest");
        let fork_id = format!("vm_t{pid:x}f");
        let other_id = format!("vm_t{pid:x}o");
        let _fork_ns = NetnsCleanup(netns_name(&fork_id));
        let _other_ns = NetnsCleanup(netns_name(&other_id));
        let state = TestDir::new("isolate");
        block_on_in(&daemon.0, || async {
            let cfg = test_net_config();
            let net = Network::setup(cfg, &state.0, &[]).await.unwrap();
            daemon.ip(&["link", "set", "lo", "up"]);

            // The source VM: a host on the bridge at .10.
            daemon.ip(&[
                "link", "add", "srcport", "type", "veth", "peer", "name", "eth0", "netns",
                &source.0,
            ]);
            daemon.ip(&["link", "set", "srcport", "master", "hatch0", "up"]);
            source.host("eth0", SOURCE_MAC, "172.16.0.10/24", "172.16.0.1");

            // The fork, isolated; a second isolate() replaces the first.
            let iso = isolation_for(
                &fork_id,
                "htfork",
                ip("172.16.0.11"),
                ip("172.16.0.10"),
                "02:fc:ac:10:00:0b",
            );
            net.isolate(&iso).await.unwrap();
            net.isolate(&iso).await.unwrap();

            // Its guest: the source's address and MAC, and an ARP cache
            // from the bridge (the gateway at the bridge's MAC), as the
            // restored memory has it.
            let guest_nic = in_netns(&guest.0, || link::open_tap("eth0")).unwrap();
            guest.host("eth0", SOURCE_MAC, "172.16.0.10/24", "172.16.0.1");
            let bridge_mac = mac_of(&daemon, "hatch0");
            guest.ip(&[
                "neigh",
                "replace",
                "172.16.0.1",
                "lladdr",
                &bridge_mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
            let tap = iso.tap.clone();
            let vm_side = in_netns(&iso.netns, move || link::open_tap(&tap)).unwrap();
            let _wire = Wire::new(vm_side, guest_nic);

            let _source_srv = Server::start(Some(&source.0), "source", "0.0.0.0:2222");
            let _guest_srv = Server::start(Some(&guest.0), "fork", "0.0.0.0:2222");
            let _host_srv = Server::start(None, "host", "0.0.0.0:7000");

            // From the host, both at once, each at its own address.
            let mut to_source = Conn::open("172.16.0.10:2222").unwrap();
            let mut to_fork = Conn::open("172.16.0.11:2222").unwrap();
            assert_eq!(to_source.ask("a"), "source 172.16.0.1 a");
            assert_eq!(to_fork.ask("b"), "fork 172.16.0.1 b");
            assert_eq!(to_source.ask("c"), "source 172.16.0.1 c");
            assert_eq!(to_fork.ask("d"), "fork 172.16.0.1 d");

            // Outbound: the fork's guest is seen as .11, the source as .10,
            // over TCP and UDP (DNS is UDP to the bridge address).
            let from_guest = in_netns(&guest.0, || ask("172.16.0.1:7000")).unwrap();
            assert_eq!(from_guest, "host 172.16.0.11 hello");
            let from_guest = in_netns(&guest.0, || ask_udp("172.16.0.1:7000")).unwrap();
            assert_eq!(from_guest, "host 172.16.0.11");
            let from_source = in_netns(&source.0, || ask("172.16.0.1:7000")).unwrap();
            assert_eq!(from_source, "host 172.16.0.10 hello");

            // The SSH forwards (host port -> guest_ip:22, here :2222) of both,
            // with both ports pinned to their VM's MAC and address.
            let pins = vec![
                Guest {
                    vm_id: "vm_source".into(),
                    owner_id: "o".into(),
                    ports: vec!["srcport".into()],
                    mac: SOURCE_MAC.into(),
                    ip: "172.16.0.10".into(),
                },
                Guest {
                    vm_id: fork_id.clone(),
                    owner_id: "o".into(),
                    ports: vec![iso.veth.clone()],
                    mac: iso.outer_mac.clone(),
                    ip: "172.16.0.11".into(),
                },
            ];
            net.sync_firewall(
                vec![
                    Forward {
                        vm_id: "vm_source".into(),
                        host_port: 16000,
                        guest_ip: "172.16.0.10".into(),
                        guest_port: 2222,
                    },
                    Forward {
                        vm_id: fork_id.clone(),
                        host_port: 16001,
                        guest_ip: "172.16.0.11".into(),
                        guest_port: 2222,
                    },
                ],
                pins,
            )
            .await
            .unwrap();
            assert!(ask("127.0.0.1:16000").unwrap().starts_with("source "));
            assert!(ask("127.0.0.1:16001").unwrap().starts_with("fork "));
            // The guest filter holds behind the namespace too: the host's
            // own services (here the one on :7000) are out of every guest's reach.
            assert!(in_netns(&guest.0, || ask("172.16.0.1:7000")).is_err());
            assert!(in_netns(&source.0, || ask("172.16.0.1:7000")).is_err());

            // The bridge side never saw the fork claim .10.
            assert!(neighbour(&daemon, "172.16.0.10").contains(SOURCE_MAC));
            assert!(neighbour(&daemon, "172.16.0.11").contains(&iso.outer_mac));

            // One that cannot be made (its address is off the bridge's
            // network, so there is no route to the gateway) leaves nothing.
            let bad = isolation_for(
                &other_id,
                "htother",
                ip("10.9.0.12"),
                ip("172.16.0.10"),
                "02:fc:ac:10:00:0c",
            );
            let err = net.isolate(&bad).await.unwrap_err();
            assert!(err.contains("Nexthop has invalid gateway"), "{err}");
            assert!(!netns_path(&bad.netns).exists());
            assert!(!bridge_ports(&daemon).contains(&bad.veth));

            // A leftover isolation's veth is a stale port like a TAP.
            let other = isolation_for(
                &other_id,
                "htother",
                ip("172.16.0.12"),
                ip("172.16.0.10"),
                "02:fc:ac:10:00:0c",
            );
            net.isolate(&other).await.unwrap();
            assert!(bridge_ports(&daemon).contains(&other.veth));
            let keep = HashSet::from([iso.veth.clone()]);
            assert_eq!(net.remove_stale_taps(&keep).await.unwrap(), 1);
            let ports = bridge_ports(&daemon);
            assert!(!ports.contains(&other.veth) && ports.contains(&iso.veth));
            net.remove_isolation(&other.netns).await.unwrap();
            assert!(!netns_path(&other.netns).exists());

            // Removal unplugs the fork at once, even while something (the
            // wire here, a VMM not yet reaped in the daemon) still holds its
            // namespace, and leaves no namespace and no port behind.
            drop(to_fork);
            net.remove_isolation(&iso.netns).await.unwrap();
            net.remove_isolation(&iso.netns).await.unwrap();
            assert!(!netns_path(&iso.netns).exists());
            assert_eq!(bridge_ports(&daemon), vec!["srcport".to_string()]);
            assert!(!daemon.try_ip(&["link", "show", &iso.veth]).status.success());
            assert!(Conn::open("172.16.0.11:2222").is_err());
            assert_eq!(to_source.ask("e"), "source 172.16.0.1 e");

            net.shutdown().await;
        });
    }
}
