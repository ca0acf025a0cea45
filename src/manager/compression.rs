//! Background compression of a stored snapshot's memory, resumed after a restart.

use super::snapshots::compression_of;
use super::state::CompressionState;
use super::{Manager, Result};
use crate::store::Snapshot;
use std::sync::Arc;

impl Manager {
    pub(super) fn spawn_compression(self: &Arc<Self>, snap: Snapshot) {
        let mgr = Arc::clone(self);
        tokio::spawn(async move { mgr.compress(snap).await });
    }

    /// Compresses the memory object of `snap` into a second object, then
    /// switches the snapshot to it and deletes the raw one. Until the switch
    /// the raw object is what restores use; a failure leaves it in place.
    pub(super) async fn compress(&self, mut snap: Snapshot) {
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
        let from = snap.compression_state;
        match result {
            Ok(c) => {
                snap.compression_state = CompressionState::Compressed;
                snap.compressed_key = Some(ckey);
                snap.compressed_sha256 = Some(c.sha256);
                snap.compressed_size_bytes = Some(c.size as i64);
                snap.size_bytes =
                    snap.state_size.unwrap_or(0) + c.size as i64 + snap.disk_size.unwrap_or(0);
                if let Err(e) = self.store.set_snapshot_compression(&snap, from).await {
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
                snap.compression_state = CompressionState::Error;
                snap.compression_error = Some(e.to_string());
                tracing::error!(snapshot = %snap.id, "compression failed, the uncompressed memory stays: {e}");
                if let Err(e) = self.store.set_snapshot_compression(&snap, from).await {
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
}
