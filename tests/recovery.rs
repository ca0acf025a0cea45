//! Daemon restarts: after kill -9, VMs left in a transient state become
//! `error` and no VMM survives unaccounted for; stopped VMs stay stopped; a
//! graceful daemon shutdown powers guests off and records them stopped.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn kill_9_then_restart() {
    // The shutdown below is checked for the guests' own "shutting down": a
    // slow guest gets the time the harness gives a boot, not the default 30 s.
    let mut d = Daemon::start_with(&[("HATCH_STOP_TIMEOUT", "120s")]);
    let running = d.create_vm("{}")["id"].as_str().unwrap().to_string();
    let stopped = d.create_vm("{}")["id"].as_str().unwrap().to_string();
    d.wait_console(&running, "hatch-guest: ready boot=1");
    d.wait_console(&stopped, "hatch-guest: ready boot=1");
    assert_eq!(
        d.req("POST", &format!("/vms/{stopped}/stop"), None).status,
        200
    );

    d.kill9();
    // The VMM outlives the daemon (its own process group)...
    let orphans = d.vmm_pids_of(&running);
    assert_eq!(
        orphans.len(),
        1,
        "the running VM's QEMU is still there before restart"
    );

    d.restart();
    // ...and the restarted daemon accounts for it: killed, VM marked error (Hatch API).
    wait_until("orphan VMM killed", Duration::from_secs(10), || {
        d.vmm_pids().is_empty()
    });
    let vm = d.vm(&running);
    assert_eq!(vm["state"], "error", "{vm}");
    assert!(
        vm["last_error"].as_str().unwrap().contains("restarted"),
        "{vm}"
    );
    assert_eq!(d.vm(&stopped)["state"], "stopped");

    // Both can be started again from their disks.
    for id in [&running, &stopped] {
        let r = d.req("POST", &format!("/vms/{id}/start"), None);
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["state"], "running");
        assert!(
            r.body.get("last_error").is_none(),
            "error cleared on a good start: {}",
            r.text
        );
        d.wait_console(id, "hatch-guest: ready boot=2");
    }

    // Graceful daemon shutdown: guests are powered off and recorded stopped.
    // The console logs are appended to (the stopped VM's already says
    // "shutting down" from its first stop): only what comes after counts.
    let seen: Vec<usize> = [&running, &stopped]
        .iter()
        .map(|id| d.logs(id).len())
        .collect();
    d.terminate();
    assert!(
        d.vmm_pids().is_empty(),
        "no VMM outlives a graceful shutdown"
    );
    d.restart();
    for (id, seen) in [&running, &stopped].into_iter().zip(seen) {
        assert_eq!(d.vm(id)["state"], "stopped");
        let log = d.logs(id);
        let new = &log[seen..];
        assert!(
            new.contains("hatch-guest: shutting down"),
            "no new \"shutting down\" from the guest of {id}:\n{new}"
        );
    }
    for id in [&running, &stopped] {
        assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    }
    assert!(d.vmm_pids().is_empty());
}

#[test]
fn second_daemon_on_the_same_data_dir_is_refused() {
    let d = Daemon::start();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &d.ns])
        .arg(bin())
        .arg("serve")
        .env("HATCH_DATA_DIR", &d.data_dir)
        .env("HATCH_HTTP_ADDR", "127.0.0.1:8081")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another hatch daemon"));
    assert_eq!(
        d.req("GET", "/vms", None).status,
        200,
        "the first one is unharmed"
    );
}
