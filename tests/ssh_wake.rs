//! SSH that wakes (issue 14): while a VM sleeps, the daemon answers its
//! `ssh_port`, wakes it once for any number of waiting connections and
//! splices them to the guest's sshd. Real daemon in its own namespace, real
//! busybox guests, stock OpenSSH logging in with a certificate from
//! `POST /vms/{id}/connect`. Wakes are counted by the daemon's
//! `hatch_wakes_total{result="ok"}` (GET /metrics) and its log.

mod common;
use common::ssh::*;
use common::*;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "ssh-wake-test-token-0123456789abcdef";

/// Long enough to outlive a whole test on a loaded machine: the
/// certificate is taken once, while the VM runs (connect would wake it).
const CERT_TTL: &str = "2h";

fn daemon(extra: &[(&str, &str)]) -> Daemon {
    let mut env = vec![
        ("HATCH_METRICS_TOKEN", TOKEN),
        ("HATCH_SSH_CERT_TTL", CERT_TTL),
    ];
    env.extend_from_slice(extra);
    Daemon::start_with(&env)
}

/// One sample of `GET /metrics`, 0 when the series is not there yet.
fn metric(d: &Daemon, series: &str) -> f64 {
    d.metric_sample(TOKEN, series).unwrap_or(0.0)
}

fn wakes(d: &Daemon) -> f64 {
    metric(d, "hatch_wakes_total{result=\"ok\"}")
}

fn log_count(d: &Daemon, vm: &str, what: &str) -> usize {
    d.daemon_log()
        .lines()
        .filter(|l| l.contains(vm) && l.contains(what))
        .count()
}

fn state(d: &Daemon, id: &str) -> String {
    d.vm(id)["state"].as_str().unwrap().to_string()
}

