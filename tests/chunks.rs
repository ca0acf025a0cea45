//! Chunked snapshot storage with real guests, on the local store and on a
//! real S3-compatible server (s3s-fs): a second snapshot of the same guest
//! uploads only the chunks that changed (counted in the store), deleting one
//! of two snapshots that share chunks frees only what the other does not
//! need and leaves it restorable, owners never share chunks, a kill -9 in
//! the middle of a capture, a deletion or a collection loses nothing and
//! leaks nothing once the daemon is back, and snapshots stored as whole
//! objects (the format before chunks) are converted and still restore.
//!
//! The kill -9s are put exactly between two steps with the daemon's crash
//! points (`HATCH_TEST_CRASH_AT`, src/crash.rs): the daemon SIGKILLs itself there.

#[macro_use]
mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The chunk objects in the store: key -> size (staging files excluded).
fn chunks(d: &Daemon) -> BTreeMap<String, u64> {
    d.stored_objects("chunks/")
        .into_iter()
        .filter(|(k, _)| !k.contains('#'))
        .collect()
}

/// The hash a chunk key names (its last segment, without an encoding suffix).
fn hash_in(key: &str) -> String {
    let name = key.rsplit('/').next().unwrap();
    name.split('.').next().unwrap().to_string()
}

fn hashes(keys: &BTreeMap<String, u64>) -> BTreeSet<String> {
    keys.keys().map(|k| hash_in(k)).collect()
}

/// The chunks the daemon's database says `snap` references.
fn referenced(d: &Daemon, snap: &str) -> BTreeSet<String> {
    d.db_value(&format!(
        "SELECT lower(hex(hash)) FROM chunk_refs WHERE snapshot_id = '{snap}'"
    ))
    .lines()
    .map(str::to_string)
    .collect()
}

fn bytes(keys: &BTreeMap<String, u64>) -> u64 {
    keys.values().sum()
}

/// User data of a guest that counts in memory and prints each tick on its console.
const TICKER: &str = "#!/bin/sh\n(i=0; while true; do i=$((i+1)); echo \"tick $i\" > /dev/console; sleep 1; done) &\n";

fn ticking_vm(d: &Daemon) -> String {
    let vm = d.create_vm(&json!({ "user_data": TICKER, "enable_network": false }).to_string());
    let id = vm["id"].as_str().unwrap().to_string();
    wait_until("ticks", BOOT_TIMEOUT, || last_tick(&d.logs(&id)) >= 3);
    id
}

fn snapshot(d: &Daemon, id: &str) -> Value {
    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    r.body
}

/// Restores a snapshotted VM and waits until it ticks past where it stopped.
fn restore_and_tick(d: &Daemon, id: &str, more: u64) {
    let frozen = last_tick(&d.logs(id));
    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    wait_until("ticks after restore", Duration::from_secs(60), || {
        last_tick(&d.logs(id)) >= frozen + more
    });
    let log = d.logs(id);
    let after = &log[log.rfind(&format!("tick {frozen}")).unwrap()..];
    assert!(after.contains(&format!("tick {}", frozen + 1)), "{after}");
}

on_both_stores!(dedup: a_second_snapshot_uploads_only_what_changed, a_second_snapshot_uploads_only_what_changed_s3);

