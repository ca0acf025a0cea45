//! DHCP reservations and a DNS forwarder for the guests: one dnsmasq bound to
//! the bridge, answering only reserved MACs, re-reading its hosts file on SIGHUP.
//!
//! Leases never expire. The control plane owns a VM's address for the VM's
//! whole life, so a lease has nothing to time out; and a fork's guest (see
//! isolate.rs) could never renew one: its renewal reaches dnsmasq from the
//! fork's address, and the answer goes to the address the guest believes it
//! has, which is its source VM's. The price of infinite leases is that one
//! must be dropped when its reservation goes (dnsmasq does not hand a
//! reserved address to a MAC while another MAC holds a lease on it), which
//! `update` does with a DHCPRELEASE on the departed client's behalf.

use super::ipam::BridgeNet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

/// The unprivileged user dnsmasq runs as.
const DNSMASQ_USER: &str = "nobody";

/// `nobody`'s group: `nogroup` on Debian, `nobody` elsewhere.
fn dnsmasq_group() -> &'static str {
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    if groups.lines().any(|l| l.starts_with("nogroup:")) {
        "nogroup"
    } else {
        "nobody"
    }
}

pub struct Dnsmasq {
    dir: PathBuf,
    pid: Mutex<Option<u32>>,
    /// Where dnsmasq serves and the reservations it was last given.
    served: Mutex<Option<Served>>,
}

struct Served {
    bridge: String,
    server: Ipv4Addr,
    reservations: Vec<Reservation>,
}

/// One reservation: this MAC gets this IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub mac: String,
    pub ip: String,
}

/// The hosts file dnsmasq reads: `MAC,IP` per line.
pub fn hosts_file(reservations: &[Reservation]) -> String {
    reservations
        .iter()
        .map(|r| format!("{},{}\n", r.mac, r.ip))
        .collect()
}

impl Dnsmasq {
    pub fn new(dir: &Path) -> Dnsmasq {
        Dnsmasq {
            dir: dir.to_path_buf(),
            pid: Mutex::new(None),
            served: Mutex::new(None),
        }
    }

    fn hosts_path(&self) -> PathBuf {
        self.dir.join("dhcp-hosts")
    }

    fn write_hosts(&self, reservations: &[Reservation]) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let tmp = self.dir.join("dhcp-hosts.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::fs::write(&tmp, hosts_file(reservations))
            .map_err(|e| format!("writing DHCP hosts: {e}"))?;
        // dnsmasq re-reads it as DNSMASQ_USER; only it and root can reach
        // this directory (see `start`).
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| format!("writing DHCP hosts: {e}"))?;
        std::fs::rename(&tmp, self.hosts_path()).map_err(|e| format!("writing DHCP hosts: {e}"))
    }

    /// Starts dnsmasq on `bridge` (any earlier one under our directory is killed first).
    pub async fn start(
        &self,
        bridge: &str,
        net: &BridgeNet,
        reservations: &[Reservation],
    ) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        // Root's, traversable: dnsmasq, no longer root, reads its hosts file here.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        crate::vmm::process::kill_all_under(&self.dir);
        self.write_hosts(reservations)?;
        self.prune_lease_file(reservations)?;
        let d = |name: &str| self.dir.join(name).display().to_string();
        let gw = net.bridge_ip.to_string();
        let mut cmd = tokio::process::Command::new("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-hosts",
            "--bind-interfaces",
            "--except-interface=lo",
        ])
        // dnsmasq drops root once its sockets, lease, pid and log files are
        // open; it keeps only the capabilities DHCP needs itself.
        .arg(format!("--user={DNSMASQ_USER}"))
        .arg(format!("--group={}", dnsmasq_group()))
        .arg(format!("--interface={bridge}"))
        .arg(format!("--listen-address={gw}"))
        .arg(format!(
            "--dhcp-range={},static,{},infinite",
            net.network(),
            net.netmask()
        ))
        .arg(format!("--dhcp-hostsfile={}", d("dhcp-hosts")))
        .arg(format!("--dhcp-leasefile={}", d("leases")))
        .arg(format!("--pid-file={}", d("dnsmasq.pid")))
        .arg(format!("--log-facility={}", d("dnsmasq.log")))
        .arg(format!("--dhcp-option=option:router,{gw}"))
        .arg(format!("--dhcp-option=option:dns-server,{gw}"))
        .arg("--dhcp-authoritative")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
        // In its own mount namespace dnsmasq sees none of the data directory
        // (a tmpfs) but its own directory, so the data directory itself can
        // stay root's alone (0700) and still let it re-read its hosts file.
        let hide = crate::vmm::confine::hiding_root(self.dir.parent().unwrap_or(&self.dir));
        let mounts = crate::vmm::confine::MountPlan::new(&[hide], &[(self.dir.clone(), false)])
            .map_err(|e| format!("dnsmasq's mount namespace: {e}"))?;
        // SAFETY: the hook runs in the forked child before exec and makes
        // system calls only (MountPlan::enter says so).
        unsafe {
            cmd.pre_exec(move || mounts.enter());
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run dnsmasq (apt-get install dnsmasq-base): {e}"))?;
        // dnsmasq fails fast on a bad option or a busy port; give it a moment to say so.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
            return Err(format!(
                "dnsmasq exited ({status}): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        *self.pid.lock().unwrap() = child.id();
        *self.served.lock().unwrap() = Some(Served {
            bridge: bridge.to_string(),
            server: net.bridge_ip,
            reservations: reservations.to_vec(),
        });
        // Reap it whenever it ends so it never lingers as a zombie.
        tokio::spawn(async move {
            let status = child.wait().await;
            tracing::info!(?status, "dnsmasq exited");
        });
        Ok(())
    }

    /// Leases of reservations that are gone, left by a daemon that ended
    /// before it could release them, would block their addresses for good.
    fn prune_lease_file(&self, reservations: &[Reservation]) -> Result<(), String> {
        let path = self.dir.join("leases");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept = prune_leases(&text, reservations);
        if kept != text {
            std::fs::write(&path, kept).map_err(|e| format!("writing DHCP leases: {e}"))?;
        }
        Ok(())
    }

    /// Replaces the reservations; dnsmasq re-reads them on SIGHUP. The lease
    /// of every reservation that went away is released, so its address can
    /// go to another MAC.
    pub fn update(&self, reservations: &[Reservation]) -> Result<(), String> {
        self.write_hosts(reservations)?;
        if let Some(pid) = *self.pid.lock().unwrap() {
            // SAFETY: kill(2) with a pid and a signal number; no memory involved.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGHUP);
            }
        }
        let mut served = self.served.lock().unwrap();
        if let Some(served) = served.as_mut() {
            for gone in served
                .reservations
                .iter()
                .filter(|r| !reservations.contains(r))
            {
                // The reservation itself is gone already; a lease left over
                // only matters once the address is reused by another MAC.
                if let Err(e) = release(&served.bridge, served.server, gone) {
                    tracing::warn!(mac = %gone.mac, ip = %gone.ip, "releasing DHCP lease: {e}");
                }
            }
            served.reservations = reservations.to_vec();
        }
        Ok(())
    }

    pub fn stop(&self) {
        if let Some(pid) = self.pid.lock().unwrap().take() {
            crate::vmm::process::kill_and_wait(pid, Duration::from_secs(5));
        }
    }
}

