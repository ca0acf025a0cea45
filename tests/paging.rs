//! Paged lists and the Hatch route delete, end to end: the real daemon in its
//! own namespace, curl as the client, following the `Link` headers it hands
//! out. Thousands of real VMs would take hours to boot, so the big lists are
//! seeded straight into the daemon's SQLite file while it is stopped, through
//! hatch's own store code (the rows the API would write: stopped VMs without
//! networking, ready snapshot rows, image rows), and the daemon is started
//! on that file; templates are made through the API itself.

#[macro_use]
mod common;
use common::*;
use hatch::domain::{Json, SnapshotKind, Tags, VmConfig};
use hatch::store::{Image, NewVm, Owner, Store, Vm};
use serde_json::{json, Value};

/// One answer with its headers.
struct Page {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
    text: String,
}

impl Page {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn ids(&self) -> Vec<String> {
        self.body
            .as_array()
            .unwrap_or_else(|| panic!("expected a JSON array: {}", self.text))
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// The `Link: <...>; rel="next"` target, checked against `X-Next-Cursor`.
    fn next(&self) -> Option<String> {
        let link = self.header("link");
        let cursor = self.header("x-next-cursor");
        assert_eq!(link.is_some(), cursor.is_some(), "{:?}", self.headers);
        let link = link?;
        let target = link
            .strip_prefix('<')
            .and_then(|l| l.strip_suffix(">; rel=\"next\""))
            .unwrap_or_else(|| panic!("not a next link: {link}"));
        assert!(
            target.ends_with(&format!("cursor={}", cursor.unwrap())),
            "{link} vs {cursor:?}"
        );
        Some(target.to_string())
    }

    fn error(&self) -> &str {
        self.body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("expected an error body, got {} {}", self.status, self.text))
    }
}

/// `GET path` as `key`, headers included.
fn get(d: &Daemon, key: &str, path: &str) -> Page {
    let out = d
        .curl_in_ns("120")
        .args(["-i", "-H", &format!("Authorization: Bearer {key}")])
        .args(["-w", "\n%{http_code}"])
        .arg(format!("{BASE}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no headers in {text}"));
    let (body, code) = rest.rsplit_once('\n').unwrap();
    Page {
        status: code.trim().parse().unwrap(),
        headers: head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
        body: serde_json::from_str(body).unwrap_or(Value::Null),
        text: body.to_string(),
    }
}

