//! Network allocation: addresses, TAPs, DHCP reservations, port forwards and the firewall.

use super::requests::CreateVm;
use super::state::VmState;
use super::{Context, Manager, ManagerError, Result};
use crate::domain::MacAddr;
use crate::ids;
use crate::image::seed;
use crate::net::dhcp::Reservation;
use crate::net::firewall::{Forward, Guest};
use crate::net::{ipam, Network};
use crate::store::{NetworkAllocations, Snapshot, Vm};
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

impl Manager {
    /// Sets up the host side of VM networking. A host that cannot (no root,
    /// no dnsmasq, ...) still runs VMs without networking; the reason is kept
    /// and given to whoever asks for a networked VM.
    pub async fn init_network(&self) {
        let result = async {
            let reservations = self.reservations().await?;
            let net = Network::setup(
                self.config.net.clone(),
                &self.config.net_dir(),
                &reservations,
            )
            .await
            .map_err(ManagerError::Host)?;
            // No VM runs right after start-up: every TAP in our bridge is stale.
            let removed = net
                .remove_stale_taps(&HashSet::new())
                .await
                .map_err(ManagerError::Host)?;
            if removed > 0 {
                tracing::warn!(removed, "removed TAP devices left from a previous daemon");
            }
            // Namespaces of isolated VMs survive a daemon crash; none of them runs now.
            for vm in self.store.all_vms().await? {
                let ns = crate::net::isolate::netns_name(&vm.id);
                if let Err(e) = net.remove_isolation(&ns).await {
                    tracing::error!(vm = %vm.id, "removing network namespace {ns}: {e}");
                }
            }
            Ok::<_, ManagerError>(net)
        }
        .await;
        match result {
            Ok(net) => {
                tracing::info!(bridge = %net.cfg.bridge, cidr = %net.cfg.net.cidr(), "networking ready");
                let _ = self.network.set(Arc::new(net));
                *self.network_error.lock().unwrap() = None;
                self.refresh_forwards().await;
            }
            Err(e) => {
                tracing::error!(
                    "networking unavailable, only VMs with enable_network false can run: {e}"
                );
                *self.network_error.lock().unwrap() = Some(e.to_string());
            }
        }
    }

    pub(super) fn network(&self) -> Result<&Arc<Network>> {
        self.network.get().ok_or_else(|| {
            let why = self.network_error.lock().unwrap().clone().unwrap_or_default();
            ManagerError::Internal(format!(
                "networking is unavailable on this host ({why}); create the VM with \"enable_network\": false"
            ))
        })
    }

    pub(super) async fn reservations(&self) -> Result<Vec<Reservation>> {
        Ok(self
            .store
            .networked_vms()
            .await?
            .into_iter()
            .filter_map(|v| {
                Some(Reservation {
                    mac: v.guest_mac?.to_string(),
                    ip: v.guest_ip?.to_string(),
                })
            })
            .collect())
    }

    pub(super) async fn refresh_reservations(&self) {
        let Some(net) = self.network.get() else {
            return;
        };
        let result = match self.reservations().await {
            Ok(r) => net.sync_reservations(&r).map_err(ManagerError::Host),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::error!("updating DHCP reservations: {e}");
        }
    }

    /// `sync_firewall`, logging a failure (the previous rules stay: the
    /// transaction is atomic).
    pub(super) async fn refresh_forwards(&self) {
        if let Err(e) = self.sync_firewall().await {
            tracing::error!("updating the firewall: {e}");
        }
    }

