//! VM networking: a Linux bridge with the host's side of the guest network,
//! one TAP per running VM, DHCP reservations and DNS (dnsmasq), outbound NAT,
//! SSH port forwards and the guest filter (nftables), and a network namespace of its own for
//! a VM whose guest believes it has another VM's address (a fork; see
//! `isolate`). See README.md for the layout.
//!
//! This module holds no per-VM state but the DHCP servers of isolated forks
//! (`fork_dhcp`), which live and die with their namespaces: the manager
//! computes what should exist from the store and hands it over (`sync_*`),
//! so a restart rebuilds it all.

pub mod dhcp;
pub mod firewall;
pub mod fork_dhcp;
pub mod ipam;
pub mod isolate;
pub mod link;

use dhcp::{Dnsmasq, Reservation};
use firewall::{Desired, Forward, Guest, GuestToGuest};
use ipam::BridgeNet;
use isolate::Isolation;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tokio_util::task::AbortOnDropHandle;

#[derive(Debug, Clone)]
pub struct NetConfig {
    pub bridge: String,
    pub net: BridgeNet,
    pub ssh_ports: (u16, u16),
    pub ssh_allowed_sources: Vec<String>,
    /// Which guests may reach each other (`HATCH_GUEST_TO_GUEST`).
    pub guest_to_guest: GuestToGuest,
}

pub struct Network {
    pub cfg: NetConfig,
    nl: link::Netlink,
    bridge_index: u32,
    dnsmasq: Dnsmasq,
    /// Firewall syncs are serialized so the last one always wins with the latest state.
    fw_lock: tokio::sync::Mutex<()>,
    /// The DHCP server of each isolation, by namespace name (aborted when
    /// dropped: its socket would otherwise keep the namespace alive).
    fork_dhcp: std::sync::Mutex<HashMap<String, AbortOnDropHandle<()>>>,
}

impl Network {
    /// Brings up the host side: bridge and address, forwarding, dnsmasq.
    pub async fn setup(
        cfg: NetConfig,
        state_dir: &Path,
        reservations: &[Reservation],
    ) -> Result<Network, String> {
        let nl = link::Netlink::connect()?;
        let bridge_index = nl
            .ensure_bridge(&cfg.bridge, cfg.net.bridge_ip, cfg.net.prefix)
            .await?;
        link::sysctl("net/ipv4/ip_forward", "1")?;
        // Lets forwards used from the host's loopback reach guests (see firewall.rs).
        link::sysctl(&format!("net/ipv4/conf/{}/route_localnet", cfg.bridge), "1")?;
        let dnsmasq = Dnsmasq::new(state_dir);
        dnsmasq.start(&cfg.bridge, &cfg.net, reservations).await?;
        Ok(Network {
            cfg,
            nl,
            bridge_index,
            dnsmasq,
            fw_lock: tokio::sync::Mutex::new(()),
            fork_dhcp: std::sync::Mutex::new(HashMap::new()),
        })
    }

    pub async fn add_tap(&self, name: &str) -> Result<(), String> {
        self.nl.create_tap(name, self.bridge_index).await
    }

    pub async fn remove_tap(&self, name: &str) -> Result<(), String> {
        self.nl.delete(name).await
    }

