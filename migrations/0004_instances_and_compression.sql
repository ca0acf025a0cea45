-- VMs get Hypeman's optional instance name (unique per owner), the snapshot a
-- `snapshotted` VM resumes from, the address its guest memory believes it has
-- (set only for a fork of another VM's memory) and its own snapshot compression default.
ALTER TABLE vms ADD COLUMN name TEXT;
ALTER TABLE vms ADD COLUMN standby_snapshot_id TEXT;
ALTER TABLE vms ADD COLUMN inner_ip TEXT;
ALTER TABLE vms ADD COLUMN inner_mac TEXT;
ALTER TABLE vms ADD COLUMN snapshot_compression TEXT;
CREATE UNIQUE INDEX vms_name_per_owner ON vms (owner_id, name) WHERE name IS NOT NULL;

-- Where the compressed memory object lives once background compression finished.
ALTER TABLE snapshots ADD COLUMN compressed_key TEXT;
ALTER TABLE snapshots ADD COLUMN compressed_sha256 TEXT;
