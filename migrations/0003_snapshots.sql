-- A snapshot is listed as usable only once every object is stored and
-- checksummed (status 'ready'); 'capturing' rows are removed at start-up.
CREATE TABLE snapshots (
    id                      TEXT PRIMARY KEY,
    vm_id                   TEXT NOT NULL,
    owner_id                TEXT NOT NULL REFERENCES owners(id),
    kind                    TEXT NOT NULL,
    name                    TEXT,
    tags                    TEXT NOT NULL DEFAULT '{}',
    status                  TEXT NOT NULL,
    source_hypervisor       TEXT NOT NULL,
    source_instance_name    TEXT,
    vm_config               TEXT NOT NULL,
    state_key               TEXT NOT NULL,
    memory_key              TEXT NOT NULL,
    disk_key                TEXT NOT NULL,
    state_sha256            TEXT,
    state_size              INTEGER,
    memory_sha256           TEXT,
    memory_size             INTEGER,
    disk_sha256             TEXT,
    disk_size               INTEGER,
    size_bytes              INTEGER NOT NULL DEFAULT 0,
    compression             TEXT,
    compression_state       TEXT NOT NULL DEFAULT 'none',
    compressed_size_bytes   INTEGER,
    compression_error       TEXT,
    created_at              TEXT NOT NULL
);
CREATE INDEX snapshots_by_vm ON snapshots (vm_id, created_at);
CREATE UNIQUE INDEX snapshots_name_per_vm ON snapshots (vm_id, name) WHERE name IS NOT NULL;