fn dedup(storage: Storage) {
    let d = Daemon::start_storage_with(storage, &[("HATCH_CHUNK_GRACE", "0s")]);
    let id = ticking_vm(&d);
    assert!(chunks(&d).is_empty());

    let first = snapshot(&d, &id);
    let s1 = first["id"].as_str().unwrap().to_string();
    let after1 = chunks(&d);
    let state = d.stored_objects(&format!("snapshots/{id}/{s1}/"));
    assert_eq!(
        state
            .iter()
            .map(|(k, _)| k.rsplit('/').next().unwrap())
            .collect::<Vec<_>>(),
        vec!["vmstate"],
        "memory and disk are chunks; the device state is one object"
    );
    assert!(
        bytes(&after1) > 8 << 20,
        "memory and disk are stored: {} bytes",
        bytes(&after1)
    );
    assert_eq!(
        first["size_bytes"].as_u64().unwrap(),
        state[0].1 + bytes(&after1),
        "size_bytes: the device state and every chunk the snapshot references"
    );
    assert_eq!(hashes(&after1), referenced(&d, &s1));

    // The guest runs on for a while, then sleeps again: only what changed goes up.
    restore_and_tick(&d, &id, 3);
    let second = snapshot(&d, &id);
    let s2 = second["id"].as_str().unwrap().to_string();
    let after2 = chunks(&d);
    let new: BTreeMap<String, u64> = after2
        .iter()
        .filter(|(k, _)| !after1.contains_key(*k))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert!(
        !new.is_empty(),
        "the guest's memory changed: some chunks are new"
    );
    // The issue's target: at most 5% of the guest's RAM for a sleep after the first.
    let ram = d.vm(&id)["mem_mib"].as_u64().unwrap() << 20;
    assert!(
        bytes(&new) * 20 < ram,
        "the second snapshot uploaded {} bytes (the first {}), RAM {ram}",
        bytes(&new),
        bytes(&after1)
    );
    let refs2 = referenced(&d, &s2);
    assert!(
        refs2.intersection(&referenced(&d, &s1)).count() > refs2.len() / 2,
        "most of the second snapshot is the first's chunks"
    );
    assert!(
        second["size_bytes"].as_u64().unwrap() > bytes(&new) * 2,
        "size_bytes counts the shared chunks too: {second}"
    );

    // Deleting the first frees only the chunks the second does not reference.
    let only_first: BTreeSet<String> = referenced(&d, &s1).difference(&refs2).cloned().collect();
    assert!(
        !only_first.is_empty(),
        "the first snapshot had chunks of its own"
    );
    let r = d.req("DELETE", &format!("/snapshots/{s1}"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    wait_until(
        "the first snapshot's own chunks collected",
        Duration::from_secs(30),
        || hashes(&chunks(&d)) == refs2,
    );
    assert!(d
        .stored_objects(&format!("snapshots/{id}/{s1}/"))
        .is_empty());

    // The second still restores, every chunk verified on the way.
    restore_and_tick(&d, &id, 2);

    // Deleting the VM deletes its snapshots; their chunks go with no grace.
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    wait_until("every chunk collected", Duration::from_secs(30), || {
        chunks(&d).is_empty()
    });
    assert_eq!(d.db_value("SELECT COUNT(*) FROM chunks"), "0");
}

/// Deleted snapshots' chunks stay for the grace period, and a new snapshot
/// that holds the same bytes reuses them instead of uploading them again.
#[test]
fn deleted_chunks_wait_for_the_grace_period_and_are_reused() {
    let d = Daemon::start_with(&[("HATCH_CHUNK_GRACE", "1h")]);
    let id = ticking_vm(&d);
    let s1 = snapshot(&d, &id)["id"].as_str().unwrap().to_string();
    let after1 = chunks(&d);
    restore_and_tick(&d, &id, 2);
    let r = d.req("DELETE", &format!("/snapshots/{s1}"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        chunks(&d),
        after1,
        "within the grace period nothing is collected"
    );
    let orphans: u64 = d
        .db_value("SELECT COUNT(*) FROM chunks WHERE orphaned_at IS NOT NULL")
        .parse()
        .unwrap();
    assert_eq!(orphans as usize, after1.len(), "all of them are orphaned");
    let s2 = snapshot(&d, &id)["id"].as_str().unwrap().to_string();
    let after2 = chunks(&d);
    let new = after2.keys().filter(|k| !after1.contains_key(*k)).count();
    assert!(
        new * 4 < after1.len(),
        "{new} new chunks of {}",
        after1.len()
    );
    let still_orphaned: BTreeSet<String> = d
        .db_value("SELECT lower(hex(hash)) FROM chunks WHERE orphaned_at IS NOT NULL")
        .lines()
        .map(str::to_string)
        .collect();
    assert!(
        still_orphaned.is_disjoint(&referenced(&d, &s2)),
        "what the new snapshot references is no longer orphaned"
    );
    restore_and_tick(&d, &id, 2);
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
}

/// Two owners booting the same image hold the same bytes, but each stores
/// its own chunks: a shared store would tell one tenant what another holds.
#[test]
fn owners_never_share_chunks() {
    let d = Daemon::start();
    let bob = d.create_key(&["--name", "bob"]);
    let a = ticking_vm(&d);
    let sa = snapshot(&d, &a)["id"].as_str().unwrap().to_string();
    let alice_chunks = chunks(&d);
    let body = json!({ "user_data": TICKER, "enable_network": false }).to_string();
    let vm = d.as_key(&bob, "POST", "/vms", Some(&body));
    assert_eq!(vm.status, 201, "{}", vm.text);
    let b = vm.body["id"].as_str().unwrap().to_string();
    wait_until("bob's ticks", BOOT_TIMEOUT, || {
        last_tick(&d.as_key(&bob, "GET", &format!("/vms/{b}/logs"), None).text) >= 3
    });
    let r = d.as_key(&bob, "POST", &format!("/vms/{b}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let sb = r.body["id"].as_str().unwrap().to_string();
    let owner = |s: &str| d.db_value(&format!("SELECT owner_id FROM snapshots WHERE id = '{s}'"));
    let (alice, bob_id) = (owner(&sa), owner(&sb));
    assert_ne!(alice, bob_id);
    let all = chunks(&d);
    let bobs: BTreeMap<String, u64> = all
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("chunks/{bob_id}/")))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(
        all.len(),
        alice_chunks.len() + bobs.len(),
        "alice's and bob's, nothing else"
    );
    assert!(alice_chunks
        .keys()
        .all(|k| k.starts_with(&format!("chunks/{alice}/"))));
    assert_eq!(hashes(&bobs), referenced(&d, &sb));
    assert!(
        bytes(&bobs) * 2 > bytes(&alice_chunks),
        "bob stored his own copy ({} bytes against alice's {})",
        bytes(&bobs),
        bytes(&alice_chunks)
    );
    // The same memory is mostly the same chunks: only the owner keeps them apart.
    let common = hashes(&alice_chunks).intersection(&hashes(&bobs)).count();
    assert!(common > 0, "the two guests hold the same bytes somewhere");
    assert_eq!(
        d.as_key(&bob, "DELETE", &format!("/snapshots/{sa}"), None)
            .status,
        404
    );
    assert_eq!(d.req("DELETE", &format!("/vms/{a}"), None).status, 200);
    assert_eq!(
        d.as_key(&bob, "DELETE", &format!("/vms/{b}"), None).status,
        200
    );
}

on_both_stores!(crashes: a_kill_in_capture_delete_or_collection_loses_and_leaks_nothing, a_kill_in_capture_delete_or_collection_loses_and_leaks_nothing_s3);

fn crashes(storage: Storage) {
    let mut d = Daemon::start_storage_with(
        storage,
        &[
            ("HATCH_CHUNK_GRACE", "0s"),
            // The second capture dies after uploading its chunks.
            ("HATCH_TEST_CRASH_AT", "capture-uploaded:2"),
        ],
    );
    let id = ticking_vm(&d);
    let s1 = snapshot(&d, &id)["id"].as_str().unwrap().to_string();
    let kept = chunks(&d);
    restore_and_tick(&d, &id, 3);

    // 1. Capture: the daemon dies with the new chunks uploaded, nothing committed.
    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_ne!(r.status, 201, "the daemon died in the capture: {}", r.text);
    d.kill9();
    let uploaded = chunks(&d);
    assert!(
        uploaded.len() > kept.len(),
        "the cut capture left chunks without a manifest"
    );
    d.set_env("HATCH_TEST_CRASH_AT", Some("collect-rows-taken:1"));
    d.restart();
    // The half snapshot is gone, and so are its chunks (the start-up sweep).
    let listed = d.req("GET", &format!("/vms/{id}/snapshots"), None);
    assert_eq!(listed.ids(), vec![s1.clone()], "{}", listed.text);
    wait_until(
        "the sweep removed the cut capture's chunks",
        Duration::from_secs(30),
        || chunks(&d) == kept,
    );
    // The VM lost its VMM with the daemon; the first snapshot still brings it back.
    let frozen = last_tick(&d.logs(&id));
    let r = d.req(
        "POST",
        &format!("/instances/{id}/snapshots/{s1}/restore"),
        Some(r#"{"target_state": "Running"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    wait_until(
        "ticks after restoring the first snapshot",
        Duration::from_secs(60),
        // New ticks: the guest ran, so its memory differs from the first snapshot's.
        || last_tick(&d.logs(&id)) > frozen && d.vm(&id)["state"] == "running",
    );

    // 2. Collection: a second snapshot, the first deleted; the collection
    // dies with the rows of the first's own chunks gone, their objects not.
    let s2 = snapshot(&d, &id)["id"].as_str().unwrap().to_string();
    let refs2 = referenced(&d, &s2);
    let only_first: BTreeSet<String> = referenced(&d, &s1).difference(&refs2).cloned().collect();
    assert!(!only_first.is_empty());
    let _ = d.req("DELETE", &format!("/snapshots/{s1}"), None);
    wait_until(
        "the daemon died in the collection",
        Duration::from_secs(30),
        || d.curl("GET", "/health", &[], None).status != 200,
    );
    d.kill9();
    assert!(
        !hashes(&chunks(&d)).is_disjoint(&only_first),
        "objects whose rows went are still in the store"
    );
    assert_eq!(
        d.db_value(&format!("SELECT COUNT(*) FROM snapshots WHERE id = '{s1}'")),
        "0"
    );
    d.set_env("HATCH_TEST_CRASH_AT", Some("delete-objects-gone:1"));
    d.restart();
    wait_until("the sweep removed them", Duration::from_secs(30), || {
        hashes(&chunks(&d)) == refs2
    });

    // 3. Delete: the daemon dies after the device state object went, before the row.
    restore_and_tick(&d, &id, 2);
    let s3 = snapshot(&d, &id)["id"].as_str().unwrap().to_string();
    restore_and_tick(&d, &id, 2);
    let r = d.req("DELETE", &format!("/snapshots/{s2}"), None);
    assert_ne!(r.status, 200, "the daemon died in the delete: {}", r.text);
    d.kill9();
    d.set_env("HATCH_TEST_CRASH_AT", None);
    d.restart();
    // Still listed (its row is there) and deleting it again finishes the job.
    assert_eq!(d.req("GET", &format!("/snapshots/{s2}"), None).status, 200);
    assert_eq!(
        d.req("DELETE", &format!("/snapshots/{s2}"), None).status,
        200
    );
    let refs3 = referenced(&d, &s3);
    wait_until(
        "only the last snapshot's chunks are left",
        Duration::from_secs(30),
        || hashes(&chunks(&d)) == refs3,
    );
    // Every chunk it needs is there: it restores (the VM is running: fork it).
    let r = d.req(
        "POST",
        &format!("/snapshots/{s3}/fork"),
        Some(r#"{"name": "after-crashes", "target_state": "Running"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let fork = r.body["id"].as_str().unwrap().to_string();
    let from = last_tick(&d.logs(&id));
    wait_until("the fork ticks", Duration::from_secs(60), || {
        last_tick(&d.logs(&fork)) > 0
    });
    let _ = from;
    for vm in [&id, &fork] {
        assert_eq!(d.req("DELETE", &format!("/vms/{vm}"), None).status, 200);
    }
    wait_until("nothing left", Duration::from_secs(30), || {
        chunks(&d).is_empty()
    });
    assert!(d.vmm_pids().is_empty());
}

/// Rewrites the chunked snapshot `snap` (daemon stopped) as the format
/// before chunks wrote it: memory and disk as whole objects beside the
/// device state (memory compressed with zstd as `memory.zstd` when
/// `compressed`), checksums and sizes in the row, and no chunk, manifest or
/// reference left. `stream`, when given, is (memory, device state) to store
/// instead of the snapshot's own.
fn make_whole_object_snapshot(
    d: &Daemon,
    vm: &str,
    snap: &str,
    compressed: bool,
    stream: Option<(Vec<u8>, Vec<u8>)>,
) {
    use sha2::{Digest, Sha256};
    let objects = d.data_dir.join("objects");
    let join = |part: &str| -> Vec<u8> {
        d.manifest_keys(snap, part)
            .iter()
            .flat_map(|k| std::fs::read(objects.join(k)).unwrap())
            .collect()
    };
    let dir = objects.join(format!("snapshots/{vm}/{snap}"));
    let sum = |b: &[u8]| hex::encode(Sha256::digest(b));
    let (memory, disk) = (join("memory"), join("disk"));
    let mut set = String::new();
    let memory = match stream {
        Some((memory, state)) => {
            std::fs::write(dir.join("vmstate"), &state).unwrap();
            set += &format!(
                "state_sha256 = '{}', state_size = {}, ",
                sum(&state),
                state.len()
            );
            memory
        }
        None => memory,
    };
    std::fs::write(dir.join("disk"), &disk).unwrap();
    let state: u64 = std::fs::metadata(dir.join("vmstate")).unwrap().len();
    set += &format!(
        "layout = 'objects', memory_sha256 = '{}', memory_size = {}, disk_sha256 = '{}', disk_size = {}",
        sum(&memory),
        memory.len(),
        sum(&disk),
        disk.len()
    );
    if compressed {
        let packed = zstd::encode_all(&memory[..], 3).unwrap();
        std::fs::write(dir.join("memory.zstd"), &packed).unwrap();
        set += &format!(
            ", compression = '{{\"enabled\":true,\"algorithm\":\"zstd\",\"level\":3}}',
             compression_state = 'compressed', compressed_key = 'snapshots/{vm}/{snap}/memory.zstd',
             compressed_sha256 = '{}', compressed_size_bytes = {}, size_bytes = {}",
            sum(&packed),
            packed.len(),
            state + packed.len() as u64 + disk.len() as u64
        );
    } else {
        std::fs::write(dir.join("memory"), &memory).unwrap();
        set += &format!(
            ", size_bytes = {}",
            state + memory.len() as u64 + disk.len() as u64
        );
    }
    d.db_value(&format!("UPDATE snapshots SET {set} WHERE id = '{snap}'"));
    d.db_value(&format!(
        "DELETE FROM manifests WHERE snapshot_id = '{snap}'"
    ));
    d.db_value(&format!(
        "DELETE FROM chunk_refs WHERE snapshot_id = '{snap}'"
    ));
}

/// Snapshots stored as whole objects (the format before chunks; one plain,
/// one with zstd-compressed memory) are converted to chunks at start-up and
/// restore, the guest going on from where it was; their whole objects go.
#[test]
fn snapshots_stored_as_whole_objects_are_converted_and_still_restore() {
    let mut d = Daemon::start_with(&[("HATCH_CHUNK_GRACE", "0s")]);
    let plain = ticking_vm(&d);
    let packed = ticking_vm(&d);
    let sp = snapshot(&d, &plain)["id"].as_str().unwrap().to_string();
    let sz = snapshot(&d, &packed)["id"].as_str().unwrap().to_string();
    d.kill9();
    make_whole_object_snapshot(&d, &plain, &sp, false, None);
    make_whole_object_snapshot(&d, &packed, &sz, true, None);
    d.db_value("DELETE FROM chunks");
    std::fs::remove_dir_all(d.data_dir.join("objects/chunks")).unwrap();
    fn names(d: &Daemon, vm: &str, snap: &str) -> Vec<String> {
        let prefix = format!("snapshots/{vm}/{snap}/");
        d.stored_objects(&prefix)
            .into_iter()
            .map(|(k, _)| k[prefix.len()..].to_string())
            .collect()
    }
    assert_eq!(names(&d, &plain, &sp), vec!["disk", "memory", "vmstate"]);
    assert_eq!(
        names(&d, &packed, &sz),
        vec!["disk", "memory.zstd", "vmstate"]
    );

    d.restart();
    wait_until("both converted", Duration::from_secs(120), || {
        let log = d.daemon_log_plain();
        [&sp, &sz].iter().all(|s| {
            log.lines()
                .any(|l| l.contains("snapshot converted to chunks") && l.contains(s.as_str()))
        })
    });
    assert_eq!(
        d.db_value("SELECT COUNT(*) FROM snapshots WHERE layout = 'chunks'"),
        "2"
    );
    for (vm, snap) in [(&plain, &sp), (&packed, &sz)] {
        assert_eq!(
            names(&d, vm, snap),
            vec!["vmstate"],
            "the whole objects went"
        );
        assert!(!d.chunk_keys(snap, "memory").is_empty());
        assert!(hashes(&chunks(&d)).is_superset(&referenced(&d, snap)));
    }
    // The compressed one is compressed again, chunk by chunk (those it
    // shares with the other stay as they are).
    let s = d.req("GET", &format!("/snapshots/{sz}"), None).body;
    assert_eq!(s["compression_state"], "compressed", "{s}");
    assert!(
        d.chunk_keys(&sz, "memory")
            .iter()
            .any(|k| k.ends_with(".zst")),
        "its chunks are stored compressed"
    );
    for vm in [&plain, &packed] {
        assert_eq!(d.vm(vm)["state"], "snapshotted");
        restore_and_tick(&d, vm, 2);
        assert_eq!(d.req("DELETE", &format!("/vms/{vm}"), None).status, 200);
    }
    wait_until("every chunk collected", Duration::from_secs(30), || {
        chunks(&d).is_empty()
    });
}

/// Commands to a QEMU's QMP socket, one session; the answers in order (an
/// error answer fails the test).
fn qmp(sock: &std::path::Path, commands: &[Value]) -> Vec<Value> {
    use std::io::{BufRead, BufReader, Write};
    let mut conn = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let mut lines = BufReader::new(conn.try_clone().unwrap()).lines();
    let mut answer = |conn: &mut std::os::unix::net::UnixStream, cmd: &Value| -> Value {
        writeln!(conn, "{cmd}").unwrap();
        loop {
            let v: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            assert!(v.get("error").is_none(), "{cmd}: {v}");
            if let Some(r) = v.get("return") {
                return r.clone();
            }
        }
    };
    // The greeting has neither `return` nor `error`: `answer` reads past it.
    answer(&mut conn, &json!({"execute": "qmp_capabilities"}));
    commands.iter().map(|c| answer(&mut conn, c)).collect()
}

/// A QEMU snapshot as it was stored before guest RAM became a memfd: the
/// memory object a whole migration stream (RAM and device state), the
/// state object a JSON description. Stored as whole objects, it is
/// converted at start-up and restores, the guest ticking on; new snapshots
/// of that VM are of the current kind. QEMU runs unconfined here so the
/// test can have it write the stream with `exec:` (the sandbox forbids
/// spawning), as the daemon did then.
#[test]
fn a_qemu_snapshot_whose_memory_is_a_whole_migration_stream_still_restores() {
    let mut d = Daemon::start_with(&[("HATCH_CHUNK_GRACE", "0s"), ("HATCH_VMM_CONFINE", "off")]);
    let vm = ticking_vm(&d);
    let sock = d.data_dir.join("vms").join(&vm).join("vmm.sock");
    let stream = d.data_dir.join("stream");
    qmp(
        &sock,
        &[
            json!({"execute": "stop"}),
            json!({"execute": "migrate", "arguments": {"uri": format!("exec:cat > {}", stream.display())}}),
        ],
    );
    wait_until("the stream is written", Duration::from_secs(60), || {
        qmp(&sock, &[json!({"execute": "query-migrate"})])[0]["status"] == "completed"
    });
    // QEMU takes no second migration of a guest a finished one paused: it
    // runs on for the moment before the daemon's own snapshot, which gives
    // the rows and the disk (the ticker writes nothing to its disk meanwhile).
    qmp(&sock, &[json!({"execute": "cont"})]);
    let snap = snapshot(&d, &vm)["id"].as_str().unwrap().to_string();
    d.kill9();
    let memory = std::fs::read(&stream).unwrap();
    assert!(
        memory.starts_with(b"QEVM") && memory.len() > 16 << 20,
        "a whole stream"
    );
    let state = json!({
        "hypervisor": "qemu",
        "format": "qemu migration stream (device state and RAM) in the memory object",
    });
    make_whole_object_snapshot(
        &d,
        &vm,
        &snap,
        false,
        Some((memory, state.to_string().into_bytes())),
    );
    d.db_value("DELETE FROM chunks");
    std::fs::remove_dir_all(d.data_dir.join("objects/chunks")).unwrap();

    d.restart();
    wait_until("converted", Duration::from_secs(120), || {
        d.daemon_log_plain()
            .lines()
            .any(|l| l.contains("snapshot converted to chunks") && l.contains(snap.as_str()))
    });
    restore_and_tick(&d, &vm, 2);
    // Its next snapshot is of the current kind (device state only), and restores too.
    let again = snapshot(&d, &vm)["id"].as_str().unwrap().to_string();
    let state = d.read_object(&format!("snapshots/{vm}/{again}/vmstate"));
    assert!(
        state.starts_with(b"QEVM") && state.len() < 4 << 20,
        "{} bytes",
        state.len()
    );
    restore_and_tick(&d, &vm, 2);
    assert_eq!(d.req("DELETE", &format!("/vms/{vm}"), None).status, 200);
}
