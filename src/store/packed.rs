//! VM lists read as one value: SQLite packs a page of rows into one JSON
//! array, so the page crosses sqlx's connection worker as a single value.
//!
//! Why: sqlx runs each SQLite connection on a thread of its own and sends
//! every result row to the async side as a message holding a copy of each
//! column. For a page of 100 VMs that is 100 hand-offs between threads and
//! ~3,000 small allocations, which was most of `GET /vms?limit=100`'s time
//! and all of its tail on a busy host (docs/BENCHMARKS.md). SQLite's own
//! `json_array` builds the same data in one string, in C, on the worker.
//!
//! The columns are listed once, here, in the order `PackedVm` reads them;
//! tests check the list against the table and a packed read against the
//! row decoder (`Vm`'s `FromRow`), field by field.
//!
//! These reads leave out `user_data` (the VM comes back with None there):
//! no list shows it, no caller of a list needs it, and it is the one column
//! an owner can make big (256 KiB, up to 6x that once escaped as JSON), so
//! a few hundred such VMs would take every list, and the firewall sync that
//! reads all VMs, past SQLite's string limit. Read one VM with `get_vm` for
//! its user data.

use super::{ListPos, Listed, Page, Result, Store, StoreError, Vm};
use crate::domain::{Json, MacAddr, VmState};
use serde::Deserialize;
use std::net::Ipv4Addr;
use std::sync::OnceLock;

/// The column of `vms` that lists leave out (see above).
#[cfg(test)]
const LEFT_OUT: [&str; 1] = ["user_data"];

/// Every other column of `vms`, in `PackedVm`'s order (after the list position).
const VM_COLUMNS: [&str; 28] = [
    "id",
    "owner_id",
    "image_id",
    "image_dir",
    "template_id",
    "state",
    "vcpu_count",
    "mem_mib",
    "boot_args",
    "enable_network",
    "guest_ip",
    "guest_mac",
    "tap_name",
    "ssh_port",
    "hypervisor",
    "last_error",
    "created_at",
    "updated_at",
    "name",
    "standby_snapshot_id",
    "inner_ip",
    "inner_mac",
    "snapshot_compression",
    "auto_sleep",
    "idle_timeout_seconds",
    "last_sleep_at",
    "last_wake_at",
    "guest_principal",
];

/// One packed row, as SQLite's `json_array` writes it: TEXT as strings,
/// INTEGER as numbers, NULL as null. The arity is checked (serde refuses a
/// shorter or longer array), so a column list and this struct cannot drift
/// apart silently.
#[derive(Deserialize)]
struct PackedVm(
    i64,            // list_seq (rowid)
    String,         // id
    String,         // owner_id
    String,         // image_id
    String,         // image_dir
    Option<String>, // template_id
    String,         // state
    i64,            // vcpu_count
    i64,            // mem_mib
    String,         // boot_args
    i64,            // enable_network
    Option<String>, // guest_ip
    Option<String>, // guest_mac
    Option<String>, // tap_name
    Option<i64>,    // ssh_port
    String,         // hypervisor
    Option<String>, // last_error
    String,         // created_at
    String,         // updated_at
    Option<String>, // name
    Option<String>, // standby_snapshot_id
    Option<String>, // inner_ip
    Option<String>, // inner_mac
    Option<String>, // snapshot_compression
    i64,            // auto_sleep
    Option<i64>,    // idle_timeout_seconds
    Option<String>, // last_sleep_at
    Option<String>, // last_wake_at
    Option<String>, // guest_principal
);

/// `SELECT rowid AS list_seq, * FROM vms ...` (`inner`) folded into one
/// JSON array of packed rows, in `order` (over `list_seq` and the columns).
fn packed_sql(inner: &str, order: &str) -> String {
    format!(
        "SELECT json_group_array(json_array(list_seq, {cols}) ORDER BY {order}) FROM ({inner})",
        cols = VM_COLUMNS.join(", ")
    )
}

