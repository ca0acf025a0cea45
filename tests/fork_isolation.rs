//! A fork's network isolation, end to end in network namespaces made by the
//! test: the daemon's side (bridge, dnsmasq, firewall) set up by the real
//! `Network`, a source VM's stack in one namespace, and a fork's guest
//! (the source's address and MAC) in another, behind a real TAP of the
//! fork's isolation namespace. No QEMU: a thread carries frames between the
//! TAP and the guest namespace's own TAP, as QEMU would. Needs root.

mod netns;

// The harness in `netns` reaches the library as `crate::net` and
// `crate::vmm` (it is also compiled inside the library).
use hatch::{net, vmm};

use net::firewall::{Forward, Guest};
use net::isolate::{in_netns, isolation_for, netns_name};
use net::link;
use net::Network;
use netns::*;
use serde_json::Value;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vmm::process::netns_path;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Carries frames between two TAP queues, both ways: what QEMU does
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

/// busybox udhcpc on `ns`'s eth0, a few tries, configuring nothing: what it
/// printed. Awaited, so the runtime's tasks (the isolation's DHCP server) run.
async fn udhcpc(ns: &Netns) -> String {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ns.0, "busybox", "udhcpc", "-i", "eth0"])
        .args(["-f", "-q", "-n", "-t", "3", "-T", "1", "-s", "/bin/true"])
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
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
            "link", "add", "srcport", "type", "veth", "peer", "name", "eth0", "netns", &source.0,
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

        // A guest restored before it asked DHCP asks behind the isolation,
        // which answers it with the address it believes it has. A DHCP
        // broadcast from the bridge never reaches that server: the source
        // (its MAC has no reservation in this test, so dnsmasq is silent)
        // gets no lease.
        let got = udhcpc(&guest).await;
        assert!(got.contains("lease of 172.16.0.10 obtained"), "{got}");
        let got = udhcpc(&source).await;
        assert!(!got.contains("obtained"), "{got}");

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
