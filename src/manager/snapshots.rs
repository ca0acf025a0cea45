//! What every snapshot flow shares (the saved VM config, locks, reads and
//! deletion); the flows themselves are in capture.rs, compression.rs,
//! restore.rs and fork.rs.
//!
//! A snapshot row is `capturing` until every object is stored and
//! checksummed; only `ready` rows are ever listed or restored. A VM that is
//! `snapshotted` records the snapshot it resumes from (`standby_snapshot_id`),
//! set *before* its VMM is ended, so a crash in between is recovered as
//! `snapshotted`, not lost.

use super::state::VmState;
use super::{not_found, Context, Manager, ManagerError, Result};
use crate::domain::VmConfig;
use crate::snapshot::{self, CompressionConfig, Stored};
use crate::store::{Owner, Snapshot, Vm};
use std::sync::Arc;

pub(super) fn stored(sha: &Option<String>, size: Option<i64>) -> Stored {
    Stored {
        sha256: sha.clone().unwrap_or_default(),
        size: size.unwrap_or(0) as u64,
    }
}

pub(super) fn compression_of(snap: &Snapshot) -> CompressionConfig {
    snap.compression.as_deref().cloned().unwrap_or_default()
}

/// The snapshot's disk put in place of the VM's, the previous one kept
/// beside it until the restore either worked (commit) or did not (rollback).
pub(super) struct DiskSwap {
    pub(super) disk: std::path::PathBuf,
    pub(super) backup: Option<std::path::PathBuf>,
    /// The VM's disk under its previous backend's name, when the snapshot's
    /// disk went in for another backend: it goes at commit.
    pub(super) previous: Option<std::path::PathBuf>,
    /// The VM's own disk, used where it is (a wake from a hot copy whose
    /// disk stamp still matches): neither commit nor rollback touches it.
    pub(super) in_place: bool,
}

impl DiskSwap {
    /// The VM's disk at `disk`, as it is.
    pub(super) fn in_place(disk: std::path::PathBuf) -> DiskSwap {
        DiskSwap {
            disk,
            backup: None,
            previous: None,
            in_place: true,
        }
    }

    pub(super) async fn commit(self) {
        for old in [&self.backup, &self.previous].into_iter().flatten() {
            let _ = tokio::fs::remove_file(old).await;
        }
    }