/// The page query: the same range scan as every list (src/store/lists.rs).
fn vms_page_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        packed_sql(
            "SELECT rowid AS list_seq, * FROM vms \
             WHERE owner_id = ? AND (created_at, rowid) < (?, ?) \
             ORDER BY created_at DESC, rowid DESC LIMIT ?",
            "created_at DESC, list_seq DESC",
        )
    })
}

/// Every VM, or only those holding a guest address, oldest row first.
fn all_vms_sql(networked: bool) -> &'static str {
    static ALL: OnceLock<String> = OnceLock::new();
    static NETWORKED: OnceLock<String> = OnceLock::new();
    let (cell, filter) = match networked {
        false => (&ALL, ""),
        true => (&NETWORKED, " WHERE guest_ip IS NOT NULL"),
    };
    cell.get_or_init(|| {
        packed_sql(
            &format!("SELECT rowid AS list_seq, * FROM vms{filter}"),
            "list_seq",
        )
    })
}

/// The rows of one packed value.
fn unpack(packed: &str) -> Result<Vec<Listed<Vm>>> {
    let rows: Vec<PackedVm> = serde_json::from_str(packed)
        .map_err(|e| StoreError::Corrupt(format!("a packed list of VMs: {e}")))?;
    rows.into_iter().map(PackedVm::into_listed).collect()
}

fn corrupt(id: &str, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("vm {id}: {what}: {e}"))
}

fn ip(id: &str, what: &str, text: Option<String>) -> Result<Option<Ipv4Addr>> {
    text.map(|t| t.parse().map_err(|e| corrupt(id, what, e)))
        .transpose()
}

fn mac(id: &str, what: &str, text: Option<String>) -> Result<Option<MacAddr>> {
    text.map(|t| t.parse().map_err(|e| corrupt(id, what, e)))
        .transpose()
}

impl PackedVm {
    /// The same values the row decoder makes of the same columns.
    fn into_listed(self) -> Result<Listed<Vm>> {
        let PackedVm(
            seq,
            id,
            owner_id,
            image_id,
            image_dir,
            template_id,
            state,
            vcpu_count,
            mem_mib,
            boot_args,
            enable_network,
            guest_ip,
            guest_mac,
            tap_name,
            ssh_port,
            hypervisor,
            last_error,
            created_at,
            updated_at,
            name,
            standby_snapshot_id,
            inner_ip,
            inner_mac,
            snapshot_compression,
            auto_sleep,
            idle_timeout_seconds,
            last_sleep_at,
            last_wake_at,
            guest_principal,
        ) = self;
        let snapshot_compression = snapshot_compression
            .map(|t| serde_json::from_str(&t).map(Json))
            .transpose()
            .map_err(|e| corrupt(&id, "snapshot_compression", e))?;
        Ok(Listed {
            pos: ListPos {
                created_at: created_at.clone(),
                seq,
            },
            row: Vm {
                guest_ip: ip(&id, "guest_ip", guest_ip)?,
                guest_mac: mac(&id, "guest_mac", guest_mac)?,
                inner_ip: ip(&id, "inner_ip", inner_ip)?,
                inner_mac: mac(&id, "inner_mac", inner_mac)?,
                snapshot_compression,
                owner_id,
                image_id,
                image_dir,
                template_id,
                state: VmState::from_stored(&state),
                vcpu_count,
                mem_mib,
                boot_args,
                enable_network: enable_network != 0,
                user_data: None,
                tap_name,
                ssh_port,
                hypervisor,
                last_error,
                created_at,
                updated_at,
                name,
                standby_snapshot_id,
                auto_sleep: auto_sleep != 0,
                idle_timeout_seconds,
                last_sleep_at,
                last_wake_at,
                guest_principal,
                id,
            },
        })
    }
}

impl Store {
    /// A page of the owner's VMs, newest first (src/store/lists.rs has the order).
    pub async fn list_vms_page(&self, owner_id: &str, page: &Page) -> Result<Vec<Listed<Vm>>> {
        let (at, seq, limit) = page.bounds();
        let (packed,): (String,) = sqlx::query_as(vms_page_sql())
            .bind(owner_id)
            .bind(at)
            .bind(seq)
            .bind(limit)
            .fetch_one(&self.pool)
            .await?;
        unpack(&packed)
    }

