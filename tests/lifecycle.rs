//! A VM's whole life through the API with a real guest: create, console logs
//! (also followed), graceful stop, start on the same disk, delete.

mod common;
use common::safety::*;
use common::*;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

#[test]
fn create_logs_stop_start_delete() {
    // The stop must be graceful: give the guest as long as a boot may take
    // on a loaded machine before the daemon would kill it.
    let d = Daemon::start_with(&[("HATCH_STOP_TIMEOUT", "120s")]);

    // An empty body creates a VM from the default image with the Hatch API's defaults.
    let vm = d.create_vm("{}");
    let id = vm["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("vm_"), "{vm}");
    assert_eq!(vm["image_id"], "img_default");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["vcpu_count"], 1);
    assert_eq!(vm["mem_mib"], 512);
    assert_eq!(vm["enable_network"], true);
    // Networking is on by default: the first VM gets the first address (.10),
    // a MAC derived from it, its own TAP and the first SSH port.
    assert_eq!(vm["guest_ip"], "172.16.0.10", "{vm}");
    assert_eq!(vm["guest_mac"], "02:fc:ac:10:00:0a");
    assert_eq!(vm["tap_name"], format!("ht{}", &id[3..]));
    assert_eq!(vm["ssh_port"], 16000);
    assert!(vm["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(d.vmm_pids_of(&id).len(), 1, "exactly one VMM process");
    // The VM's disk is an overlay over the image, not a copy of the whole rootfs.
    use std::os::unix::fs::MetadataExt;
    let disk = std::fs::metadata(d.work_dir(&id).join("disk.qcow2")).unwrap();
    let base = std::fs::metadata(image_dir().join("rootfs.ext4")).unwrap();
    assert!(
        disk.blocks() * 512 < 16 << 20,
        "disk uses {} bytes",
        disk.blocks() * 512
    );
    assert!(
        disk.len() < base.len() / 8,
        "disk {} vs rootfs {}",
        disk.len(),
        base.len()
    );

    // The guest really boots: the kernel's and our init's lines are in the log.
    let log = d.wait_console(&id, "hatch-guest: ready boot=1");
    assert!(log.contains("Linux version"), "kernel output kept: {log}");

    let list = d.req("GET", "/vms", None);
    assert_eq!(list.status, 200);
    assert_eq!(list.ids(), vec![id.clone()]);

    // Follow the console while stopping: the stream shows the shutdown and
    // then ends by itself when the VMM exits. The stop comes once the stream
    // delivers the log so far (followed_logs_stream_... shows new lines arrive).
    let mut follower = FollowedLogs::open(&d, &id);
    follower.wait_for("the ready line", BOOT_TIMEOUT, |l| {
        l.contains("hatch-guest: ready boot=1")
    });
    assert!(follower.is_open());

    let stopped = d.req("POST", &format!("/vms/{id}/stop"), None);
    assert_eq!(stopped.status, 200, "{}", stopped.text);
    assert_eq!(stopped.body["state"], "stopped");
    assert!(d.vmm_pids_of(&id).is_empty(), "VMM gone after stop");
    // Graceful: the guest ran its own shutdown instead of being killed.
    assert!(
        d.logs(&id).contains("hatch-guest: shutting down"),
        "{}",
        d.logs(&id)
    );

    let (ended_cleanly, followed) = follower.finish(Duration::from_secs(120));
    assert!(
        ended_cleanly,
        "follow stream must end cleanly when the VM stops"
    );
    let followed = followed.join("\n");
    assert!(
        followed.contains("hatch-guest: ready boot=1")
            && followed.contains("hatch-guest: shutting down"),
        "{followed}"
    );

    // Wrong-state transitions are conflicts and change nothing.
    let again = d.req("POST", &format!("/vms/{id}/stop"), None);
    assert_eq!(again.status, 409, "{}", again.text);
    assert!(again.error().contains("stopped"));
    assert_eq!(d.vm(&id)["state"], "stopped");

    // Start boots the same disk: the counter the guest keeps on it went on.
    let started = d.req("POST", &format!("/vms/{id}/start"), None);
    assert_eq!(started.status, 200, "{}", started.text);
    assert_eq!(started.body["state"], "running");
    d.wait_console(&id, "hatch-guest: ready boot=2");
    let again = d.req("POST", &format!("/vms/{id}/start"), None);
    assert_eq!(again.status, 409, "{}", again.text);

    // Delete: VMM, work directory and the record are gone.
    assert!(d.work_dir(&id).exists());
    let del = d.req("DELETE", &format!("/vms/{id}"), None);
    assert_eq!(del.status, 200, "{}", del.text);
    assert_eq!(del.body, serde_json::json!({"status": "deleted"}));
    assert!(d.vmm_pids().is_empty(), "no VMM left");
    assert!(!d.work_dir(&id).exists(), "work dir removed");
    assert_eq!(d.req("GET", &format!("/vms/{id}"), None).status, 404);
    assert_eq!(d.req("GET", &format!("/vms/{id}/logs"), None).status, 404);
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 404);
    assert_eq!(d.req("GET", "/vms", None).body, serde_json::json!([]));
    let left: Vec<_> = std::fs::read_dir(d.data_dir.join("vms")).unwrap().collect();
    assert!(left.is_empty(), "nothing left under vms/: {left:?}");
}

#[test]
fn resources_are_given_to_the_guest() {
    let d = Daemon::start();
    let vm =
        d.create_vm(r#"{"vcpu_count": 2, "mem_mib": 256, "boot_args": "root=/dev/vda rw quiet"}"#);
    let id = vm["id"].as_str().unwrap();
    assert_eq!(vm["vcpu_count"], 2);
    assert_eq!(vm["mem_mib"], 256);
    // A console is added to custom boot args so the log keeps working.
    assert_eq!(vm["boot_args"], "root=/dev/vda rw quiet console=ttyS0");
    let log = d.wait_console(id, "hatch-guest: ready");
    // The guest's own view: two CPUs and about 256 MiB (the init prints both).
    assert!(log.contains("cpus=2"), "{log}");
    let mem_kib: u64 = log
        .split("mem_kib=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no mem_kib in console: {log}"));
    assert!(
        (200_000..=262_144).contains(&mem_kib),
        "guest sees {mem_kib} KiB"
    );
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
}

#[test]
fn a_vmm_that_cannot_start_leaves_an_error_vm_and_no_process() {
    // A hypervisor binary that exits at once: the create fails in the middle.
    let d = Daemon::start_with(&[("HATCH_QEMU_BINARY", "/bin/false")]);
    let r = d.req("POST", "/vms", Some("{}"));
    assert_eq!(r.status, 500, "{}", r.text);
    assert!(r.error().contains("failed to start"), "{}", r.text);
    let vms = d.req("GET", "/vms", None).body;
    let vm = &vms.as_array().unwrap()[0];
    assert_eq!(
        vm["state"], "error",
        "the API reports the failure truthfully"
    );
    assert!(
        vm["last_error"].as_str().unwrap().contains("qemu exited"),
        "{vm}"
    );
    assert!(d.vmm_pids().is_empty());
    let id = vm["id"].as_str().unwrap();
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    assert!(!d.work_dir(id).exists());
}

/// Copies the test rootfs and puts an executable `/etc/hatch/rc.local` with
/// `script` into it (debugfs writes into the ext4 file without mounting it).
fn rootfs_with_rc_local(d: &Daemon, script: &str) -> std::path::PathBuf {
    let dir = d.data_dir.join("custom-image");
    std::fs::create_dir_all(&dir).unwrap();
    let rootfs = dir.join("rootfs.ext4");
    let cp = Command::new("cp")
        .arg("--sparse=always")
        .arg(image_dir().join("rootfs.ext4"))
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(cp.success());
    let rc = dir.join("rc.local");
    std::fs::write(&rc, format!("#!/bin/sh\n{script}\n")).unwrap();
    for req in [
        "mkdir /etc/hatch".to_string(),
        format!("write {} /etc/hatch/rc.local", rc.display()),
        "sif /etc/hatch/rc.local mode 0100755".to_string(),
    ] {
        let out = Command::new("debugfs")
            .args(["-w", "-R", &req])
            .arg(&rootfs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "debugfs {req}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    rootfs
}

#[test]
fn the_vm_state_follows_what_happens_to_the_guest() {
    let d = Daemon::start();
    // A guest that powers itself off once booted ends `stopped`, as if stopped through the API.
    let rootfs = rootfs_with_rc_local(&d, "echo powering-off-by-itself; poweroff");
    let image_id = &d.upload_test_image(&rootfs);
    let vm = d.create_vm(&format!(r#"{{"image_id": "{image_id}"}}"#));
    let id = vm["id"].as_str().unwrap().to_string();
    d.wait_console(&id, "powering-off-by-itself");
    wait_until("guest power-off recorded", BOOT_TIMEOUT, || {
        d.vm(&id)["state"] == "stopped"
    });
    assert!(d.vmm_pids_of(&id).is_empty());
    assert!(d.vm(&id).get("last_error").is_none());

    // A VMM that dies under the guest (here: SIGKILL from outside) is an error, with the reason.
    let vm2 = d.create_vm("{}");
    let id2 = vm2["id"].as_str().unwrap().to_string();
    d.wait_console(&id2, "hatch-guest: ready");
    d.kill_vmm(&id2);
    wait_until("VMM crash recorded", Duration::from_secs(30), || {
        d.vm(&id2)["state"] == "error"
    });
    let vm2 = d.vm(&id2);
    assert!(
        vm2["last_error"]
            .as_str()
            .unwrap()
            .contains("exited unexpectedly"),
        "{vm2}"
    );
    // From error the VM can be started again on the same disk.
    let r = d.req("POST", &format!("/vms/{id2}/start"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    d.wait_console(&id2, "hatch-guest: ready boot=2");
    for id in [&id, &id2] {
        assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    }
    assert!(d.vmm_pids().is_empty());
}

#[test]
fn stop_right_after_create_is_still_graceful() {
    // The guest is still booting and not yet listening for the power button;
    // the stop must still end in a clean guest shutdown, not a kill. The stop
    // timeout covers the rest of the boot as BOOT_TIMEOUT does.
    let d = Daemon::start_with(&[("HATCH_STOP_TIMEOUT", "120s")]);
    let id = d.create_vm("{}")["id"].as_str().unwrap().to_string();
    let r = d.req("POST", &format!("/vms/{id}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["state"], "stopped");
    let log = d.logs(&id);
    assert!(log.contains("hatch-guest: ready boot=1"), "{log}");
    assert!(log.contains("hatch-guest: shutting down"), "{log}");
    assert!(
        !d.daemon_log().contains("killing VMM"),
        "{}",
        d.daemon_log()
    );
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
}

/// A guest that counts in memory and prints each tick; `prelude` runs first.
fn ticking_vm(d: &Daemon, prelude: &str) -> String {
    let script = format!(
        "#!/bin/sh\n{prelude}\n(i=0; while true; do i=$((i+1)); echo \"tick $i\" > /dev/console; sleep 1; done) &\n"
    );
    let vm = d.create_vm(
        &json!({"enable_network": false, "mem_mib": 128, "user_data": script}).to_string(),
    );
    let id = vm["id"].as_str().unwrap().to_string();
    wait_until("ticks", BOOT_TIMEOUT, || last_tick(&d.logs(&id)) >= 2);
    id
}

/// `logs?follow=true` streams: a line the guest writes after the response
/// began arrives while the request is still open and the VM still runs.
#[test]
fn followed_logs_stream_lines_as_the_guest_writes_them() {
    let d = Daemon::start();
    let id = ticking_vm(&d, "");
    let mut follow = FollowedLogs::open(&d, &id);
    // The log so far comes first, while the VM runs ...
    follow.wait_for("the ready line", BOOT_TIMEOUT, |l| {
        l.contains("hatch-guest: ready boot=1")
    });
    // ... then lines the guest writes from now on, on the same response.
    let written = last_tick(&d.logs(&id));
    let line = follow.wait_for(
        &format!("a tick after {written}"),
        Duration::from_secs(60),
        |l| last_tick(l) > written,
    );
    assert!(follow.is_open(), "{line} came on the open request");
    assert_eq!(d.vm(&id)["state"], "running");
    let next = follow.wait_for("the tick after that", Duration::from_secs(60), |l| {
        last_tick(l) > last_tick(&line)
    });
    assert!(follow.is_open(), "{next} came on the open request");

    let r = d.req("POST", &format!("/vms/{id}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let (ok, lines) = follow.finish(Duration::from_secs(120));
    assert!(ok, "the stream ends cleanly with the VMM");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("hatch-guest: shutting down")),
        "{lines:?}"
    );
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
}

/// A guest that ignores the ACPI power button (its acpid is gone) keeps
/// running through HATCH_STOP_TIMEOUT, is then killed, and the VM is
/// reported stopped.
#[test]
fn a_guest_that_ignores_power_off_is_killed_after_the_stop_timeout() {
    let d = Daemon::start_with(&[("HATCH_STOP_TIMEOUT", "20s")]);
    let id = ticking_vm(
        &d,
        "killall acpid && echo hatch-test: acpid-gone > /dev/console",
    );
    d.wait_console(&id, "hatch-test: acpid-gone");

    let stopped = std::thread::scope(|s| {
        let stop = s.spawn(|| d.req("POST", &format!("/vms/{id}/stop"), None));
        // While stopping, the guest still runs: its counter goes on.
        wait_until("the VM to be stopping", Duration::from_secs(60), || {
            d.vm(&id)["state"] == "stopping"
        });
        let at_stop = last_tick(&d.logs(&id));
        let r = stop.join().unwrap();
        let log = d.logs(&id);
        assert!(
            last_tick(&log) >= at_stop + 2,
            "the guest ran on while the stop waited (tick {at_stop} when stopping): {log}"
        );
        r
    });
    assert_eq!(stopped.status, 200, "{}", stopped.text);
    assert_eq!(stopped.body["state"], "stopped");
    assert!(stopped.body.get("last_error").is_none(), "{}", stopped.text);
    assert!(d.vmm_pids_of(&id).is_empty(), "VMM gone after stop");
    // Killed, not shut down: the guest never ran its shutdown.
    let log = d.logs(&id);
    assert!(!log.contains("hatch-guest: shutting down"), "{log}");
    assert!(
        d.daemon_log_plain()
            .lines()
            .any(|l| l.contains("killing VMM")
                && l.contains(&format!("vm={id}"))
                && l.contains("graceful=true")),
        "{}",
        d.daemon_log_plain()
    );
    assert_eq!(d.vm(&id)["state"], "stopped");
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
}
