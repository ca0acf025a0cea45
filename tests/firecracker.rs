//! Firecracker VMs through the API, checked at the VMM level.
//!
//! Firecracker is in no package registry: these tests need its `firecracker`
//! and `jailer` binaries in `HATCH_TEST_FIRECRACKER_DIR` (built from its
//! public source, outside this repository) and print a `skipped:` line and
//! pass without them. /dev/kvm on the machines this suite runs on is a
//! software KVM under which a guest does not get far into boot, so what is
//! checked is what the VMM shows: the jailer's chroot, uid and cgroup, the
//! API calls in order (a VM reported running has had InstanceStart), pause,
//! snapshot files and their sizes, load + resume, the stop-then-kill path,
//! logs, metrics, and that nothing is left after stop, delete, a failed load
//! or a daemon kill -9. The QEMU side of a snapshot moved between backends
//! boots for real. The test that a host without Firecracker refuses it runs
//! everywhere.

mod common;

use common::*;
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_string()
}

/// The directory with `firecracker` and `jailer`, or `None` (and a skip line).
fn firecracker_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("HATCH_TEST_FIRECRACKER_DIR").map(PathBuf::from);
    match dir {
        Some(d) if d.join("firecracker").is_file() && d.join("jailer").is_file() => Some(d),
        _ => {
            eprintln!(
                "skipped: {test}: HATCH_TEST_FIRECRACKER_DIR does not name a directory with \
                 firecracker and jailer (build them from Firecracker's source; see README)"
            );
            None
        }
    }
}

/// A daemon with a Firecracker backend beside QEMU (QEMU stays the default).
fn daemon(fc: &Path, extra: &[(&str, &str)]) -> Daemon {
    let fc_bin = fc.join("firecracker");
    let jailer = fc.join("jailer");
    let vmlinux = image_dir().join("vmlinux");
    let mut env = vec![
        ("HATCH_FIRECRACKER_BINARY", fc_bin.to_str().unwrap()),
        ("HATCH_JAILER_BINARY", jailer.to_str().unwrap()),
        ("HATCH_DEFAULT_KERNEL_ELF_PATH", vmlinux.to_str().unwrap()),
        // The guest never gets far enough here to power off: stop kills after this.
        ("HATCH_STOP_TIMEOUT", "3s"),
    ];
    env.extend_from_slice(extra);
    Daemon::start_with(&env)
}

fn fc_vm(d: &Daemon, mem_mib: u32) -> Value {
    let r = d.req(
        "POST",
        "/vms",
        Some(&json!({"hypervisor": "firecracker", "mem_mib": mem_mib}).to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["hypervisor"], "firecracker");
    assert_eq!(r.body["state"], "running", "{}", r.text);
    r.body
}

/// The pid in the VM's `vmm.pid`, checked to be a live Firecracker.
fn fc_pid(d: &Daemon, id: &str) -> u32 {
    let text = std::fs::read_to_string(d.work_dir(id).join("vmm.pid")).expect("vmm.pid");
    let pid: u32 = text.trim().parse().unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the VMM is running");
    assert!(
        exe.to_string_lossy().ends_with("firecracker"),
        "pid {pid} runs {}",
        exe.display()
    );
    pid
}

/// `Name:\tvalue` lines of /proc/PID/status.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Every live Firecracker process on the host whose cgroup names one of this daemon's VMs.
fn firecrackers_of(d: &Daemon, ids: &[String]) -> Vec<u32> {
    let mut pids = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if !exe.to_string_lossy().ends_with("firecracker") {
            continue;
        }
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let env_dir = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
        if ids.iter().any(|id| cg.contains(id.as_str())) || env_dir.starts_with(&d.data_dir) {
            pids.push(pid);
        }
    }
    pids
}

/// Jail roots (directories named `root` under a `firecracker` directory) in the data dir.
fn jails(d: &Daemon) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        if depth == 0 {
            return;
        }
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            if p.file_name().is_some_and(|n| n == "root")
                && p.ancestors()
                    .any(|a| a.file_name().is_some_and(|n| n == "firecracker"))
            {
                out.push(p);
            } else {
                walk(&p, depth - 1, out);
            }
        }
    }
    let mut out = vec![];
    walk(&d.data_dir, 8, &mut out);
    out
}

