//! Guests are untrusted (issue 10): on the shared bridge a guest reaches
//! its own owner's guests, DHCP and DNS on the host and the outside through
//! NAT, and nothing else: not another owner's guest, not another guest's
//! address (ARP or IP spoofing), not the host's loopback services or its
//! other addresses. Real guests under QEMU, driven over SSH with busybox
//! tools (wget, arping, ip, udhcpc, nslookup); the proxy and curl on the
//! daemon's host; an upstream namespace for "the outside".

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `#!` user-data script: root may log in with `public`, and busybox
/// httpd (started by the guest's rcS when /srv/www exists) serves `page`.
fn page_user_data(public: &str, page: &str) -> String {
    format!(
        "#!/bin/sh\n: <<'KEY'\n{public}\nKEY\nmkdir -p /srv/www\necho '{page}' >/srv/www/index.html\n"
    )
}

/// Creates a VM serving `page` as the owner of `key` and waits until its
/// user-data script has run.
fn page_vm(d: &Daemon, key: &str, public: &str, page: &str) -> Value {
    let body = json!({ "user_data": page_user_data(public, page) });
    common::ssh::ready_vm_as(d, key, body)
}

fn ip_of(vm: &Value) -> String {
    vm["guest_ip"].as_str().unwrap().to_string()
}

/// A process the test started in the daemon's namespace, killed when dropped.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// busybox httpd on the daemon's host at `addr`, serving `text` as /index.html.
fn host_server(d: &Daemon, addr: &str, text: &str) -> Helper {
    let www = d
        .data_dir
        .join(format!("host-www-{}", addr.replace([':', '.'], "-")));
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), format!("{text}\n")).unwrap();
    let child = Command::new("ip")
        .args([
            "netns", "exec", &d.ns, "busybox", "httpd", "-f", "-p", addr, "-h",
        ])
        .arg(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start busybox httpd on the host");
    let server = Helper(child);
    let url = format!("http://{addr}/index.html");
    wait_until(&format!("{url} answers"), Duration::from_secs(10), || {
        host_get(d, &url).trim() == text
    });
    server
}

