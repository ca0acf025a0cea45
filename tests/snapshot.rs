//! Snapshots through the Hatch API with real guests: memory, CPU
//! and disk are captured and stored; restore continues the guest where it
//! was, with its address and SSH port; corrupt or missing objects are caught
//! and nothing is lost; deleting the VM deletes its stored objects. Those
//! scenarios run against the local store and against a real S3-compatible
//! server (s3s-fs), looking at the objects through the store itself.
//! Background compression (cut by kill -9, failing, the VM's default) is
//! watched in the local store's files, where a half-written object shows.

#[macro_use]
mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// The VM's stored objects (key, size), as the store lists them.
fn objects_of(d: &Daemon, vm_id: &str) -> Vec<(String, u64)> {
    d.stored_objects(&format!("snapshots/{vm_id}/"))
}

on_both_stores!(snapshot_and_restore: snapshot_and_restore_continue_the_guest, snapshot_and_restore_continue_the_guest_s3);

fn snapshot_and_restore(storage: Storage) {
    let d = Daemon::start_storage_with(storage, &[("HATCH_CHUNK_GRACE", "0s")]);
    let (key, public) = keypair(&d.data_dir);
    let vm = counting_guest(&d, &public);
    let id = vm["id"].as_str().unwrap().to_string();
    let target = format!("root@{}", vm["guest_ip"].as_str().unwrap());
    d.ssh_ok(
        None,
        &key,
        &target,
        22,
        "echo in-ram > /tmp/ram-marker; echo on-disk > /root/disk-marker; sync",
    );
    wait_until("a few ticks", BOOT_TIMEOUT, || last_tick(&d.logs(&id)) >= 3);

    // Wrong states first: nothing to restore yet, and a running VM cannot be restored.
    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(r.status, 409, "{}", r.text);

    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let snap = r.body.clone();
    let snap_id = snap["id"].as_str().unwrap().to_string();
    assert!(snap_id.starts_with("snap_"), "{snap}");
    assert_eq!(snap["vm_id"], id.as_str());
    for (field, part) in [
        ("state_key", "vmstate"),
        ("memory_key", "memory"),
        ("disk_key", "disk"),
    ] {
        assert_eq!(
            snap[field],
            format!("snapshots/{id}/{snap_id}/{part}"),
            "{snap}"
        );
    }
    let config: Value = serde_json::from_str(snap["vm_config"].as_str().unwrap()).unwrap();
    assert_eq!(config["vcpu_count"], 1);
    assert_eq!(config["mem_mib"], 512);
    // The device state is one object; memory and disk are the owner's chunks
    // (this owner's only snapshot so far: every chunk is this one's).
    let state: Vec<String> = objects_of(&d, &id).into_iter().map(|(k, _)| k).collect();
    assert_eq!(state, vec![format!("snapshots/{id}/{snap_id}/vmstate")]);
    let stored: u64 = objects_of(&d, &id)
        .iter()
        .chain(d.stored_objects("chunks/").iter())
        .map(|(_, size)| size)
        .sum();
    assert_eq!(
        snap["size_bytes"].as_u64().unwrap(),
        stored,
        "size_bytes is what is stored"
    );
    assert!(
        stored > 1 << 20,
        "the memory image is in the store ({stored} bytes)"
    );

    // Snapshotted: no VMM, no SSH forward, address and port kept.
    let after = d.vm(&id);
    assert_eq!(after["state"], "snapshotted");
    assert_eq!(after["guest_ip"], vm["guest_ip"]);
    assert_eq!(after["ssh_port"], vm["ssh_port"]);
    assert!(d.vmm_pids_of(&id).is_empty(), "its VMM process is gone");
    assert!(!d.nft_table().contains("dnat"));
    let frozen = last_tick(&d.logs(&id));
    for (m, p) in [("POST", "snapshot"), ("POST", "stop"), ("POST", "start")] {
        let r = d.req(m, &format!("/vms/{id}/{p}"), None);
        assert_eq!(r.status, 409, "{p} on a snapshotted VM: {}", r.text);
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        last_tick(&d.logs(&id)),
        frozen,
        "nothing runs while snapshotted"
    );

    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["state"], "running");
    assert_eq!(r.body["guest_ip"], vm["guest_ip"]);
    assert_eq!(r.body["ssh_port"], vm["ssh_port"]);
    // The counter in guest memory goes on from where it was, not from 1.
    wait_until("ticks after restore", Duration::from_secs(30), || {
        last_tick(&d.logs(&id)) > frozen
    });
    let log = d.logs(&id);
    let after_restore = &log[log.rfind(&format!("tick {frozen}")).unwrap()..];
    assert!(
        after_restore.contains(&format!("tick {}", frozen + 1)),
        "{after_restore}"
    );
    assert!(!log.contains("boot=2"), "no reboot happened");
    // RAM-only and disk files are both there, reached through the same SSH port.
    let port = vm["ssh_port"].as_u64().unwrap() as u16;
    let out = d.ssh_ok(
        None,
        &key,
        "root@127.0.0.1",
        port,
        "cat /tmp/ram-marker /root/disk-marker",
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        vec!["in-ram", "on-disk"]
    );

    // A second snapshot lists first.
    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let second = r.body["id"].as_str().unwrap().to_string();
    let list = d.req("GET", &format!("/vms/{id}/snapshots"), None);
    assert_eq!(list.status, 200);
    assert_eq!(
        list.ids(),
        vec![second.clone(), snap_id.clone()],
        "newest first"
    );

    // Deleting the VM deletes its snapshots from storage (with no grace
    // period, their chunks at once).
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    assert!(objects_of(&d, &id).is_empty(), "{:?}", objects_of(&d, &id));
    wait_until("the chunks collected", Duration::from_secs(30), || {
        d.stored_objects("chunks/").is_empty()
    });
    assert_eq!(
        d.req("GET", &format!("/vms/{id}/snapshots"), None).status,
        404
    );
}