/// Is something listening on TCP `port` in the daemon's namespace?
fn listening(d: &Daemon, port: u64) -> bool {
    let out = d.in_ns(None, &["ss", "-Hltn", &format!("sport = :{port}")]);
    assert!(out.status.success(), "ss: {out:?}");
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// Is the VM's SSH forward (DNAT) in the firewall?
fn forwarded(d: &Daemon, vm: &serde_json::Value) -> bool {
    d.nft_table()
        .contains(&format!("dport {} dnat to", vm["ssh_port"]))
}

fn id_and_port(vm: &serde_json::Value) -> (String, u64) {
    (
        vm["id"].as_str().unwrap().to_string(),
        vm["ssh_port"].as_u64().unwrap(),
    )
}

fn snapshot(d: &Daemon, id: &str) {
    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(state(d, id), "snapshotted");
}

#[test]
fn parallel_logins_wake_a_sleeping_vm_once_and_its_port_follows_its_sleep() {
    let mut d = daemon(&[]);
    let (key, public) = keypair(&d.data_dir);
    let vm = ready_vm(&d);
    let (id, port) = id_and_port(&vm);
    let cert = certify(&d, &vm, &key, &public).0;
    let creds = (key.as_path(), cert.as_path());
    let hostname = id.replace('_', "-");
    assert_eq!(
        d.ssh_cert_ok(creds, port, "hostname", BOOT_TIMEOUT).trim(),
        hostname
    );
    // Running: the forward answers, the daemon does not listen.
    assert!(forwarded(&d, &vm) && !listening(&d, port));

    snapshot(&d, &id);
    assert!(listening(&d, port), "asleep: the daemon answers the port");
    assert!(!forwarded(&d, &vm));
    assert_eq!(wakes(&d), 0.0);

    // 8 logins at once: one wake, every one of them reaches the guest.
    let logins: Vec<_> = (0..8)
        .map(|_| {
            let args = ssh_cert_args(&key, &cert, "agent@127.0.0.1", port, "echo $(hostname)");
            let ns = d.ns.clone();
            std::thread::spawn(move || {
                Command::new("ip")
                    .args(["netns", "exec", &ns])
                    .args(&args)
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for login in logins {
        let out = login.join().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(text.trim(), hostname);
    }
    assert_eq!(state(&d, &id), "running");
    assert_eq!(wakes(&d), 1.0, "one wake for 8 connections");
    assert_eq!(log_count(&d, &id, "vm woke on request"), 1);
    // Awake: the forward is back and the daemon's listener gone.
    assert!(forwarded(&d, &vm), "{}", d.nft_table());
    assert!(!listening(&d, port), "the listener outlived the wake");
    assert_eq!(
        d.ssh_cert_ok(creds, port, "hostname", BOOT_TIMEOUT).trim(),
        hostname
    );
    assert_eq!(wakes(&d), 1.0, "a login to a running VM wakes nothing");

    // Asleep again across a daemon restart: the listener is back at start
    // and wakes it.
    snapshot(&d, &id);
    assert!(listening(&d, port));
    d.terminate();
    d.restart();
    assert_eq!(state(&d, &id), "snapshotted");
    assert!(listening(&d, port), "no listener after the restart");
    let (ok, text) = d.ssh_cert(None, creds, "agent@127.0.0.1", port, "hostname");
    assert!(ok, "{text}");
    assert_eq!(text.trim(), hostname);
    assert_eq!(state(&d, &id), "running");
    assert_eq!(wakes(&d), 1.0);
    assert!(!listening(&d, port));

    // Deleted while asleep: its port is closed when the delete answers.
    snapshot(&d, &id);
    assert!(listening(&d, port));
    let r = d.req("DELETE", &format!("/vms/{id}"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!listening(&d, port), "the deleted VM's port is still open");
    let (ok, text) = d.ssh_cert(None, creds, "agent@127.0.0.1", port, "true");
    assert!(!ok && text.contains("Connection refused"), "{text}");
}

#[test]
fn an_ssh_session_spliced_by_the_daemon_keeps_idle_sleep_off() {
    let d = daemon(&[("HATCH_IDLE_CHECK_INTERVAL", "1s")]);
    let (key, public) = keypair(&d.data_dir);
    let vm = ready_vm(&d);
    let (id, port) = id_and_port(&vm);
    let cert = certify(&d, &vm, &key, &public).0;
    let creds = (key.as_path(), cert.as_path());
    d.ssh_cert_ok(creds, port, "true", BOOT_TIMEOUT);
    // Booting takes longer than a short timeout under TCG: set it now.
    let timeout = 8;
    let r = d.req(
        "PATCH",
        &format!("/vms/{id}"),
        Some(&json!({ "idle_timeout_seconds": timeout }).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    wait_until("idle sleep", Duration::from_secs(180), || {
        state(&d, &id) == "snapshotted"
    });
    assert!(listening(&d, port));

    // A session opened on the sleeping VM: the daemon wakes it and splices.
    let args = ssh_cert_args(
        &key,
        &cert,
        "agent@127.0.0.1",
        port,
        "echo open; sleep 45; echo done",
    );
    let mut session = Command::new("ip")
        .args(["netns", "exec", &d.ns])
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the session's wake", Duration::from_secs(120), || {
        state(&d, &id) == "running"
    });
    let woke = Instant::now();
    // Counted just after the VM shows running.
    wait_until("the wake counted", Duration::from_secs(10), || {
        wakes(&d) == 1.0
    });
    // Three timeouts while it is open: the VM keeps running.
    while woke.elapsed() < Duration::from_secs(3 * timeout) {
        assert_eq!(state(&d, &id), "running", "slept with a session open");
        assert!(
            session.try_wait().unwrap().is_none(),
            "the session ended early"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let out = session.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text, "open\ndone\n");
    // Closed: it sleeps again.
    wait_until(
        "idle sleep after the session",
        Duration::from_secs(120),
        || state(&d, &id) == "snapshotted",
    );
    assert!(listening(&d, port));
}

#[test]
fn only_allowed_sources_and_no_guest_reach_a_sleeping_vms_port() {
    // The client host (10.77.0.2) may use SSH; the host's own loopback not.
    // The guests' network is allowed too, as an operator might allow "the
    // internal addresses": a guest still reaches no forward and no listener.
    let mut d = daemon(&[("HATCH_SSH_ALLOWED_CIDRS", "10.77.0.2/32,172.16.0.0/24")]);
    let client = d.add_client();
    let bob = d.create_key(&["--name", "bob"]);
    let (key, public) = keypair(&d.data_dir);
    let vm = ready_vm(&d);
    let (id, port) = id_and_port(&vm);
    let cert = certify(&d, &vm, &key, &public).0;
    let creds = (key.as_path(), cert.as_path());
    let hostname = id.replace('_', "-");
    // Guests of alice (the sleeper's owner) and of bob, which root may
    // enter over SSH from the host.
    let script = format!(
        "#!/bin/sh\nmkdir -p /root/.ssh && echo '{public}' >> /root/.ssh/authorized_keys\n"
    );
    let guests: Vec<String> = [&d.key, &bob]
        .iter()
        .map(|k| {
            let vm = ready_vm_as(&d, k, json!({ "user_data": script }));
            vm["guest_ip"].as_str().unwrap().to_string()
        })
        .collect();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let out = loop {
        let (ok, text) = d.ssh_cert(Some(&client), creds, "agent@10.77.0.1", port, "hostname");
        if ok || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        out.trim(),
        hostname,
        "the allowed client through the forward"
    );

    snapshot(&d, &id);
    assert!(listening(&d, port));
    // Neither guest opens the port at any of the host's addresses: the
    // input chain drops it before the daemon sees it.
    for ip in &guests {
        for host in ["172.16.0.1", "10.77.0.1"] {
            let out = d.ssh_ok(
                None,
                &key,
                &format!("root@{ip}"),
                22,
                &format!("echo | timeout 8 nc {host} {port}; echo rc=$?"),
            );
            assert!(
                !out.contains("SSH-"),
                "guest {ip} reached {host}:{port}: {out}"
            );
        }
    }
    assert_eq!(state(&d, &id), "snapshotted", "a guest woke it");
    assert_eq!(wakes(&d), 0.0);
    // Every connection the daemon takes is logged ("refused a connection",
    // "closed a connection") or splices (and wakes): none did.
    assert_eq!(
        log_count(&d, &id, "a connection"),
        0,
        "a guest's connection reached the daemon:\n{}",
        d.daemon_log()
    );

    // The host's loopback is outside the allowed range: refused, no wake.
    let (ok, text) = d.ssh_cert(None, creds, "agent@127.0.0.1", port, "hostname");
    assert!(!ok && !text.contains(&hostname), "{text}");
    assert_eq!(state(&d, &id), "snapshotted");
    assert_eq!(wakes(&d), 0.0);
    assert_eq!(log_count(&d, &id, "SSH gateway refused a connection"), 1);

    // The allowed client wakes it.
    let (ok, text) = d.ssh_cert(Some(&client), creds, "agent@10.77.0.1", port, "hostname");
    assert!(ok, "{text}");
    assert_eq!(text.trim(), hostname);
    assert_eq!(wakes(&d), 1.0);
    assert_eq!(state(&d, &id), "running");
}
