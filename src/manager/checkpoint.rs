//! Checkpoint: Hypeman's Standby snapshot, which leaves the instance as it was.
//!
//! A running instance is paused, captured (capture.rs) and resumed in the
//! same VMM: its guest notices only the pause. An instance in standby gets a
//! copy of the snapshot it stands by on (fork.rs, `copy_snapshot`) and stays
//! in standby on its own. Either way the new snapshot is an independent
//! resource: the VM never records it as the snapshot it resumes from, so it
//! can be deleted at once. Hatch's `POST /vms/{id}/snapshot` and idle sleep
//! keep putting the VM to sleep in their snapshot (capture.rs).

use super::fork::CopyAs;
use super::quotas::SnapshotQuota;
use super::requests::{CreateSnapshot, SnapshotKind};
use super::state::{CompressionState, VmState};
use super::{Manager, ManagerError, Result};
use crate::store::{Snapshot, Vm};
use std::sync::Arc;

/// What a Standby capture does with the guest once its snapshot is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterCapture {
    /// Hatch's snapshot and idle sleep: the VMM ends and the VM is
    /// `snapshotted` on the new snapshot.
    Standby,
    /// A checkpoint: the guest is left paused in its VMM for the caller to resume.
    Resume,
}

impl Manager {
    /// A Standby snapshot through the Hypeman API (VM lock held): the
    /// instance ends in the state it was in, `running` or `snapshotted`.
    pub(super) async fn checkpoint_locked(
        self: &Arc<Self>,
        vm: &mut Vm,
        req: &CreateSnapshot,
    ) -> Result<Snapshot> {
        match vm.state {
            VmState::Running => self.checkpoint_running(vm, req).await,
            VmState::Snapshotted => self.checkpoint_standby(vm, req).await,
            st => Err(ManagerError::Conflict(format!(
                "instance {} is {st}; a Standby snapshot needs it running or in standby",
                vm.id
            ))),
        }
    }

    /// Pause, capture, store, then resume in the same VMM. Any failure up to
    /// the stored snapshot resumes the guest and keeps nothing (capture.rs),
    /// a quota refusal after the capture included.
    async fn checkpoint_running(
        self: &Arc<Self>,
        vm: &mut Vm,
        req: &CreateSnapshot,
    ) -> Result<Snapshot> {
        let backend = self.backend_or_reject(vm)?;
        // Proxied requests wait (for the VM lock, in a wake) until the guest runs again.
        let _pausing = self.activity.pause(&vm.id);
        let snap = self
            .take_snapshot(
                vm,
                SnapshotKind::Standby,
                req,
                SnapshotQuota::Enforced,
                AfterCapture::Resume,
            )
            .await?;
        let spec = self.spec_for(vm, backend.as_ref());
        match backend.resume(&spec).await {
            Ok(()) => {
                tracing::info!(vm = %vm.id, snapshot = %snap.id, "checkpoint taken, the guest runs on");
                Ok(snap)
            }
            Err(e) => Err(self.stand_by_after_failed_resume(vm, &snap, e.into()).await),
        }
    }

    /// The checkpoint is stored but its guest would not resume. The guest
    /// has not run since it was saved, so that snapshot is exactly its
    /// state: the VM goes to standby on it (nothing lost; a restore or a
    /// proxied wake resumes it) rather than to `error`, which would leave
    /// the memory only to someone who knows to restore that snapshot. Its
    /// VMM ends either way: never `running` with a VMM that does not run.
    async fn stand_by_after_failed_resume(
        &self,
        vm: &mut Vm,
        snap: &Snapshot,
        error: ManagerError,
    ) -> ManagerError {
        tracing::error!(vm = %vm.id, snapshot = %snap.id, "resuming after a checkpoint failed: {error}");
        let settled = async {
            // Recorded before the VMM ends: a crash from here on recovers as snapshotted.
            self.store.set_vm_standby(&vm.id, Some(&snap.id)).await?;
            vm.standby_snapshot_id = Some(snap.id.clone());
            self.end_vmm(vm, false).await;
            self.transition(vm, VmState::Snapshotted, None).await?;
            self.refresh_forwards().await;
            Ok::<(), ManagerError>(())
        }
        .await;
        if let Err(e) = settled {
            tracing::error!(vm = %vm.id, "putting the VM in standby after a failed resume: {e}");
        }
        error.context(format!(
            "snapshot {} is stored, but instance {} did not resume after it; \
             it is in standby on that snapshot (restore it to run it again)",
            snap.id, vm.id
        ))
    }

    /// An instance in standby: a copy of the snapshot it stands by on, with
    /// the request's name, tags and compression. The instance stays in
    /// standby on its own snapshot, which the copy never replaces.
    async fn checkpoint_standby(
        self: &Arc<Self>,
        vm: &mut Vm,
        req: &CreateSnapshot,
    ) -> Result<Snapshot> {
        let standby = self.standby_snapshot(vm).await?.ok_or_else(|| {
            ManagerError::Conflict(format!("instance {} has no standby snapshot", vm.id))
        })?;
        if vm.standby_snapshot_id.is_none() {
            // An old row that found its snapshot as the newest: pinned, so
            // the copy (now the newest) is never taken for it.
            self.store.set_vm_standby(&vm.id, Some(&standby.id)).await?;
            vm.standby_snapshot_id = Some(standby.id.clone());
        }
        {
            // What the copy adds is known: its own device state object (it
            // shares the chunks), checked before anything is copied, as a
            // fork kept in Standby is.
            let _admission = self.alloc_lock.lock().await;
            self.admit_snapshot(
                vm,
                SnapshotQuota::Enforced,
                standby.state_size.unwrap_or(0).max(0) as u64,
            )
            .await?;
        }
        let compression = self.compression_for(vm, req.compression.as_ref());
        let copy_as = CopyAs {
            name: req.name.clone(),
            tags: req.tags.clone().unwrap_or_default(),
            compression: Some(compression),
        };
        let mut snap = self.copy_snapshot(&standby, vm, copy_as).await?;
        let enabled = snap.compression.as_deref().is_some_and(|c| c.enabled);
        if enabled && snap.compression_state == CompressionState::None {
            snap.compression_state = CompressionState::Compressing;
            self.store
                .set_snapshot_compression(&snap, CompressionState::None)
                .await?;
            self.spawn_compression(snap.clone());
        }
        tracing::info!(vm = %vm.id, snapshot = %snap.id, from = %standby.id, "checkpoint copied from the standby snapshot");
        Ok(snap)
    }
}
