//! Network namespaces, scratch directories and a runtime inside a
//! namespace, for tests that build networks of their own; each is removed
//! when the test ends, also when it panics.
//!
//! Compiled twice: as `net::isolate::testing` in the library's unit tests
//! (dhcp, qemu), and as `netns` in tests/fork_isolation.rs, whose crate root
//! imports the library's `net` and `vmm` so the `crate::` paths below
//! resolve in both.

// Each crate that includes this file uses a part of it.
#![allow(dead_code)]

use crate::net::ipam::BridgeNet;
use crate::net::isolate::delete_netns;
use crate::net::NetConfig;
use crate::vmm::process::{kill_all_under, netns_path};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

/// The daemon's default network settings, for tests that set networking up for real.
pub fn test_net_config() -> NetConfig {
    NetConfig {
        bridge: "hatch0".into(),
        net: BridgeNet::parse("172.16.0.1/24").unwrap(),
        ssh_ports: (16000, 16999),
        ssh_allowed_sources: vec!["0.0.0.0/0".into()],
        guest_to_guest: Default::default(),
    }
}

/// A network namespace made for a test; deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    /// `hatch-t<pid>-<tag>`: unique among tests running at the same time.
    pub fn new(tag: &str) -> Netns {
        let name = format!("hatch-t{}-{tag}", std::process::id());
        let _ = delete_netns(&name);
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("running ip");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns(name)
    }

    /// `ip -n NAME ARGS`; panics when it fails, returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = self.try_ip(args);
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_ip(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("running ip")
    }

    /// Gives the namespace one interface `ifname` with `mac`, `cidr` and
    /// a default route via `gw`: a host on a LAN.
    pub fn host(&self, ifname: &str, mac: &str, cidr: &str, gw: &str) {
        self.ip(&["link", "set", "lo", "up"]);
        self.ip(&["link", "set", ifname, "address", mac]);
        self.ip(&["address", "add", cidr, "dev", ifname]);
        self.ip(&["link", "set", ifname, "up"]);
        self.ip(&["route", "add", "default", "via", gw]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = delete_netns(&self.0);
    }
}

/// Deletes a namespace made by the code under test, should the test end
/// before the code does.
pub struct NetnsCleanup(pub String);

impl Drop for NetnsCleanup {
    fn drop(&mut self) {
        let _ = delete_netns(&self.0);
    }
}

/// A scratch directory; processes naming it (dnsmasq, QEMU) are killed
/// and it is removed when dropped.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        let dir = std::env::temp_dir().join(format!("hatch-t{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        kill_all_under(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `body` on a thread inside the namespace `netns`, with a
/// single-threaded runtime of its own: everything the body creates
/// (netlink sockets, TAPs, child processes, blocking-pool threads,
/// which are spawned from it) lives in that namespace. Panics propagate.
pub fn block_on_in<F>(netns: &str, body: impl FnOnce() -> F + Send) -> F::Output
where
    F: std::future::Future,
    F::Output: Send,
{
    let ns = File::open(netns_path(netns)).unwrap();
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            // SAFETY: setns(2) with an open nsfs file; changes this thread only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(body())
        });
        match worker.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
