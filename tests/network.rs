//! Networking end to end: every VM is a real host on the hatch bridge. All
//! traffic stays inside namespaces the tests make (the daemon's host, a
//! client host, an "upstream" with its own DNS name), never the real network.

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn ip_of(vm: &Value) -> String {
    vm["guest_ip"].as_str().unwrap().to_string()
}

fn port_of(vm: &Value) -> u16 {
    vm["ssh_port"].as_u64().unwrap() as u16
}

fn create_with_key(d: &Daemon, public: &str, extra: Value) -> Value {
    let mut body = json!({ "user_data": ssh_user_data("root", public) });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    d.create_vm(&body.to_string())
}

#[test]
fn guests_are_hosts_on_the_bridge_with_ssh_nat_and_dns() {
    let mut d = Daemon::start_with_upstream();
    let (key, public) = keypair(&d.data_dir);
    let a = create_with_key(&d, &public, json!({}));
    let b = create_with_key(
        &d,
        &public,
        json!({"guest_ip": "172.16.0.77", "guest_mac": "02:fc:00:00:00:77"}),
    );
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    assert_eq!(ip_of(&a), "172.16.0.10");
    assert_eq!(ip_of(&b), "172.16.0.77");
    assert_eq!(b["guest_mac"], "02:fc:00:00:00:77");
    assert_ne!(port_of(&a), port_of(&b));

    // The guest came up with its reserved address over DHCP, nobody logged in.
    let log = d.wait_console(a_id, "hatch-guest: ready");
    assert!(
        log.contains("hatch-guest: net eth0 172.16.0.10/24 gw 172.16.0.1"),
        "{log}"
    );
    assert!(log.contains("ip=172.16.0.10"), "{log}");
    d.wait_console(b_id, "ip=172.16.0.77");

    // Host -> guest, over the bridge: SSH (key from user data) and a TCP service.
    let target_a = format!("root@{}", ip_of(&a));
    let out = d.ssh_ok(None, &key, &target_a, 22, "hostname; cat /etc/resolv.conf");
    assert!(
        out.contains(&a_id.replace('_', "-")),
        "hostname from the seed: {out}"
    );
    assert!(
        out.contains("nameserver 172.16.0.1"),
        "DNS from DHCP: {out}"
    );
    d.ssh_ok(
        None,
        &key,
        &target_a,
        22,
        "mkdir -p /srv/www && echo served-by-a > /srv/www/index.html && httpd -p 8080 -h /srv/www",
    );
    let page = d.in_ns(
        None,
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "http://172.16.0.10:8080/index.html",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&page.stdout).trim(), "served-by-a");

    // Guest -> guest on the same bridge.
    let target_b = format!("root@{}", ip_of(&b));
    let out = d.ssh_ok(
        None,
        &key,
        &target_b,
        22,
        "wget -qO- http://172.16.0.10:8080/index.html",
    );
    assert_eq!(out.trim(), "served-by-a");

    // Guest -> the outside world by name, through NAT and the host's resolver.
    let out = d.ssh_ok(
        None,
        &key,
        &target_a,
        22,
        "wget -qO- http://upstream.test:8000/hello.txt",
    );
    assert_eq!(out.trim(), "hello from upstream");
    let out = d.ssh_ok(
        None,
        &key,
        &target_a,
        22,
        "nslookup upstream.test 2>&1 || true",
    );
    assert!(out.contains("10.88.0.2"), "{out}");

    // SSH through the forwarded host port: from the host itself and from another host.
    let out = d.ssh_ok(
        None,
        &key,
        "root@127.0.0.1",
        port_of(&a),
        "cat /etc/hostname",
    );
    assert_eq!(out.trim(), a_id.replace('_', "-"));
    let client = d.add_client();
    let out = d.ssh_ok(
        Some(&client),
        &key,
        "root@10.77.0.1",
        port_of(&b),
        "cat /etc/hostname",
    );
    assert_eq!(out.trim(), b_id.replace('_', "-"));
    let table = d.nft_table();
    assert!(
        table.contains(&format!("dport {} dnat to 172.16.0.10:22", port_of(&a))),
        "{table}"
    );
    // Both are plugged in: what "TAP gone" and "nothing left" below undo.
    d.assert_plugged_in(&a, true);
    d.assert_plugged_in(&b, true);

    // Conflicts: a taken address or MAC is 409 and creates nothing.
    let vms_before = d.req("GET", "/vms", None).body.as_array().unwrap().len();
    let taps_before = d.links("ht").len();
    for body in [
        json!({"guest_ip": "172.16.0.77"}),
        json!({"guest_mac": "02:FC:00:00:00:77"}),
    ] {
        let r = d.req("POST", "/vms", Some(&body.to_string()));
        assert_eq!(r.status, 409, "{body}: {}", r.text);
        assert!(r.error().contains("already in use"), "{}", r.text);
    }
    assert_eq!(
        d.req("GET", "/vms", None).body.as_array().unwrap().len(),
        vms_before
    );
    assert_eq!(d.links("ht").len(), taps_before);

    // Stop keeps the address but removes the forward; start brings it back.
    let stopped = d.req("POST", &format!("/vms/{a_id}/stop"), None);
    assert_eq!(stopped.status, 200, "{}", stopped.text);
    assert_eq!(ip_of(&stopped.body), "172.16.0.10");
    assert_eq!(port_of(&stopped.body), port_of(&a));
    assert!(
        !d.nft_table().contains("172.16.0.10:22"),
        "forward removed on stop"
    );
    assert!(
        !d.links("ht")
            .contains(&a["tap_name"].as_str().unwrap().to_string()),
        "TAP gone while stopped"
    );
    let (ok, _) = d.ssh(None, &key, "root@127.0.0.1", port_of(&a), "true");
    assert!(!ok, "no SSH to a stopped VM");
    assert_eq!(
        d.req("POST", &format!("/vms/{a_id}/start"), None).status,
        200
    );
    let out = d.ssh_ok(
        None,
        &key,
        "root@127.0.0.1",
        port_of(&a),
        "cat /var/lib/hatch/boot-count",
    );
    assert_eq!(out.trim(), "2");

    // Delete releases everything: TAPs, forwards, reservations.
    for id in [a_id, b_id] {
        d.assert_plugged_in(&d.vm(id), true);
    }
    for id in [a_id, b_id] {
        assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    }
    assert!(d.links("ht").is_empty(), "{:?}", d.links("ht"));
    let table = d.nft_table();
    assert!(!table.contains("dnat"), "{table}");
    let hosts = std::fs::read_to_string(d.data_dir.join("net/dhcp-hosts")).unwrap();
    assert_eq!(hosts, "", "reservations released");
}

