-- Chunked snapshots (issue 13). A snapshot's memory and disk are ordered
-- lists of content-defined chunks; each chunk is stored once per owner and
-- shared by every snapshot of that owner that holds the same bytes.
--
-- `layout` says how a snapshot's memory and disk are stored: 'objects' (one
-- whole object each, the format before chunks; converted at start-up) or
-- 'chunks' (manifests below).
ALTER TABLE snapshots ADD COLUMN layout TEXT NOT NULL DEFAULT 'objects';

-- A chunk in the object store: `hash` is the BLAKE3 of its raw bytes,
-- `encoding` NULL for raw or the compression algorithm it is stored with.
-- `orphaned_at` (unix seconds) is set when the last manifest referencing it
-- went; collection removes it once that is older than the grace period, and a
-- new manifest referencing it first clears it.
CREATE TABLE chunks (
    owner_id     TEXT NOT NULL,
    hash         BLOB NOT NULL,
    raw_size     INTEGER NOT NULL,
    stored_size  INTEGER NOT NULL,
    encoding     TEXT,
    orphaned_at  INTEGER,
    PRIMARY KEY (owner_id, hash)
) WITHOUT ROWID;
CREATE INDEX chunks_orphaned ON chunks (orphaned_at) WHERE orphaned_at IS NOT NULL;

-- A snapshot part's ordered chunk list: n entries of 36 bytes (the 32-byte
-- hash, then the raw size as a little-endian u32).
CREATE TABLE manifests (
    snapshot_id  TEXT NOT NULL,
    part         TEXT NOT NULL,
    entries      BLOB NOT NULL,
    PRIMARY KEY (snapshot_id, part)
);

-- Which snapshots reference which chunks (each pair once): what collection
-- and the orphan marks are computed from.
CREATE TABLE chunk_refs (
    owner_id     TEXT NOT NULL,
    hash         BLOB NOT NULL,
    snapshot_id  TEXT NOT NULL,
    PRIMARY KEY (owner_id, hash, snapshot_id)
) WITHOUT ROWID;
CREATE INDEX chunk_refs_by_snapshot ON chunk_refs (snapshot_id);
