//! Hot copies (issue 16) with real QEMU guests: a VM that goes to sleep keeps
//! its guest RAM in host memory, and its wake maps that RAM instead of
//! fetching it from the store. Used only when it is the very snapshot being
//! restored and its VMM is gone; a disk changed since is fetched from the
//! store; deep sleep (the timer, the host needing the memory) and a daemon
//! crash fall back to the store with nothing lost. Seen from outside: the
//! guest's counter, `GET /metrics` (`hatch_standby_restores_total` by where
//! the memory came from, `hatch_hot_copy_bytes`) and the files on disk.

#[macro_use]
mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const TOKEN: &str = "hot-copies-test-token-0123456789abcdef";
const MEM_MIB: u64 = 256;

/// One sample of `GET /metrics`: `series` is the name with its labels, as
/// the text has it (`hatch_hot_copy_bytes`, `hatch_standby_restores_total{memory="hot"}`).
fn metric(d: &Daemon, series: &str) -> f64 {
    d.metric_sample(TOKEN, series)
        .unwrap_or_else(|| panic!("no {series} in GET /metrics"))
}

fn restores(d: &Daemon, memory: &str) -> f64 {
    metric(
        d,
        &format!("hatch_standby_restores_total{{memory=\"{memory}\"}}"),
    )
}

fn hot_bytes(d: &Daemon) -> u64 {
    metric(d, "hatch_hot_copy_bytes") as u64
}

/// A guest with no network that counts in memory and prints each tick.
fn ticking_guest(d: &Daemon) -> String {
    let script = "#!/bin/sh\n(i=0; while true; do i=$((i+1)); echo \"tick $i\" > /dev/console; sleep 1; done) &\n";
    let vm = d.create_vm(
        &json!({ "enable_network": false, "mem_mib": MEM_MIB, "user_data": script }).to_string(),
    );
    let id = vm["id"].as_str().unwrap().to_string();
    wait_until("a few ticks", BOOT_TIMEOUT, || last_tick(&d.logs(&id)) >= 3);
    id
}

/// Puts the VM to sleep (Hatch snapshot); the snapshot's id and the last tick before.
fn sleep(d: &Daemon, id: &str) -> (String, u64) {
    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(d.vm(id)["state"], "snapshotted");
    assert!(d.vmm_pids_of(id).is_empty(), "its VMM is gone");
    (
        r.body["id"].as_str().unwrap().to_string(),
        last_tick(&d.logs(id)),
    )
}

/// How many times the console printed exactly `tick n`.
fn times_ticked(d: &Daemon, id: &str, n: u64) -> usize {
    let want = format!("tick {n}");
    d.logs(id).lines().filter(|l| l.trim() == want).count()
}

/// The guest runs again and counts on from `frozen`: `tick frozen+1` is
/// printed for the `nth` time (a reboot would start again from 1).
fn counts_on_from(d: &Daemon, id: &str, frozen: u64, nth: usize) {
    wait_until("the counter goes on", Duration::from_secs(60), || {
        times_ticked(d, id, frozen + 1) >= nth
    });
    assert!(!d.logs(id).contains("boot=2"), "no reboot happened");
}

fn restore(d: &Daemon, id: &str) -> Value {
    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["state"], "running");
    r.body
}