#[test]
fn a_vm_without_networking_has_only_loopback() {
    let d = Daemon::start();
    let script = "#!/bin/sh\necho \"links: $(ls /sys/class/net | tr '\\n' ' ')\"\n";
    let vm = d.create_vm(&json!({"enable_network": false, "user_data": script}).to_string());
    for field in ["guest_ip", "guest_mac", "tap_name", "ssh_port"] {
        assert!(vm[field].is_null(), "{field}: {vm}");
    }
    let id = vm["id"].as_str().unwrap();
    let log = d.wait_console(id, "hatch-guest: ready");
    assert!(
        log.contains("links: lo \n") || log.contains("links: lo \r\n"),
        "{log}"
    );
    assert!(log.contains("ip=none"), "{log}");
    assert!(d.links("ht").is_empty(), "no TAP");
    assert!(!d.nft_table().contains("dnat"));
    let hosts = std::fs::read_to_string(d.data_dir.join("net/dhcp-hosts")).unwrap();
    assert_eq!(hosts, "", "no DHCP reservation");
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
}

#[test]
fn the_allowed_source_range_limits_ssh_forwards() {
    let mut d = Daemon::start_with(&[("HATCH_SSH_ALLOWED_CIDRS", "10.77.0.99/32")]);
    let (key, public) = keypair(&d.data_dir);
    let vm = create_with_key(&d, &public, json!({}));
    let client = d.add_client();
    // The guest itself answers (direct over the bridge)...
    d.ssh_ok(None, &key, &format!("root@{}", ip_of(&vm)), 22, "true");
    // ...but the forward is not there for a source outside the allowed range.
    let (ok, text) = d.ssh(Some(&client), &key, "root@10.77.0.1", port_of(&vm), "true");
    assert!(!ok, "10.77.0.2 is not allowed: {text}");
    assert!(d.nft_table().contains("10.77.0.99"));
    assert_eq!(
        d.req(
            "DELETE",
            &format!("/vms/{}", vm["id"].as_str().unwrap()),
            None
        )
        .status,
        200
    );
}