    /// Makes the firewall match the store: SSH forwards for the VMs that
    /// are running now, and every VM's bridge port pinned to its address
    /// (see src/net/README.md, "Guests on the bridge").
    pub(super) async fn sync_firewall(&self) -> Result<()> {
        let Some(net) = self.network.get() else {
            return Ok(());
        };
        let _one = self.gateway_sync_lock().await;
        let vms = self
            .store
            .networked_vms()
            .await
            .context(|| "reading VMs for the firewall".into())?;
        // A sleeping VM's port (or one being paused to sleep) is answered by
        // the daemon before its forward goes, until the forward is back (below).
        let mut pausing = HashSet::new();
        for v in vms.iter() {
            let paused = v.state == VmState::Running && self.activity.is_pausing(&v.id);
            if v.state == VmState::Snapshotted || paused {
                // A paused VM's forward goes only if the daemon answers instead.
                if self.listen_while_asleep(v) && paused {
                    pausing.insert(v.id.clone());
                }
            }
        }
        let states: HashMap<String, VmState> =
            vms.iter().map(|v| (v.id.clone(), v.state)).collect();
        let forwards = vms
            .iter()
            .filter(|v| v.state == VmState::Running && !pausing.contains(&v.id))
            .filter_map(|v| {
                Some(Forward {
                    host_port: u16::try_from(v.ssh_port?).ok()?,
                    guest_ip: v.guest_ip?.to_string(),
                    guest_port: 22,
                    vm_id: v.id.clone(),
                })
            })
            .collect();
        let guests = vms
            .into_iter()
            .filter_map(|v| {
                Some(Guest {
                    ports: vec![v.tap_name?, crate::net::isolate::veth_name(&v.id)],
                    mac: v.guest_mac?.to_string(),
                    ip: v.guest_ip?.to_string(),
                    owner_id: v.owner_id,
                    vm_id: v.id,
                })
            })
            .collect();
        net.sync_firewall(forwards, guests)
            .await
            .map_err(ManagerError::Host)?;
        self.settle_ssh_gateway(&states, &pausing).await;
        Ok(())
    }

    /// Chooses `vm`'s address, MAC, TAP and SSH port. Called with `alloc_lock`
    /// held, right before the row is inserted (unique indexes back this up).
    pub(super) async fn allocate_network(&self, vm: &mut Vm, req: &CreateVm) -> Result<()> {
        let net = self.network()?;
        let NetworkAllocations { ips, macs, ports } = self.store.network_allocations().await?;
        let bridge = net.cfg.net;
        let ip = match &req.guest_ip {
            Some(text) => {
                let ip: Ipv4Addr = text.parse().map_err(|_| {
                    ManagerError::BadRequest(format!("guest_ip {text:?} is not an IPv4 address"))
                })?;
                bridge
                    .check_guest_ip(ip)
                    .map_err(ManagerError::BadRequest)?;
                if ips.contains(&ip) {
                    return Err(ManagerError::Conflict(format!(
                        "guest_ip {ip} is already in use by another VM"
                    )));
                }
                ip
            }
            None => bridge.first_free(&ips).ok_or_else(|| {
                ManagerError::Conflict(format!("no free guest IP left in {}", bridge.cidr()))
            })?,
        };
        let mac = match &req.guest_mac {
            Some(text) => {
                let mac: MacAddr = ipam::parse_mac(text)
                    .and_then(|m| m.parse())
                    .map_err(ManagerError::BadRequest)?;
                if macs.contains(&mac) {
                    return Err(ManagerError::Conflict(format!(
                        "guest_mac {mac} is already in use by another VM"
                    )));
                }
                mac
            }
            None => {
                let mut mac: MacAddr = ipam::mac_for_ip(ip)
                    .parse()
                    .map_err(ManagerError::Internal)?;
                // A user may have claimed the derived MAC for another VM.
                while macs.contains(&mac) {
                    let r = ids::random_string(4);
                    let b = r.as_bytes();
                    mac = MacAddr([0x02, 0xfd, b[0], b[1], b[2], b[3]]);
                }
                mac
            }
        };
        let port = ipam::first_free_port(net.cfg.ssh_ports, &ports).ok_or_else(|| {
            let (lo, hi) = net.cfg.ssh_ports;
            ManagerError::Conflict(format!("no free SSH port left in {lo}-{hi}"))
        })?;
        vm.guest_ip = Some(ip);
        vm.guest_mac = Some(mac);
        vm.tap_name = Some(ipam::tap_name(&vm.id));
        vm.ssh_port = Some(port as i64);
        Ok(())
    }

