-- Proxy routes: `{subdomain}.{base_domain}` -> the VM's guest_ip:target_port.
-- A subdomain names one route host-wide; a VM's routes go with it.
CREATE TABLE routes (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    owner_id TEXT NOT NULL,
    subdomain TEXT NOT NULL UNIQUE,
    target_port INTEGER NOT NULL,
    auto_wake INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL
);
CREATE INDEX routes_vm ON routes (vm_id);

-- Idle sleep per VM: off when auto_sleep is 0; its own timeout, or the
-- server's HATCH_IDLE_TIMEOUT when NULL. And when it last slept and woke.
ALTER TABLE vms ADD COLUMN auto_sleep INTEGER NOT NULL DEFAULT 1;
ALTER TABLE vms ADD COLUMN idle_timeout_seconds INTEGER;
ALTER TABLE vms ADD COLUMN last_sleep_at TEXT;
ALTER TABLE vms ADD COLUMN last_wake_at TEXT;
