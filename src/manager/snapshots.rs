//! Snapshot flows: capture (Standby and Stopped), background compression,
//! restore (the latest or a chosen snapshot) and fork into a new VM.
//!
//! A snapshot row is `capturing` until every object is stored and
//! checksummed; only `ready` rows are ever listed or restored. A VM that is
//! `snapshotted` records the snapshot it resumes from (`standby_snapshot_id`),
//! set *before* its VMM is ended, so a crash in between is recovered as
//! `snapshotted`, not lost.

use super::quotas::SnapshotQuota;
use super::requests::{CreateSnapshot, FromSnapshot, SnapshotKind, TargetState};
use super::state::VmState;
use super::{not_found, state_of, Manager, ManagerError, Result};
use crate::ids;
use crate::image::seed;
use crate::snapshot::{self, CompressionConfig, Stored};
use crate::store::{Owner, Snapshot, Vm};
use crate::vmm::{self, VmSpec};
use std::path::Path;
use std::sync::Arc;

/// What a snapshot's guest believes about itself, read from its `vm_config`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct SavedConfig {
    vcpu_count: Option<i64>,
    mem_mib: Option<i64>,
    boot_args: Option<String>,
    enable_network: Option<bool>,
    user_data: Option<String>,
    guest_ip: Option<String>,
    guest_mac: Option<String>,
    /// The address in the guest's memory (differs from guest_ip for a fork).
    inner_ip: Option<String>,
    inner_mac: Option<String>,
}

impl SavedConfig {
    fn of(snap: &Snapshot) -> SavedConfig {
        serde_json::from_str(&snap.vm_config).unwrap_or_default()
    }

    /// The address and MAC the snapshot's guest memory holds.
    fn memory_address(&self) -> (Option<String>, Option<String>) {
        (
            self.inner_ip.clone().or_else(|| self.guest_ip.clone()),
            self.inner_mac.clone().or_else(|| self.guest_mac.clone()),
        )
    }
}

fn stored(sha: &Option<String>, size: Option<i64>) -> Stored {
    Stored {
        sha256: sha.clone().unwrap_or_default(),
        size: size.unwrap_or(0) as u64,
    }
}

fn kind_of(snap: &Snapshot) -> SnapshotKind {
    SnapshotKind::parse(&snap.kind).unwrap_or(SnapshotKind::Standby)
}

fn compression_of(snap: &Snapshot) -> CompressionConfig {
    snap.compression
        .as_deref()
        .and_then(|c| serde_json::from_str(c).ok())
        .unwrap_or_default()
}

/// The snapshot's disk put in place of the VM's, the previous one kept
/// beside it until the restore either worked (commit) or did not (rollback).
struct DiskSwap {
    disk: std::path::PathBuf,
    backup: Option<std::path::PathBuf>,
}

impl DiskSwap {
    async fn commit(self) {
        if let Some(b) = &self.backup {
            let _ = tokio::fs::remove_file(b).await;
        }
    }

    async fn rollback(self) {
        match &self.backup {
            Some(b) => {
                if let Err(e) = tokio::fs::rename(b, &self.disk).await {
                    tracing::error!("putting back the disk {}: {e}", b.display());
                }
            }
            None => {
                let _ = tokio::fs::remove_file(&self.disk).await;
            }
        }
    }
}

/// A 1 MiB pipe buffer (the default is 64 KiB): fewer, larger hand-overs
/// between the VMM and the daemon. Best effort: a smaller limit still works.
fn grow_pipe(pipe: &impl std::os::fd::AsRawFd) {
    // SAFETY: F_SETPIPE_SZ on an open pipe fd only changes its capacity.
    unsafe {
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
    }
}