    /// Every VM of every owner, in the order they were inserted.
    pub async fn all_vms(&self) -> Result<Vec<Vm>> {
        self.vms_where(false).await
    }

    /// The VMs that hold a guest address (all the firewall, DHCP and the
    /// route table need), in the order they were inserted.
    pub async fn networked_vms(&self) -> Result<Vec<Vm>> {
        self.vms_where(true).await
    }

    async fn vms_where(&self, networked: bool) -> Result<Vec<Vm>> {
        let (packed,): (String,) = sqlx::query_as(all_vms_sql(networked))
            .fetch_one(&self.pool)
            .await?;
        Ok(unpack(&packed)?.into_iter().map(|l| l.row).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::VmState;
    use crate::store::lists::tests::{vm as test_vm, Temp};
    use crate::store::{NewVm, Owner};

    #[tokio::test]
    async fn the_column_list_is_the_table() {
        let t = Temp::new().await;
        let store = &t.store;
        let cols: Vec<(String,)> = sqlx::query_as("SELECT name FROM pragma_table_info('vms')")
            .fetch_all(&store.pool)
            .await
            .unwrap();
        let mut table: Vec<String> = cols.into_iter().map(|c| c.0).collect();
        let mut ours: Vec<String> = VM_COLUMNS
            .iter()
            .chain(LEFT_OUT.iter())
            .map(|c| c.to_string())
            .collect();
        table.sort();
        ours.sort();
        assert_eq!(
            ours, table,
            "src/store/packed.rs must list every column of vms"
        );
    }

    /// A VM with every nullable column set, read both ways: the packed page
    /// and the row decoder give the same VM, field by field.
    #[tokio::test]
    async fn a_packed_row_reads_as_the_row_decoder_reads_it() {
        let t = Temp::new().await;
        let store = &t.store;
        let owner: Owner = store.create_owner("own_p", "p").await.unwrap();
        let mut vm = Vm::new(NewVm {
            owner_id: owner.id.clone(),
            image_id: "img_x".into(),
            image_dir: "/images/x \"quoted\" \\ ünïcode".into(),
            template_id: Some("tpl_1".into()),
            vcpu_count: 3,
            mem_mib: 768,
            boot_args: "console=ttyS0 a=\"b\"\nnewline".into(),
            enable_network: true,
            user_data: Some("#cloud-config\nruncmd: [\"echo\"]\n\u{1}".into()),
            hypervisor: "test".into(),
            name: Some("n-1".into()),
            snapshot_compression: Some(Json(
                serde_json::from_str(r#"{"enabled": true, "algorithm": "zstd", "level": 3}"#)
                    .unwrap(),
            )),
            auto_sleep: false,
            idle_timeout_seconds: Some(42),
        });
        vm.state = VmState::Snapshotted;
        vm.guest_ip = Some("10.0.0.7".parse().unwrap());
        vm.guest_mac = Some("02:fc:0a:00:00:07".parse().unwrap());
        vm.tap_name = Some("hatch-t7".into());
        vm.ssh_port = Some(16007);
        vm.last_error = Some("x".into());
        vm.standby_snapshot_id = Some("snap_1".into());
        vm.inner_ip = Some("10.0.0.9".parse().unwrap());
        vm.inner_mac = Some("02:fc:0a:00:00:09".parse().unwrap());
        vm.last_sleep_at = Some("2026-12-01T00:00:01Z".into());
        vm.last_wake_at = Some("2026-12-01T00:00:02Z".into());
        vm.guest_principal = Some("vm_source \"quoted\"".into());
        store.insert_vm(&vm).await.unwrap();
        // Columns the insert leaves to later writes.
        sqlx::query(
            "UPDATE vms SET guest_ip = ?, guest_mac = ?, tap_name = ?, ssh_port = ?, last_error = ?,
                 standby_snapshot_id = ?, inner_ip = ?, inner_mac = ?, last_sleep_at = ?,
                 last_wake_at = ?, state = ?, guest_principal = ? WHERE id = ?",
        )
        .bind("10.0.0.7")
        .bind("02:fc:0a:00:00:07")
        .bind("hatch-t7")
        .bind(16007)
        .bind("x")
        .bind("snap_1")
        .bind("10.0.0.9")
        .bind("02:fc:0a:00:00:09")
        .bind("2026-12-01T00:00:01Z")
        .bind("2026-12-01T00:00:02Z")
        .bind("snapshotted")
        .bind(&vm.guest_principal)
        .bind(&vm.id)
        .execute(&store.pool)
        .await
        .unwrap();
        let decoded: Vm = sqlx::query_as("SELECT * FROM vms WHERE id = ?")
            .bind(&vm.id)
            .fetch_one(&store.pool)
            .await
            .unwrap();
        let packed = store.list_vms_page(&owner.id, &Page::all()).await.unwrap();
        assert_eq!(packed.len(), 1);
        assert_eq!(format!("{decoded:?}"), format!("{vm:?}"));
        assert_eq!(packed[0].row.user_data, None, "lists leave user data out");
        let mut want = decoded;
        want.user_data = None;
        assert_eq!(format!("{:?}", packed[0].row), format!("{want:?}"));
        let rowid: (i64,) = sqlx::query_as("SELECT rowid FROM vms WHERE id = ?")
            .bind(&vm.id)
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(packed[0].pos.seq, rowid.0);
        assert_eq!(packed[0].pos.created_at, vm.created_at);
    }

    #[tokio::test]
    async fn an_empty_list_and_a_bad_row() {
        let t = Temp::new().await;
        let store = &t.store;
        let owner = store.create_owner("own_q", "q").await.unwrap();
        assert!(store
            .list_vms_page(&owner.id, &Page::all())
            .await
            .unwrap()
            .is_empty());
        let vm = test_vm(&owner, "2026-12-01T00:00:00Z");
        store.insert_vm(&vm).await.unwrap();
        sqlx::query("UPDATE vms SET guest_ip = 'not an ip', state = 'from-the-future'")
            .execute(&store.pool)
            .await
            .unwrap();
        let e = store
            .list_vms_page(&owner.id, &Page::all())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("guest_ip"), "{e}");
        sqlx::query("UPDATE vms SET guest_ip = NULL")
            .execute(&store.pool)
            .await
            .unwrap();
        let rows = store.list_vms_page(&owner.id, &Page::all()).await.unwrap();
        assert_eq!(
            rows[0].row.state,
            VmState::Error,
            "unknown text is read as error"
        );
    }
    #[tokio::test]
    async fn all_and_networked_vms_in_insertion_order() {
        let t = Temp::new().await;
        let store = &t.store;
        let owner = store.create_owner("own_r", "r").await.unwrap();
        let mut ids = vec![];
        for i in 0..5 {
            // Newer rows made "earlier": the order is the insertion's, not the clock's.
            let mut vm = test_vm(&owner, &format!("2026-12-01T00:00:0{}Z", 9 - i));
            vm.enable_network = i % 2 == 0;
            store.insert_vm(&vm).await.unwrap();
            if i % 2 == 0 {
                sqlx::query("UPDATE vms SET guest_ip = ? WHERE id = ?")
                    .bind(format!("10.0.0.{}", 10 + i))
                    .bind(&vm.id)
                    .execute(&store.pool)
                    .await
                    .unwrap();
            }
            ids.push(vm.id);
        }
        let all: Vec<String> = store
            .all_vms()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.id)
            .collect();
        assert_eq!(all, ids);
        let net = store.networked_vms().await.unwrap();
        assert_eq!(
            net.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
            [&ids[0], &ids[2], &ids[4]]
        );
        assert_eq!(net[1].guest_ip, Some("10.0.0.12".parse().unwrap()));
    }
}
