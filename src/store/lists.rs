//! Paged lists of an owner's VMs, templates, images and snapshots, newest first.
//!
//! Every list runs by `(created_at, rowid)` descending: `created_at` has
//! whole seconds, so rows made in the same second come in the order they
//! were inserted (the rowid), as the unpaged lists always did. A page starts
//! strictly below a position (the last row of the page before) and is one
//! range scan of an `(owner_id, created_at)` index, which ends in the rowid.

use super::{Image, Result, Snapshot, Store, Template};
use crate::domain::{Json, SnapshotKind, SnapshotStatus};
use sqlx::sqlite::SqliteRow;
use sqlx::{FromRow, Row};

/// A row's place in its list: its creation time and its rowid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPos {
    pub created_at: String,
    pub seq: i64,
}

/// Which part of a list to read: the rows after `after` (from the top when
/// None), at most `limit` of them (all when None).
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub after: Option<ListPos>,
    pub limit: Option<u32>,
}

impl Page {
    /// The whole list.
    pub fn all() -> Page {
        Page::default()
    }

    /// The values bound for the position and the limit: above every real
    /// row when there is no position ('~' sorts after any timestamp's
    /// digits), and SQLite's "no limit" (-1) when there is no limit.
    pub(super) fn bounds(&self) -> (&str, i64, i64) {
        let (at, seq) = match &self.after {
            Some(p) => (p.created_at.as_str(), p.seq),
            None => ("~", i64::MAX),
        };
        (at, seq, self.limit.map_or(-1, i64::from))
    }
}

/// A listed row with its position, from which the next page starts.
#[derive(Debug, Clone)]
pub struct Listed<T> {
    pub pos: ListPos,
    pub row: T,
}

impl<'r, T: FromRow<'r, SqliteRow>> FromRow<'r, SqliteRow> for Listed<T> {
    fn from_row(r: &'r SqliteRow) -> std::result::Result<Self, sqlx::Error> {
        Ok(Listed {
            pos: ListPos {
                created_at: r.try_get("created_at")?,
                seq: r.try_get("list_seq")?,
            },
            row: T::from_row(r)?,
        })
    }
}

/// What `GET /snapshots` filters on; every given one must match.
#[derive(Debug, Clone, Default)]
pub struct SnapshotMatch<'a> {
    pub kind: Option<SnapshotKind>,
    pub name: Option<&'a str>,
    pub vm_id: Option<&'a str>,
    /// Tags the snapshot must carry with these values.
    pub tags: &'a [(String, String)],
}