    pub(super) async fn rollback(self) {
        if self.in_place {
            return;
        }
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

impl Manager {
    /// Takes `snap`'s read lock and reads its row again under it: compression
    /// may have changed how its chunks are stored since `snap` was read. A
    /// snapshot still in the format before chunks is converted first.
    pub(super) async fn read_locked(
        &self,
        snap: &Snapshot,
    ) -> Result<(tokio::sync::OwnedRwLockReadGuard<()>, Snapshot)> {
        loop {
            let guard = self.snap_lock(&snap.id).read_owned().await;
            let fresh = self
                .store
                .get_snapshot(&snap.id)
                .await?
                .ok_or_else(|| not_found("snapshot", &snap.id))?;
            if fresh.layout == crate::store::CHUNKED {
                return Ok((guard, fresh));
            }
            drop(guard);
            self.convert_snapshot(&fresh)
                .await
                .context(|| format!("reading snapshot {}", fresh.id))?;
        }
    }

    pub(super) fn snap_lock(&self, id: &str) -> Arc<tokio::sync::RwLock<()>> {
        let mut locks = self.snap_locks.lock().unwrap();
        Arc::clone(locks.entry(id.to_string()).or_default())
    }

    /// The VM's configuration as a snapshot records it (the Hatch API's `vm_config`).
    pub(super) fn vm_config(vm: &Vm) -> VmConfig {
        VmConfig {
            vcpu_count: Some(vm.vcpu_count),
            mem_mib: Some(vm.mem_mib),
            image_id: Some(vm.image_id.clone()),
            boot_args: Some(vm.boot_args.clone()),
            enable_network: Some(vm.enable_network),
            guest_ip: vm.guest_ip,
            guest_mac: vm.guest_mac,
            inner_ip: vm.inner_ip.or(vm.guest_ip),
            inner_mac: vm.inner_mac.or(vm.guest_mac),
            user_data: vm.user_data.clone(),
            name: vm.name.clone(),
            // What the guest's memory trusts at capture, so a fork of it (and
            // a fork of that fork) knows which principal logs in.
            guest_principal: Some(Self::trusted_principal(vm).to_string()),
        }
    }

    /// Request, else the VM's own default, else the server's (Hypeman API).
    pub(super) fn compression_for(
        &self,
        vm: &Vm,
        requested: Option<&CompressionConfig>,
    ) -> CompressionConfig {
        requested
            .cloned()
            .or_else(|| vm.snapshot_compression.as_deref().cloned())
            .unwrap_or_else(|| self.config.snapshot_compression.clone())
            .normalized()
    }

    /// Snapshots of a VM the owner can see, newest first.
    pub async fn list_vm_snapshots(&self, owner: &Owner, id: &str) -> Result<Vec<Snapshot>> {
        let vm = self.visible_vm(owner, id).await?;
        Ok(self.store.vm_snapshots(&vm.id).await?)
    }

    /// The owner's snapshots that pass `filter` (Hypeman `GET /snapshots`).
    pub async fn list_snapshots(
        &self,
        owner: &Owner,
        filter: &super::requests::SnapshotFilter,
    ) -> Result<Vec<Snapshot>> {
        let all = self
            .list_snapshots_page(owner, filter, &crate::store::Page::all())
            .await?;
        Ok(all.into_iter().map(|l| l.row).collect())
    }

    /// One page of them, newest first; the store applies the filter in the
    /// same scan, so a page is full of matches.
    pub async fn list_snapshots_page(
        &self,
        owner: &Owner,
        filter: &super::requests::SnapshotFilter,
        page: &crate::store::Page,
    ) -> Result<Vec<crate::store::Listed<Snapshot>>> {
        let m = crate::store::SnapshotMatch {
            kind: filter.kind,
            name: filter.name.as_deref(),
            vm_id: filter.source_instance_id.as_deref(),
            tags: &filter.tags,
        };
        Ok(self.store.list_snapshots_page(&owner.id, &m, page).await?)
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
            if vm.state == VmState::Snapshotted && standby.as_deref() == Some(id) {
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
        // Re-read under the lock: a conversion may have made it chunked.
        let Some(snap) = self.store.get_snapshot(id).await? else {
            return Ok(());
        };
        let mut keys = vec![&snap.state_key];
        if snap.layout != crate::store::CHUNKED {
            keys.extend([&snap.memory_key, &snap.disk_key]);
            keys.extend(snap.compressed_key.as_ref());
        }
        for key in keys.into_iter().filter(|k| !k.is_empty()) {
            self.objects
                .delete(key)
                .await
                .context(|| format!("deleting snapshot {id}"))?;
        }
        crate::crash::point(crate::crash::Point::DeleteObjectsGone);
        // Its chunks that no other snapshot shares are orphaned, collected later.
        self.store.delete_snapshot(id).await?;
        self.snap_locks.lock().unwrap().remove(id);
        // A checkpoint's hot copy is of no use once its snapshot is gone.
        if self.hot.drop_snapshot(id) {
            self.telemetry.hot_copies(self.hot.total());
        }
        self.collect_after_delete();
        Ok(())
    }

    /// Start-up, once no VMM of an earlier daemon runs: the scratch
    /// directories of snapshot flows a crash cut short go (`capture-*` and
    /// `restore-*` in a VM's work directory: a memory file as big as the
    /// guest's RAM, a fetched or half-converted disk). Every flow removes its
    /// own whatever happens, so anything there now is left from a crash.
    pub(super) async fn remove_snapshot_scratch(&self) {
        let vms = self.config.vms_dir();
        let removed = tokio::task::spawn_blocking(move || {
            let mut removed = 0;
            for vm in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
                for entry in std::fs::read_dir(vm.path()).into_iter().flatten().flatten() {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    let scratch = name.starts_with("capture-") || name.starts_with("restore-");
                    // Never through a symlink: only real directories are ours.
                    if scratch && entry.file_type().is_ok_and(|t| t.is_dir()) {
                        match std::fs::remove_dir_all(entry.path()) {
                            Ok(()) => removed += 1,
                            Err(e) => tracing::error!("removing {}: {e}", entry.path().display()),
                        }
                    }
                }
            }
            removed
        })
        .await
        .unwrap_or(0);
        if removed > 0 {
            tracing::warn!(dirs = removed, "removed snapshot scratch a crash left");
        }
    }

    /// Deletes every snapshot of a VM, objects first.
    pub(super) async fn delete_vm_snapshots(&self, vm_id: &str) -> Result<()> {
        self.objects
            .delete_prefix(&snapshot::prefix_of_vm(vm_id))
            .await
            .context(|| format!("deleting snapshots of {vm_id}"))?;
        self.store.delete_vm_snapshots(vm_id).await?;
        self.collect_after_delete();
        Ok(())
    }
}
