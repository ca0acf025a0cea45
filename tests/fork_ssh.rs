//! exec and connect on forks, against real busybox guests: a fork resumed
//! from a Standby snapshot starts out trusting its source's id (its memory
//! is the source's), and the daemon tells it its own before the fork or its
//! first wake returns. Then exec runs in the fork (its own machine), stock
//! OpenSSH logs in with a `connect` certificate for the fork, and each of
//! the fork and its source refuses the other's certificate. Also for a fork
//! kept in Standby and woken by exec, and for a fork of a fork.

mod common;
use common::ssh::certify;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

/// `POST /vms/{vm}/exec` of a shell line; asserts the 200 and answers
/// (stdout, exit code).
fn exec(d: &Daemon, vm: &str, command: &str) -> (String, i64) {
    let r = d.req(
        "POST",
        &format!("/vms/{vm}/exec"),
        Some(&json!({ "command": command }).to_string()),
    );
    assert_eq!(
        r.status,
        200,
        "exec {command:?} on {vm}: {}\n{}",
        r.text,
        d.daemon_log()
    );
    (
        r.body["stdout"].as_str().unwrap().to_string(),
        r.body["exit_code"].as_i64().unwrap(),
    )
}

/// A Standby snapshot of `vm` (which keeps running).
fn standby(d: &Daemon, vm: &str) -> String {
    let r = d.req(
        "POST",
        &format!("/instances/{vm}/snapshots"),
        Some(r#"{"kind": "Standby"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    id_of(&r.body)
}

/// Hypeman's fork of `snap`, named `name`, to `target` (Running or Standby).
fn fork(d: &Daemon, snap: &str, name: &str, target: &str) -> Value {
    let r = d.req(
        "POST",
        &format!("/snapshots/{snap}/fork"),
        Some(&json!({ "name": name, "target_state": target }).to_string()),
    );
    assert_eq!(r.status, 201, "fork {snap}: {}\n{}", r.text, d.daemon_log());
    r.body
}

/// A `connect` certificate for `vm`, written where `ssh` can read it.
fn certificate(d: &Daemon, vm: &Value, key: &Path, public: &str) -> PathBuf {
    certify(d, vm, key, public).0
}

/// Stock OpenSSH with `key` and `cert` to the VM's forwarded SSH port, from
/// the daemon's namespace. Answers (success, stdout + stderr).
fn ssh_cert(d: &Daemon, key: &Path, cert: &Path, vm: &Value, cmd: &str) -> (bool, String) {
    let port = vm["ssh_port"].as_u64().unwrap();
    d.ssh_cert(None, (key, cert), "agent@127.0.0.1", port, cmd)
}

/// The VM's guest answers `cmd` over OpenSSH with `cert` (retried: a
/// forward may be a moment behind the VM).
fn logs_in(d: &Daemon, key: &Path, cert: &Path, vm: &Value, cmd: &str) -> String {
    let port = vm["ssh_port"].as_u64().unwrap();
    d.ssh_cert_ok((key, cert), port, cmd, Duration::from_secs(10))
}

/// The VM's guest refuses `cert` (sshd's "Permission denied", not a network error).
fn refuses(d: &Daemon, key: &Path, cert: &Path, vm: &Value, why: &str) {
    let (ok, text) = ssh_cert(d, key, cert, vm, "echo logged-in");
    assert!(
        !ok && !text.contains("logged-in"),
        "{why}: logged in: {text}"
    );
    assert!(text.contains("Permission denied"), "{why}: {text}");
}

/// A running, networked busybox VM whose guest is up, marked `source` on disk.
fn source(d: &Daemon) -> Value {
    let vm = d.create_vm("{}");
    let id = id_of(&vm);
    d.wait_console(&id, "hatch-guest: ready");
    assert_eq!(exec(d, &id, "echo source > /tmp/who").1, 0);
    vm
}

/// What a fork of `src` must show: exec runs in it (it has the snapshot's
/// `/tmp/who`, holding `who`), as a machine of its own (what it writes is
/// not in `src`); its guest names only its own id; a certificate for it logs
/// in with OpenSSH; `src` and the fork each refuse the other's.
fn check_fork(d: &Daemon, key: &Path, public: &str, fork: &Value, src: &Value, who: &str) {
    let (fid, sid) = (id_of(fork), id_of(src));
    let (out, code) = exec(d, &fid, "cat /tmp/who; id -un");
    assert_eq!(
        (out, code),
        (format!("{who}\nagent\n"), 0),
        "the snapshot's disk and memory"
    );
    let marker = format!("/tmp/made-in-{fid}");
    assert_eq!(exec(d, &fid, &format!("touch {marker}")).1, 0);
    assert_eq!(exec(d, &fid, &format!("test -e {marker}")).1, 0);
    assert_eq!(
        exec(d, &sid, &format!("test -e {marker}")).1,
        1,
        "what the fork wrote is in its source"
    );
    let (principals, _) = exec(d, &fid, "cat /etc/ssh/hatch/principals/agent");
    assert_eq!(
        principals,
        format!("{fid}\n"),
        "the fork's guest still trusts another id"
    );

    let fork_cert = certificate(d, fork, key, public);
    let src_cert = certificate(d, src, key, public);
    let out = logs_in(
        d,
        key,
        &fork_cert,
        fork,
        &format!("id -un; test -e {marker} && echo fork"),
    );
    assert_eq!(out, "agent\nfork\n");
    refuses(
        d,
        key,
        &src_cert,
        fork,
        "the source's certificate on the fork",
    );
    refuses(
        d,
        key,
        &fork_cert,
        src,
        "the fork's certificate on its source",
    );
    // The source is untouched: its own certificate still logs in there.
    assert_eq!(
        logs_in(d, key, &src_cert, src, "cat /tmp/who"),
        format!("{who}\n")
    );
}

#[test]
fn a_running_fork_and_a_fork_of_it_answer_exec_and_connect_as_themselves() {
    let d = Daemon::start();
    let (key, public) = keypair(&d.data_dir);
    let src = source(&d);
    let snap = standby(&d, &id_of(&src));

    let first = fork(&d, &snap, "first", "Running");
    assert_eq!(first["state"], "running");
    check_fork(&d, &key, &public, &first, &src, "source");

    // A fork of the fork: its memory trusts the first fork's id by now.
    let fid = id_of(&first);
    assert_eq!(exec(&d, &fid, "echo first > /tmp/who").1, 0);
    let snap2 = standby(&d, &fid);
    let second = fork(&d, &snap2, "second", "Running");
    let (out, _) = exec(&d, &id_of(&second), "cat /tmp/who");
    assert_eq!(out, "first\n");
    check_fork(&d, &key, &public, &second, &first, "first");
}

#[test]
fn a_fork_kept_in_standby_learns_its_id_when_exec_wakes_it() {
    let d = Daemon::start();
    let (key, public) = keypair(&d.data_dir);
    let src = source(&d);
    let snap = standby(&d, &id_of(&src));

    let sleeper = fork(&d, &snap, "sleeper", "Standby");
    assert_eq!(sleeper["state"], "snapshotted");
    let sid = id_of(&sleeper);
    // The first exec wakes it (and it answers from the source's memory).
    let (out, code) = exec(&d, &sid, "cat /tmp/who");
    assert_eq!((out.as_str(), code), ("source\n", 0));
    assert_eq!(d.vm(&sid)["state"], "running");
    check_fork(&d, &key, &public, &d.vm(&sid), &src, "source");
}

/// A Standby snapshot taken right after create holds a guest that has not
/// yet asked DHCP for its address nor read its seed. Its fork finishes that
/// boot behind its isolation: it must get the address its memory belongs to
/// (the source's, translated to the fork's own outside) and trust the
/// principal the daemon signs for, then learn its own id like any fork.
#[test]
fn a_fork_of_a_vm_snapshotted_while_it_booted_finishes_its_boot_reachable() {
    let d = Daemon::start();
    let (key, public) = keypair(&d.data_dir);
    let src = d.create_vm("{}");
    let sid = id_of(&src);
    let snap = standby(&d, &sid);
    d.wait_console(&sid, "hatch-guest: ready");

    let early = fork(&d, &snap, "early", "Running");
    let fid = id_of(&early);
    let console = d.wait_console(&fid, "hatch-guest: ready");
    // The fork's guest, not its source's, read the seed and asked DHCP: the
    // snapshot was taken before either happened.
    assert!(
        console.contains(&format!("cidata applied instance-id={fid}.resumed")),
        "the fork's guest read its seed after the restore:\n{console}"
    );
    assert!(
        console.contains(&format!("ip={}", src["guest_ip"].as_str().unwrap())),
        "the fork's guest has the address its memory belongs to:\n{console}"
    );
    // The snapshot has no /tmp/who: both write the one check_fork reads.
    assert_eq!(exec(&d, &fid, "echo early > /tmp/who").1, 0);
    assert_eq!(exec(&d, &sid, "echo early > /tmp/who").1, 0);
    check_fork(&d, &key, &public, &d.vm(&fid), &src, "early");

    // A fresh boot of the fork reads a seed that says who it is: its own
    // instance (cloud-init applies it in full), address and principal.
    for step in ["stop", "start"] {
        let r = d.req("POST", &format!("/vms/{fid}/{step}"), None);
        assert_eq!(r.status, 200, "{step}: {}", r.text);
    }
    let console = d.wait_console(&fid, "hatch-guest: ready boot=2");
    let own_ip = early["guest_ip"].as_str().unwrap();
    assert!(
        console
            .lines()
            .any(|l| l.trim_end() == format!("hatch-guest: cidata applied instance-id={fid}"))
            && console.contains(&format!("ip={own_ip}")),
        "the fork's fresh boot:\n{console}"
    );
    let (principals, _) = exec(&d, &fid, "cat /etc/ssh/hatch/principals/agent");
    assert_eq!(principals, format!("{fid}\n"));
    let fork_cert = certificate(&d, &early, &key, &public);
    assert_eq!(logs_in(&d, &key, &fork_cert, &early, "id -un"), "agent\n");
}