#[test]
fn allocations_survive_a_daemon_restart() {
    let mut d = Daemon::start();
    let (key, public) = keypair(&d.data_dir);
    let running = create_with_key(&d, &public, json!({}));
    let stopped = create_with_key(&d, &public, json!({}));
    let (r_id, s_id) = (
        running["id"].as_str().unwrap(),
        stopped["id"].as_str().unwrap(),
    );
    d.wait_console(s_id, "hatch-guest: ready");
    assert_eq!(
        d.req("POST", &format!("/vms/{s_id}/stop"), None).status,
        200
    );
    d.wait_console(r_id, "hatch-guest: ready");
    d.assert_plugged_in(&d.vm(r_id), true);

    d.kill9();
    d.restart();
    // The killed VM's TAP and forward are gone; its allocation is kept.
    wait_until("stale TAP removed", Duration::from_secs(10), || {
        d.links("ht").is_empty()
    });
    assert!(!d.nft_table().contains("dnat"));
    let after = d.vm(r_id);
    assert_eq!(after["state"], "error");
    assert_eq!(ip_of(&after), ip_of(&running));
    assert_eq!(port_of(&after), port_of(&running));

    // Nothing is handed out twice: a new VM gets a third address and port.
    let third = d.create_vm("{\"enable_network\": true}");
    let taken: Vec<String> = [&running, &stopped].iter().map(|v| ip_of(v)).collect();
    assert!(!taken.contains(&ip_of(&third)), "{third}");
    assert!(![port_of(&running), port_of(&stopped)].contains(&port_of(&third)));

    // Both old VMs start again on their own addresses and are reachable.
    for (id, vm) in [(r_id, &running), (s_id, &stopped)] {
        let r = d.req("POST", &format!("/vms/{id}/start"), None);
        assert_eq!(r.status, 200, "{}", r.text);
        let out = d.ssh_ok(
            None,
            &key,
            "root@127.0.0.1",
            port_of(vm),
            "cat /etc/hostname",
        );
        assert_eq!(out.trim(), id.replace('_', "-"));
        d.assert_plugged_in(&d.vm(id), true);
    }
    for id in [r_id, s_id, third["id"].as_str().unwrap()] {
        assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    }
    assert!(d.links("ht").is_empty());
    assert!(!d.nft_table().contains("dnat"));
}

/// A guest whose SSH host key was lost (as a VMM killed right after the
/// first boot can leave it: an empty file) makes a new one at its next boot,
/// so SSH works again instead of being refused for good.
#[test]
fn a_guest_whose_host_key_was_lost_makes_a_new_one_at_boot() {
    let d = Daemon::start();
    let (key, public) = keypair(&d.data_dir);
    let vm = create_with_key(&d, &public, json!({}));
    let id = vm["id"].as_str().unwrap();
    let port = port_of(&vm);
    let before = d.ssh_ok(
        None,
        &key,
        "root@127.0.0.1",
        port,
        "cat /etc/ssh/ssh_host_ed25519_key.pub; : > /etc/ssh/ssh_host_ed25519_key; sync",
    );
    assert!(before.starts_with("ssh-ed25519 "), "{before}");
    assert_eq!(d.req("POST", &format!("/vms/{id}/stop"), None).status, 200);
    assert_eq!(d.req("POST", &format!("/vms/{id}/start"), None).status, 200);
    let after = d.ssh_ok(
        None,
        &key,
        "root@127.0.0.1",
        port,
        "cat /etc/ssh/ssh_host_ed25519_key.pub",
    );
    assert!(after.starts_with("ssh-ed25519 "), "{after}");
    assert_ne!(before.trim(), after.trim(), "a new host key");
    assert!(!d.logs(id).contains("could not make the host key"));
}
