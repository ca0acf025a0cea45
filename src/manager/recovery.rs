//! Start-up recovery: what a previous daemon left running, half-written or mid-transition.

use super::state::VmState;
use super::{Manager, Result};
use crate::vmm::process;
use std::sync::Arc;

impl Manager {
    /// Start-up recovery: no VMM from before survives unaccounted for, and VMs
    /// left in a transient state are marked `error` (Hatch API).
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        let vms_dir = self.config.vms_dir();
        let killed = tokio::task::spawn_blocking(move || process::kill_all_under(&vms_dir)).await?;
        if killed > 0 {
            tracing::warn!(killed, "killed VMM processes left from a previous daemon");
        }
        self.backends.recover().await;
        self.remove_snapshot_scratch().await;
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
            // Hot copies were this daemon's; a new one holds none.
            let stale = super::hot::HotFile::remove_stale(&self.work_dir(&vm.id));
            if stale > 0 {
                tracing::info!(vm = %vm.id, "removed a hot copy's memory file left by the daemon before");
            }
            let st = vm.state;
            let standby = match &vm.standby_snapshot_id {
                Some(s) => self.store.get_snapshot(s).await?.is_some(),
                None => false,
            };
            if st.is_transient() && standby {
                // Its memory and disk were stored before the VMM went (a snapshot
                // or restore was cut short): it stands by on that snapshot.
                self.store
                    .set_vm_state(&vm.id, VmState::Snapshotted, None)
                    .await?;
                tracing::warn!(vm = %vm.id, was = %st, "back to snapshotted after restart");
            } else if st.is_transient() {
                let msg = format!(
                    "the hatch daemon restarted while this VM was {st}; its VMM process is gone"
                );
                self.store
                    .set_vm_state(&vm.id, VmState::Error, Some(&msg))
                    .await?;
                tracing::warn!(vm = %vm.id, was = %st, "marked error after restart");
            }
        }
        self.recover_compression().await?;
        // Chunks: what a crash left without a manifest goes, snapshots in the
        // format before chunks are converted, and collection starts.
        let mgr = Arc::clone(self);
        tokio::spawn(async move { mgr.sweep_chunks().await });
        self.spawn_conversions().await?;
        self.spawn_chunk_collector();
        self.spawn_deep_sleep();
        self.spawn_ssh_gateway();
        Ok(())
    }
}