/// Hypeman's restore of the instance to `snap`, to Running.
fn restore_to(d: &Daemon, id: &str, snap: &str) {
    let r = d.req(
        "POST",
        &format!("/instances/{id}/snapshots/{snap}/restore"),
        Some(r#"{"target_state": "Running"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text);
}

/// The wake maps the hot copy (nothing from the store), a disk written
/// while asleep comes from the store instead of being used, a restore of
/// another snapshot never takes the hot copy, and deleting a sleeping VM
/// frees its hot copy.
#[test]
fn a_wake_maps_its_hot_copy_only_for_its_own_snapshot() {
    let d = Daemon::start_with(&[
        ("HATCH_HOT_SLEEP_SECONDS", "600"),
        ("HATCH_METRICS_TOKEN", TOKEN),
    ]);
    let id = ticking_guest(&d);
    let (first, frozen1) = sleep(&d, &id);
    assert_eq!(hot_bytes(&d), MEM_MIB << 20, "the guest's RAM is kept");
    restore(&d, &id);
    counts_on_from(&d, &id, frozen1, 1);
    assert_eq!(restores(&d, "hot"), 1.0);
    assert_eq!(restores(&d, "store"), 0.0);
    assert_eq!(
        hot_bytes(&d),
        0,
        "the wake took it: it is the guest's RAM now"
    );

    // Asleep again; its disk is written while it sleeps (its qcow2 header
    // wrecked). The disk is not the snapshot's any more: it comes from the
    // store, and only the memory from the hot copy.
    let (_, frozen2) = sleep(&d, &id);
    let disk = d.work_dir(&id).join("disk.qcow2");
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff; 4096], 0).unwrap();
    drop(f);
    restore(&d, &id);
    counts_on_from(&d, &id, frozen2, 1);
    assert_eq!(restores(&d, "hot"), 2.0);
    assert_eq!(restores(&d, "store"), 0.0);
    let header = std::fs::read(&disk).unwrap();
    assert_eq!(&header[..4], b"QFI\xfb", "the disk is the snapshot's again");

    // Asleep on a third snapshot, then restored to the first (Hypeman): the
    // hot copy is the third's, so the memory comes from the store and the
    // guest counts on from the first's moment.
    sleep(&d, &id);
    assert_eq!(hot_bytes(&d), MEM_MIB << 20);
    restore_to(&d, &id, &first);
    counts_on_from(&d, &id, frozen1, 2);
    assert_eq!(restores(&d, "store"), 1.0, "another snapshot's memory");
    assert_eq!(restores(&d, "hot"), 2.0);
    assert_eq!(hot_bytes(&d), 0, "the stale copy is gone");

    // Deleting a sleeping VM frees its hot copy.
    sleep(&d, &id);
    assert_eq!(hot_bytes(&d), MEM_MIB << 20);
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    assert_eq!(hot_bytes(&d), 0);
}