    /// Writes the VM's cloud-init NoCloud seed (its user data and, with
    /// networking, its address) into `work_dir`.
    pub(super) async fn write_seed(&self, vm: &Vm, work_dir: &Path) -> Result<PathBuf> {
        self.write_seed_for(vm, work_dir, None).await
    }

    /// The seed of `vm`, which resumes the memory of `memory` when that is
    /// given (a fork of a Standby snapshot). Such a guest may not have read
    /// its seed yet (a snapshot taken while its source booted): it reads it
    /// after the restore, so the seed must say what the memory believes, the
    /// source's address and MAC (the NIC it has) and the principal the
    /// daemon signs for (`adopt_memory_principal`), or the guest would come
    /// up unreachable behind its isolation. Its own instance-id then has a
    /// suffix, so that the fresh seed `start` writes (`own_seed`) is a new
    /// instance to cloud-init and is applied in full.
    pub(super) async fn write_seed_for(
        &self,
        vm: &Vm,
        work_dir: &Path,
        memory: Option<&Snapshot>,
    ) -> Result<PathBuf> {
        let mut net = self.seed_net(vm);
        let instance_id;
        let who = match memory {
            None => seed::SeedIdentity::own(&vm.id),
            Some(snap) => {
                let principal = Self::memory_principal(snap);
                if let (Some(n), (Some(ip), Some(mac))) =
                    (net.as_mut(), snap.vm_config.memory_address())
                {
                    n.ip = ip.to_string();
                    n.mac = mac.to_string();
                }
                instance_id = format!("{}.resumed", vm.id);
                seed::SeedIdentity {
                    vm_id: &vm.id,
                    instance_id: &instance_id,
                    principal,
                }
            }
        };
        let ca = self.ssh_ca.get().map(|ca| ca.public_key());
        seed::write(work_dir, &who, vm.user_data.as_deref(), net.as_ref(), ca)
            .await
            .map_err(ManagerError::Host)
            .context(|| "creating the cloud-init seed".into())
    }

    /// Before a fresh boot of a VM that ran from another VM's memory: its
    /// seed goes back to saying who it is (see `write_seed_for`).
    pub(super) async fn own_seed(&self, vm: &Vm) -> Result<()> {
        let work_dir = self.work_dir(&vm.id);
        if tokio::fs::try_exists(work_dir.join("seed.iso"))
            .await
            .unwrap_or(false)
        {
            self.write_seed(vm, &work_dir).await?;
        }
        Ok(())
    }

    pub(super) fn seed_net(&self, vm: &Vm) -> Option<seed::SeedNet> {
        let net = self.network.get()?;
        Some(seed::SeedNet {
            mac: vm.guest_mac?.to_string(),
            ip: vm.guest_ip?.to_string(),
            prefix: net.cfg.net.prefix,
            gateway: net.cfg.net.bridge_ip.to_string(),
            dns: net.cfg.net.bridge_ip.to_string(),
        })
    }

    /// Removes the VM's TAP, or its whole namespace when it ran isolated.
    pub(super) async fn remove_tap(&self, vm: &Vm) {
        if let (Some(tap), Some(net)) = (&vm.tap_name, self.network.get()) {
            if let Err(e) = net.remove_tap(tap).await {
                tracing::error!(vm = %vm.id, "removing TAP {tap}: {e}");
            }
            let ns = crate::net::isolate::netns_name(&vm.id);
            if let Err(e) = net.remove_isolation(&ns).await {
                tracing::error!(vm = %vm.id, "removing network namespace {ns}: {e}");
            }
        }
    }
}
