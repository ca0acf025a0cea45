//! Chunked snapshots' bookkeeping: the per-owner chunk index, each snapshot
//! part's manifest, which snapshots reference which chunks, and the orphan
//! marks that collection works from (see migrations/0009_chunks.sql).

use super::{check_snapshot_move, stayed_as_read, Result, Snapshot, Store, StoreError};
use crate::domain::SnapshotStatus;
use crate::snapshot::{Algorithm, ChunkHash, ChunkRef, StoredChunk};
use sqlx::{Sqlite, Transaction};
use std::collections::{HashMap, HashSet};

/// The manifest parts of a snapshot.
pub const MEMORY: &str = "memory";
pub const DISK: &str = "disk";
/// `snapshots.layout` of a chunked snapshot.
pub const CHUNKED: &str = "chunks";

/// Bytes per manifest entry: the hash, then the raw size (u32, little-endian).
const ENTRY: usize = 36;

fn encode_manifest(entries: &[ChunkRef]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY);
    for e in entries {
        out.extend_from_slice(&e.hash.0);
        out.extend_from_slice(&e.raw_size.to_le_bytes());
    }
    out
}

fn decode_manifest(id: &str, blob: &[u8]) -> Result<Vec<ChunkRef>> {
    if !blob.len().is_multiple_of(ENTRY) {
        return Err(StoreError::Corrupt(format!(
            "the manifest of snapshot {id} is {} bytes, not a whole number of entries",
            blob.len()
        )));
    }
    Ok(blob
        .chunks_exact(ENTRY)
        .map(|e| {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&e[..32]);
            let mut size = [0u8; 4];
            size.copy_from_slice(&e[32..]);
            ChunkRef {
                hash: ChunkHash(hash),
                raw_size: u32::from_le_bytes(size),
            }
        })
        .collect())
}

fn hash_of(blob: &[u8]) -> Result<ChunkHash> {
    let bytes: [u8; 32] = blob
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("a chunk hash of {} bytes", blob.len())))?;
    Ok(ChunkHash(bytes))
}

fn encoding_of(s: Option<&str>) -> Result<Option<Algorithm>> {
    match s {
        None => Ok(None),
        Some("zstd") => Ok(Some(Algorithm::Zstd)),
        Some("lz4") => Ok(Some(Algorithm::Lz4)),
        Some(other) => Err(StoreError::Corrupt(format!(
            "a chunk stored with unknown encoding {other:?}"
        ))),
    }
}

/// Now, in the unix seconds of `chunks.orphaned_at`.
pub fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

type ChunkRow = (Vec<u8>, i64, i64, Option<String>);
/// A chunk row with its owner.
type OwnedChunkRow = (String, Vec<u8>, i64, i64, Option<String>);

fn stored_chunk((hash, raw, stored, encoding): ChunkRow) -> Result<StoredChunk> {
    Ok(StoredChunk {
        hash: hash_of(&hash)?,
        raw_size: raw as u32,
        stored_size: stored as u32,
        encoding: encoding_of(encoding.as_deref())?,
    })
}

/// What a chunked snapshot occupies in the store: its memory's distinct
/// chunks, and every distinct chunk of memory and disk, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkedSizes {
    pub memory_stored: u64,
    pub all_stored: u64,
}

