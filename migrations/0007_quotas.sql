-- Per-owner limits set by the operator (`hatch owners limits`). A NULL
-- column means the server-wide default (HATCH_QUOTA_*) applies.
CREATE TABLE owner_limits (
    owner_id TEXT PRIMARY KEY REFERENCES owners (id) ON DELETE CASCADE,
    vms INTEGER,
    vcpus INTEGER,
    mem_mib INTEGER,
    snapshots_per_vm INTEGER,
    stored_bytes INTEGER,
    updated_at TEXT NOT NULL
);
