//! Durable state in SQLite: owners, API keys, images, templates and VMs.
//!
//! Every query is a static SQL string with bound parameters; schema changes
//! are versioned migrations under `migrations/`, applied at start-up.

use crate::domain::{
    ip_text, CompressionState, Json, MacAddr, SnapshotKind, SnapshotStatus, StoredIp, Tags,
    VmConfig, VmState,
};
use crate::snapshot::CompressionConfig;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{FromRow, SqlitePool};
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

mod chunks;
mod lists;
mod packed;
pub use chunks::{unix_now, ChunkedSizes, CHUNKED, DISK, MEMORY};
pub use lists::{ListPos, Listed, Page, SnapshotMatch};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Conflict(String),
    /// A row that cannot be what we wrote (a manifest of the wrong length).
    #[error("corrupt snapshot record: {0}")]
    Corrupt(String),
    /// A write the state table does not allow, or a row that is no longer
    /// in the state the caller read: a bug, never a user's doing.
    #[error("internal error: {what} {id} cannot go from {from} to {to}")]
    Transition {
        what: &'static str,
        id: String,
        from: String,
        to: String,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Current time in the API's timestamp format (RFC 3339, seconds, `Z`).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[derive(Debug, Clone, FromRow)]
pub struct Owner {
    pub id: String,
    pub name: String,
    pub created_at: String,
}

#[derive(Debug, Clone, FromRow)]
pub struct ApiKey {
    pub id: String,
    pub owner_id: String,
    pub name: String,
    pub prefix: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

#[derive(Debug, Clone, FromRow)]
pub struct Image {
    pub id: String,
    pub owner_id: Option<String>,
    pub name: Option<String>,
    pub kernel_path: String,
    pub initrd_path: Option<String>,
    pub rootfs_path: String,
    pub boot_args: Option<String>,
    pub dir: String,
    pub fingerprint: String,
    pub created_at: String,
    pub updated_at: String,
    /// `default`, `import` or `upload` (see migrations/0006).
    pub source: String,
    /// The stored files' lengths added up.
    pub size_bytes: i64,
    pub has_initrd: bool,
}

#[derive(Debug, Clone, FromRow)]
pub struct Template {
    pub id: String,
    pub owner_id: String,
    pub name: String,
    pub description: Option<String>,
    pub image_id: Option<String>,
    pub user_data: Option<String>,
    pub vcpu_count: Option<i64>,
    pub mem_mib: Option<i64>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, FromRow)]
pub struct Vm {
    pub id: String,
    pub owner_id: String,
    pub image_id: String,
    pub image_dir: String,
    pub template_id: Option<String>,
    pub state: VmState,
    pub vcpu_count: i64,
    pub mem_mib: i64,
    pub boot_args: String,
    pub enable_network: bool,
    /// None in VMs read by a list (`list_vms_page`, `all_vms`, ...: see
    /// src/store/packed.rs); `get_vm` reads it.
    pub user_data: Option<String>,
    #[sqlx(try_from = "StoredIp")]
    pub guest_ip: Option<Ipv4Addr>,
    pub guest_mac: Option<MacAddr>,
    pub tap_name: Option<String>,
    pub ssh_port: Option<i64>,
    pub hypervisor: String,
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// Hypeman's instance name, unique per owner.
    pub name: Option<String>,
    /// The snapshot a `snapshotted` VM resumes from.
    pub standby_snapshot_id: Option<String>,
    /// The address and MAC the guest's memory believes it has, when they are
    /// not its own (a fork of another VM's memory); None otherwise.
    #[sqlx(try_from = "StoredIp")]
    pub inner_ip: Option<Ipv4Addr>,
    pub inner_mac: Option<MacAddr>,
    /// This VM's default for snapshot compression (JSON of the Hypeman API's config).
    pub snapshot_compression: Option<Json<CompressionConfig>>,
    /// Idle sleep: false opts the VM out.
    pub auto_sleep: bool,
    /// The VM's own idle timeout; the server's when None.
    pub idle_timeout_seconds: Option<i64>,
    pub last_sleep_at: Option<String>,
    pub last_wake_at: Option<String>,
    /// The SSH principal the guest trusts when it is not this VM's id (a
    /// fork resumed from another VM's memory, until the daemon rewrites the
    /// guest's principals file); None: the VM's own id.
    pub guest_principal: Option<String>,
}

/// What a new VM is made of. Everything else about it starts out empty:
/// no network allocation yet, no error, no standby snapshot, never slept.
#[derive(Debug, Clone)]
pub struct NewVm {
    pub owner_id: String,
    pub image_id: String,
    pub image_dir: String,
    pub template_id: Option<String>,
    pub vcpu_count: i64,
    pub mem_mib: i64,
    pub boot_args: String,
    pub enable_network: bool,
    pub user_data: Option<String>,
    pub hypervisor: String,
    pub name: Option<String>,
    pub snapshot_compression: Option<Json<CompressionConfig>>,
    pub auto_sleep: bool,
    pub idle_timeout_seconds: Option<i64>,
}

impl Vm {
    /// A VM about to be inserted: a fresh id, `starting`, made now. The one
    /// place a VM row is built (create and fork both come here).
    pub fn new(new: NewVm) -> Vm {
        let now = now();
        Vm {
            id: crate::ids::new_id("vm"),
            owner_id: new.owner_id,
            image_id: new.image_id,
            image_dir: new.image_dir,
            template_id: new.template_id,
            state: VmState::Starting,
            vcpu_count: new.vcpu_count,
            mem_mib: new.mem_mib,
            boot_args: new.boot_args,
            enable_network: new.enable_network,
            user_data: new.user_data,
            guest_ip: None,
            guest_mac: None,
            tap_name: None,
            ssh_port: None,
            hypervisor: new.hypervisor,
            last_error: None,
            created_at: now.clone(),
            updated_at: now,
            name: new.name,
            standby_snapshot_id: None,
            inner_ip: None,
            inner_mac: None,
            snapshot_compression: new.snapshot_compression,
            auto_sleep: new.auto_sleep,
            idle_timeout_seconds: new.idle_timeout_seconds,
            last_sleep_at: None,
            last_wake_at: None,
            guest_principal: None,
        }
    }
}

/// What every VM holds host-wide (allocations never repeat across VMs).
#[derive(Debug, Default)]
pub struct NetworkAllocations {
    pub ips: std::collections::HashSet<Ipv4Addr>,
    pub macs: std::collections::HashSet<MacAddr>,
    pub ports: std::collections::HashSet<u16>,
}

/// A proxy route: `{subdomain}.{base_domain}` -> the VM's `guest_ip:target_port`.
#[derive(Debug, Clone, FromRow)]
pub struct Route {
    pub id: String,
    pub vm_id: String,
    pub owner_id: String,
    pub subdomain: String,
    pub target_port: i64,
    pub auto_wake: bool,
    pub created_at: String,
}

#[derive(Debug, Clone, FromRow)]
pub struct Snapshot {
    pub id: String,
    pub vm_id: String,
    pub owner_id: String,
    pub kind: SnapshotKind,
    pub name: Option<String>,
    pub tags: Json<Tags>,
    pub status: SnapshotStatus,
    pub source_hypervisor: String,
    pub source_instance_name: Option<String>,
    pub vm_config: Json<VmConfig>,
    pub state_key: String,
    pub memory_key: String,
    pub disk_key: String,
    pub state_sha256: Option<String>,
    pub state_size: Option<i64>,
    pub memory_sha256: Option<String>,
    pub memory_size: Option<i64>,
    pub disk_sha256: Option<String>,
    pub disk_size: Option<i64>,
    pub size_bytes: i64,
    pub compression: Option<Json<CompressionConfig>>,
    pub compression_state: CompressionState,
    pub compressed_size_bytes: Option<i64>,
    pub compression_error: Option<String>,
    pub created_at: String,
    pub compressed_key: Option<String>,
    pub compressed_sha256: Option<String>,
    /// `objects` (memory and disk as whole objects, the format before
    /// chunks) or `chunks` (manifests; see store/chunks.rs).
    pub layout: String,
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

/// Refuses a snapshot write its state table does not allow.
fn check_snapshot_move(
    id: &str,
    what: &'static str,
    from: impl std::fmt::Display,
    to: impl std::fmt::Display,
    allowed: bool,
) -> Result<()> {
    if allowed {
        return Ok(());
    }
    Err(StoreError::Transition {
        what,
        id: id.to_string(),
        from: from.to_string(),
        to: to.to_string(),
    })
}

/// A conditional update that changed nothing: the row was not (or no
/// longer) in the state the caller read, so the move did not happen.
fn stayed_as_read(
    id: &str,
    what: &'static str,
    from: impl std::fmt::Display,
    to: impl std::fmt::Display,
    rows: u64,
) -> Result<()> {
    check_snapshot_move(id, what, from, to, rows == 1)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

impl Store {
    /// A transaction that takes the write lock at once (`BEGIN IMMEDIATE`):
    /// one that reads first and writes later can find another writer
    /// committed in between and fail with "database is locked" at once,
    /// whatever the busy timeout; this one waits its turn instead.
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Opens (creating if needed) the SQLite file and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Store> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a state change the API reported must survive power loss.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store { pool })
    }

    // ---- owners and keys ----

    pub async fn create_owner(&self, id: &str, name: &str) -> Result<Owner> {
        let created_at = now();
        sqlx::query("INSERT INTO owners (id, name, created_at) VALUES (?, ?, ?)")
            .bind(id)
            .bind(name)
            .bind(&created_at)
            .execute(&self.pool)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("an owner named {name:?} already exists"))
                } else {
                    e.into()
                }
            })?;
        Ok(Owner {
            id: id.into(),
            name: name.into(),
            created_at,
        })
    }

    /// Finds an owner by id or by name.
    pub async fn find_owner(&self, id_or_name: &str) -> Result<Option<Owner>> {
        Ok(
            sqlx::query_as("SELECT * FROM owners WHERE id = ? OR name = ?")
                .bind(id_or_name)
                .bind(id_or_name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn insert_api_key(&self, key: &ApiKey, key_hash: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, owner_id, name, key_hash, prefix, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&key.id)
        .bind(&key.owner_id)
        .bind(&key.name)
        .bind(key_hash)
        .bind(&key.prefix)
        .bind(&key.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The owner of a live (not revoked) key with this hash.
    pub async fn owner_by_key_hash(&self, key_hash: &str) -> Result<Option<Owner>> {
        Ok(sqlx::query_as(
            "SELECT o.* FROM owners o JOIN api_keys k ON k.owner_id = o.id WHERE k.key_hash = ? AND k.revoked_at IS NULL",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The owner an external identity service (`provider`) knows as
    /// `external_id`, made on first sight with id `new_id` and name `name`.
    /// Two first requests racing for the same user end with one owner.
    pub async fn external_owner(
        &self,
        provider: &str,
        external_id: &str,
        new_id: &str,
        name: &str,
    ) -> Result<Owner> {
        // Twice: a loser of the race for the first insert finds the winner's row.
        for _ in 0..2 {
            let found: Option<Owner> = sqlx::query_as(
                "SELECT o.* FROM owners o JOIN external_owners e ON e.owner_id = o.id WHERE e.provider = ? AND e.external_id = ?",
            )
            .bind(provider)
            .bind(external_id)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(owner) = found {
                return Ok(owner);
            }
            let created_at = now();
            let mut tx = self.pool.begin().await?;
            let inserted = async {
                sqlx::query("INSERT INTO owners (id, name, created_at) VALUES (?, ?, ?)")
                    .bind(new_id)
                    .bind(name)
                    .bind(&created_at)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO external_owners (provider, external_id, owner_id, created_at) VALUES (?, ?, ?, ?)",
                )
                .bind(provider)
                .bind(external_id)
                .bind(new_id)
                .bind(&created_at)
                .execute(&mut *tx)
                .await
            }
            .await;
            match inserted {
                Ok(_) => {
                    tx.commit().await?;
                    return Ok(Owner {
                        id: new_id.into(),
                        name: name.into(),
                        created_at,
                    });
                }
                // Dropping `tx` rolls the owner row back.
                Err(e) if is_unique_violation(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict(format!(
            "an owner named {name:?} already exists and is not the {provider} user {external_id:?}"
        )))
    }

    pub async fn list_api_keys(&self) -> Result<Vec<(ApiKey, String)>> {
        let keys: Vec<ApiKey> = sqlx::query_as(
            "SELECT id, owner_id, name, prefix, created_at, revoked_at FROM api_keys ORDER BY created_at, rowid",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let owner: (String,) = sqlx::query_as("SELECT name FROM owners WHERE id = ?")
                .bind(&k.owner_id)
                .fetch_one(&self.pool)
                .await?;
            out.push((k, owner.0));
        }
        Ok(out)
    }

    /// Revokes a key; false when no live key has this id.
    pub async fn revoke_api_key(&self, id: &str) -> Result<bool> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(now())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    // ---- images ----

    pub async fn insert_image(&self, img: &Image) -> Result<()> {
        sqlx::query(
            "INSERT INTO images (id, owner_id, name, kernel_path, initrd_path, rootfs_path, boot_args, dir, fingerprint, created_at, updated_at, source, size_bytes, has_initrd)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&img.id)
        .bind(&img.owner_id)
        .bind(&img.name)
        .bind(&img.kernel_path)
        .bind(&img.initrd_path)
        .bind(&img.rootfs_path)
        .bind(&img.boot_args)
        .bind(&img.dir)
        .bind(&img.fingerprint)
        .bind(&img.created_at)
        .bind(&img.updated_at)
        .bind(&img.source)
        .bind(img.size_bytes)
        .bind(img.has_initrd)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Replaces the files and source paths of an existing image (re-seeding img_default).
    pub async fn update_image(&self, img: &Image) -> Result<()> {
        sqlx::query(
            "UPDATE images SET kernel_path = ?, initrd_path = ?, rootfs_path = ?, boot_args = ?, dir = ?, fingerprint = ?, updated_at = ?, size_bytes = ?, has_initrd = ? WHERE id = ?",
        )
        .bind(&img.kernel_path)
        .bind(&img.initrd_path)
        .bind(&img.rootfs_path)
        .bind(&img.boot_args)
        .bind(&img.dir)
        .bind(&img.fingerprint)
        .bind(&img.updated_at)
        .bind(img.size_bytes)
        .bind(img.has_initrd)
        .bind(&img.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_image(&self, id: &str) -> Result<Option<Image>> {
        Ok(sqlx::query_as("SELECT * FROM images WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Images this owner can see: its own and the system ones.
    pub async fn list_images(&self, owner_id: &str) -> Result<Vec<Image>> {
        let all = self.list_images_page(owner_id, &Page::all()).await?;
        Ok(all.into_iter().map(|l| l.row).collect())
    }

    pub async fn delete_image(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM images WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// How many VMs and templates refer to this image.
    pub async fn image_users(&self, id: &str) -> Result<(i64, i64)> {
        let vms: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM vms WHERE image_id = ?")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        let tpls: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM templates WHERE image_id = ?")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok((vms.0, tpls.0))
    }

    /// Bytes stored for this owner's images (for quotas).
    pub async fn image_bytes_of_owner(&self, owner_id: &str) -> Result<i64> {
        let (n,): (i64,) =
            sqlx::query_as("SELECT COALESCE(SUM(size_bytes), 0) FROM images WHERE owner_id = ?")
                .bind(owner_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(n)
    }

    /// Images registered before sizes were recorded (migration 0006).
    pub async fn images_without_size(&self) -> Result<Vec<Image>> {
        Ok(sqlx::query_as("SELECT * FROM images WHERE size_bytes = 0")
            .fetch_all(&self.pool)
            .await?)
    }

    pub async fn set_image_size(&self, id: &str, size_bytes: i64) -> Result<()> {
        sqlx::query("UPDATE images SET size_bytes = ? WHERE id = ?")
            .bind(size_bytes)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Image directories that some VM still boots from.
    pub async fn image_dirs_in_use(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT DISTINCT image_dir FROM vms")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    // ---- templates ----

    pub async fn insert_template(&self, t: &Template) -> Result<()> {
        sqlx::query(
            "INSERT INTO templates (id, owner_id, name, description, image_id, user_data, vcpu_count, mem_mib, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(&t.owner_id)
        .bind(&t.name)
        .bind(&t.description)
        .bind(&t.image_id)
        .bind(&t.user_data)
        .bind(t.vcpu_count)
        .bind(t.mem_mib)
        .bind(&t.created_at)
        .bind(&t.updated_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("a template named {:?} already exists", t.name))
            } else {
                e.into()
            }
        })?;
        Ok(())
    }

    pub async fn get_template(&self, owner_id: &str, id: &str) -> Result<Option<Template>> {
        Ok(
            sqlx::query_as("SELECT * FROM templates WHERE id = ? AND owner_id = ?")
                .bind(id)
                .bind(owner_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn list_templates(&self, owner_id: &str) -> Result<Vec<Template>> {
        let all = self.list_templates_page(owner_id, &Page::all()).await?;
        Ok(all.into_iter().map(|l| l.row).collect())
    }

    pub async fn delete_template(&self, owner_id: &str, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM templates WHERE id = ? AND owner_id = ?")
            .bind(id)
            .bind(owner_id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    // ---- vms ----

    /// Addresses, MACs and ports held by any VM (allocations are host-wide).
    pub async fn network_allocations(&self) -> Result<NetworkAllocations> {
        let rows: Vec<(StoredIp, Option<MacAddr>, Option<i64>)> =
            sqlx::query_as("SELECT guest_ip, guest_mac, ssh_port FROM vms")
                .fetch_all(&self.pool)
                .await?;
        let mut taken = NetworkAllocations::default();
        for (ip, mac, port) in rows {
            taken.ips.extend(Option::<Ipv4Addr>::from(ip));
            taken.macs.extend(mac);
            taken.ports.extend(port.and_then(|p| u16::try_from(p).ok()));
        }
        Ok(taken)
    }

    pub async fn insert_vm(&self, vm: &Vm) -> Result<()> {
        let inserted = sqlx::query(
            "INSERT INTO vms (id, owner_id, image_id, image_dir, template_id, state, vcpu_count, mem_mib, boot_args,
                              enable_network, user_data, guest_ip, guest_mac, tap_name, ssh_port, hypervisor,
                              last_error, created_at, updated_at, name, standby_snapshot_id, inner_ip,
                              inner_mac, snapshot_compression, auto_sleep, idle_timeout_seconds)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&vm.id)
        .bind(&vm.owner_id)
        .bind(&vm.image_id)
        .bind(&vm.image_dir)
        .bind(&vm.template_id)
        .bind(vm.state)
        .bind(vm.vcpu_count)
        .bind(vm.mem_mib)
        .bind(&vm.boot_args)
        .bind(vm.enable_network)
        .bind(&vm.user_data)
        .bind(ip_text(vm.guest_ip))
        .bind(vm.guest_mac)
        .bind(&vm.tap_name)
        .bind(vm.ssh_port)
        .bind(&vm.hypervisor)
        .bind(&vm.last_error)
        .bind(&vm.created_at)
        .bind(&vm.updated_at)
        .bind(&vm.name)
        .bind(&vm.standby_snapshot_id)
        .bind(ip_text(vm.inner_ip))
        .bind(vm.inner_mac)
        .bind(&vm.snapshot_compression)
        .bind(vm.auto_sleep)
        .bind(vm.idle_timeout_seconds)
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => Ok(()),
            // Which unique index refused it: a name is the caller's choice;
            // anything else is an allocation someone else holds.
            Err(e) if is_unique_violation(&e) => match &vm.name {
                Some(name) if self.vm_name_taken(&vm.owner_id, name).await? => Err(
                    StoreError::Conflict(format!("an instance named {name:?} already exists")),
                ),
                _ => Err(StoreError::Conflict(format!(
                    "a network allocation of vm {} is already taken: {e}",
                    vm.id
                ))),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Does the owner have a VM with this name already?
    async fn vm_name_taken(&self, owner_id: &str, name: &str) -> Result<bool> {
        let (n,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM vms WHERE owner_id = ? AND name = ?")
                .bind(owner_id)
                .bind(name)
                .fetch_one(&self.pool)
                .await?;
        Ok(n > 0)
    }

    /// Persists a state change (and the reason, for `error`), returning the new updated_at.
    pub async fn set_vm_state(
        &self,
        id: &str,
        state: VmState,
        last_error: Option<&str>,
    ) -> Result<String> {
        let updated_at = now();
        sqlx::query("UPDATE vms SET state = ?, last_error = ?, updated_at = ? WHERE id = ?")
            .bind(state)
            .bind(last_error)
            .bind(&updated_at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(updated_at)
    }

    /// Records (or clears) the snapshot a VM resumes from.
    pub async fn set_vm_standby(&self, id: &str, snapshot_id: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE vms SET standby_snapshot_id = ? WHERE id = ?")
            .bind(snapshot_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the backend a VM runs on now (a restore that moved its disk to another).
    pub async fn set_vm_hypervisor(&self, id: &str, hypervisor: &str) -> Result<()> {
        sqlx::query("UPDATE vms SET hypervisor = ? WHERE id = ?")
            .bind(hypervisor)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the address and MAC the guest's memory believes it has (None: its own).
    pub async fn set_vm_inner_address(
        &self,
        id: &str,
        ip: Option<Ipv4Addr>,
        mac: Option<MacAddr>,
    ) -> Result<()> {
        sqlx::query("UPDATE vms SET inner_ip = ?, inner_mac = ? WHERE id = ?")
            .bind(ip_text(ip))
            .bind(mac)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the SSH principal the guest trusts (None: the VM's own id).
    pub async fn set_vm_guest_principal(&self, id: &str, principal: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE vms SET guest_principal = ? WHERE id = ?")
            .bind(principal)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The settings `PATCH /vms/{id}` changes.
    pub async fn set_vm_settings(&self, vm: &Vm) -> Result<String> {
        let updated_at = now();
        sqlx::query(
            "UPDATE vms SET auto_sleep = ?, idle_timeout_seconds = ?, snapshot_compression = ?,
                            updated_at = ? WHERE id = ?",
        )
        .bind(vm.auto_sleep)
        .bind(vm.idle_timeout_seconds)
        .bind(&vm.snapshot_compression)
        .bind(&updated_at)
        .bind(&vm.id)
        .execute(&self.pool)
        .await?;
        Ok(updated_at)
    }

    /// Records an idle sleep (`slept`) or a wake on request, returning the time.
    pub async fn mark_vm_sleep_or_wake(&self, id: &str, slept: bool) -> Result<String> {
        let at = now();
        let sql = if slept {
            "UPDATE vms SET last_sleep_at = ? WHERE id = ?"
        } else {
            "UPDATE vms SET last_wake_at = ? WHERE id = ?"
        };
        sqlx::query(sql)
            .bind(&at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(at)
    }

    pub async fn get_vm(&self, id: &str) -> Result<Option<Vm>> {
        Ok(sqlx::query_as("SELECT * FROM vms WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn list_vms(&self, owner_id: &str) -> Result<Vec<Vm>> {
        let all = self.list_vms_page(owner_id, &Page::all()).await?;
        Ok(all.into_iter().map(|l| l.row).collect())
    }

    // ---- snapshots ----

    pub async fn insert_snapshot(&self, s: &Snapshot) -> Result<()> {
        sqlx::query(
            "INSERT INTO snapshots (id, vm_id, owner_id, kind, name, tags, status, source_hypervisor,
                                    source_instance_name, vm_config, state_key, memory_key, disk_key,
                                    compression, compression_state, created_at, layout)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&s.id)
        .bind(&s.vm_id)
        .bind(&s.owner_id)
        .bind(s.kind)
        .bind(&s.name)
        .bind(&s.tags)
        .bind(s.status)
        .bind(&s.source_hypervisor)
        .bind(&s.source_instance_name)
        .bind(&s.vm_config)
        .bind(&s.state_key)
        .bind(&s.memory_key)
        .bind(&s.disk_key)
        .bind(&s.compression)
        .bind(s.compression_state)
        .bind(&s.created_at)
        .bind(&s.layout)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!(
                    "a snapshot named {:?} already exists for instance {}",
                    s.name.as_deref().unwrap_or_default(),
                    s.vm_id
                ))
            } else {
                e.into()
            }
        })?;
        Ok(())
    }

    /// Background compression moved from `from` (what the caller read) to
    /// `s.compression_state`: `compressing`, `compressed` (with the compressed
    /// object) or `error` (with the reason; the raw memory stays).
    pub async fn set_snapshot_compression(
        &self,
        s: &Snapshot,
        from: CompressionState,
    ) -> Result<()> {
        let to = s.compression_state;
        check_snapshot_move(&s.id, "snapshot compression", from, to, from.can_become(to))?;
        let done = sqlx::query(
            "UPDATE snapshots SET compression_state = ?, compression_error = ?, compressed_key = ?,
                    compressed_sha256 = ?, compressed_size_bytes = ?, size_bytes = ?
             WHERE id = ? AND compression_state = ?",
        )
        .bind(to)
        .bind(&s.compression_error)
        .bind(&s.compressed_key)
        .bind(&s.compressed_sha256)
        .bind(s.compressed_size_bytes)
        .bind(s.size_bytes)
        .bind(&s.id)
        .bind(from)
        .execute(&self.pool)
        .await?;
        stayed_as_read(
            &s.id,
            "snapshot compression",
            from,
            to,
            done.rows_affected(),
        )
    }

    /// Usable snapshots whose compression has not finished (a restart interrupted it).
    pub async fn snapshots_in_compression(&self) -> Result<Vec<Snapshot>> {
        Ok(
            sqlx::query_as("SELECT * FROM snapshots WHERE status = ? AND compression_state = ?")
                .bind(SnapshotStatus::Ready)
                .bind(CompressionState::Compressing)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Usable snapshots whose memory is stored compressed.
    pub async fn compressed_snapshots(&self) -> Result<Vec<Snapshot>> {
        Ok(
            sqlx::query_as("SELECT * FROM snapshots WHERE status = ? AND compression_state = ?")
                .bind(SnapshotStatus::Ready)
                .bind(CompressionState::Compressed)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn get_snapshot(&self, id: &str) -> Result<Option<Snapshot>> {
        Ok(
            sqlx::query_as("SELECT * FROM snapshots WHERE id = ? AND status = ?")
                .bind(id)
                .bind(SnapshotStatus::Ready)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Usable snapshots of a VM, newest first.
    pub async fn vm_snapshots(&self, vm_id: &str) -> Result<Vec<Snapshot>> {
        Ok(sqlx::query_as(
            "SELECT * FROM snapshots WHERE vm_id = ? AND status = ? ORDER BY created_at DESC, rowid DESC",
        )
        .bind(vm_id)
        .bind(SnapshotStatus::Ready)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Usable snapshots of an owner, newest first.
    pub async fn owner_snapshots(&self, owner_id: &str) -> Result<Vec<Snapshot>> {
        let all = self
            .list_snapshots_page(owner_id, &SnapshotMatch::default(), &Page::all())
            .await?;
        Ok(all.into_iter().map(|l| l.row).collect())
    }

    /// Snapshots a crash left half-written.
    pub async fn unfinished_snapshots(&self) -> Result<Vec<Snapshot>> {
        Ok(sqlx::query_as("SELECT * FROM snapshots WHERE status != ?")
            .bind(SnapshotStatus::Ready)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Deletes a snapshot's row with its manifests and references; chunks
    /// no other snapshot references become orphaned (collected later).
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let owner: Option<(String,)> =
            sqlx::query_as("SELECT owner_id FROM snapshots WHERE id = ?")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((owner,)) = owner {
            chunks::orphan_chunks_of(&mut tx, id, &owner).await?;
        }
        sqlx::query("DELETE FROM snapshots WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// `delete_snapshot` of every snapshot of a VM, in one transaction.
    pub async fn delete_vm_snapshots(&self, vm_id: &str) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let snaps: Vec<(String, String)> =
            sqlx::query_as("SELECT id, owner_id FROM snapshots WHERE vm_id = ?")
                .bind(vm_id)
                .fetch_all(&mut *tx)
                .await?;
        for (id, owner) in &snaps {
            chunks::orphan_chunks_of(&mut tx, id, owner).await?;
        }
        sqlx::query("DELETE FROM snapshots WHERE vm_id = ?")
            .bind(vm_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn delete_vm(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM vms WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- proxy routes ----

    pub async fn insert_route(&self, r: &Route) -> Result<()> {
        sqlx::query(
            "INSERT INTO routes (id, vm_id, owner_id, subdomain, target_port, auto_wake, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(&r.vm_id)
        .bind(&r.owner_id)
        .bind(&r.subdomain)
        .bind(r.target_port)
        .bind(r.auto_wake)
        .bind(&r.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("subdomain {:?} is already taken", r.subdomain))
            } else {
                e.into()
            }
        })?;
        Ok(())
    }

    pub async fn vm_routes(&self, vm_id: &str) -> Result<Vec<Route>> {
        Ok(
            sqlx::query_as("SELECT * FROM routes WHERE vm_id = ? ORDER BY created_at, rowid")
                .bind(vm_id)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn all_routes(&self) -> Result<Vec<Route>> {
        Ok(sqlx::query_as("SELECT * FROM routes ORDER BY rowid")
            .fetch_all(&self.pool)
            .await?)
    }

    /// The VM of an owner's route; None when the owner has no such route.
    pub async fn route_vm(&self, owner_id: &str, id: &str) -> Result<Option<String>> {
        let vm: Option<(String,)> =
            sqlx::query_as("SELECT vm_id FROM routes WHERE id = ? AND owner_id = ?")
                .bind(id)
                .bind(owner_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(vm.map(|(v,)| v))
    }

    /// Deletes one route of `vm_id`; false when it has no such route.
    pub async fn delete_route(&self, vm_id: &str, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM routes WHERE id = ? AND vm_id = ?")
            .bind(id)
            .bind(vm_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn delete_vm_routes(&self, vm_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM routes WHERE vm_id = ?")
            .bind(vm_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// An owner's own limits (`owner_limits`); a None field means the server's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, FromRow)]
pub struct OwnerLimits {
    pub vms: Option<i64>,
    pub vcpus: Option<i64>,
    pub mem_mib: Option<i64>,
    pub snapshots_per_vm: Option<i64>,
    pub stored_bytes: Option<i64>,
}

/// What an owner holds, as the quotas count it: every VM in any state, and
/// the stored bytes of every snapshot and image it registered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnerUsage {
    pub vms: i64,
    pub vcpus: i64,
    pub mem_mib: i64,
    pub stored_bytes: i64,
}

impl Store {
    // ---- quotas ----

    pub async fn owner_limits(&self, owner_id: &str) -> Result<OwnerLimits> {
        Ok(sqlx::query_as(
            "SELECT vms, vcpus, mem_mib, snapshots_per_vm, stored_bytes
             FROM owner_limits WHERE owner_id = ?",
        )
        .bind(owner_id)
        .fetch_optional(&self.pool)
        .await?
        .unwrap_or_default())
    }

    /// Replaces an owner's own limits (all None: the server's defaults again).
    pub async fn set_owner_limits(&self, owner_id: &str, l: &OwnerLimits) -> Result<()> {
        sqlx::query(
            "INSERT INTO owner_limits
                 (owner_id, vms, vcpus, mem_mib, snapshots_per_vm, stored_bytes, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (owner_id) DO UPDATE SET
                 vms = excluded.vms, vcpus = excluded.vcpus, mem_mib = excluded.mem_mib,
                 snapshots_per_vm = excluded.snapshots_per_vm,
                 stored_bytes = excluded.stored_bytes, updated_at = excluded.updated_at",
        )
        .bind(owner_id)
        .bind(l.vms)
        .bind(l.vcpus)
        .bind(l.mem_mib)
        .bind(l.snapshots_per_vm)
        .bind(l.stored_bytes)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn owner_usage(&self, owner_id: &str) -> Result<OwnerUsage> {
        let (vms, vcpus, mem_mib): (i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(vcpu_count), 0), COALESCE(SUM(mem_mib), 0)
             FROM vms WHERE owner_id = ?",
        )
        .bind(owner_id)
        .fetch_one(&self.pool)
        .await?;
        // Rows still capturing count 0 until their objects are stored. A
        // chunked snapshot's own objects are its device state; its chunks
        // count once per owner however many snapshots share them.
        let (whole, states): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(CASE WHEN layout = ? THEN 0 ELSE size_bytes END), 0),
                    COALESCE(SUM(CASE WHEN layout = ? THEN COALESCE(state_size, 0) ELSE 0 END), 0)
             FROM snapshots WHERE owner_id = ?",
        )
        .bind(CHUNKED)
        .bind(CHUNKED)
        .bind(owner_id)
        .fetch_one(&self.pool)
        .await?;
        let snapshot_bytes = whole + states + self.owner_chunk_bytes(owner_id).await?;
        Ok(OwnerUsage {
            vms,
            vcpus,
            mem_mib,
            stored_bytes: snapshot_bytes + self.image_bytes_of_owner(owner_id).await?,
        })
    }

    /// Memory promised to the VMs that hold it now (starting, running,
    /// stopping) but `except`: (their number, the sum of their mem_mib).
    pub async fn memory_holders(&self, except: &str) -> Result<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(mem_mib), 0) FROM vms
             WHERE state IN (?, ?, ?) AND id != ?",
        )
        .bind(VmState::Starting)
        .bind(VmState::Running)
        .bind(VmState::Stopping)
        .bind(except)
        .fetch_one(&self.pool)
        .await?)
    }

    /// How many VMs are in each state, host-wide (for `GET /metrics`). Text
    /// a daemon does not know reads as `error`, so that state may come twice.
    pub async fn vm_count_by_state(&self) -> Result<Vec<(VmState, i64)>> {
        Ok(
            sqlx::query_as("SELECT state, COUNT(*) FROM vms GROUP BY state")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Snapshots of a VM in any status (one being captured counts already).
    pub async fn vm_snapshot_count(&self, vm_id: &str) -> Result<i64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM snapshots WHERE vm_id = ?")
            .bind(vm_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real SQLite file in a fresh directory, removed afterwards.
    struct TempStore {
        dir: std::path::PathBuf,
        store: Store,
    }

    impl TempStore {
        async fn new() -> TempStore {
            let dir = std::env::temp_dir().join(format!(
                "hatch-store-test-{}-{}",
                std::process::id(),
                crate::ids::random_string(8)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let store = Store::open(&dir.join("hatch.db")).await.unwrap();
            TempStore { dir, store }
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test]
    async fn external_users_get_one_owner_each_even_when_racing() {
        let t = TempStore::new().await;
        let first = |user: &'static str| {
            let store = t.store.clone();
            tokio::spawn(async move {
                store
                    .external_owner(
                        "better-auth",
                        user,
                        &crate::ids::new_id("own"),
                        &format!("better-auth:{user}"),
                    )
                    .await
                    .unwrap()
            })
        };
        let racers: Vec<_> = (0..8).map(|_| first("u1")).collect();
        let mut ids = vec![];
        for r in racers {
            ids.push(r.await.unwrap().id);
        }
        ids.dedup();
        assert_eq!(ids.len(), 1, "one owner for u1: {ids:?}");
        let again = first("u1").await.unwrap();
        assert_eq!(again.id, ids[0]);
        assert_eq!(again.name, "better-auth:u1");
        let other = first("u2").await.unwrap();
        assert_ne!(other.id, ids[0]);
        let (owners,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM owners")
            .fetch_one(&t.store.pool)
            .await
            .unwrap();
        assert_eq!(owners, 2);
    }

    #[tokio::test]
    async fn an_operator_owner_with_the_same_name_is_not_taken_over() {
        let t = TempStore::new().await;
        let squatter = t
            .store
            .create_owner("own_op", "better-auth:u1")
            .await
            .unwrap();
        let e = t
            .store
            .external_owner("better-auth", "u1", "own_new", "better-auth:u1")
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{e}");
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM owners")
            .fetch_one(&t.store.pool)
            .await
            .unwrap();
        assert_eq!(n, 1, "nothing half made");
        assert_eq!(
            t.store
                .find_owner("better-auth:u1")
                .await
                .unwrap()
                .unwrap()
                .id,
            squatter.id
        );
    }

    async fn owner(t: &TempStore) -> Owner {
        t.store.create_owner("own_1", "alice").await.unwrap()
    }

    fn new_vm(owner: &Owner) -> Vm {
        Vm::new(NewVm {
            owner_id: owner.id.clone(),
            image_id: "img_default".into(),
            image_dir: "/images/img_default/abc".into(),
            template_id: None,
            vcpu_count: 2,
            mem_mib: 512,
            boot_args: "console=ttyS0".into(),
            enable_network: true,
            user_data: None,
            hypervisor: "test".into(),
            name: Some("web".into()),
            snapshot_compression: Some(Json(CompressionConfig {
                enabled: true,
                algorithm: Some(crate::snapshot::Algorithm::Lz4),
                level: Some(3),
            })),
            auto_sleep: true,
            idle_timeout_seconds: Some(60),
        })
    }

    /// The columns as SQLite holds them, to check the stored strings.
    async fn text_of(t: &TempStore, sql: &str, id: &str) -> Vec<Option<String>> {
        type Texts = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let row: Vec<Texts> = sqlx::query_as(sql)
            .bind(id)
            .fetch_all(&t.store.pool)
            .await
            .unwrap();
        let (a, b, c, d) = row.into_iter().next().unwrap();
        vec![a, b, c, d]
    }

    #[tokio::test]
    async fn a_vm_row_round_trips_its_typed_columns_as_the_same_text() {
        let t = TempStore::new().await;
        let owner = owner(&t).await;
        let mut vm = new_vm(&owner);
        vm.guest_ip = Some("172.16.0.10".parse().unwrap());
        vm.guest_mac = Some("02:FC:AC:10:00:0A".parse().unwrap());
        vm.inner_ip = Some("172.16.0.9".parse().unwrap());
        vm.inner_mac = Some("02:fc:ac:10:00:09".parse().unwrap());
        t.store.insert_vm(&vm).await.unwrap();

        let back = t.store.get_vm(&vm.id).await.unwrap().unwrap();
        assert_eq!(back.state, VmState::Starting);
        assert_eq!(back.guest_ip, vm.guest_ip);
        assert_eq!(back.guest_mac, vm.guest_mac);
        assert_eq!(back.inner_ip, vm.inner_ip);
        assert_eq!(back.inner_mac, vm.inner_mac);
        assert_eq!(back.snapshot_compression, vm.snapshot_compression);
        assert_eq!(back.name.as_deref(), Some("web"));
        assert_eq!(
            text_of(
                &t,
                "SELECT state, guest_ip, guest_mac, snapshot_compression FROM vms WHERE id = ?",
                &vm.id
            )
            .await,
            [
                Some("starting"),
                Some("172.16.0.10"),
                Some("02:fc:ac:10:00:0a"),
                Some(r#"{"enabled":true,"algorithm":"lz4","level":3}"#),
            ]
            .map(|s| s.map(String::from))
        );
        let taken = t.store.network_allocations().await.unwrap();
        assert!(taken.ips.contains(&"172.16.0.10".parse().unwrap()));
        assert!(taken.macs.contains(&vm.guest_mac.unwrap()));

        for state in VmState::all() {
            t.store.set_vm_state(&vm.id, *state, None).await.unwrap();
            let back = t.store.get_vm(&vm.id).await.unwrap().unwrap();
            assert_eq!(back.state, *state);
            let (text,): (String,) = sqlx::query_as("SELECT state FROM vms WHERE id = ?")
                .bind(&vm.id)
                .fetch_one(&t.store.pool)
                .await
                .unwrap();
            assert_eq!(text, state.as_str());
        }

        // No network, no compression default: NULLs read back as None.
        let mut bare = new_vm(&owner);
        bare.name = None;
        bare.snapshot_compression = None;
        t.store.insert_vm(&bare).await.unwrap();
        let back = t.store.get_vm(&bare.id).await.unwrap().unwrap();
        assert_eq!((back.guest_ip, back.guest_mac), (None, None));
        assert_eq!((back.inner_ip, back.inner_mac), (None, None));
        assert_eq!(back.snapshot_compression, None);
    }

    #[tokio::test]
    async fn unknown_state_text_reads_as_error_never_running() {
        let t = TempStore::new().await;
        let owner = owner(&t).await;
        let vm = new_vm(&owner);
        t.store.insert_vm(&vm).await.unwrap();
        for text in ["paused", "RUNNING", ""] {
            sqlx::query("UPDATE vms SET state = ? WHERE id = ?")
                .bind(text)
                .bind(&vm.id)
                .execute(&t.store.pool)
                .await
                .unwrap();
            let back = t.store.get_vm(&vm.id).await.unwrap().unwrap();
            assert_eq!(back.state, VmState::Error, "{text:?}");
        }
        // A snapshot row with unknown words: never usable, raw memory, Standby.
        let snap = crate::snapshot::capturing_record(
            "snap_1",
            &vm.id,
            &owner.id,
            SnapshotKind::Stopped,
            "test",
            VmConfig::default(),
        );
        t.store.insert_snapshot(&snap).await.unwrap();
        sqlx::query(
            "UPDATE snapshots SET status = 'done', compression_state = 'zipped', kind = 'Paused'",
        )
        .execute(&t.store.pool)
        .await
        .unwrap();
        assert!(t.store.get_snapshot("snap_1").await.unwrap().is_none());
        let left = t.store.unfinished_snapshots().await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].status, SnapshotStatus::Capturing);
        assert_eq!(left[0].compression_state, CompressionState::Error);
        assert_eq!(left[0].kind, SnapshotKind::Standby);
    }

    #[tokio::test]
    async fn a_snapshot_row_round_trips_and_moves_only_as_its_tables_allow() {
        let t = TempStore::new().await;
        let owner = owner(&t).await;
        let mut vm = new_vm(&owner);
        vm.guest_ip = Some("172.16.0.10".parse().unwrap());
        vm.guest_mac = Some("02:fc:ac:10:00:0a".parse().unwrap());
        t.store.insert_vm(&vm).await.unwrap();
        let config = VmConfig {
            vcpu_count: Some(2),
            mem_mib: Some(512),
            image_id: Some("img_default".into()),
            boot_args: Some("console=ttyS0".into()),
            enable_network: Some(true),
            guest_ip: vm.guest_ip,
            guest_mac: vm.guest_mac,
            inner_ip: vm.guest_ip,
            inner_mac: vm.guest_mac,
            user_data: None,
            name: Some("web".into()),
            guest_principal: None,
        };
        let mut snap = crate::snapshot::capturing_record(
            "snap_1",
            &vm.id,
            &owner.id,
            SnapshotKind::Standby,
            "test",
            config.clone(),
        );
        snap.tags = Json([("team".to_string(), "backend".to_string())].into());
        snap.compression = Some(Json(CompressionConfig {
            enabled: true,
            algorithm: Some(crate::snapshot::Algorithm::Zstd),
            level: None,
        }));
        t.store.insert_snapshot(&snap).await.unwrap();
        assert_eq!(
            text_of(
                &t,
                "SELECT kind, tags, vm_config, compression FROM snapshots WHERE id = ?",
                "snap_1"
            )
            .await,
            [
                Some("Standby"),
                Some(r#"{"team":"backend"}"#),
                // Sorted keys, as earlier versions wrote them (serde_json's map).
                Some(concat!(
                    r#"{"boot_args":"console=ttyS0","enable_network":true,"#,
                    r#""guest_ip":"172.16.0.10","guest_mac":"02:fc:ac:10:00:0a","#,
                    r#""image_id":"img_default","inner_ip":"172.16.0.10","#,
                    r#""inner_mac":"02:fc:ac:10:00:0a","mem_mib":512,"name":"web","#,
                    r#""user_data":null,"vcpu_count":2}"#
                )),
                Some(r#"{"enabled":true,"algorithm":"zstd"}"#),
            ]
            .map(|s| s.map(String::from))
        );
        let (status, cstate): (String, String) =
            sqlx::query_as("SELECT status, compression_state FROM snapshots")
                .fetch_one(&t.store.pool)
                .await
                .unwrap();
        assert_eq!((status.as_str(), cstate.as_str()), ("capturing", "none"));

        // capturing -> ready, once.
        t.store
            .commit_chunked_snapshot(&mut snap.clone(), &[], &[])
            .await
            .unwrap();
        let back = t.store.get_snapshot("snap_1").await.unwrap().unwrap();
        assert_eq!(back.status, SnapshotStatus::Ready);
        assert_eq!(back.vm_config.0, config);
        assert_eq!(back.tags, snap.tags);
        assert_eq!(back.compression, snap.compression);
        assert_eq!(back.kind, SnapshotKind::Standby);
        let again = t
            .store
            .commit_chunked_snapshot(&mut back.clone(), &[], &[])
            .await
            .unwrap_err();
        assert!(matches!(again, StoreError::Transition { .. }), "{again}");
        // A caller that read `capturing` but the row is ready: nothing changes.
        let stale = t
            .store
            .commit_chunked_snapshot(&mut snap.clone(), &[], &[])
            .await
            .unwrap_err();
        assert!(matches!(stale, StoreError::Transition { .. }), "{stale}");

        // Compression: none -> compressing -> compressed; never back.
        let mut s = back;
        s.compression_state = CompressionState::Compressing;
        t.store
            .set_snapshot_compression(&s, CompressionState::None)
            .await
            .unwrap();
        s.compression_state = CompressionState::None;
        let back_to_none = t
            .store
            .set_snapshot_compression(&s, CompressionState::Compressing)
            .await
            .unwrap_err();
        assert!(matches!(back_to_none, StoreError::Transition { .. }));
        s.compression_state = CompressionState::Compressed;
        s.compressed_key = Some("k.zstd".into());
        // The caller's `from` is stale (the row says compressing): refused.
        let stale = t
            .store
            .set_snapshot_compression(&s, CompressionState::None)
            .await
            .unwrap_err();
        assert!(matches!(stale, StoreError::Transition { .. }), "{stale}");
        t.store
            .set_snapshot_compression(&s, CompressionState::Compressing)
            .await
            .unwrap();
        let done = t.store.compressed_snapshots().await.unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].compression_state, CompressionState::Compressed);
        assert_eq!(done[0].compressed_key.as_deref(), Some("k.zstd"));
        for to in CompressionState::all() {
            s.compression_state = *to;
            assert!(t
                .store
                .set_snapshot_compression(&s, CompressionState::Compressed)
                .await
                .is_err());
        }
    }

    #[tokio::test]
    async fn a_unique_clash_is_told_apart_by_what_clashes() {
        let t = TempStore::new().await;
        let owner = owner(&t).await;
        let mut first = new_vm(&owner);
        first.guest_ip = Some("172.16.0.10".parse().unwrap());
        t.store.insert_vm(&first).await.unwrap();

        let same_name = new_vm(&owner);
        let e = t.store.insert_vm(&same_name).await.unwrap_err();
        assert_eq!(e.to_string(), "an instance named \"web\" already exists");

        let mut same_ip = new_vm(&owner);
        same_ip.name = Some("other".into());
        same_ip.guest_ip = first.guest_ip;
        let e = t.store.insert_vm(&same_ip).await.unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{e}");
        assert!(
            e.to_string().starts_with(&format!(
                "a network allocation of vm {} is already taken",
                same_ip.id
            )),
            "{e}"
        );
        // An unnamed VM whose address clashes is not a name clash either.
        same_ip.name = None;
        let e = t.store.insert_vm(&same_ip).await.unwrap_err();
        assert!(e.to_string().starts_with("a network allocation"), "{e}");
    }
}
