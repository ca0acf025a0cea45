//! Orchestration: the only place that changes VM state.
//!
//! Every flow takes the VM's lock, checks the transition against the state
//! table, persists the new state *before* the side effect and again after it,
//! so a crash at any point leaves a state that start-up recovery understands.

mod backend;
mod capture;
mod checkpoint;
mod chunks;
mod compression;
pub mod console;
mod error;
pub mod exec;
pub mod files;
mod fork;
mod hot;
mod idle;
mod images;
mod lifecycle;
mod locks;
pub mod metrics;
mod network;
pub mod quotas;
mod recovery;
pub mod requests;
mod restore;
mod routes;
mod snapshots;
mod ssh;
mod ssh_gateway;
pub mod state;
mod supervision;
mod templates;

pub use error::{Context, ErrorKind, ManagerError, Result};
pub use idle::Busy;
pub use images::ImageUpload;
pub use routes::{RouteTarget, WakeError, Woke};

use crate::config::Config;
use crate::image::{self};
use crate::net::Network;
use crate::snapshot::Objects;
use crate::store::{Owner, Store, Vm};
use crate::telemetry::Telemetry;
use crate::vmm::{self, VmSpec, Vmm};
use state::VmState;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::watch;

pub const DEFAULT_IMAGE_ID: &str = "img_default";

/// Streams a snapshot's memory into a VMM's FIFO, verifying as it goes;
/// resolves once every byte was sent and checked.
type MemoryFeed = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// A VMM process this daemon started and is watching.
struct Running {
    boot_id: u64,
    pid: u32,
    exited: watch::Receiver<bool>,
    /// The backend that started it, which gets back what it held when it ends.
    backend: Arc<dyn Vmm>,
}

pub struct Manager {
    store: Store,
    objects: Objects,
    /// The hypervisor backends; each VM runs on the one its `hypervisor` names.
    backends: vmm::Backends,
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
    /// Snapshot chunks: captures and compression hold it shared, collection
    /// exclusively (see chunks.rs).
    chunk_gc: Arc<tokio::sync::RwLock<()>>,
    /// Asks the chunk collector to run now: (owner or all, grace).
    collect_now: tokio::sync::mpsc::UnboundedSender<chunks::Collect>,
    collect_asked: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<chunks::Collect>>>,
    /// The daemon's Prometheus metrics (src/telemetry.rs).
    telemetry: Telemetry,
    /// Sleeping VMs' guest RAM kept in host memory for their wake (hot.rs).
    hot: hot::HotCopies,
    /// The daemon's SSH CA (src/ssh), set once at start-up before any VM
    /// boots: every seed written after it makes the guest trust it.
    ssh_ca: OnceLock<Arc<crate::ssh::Ca>>,
    /// Sleeping VMs' SSH ports, answered by the daemon until they wake.
    ssh_gateway: ssh_gateway::SshGateway,
}

fn not_found(kind: &str, id: &str) -> ManagerError {
    ManagerError::NotFound(format!("{kind} {id} not found"))
}

impl Manager {
    pub fn new(
        store: Store,
        objects: Objects,
        backends: vmm::Backends,
        config: Config,
    ) -> Arc<Manager> {
        let (collect_now, collect_asked) = tokio::sync::mpsc::unbounded_channel();
        let telemetry = Telemetry::new(&config.metrics, objects.transfer());
        Arc::new_cyclic(|me| Manager {
            store,
            objects,
            backends,
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
            chunk_gc: Default::default(),
            collect_now,
            collect_asked: Mutex::new(Some(collect_asked)),
            telemetry,
            hot: Default::default(),
            ssh_ca: OnceLock::new(),
            ssh_gateway: ssh_gateway::SshGateway::new(me.clone()),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    pub fn proxy_config(&self) -> &crate::config::ProxyConfig {
        &self.config.proxy
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        self.config.idle.timeout
    }

    /// The server default: the hypervisor a new VM runs on.
    pub fn hypervisor_name(&self) -> &'static str {
        self.backends.default_backend().name()
    }

    /// The hypervisors this daemon has a backend for (what a request may name).
    pub fn hypervisor_names(&self) -> Vec<&'static str> {
        self.backends.names()
    }

    /// The guests' network (HATCH_BRIDGE_CIDR): where a requested guest_ip must be.
    pub fn guest_network(&self) -> crate::net::ipam::BridgeNet {
        self.config.net.net
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

    /// What `backend` needs to run `vm`.
    fn spec_for(&self, vm: &Vm, backend: &dyn Vmm) -> VmSpec {
        let image_dir = PathBuf::from(&vm.image_dir);
        let work_dir = self.work_dir(&vm.id);
        let seed = work_dir.join("seed.iso");
        // A guest resumed from another VM's memory keeps that VM's MAC, behind
        // its own network namespace (see `isolation`).
        let mac = vm.inner_mac.or(vm.guest_mac);
        VmSpec {
            nic: match (&vm.tap_name, mac) {
                (Some(tap), Some(mac)) => Some(vmm::Nic {
                    tap: tap.clone(),
                    mac: mac.to_string(),
                }),
                _ => None,
            },
            netns: self.isolation(vm).map(|i| i.netns),
            seed: seed.exists().then_some(seed),
            vm_id: vm.id.clone(),
            disk: backend.disk_path(&work_dir),
            work_dir,
            // `check_kernel` refused images with no kernel this backend boots;
            // one of no known format is left for the VMM to report.
            kernel: image::kernel_for(&image_dir, backend.capabilities().kernels)
                .unwrap_or_else(|| image::kernel_in(&image_dir)),
            initrd: image::initrd_in(&image_dir),
            boot_args: backend.boot_args(&vm.boot_args),
            vcpu_count: vm.vcpu_count as u32,
            mem_mib: vm.mem_mib as u32,
        }
    }

    /// The network namespace a VM runs in when its guest believes it has an
    /// address that is not its own (a fork of another VM's memory).
    fn isolation(&self, vm: &Vm) -> Option<crate::net::isolate::Isolation> {
        let tap = vm.tap_name.as_ref()?;
        let outer_mac = vm.guest_mac?.to_string();
        Some(crate::net::isolate::isolation_for(
            &vm.id,
            tap,
            vm.guest_ip?,
            vm.inner_ip?,
            &outer_mac,
        ))
    }

    /// Persists a checked transition.
    async fn transition(&self, vm: &mut Vm, to: VmState, last_error: Option<&str>) -> Result<()> {
        let from = vm.state;
        if !from.can_become(to) {
            return Err(ManagerError::Internal(format!(
                "internal error: vm {} cannot go from {from} to {to}",
                vm.id
            )));
        }
        vm.updated_at = self.store.set_vm_state(&vm.id, to, last_error).await?;
        vm.state = to;
        vm.last_error = last_error.map(str::to_string);
        if to == VmState::Running {
            // The idle clock starts when the guest runs (boot, start, restore).
            self.activity.touch(&vm.id);
        }
        if to == VmState::Snapshotted {
            // Asleep: its SSH port is the daemon's until it wakes.
            self.listen_while_asleep(vm);
        }
        tracing::info!(vm = %vm.id, %from, %to, error = last_error.unwrap_or(""), "state change");
        Ok(())
    }
}