on_both_stores!(corrupt_or_missing: corrupt_or_missing_objects_fail_the_restore_and_lose_nothing, corrupt_or_missing_objects_fail_the_restore_and_lose_nothing_s3);

fn corrupt_or_missing(storage: Storage) {
    let mut d = Daemon::start_storage(storage, false);
    let (_key, public) = keypair(&d.data_dir);
    let vm = counting_guest(&d, &public);
    let id = vm["id"].as_str().unwrap().to_string();
    wait_until("ticks", BOOT_TIMEOUT, || last_tick(&d.logs(&id)) >= 2);
    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let snap = r.body["id"].as_str().unwrap().to_string();
    // A chunk in the middle of the memory, and one of the disk's.
    let memory_chunks = d.read_chunk_keys(&snap, "memory");
    let memory = memory_chunks[memory_chunks.len() / 2].clone();
    let disk = d
        .chunk_keys(&snap, "disk")
        .into_iter()
        .find(|k| !memory_chunks.contains(k))
        .unwrap();
    let good = d.read_object(&memory);

    // One flipped byte in a chunk of the memory image.
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x5a;
    d.write_object(&memory, &bad);
    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(r.status, 500, "{}", r.text);
    assert!(
        r.error().contains("corrupt")
            && r.error().contains(&memory)
            && r.error().contains("stays snapshotted"),
        "{}",
        r.text
    );
    assert_eq!(d.vm(&id)["state"], "snapshotted");
    assert!(d.vmm_pids_of(&id).is_empty());
    assert_eq!(
        d.req("GET", &format!("/vms/{id}/snapshots"), None)
            .body
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A missing chunk of the disk.
    d.write_object(&memory, &good);
    let disk_bytes = d.read_object(&disk);
    d.remove_object(&disk);
    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(r.status, 500, "{}", r.text);
    assert!(
        r.error().contains("missing") && r.error().contains(&disk),
        "{}",
        r.text
    );
    assert_eq!(d.vm(&id)["state"], "snapshotted");

    // Repaired, and across a daemon restart: the snapshot restores.
    d.write_object(&disk, &disk_bytes);
    d.kill9();
    d.restart();
    assert_eq!(
        d.vm(&id)["state"],
        "snapshotted",
        "snapshotted is not a transient state"
    );
    let frozen = last_tick(&d.logs(&id));
    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    wait_until("ticks after restore", Duration::from_secs(30), || {
        last_tick(&d.logs(&id)) > frozen
    });
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    assert!(d.vmm_pids().is_empty());
}

#[test]
fn snapshot_needs_a_running_vm_and_unknown_ids_are_404() {
    let d = Daemon::start();
    for (m, p) in [
        ("POST", "/vms/vm_nope/snapshot"),
        ("POST", "/vms/vm_nope/restore"),
        ("GET", "/vms/vm_nope/snapshots"),
    ] {
        let r = d.req(m, p, None);
        assert_eq!(r.status, 404, "{p}: {}", r.text);
    }
    let vm = d.create_vm(r#"{"enable_network": false}"#);
    let id = vm["id"].as_str().unwrap();
    d.wait_console(id, "hatch-guest: ready");
    assert_eq!(d.req("POST", &format!("/vms/{id}/stop"), None).status, 200);
    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.error().contains("only a running VM"), "{}", r.text);
    assert_eq!(
        d.req("GET", &format!("/vms/{id}/snapshots"), None).body,
        json!([])
    );
    let bob = d.create_key(&["--name", "bob"]);
    assert_eq!(
        d.as_key(&bob, "POST", &format!("/vms/{id}/snapshot"), None)
            .status,
        404
    );
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
}

#[test]
fn hypeman_list_get_and_delete_snapshots() {
    let d = Daemon::start();
    let vm = d.create_vm(r#"{"enable_network": false}"#);
    let id = vm["id"].as_str().unwrap().to_string();
    d.wait_console(&id, "hatch-guest: ready");
    let first = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(first.status, 201, "{}", first.text);
    assert_eq!(
        d.req("POST", &format!("/vms/{id}/restore"), None).status,
        200
    );
    let second = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(second.status, 201, "{}", second.text);
    let (a, b) = (
        first.body["id"].as_str().unwrap().to_string(),
        second.body["id"].as_str().unwrap().to_string(),
    );

    // The Hypeman API's model, newest first.
    let list = d.req("GET", "/snapshots", None);
    assert_eq!(list.status, 200, "{}", list.text);
    let items = list.body.as_array().unwrap();
    assert_eq!(
        items
            .iter()
            .map(|s| s["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec![b.as_str(), a.as_str()]
    );
    let s = &items[1];
    assert_eq!(s["kind"], "Standby");
    assert_eq!(s["source_instance_id"], id.as_str());
    assert_eq!(s["source_hypervisor"], "qemu");
    assert_eq!(s["compression_state"], "none");
    assert_eq!(s["tags"], json!({}));
    assert_eq!(s["size_bytes"], first.body["size_bytes"]);
    assert!(
        s["uncompressed_size_bytes"].as_u64().unwrap() > 1 << 20,
        "{s}"
    );
    assert!(s["created_at"].as_str().unwrap().ends_with('Z'));

    let count = |q: &str| {
        let r = d.req("GET", &format!("/snapshots?{q}"), None);
        assert_eq!(r.status, 200, "{q}: {}", r.text);
        r.body.as_array().unwrap().len()
    };
    assert_eq!(count(&format!("source_instance_id={id}")), 2);
    assert_eq!(count("source_instance_id=vm_other"), 0);
    assert_eq!(count("kind=Standby"), 2);
    assert_eq!(count("kind=Stopped"), 0);
    assert_eq!(count("name=nothing"), 0);
    assert_eq!(count("tags%5Bteam%5D=backend"), 0);
    for q in ["kind=Paused", "colour=red"] {
        let r = d.req("GET", &format!("/snapshots?{q}"), None);
        assert_eq!(r.status, 400, "{q}: {}", r.text);
        r.error();
    }

    assert_eq!(
        d.req("GET", &format!("/snapshots/{a}"), None).body["id"],
        a.as_str()
    );
    assert_eq!(d.req("GET", "/snapshots/snap_nope", None).status, 404);
    let bob = d.create_key(&["--name", "bob"]);
    assert_eq!(d.as_key(&bob, "GET", "/snapshots", None).body, json!([]));
    assert_eq!(
        d.as_key(&bob, "GET", &format!("/snapshots/{a}"), None)
            .status,
        404
    );
    assert_eq!(
        d.as_key(&bob, "DELETE", &format!("/snapshots/{a}"), None)
            .status,
        404
    );

    // The snapshot a snapshotted VM needs cannot be deleted; an older one can.
    let r = d.req("DELETE", &format!("/snapshots/{b}"), None);
    assert_eq!(r.status, 409, "{}", r.text);
    let r = d.req("DELETE", &format!("/snapshots/{a}"), None);
    assert_eq!(
        (r.status, r.body.clone()),
        (200, json!({"status": "deleted"})),
        "{}",
        r.text
    );
    assert_eq!(d.req("GET", &format!("/snapshots/{a}"), None).status, 404);
    let left = objects_of(&d, &id);
    assert!(
        left.iter().all(|(k, _)| k.contains(&b)),
        "objects of {a} removed: {left:?}"
    );
    assert_eq!(left.len(), 1, "the device state of {b}: {left:?}");

    // The VM still restores from the one it needs.
    assert_eq!(
        d.req("POST", &format!("/vms/{id}/restore"), None).status,
        200
    );
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    assert!(objects_of(&d, &id).is_empty());
}

/// A guest that counts in memory and prints each tick, without network.
fn ticking_vm(d: &Daemon) -> String {
    let script = "#!/bin/sh\n(i=0; while true; do i=$((i+1)); echo \"tick $i\" > /dev/console; sleep 1; done) &\n";
    let vm = d.create_vm(
        &json!({"enable_network": false, "mem_mib": 128, "user_data": script}).to_string(),
    );
    let id = vm["id"].as_str().unwrap().to_string();
    wait_until("ticks", BOOT_TIMEOUT, || last_tick(&d.logs(&id)) >= 2);
    id
}

/// A Standby snapshot whose memory is compressed with zstd at level 12: tens
/// of seconds for a 128 MiB guest on a loaded test machine (19 takes many
/// minutes), so the compression is still running when the test acts on it.
/// Taken through the Hatch API (the VM's default compression), so the VM
/// sleeps in it.
fn slowly_compressed_snapshot(d: &Daemon, vm: &str) -> String {
    let r = d.req(
        "PATCH",
        &format!("/vms/{vm}"),
        Some(r#"{"snapshot_compression": {"enabled": true, "algorithm": "zstd", "level": 12}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let r = d.req("POST", &format!("/vms/{vm}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    // The Hatch view has no compression fields; the Hypeman one does.
    let s = d.req("GET", &format!("/snapshots/{id}"), None);
    assert_eq!(s.body["compression_state"], "compressing", "{}", s.text);
    assert_eq!(
        s.body["compression"],
        json!({"enabled": true, "algorithm": "zstd", "level": 12})
    );
    id
}

/// The store's chunk objects against the daemon's chunk index: (objects the
/// index lacks, rows whose object is missing).
fn chunk_drift(d: &Daemon) -> (Vec<String>, Vec<String>) {
    let stored: std::collections::BTreeSet<String> = d
        .stored_objects("chunks/")
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !k.contains('#'))
        .collect();
    let indexed: std::collections::BTreeSet<String> = d
        .db_value(
            "SELECT 'chunks/' || owner_id || '/' || substr(lower(hex(hash)), 1, 2) || '/' || lower(hex(hash))
                    || CASE encoding WHEN 'zstd' THEN '.zst' WHEN 'lz4' THEN '.lz4' ELSE '' END FROM chunks",
        )
        .lines()
        .map(str::to_string)
        .collect();
    (
        stored.difference(&indexed).cloned().collect(),
        indexed.difference(&stored).cloned().collect(),
    )
}

/// Waits for background compression to end and returns the snapshot.
fn compression_ended(d: &Daemon, snap: &str) -> Value {
    let mut last = Value::Null;
    wait_until("compression to end", COMPRESSION_TIMEOUT, || {
        last = d.req("GET", &format!("/snapshots/{snap}"), None).body;
        last["compression_state"] != "compressing"
    });
    last
}

/// Restores the VM's snapshot and checks that the guest's in-memory counter
/// goes on from `frozen` without a reboot.
fn restore_continues(d: &Daemon, vm: &str) {
    let frozen = last_tick(&d.logs(vm));
    assert!(frozen >= 2, "{}", d.logs(vm));
    let r = d.req("POST", &format!("/vms/{vm}/restore"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["state"], "running");
    wait_until("ticks after restore", BOOT_TIMEOUT, || {
        last_tick(&d.logs(vm)) > frozen
    });
    let log = d.logs(vm);
    let after = &log[log.rfind(&format!("tick {frozen}")).unwrap()..];
    assert!(after.contains(&format!("tick {}", frozen + 1)), "{after}");
    assert!(!log.contains("boot=2"), "no reboot happened: {log}");
}

const COMPRESSION_TIMEOUT: Duration = Duration::from_secs(300);

/// A daemon killed with SIGKILL in the middle of compressing a snapshot's
/// memory chunks (a crash point: right after the 20th compressed copy was
/// written, before it was recorded) starts that compression again after its
/// restart and finishes it; the copy the kill left unrecorded is swept.
#[test]
fn compression_cut_by_kill_9_resumes_after_restart() {
    let mut d = Daemon::start_with(&[("HATCH_TEST_CRASH_AT", "recode-written:20")]);
    let id = ticking_vm(&d);
    let snap = slowly_compressed_snapshot(&d, &id);
    wait_until("the daemon died compressing", COMPRESSION_TIMEOUT, || {
        d.curl("GET", "/health", &[], None).status != 200
    });
    d.kill9();

    // What the kill left: the database says compressing, some chunks are
    // recorded compressed, most are still raw, and a compressed copy or a
    // few are in the store without a row.
    assert_eq!(
        d.db_value(&format!(
            "SELECT compression_state FROM snapshots WHERE id = '{snap}'"
        )),
        "compressing"
    );
    let keys = d.chunk_keys(&snap, "memory");
    let compressed = keys.iter().filter(|k| k.ends_with(".zst")).count();
    assert!(
        compressed < 20 && compressed * 2 < keys.len(),
        "{compressed} of {}",
        keys.len()
    );
    let (unindexed, missing) = chunk_drift(&d);
    assert!(missing.is_empty(), "{missing:?}");
    // The killed one's copy, and those of the others being compressed at
    // the same moment (four at once): written, not yet recorded.
    assert!((1..=4).contains(&unindexed.len()), "{unindexed:?}");
    assert!(
        unindexed.iter().all(|k| k.ends_with(".zst")),
        "{unindexed:?}"
    );

    d.set_env("HATCH_TEST_CRASH_AT", None);
    d.restart();
    let s = compression_ended(&d, &snap);
    assert_eq!(s["compression_state"], "compressed", "{s}");
    assert!(
        d.daemon_log_plain()
            .lines()
            .any(|l| l.contains("resuming interrupted compression")
                && l.contains(&format!("snapshot={snap}"))),
        "{}",
        d.daemon_log_plain()
    );
    // Every memory chunk this snapshot alone holds is compressed now, the
    // unrecorded copy is gone, and the sizes say so.
    let keys = d.chunk_keys(&snap, "memory");
    assert!(
        keys.iter().filter(|k| k.ends_with(".zst")).count() * 2 > keys.len(),
        "{keys:?}"
    );
    wait_until("the sweep", Duration::from_secs(30), || {
        chunk_drift(&d) == (vec![], vec![])
    });
    assert!(
        s["compressed_size_bytes"].as_u64().unwrap()
            < s["uncompressed_size_bytes"].as_u64().unwrap(),
        "{s}"
    );
    let stored: u64 = d
        .stored_objects(&format!("snapshots/{id}/"))
        .iter()
        .chain(d.stored_objects("chunks/").iter())
        .map(|(_, n)| n)
        .sum();
    assert_eq!(s["size_bytes"].as_u64().unwrap(), stored, "{s}");
    assert_eq!(d.vm(&id)["state"], "snapshotted");
    restore_continues(&d, &id);
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
}

/// A compression that fails ends `error` with the reason, and the snapshot
/// still restores: chunks that could not be compressed stay raw. The failure
/// is real: right after the snapshot is stored, the owner's chunk
/// directories are made immutable (chattr +i), so no compressed copy can be
/// written into them.
#[test]
fn failed_compression_keeps_the_raw_memory_restorable() {
    let d = Daemon::start();
    let id = ticking_vm(&d);
    let snap = slowly_compressed_snapshot(&d, &id);
    let owner = d.db_value(&format!(
        "SELECT owner_id FROM snapshots WHERE id = '{snap}'"
    ));
    let dirs: Vec<String> = std::fs::read_dir(d.data_dir.join("objects/chunks").join(&owner))
        .unwrap()
        .map(|e| e.unwrap().path().to_string_lossy().into_owned())
        .collect();
    let chattr = |flag: &str| {
        let out = std::process::Command::new("chattr")
            .arg(flag)
            .args(&dirs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    chattr("+i");
    let s = compression_ended(&d, &snap);
    chattr("-i");
    assert_eq!(s["compression_state"], "error", "{s}");
    let reason = s["compression_error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("could not be compressed"),
        "the reason is given: {s}"
    );
    // The sizes are what is stored (raw chunks, and any compressed before the failure).
    let stored: u64 = d
        .stored_objects(&format!("snapshots/{id}/"))
        .iter()
        .chain(d.stored_objects("chunks/").iter())
        .filter(|(k, _)| !k.contains('#'))
        .map(|(_, n)| n)
        .sum();
    let (unindexed, missing) = chunk_drift(&d);
    assert!(missing.is_empty(), "{missing:?}");
    let extra: u64 = d
        .stored_objects("chunks/")
        .iter()
        .filter(|(k, _)| unindexed.contains(k))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(s["size_bytes"].as_u64().unwrap(), stored - extra, "{s}");
    assert_eq!(d.vm(&id)["state"], "snapshotted");
    restore_continues(&d, &id);
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
}

/// `snapshot_compression: null` on a VM (at create or in a PATCH) leaves no
/// default of its own: its snapshots follow the server's again.
#[test]
fn a_vm_compression_default_of_null_follows_the_server() {
    let d = Daemon::start_with(&[("HATCH_SNAPSHOT_COMPRESSION", "lz4")]);
    let vm =
        d.create_vm(r#"{"enable_network": false, "mem_mib": 128, "snapshot_compression": null}"#);
    assert_eq!(vm["snapshot_compression"], Value::Null, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    d.wait_console(&id, "hatch-guest: ready");
    let path = format!("/vms/{id}");
    let hatch_snapshot = || {
        let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
        assert_eq!(r.status, 201, "{}", r.text);
        let s = compression_ended(&d, r.body["id"].as_str().unwrap());
        assert_eq!(
            d.req("POST", &format!("/vms/{id}/restore"), None).status,
            200
        );
        s
    };

    // Its own default (off) wins over the server's lz4.
    let r = d.req(
        "PATCH",
        &path,
        Some(r#"{"snapshot_compression": {"enabled": false}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["snapshot_compression"]["enabled"], false,
        "{}",
        r.text
    );
    let s = hatch_snapshot();
    assert_eq!(s["compression"]["enabled"], false, "{s}");
    assert_eq!(s["compression_state"], "none", "{s}");

    // null clears it: the server's lz4 applies again.
    let r = d.req("PATCH", &path, Some(r#"{"snapshot_compression": null}"#));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["snapshot_compression"], Value::Null, "{}", r.text);
    assert_eq!(d.vm(&id)["snapshot_compression"], Value::Null);
    let s = hatch_snapshot();
    assert_eq!(
        s["compression"],
        json!({"enabled": true, "algorithm": "lz4", "level": 0}),
        "{s}"
    );
    assert_eq!(s["compression_state"], "compressed", "{s}");
    assert_eq!(d.req("DELETE", &path, None).status, 200);
}
