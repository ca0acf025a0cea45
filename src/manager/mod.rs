//! Orchestration: the only place that changes VM state.
//!
//! Every flow takes the VM's lock, checks the transition against the state
//! table, persists the new state *before* the side effect and again after it,
//! so a crash at any point leaves a state that start-up recovery understands.

pub mod console;
mod idle;
mod images;
mod locks;
pub mod quotas;
pub mod requests;
mod routes;
mod snapshots;
pub mod state;

pub use idle::Busy;
pub use images::ImageUpload;
pub use routes::{RouteTarget, WakeError, Woke};

use crate::config::Config;
use crate::ids;
use crate::image::{self, seed, ImageSource};
use crate::net::dhcp::Reservation;
use crate::net::firewall::{Forward, Guest};
use crate::net::{ipam, Network};
use crate::snapshot::Objects;
use crate::store::{self, Image, Owner, Store, StoreError, Template, Vm};
use crate::vmm::{self, process, VmSpec, Vmm};
use requests::{CreateTemplate, CreateVm};
use state::VmState;
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::watch;

pub const DEFAULT_IMAGE_ID: &str = "img_default";

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Allowed in principle, refused by a limit (a quota, the host's capacity).
    #[error("{0}")]
    Forbidden(String),
    /// A request body or upload over its size limit.
    #[error("{0}")]
    TooLarge(String),
    /// The host cannot take it now (its memory is fully given out).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ManagerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => ManagerError::Conflict(m),
            other => ManagerError::Internal(other.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, ManagerError>;

/// Streams a snapshot's memory into a VMM's FIFO, verifying as it goes;
/// resolves once every byte was sent and checked.
type MemoryFeed =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::result::Result<(), String>> + Send>>;

/// A VMM process this daemon started and is watching.
struct Running {
    boot_id: u64,
    pid: u32,
    exited: watch::Receiver<bool>,
}

pub struct Manager {
    store: Store,
    objects: Objects,
    vmm: Arc<dyn Vmm>,
    config: Config,
    locks: locks::VmLocks,
    running: Mutex<HashMap<String, Running>>,
    next_boot: AtomicU64,
    network: OnceLock<Arc<Network>>,
    network_error: Mutex<Option<String>>,
    /// Serializes admission: quota and host-memory checks together with the
    /// row insert or state change they admit (see quotas.rs), and choosing
    /// and recording network allocations.
    alloc_lock: tokio::sync::Mutex<()>,
    /// Per snapshot: restores and forks read its objects (shared), compression
    /// and deletion replace or remove them (exclusive).
    snap_locks: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    /// Proxy routes by subdomain.
    routes: routes::RouteTable,
    /// Proxied requests and SSH sessions per VM, for idle sleep.
    activity: Arc<idle::ActivityTable>,
    /// Wakes in progress, each shared by the requests waiting for it.
    wakes: Mutex<HashMap<String, watch::Receiver<routes::WakeResult>>>,
    /// Per image: creating a VM or template from it (shared) against deleting it (exclusive).
    image_locks: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
}

fn not_found(kind: &str, id: &str) -> ManagerError {
    ManagerError::NotFound(format!("{kind} {id} not found"))
}

fn state_of(vm: &Vm) -> VmState {
    // Unknown text in the database is treated as an error state, never as running.
    vm.state.parse().unwrap_or(VmState::Error)
}

impl Manager {
    pub fn new(store: Store, objects: Objects, vmm: Arc<dyn Vmm>, config: Config) -> Arc<Manager> {
        Arc::new(Manager {
            store,
            objects,
            vmm,
            config,
            locks: Default::default(),
            running: Mutex::new(HashMap::new()),
            next_boot: AtomicU64::new(1),
            network: OnceLock::new(),
            network_error: Mutex::new(Some("networking has not been set up yet".into())),
            alloc_lock: tokio::sync::Mutex::new(()),
            snap_locks: Mutex::new(HashMap::new()),
            routes: Default::default(),
            activity: Default::default(),
            wakes: Mutex::new(HashMap::new()),
            image_locks: Mutex::new(HashMap::new()),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn proxy_config(&self) -> &crate::config::ProxyConfig {
        &self.config.proxy
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        self.config.idle.timeout
    }

    pub fn hypervisor_name(&self) -> &'static str {
        self.vmm.name()
    }

    /// Takes the VM's lock. Callers acting for an API user take it through
    /// `lock_visible_vm`, so an id they do not own makes no entry at all.
    async fn lock_vm(&self, id: &str) -> locks::VmGuard {
        self.locks.lock(id).await
    }

    /// The owner's VM with its lock held, read again under the lock. An id
    /// the owner cannot see is a 404 before any per-VM state is made.
    async fn lock_visible_vm(&self, owner: &Owner, id: &str) -> Result<(locks::VmGuard, Vm)> {
        self.visible_vm(owner, id).await?;
        let guard = self.lock_vm(id).await;
        // It may have been deleted while we waited.
        let vm = self.visible_vm(owner, id).await?;
        Ok((guard, vm))
    }

    fn work_dir(&self, vm_id: &str) -> PathBuf {
        self.config.vms_dir().join(vm_id)
    }

    fn spec_for(&self, vm: &Vm) -> VmSpec {
        let image_dir = PathBuf::from(&vm.image_dir);
        let work_dir = self.work_dir(&vm.id);
        let seed = work_dir.join("seed.iso");
        // A guest resumed from another VM's memory keeps that VM's MAC, behind
        // its own network namespace (see `isolation`).
        let mac = vm.inner_mac.as_ref().or(vm.guest_mac.as_ref());
        VmSpec {
            nic: match (&vm.tap_name, mac) {
                (Some(tap), Some(mac)) => Some(vmm::Nic {
                    tap: tap.clone(),
                    mac: mac.clone(),
                }),
                _ => None,
            },
            netns: self.isolation(vm).map(|i| i.netns),
            seed: seed.exists().then_some(seed),
            vm_id: vm.id.clone(),
            disk: work_dir.join("disk.qcow2"),
            work_dir,
            kernel: image::kernel_in(&image_dir),
            initrd: image::initrd_in(&image_dir),
            boot_args: vm.boot_args.clone(),
            vcpu_count: vm.vcpu_count as u32,
            mem_mib: vm.mem_mib as u32,
        }
    }

    /// The network namespace a VM runs in when its guest believes it has an
    /// address that is not its own (a fork of another VM's memory).
    fn isolation(&self, vm: &Vm) -> Option<crate::net::isolate::Isolation> {
        let tap = vm.tap_name.as_ref()?;
        let outer = vm.guest_ip.as_ref()?.parse().ok()?;
        let inner = vm.inner_ip.as_ref()?.parse().ok()?;
        let outer_mac = vm.guest_mac.clone()?;
        Some(crate::net::isolate::isolation_for(
            &vm.id, tap, outer, inner, &outer_mac,
        ))
    }

    /// Persists a checked transition.
    async fn transition(&self, vm: &mut Vm, to: VmState, last_error: Option<&str>) -> Result<()> {
        let from = state_of(vm);
        if !from.can_become(to) {
            return Err(ManagerError::Internal(format!(
                "internal error: vm {} cannot go from {from} to {to}",
                vm.id
            )));
        }
        vm.updated_at = self
            .store
            .set_vm_state(&vm.id, to.as_str(), last_error)
            .await?;
        vm.state = to.as_str().to_string();
        vm.last_error = last_error.map(str::to_string);
        if to == VmState::Running {
            // The idle clock starts when the guest runs (boot, start, restore).
            self.activity.touch(&vm.id);
        }
        tracing::info!(vm = %vm.id, %from, %to, error = last_error.unwrap_or(""), "state change");
        Ok(())
    }

    // ---------------------------------------------------------------- start-up

    /// Start-up recovery: no VMM from before survives unaccounted for, and VMs
    /// left in a transient state are marked `error` (seed 001).
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        let vms_dir = self.config.vms_dir();
        let killed = tokio::task::spawn_blocking(move || process::kill_all_under(&vms_dir))
            .await
            .map_err(|e| ManagerError::Internal(e.to_string()))?;
        if killed > 0 {
            tracing::warn!(killed, "killed VMM processes left from a previous daemon");
        }
        self.vmm.recover().await;
        match self.objects.remove_unfinished_uploads().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(files = n, "removed uploads a crash left unfinished"),
            Err(e) => tracing::error!("removing unfinished uploads: {e}"),
        }
        // A snapshot a crash interrupted was never usable: remove it whole.
        for s in self.store.unfinished_snapshots().await? {
            for key in [&s.state_key, &s.memory_key, &s.disk_key] {
                let _ = self.objects.delete(key).await;
            }
            self.store.delete_snapshot(&s.id).await?;
            tracing::warn!(snapshot = %s.id, vm = %s.vm_id, "removed a snapshot left unfinished");
        }
        for vm in self.store.all_vms().await? {
            let st = state_of(&vm);
            let standby = match &vm.standby_snapshot_id {
                Some(s) => self.store.get_snapshot(s).await?.is_some(),
                None => false,
            };
            if st.is_transient() && standby {
                // Its memory and disk were stored before the VMM went (a snapshot
                // or restore was cut short): it stands by on that snapshot.
                self.store
                    .set_vm_state(&vm.id, VmState::Snapshotted.as_str(), None)
                    .await?;
                tracing::warn!(vm = %vm.id, was = %st, "back to snapshotted after restart");
            } else if st.is_transient() {
                let msg = format!(
                    "the hatch daemon restarted while this VM was {st}; its VMM process is gone"
                );
                self.store
                    .set_vm_state(&vm.id, VmState::Error.as_str(), Some(&msg))
                    .await?;
                tracing::warn!(vm = %vm.id, was = %st, "marked error after restart");
            }
        }
        self.recover_compression().await
    }

    /// Seeds (or refreshes) `img_default` from HATCH_DEFAULT_* and removes
    /// imported image versions nothing uses any more.
    pub async fn seed_default_image(&self) -> Result<()> {
        let (Some(kernel), Some(rootfs)) =
            (&self.config.default_kernel, &self.config.default_rootfs)
        else {
            if self.store.get_image(DEFAULT_IMAGE_ID).await?.is_none() {
                tracing::warn!(
                    "no default image: set HATCH_DEFAULT_KERNEL_PATH and HATCH_DEFAULT_ROOTFS_PATH"
                );
            }
            return Ok(());
        };
        let bad = |e: String| ManagerError::BadRequest(format!("default image: {e}"));
        let src = ImageSource {
            kernel: image::check_source_path(
                "HATCH_DEFAULT_KERNEL_PATH",
                &kernel.to_string_lossy(),
            )
            .map_err(bad)?,
            rootfs: image::check_source_path(
                "HATCH_DEFAULT_ROOTFS_PATH",
                &rootfs.to_string_lossy(),
            )
            .map_err(bad)?,
            initrd: match &self.config.default_initrd {
                Some(p) => Some(
                    image::check_source_path("HATCH_DEFAULT_INITRD_PATH", &p.to_string_lossy())
                        .map_err(bad)?,
                ),
                None => None,
            },
        };
        let fp = src.fingerprint().map_err(|e| bad(e.to_string()))?;
        let existing = self.store.get_image(DEFAULT_IMAGE_ID).await?;
        if existing
            .as_ref()
            .is_some_and(|i| i.fingerprint == fp && Path::new(&i.dir).exists())
        {
            return self.collect_unused_image_versions().await;
        }
        let dir = self.config.images_dir().join(DEFAULT_IMAGE_ID).join(&fp);
        if !dir.exists() {
            tokio::fs::create_dir_all(dir.parent().unwrap())
                .await
                .map_err(|e| bad(e.to_string()))?;
            image::import(&src, &dir).await.map_err(bad)?;
        }
        let now = store::now();
        let img = Image {
            id: DEFAULT_IMAGE_ID.into(),
            owner_id: None,
            name: Some("default".into()),
            kernel_path: src.kernel.display().to_string(),
            initrd_path: src.initrd.as_ref().map(|p| p.display().to_string()),
            rootfs_path: src.rootfs.display().to_string(),
            boot_args: self.config.default_boot_args.clone(),
            dir: dir.display().to_string(),
            fingerprint: fp,
            source: "default".into(),
            size_bytes: image::stored_size(&dir) as i64,
            has_initrd: src.initrd.is_some(),
            created_at: existing
                .as_ref()
                .map(|i| i.created_at.clone())
                .unwrap_or_else(|| now.clone()),
            updated_at: now,
        };
        if existing.is_some() {
            self.store.update_image(&img).await?;
            tracing::info!(dir = %img.dir, "default image refreshed from changed source files");
        } else {
            self.store.insert_image(&img).await?;
            tracing::info!(dir = %img.dir, "default image seeded");
        }
        self.collect_unused_image_versions().await
    }

    async fn collect_unused_image_versions(&self) -> Result<()> {
        // Sizes of images registered before they were recorded (migration 0006).
        for img in self.store.images_without_size().await? {
            let size = image::stored_size(Path::new(&img.dir)) as i64;
            if size > 0 {
                self.store.set_image_size(&img.id, size).await?;
            }
        }
        let in_use = self.store.image_dirs_in_use().await?;
        let Ok(mut images) = tokio::fs::read_dir(self.config.images_dir()).await else {
            return Ok(());
        };
        while let Ok(Some(img_dir)) = images.next_entry().await {
            let id = img_dir.file_name().to_string_lossy().to_string();
            let current = self.store.get_image(&id).await?.map(|i| i.dir);
            let Ok(mut versions) = tokio::fs::read_dir(img_dir.path()).await else {
                continue;
            };
            while let Ok(Some(v)) = versions.next_entry().await {
                let path = v.path().display().to_string();
                if current.as_deref() != Some(path.as_str()) && !in_use.contains(&path) {
                    tracing::info!(%path, "removing unused image version");
                    let _ = tokio::fs::remove_dir_all(v.path()).await;
                }
            }
            if current.is_none() {
                // An upload a crash cut short left only its directory: gone if empty.
                let _ = tokio::fs::remove_dir(img_dir.path()).await;
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- network

    /// Sets up the host side of VM networking. A host that cannot (no root,
    /// no dnsmasq, ...) still runs VMs without networking; the reason is kept
    /// and given to whoever asks for a networked VM.
    pub async fn init_network(&self) {
        let result = async {
            let reservations = self.reservations().await.map_err(|e| e.to_string())?;
            let net = Network::setup(
                self.config.net.clone(),
                &self.config.net_dir(),
                &reservations,
            )
            .await?;
            // No VM runs right after start-up: every TAP in our bridge is stale.
            let removed = net.remove_stale_taps(&HashSet::new()).await?;
            if removed > 0 {
                tracing::warn!(removed, "removed TAP devices left from a previous daemon");
            }
            // Namespaces of isolated VMs survive a daemon crash; none of them runs now.
            for vm in self.store.all_vms().await.map_err(|e| e.to_string())? {
                let ns = crate::net::isolate::netns_name(&vm.id);
                if let Err(e) = net.remove_isolation(&ns).await {
                    tracing::error!(vm = %vm.id, "removing network namespace {ns}: {e}");
                }
            }
            Ok::<_, String>(net)
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
                *self.network_error.lock().unwrap() = Some(e);
            }
        }
    }

    fn network(&self) -> Result<&Arc<Network>> {
        self.network.get().ok_or_else(|| {
            let why = self.network_error.lock().unwrap().clone().unwrap_or_default();
            ManagerError::Internal(format!(
                "networking is unavailable on this host ({why}); create the VM with \"enable_network\": false"
            ))
        })
    }

    async fn reservations(&self) -> Result<Vec<Reservation>> {
        Ok(self
            .store
            .all_vms()
            .await?
            .into_iter()
            .filter_map(|v| {
                Some(Reservation {
                    mac: v.guest_mac?,
                    ip: v.guest_ip?,
                })
            })
            .collect())
    }

    async fn refresh_reservations(&self) {
        let Some(net) = self.network.get() else {
            return;
        };
        let result = match self.reservations().await {
            Ok(r) => net.sync_reservations(&r),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            tracing::error!("updating DHCP reservations: {e}");
        }
    }

    /// `sync_firewall`, logging a failure (the previous rules stay: the
    /// transaction is atomic).
    async fn refresh_forwards(&self) {
        if let Err(e) = self.sync_firewall().await {
            tracing::error!("updating the firewall: {e}");
        }
    }

    /// Makes the firewall match the store: SSH forwards for the VMs that
    /// are running now, and every VM's bridge port pinned to its address
    /// (see src/net/README.md, "Guests on the bridge").
    async fn sync_firewall(&self) -> std::result::Result<(), String> {
        let Some(net) = self.network.get() else {
            return Ok(());
        };
        let vms = self
            .store
            .all_vms()
            .await
            .map_err(|e| format!("reading VMs for the firewall: {e}"))?;
        let forwards = vms
            .iter()
            .filter(|v| state_of(v) == VmState::Running)
            .filter_map(|v| {
                Some(Forward {
                    host_port: u16::try_from(v.ssh_port?).ok()?,
                    guest_ip: v.guest_ip.clone()?,
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
                    mac: v.guest_mac?,
                    ip: v.guest_ip?,
                    owner_id: v.owner_id,
                    vm_id: v.id,
                })
            })
            .collect();
        net.sync_firewall(forwards, guests).await
    }

    /// Chooses `vm`'s address, MAC, TAP and SSH port. Called with `alloc_lock`
    /// held, right before the row is inserted (unique indexes back this up).
    async fn allocate_network(&self, vm: &mut Vm, req: &CreateVm) -> Result<()> {
        let net = self.network()?;
        let mut ips = HashSet::new();
        let mut macs = HashSet::new();
        let mut ports = HashSet::new();
        for (ip, mac, port) in self.store.network_allocations().await? {
            ips.extend(ip.and_then(|i| i.parse::<Ipv4Addr>().ok()));
            macs.extend(mac);
            ports.extend(port.and_then(|p| u16::try_from(p).ok()));
        }
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
                let mac = ipam::parse_mac(text).map_err(ManagerError::BadRequest)?;
                if macs.contains(&mac) {
                    return Err(ManagerError::Conflict(format!(
                        "guest_mac {mac} is already in use by another VM"
                    )));
                }
                mac
            }
            None => {
                let mut mac = ipam::mac_for_ip(ip);
                // A user may have claimed the derived MAC for another VM.
                while macs.contains(&mac) {
                    let r = ids::random_string(4);
                    let b = r.as_bytes();
                    mac = format!("02:fd:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3]);
                }
                mac
            }
        };
        let port = ipam::first_free_port(net.cfg.ssh_ports, &ports).ok_or_else(|| {
            let (lo, hi) = net.cfg.ssh_ports;
            ManagerError::Conflict(format!("no free SSH port left in {lo}-{hi}"))
        })?;
        vm.guest_ip = Some(ip.to_string());
        vm.guest_mac = Some(mac);
        vm.tap_name = Some(ipam::tap_name(&vm.id));
        vm.ssh_port = Some(port as i64);
        Ok(())
    }

    fn seed_net(&self, vm: &Vm) -> Option<seed::SeedNet> {
        let net = self.network.get()?;
        Some(seed::SeedNet {
            mac: vm.guest_mac.clone()?,
            ip: vm.guest_ip.clone()?,
            prefix: net.cfg.net.prefix,
            gateway: net.cfg.net.bridge_ip.to_string(),
            dns: net.cfg.net.bridge_ip.to_string(),
        })
    }

    // ---------------------------------------------------------------- templates

    pub async fn create_template(&self, owner: &Owner, req: CreateTemplate) -> Result<Template> {
        req.validate().map_err(ManagerError::BadRequest)?;
        // Held until the template row is in: a delete of the image waits, then sees it used.
        let _image_hold = match &req.image_id {
            Some(img) => Some(self.hold_image(owner, img).await.map_err(|_| {
                ManagerError::BadRequest(format!("image_id: image {img} not found"))
            })?),
            None => None,
        };
        let now = store::now();
        let t = Template {
            id: ids::new_id("tpl"),
            owner_id: owner.id.clone(),
            name: req.name.unwrap_or_default(),
            description: req.description,
            image_id: req.image_id,
            user_data: req.user_data,
            vcpu_count: req.vcpu_count,
            mem_mib: req.mem_mib,
            created_at: now.clone(),
            updated_at: now,
        };
        self.store.insert_template(&t).await?;
        Ok(t)
    }

    pub async fn get_template(&self, owner: &Owner, id: &str) -> Result<Template> {
        self.store
            .get_template(&owner.id, id)
            .await?
            .ok_or_else(|| not_found("template", id))
    }

    pub async fn list_templates(&self, owner: &Owner) -> Result<Vec<Template>> {
        Ok(self.store.list_templates(&owner.id).await?)
    }

    pub async fn delete_template(&self, owner: &Owner, id: &str) -> Result<()> {
        if self.store.delete_template(&owner.id, id).await? {
            Ok(())
        } else {
            Err(not_found("template", id))
        }
    }

    // ---------------------------------------------------------------- vms

    async fn visible_vm(&self, owner: &Owner, id: &str) -> Result<Vm> {
        match self.store.get_vm(id).await? {
            Some(vm) if vm.owner_id == owner.id => Ok(vm),
            _ => Err(not_found("vm", id)),
        }
    }

    pub async fn get_vm(&self, owner: &Owner, id: &str) -> Result<Vm> {
        self.visible_vm(owner, id).await
    }

    pub async fn list_vms(&self, owner: &Owner) -> Result<Vec<Vm>> {
        Ok(self.store.list_vms(&owner.id).await?)
    }

    /// Creates and boots a VM. A failure after the row exists leaves the VM in
    /// `error` with the reason, its console log kept for diagnosis.
    pub async fn create_vm(self: &Arc<Self>, owner: &Owner, req: CreateVm) -> Result<Vm> {
        req.validate().map_err(ManagerError::BadRequest)?;
        let template = match &req.template_id {
            Some(t) => Some(
                self.store
                    .get_template(&owner.id, t)
                    .await?
                    .ok_or_else(|| {
                        ManagerError::BadRequest(format!("template_id: template {t} not found"))
                    })?,
            ),
            None => None,
        };
        let tpl = template.as_ref();
        // Explicit request values win over the template's (seed 001).
        let image_id = req
            .image_id
            .clone()
            .or_else(|| tpl.and_then(|t| t.image_id.clone()))
            .unwrap_or_else(|| DEFAULT_IMAGE_ID.to_string());
        let vcpu_count = req
            .vcpu_count
            .or_else(|| tpl.and_then(|t| t.vcpu_count))
            .unwrap_or(requests::DEFAULT_VCPUS);
        let mem_mib = req
            .mem_mib
            .or_else(|| tpl.and_then(|t| t.mem_mib))
            .unwrap_or(requests::DEFAULT_MEM_MIB);
        let user_data = req
            .user_data
            .clone()
            .or_else(|| tpl.and_then(|t| t.user_data.clone()));
        // Held from this check until the VM row is in, so a delete of the image
        // either happens before (and this create fails) or sees the VM.
        let (image, image_hold) = match self.hold_image(owner, &image_id).await {
            Ok(i) => i,
            Err(_) if image_id == DEFAULT_IMAGE_ID => {
                return Err(ManagerError::BadRequest(
                    "no image_id given and no default image is configured \
                     (set HATCH_DEFAULT_KERNEL_PATH and HATCH_DEFAULT_ROOTFS_PATH)"
                        .into(),
                ))
            }
            Err(_) => {
                return Err(ManagerError::BadRequest(format!(
                    "image_id: image {image_id} not found"
                )))
            }
        };
        let now = store::now();
        let mut vm = Vm {
            id: ids::new_id("vm"),
            owner_id: owner.id.clone(),
            image_id: image.id.clone(),
            image_dir: image.dir.clone(),
            template_id: tpl.map(|t| t.id.clone()),
            state: VmState::Starting.as_str().into(),
            vcpu_count,
            mem_mib,
            boot_args: requests::effective_boot_args(
                req.boot_args.as_deref(),
                image.boot_args.as_deref(),
            ),
            enable_network: req.enable_network.unwrap_or(true),
            user_data,
            guest_ip: None,
            guest_mac: None,
            tap_name: None,
            ssh_port: None,
            hypervisor: self.vmm.name().into(),
            last_error: None,
            created_at: now.clone(),
            updated_at: now,
            name: req.name.clone(),
            standby_snapshot_id: None,
            inner_ip: None,
            inner_mac: None,
            snapshot_compression: match &req.snapshot_compression {
                Some(c) => Some(
                    serde_json::to_string(&c.normalized())
                        .map_err(|e| ManagerError::Internal(e.to_string()))?,
                ),
                None => None,
            },
            auto_sleep: req.auto_sleep.unwrap_or(true),
            idle_timeout_seconds: req.idle_timeout_seconds,
            last_sleep_at: None,
            last_wake_at: None,
        };
        let _guard = self.lock_vm(&vm.id).await;
        self.insert_with_network(&mut vm, &req, true, 0).await?;
        drop(image_hold);
        let work_dir = self.work_dir(&vm.id);
        let seed_net = self.seed_net(&vm);
        let prepared = async {
            tokio::fs::create_dir_all(&work_dir)
                .await
                .map_err(|e| format!("creating work directory: {e}"))?;
            image::create_vm_disk(
                &image::rootfs_in(Path::new(&vm.image_dir)),
                &work_dir,
                self.vmm.capabilities().disk_format,
            )
            .await
            .map_err(|e| format!("creating VM disk: {e}"))?;
            seed::write(
                &work_dir,
                &vm.id,
                vm.user_data.as_deref(),
                seed_net.as_ref(),
            )
            .await
            .map_err(|e| format!("creating the cloud-init seed: {e}"))
        }
        .await;
        let booted = match prepared {
            Ok(_) => self.boot(&vm).await,
            Err(e) => Err(e),
        };
        match booted {
            Ok(()) => {
                self.transition(&mut vm, VmState::Running, None).await?;
                self.refresh_forwards().await;
                Ok(vm)
            }
            Err(e) => {
                let msg = format!("failed to start vm {}: {e}", vm.id);
                self.transition(&mut vm, VmState::Error, Some(&msg)).await?;
                Err(ManagerError::Internal(msg))
            }
        }
    }

    /// Admits the VM (its owner's quotas; the host's memory when it `boots`;
    /// `copies` stored bytes it gets), chooses its network allocations (when
    /// it has networking) and inserts its row; the row is what holds them.
    async fn insert_with_network(
        &self,
        vm: &mut Vm,
        req: &CreateVm,
        boots: bool,
        copies: u64,
    ) -> Result<()> {
        {
            let _alloc = self.alloc_lock.lock().await;
            self.admit_vm(vm, boots, copies).await?;
            if vm.enable_network {
                self.allocate_network(vm, req).await?;
            }
            self.store.insert_vm(vm).await?;
        }
        if vm.enable_network {
            self.refresh_reservations().await;
        }
        Ok(())
    }

    /// Boots the VMM for `vm` and starts watching its process.
    async fn boot(self: &Arc<Self>, vm: &Vm) -> std::result::Result<(), String> {
        self.boot_from(vm, None).await
    }

    /// Starts the VMM for `vm`: a fresh boot, or a restore from snapshot files
    /// (then resumed), and starts watching its process.
    async fn boot_from(
        self: &Arc<Self>,
        vm: &Vm,
        snapshot: Option<(&vmm::SnapshotFiles, MemoryFeed)>,
    ) -> std::result::Result<(), String> {
        let spec = self.spec_for(vm);
        if !spec.disk.exists() {
            return Err(format!("the VM's disk {} is missing", spec.disk.display()));
        }
        if let Some(nic) = &spec.nic {
            let net = self.network().map_err(|e| e.to_string())?;
            match self.isolation(vm) {
                Some(iso) => net.isolate(&iso).await?,
                None => net.add_tap(&nic.tap).await?,
            }
            // The port drops everything until the firewall pins it to this
            // VM (a VM created since the last sync): pin it before the guest
            // runs. A guest is never started unfiltered.
            if let Err(e) = self.sync_firewall().await {
                self.remove_tap(vm).await;
                return Err(format!("firewall: {e}"));
            }
        }
        let launched = match snapshot {
            None => self.vmm.boot(&spec).await.map_err(|e| e.to_string()),
            Some((files, feed)) => self.load_and_resume(&spec, files, feed).await,
        };
        let proc = match launched {
            Ok(p) => p,
            Err(e) => {
                self.vmm.release(&vm.id).await;
                self.remove_tap(vm).await;
                return Err(e);
            }
        };
        let boot_id = self.next_boot.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        self.running.lock().unwrap().insert(
            vm.id.clone(),
            Running {
                boot_id,
                pid: proc.pid,
                exited: rx,
            },
        );
        // The console log keeps a bounded tail while this VMM runs.
        tokio::spawn(console::keep_tail(
            spec.console_log(),
            self.config.limits.console_log_max_bytes,
            tx.subscribe(),
        ));
        let mgr = Arc::clone(self);
        let vm_id = vm.id.clone();
        let mut child = proc.child;
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(true);
            mgr.on_vmm_exit(&vm_id, boot_id, status).await;
        });
        tracing::info!(vm = %vm.id, pid = proc.pid, "VMM started");
        Ok(())
    }

    /// Starts a VMM that loads the snapshot memory `feed` streams into
    /// `files.memory` (a FIFO), and resumes the guest only once the feed has
    /// verified every byte it sent. Whatever fails, no VMM is left behind.
    async fn load_and_resume(
        &self,
        spec: &VmSpec,
        files: &vmm::SnapshotFiles,
        feed: MemoryFeed,
    ) -> std::result::Result<vmm::VmProcess, String> {
        let launch = self.vmm.restore(spec, files);
        tokio::pin!(launch);
        let mut feed = feed;
        let loaded = tokio::select! {
            launched = &mut launch => match launched {
                Err(e) => Err(e.to_string()),
                // Loaded: the feed has sent its last bytes and is checking them.
                Ok(mut p) => match tokio::time::timeout(Duration::from_secs(60), &mut feed).await {
                    Ok(Ok(())) => Ok(p),
                    other => {
                        let _ = p.child.start_kill();
                        let _ = p.child.wait().await;
                        Err(match other {
                            Ok(Err(e)) => e,
                            _ => "the snapshot memory did not finish streaming".into(),
                        })
                    }
                },
            },
            fed = &mut feed => match fed {
                Ok(()) => launch.await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            },
        };
        if loaded.is_err() {
            // A VMM still waiting for memory that will never come goes too.
            let dir = spec.work_dir.clone();
            tokio::task::spawn_blocking(move || process::kill_all_under(&dir))
                .await
                .ok();
        }
        let mut p = loaded?;
        if let Err(e) = self.vmm.resume(spec).await {
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
            return Err(e.to_string());
        }
        Ok(p)
    }

    /// A VMM exited. If no flow was expecting it (the guest powered off or the
    /// VMM crashed), record what happened.
    async fn on_vmm_exit(
        &self,
        vm_id: &str,
        boot_id: u64,
        status: std::io::Result<std::process::ExitStatus>,
    ) {
        let _guard = self.lock_vm(vm_id).await;
        {
            let mut running = self.running.lock().unwrap();
            if running.get(vm_id).map(|r| r.boot_id) != Some(boot_id) {
                return; // a stop/delete flow already handled this process
            }
            running.remove(vm_id);
        }
        self.vmm.release(vm_id).await;
        let Ok(Some(mut vm)) = self.store.get_vm(vm_id).await else {
            return;
        };
        if state_of(&vm) != VmState::Running {
            return;
        }
        let result = match status {
            Ok(s) if s.success() => {
                tracing::info!(vm = vm_id, "guest powered off");
                self.transition(&mut vm, VmState::Stopped, None).await
            }
            other => {
                let how = match other {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
                let msg = format!("the VMM process exited unexpectedly ({how})");
                self.transition(&mut vm, VmState::Error, Some(&msg)).await
            }
        };
        if let Err(e) = result {
            tracing::error!(vm = vm_id, "recording VMM exit: {e}");
        }
        self.remove_tap(&vm).await;
        self.refresh_forwards().await;
    }

    /// Removes the VM's TAP, or its whole namespace when it ran isolated.
    async fn remove_tap(&self, vm: &Vm) {
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

    /// Ends the VM's VMM process: first an ACPI power-off when `graceful`,
    /// then SIGKILL after the stop timeout. Returns whether the guest shut down by itself.
    async fn end_vmm(&self, vm: &Vm, graceful: bool) -> bool {
        let entry = {
            let running = self.running.lock().unwrap();
            running.get(&vm.id).map(|r| (r.pid, r.exited.clone()))
        };
        let mut clean = false;
        if let Some((pid, mut exited)) = entry {
            if graceful {
                // The request is repeated: a guest still booting may not be
                // listening for the power button yet, and would miss a single press.
                let deadline = tokio::time::Instant::now() + self.config.stop_timeout;
                while !clean && tokio::time::Instant::now() < deadline {
                    if self.vmm.request_shutdown(&self.spec_for(vm)).await.is_err() {
                        break;
                    }
                    let slice = deadline
                        .saturating_duration_since(tokio::time::Instant::now())
                        .min(Duration::from_secs(2));
                    clean = tokio::time::timeout(slice, exited.wait_for(|e| *e))
                        .await
                        .is_ok();
                }
            }
            if !clean {
                tracing::warn!(vm = %vm.id, pid, graceful, "killing VMM");
                tokio::task::spawn_blocking(move || {
                    process::kill_and_wait(pid, Duration::from_secs(10))
                })
                .await
                .ok();
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e)).await;
            }
            self.running.lock().unwrap().remove(&vm.id);
        }
        // Anything else still running from this VM's directory is ours and must go.
        let dir = self.work_dir(&vm.id);
        tokio::task::spawn_blocking(move || process::kill_all_under(&dir))
            .await
            .ok();
        self.vmm.release(&vm.id).await;
        self.remove_tap(vm).await;
        clean
    }

    pub async fn stop_vm(&self, owner: &Owner, id: &str) -> Result<Vm> {
        let (_guard, mut vm) = self.lock_visible_vm(owner, id).await?;
        self.stop_locked(&mut vm).await?;
        Ok(vm)
    }

    async fn stop_locked(&self, vm: &mut Vm) -> Result<()> {
        let st = state_of(vm);
        if st != VmState::Running {
            return Err(ManagerError::Conflict(format!(
                "vm {} is {st}; only a running VM can be stopped",
                vm.id
            )));
        }
        self.transition(vm, VmState::Stopping, None).await?;
        let clean = self.end_vmm(vm, true).await;
        tracing::info!(vm = %vm.id, clean, "stopped");
        self.transition(vm, VmState::Stopped, None).await?;
        // Seed 001: stopping removes SSH forwarding and keeps the IP allocation.
        self.refresh_forwards().await;
        Ok(())
    }

    pub async fn start_vm(self: &Arc<Self>, owner: &Owner, id: &str) -> Result<Vm> {
        let (_guard, mut vm) = self.lock_visible_vm(owner, id).await?;
        self.start_locked(&mut vm).await?;
        Ok(vm)
    }

    /// Boots a stopped VM (or one in error) afresh from its disk.
    async fn start_locked(self: &Arc<Self>, vm: &mut Vm) -> Result<()> {
        let id = vm.id.clone();
        let st = state_of(vm);
        if !matches!(st, VmState::Stopped | VmState::Error) {
            return Err(ManagerError::Conflict(format!(
                "vm {id} is {st}; only a stopped VM (or one in error) can be started"
            )));
        }
        {
            let _admission = self.alloc_lock.lock().await;
            self.check_host_memory(vm).await?;
            self.transition(vm, VmState::Starting, None).await?;
        }
        self.end_vmm(vm, false).await;
        // A fresh boot asks DHCP for the VM's own address: no isolation any more.
        if vm.inner_ip.is_some() || vm.inner_mac.is_some() {
            self.store.set_vm_inner_address(&id, None, None).await?;
            vm.inner_ip = None;
            vm.inner_mac = None;
        }
        match self.boot(vm).await {
            Ok(()) => {
                self.transition(vm, VmState::Running, None).await?;
                self.refresh_forwards().await;
                Ok(())
            }
            Err(e) => {
                let msg = format!("failed to start vm {id}: {e}");
                self.transition(vm, VmState::Error, Some(&msg)).await?;
                Err(ManagerError::Internal(msg))
            }
        }
    }

    /// Deletes a VM: VMM killed, work directory removed, row deleted.
    pub async fn delete_vm(&self, owner: &Owner, id: &str) -> Result<()> {
        let (guard, vm) = self.lock_visible_vm(owner, id).await?;
        self.end_vmm(&vm, false).await;
        let dir = self.work_dir(id);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                let msg = format!("deleting vm {id}: removing {}: {e}", dir.display());
                if state_of(&vm).is_transient() {
                    self.store
                        .set_vm_state(id, VmState::Error.as_str(), Some(&msg))
                        .await?;
                }
                return Err(ManagerError::Internal(msg));
            }
        }
        // Seed 001: deleting a VM deletes all its snapshots from storage and its proxy routes.
        self.delete_vm_snapshots(id).await?;
        self.delete_vm_routes(id).await?;
        self.store.delete_vm(id).await?;
        // The row held the IP, MAC and port; with it gone they are free again.
        self.refresh_reservations().await;
        self.refresh_forwards().await;
        drop(guard);
        tracing::info!(vm = id, "deleted");
        Ok(())
    }

    /// Where the VM's console output is kept, and whether it may still grow.
    pub async fn console_log(&self, owner: &Owner, id: &str) -> Result<(PathBuf, bool)> {
        let vm = self.visible_vm(owner, id).await?;
        Ok((
            vmm::console_log_path(&self.work_dir(&vm.id)),
            self.is_running(id),
        ))
    }

    /// How much of each console log is kept (HATCH_CONSOLE_LOG_MAX_BYTES).
    pub fn console_log_max_bytes(&self) -> u64 {
        self.config.limits.console_log_max_bytes
    }

    pub fn is_running(&self, id: &str) -> bool {
        self.running.lock().unwrap().contains_key(id)
    }

    /// Daemon shutdown: every running guest is powered off gracefully and
    /// recorded `stopped`, so it can be started again after the restart.
    pub async fn shutdown_all(&self) {
        let ids: Vec<String> = self.running.lock().unwrap().keys().cloned().collect();
        let stops = ids.into_iter().map(|id| async move {
            let _guard = self.lock_vm(&id).await;
            if let Ok(Some(mut vm)) = self.store.get_vm(&id).await {
                if state_of(&vm) == VmState::Running {
                    if let Err(e) = self.stop_locked(&mut vm).await {
                        tracing::error!(vm = %id, "stopping at shutdown: {e}");
                    }
                }
            }
        });
        futures_util::future::join_all(stops).await;
        self.vmm.shutdown().await;
        if let Some(net) = self.network.get() {
            net.shutdown().await;
        }
    }
}
