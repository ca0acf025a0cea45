//! Chunked snapshots in the manager: captures that upload only the chunks
//! their owner lacks, manifests read back for restores, collection of chunks
//! no manifest references (after a grace period), the start-up sweep of
//! chunks a crash left, and the conversion of snapshots stored as whole
//! objects (the format before chunks).
//!
//! Crash safety rests on one order and one lock. A chunk's row is written
//! only after its object is durable (`sync_chunks`), in the transaction that
//! commits the manifest referencing it; objects are deleted only after their
//! row went. So a row always has its object, and an object without a row (a
//! capture or a collection cut short) is found by the sweep. `chunk_gc` is
//! held shared by every capture from reading the owner's chunk index until
//! its commit, and exclusively by collection: a chunk a capture decided not
//! to upload cannot be collected under it.

use super::snapshots::stored;
use super::state::CompressionState;
use super::{Manager, Result};
use crate::snapshot::{Algorithm, ChunkHash, ChunkRef, Chunked, Stored, StoredChunk};
use crate::store::{self, Snapshot, DISK, MEMORY};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncRead;

/// A request to the collector: chunks of this owner (or all) orphaned for
/// at least this long.
pub(super) type Collect = (Option<String>, Duration);

/// What a capture chunks: a stream (cut where its content says) or a file
/// (cut at fixed offsets).
enum Source<'p, R> {
    Stream(R),
    File(&'p std::path::Path),
}

/// The chunks one capture uploaded, until it is committed or abandoned.
/// While it lives no collection runs (it holds `chunk_gc` shared).
pub(super) struct ChunkedCapture {
    _gc: tokio::sync::OwnedRwLockReadGuard<()>,
    owner: String,
    /// The owner's chunks when the capture began, and those it uploaded since.
    known: HashSet<ChunkHash>,
    new: Vec<StoredChunk>,
    pub(super) memory: Option<Vec<ChunkRef>>,
    pub(super) disk: Vec<ChunkRef>,
    /// Chunks a stream that failed part way set out to upload: it does not
    /// say which of them it stored, so abandoning asks the store.
    unsure: HashSet<ChunkHash>,
}

impl ChunkedCapture {
    /// Bytes this capture added to the store: what its owner's quota must still hold.
    pub(super) fn new_bytes(&self) -> u64 {
        self.new.iter().map(|c| u64::from(c.stored_size)).sum()
    }

    /// Takes in what one chunking call stored; on failure, the chunks it
    /// set out to upload (`asked`), since no `Chunked` says which it stored.
    fn settle(
        &mut self,
        chunked: std::result::Result<Chunked, crate::snapshot::ObjectError>,
        asked: std::sync::Mutex<HashSet<ChunkHash>>,
    ) -> Result<Chunked> {
        match chunked {
            Ok(chunked) => {
                self.absorb(&chunked);
                Ok(chunked)
            }
            Err(e) => {
                let asked = asked.into_inner().unwrap_or_else(|p| p.into_inner());
                self.unsure.extend(asked);
                Err(e.into())
            }
        }
    }

    fn absorb(&mut self, chunked: &Chunked) {
        for c in &chunked.new {
            if self.known.insert(c.hash) {
                self.new.push(*c);
            }
        }
    }
}

impl Manager {
    /// Starts a capture for `owner`: no collection runs until it ends.
    pub(super) async fn begin_chunked(&self, owner: &str) -> Result<ChunkedCapture> {
        let gc = Arc::clone(&self.chunk_gc).read_owned().await;
        let known = self.store.owner_chunk_hashes(owner).await?;
        Ok(ChunkedCapture {
            _gc: gc,
            owner: owner.to_string(),
            known,
            new: vec![],
            memory: None,
            disk: vec![],
            unsure: HashSet::new(),
        })
    }

    /// Chunks what `body` yields into `cap`'s owner's chunks (FastCDC),
    /// uploading only those the owner lacks.
    pub(super) async fn chunk_stream(
        &self,
        cap: &mut ChunkedCapture,
        body: impl AsyncRead + Unpin + Send,
    ) -> Result<Chunked> {
        self.chunk_into(cap, Source::Stream(body)).await
    }

