//! Fork: a new VM from a snapshot, beside its source.

use super::requests::{FromSnapshot, SnapshotKind, TargetState};
use super::state::{CompressionState, VmState};
use super::{not_found, Context, Manager, ManagerError, Result};
use crate::domain::{Json, Tags};
use crate::ids;
use crate::snapshot::{self};
use crate::store::{NewVm, Owner, Snapshot, Vm, DISK, MEMORY};
use crate::telemetry::Operation;
use std::sync::Arc;

/// How `copy_snapshot` labels its copy. A fork's own copy has no name or
/// tags and keeps its source's compression.
#[derive(Default)]
pub(super) struct CopyAs {
    pub(super) name: Option<String>,
    pub(super) tags: Tags,
    /// The copy's compression when its source's memory is raw (a compressed
    /// one is copied compressed, keeping its source's).
    pub(super) compression: Option<crate::snapshot::CompressionConfig>,
}

impl Manager {
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
        let kind = snap.kind;
        let target = req
            .target(kind, &self.backends.names())
            .map_err(ManagerError::BadRequest)?;
        // The fork runs where its snapshot was taken, or (a Stopped snapshot,
        // whose disk is converted) on `target_hypervisor`.
        let hypervisor = req
            .target_hypervisor
            .as_deref()
            .unwrap_or(&snap.source_hypervisor);
        let backend = self
            .backends
            .get(hypervisor)
            .map_err(|e| ManagerError::BadRequest(format!("snapshot {snap_id}: {e}")))?;
        let source = self
            .store
            .get_vm(&snap.vm_id)
            .await?
            .ok_or_else(|| not_found("instance", &snap.vm_id))?;
        if backend.name() != snap.source_hypervisor {
            Self::check_kernel(backend.as_ref(), std::path::Path::new(&source.image_dir))
                .map_err(|e| ManagerError::BadRequest(format!("target_hypervisor: {e}")))?;
        }
        let saved = &snap.vm_config;
        let mut vm = Vm::new(NewVm {
            owner_id: owner.id.clone(),
            image_id: source.image_id.clone(),
            image_dir: source.image_dir.clone(),
            template_id: None,
            vcpu_count: saved.vcpu_count.unwrap_or(source.vcpu_count),
            mem_mib: saved.mem_mib.unwrap_or(source.mem_mib),
            boot_args: saved.boot_args.clone().unwrap_or(source.boot_args.clone()),
            enable_network: saved.enable_network.unwrap_or(source.enable_network),
            user_data: saved.user_data.clone().or(source.user_data.clone()),
            hypervisor: backend.name().into(),
            name: Some(name),
            snapshot_compression: source.snapshot_compression.clone(),
            auto_sleep: source.auto_sleep,
            idle_timeout_seconds: source.idle_timeout_seconds,
        });
        // A fork kept in Standby gets a snapshot of its own: a copy of the
        // device state, sharing the chunks.
        let copies = match (kind, target) {
            (SnapshotKind::Standby, TargetState::Standby) => {
                snap.state_size.unwrap_or(0).max(0) as u64
            }
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
        let timer = self.telemetry.timer(Operation::Fork);
        let result = self
            .prepare_fork(&mut vm, &source, &snap, kind, target)
            .await;
        match result {
            Ok(()) => {
                timer.succeeded();
                tracing::info!(vm = %vm.id, snapshot = snap_id, state = %vm.state, "forked");
                Ok(vm)
            }
            Err(e) => {
                let e = e.context(format!("fork {} of snapshot {snap_id} failed", vm.id));
                if vm.state.is_transient() {
                    self.transition(&mut vm, VmState::Error, Some(&e.to_string()))
                        .await?;
                }
                Err(e)
            }
        }
    }

