//! Background compression of a stored snapshot's memory, resumed after a restart.

use super::snapshots::compression_of;
use super::state::CompressionState;
use super::{Manager, Result};
use crate::store::{Snapshot, CHUNKED};
use std::sync::Arc;

impl Manager {
    pub(super) fn spawn_compression(self: &Arc<Self>, snap: Snapshot) {
        let mgr = Arc::clone(self);
        tokio::spawn(async move { mgr.compress(snap).await });
    }

    /// Stores the memory chunks of `snap` that only it references
    /// compressed (see `recode_chunks`), then records it `compressed` with
    /// its sizes. Until a chunk's compressed copy is recorded, the raw one is
    /// what restores read; a chunk that fails stays raw. A snapshot in the
    /// format before chunks is converted first.
    pub(super) async fn compress(&self, snap: Snapshot) {
        if compression_of(&snap).effective().is_none() {
            return;
        }
        let from = snap.compression_state;
        if snap.layout != CHUNKED {
            if let Err(e) = self.convert_snapshot(&snap).await {
                self.compression_failed(snap, from, e.to_string()).await;
                return;
            }
        }
        let mut fresh = match self.store.get_snapshot(&snap.id).await {
            Ok(Some(s)) => s,
            // Deleted meanwhile: its chunks are orphaned, nothing to record.
            _ => return,
        };
        match self.recode_chunks(&mut fresh).await {
            Ok(compressed) => {
                fresh.compression_state = CompressionState::Compressed;
                if let Err(e) = self.store.set_snapshot_compression(&fresh, from).await {
                    tracing::error!(snapshot = %fresh.id, "recording compression: {e}");
                    return;
                }
                tracing::info!(snapshot = %fresh.id, raw = fresh.memory_size.unwrap_or(0),
                    compressed, "memory compressed");
            }
            Err(msg) => self.compression_failed(fresh, from, msg).await,
        }
    }

    async fn compression_failed(&self, mut snap: Snapshot, from: CompressionState, msg: String) {
        tracing::error!(snapshot = %snap.id, "compression failed, the memory stays uncompressed: {msg}");
        snap.compression_state = CompressionState::Error;
        snap.compression_error = Some(msg);
        if let Err(e) = self.store.set_snapshot_compression(&snap, from).await {
            tracing::error!(snapshot = %snap.id, "recording compression failure: {e}");
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
            .filter(|s| s.layout != CHUNKED)
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
