-- Owners hold API keys and own VMs, images and templates.
CREATE TABLE owners (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    owner_id    TEXT NOT NULL REFERENCES owners(id),
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

-- owner_id NULL: a system image (img_default) that every owner can use.
-- dir: the versioned directory under the data dir holding the imported files.
CREATE TABLE images (
    id           TEXT PRIMARY KEY,
    owner_id     TEXT REFERENCES owners(id),
    name         TEXT,
    kernel_path  TEXT NOT NULL,
    initrd_path  TEXT,
    rootfs_path  TEXT NOT NULL,
    boot_args    TEXT,
    dir          TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);

CREATE TABLE templates (
    id           TEXT PRIMARY KEY,
    owner_id     TEXT NOT NULL REFERENCES owners(id),
    name         TEXT NOT NULL,
    description  TEXT,
    image_id     TEXT,
    user_data    TEXT,
    vcpu_count   INTEGER,
    mem_mib      INTEGER,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    UNIQUE (owner_id, name)
);

-- image_dir pins the exact image files a VM was created from, so re-seeding
-- img_default never changes the kernel or backing disk under an existing VM.
CREATE TABLE vms (
    id              TEXT PRIMARY KEY,
    owner_id        TEXT NOT NULL REFERENCES owners(id),
    image_id        TEXT NOT NULL,
    image_dir       TEXT NOT NULL,
    template_id     TEXT,
    state           TEXT NOT NULL,
    vcpu_count      INTEGER NOT NULL,
    mem_mib         INTEGER NOT NULL,
    boot_args       TEXT NOT NULL,
    enable_network  INTEGER NOT NULL,
    user_data       TEXT,
    guest_ip        TEXT,
    guest_mac       TEXT,
    tap_name        TEXT,
    ssh_port        INTEGER,
    hypervisor      TEXT NOT NULL,
    last_error      TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
CREATE INDEX vms_by_owner ON vms (owner_id, created_at);
