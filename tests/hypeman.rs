//! Hypeman's snapshot API (seeds 002, 003) with real guests under TCG:
//! Standby and Stopped snapshots, compression in the background at every
//! level edge, names and tags, restore by snapshot id, and forks that run
//! beside their source. Each scenario runs against a real S3-compatible
//! server (s3s-fs) and against the local store.

#[macro_use]
mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const COMPRESSION_TIMEOUT: Duration = Duration::from_secs(300);

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

fn snapshot(d: &Daemon, vm: &str, body: Value) -> Response {
    d.req(
        "POST",
        &format!("/instances/{vm}/snapshots"),
        Some(&body.to_string()),
    )
}

/// Waits for background compression to end and returns the snapshot.
fn compressed(d: &Daemon, snap: &str) -> Value {
    let mut last = Value::Null;
    wait_until("compression to finish", COMPRESSION_TIMEOUT, || {
        last = d.req("GET", &format!("/snapshots/{snap}"), None).body;
        last["compression_state"] != "compressing"
    });
    last
}

/// What a snapshot occupies, counted in the store: (its device state object
/// plus each distinct chunk of its memory and disk as stored, the memory's
/// distinct chunks alone).
fn occupied(d: &Daemon, vm: &str, snap: &str) -> (u64, u64) {
    let sizes: std::collections::HashMap<String, u64> =
        d.stored_objects("chunks/").into_iter().collect();
    let distinct = |part: &str| -> std::collections::BTreeSet<String> {
        d.chunk_keys(snap, part).into_iter().collect()
    };
    let (memory, disk) = (distinct("memory"), distinct("disk"));
    let sum =
        |keys: &std::collections::BTreeSet<String>| -> u64 { keys.iter().map(|k| sizes[k]).sum() };
    let state: u64 = parts(d, vm, snap).iter().map(|(_, n)| n).sum();
    (
        state + sum(&memory.union(&disk).cloned().collect()),
        sum(&memory),
    )
}

/// Keys under the snapshot's prefix, relative to it (`vmstate`, ...).
fn parts(d: &Daemon, vm: &str, snap: &str) -> Vec<(String, u64)> {
    let prefix = format!("snapshots/{vm}/{snap}/");
    d.stored_objects(&prefix)
        .into_iter()
        .map(|(k, s)| (k[prefix.len()..].to_string(), s))
        .collect()
}

on_both_stores!(standby_compression: standby_snapshots_compress_at_every_level_edge, standby_snapshots_compress_at_every_level_edge_s3);

