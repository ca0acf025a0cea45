//! Snapshot capture: Standby (memory, CPU and disk of a paused guest) and Stopped (the disk alone).

use super::backend::SavedMemory;
use super::chunks::ChunkedCapture;
use super::quotas::SnapshotQuota;
use super::requests::{CreateSnapshot, SnapshotKind};
use super::state::{CompressionState, VmState};
use super::{Context, Manager, ManagerError, Result};
use crate::domain::Json;
use crate::ids;
use crate::snapshot::{self, CompressionConfig};
use crate::store::{Owner, Snapshot, Vm};
use crate::vmm::{fifo::MemoryPipe, VmSpec, Vmm};
use std::path::Path;
use std::sync::Arc;

/// What a capture keeps for a hot copy: the guest's RAM open, where a
/// backend that maps its memory file privately keeps that file (None: the
/// RAM is the VMM's shared memory), and the saved device state.
pub(super) type HotParts = ((std::fs::File, Option<super::hot::HotFile>), Vec<u8>);

/// What a Standby capture keeps of the guest's memory as a hot copy (hot.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeepHot {
    No,
    /// The VMM ends after the capture: its RAM itself (or its memory file).
    Own,
    /// The guest runs on (a checkpoint): a copy of its RAM made while it is
    /// paused, so that its later writes never reach the copy. A VMM that
    /// saves its memory to a file of its own needs no copy: that file is it.
    Copy,
}

impl Manager {
    /// Hatch's `POST /vms/{id}/snapshot`: a Standby snapshot with the VM's
    /// (or the server's) compression default.
    /// The VM ends `snapshotted` (as idle sleep does); Hypeman's Standby
    /// keeps it running instead (checkpoint.rs).
    pub async fn snapshot_vm(self: &Arc<Self>, owner: &Owner, id: &str) -> Result<Snapshot> {
        let req = CreateSnapshot {
            kind: Some("Standby".into()),
            ..Default::default()
        };
        let kind = req.validate().map_err(ManagerError::BadRequest)?;
        let (_guard, mut vm) = self.lock_visible_vm(owner, id).await?;
        self.snapshot_locked(&mut vm, kind, &req, SnapshotQuota::Enforced)
            .await
    }

    /// Hypeman's `POST /instances/{id}/snapshots`. Standby: a checkpoint
    /// (checkpoint.rs): memory, CPU/device state and disk, captured while the
    /// guest is paused, after which it runs on in the same VMM (or, in
    /// standby, a copy of its standby snapshot). Stopped: the guest is
    /// powered off first and only its disk is stored; the VM ends `stopped`.
    /// Returns once the snapshot is durable; compression, if asked for,
    /// continues in the background.
    pub async fn create_snapshot(
        self: &Arc<Self>,
        owner: &Owner,
        id: &str,
        req: CreateSnapshot,
    ) -> Result<Snapshot> {
        let kind = req.validate().map_err(ManagerError::BadRequest)?;
        let (_guard, mut vm) = self.lock_visible_vm(owner, id).await?;
        match kind {
            SnapshotKind::Standby => self.checkpoint_locked(&mut vm, &req).await,
            SnapshotKind::Stopped => {
                self.snapshot_locked(&mut vm, kind, &req, SnapshotQuota::Enforced)
                    .await
            }
        }
    }

    /// Takes a snapshot of `vm` (its lock held); a Standby one leaves the VM
    /// `snapshotted` (Hatch's snapshot, idle sleep). `quota` says whether the
    /// owner's snapshot limits may refuse it.
    pub(super) async fn snapshot_locked(
        self: &Arc<Self>,
        vm: &mut Vm,
        kind: SnapshotKind,
        req: &CreateSnapshot,
        quota: SnapshotQuota,
    ) -> Result<Snapshot> {
        let then = super::checkpoint::AfterCapture::Standby;
        self.take_snapshot(vm, kind, req, quota, then).await
    }