impl Store {
    pub async fn list_templates_page(
        &self,
        owner_id: &str,
        page: &Page,
    ) -> Result<Vec<Listed<Template>>> {
        let (at, seq, limit) = page.bounds();
        Ok(sqlx::query_as(
            "SELECT rowid AS list_seq, * FROM templates
             WHERE owner_id = ? AND (created_at, rowid) < (?, ?)
             ORDER BY created_at DESC, rowid DESC LIMIT ?",
        )
        .bind(owner_id)
        .bind(at)
        .bind(seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The owner's images and the system ones (owner NULL), merged: each
    /// half is a range scan of its own, so neither reads the other's rows.
    pub async fn list_images_page(
        &self,
        owner_id: &str,
        page: &Page,
    ) -> Result<Vec<Listed<Image>>> {
        let (at, seq, limit) = page.bounds();
        Ok(sqlx::query_as(
            "SELECT * FROM (
                 SELECT rowid AS list_seq, * FROM images
                 WHERE owner_id = ?1 AND (created_at, rowid) < (?2, ?3)
                 ORDER BY created_at DESC, rowid DESC LIMIT ?4)
             UNION ALL
             SELECT * FROM (
                 SELECT rowid AS list_seq, * FROM images
                 WHERE owner_id IS NULL AND (created_at, rowid) < (?2, ?3)
                 ORDER BY created_at DESC, rowid DESC LIMIT ?4)
             ORDER BY created_at DESC, list_seq DESC LIMIT ?4",
        )
        .bind(owner_id)
        .bind(at)
        .bind(seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The owner's usable snapshots that match `m`. The filters are checked
    /// in the same scan, so a page holds `limit` matches (fewer only at the
    /// end of the list).
    pub async fn list_snapshots_page(
        &self,
        owner_id: &str,
        m: &SnapshotMatch<'_>,
        page: &Page,
    ) -> Result<Vec<Listed<Snapshot>>> {
        let (at, seq, limit) = page.bounds();
        // Tags as one JSON array of [key, value] pairs: a fixed query for
        // any number of them. A snapshot matches when no wanted pair is
        // missing from its own tags (a JSON object of strings).
        let tags = Json(m.tags.to_vec());
        Ok(sqlx::query_as(
            "SELECT rowid AS list_seq, * FROM snapshots s
             WHERE owner_id = ?1 AND status = ?2 AND (created_at, rowid) < (?3, ?4)
               AND (?5 IS NULL OR kind = ?5)
               AND (?6 IS NULL OR name = ?6)
               AND (?7 IS NULL OR vm_id = ?7)
               AND NOT EXISTS (
                   SELECT 1 FROM json_each(?8) AS want
                   WHERE NOT EXISTS (
                       SELECT 1 FROM json_each(s.tags) AS t
                       WHERE t.key = json_extract(want.value, '$[0]')
                         AND t.type = 'text'
                         AND t.value = json_extract(want.value, '$[1]')))
             ORDER BY created_at DESC, rowid DESC LIMIT ?9",
        )
        .bind(owner_id)
        .bind(SnapshotStatus::Ready)
        .bind(at)
        .bind(seq)
        .bind(m.kind)
        .bind(m.name)
        .bind(m.vm_id)
        .bind(&tags)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::domain::{SnapshotKind, Tags, VmConfig};
    use crate::manager::requests::SnapshotFilter;
    use crate::store::{NewVm, Owner, Vm};

    /// A real SQLite file in a fresh directory, removed afterwards.
    pub(in crate::store) struct Temp {
        dir: std::path::PathBuf,
        pub store: Store,
    }

    impl Temp {
        pub async fn new() -> Temp {
            let dir = std::env::temp_dir().join(format!(
                "hatch-lists-test-{}-{}",
                std::process::id(),
                crate::ids::random_string(8)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let store = Store::open(&dir.join("hatch.db")).await.unwrap();
            Temp { dir, store }
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A test VM of `owner` made at `created_at` (not inserted).
    pub(in crate::store) fn vm(owner: &Owner, created_at: &str) -> Vm {
        let mut vm = Vm::new(NewVm {
            owner_id: owner.id.clone(),
            image_id: "img_default".into(),
            image_dir: "/nowhere".into(),
            template_id: None,
            vcpu_count: 1,
            mem_mib: 128,
            boot_args: "console=ttyS0".into(),
            enable_network: false,
            user_data: None,
            hypervisor: "test".into(),
            name: None,
            snapshot_compression: None,
            auto_sleep: true,
            idle_timeout_seconds: None,
        });
        vm.created_at = created_at.into();
        vm
    }

    fn at(second: u32) -> String {
        format!("2026-12-01T21:00:{second:02}Z")
    }

    #[tokio::test]
    async fn pages_walk_the_whole_list_once_newest_first_ties_in_insertion_order() {
        let t = Temp::new().await;
        let alice = t.store.create_owner("own_a", "alice").await.unwrap();
        let bob = t.store.create_owner("own_b", "bob").await.unwrap();
        // Seconds out of order and many rows per second; bob's in between.
        let mut inserted = vec![];
        for i in 0..40u32 {
            let v = vm(&alice, &at((i * 7) % 5));
            t.store.insert_vm(&v).await.unwrap();
            inserted.push(v);
            t.store.insert_vm(&vm(&bob, &at(i % 5))).await.unwrap();
        }
        // Newest second first; within a second, the later insert first.
        let mut want: Vec<(String, usize)> = inserted
            .iter()
            .enumerate()
            .map(|(n, v)| (v.created_at.clone(), n))
            .collect();
        want.sort_by(|a, b| b.cmp(a));
        let want: Vec<&str> = want.iter().map(|(_, n)| inserted[*n].id.as_str()).collect();

        let all = t.store.list_vms(&alice.id).await.unwrap();
        assert_eq!(all.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), want);
        for size in [1, 3, 7, 40, 41] {
            let mut walked = vec![];
            let mut page = Page {
                after: None,
                limit: Some(size),
            };
            loop {
                let rows = t.store.list_vms_page(&alice.id, &page).await.unwrap();
                assert!(rows.len() <= size as usize);
                walked.extend(rows.iter().map(|l| l.row.id.clone()));
                match rows.last() {
                    Some(last) if rows.len() == size as usize => {
                        page.after = Some(last.pos.clone())
                    }
                    _ => break,
                }
            }
            assert_eq!(walked, want, "pages of {size}");
        }
        // A position from alice's list read as bob: only bob's rows.
        let alices = t
            .store
            .list_vms_page(&alice.id, &Page::all())
            .await
            .unwrap();
        let from_hers = Page {
            after: Some(alices[5].pos.clone()),
            limit: None,
        };
        let rows = t.store.list_vms_page(&bob.id, &from_hers).await.unwrap();
        assert!(!rows.is_empty());
        assert!(rows.iter().all(|l| l.row.owner_id == bob.id));
    }

    /// The plan SQLite picks for a list query: one index range scan, no sort.
    async fn plan(t: &Temp, sql: &str) -> String {
        let rows: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                .fetch_all(&t.store.pool)
                .await
                .unwrap();
        rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("; ")
    }

    #[tokio::test]
    async fn every_list_reads_an_index_range_and_never_sorts() {
        let t = Temp::new().await;
        for (table, index) in [
            ("vms", "vms_by_owner"),
            ("templates", "templates_by_owner"),
            ("images", "images_by_owner"),
            ("snapshots", "snapshots_by_owner"),
        ] {
            let p = plan(
                &t,
                &format!(
                    "SELECT rowid AS list_seq, * FROM {table} WHERE owner_id = 'o' \
                     AND (created_at, rowid) < ('~', 9) ORDER BY created_at DESC, rowid DESC LIMIT 100"
                ),
            )
            .await;
            assert!(
                p.contains(&format!("USING INDEX {index} (owner_id=? AND")),
                "{table}: {p}"
            );
            assert!(!p.contains("TEMP B-TREE"), "{table}: {p}");
        }
    }

    async fn snapshot(
        t: &Temp,
        owner: &Owner,
        vm: &str,
        kind: SnapshotKind,
        name: Option<&str>,
        tags: &[(&str, &str)],
    ) -> String {
        let id = crate::ids::new_id("snap");
        let mut s = crate::snapshot::capturing_record(
            &id,
            vm,
            &owner.id,
            kind,
            "test",
            VmConfig::default(),
        );
        s.name = name.map(str::to_string);
        s.tags = Json(
            tags.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Tags>(),
        );
        t.store.insert_snapshot(&s).await.unwrap();
        t.store
            .commit_chunked_snapshot(&mut s, &[], &[])
            .await
            .unwrap();
        id
    }

    #[tokio::test]
    async fn snapshot_filters_in_sql_agree_with_the_api_filter() {
        let t = Temp::new().await;
        let alice = t.store.create_owner("own_a", "alice").await.unwrap();
        let bob = t.store.create_owner("own_b", "bob").await.unwrap();
        let (va, vb) = (vm(&alice, &at(1)), vm(&alice, &at(2)));
        t.store.insert_vm(&va).await.unwrap();
        t.store.insert_vm(&vb).await.unwrap();
        let vbob = vm(&bob, &at(1));
        t.store.insert_vm(&vbob).await.unwrap();
        use SnapshotKind::{Standby, Stopped};
        snapshot(
            &t,
            &alice,
            &va.id,
            Standby,
            Some("pre"),
            &[("team", "backend"), ("env", "x")],
        )
        .await;
        snapshot(&t, &alice, &va.id, Stopped, None, &[("team", "backend")]).await;
        snapshot(
            &t,
            &alice,
            &vb.id,
            Standby,
            Some("pre"),
            &[("team", "frontend")],
        )
        .await;
        snapshot(
            &t,
            &alice,
            &vb.id,
            Standby,
            None,
            &[("a b", "x&\"y"), ("hatch.sleep", "idle")],
        )
        .await;
        snapshot(&t, &alice, &vb.id, Stopped, Some("other"), &[]).await;
        snapshot(
            &t,
            &bob,
            &vbob.id,
            Standby,
            Some("pre"),
            &[("team", "backend")],
        )
        .await;
        // Not ready: never listed.
        let hidden = crate::snapshot::capturing_record(
            "snap_hidden00000",
            &va.id,
            &alice.id,
            Standby,
            "test",
            VmConfig::default(),
        );
        t.store.insert_snapshot(&hidden).await.unwrap();

        let every = t.store.owner_snapshots(&alice.id).await.unwrap();
        assert_eq!(every.len(), 5);
        let q = |p: &[(&str, &str)]| {
            SnapshotFilter::parse(
                &p.iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect::<Vec<_>>(),
            )
            .unwrap()
        };
        let vm_a = va.id.clone();
        for f in [
            q(&[]),
            q(&[("kind", "Standby")]),
            q(&[("kind", "Stopped")]),
            q(&[("name", "pre")]),
            q(&[("name", "nope")]),
            q(&[("source_instance_id", &vm_a)]),
            q(&[("tags[team]", "backend")]),
            q(&[("tags[team]", "backend"), ("tags[env]", "x")]),
            q(&[("tags[team]", "backend"), ("tags[team]", "frontend")]),
            q(&[("tags[a b]", "x&\"y")]),
            q(&[("tags[hatch.sleep]", "idle")]),
            q(&[("tags[team]", "")]),
            q(&[
                ("kind", "Standby"),
                ("name", "pre"),
                ("tags[team]", "frontend"),
            ]),
        ] {
            let want: Vec<&str> = every
                .iter()
                .filter(|s| f.matches(s))
                .map(|s| s.id.as_str())
                .collect();
            let m = SnapshotMatch {
                kind: f.kind,
                name: f.name.as_deref(),
                vm_id: f.source_instance_id.as_deref(),
                tags: &f.tags,
            };
            let got = t
                .store
                .list_snapshots_page(&alice.id, &m, &Page::all())
                .await
                .unwrap();
            let got: Vec<&str> = got.iter().map(|l| l.row.id.as_str()).collect();
            assert_eq!(got, want, "{f:?}");
            // And a page of one at a time walks the same matches.
            let mut walked = vec![];
            let mut page = Page {
                after: None,
                limit: Some(1),
            };
            loop {
                let rows = t
                    .store
                    .list_snapshots_page(&alice.id, &m, &page)
                    .await
                    .unwrap();
                let Some(last) = rows.last() else { break };
                walked.push(last.row.id.clone());
                page.after = Some(last.pos.clone());
            }
            assert_eq!(walked, want, "{f:?} by pages");
        }
    }
}