fn standby_compression(storage: Storage) {
    let d = Daemon::start_storage(storage, false);
    let script = "#!/bin/sh\n(i=0; while true; do i=$((i+1)); echo \"tick $i\" > /dev/console; sleep 1; done) &\n";
    let vm = d.create_vm(
        &json!({"name": "counter", "mem_mib": 128, "enable_network": false, "user_data": script})
            .to_string(),
    );
    let id = id_of(&vm);
    assert_eq!(vm["name"], "counter");
    wait_until("ticks", BOOT_TIMEOUT, || last_tick(&d.logs(&id)) >= 2);

    // Bad requests change nothing: the guest keeps running, no snapshot appears.
    for (body, needle) in [
        (json!({}), "kind is required"),
        (json!({"kind": "Paused"}), "Standby or Stopped"),
        (json!({"kind": "Standby", "name": "Bad_Name"}), "lowercase"),
        (json!({"kind": "Standby", "name": "-x"}), "dash"),
        (json!({"kind": "Standby", "name": "x".repeat(64)}), "63"),
        (
            json!({"kind": "Standby", "compression": {"enabled": true, "level": 0}}),
            "between 1 and 19",
        ),
        (
            json!({"kind": "Standby", "compression": {"enabled": true, "algorithm": "zstd", "level": 20}}),
            "between 1 and 19",
        ),
        (
            json!({"kind": "Standby", "compression": {"enabled": true, "algorithm": "lz4", "level": -1}}),
            "between 0 and 9",
        ),
        (
            json!({"kind": "Standby", "compression": {"enabled": true, "algorithm": "lz4", "level": 10}}),
            "between 0 and 9",
        ),
        (
            json!({"kind": "Standby", "compression": {"enabled": true, "algorithm": "gzip"}}),
            "gzip",
        ),
        (
            json!({"kind": "Standby", "compression": {"algorithm": "zstd"}}),
            "enabled",
        ),
        (json!({"kind": "Standby", "tags": {"team": 5}}), "invalid"),
        (
            json!({"kind": "Stopped", "compression": {"enabled": true}}),
            "Stopped snapshot has none",
        ),
    ] {
        let r = snapshot(&d, &id, body.clone());
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert!(r.error().contains(needle), "{body}: {}", r.text);
    }
    assert_eq!(d.req("GET", "/snapshots", None).body, json!([]));
    assert_eq!(d.vm(&id)["state"], "running");
    assert_eq!(
        snapshot(&d, "vm_nope", json!({"kind": "Standby"})).status,
        404
    );

    // Every level edge of both algorithms, then no compression at all.
    let cycles: [(Value, Value); 5] = [
        (
            json!({"enabled": true, "algorithm": "zstd", "level": 19}),
            json!({"enabled": true, "algorithm": "zstd", "level": 19}),
        ),
        (
            json!({"enabled": true, "algorithm": "lz4", "level": 9}),
            json!({"enabled": true, "algorithm": "lz4", "level": 9}),
        ),
        (
            json!({"enabled": true, "algorithm": "lz4"}),
            json!({"enabled": true, "algorithm": "lz4", "level": 0}),
        ),
        (
            json!({"enabled": true}),
            json!({"enabled": true, "algorithm": "zstd", "level": 1}),
        ),
        (
            json!({"enabled": false, "algorithm": "lz4", "level": 99}),
            json!({"enabled": false}),
        ),
    ];
    let mut snaps = vec![];
    // The ticks printed just before and just after each snapshot was taken
    // (the tick it holds is between), in the order of `snaps`.
    let mut frozen_at = vec![];
    // Where the console of the guest's current run starts (each restore
    // takes its counter back to a snapshot's tick).
    let mut run = 0;
    let now = |run: usize| last_tick(&d.logs(&id)[run..]);
    for (n, (asked, shown)) in cycles.iter().enumerate() {
        let algo = shown["algorithm"].as_str().unwrap_or("none");
        let pids = d.vmm_pids_of(&id);
        let before = now(run);
        let r = snapshot(
            &d,
            &id,
            json!({"kind": "Standby", "name": format!("s-{n}"), "compression": asked,
                   "tags": {"cycle": n.to_string(), "algo": algo}}),
        );
        assert_eq!(r.status, 201, "{asked}: {}", r.text);
        let s = r.body.clone();
        assert_eq!(s["compression"], *shown, "{s}");
        assert_eq!(s["kind"], "Standby");
        assert_eq!(s["name"], format!("s-{n}"));
        assert_eq!(s["source_instance_id"], id.as_str());
        assert_eq!(s["source_instance_name"], "counter");
        assert_eq!(s["source_hypervisor"], "qemu");
        assert_eq!(s["tags"]["algo"], algo);
        let enabled = shown["enabled"] == true;
        assert_eq!(
            s["compression_state"],
            if enabled { "compressing" } else { "none" },
            "the create call returns before compression: {s}"
        );
        // A checkpoint: the instance runs on in the same VMM.
        let after = now(run);
        assert_eq!(d.vm(&id)["state"], "running");
        assert_eq!(d.vmm_pids_of(&id), pids);
        let sid = id_of(&s);
        // The instance goes to sleep (Hatch's snapshot, uncompressed) ticks
        // later, so no guest competes with the compression for the CPU.
        wait_until("ticks past the checkpoint", BOOT_TIMEOUT, || {
            now(run) >= after + 5
        });
        let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
        assert_eq!(r.status, 201, "{}", r.text);
        let asleep = id_of(&r.body);

        let done = compressed(&d, &sid);
        let stored = parts(&d, &id, &sid);
        let names: Vec<&str> = stored.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, vec!["vmstate"], "memory and disk are chunks");
        let (total, memory) = occupied(&d, &id, &sid);
        assert_eq!(
            done["size_bytes"].as_u64().unwrap(),
            total,
            "{done} {stored:?}"
        );
        let raw = done["uncompressed_size_bytes"].as_u64().unwrap();
        assert!(raw > memory / 2, "{done}");
        if enabled {
            assert_eq!(done["compression_state"], "compressed", "{done}");
            assert!(done.get("compression_error").is_none(), "{done}");
            assert_eq!(
                done["compressed_size_bytes"].as_u64().unwrap(),
                memory,
                "{done}"
            );
        } else {
            assert_eq!(done["compression_state"], "none");
            assert!(done.get("compressed_size_bytes").is_none(), "{done}");
        }

        // Restore by id once the instance sleeps: the counter in guest
        // memory goes on from the checkpoint.
        let seen = d.logs(&id).len();
        let r = d.req(
            "POST",
            &format!("/instances/{id}/snapshots/{sid}/restore"),
            Some("{}"),
        );
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["state"], "running");
        run = seen;
        wait_until("ticks after restore", BOOT_TIMEOUT, || now(run) > 0);
        let resumed_at = first_tick(&d.logs(&id)[run..]);
        assert!(
            resumed_at > before && resumed_at <= after + 2,
            "the guest goes on from the checkpoint (ticks {before}..{after}), yet its first tick is {resumed_at}"
        );
        // The sleep snapshot is an ordinary one now.
        let r = d.req("DELETE", &format!("/snapshots/{asleep}"), None);
        assert_eq!(r.status, 200, "{}", r.text);
        snaps.push(sid);
        frozen_at.push((before, after));
        wait_until("ticks after restore", BOOT_TIMEOUT, || {
            now(run) >= resumed_at + 2
        });
    }

    // Names are unique per instance; a duplicate is refused before the guest is touched.
    let r = snapshot(&d, &id, json!({"kind": "Standby", "name": "s-0"}));
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(d.vm(&id)["state"], "running");
    assert_eq!(d.req("GET", "/snapshots", None).ids().len(), 5);

    // Filters, tags among them.
    let ids = |q: &str| {
        let r = d.req("GET", &format!("/snapshots?{q}"), None);
        assert_eq!(r.status, 200, "{q}: {}", r.text);
        r.ids()
    };
    assert_eq!(
        ids("tags%5Balgo%5D=lz4"),
        vec![snaps[2].clone(), snaps[1].clone()]
    );
    assert_eq!(
        ids("tags%5Balgo%5D=lz4&tags%5Bcycle%5D=1"),
        vec![snaps[1].clone()]
    );
    assert_eq!(ids("name=s-3"), vec![snaps[3].clone()]);
    assert_eq!(
        ids(&format!("source_instance_id={id}&kind=Standby")).len(),
        5
    );
    assert!(ids("kind=Stopped").is_empty());

    // Wrong states and targets.
    let restore = |sid: &str, body: Value| {
        d.req(
            "POST",
            &format!("/instances/{id}/snapshots/{sid}/restore"),
            Some(&body.to_string()),
        )
    };
    assert_eq!(
        restore(&snaps[0], json!({})).status,
        409,
        "restoring a running instance"
    );
    assert_eq!(restore("snap_nope", json!({})).status, 404);
    let r = restore(&snaps[0], json!({"target_hypervisor": "qemu"}));
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(
        restore(&snaps[0], json!({"target_state": "Paused"})).status,
        400
    );

    // Standby target: the instance, asleep in a later snapshot, stands by on
    // an older one instead, then resumes from it. The guest counts well past
    // the older snapshot's tick first, so the counter tells which memory came back.
    let (older, older_until) = frozen_at[3];
    let seen = d.logs(&id).len();
    wait_until("ticks past the older snapshot", BOOT_TIMEOUT, || {
        last_tick(&d.logs(&id)[seen..]) >= older_until + 10
    });
    assert_eq!(
        d.req("POST", &format!("/vms/{id}/snapshot"), None).status,
        201
    );
    let latest = last_tick(&d.logs(&id)[seen..]);
    let r = restore(&snaps[3], json!({"target_state": "Standby"}));
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (200, json!("snapshotted")),
        "{}",
        r.text
    );
    // The console log only grows: what the guest prints from here on is new.
    let seen = d.logs(&id).len();
    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["state"], "running", "{}", r.text);
    wait_until("ticks after the older restore", BOOT_TIMEOUT, || {
        last_tick(&d.logs(&id)[seen..]) > 0
    });
    let log = d.logs(&id);
    let resumed_at = first_tick(&log[seen..]);
    // Up to two past the checkpoint's tick, should one have been half printed at the pause.
    assert!(
        resumed_at > older && resumed_at <= older_until + 2,
        "the guest goes on from s-3 (tick {older}), not from \"latest\" (tick {latest}), \
         yet its first tick is {resumed_at}:\n{}",
        &log[seen..]
    );

    // Deleting the instance deletes every object it had.
    assert!(!d.stored_objects(&format!("snapshots/{id}/")).is_empty());
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    assert_eq!(d.stored_objects(&format!("snapshots/{id}/")), vec![]);
    assert_eq!(d.req("GET", "/snapshots", None).body, json!([]));
}