/// The lease file with the IPv4 leases no reservation accounts for (same
/// MAC and address) removed; other lines are kept as they are.
/// A lease line is `EXPIRY MAC IP HOSTNAME CLIENT-ID`.
pub fn prune_leases(text: &str, reservations: &[Reservation]) -> String {
    text.lines()
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 3 || f[2].parse::<Ipv4Addr>().is_err() {
                return true;
            }
            reservations
                .iter()
                .any(|r| r.mac.eq_ignore_ascii_case(f[1]) && r.ip == f[2])
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

/// A DHCPRELEASE for `r`, as its client would send it to `server`.
pub fn release_packet(r: &Reservation, server: Ipv4Addr) -> Result<Vec<u8>, String> {
    let mac = super::ipam::parse_mac(&r.mac)?;
    let mac: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or(0))
        .collect();
    let ip: Ipv4Addr =
        r.ip.parse()
            .map_err(|_| format!("bad reservation address {}", r.ip))?;
    // BOOTP header (RFC 2131): op, htype, hlen, hops, xid, secs, flags,
    // ciaddr, yiaddr, siaddr, giaddr, chaddr[16], sname[64], file[128].
    let mut p = vec![0u8; 236];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6;
    p[12..16].copy_from_slice(&ip.octets());
    p[28..34].copy_from_slice(&mac);
    p.extend_from_slice(&super::fork_dhcp::COOKIE);
    p.extend_from_slice(&[53, 1, 7]); // message type: DHCPRELEASE
    p.push(54); // server identifier
    p.push(4);
    p.extend_from_slice(&server.octets());
    p.push(255);
    // Pad to the BOOTP minimum of 300 bytes.
    p.resize(300, 0);
    Ok(p)
}

