//! Confined VMMs with real guests: each QEMU runs as a uid of its own with no
//! capabilities and a seccomp filter, in a cgroup of its own below the
//! daemon's with the VM's limits, in a mount namespace that shows only its
//! own VM's files; cgroups go with their VMM (stop, delete, daemon crash);
//! dnsmasq is not root; the data directory is root's alone.

mod common;
use common::confine::*;
use common::*;
use std::path::Path;

const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// The one VMM of `id`.
fn vmm_of(d: &Daemon, id: &str) -> u32 {
    let pids = d.vmm_pids_of(id);
    assert_eq!(pids.len(), 1, "one VMM for {id}: {pids:?}");
    pids[0]
}

/// Asserts what /proc/PID/status shows of a confined process; returns its uid.
fn assert_unprivileged(pid: u32) -> u32 {
    let uids: Vec<u32> = status_field(pid, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    let gids: Vec<u32> = status_field(pid, "Gid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(
        uids.iter().all(|u| *u != 0 && *u == uids[0]),
        "real, effective, saved and fs uid are one non-root uid: {uids:?}"
    );
    assert!(gids.iter().all(|g| *g != 0 && *g == gids[0]), "{gids:?}");
    assert_eq!(status_field(pid, "Groups"), "", "no supplementary groups");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(pid, caps),
            "0000000000000000",
            "{caps} of {pid}"
        );
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2", "a seccomp filter");
    uids[0]
}

/// The VM's cgroup directories (host view), checked to be below the
/// daemon's own cgroup (which is this test's: the daemon inherits it).
fn cgroups_of(pid: u32, vm_id: &str) -> Vec<std::path::PathBuf> {
    CONTROLLERS
        .iter()
        .map(|c| {
            let path = cgroup_of(&pid.to_string(), c);
            let own = cgroup_of("self", c);
            let below = path
                .strip_prefix(own.trim_end_matches('/'))
                .unwrap_or_else(|| panic!("{c} cgroup {path} is not below the daemon's {own}"));
            let parts: Vec<&str> = below.trim_start_matches('/').split('/').collect();
            assert_eq!(parts.len(), 2, "{c}: {path}");
            assert!(parts[0].starts_with("hatch-"), "{c}: {path}");
            assert_eq!(parts[1], vm_id, "{c}: {path}");
            cgroup_dir(c, &path)
        })
        .collect()
}

