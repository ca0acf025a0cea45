//! VM networking: a Linux bridge with the host's side of the guest network,
//! one TAP per running VM, DHCP reservations and DNS (dnsmasq), outbound NAT
//! and SSH port forwards (nftables). See README.md for the layout.
//!
//! This module holds no per-VM state: the manager computes what should exist
//! from the store and hands it over (`sync_*`), so a restart rebuilds it all.

pub mod dhcp;
pub mod firewall;
pub mod ipam;
pub mod link;

use dhcp::{Dnsmasq, Reservation};
use firewall::{Desired, Forward};
use ipam::BridgeNet;
use std::collections::HashSet;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct NetConfig {
    pub bridge: String,
    pub net: BridgeNet,
    pub ssh_ports: (u16, u16),
    pub ssh_allowed_sources: Vec<String>,
}

pub struct Network {
    pub cfg: NetConfig,
    nl: link::Netlink,
    bridge_index: u32,
    dnsmasq: Dnsmasq,
    /// Firewall syncs are serialized so the last one always wins with the latest state.
    fw_lock: tokio::sync::Mutex<()>,
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
        })
    }

    pub async fn add_tap(&self, name: &str) -> Result<(), String> {
        self.nl.create_tap(name, self.bridge_index).await
    }

    pub async fn remove_tap(&self, name: &str) -> Result<(), String> {
        self.nl.delete(name).await
    }

    /// Deletes TAPs in our bridge that no VM should have (left by a crash).
    pub async fn remove_stale_taps(&self, keep: &HashSet<String>) -> Result<usize, String> {
        let mut removed = 0;
        for port in self.nl.ports_of(self.bridge_index).await? {
            if port.starts_with("ht") && !keep.contains(&port) {
                self.nl.delete(&port).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub async fn sync_forwards(&self, forwards: Vec<Forward>) -> Result<(), String> {
        let _g = self.fw_lock.lock().await;
        firewall::sync(&Desired {
            bridge: self.cfg.bridge.clone(),
            guest_cidr: self.cfg.net.cidr(),
            allowed_sources: self.cfg.ssh_allowed_sources.clone(),
            forwards,
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