    /// Deletes ports of our bridge that no VM should have (left by a crash):
    /// TAPs (`ht*`) and the bridge ends of isolations' veths (`hv*`). Every
    /// port with those prefixes in our bridge is ours: other daemons on the
    /// host have bridges of their own. An isolation's namespace outlives its
    /// veth; `remove_isolation` for each of our VMs removes it.
    pub async fn remove_stale_taps(&self, keep: &HashSet<String>) -> Result<usize, String> {
        let mut removed = 0;
        for port in self.nl.ports_of(self.bridge_index).await? {
            let ours = port.starts_with("ht") || port.starts_with("hv");
            if ours && !keep.contains(&port) {
                self.nl.delete(&port).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Gives a VM whose guest believes it has `iso.inner_ip` a network
    /// namespace of its own, reachable at `iso.outer_ip` on the bridge,
    /// with the guest's TAP inside (see isolate.rs). Whatever an earlier
    /// call left under the same names is removed first, so this can be
    /// repeated; on failure nothing is left behind. The VMM must then run
    /// in `iso.netns` (`VmSpec::netns`); `add_tap` is not used for such a VM.
    pub async fn isolate(&self, iso: &Isolation) -> Result<(), String> {
        isolate::check(iso)?;
        self.remove_isolation_parts(&iso.netns, &iso.veth).await?;
        let made = self.make_isolation(iso).await;
        if let Err(e) = &made {
            tracing::warn!(netns = %iso.netns, "isolation failed, removing what was made: {e}");
            if let Err(e) = self.remove_isolation_parts(&iso.netns, &iso.veth).await {
                tracing::error!(netns = %iso.netns, "removing a failed isolation: {e}");
            }
        }
        made
    }

    async fn make_isolation(&self, iso: &Isolation) -> Result<(), String> {
        let i = iso.clone();
        blocking(move || isolate::create(&i)).await?;
        self.nl.set_up(&iso.veth, Some(self.bridge_index)).await?;
        let (i, net) = (iso.clone(), self.cfg.net);
        let socket = blocking(move || {
            isolate::in_netns(&i.netns, || {
                isolate::configure_inside(&i, &net)?;
                fork_dhcp::bind(&i.tap)
            })
        })
        .await?;
        let lease = fork_dhcp::Lease {
            ip: iso.inner_ip,
            net: self.cfg.net,
        };
        let task = tokio::spawn(fork_dhcp::serve(socket, lease, iso.netns.clone()));
        self.fork_dhcp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(iso.netns.clone(), AbortOnDropHandle::new(task));
        Ok(())
    }

    /// Removes the isolation whose namespace is `netns` (a name `isolate::
    /// netns_name` made): the bridge end of its veth, which unplugs the
    /// namespace at once even while a process (a VMM not yet reaped) still
    /// holds the namespace, then the namespace with the TAP in it. Nothing
    /// there is fine.
    pub async fn remove_isolation(&self, netns: &str) -> Result<(), String> {
        isolate::check_netns_name(netns)?;
        let vm_id = isolate::vm_id_of_netns(netns)
            .ok_or_else(|| format!("{netns:?} is not the name of a VM's network namespace"))?;
        self.remove_isolation_parts(netns, &isolate::veth_name(vm_id))
            .await
    }

    async fn remove_isolation_parts(&self, netns: &str, veth: &str) -> Result<(), String> {
        // Dropped at the end of the statement: the server is aborted.
        self.fork_dhcp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(netns);
        self.nl.delete(veth).await?;
        let ns = netns.to_string();
        blocking(move || isolate::delete_netns(&ns)).await
    }

    /// Makes the firewall match: SSH forwards of the running VMs, and the
    /// port pins and guest-to-guest policy of every VM that holds an address.
    pub async fn sync_firewall(
        &self,
        forwards: Vec<Forward>,
        guests: Vec<Guest>,
    ) -> Result<(), String> {
        let _g = self.fw_lock.lock().await;
        firewall::sync(&Desired {
            bridge: self.cfg.bridge.clone(),
            bridge_ip: self.cfg.net.bridge_ip.to_string(),
            guest_cidr: self.cfg.net.cidr(),
            allowed_sources: self.cfg.ssh_allowed_sources.clone(),
            forwards,
            guests,
            guest_to_guest: self.cfg.guest_to_guest,
        })
        .await
    }

    pub fn sync_reservations(&self, reservations: &[Reservation]) -> Result<(), String> {
        self.dnsmasq.update(reservations)
    }

    /// Daemon shutdown: our firewall table and dnsmasq go; the bridge stays.
    pub async fn shutdown(&self) {
        let _g = self.fw_lock.lock().await;
        if let Err(e) = firewall::remove().await {
            tracing::warn!("removing firewall table: {e}");
        }
        self.dnsmasq.stop();
    }
}

/// Runs blocking work (processes, a namespace-bound thread) off the runtime's workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}