/// Cgroup directories anywhere under /sys/fs/cgroup named after `id`.
fn cgroups_of(id: &str) -> Vec<PathBuf> {
    let out = std::process::Command::new("find")
        .args([
            "/sys/fs/cgroup",
            "-maxdepth",
            "8",
            "-type",
            "d",
            "-name",
            id,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}

fn assert_nothing_left(d: &Daemon, ids: &[String]) {
    assert_eq!(
        firecrackers_of(d, ids),
        Vec::<u32>::new(),
        "firecracker left"
    );
    assert_eq!(jails(d), Vec::<PathBuf>::new(), "jail left");
    for id in ids {
        assert_eq!(cgroups_of(id), Vec::<PathBuf>::new(), "cgroup of {id} left");
    }
}

/// A Firecracker VM runs through the jailer: its own uid and gid, no
/// capabilities, a cgroup, a chroot holding only hard links to its own
/// files; logs and metrics answer; a stop asks, then kills; start and
/// delete leave no process, chroot, cgroup or TAP.
#[test]
fn a_firecracker_vm_runs_jailed_and_leaves_nothing_behind() {
    let Some(fc) = firecracker_dir("a_firecracker_vm_runs_jailed_and_leaves_nothing_behind") else {
        return;
    };
    let d = daemon(&fc, &[]);
    let vm = fc_vm(&d, 128);
    let id = id_of(&vm);
    let work = d.work_dir(&id);
    let pid = fc_pid(&d, &id);

    // Its own unprivileged uid and gid, no capabilities.
    let uids: Vec<u32> = status_field(pid, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uids.iter().all(|u| *u == uids[0] && *u != 0), "{uids:?}");
    let gids: Vec<u32> = status_field(pid, "Gid")
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    assert!(gids.iter().all(|g| *g == gids[0] && *g != 0), "{gids:?}");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    // A cgroup of its own.
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cg.contains(&id), "{cg}");
    assert!(!cgroups_of(&id).is_empty());

    // The chroot: only this VM's files, hard links to the work dir's, never copies.
    let js = jails(&d);
    assert_eq!(js.len(), 1, "{js:?}");
    let jail = &js[0];
    let disk = std::fs::metadata(work.join("disk.raw")).unwrap();
    let mut names = vec![];
    for e in std::fs::read_dir(jail).unwrap().flatten() {
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        assert!(!m.file_type().is_symlink(), "{:?}", e.path());
        names.push(e.file_name().to_string_lossy().into_owned());
        // The disk is there once, as another name of the work dir's: never a copy.
        if m.is_file() && m.len() == disk.len() {
            assert_eq!(e.file_name(), "disk.raw");
            assert_eq!(m.ino(), disk.ino(), "the jail's disk is a hard link");
        }
    }
    assert!(names.contains(&"disk.raw".to_string()), "{names:?}");
    // The kernel too is the image's own file, linked.
    let kernel = std::fs::metadata(jail.join("vmlinux")).unwrap();
    assert!(kernel.nlink() >= 2, "the kernel is linked, not copied");
    // Nothing of another VM, and no database or objects: only this VM's files.
    for n in &names {
        assert!(
            !n.contains("hatch.db") && !n.contains("objects"),
            "{names:?}"
        );
    }
    let other = d.req(
        "POST",
        "/vms",
        Some(&json!({"hypervisor": "firecracker", "mem_mib": 128}).to_string()),
    );
    assert_eq!(other.status, 201, "{}", other.text);
    let other_id = id_of(&other.body);
    let other_pid = fc_pid(&d, &other_id);
    assert_ne!(status_field(other_pid, "Uid"), status_field(pid, "Uid"));
    assert_eq!(jails(&d).len(), 2);

    // Logs and metrics answer for a Firecracker VM as for any other.
    let r = d.req("GET", &format!("/vms/{id}/logs"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let m = d.req("GET", &format!("/vms/{id}/metrics"), None);
    assert_eq!(m.status, 200, "{}", m.text);
    assert_eq!(m.body["hypervisor"], "firecracker");
    assert_eq!(m.body["vm_id"], id.as_str());
    assert!(
        m.body["memory"]["vmm_rss_bytes"].as_u64().unwrap() > 0,
        "{}",
        m.text
    );
    assert!(m.body["raw"].is_object(), "{}", m.text);

    // Stop: the guest cannot answer Ctrl-Alt-Del here, so it is killed after the timeout.
    let r = d.req("POST", &format!("/vms/{id}/stop"), None);
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (200, json!("stopped")),
        "{}",
        r.text
    );
    wait_until("the VMM is gone", Duration::from_secs(10), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    assert_eq!(jails(&d).len(), 1, "the stopped VM's jail went");
    assert!(cgroups_of(&id).is_empty());
    assert!(
        d.daemon_log().contains("killing VMM"),
        "a stop of a guest that does not power off ends in a kill"
    );

    // Started again: a new jailed VMM.
    let r = d.req("POST", &format!("/vms/{id}/start"), None);
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (200, json!("running")),
        "{}",
        r.text
    );
    let again = fc_pid(&d, &id);
    assert_ne!(again, pid);

    for v in [&id, &other_id] {
        let r = d.req("DELETE", &format!("/vms/{v}"), None);
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_nothing_left(&d, &[id.clone(), other_id]);
    assert!(!work.exists());
    assert!(d.links("ht").is_empty(), "{:?}", d.links("ht"));
}

/// Hatch's snapshot of a Firecracker VM stores its state and whole memory
/// file and ends the VMM; restore loads it into a new jailed VMM; a Hypeman
/// Standby snapshot (a checkpoint) keeps the VMM running and forks onto
/// Firecracker only; a corrupt memory object fails the restore with nothing
/// changed.
#[test]
fn firecracker_snapshots_store_the_memory_file_and_load_it_back() {
    let Some(fc) = firecracker_dir("firecracker_snapshots_store_the_memory_file_and_load_it_back")
    else {
        return;
    };
    let d = daemon(&fc, &[]);
    let vm = fc_vm(&d, 128);
    let id = id_of(&vm);
    let pid = fc_pid(&d, &id);

    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let snap = r.body.clone();
    let sid = id_of(&snap);
    assert_eq!(d.vm(&id)["state"], "snapshotted");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    // The device state is one object; the memory file and the disk are chunks.
    let stored = d.stored_objects(&format!("snapshots/{id}/{sid}/"));
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(
        stored[0].0.ends_with("vmstate") && stored[0].1 > 0,
        "{stored:?}"
    );
    assert_eq!(
        snap["size_bytes"].as_u64().unwrap(),
        stored[0].1
            + d.stored_objects("chunks/")
                .iter()
                .map(|(_, n)| n)
                .sum::<u64>(),
        "{snap}"
    );
    let sizes = d.db_value(&format!(
        "SELECT memory_size || ' ' || disk_size FROM snapshots WHERE id = '{sid}'"
    ));
    assert_eq!(
        sizes,
        format!(
            "{} {}",
            128u64 << 20,
            std::fs::metadata(d.work_dir(&id).join("disk.raw"))
                .unwrap()
                .len()
        ),
        "a Full snapshot's memory file is the guest's RAM; the disk is whole"
    );
    let r = d.req("GET", &format!("/snapshots/{sid}"), None);
    assert_eq!(r.body["source_hypervisor"], "firecracker", "{}", r.text);

    // Restore: a new VMM loads the memory file and resumes.
    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (200, json!("running")),
        "{}",
        r.text
    );
    let restored = fc_pid(&d, &id);
    assert_ne!(restored, pid);
    assert_eq!(jails(&d).len(), 1);
    let m = d.req("GET", &format!("/vms/{id}/metrics"), None);
    assert_eq!(m.status, 200, "{}", m.text);
    let ns = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    let host_ns = std::fs::metadata(format!("/run/netns/{}", d.ns))
        .unwrap()
        .ino();
    let host_ns = PathBuf::from(format!("net:[{host_ns}]"));
    assert_eq!(
        ns(restored),
        host_ns,
        "restored on its own address: no namespace"
    );

    // Standby through the Hypeman API is a checkpoint: the same VMM runs on.
    let r = d.req(
        "POST",
        &format!("/instances/{id}/snapshots"),
        Some(r#"{"kind": "Standby", "name": "warm"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let warm = id_of(&r.body);
    assert_eq!(d.vm(&id)["state"], "running");
    assert_eq!(fc_pid(&d, &id), restored);
    assert_eq!(jails(&d).len(), 1);
    assert_eq!(
        r.body["uncompressed_size_bytes"],
        json!(128u64 << 20),
        "{}",
        r.text
    );
    assert!(!d.chunk_keys(&warm, "memory").is_empty());
    // Forks: onto Firecracker, and not onto QEMU.
    let fork = |body: Value| {
        d.req(
            "POST",
            &format!("/snapshots/{warm}/fork"),
            Some(&body.to_string()),
        )
    };
    let r = fork(json!({"name": "onqemu", "target_hypervisor": "qemu"}));
    assert_eq!(r.status, 400, "{}", r.text);
    r.error();
    let r = fork(json!({"name": "twin", "target_state": "Running"}));
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (201, json!("running")),
        "{}",
        r.text
    );
    let twin = id_of(&r.body);
    assert_eq!(r.body["hypervisor"], "firecracker");
    let twin_pid = fc_pid(&d, &twin);
    // The fork believes it has its source's address: it runs in a network namespace of its own.
    assert_ne!(ns(twin_pid), host_ns);

    // The checkpoint is independent of its instance: deleted while it runs.
    let r = d.req("DELETE", &format!("/snapshots/{warm}"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(fc_pid(&d, &id), restored);

    // A corrupt memory object: the restore fails, the VM stays snapshotted, no VMM is left.
    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let asleep = id_of(&r.body);
    assert_eq!(d.vm(&id)["state"], "snapshotted");
    let key = d.read_chunk_keys(&asleep, "memory")[0].clone();
    let mut bytes = d.read_object(&key);
    bytes[0] ^= 0xff;
    d.write_object(&key, &bytes);
    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert!(r.status >= 400, "{}", r.text);
    r.error();
    assert_eq!(d.vm(&id)["state"], "snapshotted");
    assert_eq!(
        firecrackers_of(&d, std::slice::from_ref(&id)),
        Vec::<u32>::new()
    );

    for v in [&twin, &id] {
        let r = d.req("DELETE", &format!("/vms/{v}"), None);
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_nothing_left(&d, &[id, twin]);
    assert_eq!(d.stored_objects("snapshots/"), vec![]);
}

/// A Stopped snapshot moves between QEMU and Firecracker both ways: the
/// file written in a real QEMU guest is on the Firecracker VM's raw disk,
/// and back on QEMU the guest boots and reads it.
#[test]
fn stopped_snapshots_move_between_qemu_and_firecracker() {
    let Some(fc) = firecracker_dir("stopped_snapshots_move_between_qemu_and_firecracker") else {
        return;
    };
    let d = daemon(&fc, &[("HATCH_STOP_TIMEOUT", "120s")]);
    let (key, public) = keypair(&d.data_dir);
    let vm = d.create_vm(
        &json!({"name": "src", "user_data": ssh_user_data("root", &public)}).to_string(),
    );
    let id = id_of(&vm);
    let ip = vm["guest_ip"].as_str().unwrap().to_string();
    d.ssh_ok(
        None,
        &key,
        &format!("root@{ip}"),
        22,
        "echo golden > /root/marker; sync",
    );
    let r = d.req(
        "POST",
        &format!("/instances/{id}/snapshots"),
        Some(r#"{"kind": "Stopped"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let sid = id_of(&r.body);

    // Onto Firecracker: a stopped VM whose raw disk holds the file.
    let r = d.req(
        "POST",
        &format!("/snapshots/{sid}/fork"),
        Some(r#"{"name": "onfc", "target_hypervisor": "firecracker"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["hypervisor"], "firecracker");
    assert_eq!(r.body["state"], "stopped");
    let fid = id_of(&r.body);
    let raw = d.work_dir(&fid).join("disk.raw");
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /root/marker"])
        .arg(&raw)
        .output()
        .expect("debugfs (e2fsprogs)");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "golden");
    assert!(!d.work_dir(&fid).join("disk.qcow2").exists());
    // It starts on Firecracker (the VMM level is what this host can show).
    let r = d.req("POST", &format!("/vms/{fid}/start"), None);
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (200, json!("running")),
        "{}",
        r.text
    );
    fc_pid(&d, &fid);
    let r = d.req(
        "POST",
        &format!("/instances/{fid}/snapshots"),
        Some(r#"{"kind": "Stopped"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let fsid = id_of(&r.body);
    assert_eq!(r.body["source_hypervisor"], "firecracker");

    // And back onto QEMU, booted for real: the guest reads the file.
    let r = d.req(
        "POST",
        &format!("/snapshots/{fsid}/fork"),
        Some(r#"{"name": "back", "target_hypervisor": "qemu", "target_state": "Running"}"#),
    );
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (201, json!("running")),
        "{}",
        r.text
    );
    assert_eq!(r.body["hypervisor"], "qemu");
    let bip = r.body["guest_ip"].as_str().unwrap().to_string();
    let bid = id_of(&r.body);
    assert_eq!(
        d.ssh_ok(None, &key, &format!("root@{bip}"), 22, "cat /root/marker")
            .trim(),
        "golden"
    );

    // Another VM's snapshot is not this instance's to restore.
    let r = d.req(
        "POST",
        &format!("/instances/{id}/snapshots/{fsid}/restore"),
        Some(r#"{"target_hypervisor": "firecracker"}"#),
    );
    assert_eq!(r.status, 404, "{}", r.text);
    // Restored in place onto the other backend, the QEMU source becomes a
    // Firecracker VM with a raw disk holding the file, its qcow2 gone.
    let r = d.req(
        "POST",
        &format!("/instances/{id}/snapshots/{sid}/restore"),
        Some(r#"{"target_hypervisor": "firecracker", "target_state": "Stopped"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["hypervisor"], "firecracker");
    assert_eq!(r.body["state"], "stopped");
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /root/marker"])
        .arg(d.work_dir(&id).join("disk.raw"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "golden");
    assert!(!d.work_dir(&id).join("disk.qcow2").exists());

    for v in [&bid, &fid, &id] {
        let r = d.req("DELETE", &format!("/vms/{v}"), None);
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_nothing_left(&d, &[id, fid, bid]);
    assert!(d.vmm_pids().is_empty());
}

/// The kept memory files (`hot-memory-<snapshot>`) in a VM's work dir.
fn hot_files(d: &Daemon, id: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(d.work_dir(id))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("hot-memory-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Firecracker's hot copy: its snapshot's memory file stays in the VM's
/// work directory and the wake moves it into the new VMM's jail instead of
/// fetching it from the store. Deep sleep, a delete and a killed daemon's
/// restart each remove it.
#[test]
fn a_firecracker_wake_maps_its_kept_memory_file() {
    let Some(fc) = firecracker_dir("a_firecracker_wake_maps_its_kept_memory_file") else {
        return;
    };
    let mut d = daemon(&fc, &[("HATCH_HOT_SLEEP_SECONDS", "600")]);
    let id = id_of(&fc_vm(&d, 128));
    let snap = |d: &Daemon| {
        let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
        assert_eq!(r.status, 201, "{}", r.text);
        id_of(&r.body)
    };
    let sid = snap(&d);
    assert_eq!(hot_files(&d, &id), vec![format!("hot-memory-{sid}")]);
    let kept = d.work_dir(&id).join(format!("hot-memory-{sid}"));
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), 128 << 20);
    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (200, json!("running")),
        "{}",
        r.text
    );
    fc_pid(&d, &id);
    assert!(
        d.daemon_log().contains("restoring from the hot copy"),
        "the wake used the kept file"
    );
    assert!(hot_files(&d, &id).is_empty(), "the restore took the file");

    // A daemon killed with one: the next daemon removes the file, and the
    // wake comes from the store.
    let sid2 = snap(&d);
    assert_eq!(hot_files(&d, &id), vec![format!("hot-memory-{sid2}")]);
    d.kill9();
    d.set_env("HATCH_HOT_SLEEP_SECONDS", Some("2"));
    d.restart();
    assert!(hot_files(&d, &id).is_empty(), "left by the killed daemon");
    let from_hot = d
        .daemon_log()
        .matches("restoring from the hot copy")
        .count();
    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (200, json!("running")),
        "{}",
        r.text
    );
    assert_eq!(
        d.daemon_log()
            .matches("restoring from the hot copy")
            .count(),
        from_hot,
        "a new daemon has no hot copy"
    );

    // Deep sleep after 2 s removes the file; a delete removes a fresh one.
    snap(&d);
    wait_until("deep sleep", Duration::from_secs(30), || {
        hot_files(&d, &id).is_empty()
    });
    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    d.terminate();
    d.set_env("HATCH_HOT_SLEEP_SECONDS", Some("600"));
    d.restart();
    let st = d.vm(&id)["state"].as_str().unwrap().to_string();
    if st != "running" {
        let r = d.req("POST", &format!("/vms/{id}/start"), None);
        assert_eq!(r.status, 200, "{}", r.text);
    }
    snap(&d);
    assert_eq!(hot_files(&d, &id).len(), 1);
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    assert_nothing_left(&d, &[id]);
}

/// A daemon killed with -9 leaves jailed VMMs; the next one kills them and
/// removes their chroots and cgroups, and reports the VMs truthfully.
#[test]
fn a_killed_daemon_leaves_no_firecracker_behind_after_restart() {
    let Some(fc) = firecracker_dir("a_killed_daemon_leaves_no_firecracker_behind_after_restart")
    else {
        return;
    };
    let mut d = daemon(&fc, &[]);
    let vm = fc_vm(&d, 128);
    let id = id_of(&vm);
    let pid = fc_pid(&d, &id);
    d.kill9();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "VMMs outlive a kill -9"
    );
    d.restart();
    wait_until("the old VMM is gone", Duration::from_secs(10), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    assert_eq!(jails(&d), Vec::<PathBuf>::new());
    assert!(cgroups_of(&id).is_empty());
    let st = d.vm(&id)["state"].as_str().unwrap().to_string();
    assert!(st == "stopped" || st == "error", "{st}");
    let r = d.req("POST", &format!("/vms/{id}/start"), None);
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (200, json!("running")),
        "{}",
        r.text
    );
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    assert_nothing_left(&d, &[id]);
}

/// Without Firecracker's binaries a VM asking for it is refused with the
/// reason, and a daemon told to default to it does not start.
#[test]
fn a_host_without_firecracker_refuses_it_clearly() {
    let d = Daemon::start_with(&[("HATCH_FIRECRACKER_BINARY", "/nonexistent/firecracker")]);
    let r = d.req(
        "POST",
        "/vms",
        Some(r#"{"hypervisor": "firecracker", "mem_mib": 128}"#),
    );
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.error().contains("firecracker"), "{}", r.text);
    assert!(
        d.req("GET", "/vms", None).ids().is_empty(),
        "nothing was made"
    );
    let r = d.req("POST", "/vms", Some(r#"{"hypervisor": "hyperv"}"#));
    assert_eq!(r.status, 400, "{}", r.text);

    let other = d.data_dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &d.ns])
        .arg(bin())
        .arg("serve")
        .env("HATCH_DATA_DIR", &other)
        .env("HATCH_HTTP_ADDR", "127.0.0.1:8099")
        .env("HATCH_HYPERVISOR", "firecracker")
        .env("HATCH_FIRECRACKER_BINARY", "/nonexistent/firecracker")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HATCH_HYPERVISOR") || err.contains("firecracker"),
        "{err}"
    );
}