#[test]
fn vmms_run_unprivileged_limited_and_see_only_their_own_files() {
    let mut d = Daemon::start();
    let a = d.create_vm(r#"{"vcpu_count": 2, "mem_mib": 256}"#);
    let a = a["id"].as_str().unwrap().to_string();
    let b = d.create_vm("{}")["id"].as_str().unwrap().to_string();
    d.wait_console(&a, "hatch-guest: ready boot=1");
    d.wait_console(&b, "hatch-guest: ready boot=1");
    let (pa, pb) = (vmm_of(&d, &a), vmm_of(&d, &b));

    let (ua, ub) = (assert_unprivileged(pa), assert_unprivileged(pb));
    assert_ne!(ua, ub, "each VM's VMM has a uid of its own");

    // Its own cgroup, below the daemon's, with the VM's limits:
    // one CPU per vCPU and one for QEMU itself, guest RAM plus the
    // documented 256 MiB, pids.
    let cg = cgroups_of(pa, &a);
    assert_eq!(read_trimmed(&cg[0].join("cpu.cfs_quota_us")), "300000");
    assert_eq!(read_trimmed(&cg[0].join("cpu.cfs_period_us")), "100000");
    assert_eq!(
        read_trimmed(&cg[1].join("memory.limit_in_bytes")),
        ((256u64 + 256) << 20).to_string()
    );
    assert_eq!(read_trimmed(&cg[2].join("pids.max")), "132");
    let procs = read_trimmed(&cg[2].join("cgroup.procs"));
    assert_eq!(procs, pa.to_string(), "only the VMM is in it");
    let cg_b = cgroups_of(pb, &b);
    assert_eq!(read_trimmed(&cg_b[0].join("cpu.cfs_quota_us")), "200000");

    // Its view of the data directory: its own work dir and its image, no
    // database, no objects, no other VM, no keys or network state.
    assert_eq!(seen_by(pa, &d.data_dir), vec!["images", "vms"]);
    assert_eq!(seen_by(pa, &d.data_dir.join("vms")), vec![a.clone()]);
    assert_eq!(seen_by(pb, &d.data_dir.join("vms")), vec![b.clone()]);
    let root = format!("/proc/{pa}/root");
    let inside = |p: &Path| Path::new(&root).join(p.strip_prefix("/").unwrap());
    assert!(inside(&d.work_dir(&a).join("disk.qcow2")).exists());
    assert!(!inside(&d.data_dir.join("hatch.db")).exists());
    assert!(!inside(&d.work_dir(&b)).exists());
    // The image is there read-only.
    let mounts = std::fs::read_to_string(format!("/proc/{pa}/mountinfo")).unwrap();
    let image_mount = mounts
        .lines()
        .find(|l| l.contains(&format!("{}/images/", d.data_dir.display())))
        .unwrap_or_else(|| panic!("no image mount: {mounts}"));
    assert!(
        image_mount.split(' ').nth(5).unwrap().starts_with("ro"),
        "{image_mount}"
    );

    // The work directory stays root's; only the files QEMU writes are its own.
    use std::os::unix::fs::MetadataExt;
    let work = std::fs::metadata(d.work_dir(&a)).unwrap();
    assert_eq!((work.uid(), mode_of(&d.work_dir(&a))), (0, 0o711));
    let console = d.work_dir(&a).join("console.log");
    assert_eq!(std::fs::metadata(&console).unwrap().uid(), ua);
    assert_eq!(mode_of(&console), 0o600);

    // The data directory and what is in it are root's alone.
    assert_eq!(mode_of(&d.data_dir), 0o700);
    assert_eq!(mode_of(&d.data_dir.join("hatch.db")), 0o600);
    assert_eq!(mode_of(&d.data_dir.join("vms")), 0o700);

    // dnsmasq runs unprivileged too.
    let dns = pids_mentioning(&format!("{}/net/", d.data_dir.display()));
    assert_eq!(dns.len(), 1, "one dnsmasq: {dns:?}");
    assert_ne!(
        status_field(dns[0], "Uid").split_whitespace().next(),
        Some("0")
    );
    assert_eq!(status_field(dns[0], "CapEff").len(), 16);
    assert_ne!(status_field(dns[0], "CapEff"), "000001ffffffffff");

    // Stop and delete take the cgroups with them.
    assert_eq!(d.req("POST", &format!("/vms/{a}/stop"), None).status, 200);
    for dir in &cg {
        assert!(!dir.exists(), "{} is gone after stop", dir.display());
    }
    assert_eq!(d.req("DELETE", &format!("/vms/{b}"), None).status, 200);
    for dir in &cg_b {
        assert!(!dir.exists(), "{} is gone after delete", dir.display());
    }

    // A start boots it confined again, in a new cgroup.
    assert_eq!(d.req("POST", &format!("/vms/{a}/start"), None).status, 200);
    let pa2 = vmm_of(&d, &a);
    assert_unprivileged(pa2);
    let again = cgroups_of(pa2, &a);
    assert!(again.iter().all(|c| c.exists()));

    // A graceful daemon shutdown leaves none of its cgroups behind.
    d.terminate();
    for dir in &again {
        let base = dir.parent().unwrap();
        assert!(!base.exists(), "{} is gone after shutdown", base.display());
    }
}

#[test]
fn cgroups_and_loose_modes_are_cleaned_up_after_a_daemon_crash() {
    let mut d = Daemon::start();
    let id = d.create_vm("{}")["id"].as_str().unwrap().to_string();
    d.wait_console(&id, "hatch-guest: ready boot=1");
    let cg = cgroups_of(vmm_of(&d, &id), &id);

    d.kill9();
    assert_eq!(d.vmm_pids_of(&id).len(), 1, "the VMM outlived the daemon");
    // Files an older daemon (or an operator) left readable to others.
    use std::os::unix::fs::PermissionsExt;
    let loose = d.data_dir.join("loose");
    std::fs::write(&loose, "x").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&d.data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let console = d.work_dir(&id).join("console.log");
    std::fs::set_permissions(&console, std::fs::Permissions::from_mode(0o644)).unwrap();

    d.restart();
    wait_until(
        "the old VMM is gone",
        std::time::Duration::from_secs(30),
        || d.vmm_pids_of(&id).is_empty(),
    );
    for dir in &cg {
        assert!(!dir.exists(), "{} is gone after the restart", dir.display());
    }
    let parent = cg[0].parent().unwrap();
    assert_eq!(
        std::fs::read_dir(parent).unwrap().count(),
        std::fs::read_dir(parent)
            .unwrap()
            .filter(|e| !e.as_ref().unwrap().file_type().unwrap().is_dir())
            .count(),
        "no VM cgroup is left in {}",
        parent.display()
    );
    assert_eq!(mode_of(&d.data_dir), 0o700);
    assert_eq!(mode_of(&loose), 0o600);
    assert_eq!(mode_of(&console), 0o600);
    assert_eq!(d.vm(&id)["state"], "error");
}

#[test]
fn a_confined_guest_snapshots_and_restores_into_a_confined_vmm() {
    let d = Daemon::start();
    let (_key, public) = keypair(&d.data_dir);
    let vm = counting_guest(&d, &public);
    let id = vm["id"].as_str().unwrap().to_string();
    wait_until("a few ticks", BOOT_TIMEOUT, || last_tick(&d.logs(&id)) >= 3);
    let before = vmm_of(&d, &id);
    assert_unprivileged(before);

    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let frozen = last_tick(&d.logs(&id));
    assert!(d.vmm_pids_of(&id).is_empty());

    let r = d.req("POST", &format!("/vms/{id}/restore"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let after = vmm_of(&d, &id);
    assert_unprivileged(after);
    assert!(cgroups_of(after, &id).iter().all(|c| c.exists()));
    // The guest's counter goes on from where it was (its memory came back).
    wait_until("ticks after restore", BOOT_TIMEOUT, || {
        last_tick(&d.logs(&id)) > frozen + 1
    });
    let log = d.logs(&id);
    assert_eq!(
        log.matches("Linux version").count(),
        1,
        "the guest did not boot again: {log}"
    );
}

#[test]
fn confinement_can_be_turned_off_for_benchmarks() {
    let d = Daemon::start_with(&[("HATCH_VMM_CONFINE", "off")]);
    let id = d.create_vm("{}")["id"].as_str().unwrap().to_string();
    d.wait_console(&id, "hatch-guest: ready boot=1");
    let pid = vmm_of(&d, &id);
    assert_eq!(
        status_field(pid, "Uid").split_whitespace().next(),
        Some("0")
    );
    assert_eq!(status_field(pid, "Seccomp"), "0");
    let own = cgroup_of("self", "pids");
    assert_eq!(cgroup_of(&pid.to_string(), "pids"), own);
    assert!(d.daemon_log().contains("HATCH_VMM_CONFINE=off"));
}