    /// `snapshot_locked`, with what a Standby capture does with the guest
    /// once its snapshot is stored (`then`).
    pub(super) async fn take_snapshot(
        self: &Arc<Self>,
        vm: &mut Vm,
        kind: SnapshotKind,
        req: &CreateSnapshot,
        quota: SnapshotQuota,
        then: super::checkpoint::AfterCapture,
    ) -> Result<Snapshot> {
        let id = vm.id.clone();
        let st = vm.state;
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
        let backend = self.backend_or_reject(vm)?;
        if kind == SnapshotKind::Standby {
            Self::check_standby_support(backend.as_ref()).map_err(ManagerError::BadRequest)?;
        }
        let snap_id = ids::new_id("snap");
        let mut snap = snapshot::capturing_record(
            &snap_id,
            &vm.id,
            &vm.owner_id,
            kind,
            &vm.hypervisor,
            Self::vm_config(vm),
        );
        snap.name = req.name.clone();
        snap.tags = Json(req.tags.clone().unwrap_or_default());
        snap.source_instance_name = vm.name.clone();
        let compression = match kind {
            SnapshotKind::Standby => self.compression_for(vm, req.compression.as_ref()),
            SnapshotKind::Stopped => CompressionConfig::default(),
        };
        snap.compression = Some(Json(compression.clone()));
        if kind == SnapshotKind::Stopped {
            // Disk only: there is no memory or device state to point at.
            snap.state_key.clear();
            snap.memory_key.clear();
        }
        {
            // What a capture adds is known only once its chunks are compared
            // with the owner's (often little: what changed since the last
            // one). Up front, an owner already at the limit is refused; the
            // rest is checked after the capture, before anything is committed.
            self.collect_for_quota(&vm.owner_id, quota, 0).await;
            let _admission = self.alloc_lock.lock().await;
            self.admit_snapshot(vm, quota, 0).await?;
            // A duplicate name fails here, before the guest is touched.
            self.store.insert_snapshot(&snap).await?;
        }
        let result = match kind {
            SnapshotKind::Standby => {
                self.capture_standby(backend.as_ref(), vm, &mut snap, quota, then)
                    .await
            }
            SnapshotKind::Stopped => {
                self.capture_stopped(backend.as_ref(), vm, &mut snap, quota)
                    .await
            }
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
            snap.compression_state = CompressionState::Compressing;
            self.store
                .set_snapshot_compression(&snap, CompressionState::None)
                .await?;
            self.spawn_compression(snap.clone());
        }
        tracing::info!(vm = %id, snapshot = %snap_id, kind = kind.as_str(), bytes = snap.size_bytes, "snapshot stored");
        Ok(snap)
    }