/// A checkpoint (Hypeman's Standby of a running instance) keeps its own copy
/// of the guest's RAM, made while the guest was paused: the guest runs on
/// and writes to its RAM, and a later restore to the checkpoint maps that
/// copy and counts on from the checkpoint's moment, not from where the guest
/// had run to. A second checkpoint replaces it; deleting that snapshot frees it.
#[test]
fn a_checkpoint_keeps_its_own_copy_while_its_guest_runs_on() {
    let d = Daemon::start_with(&[
        ("HATCH_HOT_SLEEP_SECONDS", "600"),
        ("HATCH_METRICS_TOKEN", TOKEN),
    ]);
    let id = ticking_guest(&d);
    let checkpoint = |d: &Daemon| -> String {
        let r = d.req(
            "POST",
            &format!("/instances/{id}/snapshots"),
            Some(r#"{"kind": "Standby"}"#),
        );
        assert_eq!(r.status, 201, "{}", r.text);
        assert_eq!(
            d.vm(&id)["state"],
            "running",
            "a checkpoint leaves it running"
        );
        r.body["id"].as_str().unwrap().to_string()
    };
    let snap = checkpoint(&d);
    // Read once the guest runs again: at most a tick past the checkpoint's.
    let frozen = last_tick(&d.logs(&id));
    assert_eq!(hot_bytes(&d), MEM_MIB << 20, "the checkpoint's copy");
    wait_until("the guest runs on", Duration::from_secs(60), || {
        last_tick(&d.logs(&id)) >= frozen + 3
    });
    assert_eq!(d.req("POST", &format!("/vms/{id}/stop"), None).status, 200);
    assert_eq!(hot_bytes(&d), MEM_MIB << 20, "a stop keeps it");
    restore_to(&d, &id, &snap);
    counts_on_from(&d, &id, frozen, 2);
    assert_eq!(restores(&d, "hot"), 1.0, "the copy was mapped");
    assert_eq!(restores(&d, "store"), 0.0);
    assert_eq!(hot_bytes(&d), 0, "the restore took it");

    let first = checkpoint(&d);
    let second = checkpoint(&d);
    assert_eq!(hot_bytes(&d), MEM_MIB << 20, "one copy per VM: the latest");
    let r = d.req("DELETE", &format!("/snapshots/{first}"), None);
    assert!(r.status < 300, "{}", r.text);
    assert_eq!(hot_bytes(&d), MEM_MIB << 20, "not the first's any more");
    let r = d.req("DELETE", &format!("/snapshots/{second}"), None);
    assert!(r.status < 300, "{}", r.text);
    assert_eq!(hot_bytes(&d), 0, "deleting its snapshot frees it");
}

/// A daemon killed with a hot copy leaves nothing behind and its VM wakes
/// from the store; after `HATCH_HOT_SLEEP_SECONDS` the copy is dropped (deep
/// sleep) and the wake comes from the store too.
#[test]
fn a_crash_and_deep_sleep_wake_from_the_store() {
    let mut d = Daemon::start_with(&[
        ("HATCH_HOT_SLEEP_SECONDS", "600"),
        ("HATCH_METRICS_TOKEN", TOKEN),
    ]);
    let id = ticking_guest(&d);
    let (_, frozen1) = sleep(&d, &id);
    assert_eq!(hot_bytes(&d), MEM_MIB << 20);
    d.kill9();
    // The hot copy was memory of the daemon's: nothing of it is left on
    // disk, beside the VMs' files.
    let left: Vec<_> = files_under(&d.data_dir.join("vms"))
        .into_iter()
        .filter(|(p, size)| {
            let name = p.to_string_lossy();
            *size >= 64 << 20 || name.contains("/capture-") || name.contains("/restore-")
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    d.set_env("HATCH_HOT_SLEEP_SECONDS", Some("2"));
    d.restart();
    assert_eq!(d.vm(&id)["state"], "snapshotted");
    assert_eq!(hot_bytes(&d), 0, "a new daemon holds none");
    restore(&d, &id);
    counts_on_from(&d, &id, frozen1, 1);
    assert_eq!(restores(&d, "store"), 1.0);

    let (_, frozen2) = sleep(&d, &id);
    wait_until("deep sleep", Duration::from_secs(30), || hot_bytes(&d) == 0);
    restore(&d, &id);
    counts_on_from(&d, &id, frozen2, 1);
    assert_eq!(restores(&d, "store"), 2.0);
    assert_eq!(restores(&d, "hot"), 0.0);
}

/// Hot copies count in the host's memory: a VM that would not fit beside
/// one is admitted after the oldest hot copy goes (deep sleep), not refused.
#[test]
fn the_host_takes_back_hot_memory_before_refusing_a_vm() {
    let total_mib = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        / 1024;
    // Room for one 256 MiB VM with its 256 MiB overhead, not for a second
    // one beside a 256 MiB hot copy.
    let reserve = (total_mib - 700).to_string();
    let d = Daemon::start_with(&[
        ("HATCH_HOT_SLEEP_SECONDS", "600"),
        ("HATCH_METRICS_TOKEN", TOKEN),
        ("HATCH_MEMORY_OVERCOMMIT", "1.0"),
        ("HATCH_HOST_MEMORY_RESERVE_MIB", &reserve),
    ]);
    let a = ticking_guest(&d);
    let (_, frozen) = sleep(&d, &a);
    assert_eq!(hot_bytes(&d), MEM_MIB << 20);
    let b = ticking_guest(&d);
    assert_eq!(hot_bytes(&d), 0, "a's hot copy made room for b");
    // b holds the memory now: a cannot wake beside it.
    let r = d.req("POST", &format!("/vms/{a}/restore"), None);
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(d.vm(&a)["state"], "snapshotted");
    assert_eq!(d.req("DELETE", &format!("/vms/{b}"), None).status, 200);
    restore(&d, &a);
    counts_on_from(&d, &a, frozen, 1);
    assert_eq!(restores(&d, "store"), 1.0);
    assert_eq!(restores(&d, "hot"), 0.0);
}

/// Memory pressure from outside hatch: while the host's MemAvailable is
/// below `HATCH_HOT_MIN_AVAILABLE` (here above all the host has, so always),
/// deep sleep drops hot copies long before `HATCH_HOT_SLEEP_SECONDS`, and
/// the wake comes from the store.
#[test]
fn memory_pressure_on_the_host_drops_hot_copies() {
    let d = Daemon::start_with(&[
        ("HATCH_HOT_SLEEP_SECONDS", "600"),
        ("HATCH_METRICS_TOKEN", TOKEN),
        ("HATCH_HOT_MIN_AVAILABLE", "64T"),
    ]);
    let id = ticking_guest(&d);
    let (_, frozen) = sleep(&d, &id);
    wait_until("deep sleep under pressure", Duration::from_secs(30), || {
        hot_bytes(&d) == 0
    });
    assert!(
        d.daemon_log().contains("the host is short of memory"),
        "the daemon says why"
    );
    restore(&d, &id);
    counts_on_from(&d, &id, frozen, 1);
    assert_eq!(restores(&d, "store"), 1.0);
    assert_eq!(restores(&d, "hot"), 0.0);
}

/// Every file under `dir` (path and size), the logs left out.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if !e.path().ends_with("daemon.log") && !e.path().ends_with("console.log") {
                out.push((e.path(), m.len()));
            }
        }
    }
    out.sort();
    out
}