fn make_fifo(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A FIFO the VMM writes guest memory into while the daemon uploads it.
/// The reader is opened first (non-blocking, so a VMM that never starts
/// writing cannot hang us); `keeper` is a write end held by us, so the reader
/// sees no end of stream before the VMM's writer has come and gone.
struct MemoryPipe {
    reader: tokio::net::unix::pipe::Receiver,
    keeper: std::fs::File,
}

impl MemoryPipe {
    fn open(path: &Path) -> std::io::Result<MemoryPipe> {
        use std::os::unix::fs::OpenOptionsExt;
        make_fifo(path)?;
        let reader = tokio::net::unix::pipe::OpenOptions::new().open_receiver(path)?;
        grow_pipe(&reader);
        let keeper = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        Ok(MemoryPipe { reader, keeper })
    }
}

impl Manager {
    /// Takes `snap`'s read lock and reads its row again under it: compression
    /// may have switched the memory to another object since `snap` was read.
    async fn read_locked(
        &self,
        snap: &Snapshot,
    ) -> Result<(tokio::sync::OwnedRwLockReadGuard<()>, Snapshot)> {
        let guard = self.snap_lock(&snap.id).read_owned().await;
        let fresh = self
            .store
            .get_snapshot(&snap.id)
            .await?
            .ok_or_else(|| not_found("snapshot", &snap.id))?;
        Ok((guard, fresh))
    }

    fn snap_lock(&self, id: &str) -> Arc<tokio::sync::RwLock<()>> {
        let mut locks = self.snap_locks.lock().unwrap();
        Arc::clone(locks.entry(id.to_string()).or_default())
    }

    /// The VM's configuration as a snapshot records it (seed 000's `vm_config`).
    fn vm_config(vm: &Vm) -> String {
        serde_json::json!({
            "vcpu_count": vm.vcpu_count,
            "mem_mib": vm.mem_mib,
            "image_id": vm.image_id,
            "boot_args": vm.boot_args,
            "enable_network": vm.enable_network,
            "guest_ip": vm.guest_ip,
            "guest_mac": vm.guest_mac,
            "inner_ip": vm.inner_ip.as_ref().or(vm.guest_ip.as_ref()),
            "inner_mac": vm.inner_mac.as_ref().or(vm.guest_mac.as_ref()),
            "user_data": vm.user_data,
            "name": vm.name,
        })
        .to_string()
    }

    /// Request, else the VM's own default, else the server's (seed 003).
    fn compression_for(&self, vm: &Vm, requested: Option<&CompressionConfig>) -> CompressionConfig {
        requested
            .cloned()
            .or_else(|| {
                vm.snapshot_compression
                    .as_deref()
                    .and_then(|c| serde_json::from_str(c).ok())
            })
            .unwrap_or_else(|| self.config.snapshot_compression.clone())
            .normalized()
    }

    /// Snapshots of a VM the owner can see, newest first.
    pub async fn list_vm_snapshots(&self, owner: &Owner, id: &str) -> Result<Vec<Snapshot>> {
        let vm = self.visible_vm(owner, id).await?;
        Ok(self.store.vm_snapshots(&vm.id).await?)
    }

    /// Hatch's `POST /vms/{id}/snapshot`: a Standby snapshot with the VM's
    /// (or the server's) compression default.
    pub async fn snapshot_vm(self: &Arc<Self>, owner: &Owner, id: &str) -> Result<Snapshot> {
        let req = CreateSnapshot {
            kind: Some("Standby".into()),
            ..Default::default()
        };
        self.create_snapshot(owner, id, req).await
    }

    /// Hypeman's `POST /instances/{id}/snapshots`. Standby: memory, CPU/device
    /// state and disk, captured while the guest is paused; the VM ends
    /// `snapshotted`. Stopped: the guest is powered off first and only its
    /// disk is stored; the VM ends `stopped`. Returns once the snapshot is
    /// durable; compression, if asked for, continues in the background.
    pub async fn create_snapshot(
        self: &Arc<Self>,
        owner: &Owner,
        id: &str,
        req: CreateSnapshot,
    ) -> Result<Snapshot> {
        let kind = req.validate().map_err(ManagerError::BadRequest)?;
        let (_guard, mut vm) = self.lock_visible_vm(owner, id).await?;
        self.snapshot_locked(&mut vm, kind, &req, SnapshotQuota::Enforced)
            .await
    }

    /// Takes a snapshot of `vm` (its lock held); see `create_snapshot`.
    /// `quota` says whether the owner's snapshot limits may refuse it.
    pub(super) async fn snapshot_locked(
        self: &Arc<Self>,
        vm: &mut Vm,
        kind: SnapshotKind,
        req: &CreateSnapshot,
        quota: SnapshotQuota,
    ) -> Result<Snapshot> {
        let id = vm.id.clone();
        let st = state_of(vm);
        match kind {
            SnapshotKind::Standby if st != VmState::Running => {
                return Err(ManagerError::Conflict(format!(
                    "vm {id} is {st}; only a running VM can be snapshotted"
                )))
            }
            SnapshotKind::Stopped if !matches!(st, VmState::Running | VmState::Stopped) => {
                return Err(ManagerError::Conflict(format!(
                    "vm {id} is {st}; a Stopped snapshot needs a running or stopped VM"
                )))
            }
            _ => {}
        }
        let snap_id = ids::new_id("snap");
        let mut snap = snapshot::capturing_record(
            &snap_id,
            &vm.id,
            &vm.owner_id,
            kind.as_str(),
            &vm.hypervisor,
            Self::vm_config(vm),
        );
        snap.name = req.name.clone();
        snap.tags = serde_json::to_string(&req.tags.clone().unwrap_or_default())
            .map_err(|e| ManagerError::Internal(e.to_string()))?;
        snap.source_instance_name = vm.name.clone();
        let compression = match kind {
            SnapshotKind::Standby => self.compression_for(vm, req.compression.as_ref()),
            SnapshotKind::Stopped => CompressionConfig::default(),
        };
        snap.compression = Some(
            serde_json::to_string(&compression)
                .map_err(|e| ManagerError::Internal(e.to_string()))?,
        );
        if kind == SnapshotKind::Stopped {
            // Disk only: there is no memory or device state to point at.
            snap.state_key.clear();
            snap.memory_key.clear();
        }
        {
            // The disk is stored whatever the kind: at least that much must fit.
            let disk = tokio::fs::metadata(self.spec_for(vm).disk)
                .await
                .map(|m| m.len())
                .unwrap_or(0);
            let _admission = self.alloc_lock.lock().await;
            self.admit_snapshot(vm, quota, disk).await?;
            // A duplicate name fails here, before the guest is touched.
            self.store.insert_snapshot(&snap).await?;
        }
        let result = match kind {
            SnapshotKind::Standby => self.capture_standby(vm, &mut snap, quota).await,
            SnapshotKind::Stopped => self.capture_stopped(vm, &mut snap, quota).await,
        };
        if let Err(e) = result {
            let _ = self
                .objects
                .delete_prefix(&format!("{}{snap_id}/", snapshot::prefix_of_vm(&vm.id)))
                .await;
            self.store.delete_snapshot(&snap_id).await?;
            return Err(e);
        }
        if compression.enabled {
            snap.compression_state = "compressing".into();
            self.store.set_snapshot_compression(&snap).await?;
            self.spawn_compression(snap.clone());
        }
        tracing::info!(vm = %id, snapshot = %snap_id, kind = kind.as_str(), bytes = snap.size_bytes, "snapshot stored");
        Ok(snap)
    }

    /// Standby capture. The guest stays paused until every object is stored;
    /// any failure before that resumes it, so nothing is lost.
    async fn capture_standby(
        &self,
        vm: &mut Vm,
        snap: &mut Snapshot,
        quota: SnapshotQuota,
    ) -> Result<()> {
        // Proxied requests wait for a wake instead of reaching a guest about to pause.
        let _pausing = self.activity.pause(&vm.id);
        let spec = self.spec_for(vm);
        let dir = self.work_dir(&vm.id).join(format!("capture-{}", snap.id));
        let captured = self.capture(&spec, &dir, snap).await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        let captured = match captured {
            Err(e) => Err(ManagerError::Internal(format!(
                "snapshot of vm {} failed, the VM keeps running: {e}",
                vm.id
            ))),
            Ok(()) => Ok(()),
        };
        // Only now is the memory's size known: does it still fit?
        let admission = self.alloc_lock.lock().await;
        let admitted = match captured {
            Ok(()) => {
                self.admit_stored(&vm.owner_id, quota, snap.size_bytes.max(0) as u64)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = admitted {
            drop(admission);
            if matches!(e, ManagerError::Forbidden(_)) {
                tracing::info!(vm = %vm.id, snapshot = %snap.id, "snapshot refused after capture: {e}");
            }
            if let Err(r) = self.vmm.resume(&spec).await {
                tracing::error!(vm = %vm.id, "resuming after a failed snapshot: {r}");
            }
            return Err(e);
        }
        self.store.mark_snapshot_ready(snap).await?;
        drop(admission);
        snap.status = "ready".into();
        // Recorded before the VMM ends: a crash from here on recovers as snapshotted.
        self.store.set_vm_standby(&vm.id, Some(&snap.id)).await?;
        vm.standby_snapshot_id = Some(snap.id.clone());
        self.end_vmm(vm, false).await;
        self.transition(vm, VmState::Snapshotted, None).await?;
        self.refresh_forwards().await;
        Ok(())
    }

    /// Pauses and saves the guest, streaming its memory straight into the
    /// store through a FIFO (never a whole copy on local disk or in RAM),
    /// then stores state and disk.
    async fn capture(
        &self,
        spec: &VmSpec,
        dir: &Path,
        snap: &mut Snapshot,
    ) -> std::result::Result<(), String> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| e.to_string())?;
        let files = vmm::SnapshotFiles {
            state: dir.join("vmstate"),
            memory: dir.join("memory"),
        };
        let pipe = MemoryPipe::open(&files.memory).map_err(|e| format!("memory pipe: {e}"))?;
        let (reader, keeper) = (pipe.reader, pipe.keeper);
        let save = async {
            let saved = self.vmm.snapshot(spec, &files).await;
            // The VMM's writer is done (or never came): let the reader see the end.
            drop(keeper);
            saved
        };
        let (saved, memory) = tokio::join!(save, self.objects.put_reader(&snap.memory_key, reader));
        saved.map_err(|e| e.to_string())?;
        let e = |e: snapshot::ObjectError| e.to_string();
        let memory = memory.map_err(e)?;
        // The guest is paused and QEMU flushed the disk when saving completed.
        let state = self
            .objects
            .put_file(&snap.state_key, &files.state)
            .await
            .map_err(e)?;
        let disk = self
            .objects
            .put_file(&snap.disk_key, &spec.disk)
            .await
            .map_err(e)?;
        snap.size_bytes = (state.size + memory.size + disk.size) as i64;
        snap.state_sha256 = Some(state.sha256);
        snap.state_size = Some(state.size as i64);
        snap.memory_sha256 = Some(memory.sha256);
        snap.memory_size = Some(memory.size as i64);
        snap.disk_sha256 = Some(disk.sha256);
        snap.disk_size = Some(disk.size as i64);
        Ok(())
    }

    /// Stopped capture: the guest powers off (as a stop does), then its disk is stored.
    async fn capture_stopped(
        &self,
        vm: &mut Vm,
        snap: &mut Snapshot,
        quota: SnapshotQuota,
    ) -> Result<()> {
        if state_of(vm) == VmState::Running {
            self.stop_locked(vm).await?;
        }
        let disk = self.spec_for(vm).disk;
        let stored = self
            .objects
            .put_file(&snap.disk_key, &disk)
            .await
            .map_err(|e| {
                ManagerError::Internal(format!(
                    "snapshot of vm {} failed, the VM is stopped and its disk unchanged: {e}",
                    vm.id
                ))
            })?;
        snap.size_bytes = stored.size as i64;
        snap.disk_sha256 = Some(stored.sha256);
        snap.disk_size = Some(stored.size as i64);
        let _admission = self.alloc_lock.lock().await;
        self.admit_stored(&vm.owner_id, quota, stored.size).await?;
        self.store.mark_snapshot_ready(snap).await?;
        snap.status = "ready".into();
        Ok(())
    }

    // ------------------------------------------------------------ compression

    pub(super) fn spawn_compression(self: &Arc<Self>, snap: Snapshot) {
        let mgr = Arc::clone(self);
        tokio::spawn(async move { mgr.compress(snap).await });
    }

    /// Compresses the memory object of `snap` into a second object, then
    /// switches the snapshot to it and deletes the raw one. Until the switch
    /// the raw object is what restores use; a failure leaves it in place.
    async fn compress(&self, mut snap: Snapshot) {
        let Some((algorithm, level)) = compression_of(&snap).effective() else {
            return;
        };
        let ckey = format!("{}.{}", snap.memory_key, algorithm.as_str());
        let result = self
            .objects
            .compress(&snap.memory_key, &ckey, algorithm, level)
            .await;
        let lock = self.snap_lock(&snap.id);
        let _w = lock.write().await;
        match self.store.get_snapshot(&snap.id).await {
            Ok(Some(_)) => {}
            _ => {
                // Deleted while compressing: what was written goes too.
                let _ = self.objects.delete(&ckey).await;
                return;
            }
        }
        match result {
            Ok(c) => {
                snap.compression_state = "compressed".into();
                snap.compressed_key = Some(ckey);
                snap.compressed_sha256 = Some(c.sha256);
                snap.compressed_size_bytes = Some(c.size as i64);
                snap.size_bytes =
                    snap.state_size.unwrap_or(0) + c.size as i64 + snap.disk_size.unwrap_or(0);
                if let Err(e) = self.store.set_snapshot_compression(&snap).await {
                    tracing::error!(snapshot = %snap.id, "recording compression: {e}");
                    return;
                }
                if let Err(e) = self.objects.delete(&snap.memory_key).await {
                    tracing::warn!(snapshot = %snap.id, "removing the uncompressed memory: {e}");
                }
                tracing::info!(snapshot = %snap.id, algorithm = algorithm.as_str(), level,
                    raw = snap.memory_size.unwrap_or(0), compressed = c.size, "memory compressed");
            }
            Err(e) => {
                let _ = self.objects.delete(&ckey).await;
                snap.compression_state = "error".into();
                snap.compression_error = Some(e.to_string());
                tracing::error!(snapshot = %snap.id, "compression failed, the uncompressed memory stays: {e}");
                if let Err(e) = self.store.set_snapshot_compression(&snap).await {
                    tracing::error!(snapshot = %snap.id, "recording compression failure: {e}");
                }
            }
        }
    }

    /// Start-up: compression a restart interrupted starts again from the raw
    /// memory (still there); a raw object left beside a finished compression goes.
    pub(super) async fn recover_compression(self: &Arc<Self>) -> Result<()> {
        for snap in self.store.snapshots_in_compression().await? {
            tracing::info!(snapshot = %snap.id, "resuming interrupted compression");
            self.spawn_compression(snap);
        }
        let leftovers: Vec<String> = self
            .store
            .compressed_snapshots()
            .await?
            .into_iter()
            .map(|s| s.memory_key)
            .collect();
        let objects = self.objects.clone();
        tokio::spawn(async move {
            for key in leftovers {
                let _ = objects.delete(&key).await;
            }
        });
        Ok(())
    }

    // ---------------------------------------------------------------- restore

    /// Hatch's `POST /vms/{id}/restore`: the VM continues from the snapshot it
    /// went to standby in (its most recent). A missing or corrupt object fails
    /// the restore before anything changes: the VM stays `snapshotted`.
    pub async fn restore_vm(self: &Arc<Self>, owner: &Owner, id: &str) -> Result<Vm> {
        let (_guard, mut vm) = self.lock_visible_vm(owner, id).await?;
        let st = state_of(&vm);
        if st != VmState::Snapshotted {
            return Err(ManagerError::Conflict(format!(
                "vm {id} is {st}; only a snapshotted VM can be restored"
            )));
        }
        let snap = self
            .standby_snapshot(&vm)
            .await?
            .ok_or_else(|| ManagerError::Conflict(format!("vm {id} has no snapshot to restore")))?;
        self.resume_from(&mut vm, &snap).await?;
        self.drop_sleep_snapshot(snap);
        Ok(vm)
    }

    /// The snapshot a snapshotted VM resumes from.
    pub(super) async fn standby_snapshot(&self, vm: &Vm) -> Result<Option<Snapshot>> {
        Ok(match &vm.standby_snapshot_id {
            Some(s) => self.store.get_snapshot(s).await?,
            // Rows from before standby_snapshot_id existed: the most recent one.
            None => self.store.vm_snapshots(&vm.id).await?.into_iter().next(),
        })
    }

    /// Loads a Standby snapshot into `vm` and resumes it (VM lock held). A
    /// failure leaves the VM as it was: state, disk and what it resumes from.
    pub(super) async fn resume_from(self: &Arc<Self>, vm: &mut Vm, snap: &Snapshot) -> Result<()> {
        let id = vm.id.clone();
        let (_r, snap) = self.read_locked(snap).await?;
        let snap = &snap;
        let before = (
            state_of(vm),
            vm.standby_snapshot_id.clone(),
            vm.inner_ip.clone(),
            vm.inner_mac.clone(),
        );
        {
            // The host must hold its memory; refused, nothing has changed.
            let _admission = self.alloc_lock.lock().await;
            self.check_host_memory(vm).await?;
            // Recorded before a VMM starts: a crash while loading recovers as snapshotted on it.
            if vm.standby_snapshot_id.as_deref() != Some(snap.id.as_str()) {
                self.store.set_vm_standby(&id, Some(&snap.id)).await?;
                vm.standby_snapshot_id = Some(snap.id.clone());
            }
            self.adopt_memory_address(vm, snap).await?;
            self.transition(vm, VmState::Starting, None).await?;
        }
        match self.load_standby(vm, snap).await {
            Ok(()) => {
                self.store.set_vm_standby(&id, None).await?;
                vm.standby_snapshot_id = None;
                self.transition(vm, VmState::Running, None).await?;
                self.refresh_forwards().await;
                tracing::info!(vm = %id, snapshot = %snap.id, "restored");
                Ok(())
            }
            Err(e) => {
                let (state, standby, ip, mac) = before;
                self.store.set_vm_standby(&id, standby.as_deref()).await?;
                vm.standby_snapshot_id = standby;
                self.store
                    .set_vm_inner_address(&id, ip.as_deref(), mac.as_deref())
                    .await?;
                vm.inner_ip = ip;
                vm.inner_mac = mac;
                let msg = format!(
                    "restoring vm {id} from {} failed, the VM stays {state}: {e}",
                    snap.id
                );
                let last_error = (state == VmState::Error).then_some(msg.as_str());
                self.transition(vm, state, last_error).await?;
                Err(ManagerError::Internal(msg))
            }
        }
    }

    /// A VM whose memory comes from `snap` believes it has the address the
    /// snapshot's guest had. When that is not its own (a fork), it runs behind
    /// an isolation that translates between the two (see src/net/README.md).
    async fn adopt_memory_address(&self, vm: &mut Vm, snap: &Snapshot) -> Result<()> {
        let (ip, mac) = SavedConfig::of(snap).memory_address();
        let (inner_ip, inner_mac) = if vm.enable_network && ip.is_some() && ip != vm.guest_ip {
            (ip, mac)
        } else {
            (None, None)
        };
        // Each write is a synced transaction: skip it when nothing changes (the usual restore).
        if (&inner_ip, &inner_mac) == (&vm.inner_ip, &vm.inner_mac) {
            return Ok(());
        }
        self.store
            .set_vm_inner_address(&vm.id, inner_ip.as_deref(), inner_mac.as_deref())
            .await?;
        vm.inner_ip = inner_ip;
        vm.inner_mac = inner_mac;
        Ok(())
    }

    /// Moves `vm` to `snapshotted`, resuming from `snap` (VM lock held).
    async fn settle_standby(&self, vm: &mut Vm, snap: &Snapshot) -> Result<()> {
        self.store.set_vm_standby(&vm.id, Some(&snap.id)).await?;
        vm.standby_snapshot_id = Some(snap.id.clone());
        if state_of(vm) != VmState::Snapshotted {
            self.transition(vm, VmState::Snapshotted, None).await?;
        }
        Ok(())
    }

    /// Downloads and verifies the snapshot's disk (and its device state
    /// when `state`) into `dir`, then puts the disk in place; the VM's
    /// previous disk is kept until the swap is committed or rolled back.
    async fn fetch(
        &self,
        snap: &Snapshot,
        dir: &Path,
        work_dir: &Path,
        state: bool,
    ) -> std::result::Result<DiskSwap, String> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| e.to_string())?;
        let e = |e: snapshot::ObjectError| e.to_string();
        if state {
            self.objects
                .get_file(
                    &snap.state_key,
                    &dir.join("vmstate"),
                    &stored(&snap.state_sha256, snap.state_size),
                )
                .await
                .map_err(e)?;
        }
        let fetched = dir.join("disk.qcow2");
        self.objects
            .get_file(
                &snap.disk_key,
                &fetched,
                &stored(&snap.disk_sha256, snap.disk_size),
            )
            .await
            .map_err(e)?;
        tokio::fs::create_dir_all(work_dir)
            .await
            .map_err(|e| e.to_string())?;
        // Everything arrived intact: only now is the VM's disk replaced.
        let disk = work_dir.join("disk.qcow2");
        let backup = work_dir.join("disk.qcow2.before-restore");
        let had_disk = match tokio::fs::rename(&disk, &backup).await {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(format!("keeping the current disk: {e}")),
        };
        if let Err(e) = tokio::fs::rename(&fetched, &disk).await {
            if had_disk {
                let _ = tokio::fs::rename(&backup, &disk).await;
            }
            return Err(e.to_string());
        }
        Ok(DiskSwap {
            disk,
            backup: had_disk.then_some(backup),
        })
    }

    /// Where a snapshot's memory is and how to check it: the key, its
    /// recorded checksum, and the algorithm and raw checksum when compressed.
    fn memory_source(snap: &Snapshot) -> (String, Stored, Option<(snapshot::Algorithm, Stored)>) {
        let raw = stored(&snap.memory_sha256, snap.memory_size);
        match (&snap.compressed_key, compression_of(snap).effective()) {
            (Some(key), Some((algorithm, _))) if snap.compression_state == "compressed" => (
                key.clone(),
                stored(&snap.compressed_sha256, snap.compressed_size_bytes),
                Some((algorithm, raw)),
            ),
            _ => (snap.memory_key.clone(), raw, None),
        }
    }

    /// The stream of `snap`'s memory into the FIFO at `fifo`, verified.
    fn memory_feed(
        &self,
        snap: &Snapshot,
        fifo: &Path,
    ) -> std::result::Result<super::MemoryFeed, String> {
        make_fifo(fifo).map_err(|e| format!("memory pipe: {e}"))?;
        let (key, expected, decompress) = Self::memory_source(snap);
        if let (Some(src), None) = (self.objects.local_file(&key), &decompress) {
            return Self::blocking_feed(src, key, expected, fifo);
        }
        // Read-write: opening never waits for (or fails without) the VMM's
        // reader; once we close it, the reader sees the end of the stream.
        let mut tx = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(fifo)
            .map_err(|e| format!("memory pipe: {e}"))?;
        grow_pipe(&tx);
        let objects = self.objects.clone();
        Ok(Box::pin(async move {
            let sent = objects
                .stream_to(
                    &key,
                    &mut tx,
                    &expected,
                    decompress.as_ref().map(|(a, r)| (*a, r)),
                )
                .await;
            drop(tx);
            sent.map_err(|e| e.to_string())
        }))
    }

    /// The local, uncompressed case of `memory_feed`: a blocking thread that
    /// reads, hashes and writes each MiB once. Dropping the feed (the VMM
    /// failed) tells the thread to stop.
    fn blocking_feed(
        src: std::path::PathBuf,
        key: String,
        expected: Stored,
        fifo: &Path,
    ) -> std::result::Result<super::MemoryFeed, String> {
        use std::os::unix::fs::OpenOptionsExt;
        // Read-write: never waits for the VMM's reader; non-blocking, so the
        // thread can notice it was abandoned.
        let out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
            .map_err(|e| format!("memory pipe: {e}"))?;
        grow_pipe(&out);
        struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for CancelOnDrop {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guard = CancelOnDrop(Arc::clone(&cancel));
        Ok(Box::pin(async move {
            let _guard = guard;
            tokio::task::spawn_blocking(move || {
                snapshot::feed_blocking(&src, &key, out, &expected, &cancel)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
        }))
    }

    /// Verified state and disk in place, then the memory streamed into a new
    /// VMM for `vm`, which resumes. On failure the VM's disk is as it was.
    async fn load_standby(
        self: &Arc<Self>,
        vm: &Vm,
        snap: &Snapshot,
    ) -> std::result::Result<(), String> {
        let work_dir = self.work_dir(&vm.id);
        let dir = work_dir.join(format!("restore-{}", snap.id));
        let result = async {
            let swap = self.fetch(snap, &dir, &work_dir, true).await?;
            let files = vmm::SnapshotFiles {
                state: dir.join("vmstate"),
                memory: dir.join("memory"),
            };
            let loaded = match self.memory_feed(snap, &files.memory) {
                Ok(feed) => self.boot_from(vm, Some((&files, feed))).await,
                Err(e) => Err(e),
            };
            match loaded {
                Ok(()) => {
                    swap.commit().await;
                    Ok(())
                }
                Err(e) => {
                    swap.rollback().await;
                    Err(self.explain_load_failure(snap, e).await)
                }
            }
        }
        .await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        result
    }

    /// A VMM that could not load streamed memory says little about why; when
    /// the stored memory itself is corrupt or missing, that is the reason to give.
    async fn explain_load_failure(&self, snap: &Snapshot, error: String) -> String {
        if error.contains("corrupt") || error.contains("missing") {
            return error;
        }
        let (key, expected, decompress) = Self::memory_source(snap);
        match self
            .objects
            .stream_to(
                &key,
                &mut tokio::io::sink(),
                &expected,
                decompress.as_ref().map(|(a, r)| (*a, r)),
            )
            .await
        {
            Err(e) => e.to_string(),
            Ok(()) => error,
        }
    }

    /// Hypeman's `POST /instances/{id}/snapshots/{snapshot_id}/restore`: the
    /// instance (stopped, in standby or in error) takes the snapshot's state
    /// and ends in `target_state`.
    pub async fn restore_snapshot(
        self: &Arc<Self>,
        owner: &Owner,
        id: &str,
        snap_id: &str,
        req: FromSnapshot,
    ) -> Result<Vm> {
        if req.name.is_some() {
            return Err(ManagerError::BadRequest(
                "name is not accepted by restore (it names the new instance of a fork)".into(),
            ));
        }
        let (_guard, mut vm) = self.lock_visible_vm(owner, id).await?;
        let snap = match self.store.get_snapshot(snap_id).await? {
            Some(s) if s.vm_id == vm.id => s,
            _ => {
                return Err(ManagerError::NotFound(format!(
                    "snapshot {snap_id} of instance {id} not found"
                )))
            }
        };
        let kind = kind_of(&snap);
        let target = req
            .target(kind, self.vmm.name())
            .map_err(ManagerError::BadRequest)?;
        let st = state_of(&vm);
        if !matches!(st, VmState::Stopped | VmState::Snapshotted | VmState::Error) {
            return Err(ManagerError::Conflict(format!(
                "instance {id} is {st}; stop it or put it in standby before restoring a snapshot"
            )));
        }
        if target == TargetState::Running {
            // Before the disk is swapped; booting checks again under the admission lock.
            self.check_host_memory(&vm).await?;
        }
        // Whatever is left of an earlier VMM (a VM in error) goes first.
        self.end_vmm(&vm, false).await;
        match (kind, target) {
            (SnapshotKind::Standby, TargetState::Running) => {
                self.resume_from(&mut vm, &snap).await?
            }
            (SnapshotKind::Standby, TargetState::Standby) => {
                self.settle_standby(&mut vm, &snap).await?
            }
            (_, target) => {
                // The snapshot's disk, booted fresh (Running) or not at all (Stopped).
                let (_r, snap) = self.read_locked(&snap).await?;
                let work_dir = self.work_dir(id);
                let dir = work_dir.join(format!("restore-{}", snap.id));
                let fetched = self.fetch(&snap, &dir, &work_dir, false).await;
                let _ = tokio::fs::remove_dir_all(&dir).await;
                fetched
                    .map(DiskSwap::commit)
                    .map_err(|e| {
                        ManagerError::Internal(format!(
                            "restoring instance {id} from {snap_id} failed, it is unchanged: {e}"
                        ))
                    })?
                    .await;
                self.store.set_vm_standby(id, None).await?;
                vm.standby_snapshot_id = None;
                if state_of(&vm) != VmState::Stopped {
                    self.transition(&mut vm, VmState::Stopped, None).await?;
                }
                if target == TargetState::Running {
                    self.start_locked(&mut vm).await?;
                }
            }
        }
        tracing::info!(vm = id, snapshot = snap_id, state = %vm.state, "restored from snapshot");
        Ok(vm)
    }

    // ---------------------------------------------------------------- fork

    /// Hypeman's `POST /snapshots/{id}/fork`: a new VM with its own id,
    /// address, MAC and SSH port, from the snapshot's disk (and memory, for a
    /// Standby snapshot resumed as Running or kept as Standby).
    pub async fn fork_snapshot(
        self: &Arc<Self>,
        owner: &Owner,
        snap_id: &str,
        req: FromSnapshot,
    ) -> Result<Vm> {
        let name = match &req.name {
            None => {
                return Err(ManagerError::BadRequest(
                    "name is required: the fork is a new instance".into(),
                ))
            }
            Some(n) => {
                super::requests::check_resource_name("name", n)
                    .map_err(ManagerError::BadRequest)?;
                n.clone()
            }
        };
        let snap = self.get_snapshot(owner, snap_id).await?;
        let kind = kind_of(&snap);
        let target = req
            .target(kind, self.vmm.name())
            .map_err(ManagerError::BadRequest)?;
        let source = self
            .store
            .get_vm(&snap.vm_id)
            .await?
            .ok_or_else(|| not_found("instance", &snap.vm_id))?;
        let saved = SavedConfig::of(&snap);
        let now = crate::store::now();
        let mut vm = Vm {
            id: ids::new_id("vm"),
            owner_id: owner.id.clone(),
            image_id: source.image_id.clone(),
            image_dir: source.image_dir.clone(),
            template_id: None,
            state: VmState::Starting.as_str().into(),
            vcpu_count: saved.vcpu_count.unwrap_or(source.vcpu_count),
            mem_mib: saved.mem_mib.unwrap_or(source.mem_mib),
            boot_args: saved.boot_args.clone().unwrap_or(source.boot_args.clone()),
            enable_network: saved.enable_network.unwrap_or(source.enable_network),
            user_data: saved.user_data.clone().or(source.user_data.clone()),
            guest_ip: None,
            guest_mac: None,
            tap_name: None,
            ssh_port: None,
            hypervisor: self.vmm.name().into(),
            last_error: None,
            created_at: now.clone(),
            updated_at: now,
            name: Some(name),
            standby_snapshot_id: None,
            inner_ip: None,
            inner_mac: None,
            snapshot_compression: source.snapshot_compression.clone(),
            auto_sleep: source.auto_sleep,
            idle_timeout_seconds: source.idle_timeout_seconds,
            last_sleep_at: None,
            last_wake_at: None,
        };
        // A fork kept in Standby gets its own copy of the snapshot's objects.
        let copies = match (kind, target) {
            (SnapshotKind::Standby, TargetState::Standby) => snap.size_bytes.max(0) as u64,
            _ => 0,
        };
        let _guard = self.lock_vm(&vm.id).await;
        self.insert_with_network(
            &mut vm,
            &Default::default(),
            target == TargetState::Running,
            copies,
        )
        .await?;
        let result = self
            .prepare_fork(&mut vm, &source, &snap, kind, target)
            .await;
        match result {
            Ok(()) => {
                tracing::info!(vm = %vm.id, snapshot = snap_id, state = %vm.state, "forked");
                Ok(vm)
            }
            Err(e) => {
                let msg = format!("fork {} of snapshot {snap_id} failed: {e}", vm.id);
                if state_of(&vm).is_transient() {
                    self.transition(&mut vm, VmState::Error, Some(&msg)).await?;
                }
                Err(ManagerError::Internal(msg))
            }
        }
    }

    /// Fills the fork's work directory and brings it to `target`.
    async fn prepare_fork(
        self: &Arc<Self>,
        vm: &mut Vm,
        source: &Vm,
        snap: &Snapshot,
        kind: SnapshotKind,
        target: TargetState,
    ) -> std::result::Result<(), String> {
        let work_dir = self.work_dir(&vm.id);
        tokio::fs::create_dir_all(&work_dir)
            .await
            .map_err(|e| format!("creating work directory: {e}"))?;
        // A restored guest needs the devices it was saved with: the seed disk
        // is attached when the source had one (its content is the fork's own).
        if self.work_dir(&source.id).join("seed.iso").exists() || kind == SnapshotKind::Stopped {
            let seed_net = self.seed_net(vm);
            seed::write(
                &work_dir,
                &vm.id,
                vm.user_data.as_deref(),
                seed_net.as_ref(),
            )
            .await
            .map_err(|e| format!("creating the cloud-init seed: {e}"))?;
        }
        match (kind, target) {
            (SnapshotKind::Standby, TargetState::Standby) => {
                // The fork sleeps in a snapshot of its own, so deleting the
                // source (and its snapshots) never takes the fork's memory away.
                let own = self
                    .copy_snapshot(snap, vm)
                    .await
                    .map_err(|e| e.to_string())?;
                self.settle_standby_new(vm, &own)
                    .await
                    .map_err(|e| e.to_string())
            }
            (SnapshotKind::Standby, TargetState::Running) => {
                let (_r, snap) = self.read_locked(snap).await.map_err(|e| e.to_string())?;
                let snap = &snap;
                self.adopt_memory_address(vm, snap)
                    .await
                    .map_err(|e| e.to_string())?;
                self.load_standby(vm, snap).await?;
                self.transition(vm, VmState::Running, None)
                    .await
                    .map_err(|e| e.to_string())?;
                self.refresh_forwards().await;
                Ok(())
            }
            (_, target) => {
                let lock = self.snap_lock(&snap.id);
                let _r = lock.read().await;
                let dir = work_dir.join(format!("restore-{}", snap.id));
                let fetched = self.fetch(snap, &dir, &work_dir, false).await;
                let _ = tokio::fs::remove_dir_all(&dir).await;
                fetched?.commit().await;
                if target == TargetState::Running {
                    self.boot(vm).await?;
                    self.transition(vm, VmState::Running, None)
                        .await
                        .map_err(|e| e.to_string())?;
                    self.refresh_forwards().await;
                } else {
                    self.transition(vm, VmState::Stopped, None)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            }
        }
    }

    /// A new VM's first state is standby on its own snapshot `own`.
    async fn settle_standby_new(&self, vm: &mut Vm, own: &Snapshot) -> Result<()> {
        self.store.set_vm_standby(&vm.id, Some(&own.id)).await?;
        vm.standby_snapshot_id = Some(own.id.clone());
        self.transition(vm, VmState::Snapshotted, None).await
    }

    /// Copies `snap`'s objects to a new snapshot owned by `vm` (store-side copy).
    async fn copy_snapshot(&self, snap: &Snapshot, vm: &Vm) -> Result<Snapshot> {
        let lock = self.snap_lock(&snap.id);
        let _r = lock.read().await;
        let snap = self
            .store
            .get_snapshot(&snap.id)
            .await?
            .ok_or_else(|| not_found("snapshot", &snap.id))?;
        let new_id = ids::new_id("snap");
        let mut own = snapshot::capturing_record(
            &new_id,
            &vm.id,
            &vm.owner_id,
            &snap.kind,
            &snap.source_hypervisor,
            snap.vm_config.clone(),
        );
        own.source_instance_name = vm.name.clone();
        own.compression = snap.compression.clone();
        self.store.insert_snapshot(&own).await?;
        let compressed = snap.compression_state == "compressed";
        let mut pairs = vec![
            (snap.state_key.clone(), own.state_key.clone()),
            (snap.disk_key.clone(), own.disk_key.clone()),
        ];
        match (&snap.compressed_key, compressed) {
            (Some(k), true) => {
                let algo = k.rsplit('.').next().unwrap_or_default();
                own.compressed_key = Some(format!("{}.{algo}", own.memory_key));
                pairs.push((k.clone(), own.compressed_key.clone().unwrap_or_default()));
            }
            _ => pairs.push((snap.memory_key.clone(), own.memory_key.clone())),
        }
        for (from, to) in &pairs {
            if let Err(e) = self.objects.copy(from, to).await {
                let _ = self
                    .objects
                    .delete_prefix(&format!("{}{new_id}/", snapshot::prefix_of_vm(&vm.id)))
                    .await;
                self.store.delete_snapshot(&new_id).await?;
                return Err(ManagerError::Internal(format!(
                    "copying snapshot {}: {e}",
                    snap.id
                )));
            }
        }
        own.state_sha256 = snap.state_sha256.clone();
        own.state_size = snap.state_size;
        own.memory_sha256 = snap.memory_sha256.clone();
        own.memory_size = snap.memory_size;
        own.disk_sha256 = snap.disk_sha256.clone();
        own.disk_size = snap.disk_size;
        own.size_bytes = snap.size_bytes;
        self.store.mark_snapshot_ready(&own).await?;
        own.status = "ready".into();
        own.compression_state = if compressed {
            "compressed".into()
        } else {
            "none".into()
        };
        own.compressed_sha256 = snap.compressed_sha256.clone();
        own.compressed_size_bytes = snap.compressed_size_bytes;
        self.store.set_snapshot_compression(&own).await?;
        Ok(own)
    }

    // ---------------------------------------------------------------- reads

    /// The owner's snapshots that pass `filter` (Hypeman `GET /snapshots`).
    pub async fn list_snapshots(
        &self,
        owner: &Owner,
        filter: &super::requests::SnapshotFilter,
    ) -> Result<Vec<Snapshot>> {
        let all = self.store.owner_snapshots(&owner.id).await?;
        Ok(all.into_iter().filter(|s| filter.matches(s)).collect())
    }

    pub async fn get_snapshot(&self, owner: &Owner, id: &str) -> Result<Snapshot> {
        match self.store.get_snapshot(id).await? {
            Some(s) if s.owner_id == owner.id => Ok(s),
            _ => Err(not_found("snapshot", id)),
        }
    }

    /// Deletes a snapshot and its objects. The snapshot a `snapshotted` VM
    /// resumes from holds its memory: deleting it would lose the VM, so it is refused.
    pub async fn delete_snapshot(&self, owner: &Owner, id: &str) -> Result<()> {
        let snap = self.get_snapshot(owner, id).await?;
        let _guard = self.lock_vm(&snap.vm_id).await;
        if let Some(vm) = self.store.get_vm(&snap.vm_id).await? {
            let standby = self.standby_snapshot(&vm).await?.map(|s| s.id);
            if state_of(&vm) == VmState::Snapshotted && standby.as_deref() == Some(id) {
                return Err(ManagerError::Conflict(format!(
                    "snapshot {id} holds the state of snapshotted instance {}; restore or delete the instance first",
                    vm.id
                )));
            }
        }
        self.remove_snapshot(&snap).await
    }

    /// Removes a snapshot's objects, then its row (once no restore reads it).
    pub(super) async fn remove_snapshot(&self, snap: &Snapshot) -> Result<()> {
        let id = &snap.id;
        let lock = self.snap_lock(id);
        let _w = lock.write().await;
        let keys = [
            Some(&snap.state_key),
            Some(&snap.memory_key),
            Some(&snap.disk_key),
            snap.compressed_key.as_ref(),
        ];
        for key in keys.into_iter().flatten().filter(|k| !k.is_empty()) {
            self.objects
                .delete(key)
                .await
                .map_err(|e| ManagerError::Internal(format!("deleting snapshot {id}: {e}")))?;
        }
        self.store.delete_snapshot(id).await?;
        self.snap_locks.lock().unwrap().remove(id);
        Ok(())
    }

    /// Deletes every snapshot of a VM, objects first.
    pub(super) async fn delete_vm_snapshots(&self, vm_id: &str) -> Result<()> {
        self.objects
            .delete_prefix(&snapshot::prefix_of_vm(vm_id))
            .await
            .map_err(|e| ManagerError::Internal(format!("deleting snapshots of {vm_id}: {e}")))?;
        self.store.delete_vm_snapshots(vm_id).await?;
        Ok(())
    }
}