    /// Standby capture. The guest stays paused until every object is stored;
    /// any failure before that resumes it, so nothing is lost. Stored, the
    /// VM goes to standby on it, or (`AfterCapture::Resume`) is left paused
    /// in its VMM for the caller to resume.
    pub(super) async fn capture_standby(
        &self,
        backend: &dyn Vmm,
        vm: &mut Vm,
        snap: &mut Snapshot,
        quota: SnapshotQuota,
        then: super::checkpoint::AfterCapture,
    ) -> Result<()> {
        // Proxied requests wait for a wake instead of reaching a guest about to pause.
        let _pausing = self.activity.pause(&vm.id);
        // SSH too: its port is the daemon's from before the guest pauses.
        self.gateway_take_over(vm).await;
        let spec = self.spec_for(vm, backend);
        let dir = self.work_dir(&vm.id).join(format!("capture-{}", snap.id));
        // A guest that goes to sleep leaves its RAM as a hot copy for its
        // wake; a checkpoint keeps a copy of it for a restore to that moment.
        let keep = match then {
            _ if self.config.idle.hot_sleep.is_zero()
                || backend.capabilities().memory != crate::vmm::MemoryTransport::MappedFile =>
            {
                KeepHot::No
            }
            super::checkpoint::AfterCapture::Standby => KeepHot::Own,
            super::checkpoint::AfterCapture::Resume if self.room_for_copy(vm) => KeepHot::Copy,
            super::checkpoint::AfterCapture::Resume => KeepHot::No,
        };
        let captured = self.capture(backend, &spec, &dir, snap, keep).await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        let captured =
            captured.context(|| format!("snapshot of vm {} failed, the VM keeps running", vm.id));
        // Only now is the memory's size known: does it still fit?
        let admission = self.alloc_lock.lock().await;
        let mut hot = None;
        let committed = match captured {
            Ok((cap, parts)) => match self
                .admit_stored(&vm.owner_id, quota, snap.size_bytes.max(0) as u64)
                .await
            {
                Ok(()) => {
                    hot = parts;
                    self.commit_chunked(snap, cap).await.map(|_| ())
                }
                Err(e) => {
                    self.abandon_chunked(cap).await;
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        drop(admission);
        if let Err(e) = committed {
            if matches!(e, ManagerError::Forbidden(_)) {
                tracing::info!(vm = %vm.id, snapshot = %snap.id, "snapshot refused after capture: {e}");
            }
            if let Err(r) = backend.resume(&spec).await {
                tracing::error!(vm = %vm.id, "resuming after a failed snapshot: {r}");
            }
            return Err(e);
        }
        // Recorded before the VMM ends: a crash from here on recovers as snapshotted.
        // (A checkpoint records nothing and keeps its VMM: the caller resumes it.)
        if then == super::checkpoint::AfterCapture::Resume {
            if let Some(((ram, file), state)) = hot {
                let bytes = ram.metadata().map(|m| m.len()).unwrap_or(0);
                // No disk stamp: the guest resumes and writes to its disk
                // at once, maybe within one tick of the file clock.
                self.hold_hot(vm, snap, (ram, file), state, bytes, None);
            }
            return Ok(());
        }
        self.store.set_vm_standby(&vm.id, Some(&snap.id)).await?;
        vm.standby_snapshot_id = Some(snap.id.clone());
        let pid = self.vmm_pid(&vm.id);
        self.end_vmm(vm, false).await;
        if let Some(((ram, file), state)) = hot {
            self.keep_hot(vm, backend, snap, pid, (ram, file), state)
                .await;
        }
        self.transition(vm, VmState::Snapshotted, None).await?;
        self.refresh_forwards().await;
        Ok(())
    }

    /// Keeps `ram` and `state` as `vm`'s hot copy of `snap`, once its VMM
    /// (`pid`) is gone, so this process alone holds the RAM.
    async fn keep_hot(
        &self,
        vm: &Vm,
        backend: &dyn Vmm,
        snap: &Snapshot,
        pid: Option<u32>,
        (ram, file): (std::fs::File, Option<super::hot::HotFile>),
        state: Vec<u8>,
    ) {
        let gone = pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists());
        let bytes = ram.metadata().map(|m| m.len()).unwrap_or(0);
        if !gone || bytes != (vm.mem_mib.max(0) as u64) << 20 {
            tracing::warn!(vm = %vm.id, ?pid, bytes, "no hot copy: the VMM is not gone or its RAM is not the guest's size");
            return;
        }
        let disk = super::hot::DiskStamp::of(&backend.disk_path(&self.work_dir(&vm.id)));
        self.hold_hot(vm, snap, (ram, file), state, bytes, disk);
    }

    /// Whether the host has room for a copy of `vm`'s RAM beside its floor
    /// of available memory (`HATCH_HOT_MIN_AVAILABLE`): a checkpoint's copy
    /// is made only then, never pushing the host into pressure.
    fn room_for_copy(&self, vm: &Vm) -> bool {
        let bytes = (vm.mem_mib.max(0) as u64) << 20;
        let Some(mem) = super::hot::HostMemory::read() else {
            return false;
        };
        let room = mem.available >= mem.floor(self.config.idle.hot_min_available) + bytes;
        if !room {
            tracing::info!(vm = %vm.id, available_mib = mem.available >> 20, "no hot copy for this checkpoint: the host is short of memory");
        }
        room
    }

    /// Keeps `ram` and `state` as `vm`'s hot copy of `snap` (any it had
    /// goes), then drops the oldest while all of them exceed `HATCH_HOT_MEMORY_MAX`.
    fn hold_hot(
        &self,
        vm: &Vm,
        snap: &Snapshot,
        (ram, file): (std::fs::File, Option<super::hot::HotFile>),
        state: Vec<u8>,
        bytes: u64,
        disk: Option<super::hot::DiskStamp>,
    ) {
        self.hot.keep(
            &vm.id,
            super::hot::HotCopy {
                snapshot_id: snap.id.clone(),
                ram,
                file,
                state,
                disk,
                bytes,
                since: std::time::Instant::now(),
            },
        );
        if let Some(max) = self.config.idle.hot_max_bytes {
            while self.hot.bytes_except("") > max {
                match self.hot.evict_oldest_except("") {
                    Some(id) => {
                        tracing::info!(vm = %id, "deep sleep: hot copies over HATCH_HOT_MEMORY_MAX")
                    }
                    None => break,
                }
            }
        }
        self.telemetry.hot_copies(self.hot.total());
        tracing::debug!(vm = %vm.id, snapshot = %snap.id, bytes, "hot copy kept");
    }

    /// Pauses and saves the guest, then stores state and disk. Memory moves
    /// as the backend saves it: streamed straight into the owner's chunks
    /// through a FIFO (never a whole copy on local disk or in RAM), or
    /// written whole into `dir` by the VMM and chunked from there. Memory and
    /// disk upload only the chunks the owner lacks; the device state is one
    /// small object. `snap.size_bytes` is what this capture added to the
    /// store until the commit sets the snapshot's own. The caller removes
    /// `dir`, and commits or abandons what is returned. With `keep`
    /// (a backend with `shared_ram`), also the guest's RAM, open, and the
    /// device state's bytes: the parts of a hot copy (hot.rs).
    pub(super) async fn capture(
        &self,
        backend: &dyn Vmm,
        spec: &VmSpec,
        dir: &Path,
        snap: &mut Snapshot,
        keep: KeepHot,
    ) -> Result<(ChunkedCapture, Option<HotParts>)> {
        let saved = Self::check_standby_support(backend).map_err(ManagerError::BadRequest)?;
        tokio::fs::create_dir_all(dir).await?;
        let files = backend.snapshot_files(dir);
        let mut cap = self.begin_chunked(&snap.owner_id).await?;
        let started = std::time::Instant::now();
        let mut hot = None;
        let stored = async {
            let memory = match saved {
                SavedMemory::Stream => {
                    let pipe = MemoryPipe::open(&files.memory).context(|| "memory pipe".into())?;
                    let (reader, keeper) = (pipe.reader, pipe.keeper);
                    let save = async {
                        let saved = backend.snapshot(spec, &files).await;
                        // The VMM's writer is done (or never came): let the reader see the end.
                        drop(keeper);
                        saved
                    };
                    let (saved, memory) = tokio::join!(save, self.chunk_stream(&mut cap, reader));
                    saved?;
                    memory?
                }
                SavedMemory::File => {
                    backend.snapshot(spec, &files).await?;
                    let shared = backend.capabilities().shared_ram;
                    let chunked = match keep {
                        KeepHot::Own if shared => {
                            hot = Some((std::fs::File::open(&files.memory)?, None));
                            self.chunk_file(&mut cap, &files.memory).await?
                        }
                        KeepHot::Copy if shared => {
                            // Copied in the kernel while it is chunked: the
                            // guest stays paused no longer than the chunking.
                            let ram = std::fs::File::open(&files.memory)?;
                            let copying = tokio::task::spawn_blocking(move || {
                                crate::vmm::ram::duplicate(&ram)
                            });
                            let (chunked, copy) =
                                tokio::join!(self.chunk_file(&mut cap, &files.memory), copying);
                            match copy {
                                Ok(Ok(copy)) => hot = Some((copy, None)),
                                Ok(Err(e)) => {
                                    tracing::warn!(snapshot = %snap.id, "no hot copy: copying the guest's RAM: {e}")
                                }
                                Err(e) => {
                                    tracing::warn!(snapshot = %snap.id, "no hot copy: copying the guest's RAM: {e}")
                                }
                            }
                            chunked?
                        }
                        _ => self.chunk_file(&mut cap, &files.memory).await?,
                    };
                    if keep != KeepHot::No && !shared {
                        // A VMM that maps its memory file privately restores
                        // from a file: this one stays, beside the VM's files,
                        // out of the capture directory that goes.
                        let kept =
                            super::hot::HotFile::keep(&files.memory, &spec.work_dir, &snap.id)?;
                        hot = Some((std::fs::File::open(kept.path())?, Some(kept)));
                    }
                    chunked
                }
            };
            let memory_done = started.elapsed();
            // The guest is paused and the VMM flushed the disk when saving completed.
            let state = self.objects.put_file(&snap.state_key, &files.state).await?;
            let hot_state = match hot.is_some() {
                true => Some(tokio::fs::read(&files.state).await?),
                false => None,
            };
            let state_done = started.elapsed();
            let disk = self.chunk_file(&mut cap, &spec.disk).await?;
            tracing::debug!(
                snapshot = %snap.id,
                memory_ms = memory_done.as_millis() as u64,
                state_ms = (state_done - memory_done).as_millis() as u64,
                disk_ms = (started.elapsed() - state_done).as_millis() as u64,
                "captured"
            );
            snap.state_sha256 = Some(state.sha256);
            snap.state_size = Some(state.size as i64);
            snap.memory_sha256 = memory.sha256;
            snap.memory_size = Some(memory.raw_size as i64);
            snap.disk_sha256 = disk.sha256;
            snap.disk_size = Some(disk.raw_size as i64);
            cap.memory = Some(memory.entries);
            cap.disk = disk.entries;
            snap.size_bytes = (state.size + cap.new_bytes()) as i64;
            Ok(hot_state)
        }
        .await;
        match stored {
            Ok(state) => Ok((cap, hot.zip(state))),
            Err(e) => {
                // A kept memory file goes with `hot`.
                self.abandon_chunked(cap).await;
                Err(e)
            }
        }
    }

    /// Stopped capture: the guest powers off (as a stop does), then its disk is stored.
    pub(super) async fn capture_stopped(
        &self,
        backend: &dyn Vmm,
        vm: &mut Vm,
        snap: &mut Snapshot,
        quota: SnapshotQuota,
    ) -> Result<()> {
        if vm.state == VmState::Running {
            self.stop_locked(vm).await?;
        }
        let disk = backend.disk_path(&self.work_dir(&vm.id));
        let mut cap = self.begin_chunked(&vm.owner_id).await?;
        let chunked = self.chunk_file(&mut cap, &disk).await.context(|| {
            format!(
                "snapshot of vm {} failed, the VM is stopped and its disk unchanged",
                vm.id
            )
        });
        let chunked = match chunked {
            Ok(c) => c,
            Err(e) => {
                self.abandon_chunked(cap).await;
                return Err(e);
            }
        };
        snap.disk_sha256 = chunked.sha256;
        snap.disk_size = Some(chunked.raw_size as i64);
        cap.disk = chunked.entries;
        let _admission = self.alloc_lock.lock().await;
        if let Err(e) = self
            .admit_stored(&vm.owner_id, quota, cap.new_bytes())
            .await
        {
            self.abandon_chunked(cap).await;
            return Err(e);
        }
        self.commit_chunked(snap, cap).await?;
        Ok(())
    }
}