on_both_stores!(stopped_and_fork: stopped_snapshot_keeps_the_disk_for_restore_and_fork, stopped_snapshot_keeps_the_disk_for_restore_and_fork_s3);

fn stopped_and_fork(storage: Storage) {
    // A Stopped snapshot and a stop are graceful here: give a slow guest the
    // time the harness gives a boot, not the default 30 s.
    let d = Daemon::start_storage_with(storage, &[("HATCH_STOP_TIMEOUT", "120s")]);
    let (key, public) = keypair(&d.data_dir);
    let vm = d.create_vm(
        &json!({"name": "web", "user_data": ssh_user_data("root", &public)}).to_string(),
    );
    let id = id_of(&vm);
    let ip = vm["guest_ip"].as_str().unwrap().to_string();
    let ssh = |ip: &str, cmd: &str| d.ssh_ok(None, &key, &format!("root@{ip}"), 22, cmd);
    ssh(&ip, "echo golden > /root/marker; sync");

    // A Stopped snapshot powers the guest off first and stores only its disk.
    let r = snapshot(
        &d,
        &id,
        json!({"kind": "Stopped", "name": "golden", "tags": {"stage": "base"}}),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let snap = r.body.clone();
    let sid = id_of(&snap);
    assert_eq!(snap["kind"], "Stopped");
    assert_eq!(snap["compression_state"], "none");
    assert_eq!(d.vm(&id)["state"], "stopped");
    assert!(d.vmm_pids_of(&id).is_empty());
    assert_eq!(
        parts(&d, &id, &sid),
        vec![],
        "the disk is chunks, nothing else"
    );
    assert!(d.chunk_keys(&sid, "memory").is_empty());
    assert!(!d.chunk_keys(&sid, "disk").is_empty());
    assert_eq!(
        snap["size_bytes"].as_u64().unwrap(),
        occupied(&d, &id, &sid).0
    );
    // A stopped VM can be snapshotted (Stopped) again; a Standby needs it running or in standby.
    assert_eq!(snapshot(&d, &id, json!({"kind": "Standby"})).status, 409);

    // Fork requests that are wrong change nothing.
    let fork = |body: Value| {
        d.req(
            "POST",
            &format!("/snapshots/{sid}/fork"),
            Some(&body.to_string()),
        )
    };
    for (body, code) in [
        (json!({}), 400),
        (json!({"name": "Clone"}), 400),
        (json!({"name": "clone", "target_state": "Standby"}), 400),
        (
            json!({"name": "clone", "target_hypervisor": "firecracker"}),
            400,
        ),
        (json!({"name": "clone", "target_hypervisor": "hyperv"}), 400),
        (json!({"name": "web"}), 409),
    ] {
        let r = fork(body.clone());
        assert_eq!(r.status, code, "{body}: {}", r.text);
        r.error();
    }
    assert_eq!(
        d.req("GET", "/vms", None).ids(),
        vec![id.clone()],
        "no fork was left behind"
    );
    assert_eq!(
        d.req("POST", "/snapshots/snap_nope/fork", Some(r#"{"name":"x"}"#))
            .status,
        404
    );

    // The fork: a new instance, stopped (the default for a Stopped snapshot), with the disk.
    let r = fork(json!({"name": "clone", "target_hypervisor": "qemu"}));
    assert_eq!(r.status, 201, "{}", r.text);
    let clone = r.body.clone();
    let cid = id_of(&clone);
    assert_ne!(cid, id);
    assert_eq!(clone["name"], "clone");
    assert_eq!(clone["state"], "stopped");
    assert_ne!(clone["guest_ip"], vm["guest_ip"]);
    assert_ne!(clone["guest_mac"], vm["guest_mac"]);
    assert_ne!(clone["ssh_port"], vm["ssh_port"]);
    let r = d.req("POST", &format!("/vms/{cid}/start"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let cip = clone["guest_ip"].as_str().unwrap();
    assert_eq!(ssh(cip, "cat /root/marker").trim(), "golden");
    // Running straight away works too.
    let r = fork(json!({"name": "runner", "target_state": "Running"}));
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (201, json!("running")),
        "{}",
        r.text
    );
    let runner = id_of(&r.body);
    assert_eq!(
        ssh(r.body["guest_ip"].as_str().unwrap(), "cat /root/marker").trim(),
        "golden"
    );

    // Restore by id on the source: its disk goes back to the snapshot's.
    assert_eq!(d.req("POST", &format!("/vms/{id}/start"), None).status, 200);
    ssh(&ip, "echo later > /root/later; sync");
    assert_eq!(d.req("POST", &format!("/vms/{id}/stop"), None).status, 200);
    let r = d.req(
        "POST",
        &format!("/instances/{id}/snapshots/{sid}/restore"),
        Some(r#"{"target_state": "Running"}"#),
    );
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (200, json!("running")),
        "{}",
        r.text
    );
    assert_eq!(ssh(&ip, "cat /root/marker").trim(), "golden");
    assert!(ssh(&ip, "ls /root/later 2>&1 || true").contains("No such file"));

    for v in [&runner, &cid, &id] {
        d.assert_plugged_in(&d.vm(v), true);
    }
    for v in [&runner, &cid, &id] {
        assert_eq!(d.req("DELETE", &format!("/vms/{v}"), None).status, 200);
    }
    assert!(d.vmm_pids().is_empty());
    assert!(d.links("ht").is_empty(), "{:?}", d.links("ht"));
    assert_eq!(d.stored_objects("snapshots/"), vec![]);
}

on_both_stores!(standby_fork: a_fork_of_a_standby_snapshot_runs_beside_its_source, a_fork_of_a_standby_snapshot_runs_beside_its_source_s3);

fn standby_fork(storage: Storage) {
    let d = Daemon::start_storage(storage, true);
    let (key, public) = keypair(&d.data_dir);
    let source = counting_guest(&d, &public);
    let sid_vm = id_of(&source);
    let src_ip = source["guest_ip"].as_str().unwrap().to_string();
    let ssh = |ip: &str, cmd: &str| d.ssh_ok(None, &key, &format!("root@{ip}"), 22, cmd);
    ssh(&src_ip, "echo before-fork > /tmp/ram-marker");
    wait_until("ticks", BOOT_TIMEOUT, || last_tick(&d.logs(&sid_vm)) >= 2);

    // A checkpoint: the source runs on.
    let frozen = last_tick(&d.logs(&sid_vm));
    let r = snapshot(
        &d,
        &sid_vm,
        json!({"kind": "Standby", "name": "base", "compression": {"enabled": true, "algorithm": "lz4"}}),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let snap = id_of(&r.body);
    assert_eq!(d.vm(&sid_vm)["state"], "running");

    // The fork runs from the same memory, beside its source.
    let r = d.req(
        "POST",
        &format!("/snapshots/{snap}/fork"),
        Some(r#"{"name": "twin"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let twin = r.body.clone();
    let tid = id_of(&twin);
    assert_eq!(twin["state"], "running");
    let twin_ip = twin["guest_ip"].as_str().unwrap().to_string();
    assert_ne!(twin_ip, src_ip);
    // Its memory continued: the counter goes on from the snapshot, not from 1.
    wait_until("the fork's ticks", BOOT_TIMEOUT, || {
        last_tick(&d.logs(&tid)) > frozen
    });
    let first_tick = d
        .logs(&tid)
        .lines()
        .filter_map(|l| l.split("tick ").nth(1))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .next()
        .unwrap();
    assert!(
        first_tick > frozen,
        "fork resumed at tick {first_tick}, snapshot at {frozen}"
    );

    // Both at their own address at the same time, each its own machine.
    assert_eq!(ssh(&twin_ip, "cat /tmp/ram-marker").trim(), "before-fork");
    ssh(&src_ip, "echo source > /tmp/who");
    ssh(&twin_ip, "echo twin > /tmp/who");
    assert_eq!(ssh(&src_ip, "cat /tmp/who").trim(), "source");
    assert_eq!(ssh(&twin_ip, "cat /tmp/who").trim(), "twin");
    // Through its own SSH forward, and out to the upstream network by name.
    let port = twin["ssh_port"].as_u64().unwrap() as u16;
    assert_eq!(
        d.ssh_ok(None, &key, "root@127.0.0.1", port, "cat /tmp/who")
            .trim(),
        "twin"
    );
    let out = ssh(&twin_ip, "wget -q -O - http://upstream.test:8000/hello.txt");
    assert_eq!(out.trim(), "hello from upstream");
    assert_eq!(ssh(&src_ip, "cat /tmp/who").trim(), "source");

    // A fork kept in standby sleeps in a snapshot of its own: it outlives its source.
    let r = d.req(
        "POST",
        &format!("/snapshots/{snap}/fork"),
        Some(r#"{"name": "sleeper", "target_state": "Standby"}"#),
    );
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (201, json!("snapshotted")),
        "{}",
        r.text
    );
    let sleeper = r.body.clone();
    let slid = id_of(&sleeper);
    let own = d.req(
        "GET",
        &format!("/snapshots?source_instance_id={slid}"),
        None,
    );
    assert_eq!(own.ids().len(), 1, "{}", own.text);
    assert_eq!(d.req("DELETE", &format!("/vms/{tid}"), None).status, 200);
    assert_eq!(d.req("DELETE", &format!("/vms/{sid_vm}"), None).status, 200);
    let netns =
        String::from_utf8_lossy(&d.in_ns(None, &["ip", "netns", "list"]).stdout).to_string();
    assert!(
        !netns.contains(&tid),
        "the fork's namespace is gone: {netns}"
    );
    let r = d.req("POST", &format!("/vms/{slid}/restore"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let slip = sleeper["guest_ip"].as_str().unwrap();
    assert_eq!(ssh(slip, "cat /tmp/ram-marker").trim(), "before-fork");

    // Stopped and started again, the fork boots afresh on its own address, no namespace.
    assert_eq!(
        d.req("POST", &format!("/vms/{slid}/stop"), None).status,
        200
    );
    assert_eq!(
        d.req("POST", &format!("/vms/{slid}/start"), None).status,
        200
    );
    assert!(ssh(slip, "cat /tmp/ram-marker 2>&1 || true").contains("No such file"));
    let netns =
        String::from_utf8_lossy(&d.in_ns(None, &["ip", "netns", "list"]).stdout).to_string();
    assert!(!netns.contains(&slid), "{netns}");
    assert_eq!(d.req("DELETE", &format!("/vms/{slid}"), None).status, 200);
    assert!(d.vmm_pids().is_empty());
    assert_eq!(d.stored_objects("snapshots/"), vec![]);
}

/// Server default, instance default and request, in that order of precedence.
#[test]
fn compression_defaults_come_from_server_instance_and_request() {
    let d = Daemon::start_with(&[("HATCH_SNAPSHOT_COMPRESSION", "zstd:3")]);
    let plain = d.create_vm(r#"{"enable_network": false, "mem_mib": 128}"#);
    let own = d.create_vm(
        r#"{"enable_network": false, "mem_mib": 128, "snapshot_compression": {"enabled": true, "algorithm": "lz4"}}"#,
    );
    assert_eq!(
        own["snapshot_compression"],
        json!({"enabled": true, "algorithm": "lz4", "level": 0})
    );
    let r = d.req(
        "POST",
        "/vms",
        Some(r#"{"snapshot_compression": {"enabled": true, "algorithm": "lz4", "level": 12}}"#),
    );
    assert_eq!(r.status, 400, "{}", r.text);
    let (p, o) = (id_of(&plain), id_of(&own));
    d.wait_console(&p, "hatch-guest: ready");
    d.wait_console(&o, "hatch-guest: ready");

    let hatch_snapshot = |vm: &str| {
        let r = d.req("POST", &format!("/vms/{vm}/snapshot"), None);
        assert_eq!(r.status, 201, "{}", r.text);
        compressed(&d, &id_of(&r.body))
    };
    let s = hatch_snapshot(&p);
    assert_eq!(
        s["compression"],
        json!({"enabled": true, "algorithm": "zstd", "level": 3})
    );
    assert_eq!(s["compression_state"], "compressed", "{s}");
    let s = hatch_snapshot(&o);
    assert_eq!(
        s["compression"],
        json!({"enabled": true, "algorithm": "lz4", "level": 0})
    );
    assert_eq!(s["compression_state"], "compressed", "{s}");
    // Restored from compressed memory, then a request that turns it off (a
    // checkpoint: the instance runs on).
    assert_eq!(
        d.req("POST", &format!("/vms/{o}/restore"), None).status,
        200
    );
    let r = snapshot(
        &d,
        &o,
        json!({"kind": "Standby", "compression": {"enabled": false}}),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["compression_state"], "none");
    assert_eq!(d.vm(&o)["state"], "running");
    for v in [&p, &o] {
        assert_eq!(d.req("DELETE", &format!("/vms/{v}"), None).status, 200);
    }
}

/// `hypervisor` at create (Hatch `POST /vms`): a name the API knows and this
/// daemon has runs the VM there; the server's default when absent; any other
/// name is a 400 with the reason, and nothing is made.
#[test]
fn a_vm_runs_on_the_hypervisor_its_create_names() {
    let d = Daemon::start();
    for (body, needle) in [
        (
            json!({"hypervisor": "vz"}),
            "hypervisor: hypervisor vz is not available on this host (it has qemu",
        ),
        (
            json!({"hypervisor": "cloud-hypervisor"}),
            "hypervisor: hypervisor cloud-hypervisor is not available on this host",
        ),
        (
            json!({"hypervisor": "xen"}),
            "hypervisor must be one of cloud-hypervisor, firecracker, qemu, vz, got \"xen\"",
        ),
        (json!({"hypervisor": "QEMU"}), "hypervisor must be one of"),
        (json!({"hypervisor": ""}), "hypervisor must be one of"),
        (json!({"hypervisor": 7}), "expected a string"),
    ] {
        let r = d.req("POST", "/vms", Some(&body.to_string()));
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert!(r.error().contains(needle), "{body}: {}", r.text);
    }
    assert_eq!(d.req("GET", "/vms", None).ids(), Vec::<String>::new());

    let named = d.create_vm(r#"{"hypervisor": "qemu", "enable_network": false, "mem_mib": 128}"#);
    assert_eq!(named["hypervisor"], "qemu");
    assert_eq!(named["state"], "running");
    let default = d.create_vm(r#"{"enable_network": false, "mem_mib": 128}"#);
    assert_eq!(default["hypervisor"], "qemu");
    for v in [&named, &default] {
        let id = id_of(v);
        assert_eq!(d.vm(&id)["hypervisor"], "qemu");
        d.wait_console(&id, "hatch-guest: ready");
    }

    // target_hypervisor on a Stopped snapshot: names this daemon lacks are
    // 400 with the reason, another owner's snapshot a 404, nothing changes;
    // its own backend named outright works.
    let id = id_of(&named);
    let r = snapshot(&d, &id, json!({"kind": "Stopped"}));
    assert_eq!(r.status, 201, "{}", r.text);
    let sid = id_of(&r.body);
    let restore = |key: Option<&str>, body: Value| {
        let path = format!("/instances/{id}/snapshots/{sid}/restore");
        match key {
            Some(k) => d.as_key(k, "POST", &path, Some(&body.to_string())),
            None => d.req("POST", &path, Some(&body.to_string())),
        }
    };
    let fork = |key: Option<&str>, body: Value| {
        let path = format!("/snapshots/{sid}/fork");
        match key {
            Some(k) => d.as_key(k, "POST", &path, Some(&body.to_string())),
            None => d.req("POST", &path, Some(&body.to_string())),
        }
    };
    for (hv, needle) in [
        ("vz", "target_hypervisor vz is not available on this host"),
        ("xen", "target_hypervisor must be one of"),
    ] {
        let r = restore(None, json!({"target_hypervisor": hv}));
        assert_eq!(r.status, 400, "{hv}: {}", r.text);
        assert!(r.error().contains(needle), "{hv}: {}", r.text);
        let r = fork(None, json!({"name": "moved", "target_hypervisor": hv}));
        assert_eq!(r.status, 400, "{hv}: {}", r.text);
        assert!(r.error().contains(needle), "{hv}: {}", r.text);
    }
    let bob = d.create_key(&["--name", "bob"]);
    let r = restore(Some(&bob), json!({"target_hypervisor": "qemu"}));
    assert_eq!(r.status, 404, "{}", r.text);
    let r = fork(
        Some(&bob),
        json!({"name": "theirs", "target_hypervisor": "qemu"}),
    );
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(d.vm(&id)["state"], "stopped");
    assert_eq!(d.req("GET", "/vms", None).ids().len(), 2);
    let r = restore(
        None,
        json!({"target_hypervisor": "qemu", "target_state": "Running"}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        (r.body["hypervisor"].clone(), r.body["state"].clone()),
        (json!("qemu"), json!("running"))
    );
    d.wait_console(&id, "hatch-guest: ready");

    for v in [&named, &default] {
        let id = id_of(v);
        assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    }
    assert!(d.vmm_pids().is_empty());
}

/// The first tick in `log`.
fn first_tick(log: &str) -> u64 {
    ticks(log)[0]
}

/// Ticks in the order the console printed them.
fn ticks(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.split("tick ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The first tick the console printed after byte `seen` of its log.
fn first_tick_after(d: &Daemon, vm: &str, seen: usize) -> u64 {
    wait_until("ticks after the resume", BOOT_TIMEOUT, || {
        !ticks(&d.logs(vm)[seen..]).is_empty()
    });
    first_tick(&d.logs(vm)[seen..])
}

/// Hypeman's Standby snapshot is a checkpoint: a running instance is paused,
/// captured and resumed in the same VMM (its counter goes on, no second
/// boot); the snapshot is independent of it (deleted at once) and restores
/// later. In standby, the instance is copied from its stored state and stays
/// asleep on its own snapshot. Another owner can do none of it.
#[test]
fn a_standby_snapshot_is_a_checkpoint_the_instance_runs_on_from() {
    let d = Daemon::start();
    // A counter in guest memory, ten ticks a second, nothing on disk.
    let script = "#!/bin/sh\n(i=0; while true; do i=$((i+1)); echo \"tick $i\" > /dev/console; sleep 0.1; done) &\n";
    let vm = d.create_vm(
        &json!({"name": "ticker", "mem_mib": 128, "enable_network": false, "user_data": script})
            .to_string(),
    );
    let id = id_of(&vm);
    let now = || last_tick(&d.logs(&id));
    wait_until("ticks", BOOT_TIMEOUT, || now() >= 20);
    let pids = d.vmm_pids_of(&id);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let standby_of = || {
        d.db_value(&format!(
            "SELECT standby_snapshot_id FROM vms WHERE id = '{id}'"
        ))
    };

    // Twice while running: each time the same VMM goes on, the counter with it.
    // (before, after): the ticks around the call, the checkpoint's tick between.
    let mut taken = vec![];
    for name in ["one", "two"] {
        let before = now();
        let r = snapshot(&d, &id, json!({"kind": "Standby", "name": name}));
        assert_eq!(r.status, 201, "{}", r.text);
        let after = now();
        assert_eq!(r.body["kind"], "Standby");
        assert_eq!(r.body["name"], name);
        assert_eq!(d.vm(&id)["state"], "running");
        assert_eq!(d.vmm_pids_of(&id), pids, "the same VMM");
        assert_eq!(
            standby_of(),
            "",
            "the checkpoint is not its standby snapshot"
        );
        wait_until("ticks after the checkpoint", BOOT_TIMEOUT, || {
            now() >= after + 10
        });
        taken.push((id_of(&r.body), before, after));
    }
    let log = d.logs(&id);
    let counted = ticks(&log);
    assert!(
        counted.windows(2).all(|w| w[1] == w[0] + 1),
        "the counter never restarted nor skipped back: {log}"
    );
    assert!(log.contains("boot=1") && !log.contains("boot=2"), "{log}");

    // Independent: the first is deleted while the instance runs.
    let (one, two) = (&taken[0].0, &taken[1].0);
    let r = d.req("DELETE", &format!("/snapshots/{one}"), None);
    assert_eq!(
        (r.status, r.body.clone()),
        (200, json!({"status": "deleted"})),
        "{}",
        r.text
    );
    assert_eq!(d.req("GET", &format!("/snapshots/{one}"), None).status, 404);
    assert!(d
        .stored_objects(&format!("snapshots/{id}/{one}/"))
        .is_empty());
    assert_eq!(d.vm(&id)["state"], "running");
    assert_eq!(d.vmm_pids_of(&id), pids);

    // The second restores into the instance once it sleeps (Hatch's
    // snapshot, well past the checkpoint): the counter goes on from it.
    let (_, before, after) = taken[1];
    wait_until("ticks well past the checkpoint", BOOT_TIMEOUT, || {
        now() >= after + 30
    });
    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let asleep = id_of(&r.body);
    let seen = d.logs(&id).len();
    let r = d.req(
        "POST",
        &format!("/instances/{id}/snapshots/{two}/restore"),
        Some(r#"{"target_state": "Running"}"#),
    );
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (200, json!("running")),
        "{}",
        r.text
    );
    let resumed_at = first_tick_after(&d, &id, seen);
    assert!(
        resumed_at > before && resumed_at <= after + 2,
        "the guest goes on from the checkpoint (ticks {before}..{after}), yet its first tick is {resumed_at}"
    );
    // The sleep snapshot is an ordinary one now.
    assert_eq!(
        d.req("DELETE", &format!("/snapshots/{asleep}"), None)
            .status,
        200
    );

    // In standby: a copy of its standby snapshot; it sleeps on, on its own.
    wait_until("ticks after the restore", BOOT_TIMEOUT, || {
        ticks(&d.logs(&id)[seen..]).len() >= 10
    });
    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let asleep = id_of(&r.body);
    let slept_at = last_tick(&d.logs(&id)[seen..]);
    assert_eq!(standby_of(), asleep);
    let r = snapshot(
        &d,
        &id,
        json!({"kind": "Standby", "name": "cold", "tags": {"from": "standby"},
               "compression": {"enabled": true, "algorithm": "lz4"}}),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let cold = id_of(&r.body);
    assert_eq!(r.body["name"], "cold");
    assert_eq!(r.body["tags"], json!({"from": "standby"}));
    assert_eq!(r.body["compression_state"], "compressing", "{}", r.text);
    assert_eq!(d.vm(&id)["state"], "snapshotted");
    assert_eq!(standby_of(), asleep, "still asleep on its own snapshot");
    assert!(d.vmm_pids_of(&id).is_empty(), "nothing was started");
    let done = compressed(&d, &cold);
    assert_eq!(done["compression_state"], "compressed", "{done}");
    assert_eq!(
        d.req("DELETE", &format!("/snapshots/{asleep}"), None)
            .status,
        409,
        "the snapshot it sleeps on stays"
    );
    // The copy forks and runs from the moment the instance went to sleep.
    let r = d.req(
        "POST",
        &format!("/snapshots/{cold}/fork"),
        Some(r#"{"name": "thaw", "target_state": "Running"}"#),
    );
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (201, json!("running")),
        "{}",
        r.text
    );
    let thaw = id_of(&r.body);
    let forked_at = first_tick_after(&d, &thaw, 0);
    assert!(
        forked_at > slept_at && forked_at <= slept_at + 2,
        "the fork goes on from tick {slept_at}, yet starts at {forked_at}"
    );
    assert_eq!(d.req("DELETE", &format!("/vms/{thaw}"), None).status, 200);
    assert_eq!(
        d.req("DELETE", &format!("/snapshots/{cold}"), None).status,
        200
    );
    // The instance still resumes from its own standby snapshot.
    let seen = d.logs(&id).len();
    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let woke_at = first_tick_after(&d, &id, seen);
    assert!(
        woke_at > slept_at && woke_at <= slept_at + 2,
        "the instance goes on from tick {slept_at}, yet starts at {woke_at}"
    );

    // Another owner's key: 404, nothing taken, the guest untouched.
    let bob = d.create_key(&["--name", "bob"]);
    let listed = d.req("GET", "/snapshots", None).ids();
    let r = d.as_key(
        &bob,
        "POST",
        &format!("/instances/{id}/snapshots"),
        Some(r#"{"kind": "Standby"}"#),
    );
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(d.req("GET", "/snapshots", None).ids(), listed);
    assert_eq!(d.as_key(&bob, "GET", "/snapshots", None).body, json!([]));
    assert_eq!(d.vm(&id)["state"], "running");

    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    assert!(d.vmm_pids().is_empty());
    assert_eq!(d.stored_objects("snapshots/"), vec![]);
}
