//! `GET /vms/{id}/metrics` end to end: a real daemon, a real QEMU guest, real
//! traffic into and out of it over SSH; the counters move the way a user
//! would expect, and only the VM's owner, only while it runs, can read them.

mod common;
use common::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bytes sent each way; far more than the handshake and ACKs of a session.
const PAYLOAD: u64 = 1 << 20;

fn metrics(d: &Daemon, id: &str) -> Value {
    let r = d.req("GET", &format!("/vms/{id}/metrics"), None);
    assert_eq!(r.status, 200, "{}\n{}", r.text, d.daemon_log());
    r.body
}

/// `v` without its `raw` part, for messages (the backend's answers are long).
fn brief(v: &Value) -> Value {
    let mut v = v.clone();
    v["raw"] = json!("...");
    v
}

fn n(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{path} is not a count in {v}"))
}

/// `ssh root@ip CMD` from the daemon's host with `stdin` fed in; the output
/// is thrown away. Panics unless it succeeds.
fn ssh_piped(d: &Daemon, key: &std::path::Path, ip: &str, cmd: &str, stdin: Stdio) {
    let out = Command::new("ip")
        .args(["netns", "exec", &d.ns, "ssh", "-i"])
        .arg(key)
        .args(ssh_options(5))
        .args([&format!("root@{ip}"), cmd])
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run ssh");
    assert!(
        out.status.success(),
        "ssh {cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_running_vms_metrics_follow_its_cpu_disk_network_and_memory() {
    let d = Daemon::start_with(&[("HATCH_IDLE_CHECK_INTERVAL", "500ms")]);
    let bob = d.create_key(&["--name", "bob"]);
    let (key, public) = keypair(&d.data_dir);
    let vm = d.create_vm(&json!({ "user_data": ssh_user_data("root", &public) }).to_string());
    let id = vm["id"].as_str().unwrap().to_string();
    let ip = vm["guest_ip"].as_str().unwrap().to_string();
    d.wait_console(&id, "hatch-guest: ready boot=1");
    // sshd answers: from here on, traffic is only what the test makes.
    d.ssh_ok(None, &key, &format!("root@{ip}"), 22, "true");

    // Only with a key, only the owner of a running VM; an id nobody has is a 404 too.
    let r = d.curl("GET", &format!("/vms/{id}/metrics"), &[], None);
    assert_eq!(r.status, 401, "{}", r.text);
    let r = d.as_key(&bob, "GET", &format!("/vms/{id}/metrics"), None);
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.error(), format!("vm {id} not found"));
    let r = d.req("GET", "/vms/vm_000000000000/metrics", None);
    assert_eq!(r.status, 404, "{}", r.text);

    let first = metrics(&d, &id);
    assert_eq!(first["vm_id"], id.as_str());
    assert_eq!(first["state"], "running");
    assert_eq!(first["hypervisor"], "qemu");
    assert_eq!(first["vcpu_count"], 1);
    assert_eq!(first["mem_mib"], 512);
    // The guest read its root disk to boot (the disk counters are the guest's own I/O).
    assert!(
        n(&first, "/block/read_bytes") > 1 << 20,
        "{}",
        brief(&first)
    );
    assert!(n(&first, "/block/read_ops") > 0, "{}", brief(&first));
    // The VMM holds at least the guest's touched memory.
    assert!(
        n(&first, "/memory/vmm_rss_bytes") > 16 << 20,
        "{}",
        brief(&first)
    );
    assert!(n(&first, "/vcpu/cpu_time_micros") > 0, "{}", brief(&first));
    let util = first["vcpu"]["utilization_percent"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&util), "{}", brief(&first));
    // The backend's own answers come along: one disk entry per drive (root
    // disk and cloud-init seed), and the TAP as the host counts it, which is
    // the guest's view swapped.
    let disks = first["raw"]["query-blockstats"]
        .as_array()
        .expect("raw blockstats");
    assert_eq!(disks.len(), 2, "{}", brief(&first));
    assert_eq!(first["raw"]["tap"]["name"], vm["tap_name"]);
    assert_eq!(
        n(&first, "/raw/tap/host_view/tx_bytes"),
        n(&first, "/net/rx_bytes")
    );
    assert_eq!(
        n(&first, "/raw/tap/host_view/rx_bytes"),
        n(&first, "/net/tx_bytes")
    );

    // The guest sends 1 MiB: its tx counters grow by that, its rx barely.
    ssh_piped(
        &d,
        &key,
        &ip,
        &format!(
            "dd if=/dev/urandom bs=1024 count={} 2>/dev/null",
            PAYLOAD / 1024
        ),
        Stdio::null(),
    );
    let second = metrics(&d, &id);
    let sent = n(&second, "/net/tx_bytes") - n(&first, "/net/tx_bytes");
    let got = n(&second, "/net/rx_bytes") - n(&first, "/net/rx_bytes");
    assert!(
        sent >= PAYLOAD,
        "guest sent {sent} bytes: {}",
        brief(&second)
    );
    assert!(got < sent / 4, "guest got {got}, sent {sent}");
    assert!(n(&second, "/net/tx_packets") > n(&first, "/net/tx_packets"));
    // Making that much traffic took the VMM CPU time.
    assert!(
        n(&second, "/vcpu/cpu_time_micros") > n(&first, "/vcpu/cpu_time_micros"),
        "{}\n{}",
        brief(&first),
        brief(&second)
    );

    // The guest receives 1 MiB: now rx grows by that, tx barely.
    let payload = d.data_dir.join("payload");
    let mut bytes = vec![0u8; PAYLOAD as usize];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut bytes,
    )
    .unwrap();
    std::fs::write(&payload, &bytes).unwrap();
    ssh_piped(
        &d,
        &key,
        &ip,
        "cat >/dev/null",
        std::fs::File::open(&payload).unwrap().into(),
    );
    let third = metrics(&d, &id);
    let got = n(&third, "/net/rx_bytes") - n(&second, "/net/rx_bytes");
    let sent = n(&third, "/net/tx_bytes") - n(&second, "/net/tx_bytes");
    assert!(got >= PAYLOAD, "guest got {got} bytes: {}", brief(&third));
    assert!(sent < got / 4, "guest sent {sent}, got {got}");
    assert!(n(&third, "/net/rx_packets") > n(&second, "/net/rx_packets"));
    assert!(n(&third, "/vcpu/cpu_time_micros") > n(&second, "/vcpu/cpu_time_micros"));
    assert!(n(&third, "/uptime_seconds") >= n(&first, "/uptime_seconds"));

    // A stopped VM has no VMM to ask.
    let r = d.req("POST", &format!("/vms/{id}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let r = d.req("GET", &format!("/vms/{id}/metrics"), None);
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.error().contains("is stopped"), "{}", r.text);

    // Reading metrics is not activity: a VM read every 300 ms still falls
    // asleep after its idle timeout, and reading it asleep does not wake it.
    let r = d.req("POST", &format!("/vms/{id}/start"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let r = d.req(
        "PATCH",
        &format!("/vms/{id}"),
        Some(r#"{"idle_timeout_seconds": 3}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = d.req("GET", &format!("/vms/{id}/metrics"), None);
        if r.status == 409 {
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(
            Instant::now() < deadline,
            "a VM whose metrics are read never fell asleep (or a read woke it): {}",
            d.vm(&id)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_until("the VM is asleep", Duration::from_secs(60), || {
        d.vm(&id)["state"] == "snapshotted"
    });
    for _ in 0..3 {
        let r = d.req("GET", &format!("/vms/{id}/metrics"), None);
        assert_eq!(r.status, 409, "{}", r.text);
        assert!(r.error().contains("is snapshotted"), "{}", r.text);
    }
    let asleep = d.vm(&id);
    assert_eq!(asleep["state"], "snapshotted");
    assert!(asleep["last_wake_at"].is_null(), "{asleep}");
    assert!(d.vmm_pids_of(&id).is_empty(), "no VMM while asleep");

    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
}