    /// A file (a disk, a memory image) in fixed-size chunks at fixed
    /// offsets (`Objects::put_file_chunked`), uploading only those the owner lacks.
    pub(super) async fn chunk_file(
        &self,
        cap: &mut ChunkedCapture,
        path: &std::path::Path,
    ) -> Result<Chunked> {
        self.chunk_into(cap, Source::<tokio::io::Empty>::File(path))
            .await
    }

    /// Chunks `source` for `cap`, noting each chunk the owner lacks: if the
    /// call fails part way, those are the ones it may have stored.
    async fn chunk_into<R: AsyncRead + Unpin + Send>(
        &self,
        cap: &mut ChunkedCapture,
        source: Source<'_, R>,
    ) -> Result<Chunked> {
        let known = &cap.known;
        let asked = std::sync::Mutex::new(HashSet::new());
        let is_known = |h: &ChunkHash| {
            let lacked = !known.contains(h);
            if lacked {
                asked.lock().unwrap().insert(*h);
            }
            !lacked
        };
        let chunked = match source {
            Source::Stream(body) => {
                self.objects
                    .put_chunked(&cap.owner, body, &is_known, None)
                    .await
            }
            Source::File(path) => {
                self.objects
                    .put_file_chunked(&cap.owner, path, &is_known)
                    .await
            }
        };
        cap.settle(chunked, asked)
    }

    /// Makes the capture's chunks durable, then `snap` usable: its row
    /// `ready` with its manifests, in one transaction.
    pub(super) async fn commit_chunked(
        &self,
        snap: &mut Snapshot,
        cap: ChunkedCapture,
    ) -> Result<store::ChunkedSizes> {
        crate::crash::point(crate::crash::Point::CaptureUploaded);
        let committed = async {
            let started = std::time::Instant::now();
            self.objects.sync_chunks().await?;
            let synced = started.elapsed();
            let mut parts: Vec<(&str, &[ChunkRef])> = vec![(DISK, &cap.disk)];
            if let Some(memory) = &cap.memory {
                parts.push((MEMORY, memory));
            }
            let sizes = self
                .store
                .commit_chunked_snapshot(snap, &cap.new, &parts)
                .await?;
            tracing::debug!(
                snapshot = %snap.id,
                new_chunks = cap.new.len(),
                sync_ms = synced.as_millis() as u64,
                rows_ms = (started.elapsed() - synced).as_millis() as u64,
                "committed"
            );
            Ok(sizes)
        }
        .await;
        if committed.is_err() {
            self.abandon_chunked(cap).await;
        }
        committed
    }

    /// A capture that failed: the chunks it uploaded are recorded as
    /// orphans, collected now unless a manifest committed meanwhile shares them.
    /// Those of a stream that failed part way are found in the store (raw,
    /// as a capture uploads them): a failed chunking call returns only once
    /// none of its uploads is still writing, so the listing sees them all.
    pub(super) async fn abandon_chunked(&self, cap: ChunkedCapture) {
        let ChunkedCapture {
            _gc,
            owner,
            mut new,
            unsure,
            ..
        } = cap;
        if !unsure.is_empty() {
            match self.objects.list_chunks(Some(&owner)).await {
                Ok(listed) => new.extend(
                    listed
                        .into_iter()
                        .filter(|l| l.encoding.is_none() && unsure.contains(&l.hash))
                        .map(|l| StoredChunk {
                            hash: l.hash,
                            raw_size: l.size as u32,
                            stored_size: l.size as u32,
                            encoding: None,
                        }),
                ),
                Err(e) => {
                    tracing::warn!(owner = %owner, "listing the chunks of a failed capture (the next sweep removes them): {e}")
                }
            }
        }
        if let Err(e) = self.store.record_orphan_chunks(&owner, &new).await {
            tracing::warn!(owner = %owner, "recording the chunks of a failed capture (the next sweep removes them): {e}");
        }
        drop(_gc);
        if !new.is_empty() {
            self.spawn_collection(Some(owner), Duration::MAX);
        }
    }