/// Sends the DHCPRELEASE for `r` to dnsmasq. Bound to the bridge, the
/// datagram (delivered locally) counts as received on the bridge, which is
/// the only interface dnsmasq serves.
fn release(bridge: &str, server: Ipv4Addr, r: &Reservation) -> Result<(), String> {
    let packet = release_packet(r, server)?;
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| format!("UDP socket: {e}"))?;
    sock.bind_device(Some(bridge.as_bytes()))
        .map_err(|e| format!("binding to {bridge}: {e}"))?;
    sock.bind(&std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0).into())
        .map_err(|e| format!("UDP socket: {e}"))?;
    sock.send_to(&packet, &std::net::SocketAddrV4::new(server, 67).into())
        .map_err(|e| format!("sending DHCPRELEASE: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn hosts_file_lines() {
        let r = vec![
            Reservation {
                mac: "02:fc:ac:10:00:0a".into(),
                ip: "172.16.0.10".into(),
            },
            Reservation {
                mac: "02:fc:ac:10:00:0b".into(),
                ip: "172.16.0.11".into(),
            },
        ];
        assert_eq!(
            hosts_file(&r),
            "02:fc:ac:10:00:0a,172.16.0.10\n02:fc:ac:10:00:0b,172.16.0.11\n"
        );
        assert_eq!(hosts_file(&[]), "");
    }

    #[test]
    fn leases_without_a_reservation_are_pruned() {
        let r = vec![Reservation {
            mac: "02:fc:ac:10:00:0a".into(),
            ip: "172.16.0.10".into(),
        }];
        let text = "0 02:fc:ac:10:00:0a 172.16.0.10 * 01:02:fc:ac:10:00:0a\n\
                    0 02:FC:AC:10:00:0B 172.16.0.10 * *\n\
                    0 02:fc:ac:10:00:0c 172.16.0.12 guest *\n\
                    duid 00:01:00:01\n";
        assert_eq!(
            prune_leases(text, &r),
            "0 02:fc:ac:10:00:0a 172.16.0.10 * 01:02:fc:ac:10:00:0a\nduid 00:01:00:01\n"
        );
        assert_eq!(prune_leases("", &r), "");
    }

    #[test]
    fn a_release_packet_names_the_client_and_the_server() {
        let r = Reservation {
            mac: "02:fc:ac:10:00:0a".into(),
            ip: "172.16.0.10".into(),
        };
        let p = release_packet(&r, "172.16.0.1".parse().unwrap()).unwrap();
        assert_eq!(p.len(), 300);
        assert_eq!(&p[12..16], &[172, 16, 0, 10]);
        assert_eq!(&p[28..34], &[2, 0xfc, 0xac, 0x10, 0, 0x0a]);
        assert_eq!(
            &p[236..249],
            &[0x63, 0x82, 0x53, 0x63, 53, 1, 7, 54, 4, 172, 16, 0, 1]
        );
        assert_eq!(p[249], 255);
    }

    /// dnsmasq on a bridge in a namespace, a client asking with busybox
    /// udhcpc from another: leases are infinite, and when a reservation
    /// goes, its lease goes too, so the address can go to another MAC.
    #[test]
    fn an_address_whose_reservation_moved_goes_to_the_new_mac() {
        use crate::net::isolate::testing::{block_on_in, test_net_config, Netns, TestDir};
        use crate::net::Network;

        let daemon = Netns::new("dhcp-daemon");
        let client = Netns::new("dhcp-client");
        let state = TestDir::new("dhcp");
        let mac_a = "02:00:00:00:00:0a";
        let mac_b = "02:00:00:00:00:0b";
        let leases = state.0.join("leases");
        // A lease a crashed daemon left for a reservation that is gone.
        std::fs::write(&leases, "0 02:00:00:00:00:99 172.16.0.30 * *\n").unwrap();
        let udhcpc = |mac: &str| {
            client.ip(&["link", "set", "eth0", "down"]);
            client.ip(&["link", "set", "eth0", "address", mac]);
            client.ip(&["link", "set", "eth0", "up"]);
            let out = std::process::Command::new("ip")
                .args([
                    "netns", "exec", &client.0, "busybox", "udhcpc", "-i", "eth0",
                ])
                .args(["-f", "-q", "-n", "-t", "4", "-T", "1", "-s", "/bin/true"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout)
        };
        let wait_for = |what: &str, cond: &dyn Fn(&str) -> bool| {
            for _ in 0..100 {
                if cond(&std::fs::read_to_string(&leases).unwrap_or_default()) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!(
                "{what}; leases: {}\ndnsmasq log: {}",
                std::fs::read_to_string(&leases).unwrap_or_default(),
                std::fs::read_to_string(state.0.join("dnsmasq.log")).unwrap_or_default()
            );
        };
        block_on_in(&daemon.0, || async {
            let cfg = test_net_config();
            let first = vec![Reservation {
                mac: mac_a.into(),
                ip: "172.16.0.20".into(),
            }];
            // The release to dnsmasq is delivered locally, over loopback.
            daemon.ip(&["link", "set", "lo", "up"]);
            let net = Network::setup(cfg, &state.0, &first).await.unwrap();
            assert!(!std::fs::read_to_string(&leases)
                .unwrap()
                .contains("172.16.0.30"));
            daemon.ip(&[
                "link", "add", "cport", "type", "veth", "peer", "name", "eth0", "netns", &client.0,
            ]);
            daemon.ip(&["link", "set", "cport", "master", "hatch0", "up"]);

            let out = udhcpc(mac_a);
            assert!(out.contains("lease of 172.16.0.20 obtained"), "{out}");
            // Expiry 0 is dnsmasq's "infinite".
            wait_for("A's lease is infinite", &|l| {
                l.contains(&format!("0 {mac_a} 172.16.0.20 "))
            });

            // The address now belongs to another MAC.
            let second = vec![Reservation {
                mac: mac_b.into(),
                ip: "172.16.0.20".into(),
            }];
            net.sync_reservations(&second).unwrap();
            wait_for("A's lease is released", &|l| !l.contains(mac_a));
            let out = udhcpc(mac_b);
            assert!(out.contains("lease of 172.16.0.20 obtained"), "{out}");
            net.shutdown().await;
        });
    }
}