/// Every page from `first`, following the next links: the ids in order and
/// how many pages it took.
fn walk(d: &Daemon, key: &str, first: &str, limit: usize) -> (Vec<String>, usize) {
    let (mut ids, mut pages, mut path) = (vec![], 0, Some(first.to_string()));
    while let Some(p) = path {
        let page = get(d, key, &p);
        assert_eq!(page.status, 200, "{p}: {}", page.text);
        let got = page.ids();
        pages += 1;
        path = page.next();
        if path.is_some() {
            assert_eq!(got.len(), limit, "a page before the last is full: {p}");
        } else {
            assert!(got.len() <= limit, "{p}");
        }
        ids.extend(got);
    }
    (ids, pages)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Stops the daemon, runs `seed` on its store, starts it again.
fn seeded<T>(d: &mut Daemon, seed: impl AsyncFnOnce(&Store) -> T) -> T {
    d.terminate();
    let out = runtime().block_on(async {
        let store = Store::open(&d.data_dir.join("hatch.db")).await.unwrap();
        seed(&store).await
    });
    d.restart();
    out
}

async fn owner(store: &Store, name: &str) -> Owner {
    store.find_owner(name).await.unwrap().unwrap()
}

/// A stopped VM without networking made at `created_at`, as the API would have stored it.
fn stopped_vm(owner: &Owner, created_at: String) -> Vm {
    let mut vm = Vm::new(NewVm {
        owner_id: owner.id.clone(),
        image_id: "img_default".into(),
        image_dir: "/nonexistent/seeded".into(),
        template_id: None,
        vcpu_count: 1,
        mem_mib: 128,
        boot_args: "console=ttyS0".into(),
        enable_network: false,
        user_data: None,
        hypervisor: "qemu".into(),
        name: None,
        snapshot_compression: None,
        auto_sleep: true,
        idle_timeout_seconds: None,
    });
    vm.state = hatch::domain::VmState::Stopped;
    vm.created_at = created_at.clone();
    vm.updated_at = created_at;
    vm
}

/// Second `n` of a day in the past, in the API's format.
fn second(n: u32) -> String {
    format!("2026-11-30T10:{:02}:{:02}Z", n / 60, n % 60)
}

/// Newest first; within a second, the later insert first.
fn newest_first(rows: &[(String, String)]) -> Vec<String> {
    let mut order: Vec<(&str, usize)> = rows
        .iter()
        .enumerate()
        .map(|(i, (at, _))| (at.as_str(), i))
        .collect();
    order.sort_by(|a, b| b.cmp(a));
    order.into_iter().map(|(_, i)| rows[i].1.clone()).collect()
}

const ALICE_VMS: u32 = 2600;

#[test]
fn vm_pages_walk_thousands_of_rows_once_in_order_within_their_owner() {
    let mut d = Daemon::start();
    let bob = d.create_key(&["--name", "bob"]);
    // 2600 of alice's VMs over 65 seconds (40 made in each, so page edges
    // fall inside a second), made out of time order; 30 of bob's between.
    let (alice_rows, bob_rows) = seeded(&mut d, async |store| {
        let (alice, bob) = (owner(store, "alice").await, owner(store, "bob").await);
        let (mut a, mut b) = (vec![], vec![]);
        for i in 0..ALICE_VMS {
            let vm = stopped_vm(&alice, second((i * 13) % 65));
            store.insert_vm(&vm).await.unwrap();
            a.push((vm.created_at, vm.id));
            if i % 87 == 0 {
                let vm = stopped_vm(&bob, second(i % 65));
                store.insert_vm(&vm).await.unwrap();
                b.push((vm.created_at, vm.id));
            }
        }
        (a, b)
    });
    let want = newest_first(&alice_rows);
    assert_eq!(want.len(), ALICE_VMS as usize);

    // No limit, no cursor: the whole list, a bare array, no paging headers.
    let all = get(&d, &d.key, "/vms");
    assert_eq!(all.status, 200, "{}", all.text);
    assert!(all.body.is_array(), "{}", &all.text[..200]);
    assert_eq!(all.ids(), want);
    assert_eq!(all.next(), None);
    assert_eq!(all.body[0]["state"], "stopped");

    // Pages walk the same list, each row once, by the links handed out.
    for limit in [1000, 97] {
        let (walked, pages) = walk(&d, &d.key, &format!("/vms?limit={limit}"), limit);
        assert_eq!(walked.len(), want.len(), "limit {limit}");
        assert_eq!(walked, want, "limit {limit}");
        assert_eq!(pages, want.len().div_ceil(limit), "limit {limit}");
    }
    // A limit that ends exactly at the last row: no next page.
    let exact = get(&d, &d.key, &format!("/vms?limit={}", 1000));
    let second_page = get(&d, &d.key, &exact.next().unwrap());
    let third = get(&d, &d.key, &second_page.next().unwrap());
    assert_eq!(third.ids().len(), 600);
    assert_eq!(third.next(), None);

    // Bob walks his own, never alice's.
    let bob_want = newest_first(&bob_rows);
    assert_eq!(walk(&d, &bob, "/vms?limit=7", 7).0, bob_want);
    assert_eq!(get(&d, &bob, "/vms").ids(), bob_want);
    // Alice's cursors in bob's hands: a position in bob's list, his rows only.
    let mut path = Some("/vms?limit=500".to_string());
    while let Some(p) = path {
        let page = get(&d, &d.key, &p);
        path = page.next();
        if let Some(next) = &path {
            let cursor = next.rsplit_once("cursor=").unwrap().1;
            let his = get(&d, &bob, &format!("/vms?cursor={cursor}"));
            assert_eq!(his.status, 200, "{}", his.text);
            for id in his.ids() {
                assert!(bob_want.contains(&id), "bob was shown {id}");
            }
        }
    }

    // A page's start is a position, not an offset: deleting the first row
    // of the next page shifts nothing, that page starts at the row after it.
    let first = get(&d, &d.key, "/vms?limit=100");
    let next = first.next().unwrap();
    let gone = get(&d, &d.key, &next).ids()[0].clone();
    assert_eq!(
        d.req("DELETE", &format!("/vms/{gone}"), None).status,
        200,
        "delete a seeded stopped VM"
    );
    let after = get(&d, &d.key, &next).ids();
    assert_eq!(after[..], want[101..201]);
}

#[test]
fn limits_and_crafted_cursors_are_400s_never_500s_or_other_rows() {
    let d = Daemon::start();
    let bob = d.create_key(&["--name", "bob"]);
    for i in 0..3 {
        let r = d.req(
            "POST",
            "/templates",
            Some(&json!({"name": format!("t{i}")}).to_string()),
        );
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let r = d.as_key(&bob, "POST", "/templates", Some(r#"{"name": "bobs"}"#));
    assert_eq!(r.status, 201, "{}", r.text);
    let real = get(&d, &d.key, "/templates?limit=1").next().unwrap();
    let real_cursor = real.rsplit_once("cursor=").unwrap().1.to_string();
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();

    for list in ["/vms", "/images", "/templates", "/snapshots"] {
        for limit in ["1", "1000"] {
            let p = get(&d, &d.key, &format!("{list}?limit={limit}"));
            assert_eq!(p.status, 200, "{list} limit {limit}: {}", p.text);
            assert!(p.body.is_array());
        }
        for limit in ["0", "1001", "-1", "abc", "", "2.5", "99999999999999999999"] {
            let p = get(&d, &d.key, &format!("{list}?limit={limit}"));
            assert_eq!(p.status, 400, "{list} limit {limit:?}: {}", p.text);
            assert!(p.error().starts_with("limit must be"), "{}", p.text);
        }
        let twice = get(&d, &d.key, &format!("{list}?limit=2&limit=3"));
        assert_eq!(twice.status, 400, "{}", twice.text);
        let crafted = [
            "garbage".to_string(),
            "%21%21".into(),
            "x".repeat(5000),
            hex("1|templates|2026-01-01T00:00:00Z"),
            hex("1|templates|2026-01-01T00:00:00Z|0"),
            hex("1|templates|2026-01-01T00:00:00Z|-5"),
            hex("1|templates|' OR owner_id != '' --|5"),
            hex("1|templates|2026-01-01 00:00:00|5"),
            hex("9|templates|2026-01-01T00:00:00Z|5"),
            hex("1|templates|2026-01-01T00:00:00Z|5|6"),
            format!("{real_cursor}00"),
        ];
        for c in &crafted {
            let p = get(&d, &d.key, &format!("{list}?cursor={c}"));
            assert_eq!(p.status, 400, "{list} cursor {c}: {}", p.text);
            assert!(p.error().starts_with("cursor is not one"), "{}", p.text);
        }
        // One list's cursor is refused by another.
        let p = get(&d, &d.key, &format!("{list}?cursor={real_cursor}"));
        let want = if list == "/templates" { 200 } else { 400 };
        assert_eq!(p.status, want, "{list}: {}", p.text);
    }
    // Unknown parameters: 400, as the API says of any list.
    for list in ["/vms", "/images", "/templates", "/snapshots"] {
        let p = get(&d, &d.key, &format!("{list}?page=2"));
        assert_eq!(p.status, 400, "{list}: {}", p.text);
        assert!(p.error().contains("unknown query parameter"), "{}", p.text);
    }
    // A forged position far in the future, in bob's hands: his rows, none of alice's.
    let future = hex(&format!("1|templates|2099-01-01T00:00:00Z|{}", i64::MAX));
    let p = get(&d, &bob, &format!("/templates?cursor={future}"));
    assert_eq!(p.status, 200, "{}", p.text);
    assert_eq!(
        p.body
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].clone())
            .collect::<Vec<_>>(),
        [json!("bobs")]
    );
    assert!(
        d.daemon_log().lines().all(|l| !l.contains("ERROR")),
        "{}",
        d.daemon_log()
    );
}

#[test]
fn templates_images_and_filtered_snapshots_page_like_their_whole_lists() {
    let mut d = Daemon::start();
    // Templates through the API: made in order, some in the same second.
    let mut made = vec![];
    for i in 0..23 {
        let r = d.req(
            "POST",
            "/templates",
            Some(&json!({"name": format!("tpl-{i}"), "vcpu_count": 1}).to_string()),
        );
        assert_eq!(r.status, 201, "{}", r.text);
        made.push(r.body["id"].as_str().unwrap().to_string());
    }
    // Images and snapshots straight into the store (no files behind them).
    let (images, vms) = seeded(&mut d, async |store| {
        let alice = owner(store, "alice").await;
        let mut images = vec![];
        for i in 0..17u32 {
            let at = second(i % 4);
            let img = Image {
                id: hatch::ids::new_id("img"),
                owner_id: Some(alice.id.clone()),
                name: Some(format!("seeded-{i}")),
                kernel_path: "/nonexistent/vmlinuz".into(),
                initrd_path: None,
                rootfs_path: "/nonexistent/rootfs.ext4".into(),
                boot_args: None,
                dir: "/nonexistent/image".into(),
                fingerprint: "seeded".into(),
                created_at: at.clone(),
                updated_at: at,
                source: "upload".into(),
                size_bytes: 1,
                has_initrd: false,
            };
            store.insert_image(&img).await.unwrap();
            images.push(img.id);
        }
        let vms: Vec<Vm> = (0..3).map(|i| stopped_vm(&alice, second(i))).collect();
        for (n, vm) in vms.iter().enumerate() {
            store.insert_vm(vm).await.unwrap();
            for i in 0..40u32 {
                let id = hatch::ids::new_id("snap");
                let kind = if i % 3 == 0 {
                    SnapshotKind::Stopped
                } else {
                    SnapshotKind::Standby
                };
                let mut s = hatch::snapshot::capturing_record(
                    &id,
                    &vm.id,
                    &alice.id,
                    kind,
                    "qemu",
                    VmConfig::default(),
                );
                s.created_at = second(100 + (i % 9));
                let mut tags = Tags::new();
                tags.insert("team".into(), ["api", "web"][(i as usize + n) % 2].into());
                if i % 4 == 0 {
                    tags.insert("release candidate".into(), "yes & no".into());
                }
                s.tags = Json(tags);
                store.insert_snapshot(&s).await.unwrap();
                store
                    .commit_chunked_snapshot(&mut s, &[], &[])
                    .await
                    .unwrap();
            }
        }
        (images, vms.into_iter().map(|v| v.id).collect::<Vec<_>>())
    });

    let whole = get(&d, &d.key, "/templates");
    made.reverse();
    assert_eq!(whole.ids(), made, "newest first, ties in the order made");
    assert_eq!(walk(&d, &d.key, "/templates?limit=4", 4).0, made);

    let whole = get(&d, &d.key, "/images").ids();
    assert_eq!(whole.len(), images.len() + 1, "{whole:?}");
    assert!(whole.contains(&"img_default".to_string()));
    for limit in [1, 5, 18] {
        let (walked, _) = walk(&d, &d.key, &format!("/images?limit={limit}"), limit);
        assert_eq!(walked, whole, "images by {limit}");
    }

    // Snapshot filters stay on every page (the next link carries them).
    let vm = &vms[1];
    for filters in [
        String::new(),
        "kind=Standby".into(),
        "kind=Stopped&tags%5Bteam%5D=web".into(),
        format!("source_instance_id={vm}&tags%5Brelease%20candidate%5D=yes%20%26%20no"),
    ] {
        let sep = if filters.is_empty() { "" } else { "&" };
        let whole = get(&d, &d.key, &format!("/snapshots?{filters}"));
        assert_eq!(whole.status, 200, "{filters}: {}", whole.text);
        let whole = whole.ids();
        assert!(!whole.is_empty(), "{filters}");
        for limit in [1, 11] {
            let first = format!("/snapshots?{filters}{sep}limit={limit}");
            let (walked, _) = walk(&d, &d.key, &first, limit);
            assert_eq!(walked, whole, "{first}");
        }
    }
    let some = get(
        &d,
        &d.key,
        &format!("/snapshots?kind=Stopped&source_instance_id={vm}&limit=5"),
    );
    let link = some.header("link").unwrap().to_string();
    assert!(
        link.starts_with(&format!(
            "</snapshots?kind=Stopped&source_instance_id={vm}&limit=5&cursor="
        )),
        "{link}"
    );
    for s in some.body.as_array().unwrap() {
        assert_eq!(s["kind"], "Stopped");
        assert_eq!(s["source_instance_id"], vm.as_str());
    }
}

#[test]
fn a_route_is_deleted_by_its_id_alone_and_only_by_its_owner() {
    let d = Daemon::start();
    let bob = d.create_key(&["--name", "bob"]);
    let vm = d.create_vm("{}")["id"].as_str().unwrap().to_string();
    let add = |sub: &str| {
        let r = d.req(
            "POST",
            &format!("/vms/{vm}/routes"),
            Some(&json!({"target_port": 80, "subdomain": sub}).to_string()),
        );
        assert_eq!(r.status, 201, "{}", r.text);
        r.body["id"].as_str().unwrap().to_string()
    };
    let (keep, gone) = (add("keep"), add("gone"));
    let listed = || d.req("GET", &format!("/vms/{vm}/routes"), None).ids();

    // Another owner: 404, as if it did not exist, and the route stays.
    let r = d.as_key(&bob, "DELETE", &format!("/routes/{gone}"), None);
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.error(), format!("route {gone} not found"));
    assert_eq!(listed(), [keep.clone(), gone.clone()]);

    // Its owner: the Hatch answer, and it is gone from the list.
    let r = d.req("DELETE", &format!("/routes/{gone}"), None);
    assert_eq!(
        (r.status, r.body.clone()),
        (200, json!({"status": "deleted"})),
        "{}",
        r.text
    );
    assert_eq!(listed(), std::slice::from_ref(&keep));
    let again = d.req("DELETE", &format!("/routes/{gone}"), None);
    assert_eq!(again.status, 404, "{}", again.text);
    // Ids of the wrong shape are a 404 before any lookup; no key is a 401.
    let r = d.req("DELETE", "/routes/rt_nope", None);
    assert_eq!(
        (r.status, r.error()),
        (404, "route not found (not a route id)")
    );
    assert_eq!(
        d.curl("DELETE", &format!("/routes/{keep}"), &[], None)
            .status,
        401
    );
    assert_eq!(d.req("GET", &format!("/routes/{keep}"), None).status, 405);
    // Today's path still works beside it.
    let r = d.req("DELETE", &format!("/vms/{vm}/routes/{keep}"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(listed().is_empty());
}