    /// Fills the fork's work directory and brings it to `target`.
    pub(super) async fn prepare_fork(
        self: &Arc<Self>,
        vm: &mut Vm,
        source: &Vm,
        snap: &Snapshot,
        kind: SnapshotKind,
        target: TargetState,
    ) -> Result<()> {
        let work_dir = self.work_dir(&vm.id);
        tokio::fs::create_dir_all(&work_dir)
            .await
            .context(|| "creating work directory".into())?;
        // A restored guest needs the devices it was saved with: the seed disk
        // is attached when the source had one. A fresh boot reads the fork's
        // own; a memory, what it believes (see `write_seed_for`).
        if self.work_dir(&source.id).join("seed.iso").exists() || kind == SnapshotKind::Stopped {
            let memory = (kind == SnapshotKind::Standby).then_some(snap);
            self.write_seed_for(vm, &work_dir, memory).await?;
        }
        match (kind, target) {
            (SnapshotKind::Standby, TargetState::Standby) => {
                // The fork sleeps in a snapshot of its own, so deleting the
                // source (and its snapshots) never takes the fork's memory away.
                let own = self.copy_snapshot(snap, vm, CopyAs::default()).await?;
                self.settle_standby_new(vm, &own).await
            }
            (SnapshotKind::Standby, TargetState::Running) => {
                let (_r, snap) = self.read_locked(snap).await?;
                let snap = &snap;
                self.adopt_memory_address(vm, snap).await?;
                self.adopt_memory_principal(vm, snap).await?;
                self.load_standby(vm, snap).await?;
                self.transition(vm, VmState::Running, None).await?;
                self.refresh_forwards().await;
                // Its guest still trusts the source's id: tell it its own.
                self.tell_guest_its_id(vm).await;
                Ok(())
            }
            (_, target) => {
                let (_r, snap) = self.read_locked(snap).await?;
                let dir = work_dir.join(format!("restore-{}", snap.id));
                let backend = self.backend_for(vm)?;
                let fetched = self.fetch(&snap, vm, backend.as_ref(), &dir, false).await;
                let _ = tokio::fs::remove_dir_all(&dir).await;
                fetched?.commit().await;
                if target == TargetState::Running {
                    self.boot(vm).await?;
                    self.transition(vm, VmState::Running, None).await?;
                    self.refresh_forwards().await;
                } else {
                    self.transition(vm, VmState::Stopped, None).await?;
                }
                Ok(())
            }
        }
    }

    /// A new VM's first state is standby on its own snapshot `own`.
    pub(super) async fn settle_standby_new(&self, vm: &mut Vm, own: &Snapshot) -> Result<()> {
        self.store.set_vm_standby(&vm.id, Some(&own.id)).await?;
        vm.standby_snapshot_id = Some(own.id.clone());
        self.transition(vm, VmState::Snapshotted, None).await
    }

    /// A new snapshot owned by `vm` with `snap`'s content: its device state
    /// copied (store-side), its manifests shared (no chunk is copied).
    pub(super) async fn copy_snapshot(
        &self,
        snap: &Snapshot,
        vm: &Vm,
        copy_as: CopyAs,
    ) -> Result<Snapshot> {
        let (_r, snap) = self.read_locked(snap).await?;
        let new_id = ids::new_id("snap");
        let mut own = snapshot::capturing_record(
            &new_id,
            &vm.id,
            &vm.owner_id,
            snap.kind,
            &snap.source_hypervisor,
            snap.vm_config.0.clone(),
        );
        own.source_instance_name = vm.name.clone();
        // The copy belongs to `vm`, but its memory still trusts what the
        // original's did (an older row records nothing: its own VM's id).
        if own.vm_config.guest_principal.is_none() {
            own.vm_config.guest_principal = Some(snap.vm_id.clone());
        }
        own.compression = snap.compression.clone();
        own.name = copy_as.name;
        own.tags = Json(copy_as.tags);
        // A compressed memory is copied as it is stored, keeping its compression.
        if let Some(c) = copy_as.compression {
            if snap.compression_state != CompressionState::Compressed {
                own.compression = Some(Json(c));
            }
        }
        // A duplicate name fails here, before anything is copied.
        self.store.insert_snapshot(&own).await?;
        let copied = async {
            let mut parts = vec![];
            for part in [DISK, MEMORY] {
                let entries = self.store.manifest_entries(&snap, part).await?;
                if part == DISK || !entries.is_empty() {
                    parts.push((part, entries));
                }
            }
            if !snap.state_key.is_empty() {
                self.objects.copy(&snap.state_key, &own.state_key).await?;
            }
            own.state_sha256 = snap.state_sha256.clone();
            own.state_size = snap.state_size;
            own.memory_sha256 = snap.memory_sha256.clone();
            own.memory_size = snap.memory_size;
            own.disk_sha256 = snap.disk_sha256.clone();
            own.disk_size = snap.disk_size;
            let parts: Vec<(&str, &[crate::snapshot::ChunkRef])> =
                parts.iter().map(|(p, e)| (*p, e.as_slice())).collect();
            self.store
                .commit_chunked_snapshot(&mut own, &[], &parts)
                .await?;
            Ok::<_, ManagerError>(())
        }
        .await;
        if let Err(e) = copied {
            let _ = self.objects.delete(&own.state_key).await;
            self.store.delete_snapshot(&new_id).await?;
            return Err(e.context(format!("copying snapshot {}", snap.id)));
        }
        if snap.compression_state == CompressionState::Compressed {
            own.compression_state = CompressionState::Compressed;
            own.compressed_size_bytes = snap.compressed_size_bytes;
            self.store
                .set_snapshot_compression(&own, CompressionState::None)
                .await?;
        }
        Ok(own)
    }
}