/// curl on the daemon's host; the body, or "" when it failed.
fn host_get(d: &Daemon, url: &str) -> String {
    let out = d.in_ns(None, &["curl", "-sS", "--max-time", "10", url]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page for `host` through the proxy on the daemon's host.
fn via_proxy(d: &Daemon, host: &str) -> String {
    let resolve = format!("{host}:8081:127.0.0.1");
    let url = format!("http://{host}:8081/");
    let out = d.in_ns(
        None,
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            &resolve,
            &url,
        ],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` in the guest at `ip` as root, over SSH from the daemon's host.
fn in_guest(d: &Daemon, key: &Path, ip: &str, cmd: &str) -> String {
    d.ssh_ok(None, key, &format!("root@{ip}"), 22, cmd)
}

/// busybox wget from inside a guest, given 8 s (its own `-T` crashes in
/// busybox 1.35): what it printed
/// (page or error) and `rc=N`.
fn fetch_from_guest(d: &Daemon, key: &Path, guest: &str, url: &str) -> String {
    in_guest(
        d,
        key,
        guest,
        &format!("timeout 8 wget -qO- {url} 2>&1; echo rc=$?"),
    )
}

/// The MAC the daemon's host has in its neighbour table for `ip`.
fn host_neighbour(d: &Daemon, ip: &str) -> String {
    let out = d.in_ns(None, &["ip", "neigh", "show", ip]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn guests_of_another_owner_are_out_of_reach_and_their_address_cannot_be_taken() {
    let d = Daemon::start();
    let bob = d.create_key(&["--name", "bob"]);
    let (key, public) = keypair(&d.data_dir);
    let a1 = page_vm(&d, &d.key, &public, "alice-one");
    let a2 = page_vm(&d, &d.key, &public, "alice-two");
    let b = page_vm(&d, &bob, &public, "bob-private");
    let (a1_ip, a2_ip, b_ip) = (ip_of(&a1), ip_of(&a2), ip_of(&b));
    let b_mac = b["guest_mac"].as_str().unwrap().to_string();

    // The host reaches every guest; alice's guests reach each other.
    assert_eq!(
        host_get(&d, &format!("http://{b_ip}/")).trim(),
        "bob-private"
    );
    let out = fetch_from_guest(&d, &key, &a2_ip, &format!("http://{a1_ip}/"));
    assert!(out.contains("alice-one") && out.contains("rc=0"), "{out}");
    let out = fetch_from_guest(&d, &key, &a1_ip, &format!("http://{a2_ip}/"));
    assert!(out.contains("alice-two") && out.contains("rc=0"), "{out}");

    // Alice's guest does not reach bob's, neither directly nor through the
    // host as its gateway, nor through bob's SSH forward on the host.
    let out = fetch_from_guest(&d, &key, &a1_ip, &format!("http://{b_ip}/"));
    assert!(
        !out.contains("bob-private") && !out.contains("rc=0"),
        "{out}"
    );
    // Routed through the host both ways (both guests send to the gateway's
    // MAC and ignore the host's redirects), the bridge never sees a frame
    // between the two: the host's forwarding must stop it.
    let via_gateway = |peer: &str| {
        format!(
            "sysctl -qw net.ipv4.conf.all.accept_redirects=0 && \
             sysctl -qw net.ipv4.conf.eth0.accept_redirects=0 && \
             ip route replace {peer}/32 via 172.16.0.1 dev eth0 && ip route get {peer}"
        )
    };
    let out = in_guest(&d, &key, &b_ip, &via_gateway(&a1_ip));
    assert!(out.contains("via 172.16.0.1"), "{out}");
    let out = in_guest(&d, &key, &a1_ip, &via_gateway(&b_ip));
    assert!(out.contains("via 172.16.0.1"), "{out}");
    let out = fetch_from_guest(&d, &key, &a1_ip, &format!("http://{b_ip}/"));
    assert!(
        !out.contains("bob-private") && !out.contains("rc=0"),
        "{out}"
    );
    in_guest(&d, &key, &a1_ip, &format!("ip route del {b_ip}/32"));
    in_guest(&d, &key, &b_ip, &format!("ip route del {a1_ip}/32"));
    let port = b["ssh_port"].as_u64().unwrap();
    let out = in_guest(
        &d,
        &key,
        &a1_ip,
        &format!("echo | timeout 8 nc -w 5 172.16.0.1 {port} 2>&1; echo rc=$?"),
    );
    assert!(
        !out.contains("SSH-"),
        "bob's sshd answered alice's guest: {out}"
    );

    // Bob's page behind the proxy.
    let r = d.as_key(
        &bob,
        "POST",
        &format!("/vms/{}/routes", b["id"].as_str().unwrap()),
        Some(&json!({ "subdomain": "bsite", "target_port": 80 }).to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(via_proxy(&d, "bsite.localhost").trim(), "bob-private");
    assert!(host_neighbour(&d, &b_ip).contains(&b_mac));

    // Alice's guest claims bob's address: takes it on eth0, serves its own
    // page, announces it (gratuitous ARP requests and replies) again and
    // again and sends IPv4 from it, for as long as the checks below take.
    let spoof = format!(
        "echo HIJACKED >/srv/www/index.html; ip addr add {b_ip}/32 dev eth0 && \
         (i=0; while [ $i -lt 60 ]; do \
            arping -q -U -c 1 -I eth0 -s {b_ip} {b_ip}; \
            arping -q -A -c 1 -I eth0 -s {b_ip} {b_ip}; \
            ping -q -c 1 -W 1 -I {b_ip} 172.16.0.1; \
            i=$((i+1)); sleep 0.3; \
          done) >/dev/null 2>&1 </dev/null & \
         sleep 2; ip -4 addr show dev eth0"
    );
    let out = in_guest(&d, &key, &a1_ip, &spoof);
    assert!(
        out.contains(&format!("{b_ip}/32")),
        "the spoofer holds the address: {out}"
    );
    for _ in 0..5 {
        assert_eq!(via_proxy(&d, "bsite.localhost").trim(), "bob-private");
        assert_eq!(
            host_get(&d, &format!("http://{b_ip}/")).trim(),
            "bob-private"
        );
        let neigh = host_neighbour(&d, &b_ip);
        assert!(
            neigh.contains(&b_mac),
            "the host's ARP entry moved: {neigh}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // Alice's own guest is still hers, and bob's page still bob's for
    // alice's other guest, which ARP reaches only for its owner's guests.
    assert_eq!(host_get(&d, &format!("http://{a1_ip}/")).trim(), "HIJACKED");
    let out = fetch_from_guest(&d, &key, &a2_ip, &format!("http://{b_ip}/"));
    assert!(
        !out.contains("bob-private") && !out.contains("HIJACKED"),
        "{out}"
    );

    for vm in [&a1, &a2] {
        let r = d.req(
            "DELETE",
            &format!("/vms/{}", vm["id"].as_str().unwrap()),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let r = d.as_key(
        &bob,
        "DELETE",
        &format!("/vms/{}", b["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text);
}

#[test]
fn a_guest_reaches_dhcp_dns_and_the_outside_but_no_other_host_service() {
    let d = Daemon::start_with_upstream();
    let (key, public) = keypair(&d.data_dir);
    let vm = page_vm(&d, &d.key, &public, "guest");
    let ip = ip_of(&vm);
    // Services the host binds to its loopback (besides the daemon's API on
    // 127.0.0.1:8080) and to all its addresses.
    let _local = host_server(&d, "127.0.0.1:7777", "host-loopback-secret");
    let _any = host_server(&d, "0.0.0.0:7778", "host-any-secret");

    // DHCP (a fresh discover from 0.0.0.0, the lease not applied), DNS
    // through the host's dnsmasq, the outside through NAT.
    let out = in_guest(
        &d,
        &key,
        &ip,
        "udhcpc -n -q -f -t 5 -T 1 -i eth0 -s /bin/true >/dev/null 2>&1; echo rc=$?",
    );
    assert!(out.contains("rc=0"), "DHCP: {out}");
    let out = in_guest(
        &d,
        &key,
        &ip,
        "nslookup upstream.test 172.16.0.1 2>&1; true",
    );
    assert!(out.contains("10.88.0.2"), "DNS: {out}");
    let out = fetch_from_guest(&d, &key, &ip, "http://upstream.test:8000/hello.txt");
    assert!(out.contains("hello from upstream"), "NAT: {out}");

    // The host's other addresses: the bridge's own, the upstream side's.
    for addr in ["172.16.0.1", "10.88.0.1"] {
        let out = fetch_from_guest(&d, &key, &ip, &format!("http://{addr}:7778/"));
        assert!(
            !out.contains("host-any-secret") && !out.contains("rc=0"),
            "{addr}: {out}"
        );
        let out = fetch_from_guest(&d, &key, &ip, &format!("http://{addr}:8080/vms"));
        assert!(!out.contains("HTTP/"), "the API answered at {addr}: {out}");
    }

    // The host's loopback, which the bridge's route_localnet makes routable:
    // the guest gives up its own 127/8, routes it to its gateway and lets
    // eth0 carry it.
    let prep = "sysctl -qw net.ipv4.conf.eth0.route_localnet=1 && ip addr flush dev lo && \
                ip route add 127.0.0.0/8 via 172.16.0.1 dev eth0 && ip route get 127.0.0.1";
    let out = in_guest(&d, &key, &ip, prep);
    assert!(out.contains("via 172.16.0.1 dev eth0"), "{out}");
    let out = fetch_from_guest(&d, &key, &ip, "http://127.0.0.1:7777/");
    assert!(
        !out.contains("host-loopback-secret") && !out.contains("rc=0"),
        "{out}"
    );
    let out = fetch_from_guest(&d, &key, &ip, "http://127.0.0.1:8080/vms");
    assert!(!out.contains("HTTP/"), "the API answered a guest: {out}");
    // Still: the host's own clients reach both, and the guest its DNS.
    assert_eq!(
        host_get(&d, "http://127.0.0.1:7777/").trim(),
        "host-loopback-secret"
    );
    let out = in_guest(
        &d,
        &key,
        &ip,
        "nslookup upstream.test 172.16.0.1 2>&1; true",
    );
    assert!(out.contains("10.88.0.2"), "DNS: {out}");

    // SSH to the guest through its forward on the host's loopback still works.
    let port = vm["ssh_port"].as_u64().unwrap() as u16;
    let out = d.ssh_ok(None, &key, "root@127.0.0.1", port, "hostname");
    assert_eq!(out.trim(), vm["id"].as_str().unwrap().replace('_', "-"));
}

#[test]
fn with_guest_to_guest_none_even_one_owners_guests_are_apart() {
    let d = Daemon::start_with(&[("HATCH_GUEST_TO_GUEST", "none")]);
    let (key, public) = keypair(&d.data_dir);
    let a1 = page_vm(&d, &d.key, &public, "alice-one");
    let a2 = page_vm(&d, &d.key, &public, "alice-two");
    let (a1_ip, a2_ip) = (ip_of(&a1), ip_of(&a2));
    assert_eq!(
        host_get(&d, &format!("http://{a2_ip}/")).trim(),
        "alice-two"
    );
    let out = fetch_from_guest(&d, &key, &a1_ip, &format!("http://{a2_ip}/"));
    assert!(!out.contains("alice-two") && !out.contains("rc=0"), "{out}");
    let out = fetch_from_guest(&d, &key, &a2_ip, &format!("http://{a1_ip}/"));
    assert!(!out.contains("alice-one") && !out.contains("rc=0"), "{out}");
}