impl Store {
    /// Every chunk `owner_id` has in the store (referenced, or orphaned and
    /// not yet collected): what a capture need not upload again.
    pub async fn owner_chunk_hashes(&self, owner_id: &str) -> Result<HashSet<ChunkHash>> {
        let rows: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT hash FROM chunks WHERE owner_id = ?")
            .bind(owner_id)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|(h,)| hash_of(&h)).collect()
    }

    /// Makes a captured (or copied) chunked snapshot usable, in one
    /// transaction: the chunks it uploaded are recorded, its manifests and
    /// references written, every chunk it references is no longer orphaned,
    /// and its row becomes `ready` with its sizes (`s.size_bytes` is set
    /// here: its device state plus every distinct chunk it references, as
    /// stored). `s.status` is what the caller read: `capturing`.
    pub async fn commit_chunked_snapshot(
        &self,
        s: &mut Snapshot,
        new: &[StoredChunk],
        parts: &[(&str, &[ChunkRef])],
    ) -> Result<ChunkedSizes> {
        let to = SnapshotStatus::Ready;
        check_snapshot_move(&s.id, "snapshot", s.status, to, s.status.can_become(to))?;
        let mut tx = self.write_tx().await?;
        insert_chunks(&mut tx, &s.owner_id, new, None).await?;
        let sizes = write_manifests(&mut tx, s, parts).await?;
        s.size_bytes = s.state_size.unwrap_or(0) + sizes.all_stored as i64;
        let done = sqlx::query(
            "UPDATE snapshots SET status = ?, layout = ?, state_sha256 = ?, state_size = ?,
                    memory_sha256 = ?, memory_size = ?, disk_sha256 = ?, disk_size = ?, size_bytes = ?
             WHERE id = ? AND status = ?",
        )
        .bind(to)
        .bind(CHUNKED)
        .bind(&s.state_sha256)
        .bind(s.state_size)
        .bind(&s.memory_sha256)
        .bind(s.memory_size)
        .bind(&s.disk_sha256)
        .bind(s.disk_size)
        .bind(s.size_bytes)
        .bind(&s.id)
        .bind(s.status)
        .execute(&mut *tx)
        .await?;
        stayed_as_read(&s.id, "snapshot", s.status, to, done.rows_affected())?;
        tx.commit().await?;
        s.status = to;
        s.layout = CHUNKED.into();
        Ok(sizes)
    }

    /// Turns a snapshot stored as whole objects into a chunked one (its
    /// chunks just stored), in one transaction; its row stays `ready`.
    pub async fn convert_to_chunked(
        &self,
        s: &mut Snapshot,
        new: &[StoredChunk],
        parts: &[(&str, &[ChunkRef])],
    ) -> Result<ChunkedSizes> {
        let mut tx = self.write_tx().await?;
        insert_chunks(&mut tx, &s.owner_id, new, None).await?;
        let sizes = write_manifests(&mut tx, s, parts).await?;
        s.size_bytes = s.state_size.unwrap_or(0) + sizes.all_stored as i64;
        let done = sqlx::query(
            "UPDATE snapshots SET layout = ?, size_bytes = ?, compressed_key = NULL,
                    compressed_sha256 = NULL
             WHERE id = ? AND layout != ?",
        )
        .bind(CHUNKED)
        .bind(s.size_bytes)
        .bind(&s.id)
        .bind(CHUNKED)
        .execute(&mut *tx)
        .await?;
        stayed_as_read(
            &s.id,
            "snapshot layout",
            &s.layout,
            CHUNKED,
            done.rows_affected(),
        )?;
        tx.commit().await?;
        s.layout = CHUNKED.into();
        s.compressed_key = None;
        s.compressed_sha256 = None;
        Ok(sizes)
    }

    /// Chunks a capture uploaded but never committed (it failed): recorded
    /// as orphaned long ago, so the next collection removes them, unless a
    /// manifest committed meanwhile (or later) references them.
    pub async fn record_orphan_chunks(&self, owner_id: &str, new: &[StoredChunk]) -> Result<()> {
        let mut tx = self.write_tx().await?;
        insert_chunks(&mut tx, owner_id, new, Some(0)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The chunks of `part` of the chunked snapshot `s`, in order, each as stored.
    pub async fn snapshot_manifest(&self, s: &Snapshot, part: &str) -> Result<Vec<StoredChunk>> {
        let Some(blob) = self.manifest_blob(s, part).await? else {
            return Err(StoreError::Corrupt(format!(
                "snapshot {} has no {part} manifest",
                s.id
            )));
        };
        let entries = decode_manifest(&s.id, &blob)?;
        let rows: Vec<ChunkRow> = sqlx::query_as(
            "SELECT c.hash, c.raw_size, c.stored_size, c.encoding FROM chunks c
             JOIN chunk_refs r ON r.owner_id = c.owner_id AND r.hash = c.hash
             WHERE r.snapshot_id = ? AND r.owner_id = ?",
        )
        .bind(&s.id)
        .bind(&s.owner_id)
        .fetch_all(&self.pool)
        .await?;
        let mut by_hash = HashMap::with_capacity(rows.len());
        for row in rows {
            let c = stored_chunk(row)?;
            by_hash.insert(c.hash, c);
        }
        entries
            .iter()
            .map(|e| match by_hash.get(&e.hash) {
                Some(c) if c.raw_size == e.raw_size => Ok(*c),
                _ => Err(StoreError::Corrupt(format!(
                    "snapshot {} references chunk {} that the chunk index lacks",
                    s.id, e.hash
                ))),
            })
            .collect()
    }

    /// The ordered entries of `part` of `s` (no lookup of how each is stored).
    pub async fn manifest_entries(&self, s: &Snapshot, part: &str) -> Result<Vec<ChunkRef>> {
        match self.manifest_blob(s, part).await? {
            Some(blob) => decode_manifest(&s.id, &blob),
            None => Ok(vec![]),
        }
    }

    async fn manifest_blob(&self, s: &Snapshot, part: &str) -> Result<Option<Vec<u8>>> {
        let blob: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT entries FROM manifests WHERE snapshot_id = ? AND part = ?")
                .bind(&s.id)
                .bind(part)
                .fetch_optional(&self.pool)
                .await?;
        Ok(blob.map(|(b,)| b))
    }

    /// What the chunked snapshot `s` occupies (see `ChunkedSizes`).
    pub async fn chunked_sizes(&self, s: &Snapshot) -> Result<ChunkedSizes> {
        let mut tx = self.pool.begin().await?;
        let sizes = sizes_in(&mut tx, &s.id, &s.owner_id).await?;
        tx.commit().await?;
        Ok(sizes)
    }

    /// Raw chunks of `s`'s memory that no other snapshot references: those
    /// its compression may store again compressed without changing what
    /// another snapshot reads.
    pub async fn recodable_chunks(&self, s: &Snapshot) -> Result<Vec<StoredChunk>> {
        let memory: HashSet<ChunkHash> = self
            .manifest_entries(s, MEMORY)
            .await?
            .into_iter()
            .map(|e| e.hash)
            .collect();
        let rows: Vec<ChunkRow> = sqlx::query_as(
            "SELECT c.hash, c.raw_size, c.stored_size, c.encoding FROM chunks c
             JOIN chunk_refs r ON r.owner_id = c.owner_id AND r.hash = c.hash
             WHERE r.snapshot_id = ? AND r.owner_id = ? AND c.encoding IS NULL
             AND NOT EXISTS (SELECT 1 FROM chunk_refs o WHERE o.owner_id = c.owner_id
                             AND o.hash = c.hash AND o.snapshot_id != r.snapshot_id)",
        )
        .bind(&s.id)
        .bind(&s.owner_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out = vec![];
        for row in rows {
            let c = stored_chunk(row)?;
            if memory.contains(&c.hash) {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Records that `c` (a raw chunk of `s` only) is now stored encoded as
    /// `c.encoding`. False when that no longer holds (another snapshot
    /// references it now, or it was already recoded): the caller then
    /// removes the copy it wrote, never the raw one.
    pub async fn set_chunk_recoded(&self, s: &Snapshot, c: &StoredChunk) -> Result<bool> {
        let encoding = c.encoding.map(|a| a.as_str());
        let done = sqlx::query(
            "UPDATE chunks SET encoding = ?, stored_size = ?
             WHERE owner_id = ? AND hash = ? AND encoding IS NULL
             AND NOT EXISTS (SELECT 1 FROM chunk_refs o WHERE o.owner_id = chunks.owner_id
                             AND o.hash = chunks.hash AND o.snapshot_id != ?)",
        )
        .bind(encoding)
        .bind(c.stored_size as i64)
        .bind(&s.owner_id)
        .bind(&c.hash.0[..])
        .bind(&s.id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Removes orphaned chunks' rows whose orphan mark is at or before
    /// `orphaned_before` (unix seconds), of one owner or all, and returns
    /// them: the caller deletes their objects. (An object whose row went but
    /// that a crash kept is removed by the next sweep.)
    pub async fn take_collectable_chunks(
        &self,
        owner_id: Option<&str>,
        orphaned_before: i64,
    ) -> Result<Vec<(String, StoredChunk)>> {
        let mut tx = self.write_tx().await?;
        let rows: Vec<OwnedChunkRow> = sqlx::query_as(
            "SELECT owner_id, hash, raw_size, stored_size, encoding FROM chunks
             WHERE orphaned_at IS NOT NULL AND orphaned_at <= ? AND (? IS NULL OR owner_id = ?)",
        )
        .bind(orphaned_before)
        .bind(owner_id)
        .bind(owner_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (owner, hash, raw, stored, encoding) in rows {
            sqlx::query("DELETE FROM chunks WHERE owner_id = ? AND hash = ?")
                .bind(&owner)
                .bind(&hash)
                .execute(&mut *tx)
                .await?;
            out.push((owner, stored_chunk((hash, raw, stored, encoding))?));
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Whether any chunk waits for collection (orphaned at or before `before`).
    pub async fn has_collectable_chunks(&self, owner_id: &str, before: i64) -> Result<bool> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM chunks WHERE owner_id = ? AND orphaned_at IS NOT NULL AND orphaned_at <= ?",
        )
        .bind(owner_id)
        .bind(before)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    /// Every chunk row, as (owner, hash, encoding): what the store may hold.
    pub async fn all_chunks(&self) -> Result<HashSet<(String, ChunkHash, Option<Algorithm>)>> {
        let rows: Vec<(String, Vec<u8>, Option<String>)> =
            sqlx::query_as("SELECT owner_id, hash, encoding FROM chunks")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(o, h, e)| Ok((o, hash_of(&h)?, encoding_of(e.as_deref())?)))
            .collect()
    }

    /// Bytes the owner's chunks occupy in the store (orphans not yet collected included).
    pub(super) async fn owner_chunk_bytes(&self, owner_id: &str) -> Result<i64> {
        let (n,): (i64,) =
            sqlx::query_as("SELECT COALESCE(SUM(stored_size), 0) FROM chunks WHERE owner_id = ?")
                .bind(owner_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(n)
    }

    /// Records a chunked snapshot's sizes after its chunks changed how they are stored.
    pub async fn set_snapshot_sizes(&self, s: &Snapshot) -> Result<()> {
        sqlx::query("UPDATE snapshots SET size_bytes = ?, compressed_size_bytes = ? WHERE id = ?")
            .bind(s.size_bytes)
            .bind(s.compressed_size_bytes)
            .bind(&s.id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Snapshots still stored as whole objects (the format before chunks).
    pub async fn whole_object_snapshots(&self) -> Result<Vec<Snapshot>> {
        Ok(
            sqlx::query_as("SELECT * FROM snapshots WHERE status = ? AND layout != ?")
                .bind(SnapshotStatus::Ready)
                .bind(CHUNKED)
                .fetch_all(&self.pool)
                .await?,
        )
    }
}

/// Records chunks; a chunk already known keeps its row (and its encoding).
/// `orphaned_at` None: referenced by what the caller commits next.
async fn insert_chunks(
    tx: &mut Transaction<'_, Sqlite>,
    owner_id: &str,
    new: &[StoredChunk],
    orphaned_at: Option<i64>,
) -> Result<()> {
    for c in new {
        sqlx::query(
            "INSERT OR IGNORE INTO chunks (owner_id, hash, raw_size, stored_size, encoding, orphaned_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(owner_id)
        .bind(&c.hash.0[..])
        .bind(c.raw_size as i64)
        .bind(c.stored_size as i64)
        .bind(c.encoding.map(|a| a.as_str()))
        .bind(orphaned_at)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Writes `s`'s manifests and references, clears the orphan mark of every
/// chunk it references, and returns its sizes.
async fn write_manifests(
    tx: &mut Transaction<'_, Sqlite>,
    s: &Snapshot,
    parts: &[(&str, &[ChunkRef])],
) -> Result<ChunkedSizes> {
    let mut distinct = HashSet::new();
    for (part, entries) in parts {
        sqlx::query("INSERT INTO manifests (snapshot_id, part, entries) VALUES (?, ?, ?)")
            .bind(&s.id)
            .bind(*part)
            .bind(encode_manifest(entries))
            .execute(&mut **tx)
            .await?;
        distinct.extend(entries.iter().map(|e| e.hash));
    }
    for hash in &distinct {
        sqlx::query("INSERT INTO chunk_refs (owner_id, hash, snapshot_id) VALUES (?, ?, ?)")
            .bind(&s.owner_id)
            .bind(&hash.0[..])
            .bind(&s.id)
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query(
        "UPDATE chunks SET orphaned_at = NULL WHERE owner_id = ? AND orphaned_at IS NOT NULL
         AND hash IN (SELECT hash FROM chunk_refs WHERE snapshot_id = ?)",
    )
    .bind(&s.owner_id)
    .bind(&s.id)
    .execute(&mut **tx)
    .await?;
    sizes_in(tx, &s.id, &s.owner_id).await
}

async fn sizes_in(
    tx: &mut Transaction<'_, Sqlite>,
    snapshot_id: &str,
    owner_id: &str,
) -> Result<ChunkedSizes> {
    let rows: Vec<(Vec<u8>, i64)> = sqlx::query_as(
        "SELECT c.hash, c.stored_size FROM chunks c
         JOIN chunk_refs r ON r.owner_id = c.owner_id AND r.hash = c.hash
         WHERE r.snapshot_id = ? AND r.owner_id = ?",
    )
    .bind(snapshot_id)
    .bind(owner_id)
    .fetch_all(&mut **tx)
    .await?;
    let memory: Option<(Vec<u8>,)> =
        sqlx::query_as("SELECT entries FROM manifests WHERE snapshot_id = ? AND part = ?")
            .bind(snapshot_id)
            .bind(MEMORY)
            .fetch_optional(&mut **tx)
            .await?;
    let memory: HashSet<ChunkHash> = match memory {
        Some((blob,)) => decode_manifest(snapshot_id, &blob)?
            .into_iter()
            .map(|e| e.hash)
            .collect(),
        None => HashSet::new(),
    };
    let mut sizes = ChunkedSizes {
        memory_stored: 0,
        all_stored: 0,
    };
    for (hash, stored) in rows {
        sizes.all_stored += stored as u64;
        if memory.contains(&hash_of(&hash)?) {
            sizes.memory_stored += stored as u64;
        }
    }
    Ok(sizes)
}

/// Before a snapshot's references go: the chunks only it references become
/// orphaned now.
pub(super) async fn orphan_chunks_of(
    tx: &mut Transaction<'_, Sqlite>,
    snapshot_id: &str,
    owner_id: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE chunks SET orphaned_at = ? WHERE owner_id = ? AND orphaned_at IS NULL
         AND hash IN (SELECT hash FROM chunk_refs WHERE snapshot_id = ?)
         AND NOT EXISTS (SELECT 1 FROM chunk_refs o WHERE o.owner_id = chunks.owner_id
                         AND o.hash = chunks.hash AND o.snapshot_id != ?)",
    )
    .bind(unix_now())
    .bind(owner_id)
    .bind(snapshot_id)
    .bind(snapshot_id)
    .execute(&mut **tx)
    .await?;
    sqlx::query("DELETE FROM chunk_refs WHERE snapshot_id = ?")
        .bind(snapshot_id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM manifests WHERE snapshot_id = ?")
        .bind(snapshot_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
