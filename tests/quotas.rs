//! Quotas, host memory capacity and the bounded console log, end to end: the
//! real daemon in its own namespace, real QEMU guests, curl as the client.

mod common;

use common::{wait_until, Daemon, Response, BOOT_TIMEOUT};
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

fn vm_ids(d: &Daemon, key: &str) -> Vec<String> {
    let r = d.as_key(key, "GET", "/vms", None);
    assert_eq!(r.status, 200, "{}", r.text);
    r.ids()
}

/// VM work directories on disk.
fn work_dirs(d: &Daemon) -> usize {
    std::fs::read_dir(d.data_dir.join("vms"))
        .map(|r| r.count())
        .unwrap_or(0)
}

fn assert_refused(r: &Response, status: u16, error: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.error(), error, "{}", r.text);
}

/// `hatch owners limits ARGS` against the daemon's data dir (while it runs).
fn owner_limits(d: &Daemon, args: &[&str]) -> String {
    let out = d
        .hatch_cmd()
        .args(["owners", "limits"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hatch owners limits {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The row of `limit` in `hatch owners limits` output: (value, in use, source).
fn limit_row(table: &str, limit: &str) -> (String, String, String) {
    let line = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(limit))
        .unwrap_or_else(|| panic!("no {limit} in {table}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[1].into(), f[2].into(), f[3].into())
}

#[test]
fn an_owner_at_its_vm_limit_is_refused_and_another_owner_still_gets_vms() {
    let d = Daemon::start();
    let bob = d.create_key(&["--name", "bob"]);
    let mut alice = vec![];
    for _ in 0..5 {
        alice.push(id_of(&d.create_vm(r#"{"mem_mib": 128}"#)));
    }
    // Any state counts: a stopped VM is still one of the five.
    let r = d.req("POST", &format!("/vms/{}/stop", alice[0]), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let ips_before: Vec<Value> = alice
        .iter()
        .map(|id| d.vm(id)["guest_ip"].clone())
        .collect();
    let (taps, pids, dirs) = (d.links("ht").len(), d.vmm_pids().len(), work_dirs(&d));
    assert_eq!((taps, pids, dirs), (4, 4, 5));

    for body in [r#"{}"#, r#"{"mem_mib": 128, "enable_network": false}"#] {
        let r = d.req("POST", "/vms", Some(body));
        assert_refused(&r, 403, "vm limit reached (5/5)");
    }
    // Nothing was created: no row, TAP, process, directory or address.
    assert_eq!(vm_ids(&d, &d.key).len(), 5);
    assert_eq!(d.links("ht").len(), taps);
    assert_eq!(d.vmm_pids().len(), pids);
    assert_eq!(work_dirs(&d), dirs);

    // Another owner is not affected, and gets the next free address: the
    // refused requests held none.
    let b = d.as_key(&bob, "POST", "/vms", Some(r#"{"mem_mib": 128}"#));
    assert_eq!(b.status, 201, "{}", b.text);
    assert_eq!(b.body["guest_ip"], "172.16.0.15", "{}", b.text);
    let after: Vec<Value> = alice
        .iter()
        .map(|id| d.vm(id)["guest_ip"].clone())
        .collect();
    assert_eq!(after, ips_before);

    // Deleting one frees a place.
    let r = d.req("DELETE", &format!("/vms/{}", alice[0]), None);
    assert_eq!(r.status, 200, "{}", r.text);
    d.create_vm(r#"{"mem_mib": 128, "enable_network": false}"#);
    assert_refused(
        &d.req("POST", "/vms", Some("{}")),
        403,
        "vm limit reached (5/5)",
    );
}

#[test]
fn vcpu_and_memory_limits_count_every_vm_and_forks() {
    let d = Daemon::start_with(&[("HATCH_QUOTA_VCPUS", "3"), ("HATCH_QUOTA_MEM_MIB", "1024")]);
    let first =
        id_of(&d.create_vm(r#"{"vcpu_count": 2, "mem_mib": 512, "enable_network": false}"#));
    let dirs = work_dirs(&d);
    assert_refused(
        &d.req(
            "POST",
            "/vms",
            Some(r#"{"vcpu_count": 2, "mem_mib": 256, "enable_network": false}"#),
        ),
        403,
        "vcpu limit reached (2/3, this VM needs 2)",
    );
    assert_refused(
        &d.req(
            "POST",
            "/vms",
            Some(r#"{"mem_mib": 768, "enable_network": false}"#),
        ),
        403,
        "memory limit reached (512/1024 MiB, this VM needs 768)",
    );
    assert_eq!(vm_ids(&d, &d.key), vec![first.clone()]);
    assert_eq!(work_dirs(&d), dirs);

    // A Stopped snapshot stops the VM; a stopped VM still holds its share,
    // so a fork of the same size is refused too.
    let s = d.req(
        "POST",
        &format!("/instances/{first}/snapshots"),
        Some(r#"{"kind": "Stopped"}"#),
    );
    assert_eq!(s.status, 201, "{}", s.text);
    assert_eq!(d.vm(&first)["state"], "stopped");
    let fork = d.req(
        "POST",
        &format!("/snapshots/{}/fork", id_of(&s.body)),
        Some(r#"{"name": "twin", "target_state": "Stopped"}"#),
    );
    assert_refused(&fork, 403, "vcpu limit reached (2/3, this VM needs 2)");
    assert_eq!(vm_ids(&d, &d.key), vec![first.clone()]);
    assert_eq!(work_dirs(&d), dirs);

    // What fits beside it is created.
    d.create_vm(r#"{"mem_mib": 512, "enable_network": false}"#);
    assert_refused(
        &d.req(
            "POST",
            "/vms",
            Some(r#"{"mem_mib": 128, "enable_network": false}"#),
        ),
        403,
        "vcpu limit reached (3/3, this VM needs 1)",
    );
}

/// Standby snapshot through the Hatch API, then back to running.
fn hatch_snapshot_and_restore(d: &Daemon, vm: &str) -> Value {
    let s = d.req("POST", &format!("/vms/{vm}/snapshot"), None);
    assert_eq!(s.status, 201, "{}", s.text);
    let r = d.req("POST", &format!("/vms/{vm}/restore"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    s.body
}

fn snapshot_objects(d: &Daemon, vm: &str) -> Vec<(String, u64)> {
    d.stored_objects(&format!("snapshots/{vm}/"))
}

#[test]
fn snapshots_per_vm_on_both_apis_with_an_owner_override() {
    let d = Daemon::start();
    let vm = id_of(&d.create_vm(r#"{"mem_mib": 128, "enable_network": false}"#));
    d.wait_console(&vm, "hatch-guest: ready");
    let table = owner_limits(&d, &["alice", "--snapshots-per-vm", "2"]);
    assert_eq!(
        limit_row(&table, "snapshots_per_vm"),
        ("2".into(), "-".into(), "owner".into())
    );
    assert_eq!(limit_row(&table, "vms").2, "default");

    let s = d.req(
        "POST",
        &format!("/instances/{vm}/snapshots"),
        Some(r#"{"kind": "Standby", "name": "one"}"#),
    );
    assert_eq!(s.status, 201, "{}", s.text);
    // A checkpoint: the guest runs on.
    assert_eq!(d.vm(&vm)["state"], "running");
    let second = hatch_snapshot_and_restore(&d, &vm);
    let objects = snapshot_objects(&d, &vm);

    let hatch = d.req("POST", &format!("/vms/{vm}/snapshot"), None);
    assert_refused(&hatch, 403, "snapshot limit reached (2/2)");
    for kind in ["Standby", "Stopped"] {
        let hypeman = d.req(
            "POST",
            &format!("/instances/{vm}/snapshots"),
            Some(&json!({ "kind": kind }).to_string()),
        );
        assert_refused(&hypeman, 403, "snapshot limit reached (2/2)");
    }
    // Refused before the guest was touched: still running, nothing stored.
    assert_eq!(d.vm(&vm)["state"], "running");
    assert_eq!(
        d.req("GET", &format!("/vms/{vm}/snapshots"), None)
            .ids()
            .len(),
        2
    );
    assert_eq!(snapshot_objects(&d, &vm), objects);

    // Deleting one makes room again.
    let del = d.req("DELETE", &format!("/snapshots/{}", id_of(&second)), None);
    assert_eq!(del.status, 200, "{}", del.text);
    hatch_snapshot_and_restore(&d, &vm);
    // And `default` hands the limit back to the server (10).
    let table = owner_limits(&d, &["alice", "--snapshots-per-vm", "default"]);
    assert_eq!(
        limit_row(&table, "snapshots_per_vm"),
        ("10".into(), "-".into(), "default".into())
    );
    hatch_snapshot_and_restore(&d, &vm);
}

#[test]
fn stored_bytes_limit_refuses_before_and_after_capture() {
    let d = Daemon::start();
    let vm = id_of(&d.create_vm(r#"{"mem_mib": 128, "enable_network": false}"#));
    d.wait_console(&vm, "hatch-guest: ready");
    let first = hatch_snapshot_and_restore(&d, &vm);
    let stored = first["size_bytes"].as_u64().unwrap();
    let table = owner_limits(&d, &["alice"]);
    assert_eq!(limit_row(&table, "stored_bytes").1, stored.to_string());
    let objects = snapshot_objects(&d, &vm);

    // Room left, but not for what a guest with 8 MiB of fresh random bytes
    // in RAM adds: the snapshot is taken, found too big, and undone; the
    // guest runs on and its chunks go again.
    let noisy = id_of(&d.create_vm(
        &json!({
            "mem_mib": 128,
            "enable_network": false,
            "user_data": "#!/bin/sh\nmkdir -p /run/noise && mount -t tmpfs tmpfs /run/noise && dd if=/dev/urandom of=/run/noise/r bs=1M count=8 && echo noise-ready > /dev/console\n",
        })
        .to_string(),
    ));
    d.wait_console(&noisy, "noise-ready");
    let chunks_before = d.stored_objects("chunks/");
    let limit = stored + (4 << 20);
    owner_limits(&d, &["alice", "--stored-bytes", &limit.to_string()]);
    let r = d.req("POST", &format!("/vms/{noisy}/snapshot"), None);
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(
        r.error().starts_with(&format!(
            "stored bytes limit reached ({stored}/{limit}, this needs "
        )),
        "{}",
        r.text
    );
    assert_eq!(d.vm(&noisy)["state"], "running");
    assert!(
        d.daemon_log().contains("snapshot refused after capture"),
        "the capture ran and was undone"
    );
    assert_eq!(snapshot_objects(&d, &noisy), vec![]);
    wait_until(
        "the refused capture's chunks removed",
        Duration::from_secs(30),
        || d.stored_objects("chunks/") == chunks_before,
    );
    assert_eq!(d.req("GET", "/snapshots", None).ids(), vec![id_of(&first)]);
    // A Hypeman Standby (a checkpoint) is refused alike: the same VMM runs on.
    let pids = d.vmm_pids_of(&noisy);
    let r = d.req(
        "POST",
        &format!("/instances/{noisy}/snapshots"),
        Some(r#"{"kind": "Standby", "name": "too-big"}"#),
    );
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(
        r.error().starts_with(&format!(
            "stored bytes limit reached ({stored}/{limit}, this needs "
        )),
        "{}",
        r.text
    );
    assert_eq!(d.vm(&noisy)["state"], "running");
    assert_eq!(d.vmm_pids_of(&noisy), pids);
    assert_eq!(snapshot_objects(&d, &noisy), vec![]);
    assert_eq!(d.req("GET", "/snapshots", None).ids(), vec![id_of(&first)]);
    assert_eq!(d.req("DELETE", &format!("/vms/{noisy}"), None).status, 200);

    // At the limit, refused up front: a Stopped snapshot does not even stop the VM.
    owner_limits(&d, &["alice", "--stored-bytes", &stored.to_string()]);
    let r = d.req(
        "POST",
        &format!("/instances/{vm}/snapshots"),
        Some(r#"{"kind": "Stopped"}"#),
    );
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(
        r.error()
            .starts_with(&format!("stored bytes limit reached ({stored}/{stored}")),
        "{}",
        r.text
    );
    assert_eq!(d.vm(&vm)["state"], "running");
    assert_eq!(snapshot_objects(&d, &vm), objects);

    // A fork kept in Standby copies the snapshot: that needs room too.
    let fork = d.req(
        "POST",
        &format!("/snapshots/{}/fork", id_of(&first)),
        Some(r#"{"name": "copy", "target_state": "Standby"}"#),
    );
    assert_eq!(fork.status, 403, "{}", fork.text);
    assert!(
        fork.error().starts_with("stored bytes limit reached"),
        "{}",
        fork.text
    );
    assert_eq!(vm_ids(&d, &d.key), vec![vm.clone()]);

    owner_limits(&d, &["alice", "--stored-bytes", "default"]);
    hatch_snapshot_and_restore(&d, &vm);
}

#[test]
fn racing_creates_at_the_limit_only_one_wins() {
    let d = Daemon::start_with(&[("HATCH_QUOTA_VMS", "2")]);
    d.create_vm(r#"{"mem_mib": 128, "enable_network": false}"#);
    let results: Vec<Response> = std::thread::scope(|s| {
        let racers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    d.req(
                        "POST",
                        "/vms",
                        Some(r#"{"mem_mib": 128, "enable_network": true}"#),
                    )
                })
            })
            .collect();
        racers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won = results.iter().filter(|r| r.status == 201).count();
    assert_eq!(
        won,
        1,
        "{:?}",
        results.iter().map(|r| &r.text).collect::<Vec<_>>()
    );
    for r in results.iter().filter(|r| r.status != 201) {
        assert_refused(r, 403, "vm limit reached (2/2)");
    }
    assert_eq!(vm_ids(&d, &d.key).len(), 2);
    assert_eq!(d.links("ht").len(), 1);
    assert_eq!(work_dirs(&d), 2);
}

#[test]
fn the_host_refuses_a_second_16_gib_vm() {
    // The owner may hold both; the host (24 GiB here) cannot run both.
    let d = Daemon::start_with(&[("HATCH_QUOTA_MEM_MIB", "65536")]);
    let total_mib = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        / 1024;
    assert!(
        (16 * 1024..32 * 1024).contains(&total_mib),
        "this test expects a 16-32 GiB host, not {total_mib} MiB"
    );
    let big = r#"{"mem_mib": 16384, "enable_network": false}"#;
    let a = id_of(&d.create_vm(big));
    let (pids, dirs) = (d.vmm_pids().len(), work_dirs(&d));
    let r = d.req("POST", "/vms", Some(big));
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(
        r.error(),
        "the host has no memory left for a 16384 MiB VM now; try again later or ask for less mem_mib"
    );
    assert_eq!(vm_ids(&d, &d.key), vec![a.clone()]);
    assert_eq!((d.vmm_pids().len(), work_dirs(&d)), (pids, dirs));

    // A stopped VM holds no memory: the second one fits, and then the
    // first cannot start again.
    let r = d.req("POST", &format!("/vms/{a}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let b = id_of(&d.create_vm(big));
    let r = d.req("POST", &format!("/vms/{a}/start"), None);
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(d.vm(&a)["state"], "stopped");
    assert!(d.vmm_pids_of(&a).is_empty());

    // A sleeping (snapshotted) VM holds no memory either; restoring it
    // needs room like a start does, and a refusal leaves it asleep.
    let r = d.req("POST", &format!("/vms/{b}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let r = d.req("POST", &format!("/vms/{a}/start"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let r = d.req("POST", &format!("/vms/{b}/restore"), None);
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(d.vm(&b)["state"], "snapshotted");
    assert!(d.vmm_pids_of(&b).is_empty());
    let r = d.req("POST", &format!("/vms/{a}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let r = d.req("POST", &format!("/vms/{b}/restore"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(d.vm(&b)["state"], "running");
}

/// `curl -N logs?follow=true` into a file, stopped when dropped.
struct Follower {
    child: Child,
    out: std::path::PathBuf,
}

impl Follower {
    fn start(d: &Daemon, vm: &str) -> Follower {
        let out = d.data_dir.join(format!("follow-{vm}.txt"));
        let child = Command::new("ip")
            .args(["netns", "exec", &d.ns, "curl", "-sS", "-N", "-o"])
            .arg(&out)
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", d.key))
            .arg(format!("{}/vms/{vm}/logs?follow=true", common::BASE))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Follower { child, out }
    }

    /// SIGSTOP/SIGCONT: a stopped client stops reading, so the daemon's
    /// stream falls behind the log.
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    fn text(&self) -> Vec<u8> {
        std::fs::read(&self.out).unwrap_or_default()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_console_flood_keeps_only_the_tail_and_followers_see_past_the_cut() {
    let cap: u64 = 1 << 20;
    let d = Daemon::start();
    // 20 MB of random bytes as base64 (27 MB of text) to the serial console.
    let script = "#!/bin/sh\n(sleep 2; dd if=/dev/urandom bs=1k count=20000 2>/dev/null | base64 > /dev/console; \
                  echo FLOOD-DONE > /dev/console) &\n";
    let vm =
        id_of(&d.create_vm(&json!({"enable_network": false, "user_data": script}).to_string()));
    let follower = Follower::start(&d, &vm);
    d.wait_console(&vm, "hatch-guest: ready");
    wait_until(
        "the follower to see the boot",
        Duration::from_secs(30),
        || String::from_utf8_lossy(&follower.text()).contains("hatch-guest: ready"),
    );
    // The follower stops reading during the flood: its place in the log
    // falls far behind the kept tail and is punched away under it.
    follower.signal("-STOP");
    let log = d.work_dir(&vm).join("console.log");
    wait_until("the flood to end", BOOT_TIMEOUT * 5, || {
        d.logs(&vm).contains("FLOOD-DONE")
    });
    follower.signal("-CONT");
    let meta = std::fs::metadata(&log).unwrap();
    assert!(
        meta.len() > 20_000_000,
        "the guest wrote {} bytes",
        meta.len()
    );
    wait_until("the last trim", Duration::from_secs(5), || {
        std::fs::metadata(&log).unwrap().blocks() * 512 <= cap + (512 << 10)
    });

    let meta_after = std::fs::metadata(&log).unwrap();
    eprintln!(
        "console.log: {} bytes written, {} bytes allocated (cap {cap})",
        meta_after.len(),
        meta_after.blocks() * 512
    );
    // The API shows the tail: the last line, not the boot banner.
    let tail = d.logs(&vm);
    assert!(tail.len() as u64 <= cap, "{} bytes", tail.len());
    assert!(tail.len() as u64 > cap / 2, "{} bytes", tail.len());
    assert!(
        tail.trim_end().ends_with("FLOOD-DONE"),
        "{}",
        &tail[tail.len() - 200..]
    );
    assert!(!tail.contains("hatch-guest: ready"));
    assert!(!tail.contains('\0'));

    // The follower, started before the flood, saw the end of it and no hole.
    wait_until("the follower to catch up", Duration::from_secs(60), || {
        String::from_utf8_lossy(&follower.text()).contains("FLOOD-DONE")
    });
    let seen = follower.text();
    assert!(!seen.contains(&0), "the follower read a hole as zeros");
    assert!(
        (seen.len() as u64) < meta.len() - 4 * cap,
        "the follower skipped what was cut ({} of {} bytes seen)",
        seen.len(),
        meta.len()
    );
    drop(follower);
}
