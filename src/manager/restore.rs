//! Restore: a VM resumed from its standby snapshot or from one it chose.

use super::backend::SavedMemory;
use super::requests::{FromSnapshot, SnapshotKind, TargetState};
use super::snapshots::{stored, DiskSwap};
use super::state::VmState;
use super::{Context, Manager, ManagerError, Result};
use crate::image;
use crate::snapshot::ObjectError;
use crate::store::{Owner, Snapshot, Vm, DISK, MEMORY};
use crate::telemetry::Operation;
use crate::vmm::fifo::{grow_pipe, make_fifo};
use crate::vmm::{self, confine, Vmm};
use std::path::Path;
use std::sync::Arc;

impl Manager {
    /// Hatch's `POST /vms/{id}/restore`: the VM continues from the snapshot it
    /// went to standby in (its most recent). A missing or corrupt object fails
    /// the restore before anything changes: the VM stays `snapshotted`.
    pub async fn restore_vm(self: &Arc<Self>, owner: &Owner, id: &str) -> Result<Vm> {
        let (_guard, mut vm) = self.lock_visible_vm(owner, id).await?;
        let st = vm.state;
        if st != VmState::Snapshotted {
            return Err(ManagerError::Conflict(format!(
                "vm {id} is {st}; only a snapshotted VM can be restored"
            )));
        }
        self.backend_or_reject(&vm)?;
        let snap = self
            .standby_snapshot(&vm)
            .await?
            .ok_or_else(|| ManagerError::Conflict(format!("vm {id} has no snapshot to restore")))?;
        let timer = self.telemetry.timer(Operation::Restore);
        self.resume_from(&mut vm, &snap).await?;
        timer.succeeded();
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
            vm.state,
            vm.standby_snapshot_id.clone(),
            vm.inner_ip,
            vm.inner_mac,
            vm.guest_principal.clone(),
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
            self.adopt_memory_principal(vm, snap).await?;
            self.transition(vm, VmState::Starting, None).await?;
        }
        match self.load_standby(vm, snap).await {
            Ok(()) => {
                self.store.set_vm_standby(&id, None).await?;
                vm.standby_snapshot_id = None;
                self.transition(vm, VmState::Running, None).await?;
                self.refresh_forwards().await;
                tracing::info!(vm = %id, snapshot = %snap.id, "restored");
                // A fork's first wake: its guest learns its own id.
                self.tell_guest_its_id(vm).await;
                Ok(())
            }
            Err(e) => {
                let (state, standby, ip, mac, principal) = before;
                self.store.set_vm_standby(&id, standby.as_deref()).await?;
                self.store
                    .set_vm_guest_principal(&id, principal.as_deref())
                    .await?;
                vm.guest_principal = principal;
                vm.standby_snapshot_id = standby;
                self.store.set_vm_inner_address(&id, ip, mac).await?;
                vm.inner_ip = ip;
                vm.inner_mac = mac;
                let e = e.context(format!(
                    "restoring vm {id} from {} failed, the VM stays {state}",
                    snap.id
                ));
                let msg = e.to_string();
                let last_error = (state == VmState::Error).then_some(msg.as_str());
                self.transition(vm, state, last_error).await?;
                Err(e)
            }
        }
    }

    /// A VM whose memory comes from `snap` believes it has the address the
    /// snapshot's guest had. When that is not its own (a fork), it runs behind
    /// an isolation that translates between the two (see src/net/README.md).
    pub(super) async fn adopt_memory_address(&self, vm: &mut Vm, snap: &Snapshot) -> Result<()> {
        let (ip, mac) = snap.vm_config.memory_address();
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
            .set_vm_inner_address(&vm.id, inner_ip, inner_mac)
            .await?;
        vm.inner_ip = inner_ip;
        vm.inner_mac = inner_mac;
        Ok(())
    }

    /// Moves `vm` to `snapshotted`, resuming from `snap` (VM lock held).
    pub(super) async fn settle_standby(&self, vm: &mut Vm, snap: &Snapshot) -> Result<()> {
        self.store.set_vm_standby(&vm.id, Some(&snap.id)).await?;
        vm.standby_snapshot_id = Some(snap.id.clone());
        if vm.state != VmState::Snapshotted {
            self.transition(vm, VmState::Snapshotted, None).await?;
        }
        Ok(())
    }

    /// Downloads and verifies the snapshot's disk (and its device state
    /// when `state`) into `dir`, converts the disk to `backend`'s format when
    /// the snapshot's backend keeps another (a Stopped snapshot moving
    /// backends), then puts it in place as `vm`'s disk on `backend`. The
    /// VM's previous disk is kept until the swap is committed (then it goes,
    /// also one its previous backend kept in another format) or rolled back.
    pub(super) async fn fetch(
        &self,
        snap: &Snapshot,
        vm: &Vm,
        backend: &dyn Vmm,
        dir: &Path,
        state: bool,
    ) -> Result<DiskSwap> {
        if state {
            Self::check_same_backend(snap, &vm.id, backend.name())
                .map_err(ManagerError::BadRequest)?;
        }
        let to = backend.capabilities().disk_format;
        // Known by the snapshot's backend's name, never guessed from the disk.
        let from = if snap.source_hypervisor == backend.name() {
            to
        } else {
            vmm::disk_format_of(&snap.source_hypervisor).ok_or_else(|| {
                ManagerError::BadRequest(format!(
                    "snapshot {} was taken on {}, whose disk format this daemon does not know",
                    snap.id, snap.source_hypervisor
                ))
            })?
        };
        let work_dir = self.work_dir(&vm.id);
        tokio::fs::create_dir_all(dir).await?;
        if state {
            self.objects
                .get_file(
                    &snap.state_key,
                    &backend.snapshot_files(dir).state,
                    &stored(&snap.state_sha256, snap.state_size),
                )
                .await?;
        }
        let disk_chunks = self.manifest(snap, DISK).await?;
        let fetched = if from == to {
            let fetched = backend.disk_path(dir);
            self.objects
                .get_chunked_file(&snap.owner_id, &disk_chunks, &fetched)
                .await?;
            fetched
        } else {
            // The conversion sees these two directories and the image, nothing else.
            let (input, out) = (dir.join("in"), dir.join("out"));
            tokio::fs::create_dir_all(&input).await?;
            tokio::fs::create_dir_all(&out).await?;
            let source = from.path_in(&input);
            self.objects
                .get_chunked_file(&snap.owner_id, &disk_chunks, &source)
                .await?;
            let rootfs = image::rootfs_in(Path::new(&vm.image_dir));
            let converted = vmm::disk::convert(&vmm::disk::Conversion {
                input: &source,
                from,
                to,
                out_dir: &out,
                rootfs: &rootfs,
                stored: image::rootfs_format(&rootfs),
                hide: &[confine::hiding_root(&self.config.data_dir)],
            })
            .await
            .map_err(ManagerError::from)
            .context(|| {
                format!(
                    "converting the disk of snapshot {} from {} for {}",
                    snap.id,
                    snap.source_hypervisor,
                    backend.name()
                )
            })?;
            // The backend names its disk; the converted file takes that name.
            let named = backend.disk_path(&out);
            if converted != named {
                tokio::fs::rename(&converted, &named).await?;
            }
            named
        };
        tokio::fs::create_dir_all(&work_dir).await?;
        // Everything arrived intact: only now is the VM's disk replaced.
        let disk = backend.disk_path(&work_dir);
        let mut backup = disk.clone().into_os_string();
        backup.push(".before-restore");
        let backup = std::path::PathBuf::from(backup);
        let had_disk = match tokio::fs::rename(&disk, &backup).await {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(ManagerError::from(e).context("keeping the current disk")),
        };
        if let Err(e) = tokio::fs::rename(&fetched, &disk).await {
            if had_disk {
                let _ = tokio::fs::rename(&backup, &disk).await;
            }
            return Err(e.into());
        }
        // The disk the VM had on its previous backend, under that backend's name.
        let previous = match self.backend_for(vm) {
            Ok(b) => Some(b.disk_path(&work_dir)),
            Err(_) => vmm::disk_format_of(&vm.hypervisor).map(|f| f.path_in(&work_dir)),
        };
        Ok(DiskSwap {
            backup: had_disk.then_some(backup),
            previous: previous.filter(|p| *p != disk),
            disk,
            in_place: false,
        })
    }

    /// The stream of `snap`'s memory chunks into the FIFO at `fifo`, each
    /// verified before its bytes go in.
    pub(super) async fn memory_feed(
        &self,
        snap: &Snapshot,
        fifo: &Path,
    ) -> Result<super::MemoryFeed> {
        make_fifo(fifo).context(|| "memory pipe".into())?;
        let chunks = self.manifest(snap, MEMORY).await?;
        // Read-write: opening never waits for (or fails without) the VMM's
        // reader; once we close it, the reader sees the end of the stream.
        let mut tx = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(fifo)
            .context(|| "memory pipe".into())?;
        grow_pipe(&tx);
        let objects = self.objects.clone();
        let owner = snap.owner_id.clone();
        Ok(Box::pin(async move {
            let sent = objects.get_chunked(&owner, &chunks, &mut tx).await;
            drop(tx);
            Ok(sent?)
        }))
    }

    /// Verified state and disk in place, then the memory given to a new VMM
    /// for `vm`, which resumes: streamed (and verified as it goes), or, for a
    /// backend that maps a memory file, fetched and verified whole before the
    /// VMM starts. On failure the VM's disk is as it was. The restore
    /// directory goes either way (a VMM that maps the memory keeps its mapping).
    pub(super) async fn load_standby(self: &Arc<Self>, vm: &Vm, snap: &Snapshot) -> Result<()> {
        let backend = self.backend_for(vm)?;
        let memory =
            Self::check_standby_support(backend.as_ref()).map_err(ManagerError::BadRequest)?;
        let work_dir = self.work_dir(&vm.id);
        let dir = work_dir.join(format!("restore-{}", snap.id));
        let result = async {
            let mut files = backend.snapshot_files(&dir);
            // Held until the VMM has mapped it (`boot_from` returns).
            let mut _ram = None;
            // The VM's own sleep, still hot: its RAM, device state and disk
            // are where they were; only a disk that changed is fetched.
            let hot = self
                .hot
                .take(&vm.id, &snap.id)
                .filter(|_| memory == SavedMemory::File);
            self.telemetry.restoring(hot.is_some());
            self.telemetry.hot_copies(self.hot.total());
            let swap = match hot {
                Some(hot) => {
                    tokio::fs::create_dir_all(&dir).await?;
                    tokio::fs::write(&files.state, &hot.state).await?;
                    match hot.file {
                        // Mapped privately: the file itself is what the VMM loads.
                        Some(file) => file.move_to(&files.memory)?,
                        None => {
                            files.memory = crate::vmm::ram::path_of(&hot.ram);
                            _ram = Some(hot.ram);
                        }
                    }
                    let disk = backend.disk_path(&work_dir);
                    let in_place = hot.disk.is_some() && super::hot::DiskStamp::of(&disk) == hot.disk;
                    tracing::info!(vm = %vm.id, snapshot = %snap.id, disk_in_place = in_place, "restoring from the hot copy");
                    if in_place {
                        DiskSwap::in_place(disk)
                    } else {
                        self.fetch(snap, vm, backend.as_ref(), &dir, false).await?
                    }
                }
                None => {
                    if memory == SavedMemory::File {
                        // First: a corrupt or missing memory object changes nothing.
                        tokio::fs::create_dir_all(&dir).await?;
                        if backend.capabilities().shared_ram {
                            // Straight into the guest's RAM to be, with no file between.
                            let ram = self.fetch_memory_ram(snap).await?;
                            files.memory = crate::vmm::ram::path_of(&ram);
                            _ram = Some(ram);
                        } else {
                            self.fetch_memory_file(snap, &files.memory).await?;
                        }
                    }
                    self.fetch(snap, vm, backend.as_ref(), &dir, true).await?
                }
            };
            let feed = match memory {
                SavedMemory::Stream => self.memory_feed(snap, &files.memory).await,
                // Already there and verified: nothing left to send.
                SavedMemory::File => Ok(Box::pin(std::future::ready(Ok(()))) as super::MemoryFeed),
            };
            let loaded = match feed {
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
                    Err(match memory {
                        SavedMemory::Stream => self.explain_load_failure(snap, e).await,
                        // The memory was verified before the VMM saw it.
                        SavedMemory::File => e,
                    })
                }
            }
        }
        .await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        result
    }

    /// `snap`'s memory into the regular file `dest`, every chunk verified;
    /// `dest` appears only if all were.
    pub(super) async fn fetch_memory_file(&self, snap: &Snapshot, dest: &Path) -> Result<()> {
        let chunks = self.manifest(snap, MEMORY).await?;
        self.objects
            .get_chunked_file(&snap.owner_id, &chunks, dest)
            .await?;
        Ok(())
    }

    /// `snap`'s memory in new guest RAM (a memfd, `vmm::ram`), every chunk
    /// verified; on error the memory goes.
    pub(super) async fn fetch_memory_ram(&self, snap: &Snapshot) -> Result<std::fs::File> {
        let chunks = self.manifest(snap, MEMORY).await?;
        let ram = std::sync::Arc::new(
            crate::vmm::ram::create(0).context(|| "guest RAM for the restore".into())?,
        );
        self.objects
            .get_chunked_into(&snap.owner_id, &chunks, std::sync::Arc::clone(&ram))
            .await?;
        // The fetch keeps no copy once done; were one left, a dup is as good.
        std::sync::Arc::try_unwrap(ram)
            .or_else(|shared| shared.try_clone())
            .context(|| "guest RAM for the restore".into())
    }

    /// A VMM that could not load streamed memory says little about why; when
    /// the stored memory itself is corrupt or missing, that is the reason to give.
    pub(super) async fn explain_load_failure(
        &self,
        snap: &Snapshot,
        error: ManagerError,
    ) -> ManagerError {
        if let Some(ObjectError::Corrupt { .. } | ObjectError::Missing(_)) = error.object_error() {
            return error;
        }
        let checked = async {
            let chunks = self.manifest(snap, MEMORY).await?;
            self.objects
                .get_chunked(&snap.owner_id, &chunks, &mut tokio::io::sink())
                .await?;
            Ok::<_, ManagerError>(())
        }
        .await;
        match checked {
            Err(e) => e,
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
        let kind = snap.kind;
        let target = req
            .target(kind, &self.backends.names())
            .map_err(ManagerError::BadRequest)?;
        // Where the instance runs afterwards: `target_hypervisor` (a Stopped
        // snapshot's disk is converted for it), else where it runs now.
        let backend = match req.target_hypervisor.as_deref() {
            Some(h) => self
                .backends
                .get(h)
                .map_err(|e| ManagerError::BadRequest(format!("target_hypervisor: {e}")))?,
            None => self.backend_or_reject(&vm)?,
        };
        if kind == SnapshotKind::Standby {
            // Its memory (and disk) load only on the backend that saved them.
            Self::check_same_backend(&snap, &vm.id, backend.name())
                .map_err(ManagerError::BadRequest)?;
        }
        if backend.name() != vm.hypervisor {
            Self::check_kernel(backend.as_ref(), Path::new(&vm.image_dir))
                .map_err(|e| ManagerError::BadRequest(format!("target_hypervisor: {e}")))?;
        }
        let st = vm.state;
        if !matches!(st, VmState::Stopped | VmState::Snapshotted | VmState::Error) {
            return Err(ManagerError::Conflict(format!(
                "instance {id} is {st}; stop it or put it in standby before restoring a snapshot"
            )));
        }
        if target == TargetState::Running {
            // Before the disk is swapped; booting checks again under the admission lock.
            self.check_host_memory(&vm).await?;
        }
        let timer = self.telemetry.timer(Operation::Restore);
        // Whatever is left of an earlier VMM (a VM in error) goes first.
        self.end_vmm(&vm, false).await;
        // Only a resume can use the VM's hot copy (if it is of this
        // snapshot, `load_standby`); any other target leaves it stale.
        if (kind, target) != (SnapshotKind::Standby, TargetState::Running) && self.hot.drop_vm(id) {
            self.telemetry.hot_copies(self.hot.total());
        }
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
                let dir = self.work_dir(id).join(format!("restore-{}", snap.id));
                let fetched = self.fetch(&snap, &vm, backend.as_ref(), &dir, false).await;
                let _ = tokio::fs::remove_dir_all(&dir).await;
                let unchanged =
                    || format!("restoring instance {id} from {snap_id} failed, it is unchanged");
                let swap = fetched.context(unchanged)?;
                if backend.name() != vm.hypervisor {
                    // The disk in place is the new backend's: so is the VM now.
                    if let Err(e) = self.store.set_vm_hypervisor(id, backend.name()).await {
                        swap.rollback().await;
                        return Err(ManagerError::from(e).context(unchanged()));
                    }
                    tracing::info!(vm = id, from = %vm.hypervisor, to = backend.name(), "moved to another hypervisor");
                    vm.hypervisor = backend.name().into();
                }
                swap.commit().await;
                self.store.set_vm_standby(id, None).await?;
                vm.standby_snapshot_id = None;
                if vm.state != VmState::Stopped {
                    self.transition(&mut vm, VmState::Stopped, None).await?;
                }
                if target == TargetState::Running {
                    self.start_locked(&mut vm).await?;
                }
            }
        }
        timer.succeeded();
        tracing::info!(vm = id, snapshot = snap_id, state = %vm.state, "restored from snapshot");
        Ok(vm)
    }
}