    /// Removes chunks no manifest has referenced for `grace` (of one owner
    /// or all; `Duration::MAX` means only those a failed capture left):
    /// their rows first, then their objects. Returns how many went.
    pub(super) async fn collect_chunks(&self, owner: Option<&str>, grace: Duration) -> usize {
        let _gc = self.chunk_gc.write().await;
        let before = if grace == Duration::MAX {
            0
        } else {
            store::unix_now().saturating_sub(grace.as_secs().min(i64::MAX as u64) as i64)
        };
        let doomed = match self.store.take_collectable_chunks(owner, before).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("collecting chunks: {e}");
                return 0;
            }
        };
        if !doomed.is_empty() {
            crate::crash::point(crate::crash::Point::CollectRowsTaken);
        }
        for (owner, c) in &doomed {
            if let Err(e) = self.objects.delete_chunk(owner, &c.hash, c.encoding).await {
                // Its row is gone: the next sweep finds the object.
                tracing::warn!(owner = %owner, chunk = %c.hash, "deleting a collected chunk: {e}");
            }
        }
        if !doomed.is_empty() {
            tracing::info!(
                chunks = doomed.len(),
                "collected snapshot chunks no manifest references"
            );
        }
        doomed.len()
    }

    /// Before a snapshot is admitted: when it would not fit in the owner's
    /// stored bytes, chunks of the owner's deleted snapshots still kept for
    /// the grace period go first (the owner asked for that room). Never
    /// called with `chunk_gc` or the admission lock held.
    pub(super) async fn collect_for_quota(
        &self,
        owner_id: &str,
        quota: super::quotas::SnapshotQuota,
        adding: u64,
    ) {
        if self.admit_stored(owner_id, quota, adding).await.is_ok() {
            return;
        }
        if let Ok(true) = self.store.has_collectable_chunks(owner_id, i64::MAX).await {
            self.collect_chunks(Some(owner_id), Duration::ZERO).await;
        }
    }

    /// Asks the collector (`spawn_chunk_collector`) to run now.
    pub(super) fn spawn_collection(&self, owner: Option<String>, grace: Duration) {
        let _ = self.collect_now.send((owner, grace));
    }

    /// Collection now of what deletion just orphaned, when there is no grace.
    pub(super) fn collect_after_delete(&self) {
        if self.config.chunk_grace.is_zero() {
            self.spawn_collection(None, Duration::ZERO);
        }
    }

    /// Runs collection periodically, and when asked, for as long as the
    /// manager lives.
    pub(super) fn spawn_chunk_collector(self: &Arc<Self>) {
        let Some(mut asked) = self.collect_asked.lock().unwrap().take() else {
            return;
        };
        let grace = self.config.chunk_grace;
        let period = (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let (owner, g) = tokio::select! {
                    _ = tokio::time::sleep(period) => (None, grace),
                    got = asked.recv() => match got {
                        Some(req) => req,
                        None => return,
                    },
                };
                let Some(mgr) = weak.upgrade() else { return };
                mgr.collect_chunks(owner.as_deref(), g).await;
            }
        });
    }

    /// Start-up: chunk objects the index does not know (a capture or a
    /// collection a crash cut short, the old copy of a recoded chunk) go.
    /// Listing happens without the lock; the comparison and the deletes
    /// under it, against the index as it is then.
    pub(super) async fn sweep_chunks(&self) {
        let listed = match self.objects.list_chunks(None).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("listing snapshot chunks: {e}");
                return;
            }
        };
        let _gc = self.chunk_gc.write().await;
        let known = match self.store.all_chunks().await {
            Ok(k) => k,
            Err(e) => {
                tracing::error!("reading the chunk index: {e}");
                return;
            }
        };
        let mut removed = 0;
        for l in listed {
            if known.contains(&(l.owner.clone(), l.hash, l.encoding)) {
                continue;
            }
            match self
                .objects
                .delete_chunk(&l.owner, &l.hash, l.encoding)
                .await
            {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(chunk = %l.hash, "removing an unreferenced chunk: {e}"),
            }
        }
        if removed > 0 {
            tracing::warn!(
                chunks = removed,
                "removed snapshot chunks a crash left without a manifest"
            );
        }
    }

    /// The chunks of `part` of a chunked snapshot, in order, as stored.
    pub(super) async fn manifest(&self, snap: &Snapshot, part: &str) -> Result<Vec<StoredChunk>> {
        Ok(self.store.snapshot_manifest(snap, part).await?)
    }

    /// Makes a snapshot stored as whole objects a chunked one (its row lock
    /// taken exclusively): its memory (decompressed) and disk become chunks,
    /// checked against their recorded checksums on the way, then the whole
    /// objects go. A failure changes nothing.
    pub(super) async fn convert_snapshot(&self, snap: &Snapshot) -> Result<()> {
        let lock = self.snap_lock(&snap.id);
        let _w = lock.write().await;
        let Some(mut fresh) = self.store.get_snapshot(&snap.id).await? else {
            return Ok(());
        };
        if fresh.layout == store::CHUNKED {
            return Ok(());
        }
        let mut cap = self.begin_chunked(&fresh.owner_id).await?;
        let chunked = async {
            let mut memory = None;
            if !fresh.memory_key.is_empty() {
                let (key, expected, decompress) = whole_memory_source(&fresh);
                let known = &cap.known;
                let m = self
                    .objects
                    .chunk_object(
                        &key,
                        &expected,
                        decompress.as_ref().map(|(a, r)| (*a, r)),
                        &fresh.owner_id,
                        &|h: &ChunkHash| known.contains(h),
                    )
                    .await?;
                cap.absorb(&m);
                memory = Some(m.entries);
            }
            let known = &cap.known;
            let disk = self
                .objects
                .chunk_object(
                    &fresh.disk_key,
                    &stored(&fresh.disk_sha256, fresh.disk_size),
                    None,
                    &fresh.owner_id,
                    &|h: &ChunkHash| known.contains(h),
                )
                .await?;
            cap.absorb(&disk);
            self.objects.sync_chunks().await?;
            Ok::<_, super::ManagerError>((memory, disk.entries))
        }
        .await;
        let (memory, disk) = match chunked {
            Ok(parts) => parts,
            Err(e) => {
                self.abandon_chunked(cap).await;
                return Err(e);
            }
        };
        let old = [
            Some(fresh.memory_key.clone()),
            fresh.compressed_key.clone(),
            Some(fresh.disk_key.clone()),
        ];
        let mut parts: Vec<(&str, &[ChunkRef])> = vec![(DISK, &disk)];
        if let Some(m) = &memory {
            parts.push((MEMORY, m));
        }
        let converted = self
            .store
            .convert_to_chunked(&mut fresh, &cap.new, &parts)
            .await;
        if let Err(e) = converted {
            self.abandon_chunked(cap).await;
            return Err(e.into());
        }
        drop(cap);
        for key in old.into_iter().flatten().filter(|k| !k.is_empty()) {
            if let Err(e) = self.objects.delete(&key).await {
                tracing::warn!(snapshot = %fresh.id, "removing {key} after its conversion to chunks: {e}");
            }
        }
        // Compression below takes the lock itself, chunk by chunk.
        drop(_w);
        if fresh.compression_state == CompressionState::Compressed {
            // Its chunks are raw now: compress them again, keeping the state.
            if let Err(e) = self.recode_chunks(&mut fresh).await {
                tracing::warn!(snapshot = %fresh.id, "compressing the converted chunks again: {e}");
            }
            self.store.set_snapshot_sizes(&fresh).await?;
        }
        tracing::info!(snapshot = %fresh.id, bytes = fresh.size_bytes, "snapshot converted to chunks");
        Ok(())
    }

    /// Start-up: every snapshot still stored as whole objects becomes
    /// chunked, one at a time, in the background (a restore of one waits
    /// for its conversion).
    pub(super) async fn spawn_conversions(self: &Arc<Self>) -> Result<()> {
        let whole = self.store.whole_object_snapshots().await?;
        if whole.is_empty() {
            return Ok(());
        }
        let mgr = Arc::clone(self);
        tokio::spawn(async move {
            for snap in whole {
                if let Err(e) = mgr.convert_snapshot(&snap).await {
                    tracing::error!(snapshot = %snap.id, "converting to chunks (it stays as it was): {e}");
                }
            }
        });
        Ok(())
    }

    /// Stores the memory chunks only `snap` references compressed, as its
    /// compression settings say, and sets its new sizes in `snap` (the
    /// caller records them). A chunk another snapshot shares stays as it is
    /// (what that one reads never changes under it). Returns the compressed
    /// memory's stored size, or why some chunks could not be compressed
    /// (those stay raw: the snapshot restores either way, and its sizes are
    /// set in both cases).
    pub(super) async fn recode_chunks(
        &self,
        snap: &mut Snapshot,
    ) -> std::result::Result<u64, String> {
        use futures_util::StreamExt;
        let Some((algorithm, level)) = super::snapshots::compression_of(snap).effective() else {
            return Err("compression is not enabled".into());
        };
        let chunks = self
            .store
            .recodable_chunks(snap)
            .await
            .map_err(|e| format!("listing the chunks to compress: {e}"))?;
        let total = chunks.len();
        let owner = snap.owner_id.clone();
        // Futures made up front (a stream of closures is not `Send` enough
        // for the callers' spawned tasks).
        let jobs: Vec<_> = chunks
            .into_iter()
            .map(|c| {
                let objects = self.objects.clone();
                let owner = owner.clone();
                let gc = Arc::clone(&self.chunk_gc);
                async move {
                    // Held from writing the copy until it is recorded or
                    // removed: no sweep may take the copy for a leftover meanwhile.
                    let gc = gc.read_owned().await;
                    let result = objects.recode_chunk(&owner, &c, (algorithm, level)).await;
                    (c, result, gc)
                }
            })
            .collect();
        let mut recoded = futures_util::stream::iter(jobs).buffer_unordered(4);
        let lock = self.snap_lock(&snap.id);
        let (mut failed, mut first_error) = (0usize, None);
        while let Some((old, result, _gc)) = recoded.next().await {
            let new = match result {
                Ok(n) => n,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                    continue;
                }
            };
            crate::crash::point(crate::crash::Point::RecodeWritten);
            if new.stored_size >= old.stored_size {
                // Incompressible: the raw chunk stays, the copy goes.
                let _ = self
                    .objects
                    .delete_chunk(&owner, &new.hash, new.encoding)
                    .await;
                continue;
            }
            // Readers of this snapshot hold its lock shared: none reads the
            // raw object while it goes.
            let _w = lock.write().await;
            let gone = match self.store.set_chunk_recoded(snap, &new).await {
                Ok(true) => old.encoding,
                Ok(false) => new.encoding,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("recording a compressed chunk: {e}"));
                    new.encoding
                }
            };
            if let Err(e) = self.objects.delete_chunk(&owner, &old.hash, gone).await {
                tracing::warn!(chunk = %old.hash, "removing a chunk's other copy (the next sweep does): {e}");
            }
        }
        let sizes = self
            .store
            .chunked_sizes(snap)
            .await
            .map_err(|e| format!("sizing the compressed snapshot: {e}"))?;
        snap.size_bytes = snap.state_size.unwrap_or(0) + sizes.all_stored as i64;
        snap.compressed_size_bytes = Some(sizes.memory_stored as i64);
        match first_error {
            None => Ok(sizes.memory_stored),
            Some(e) => Err(format!(
                "{failed} of {total} memory chunks could not be compressed and stay uncompressed: {e}"
            )),
        }
    }
}

/// Where a whole-object snapshot's memory is and how to check it: the key,
/// its recorded checksum, and the algorithm and raw checksum when it is
/// stored compressed.
fn whole_memory_source(snap: &Snapshot) -> (String, Stored, Option<(Algorithm, Stored)>) {
    let raw = stored(&snap.memory_sha256, snap.memory_size);
    match (
        &snap.compressed_key,
        super::snapshots::compression_of(snap).effective(),
    ) {
        (Some(key), Some((algorithm, _)))
            if snap.compression_state == CompressionState::Compressed =>
        {
            (
                key.clone(),
                stored(&snap.compressed_sha256, snap.compressed_size_bytes),
                Some((algorithm, raw)),
            )
        }
        _ => (snap.memory_key.clone(), raw, None),
    }
}
