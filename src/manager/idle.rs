//! Idle sleep: what counts as activity on a VM (requests through the proxy,
//! open SSH connections), and the monitor that puts idle VMs to standby.

use super::requests::{CreateSnapshot, SnapshotKind};
use super::state::VmState;
use super::Manager;
use crate::store::Vm;
use crate::telemetry::Operation;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tag on the snapshots idle sleep takes. Such a snapshot only carries
/// the VM through its sleep: it is deleted once the VM resumed from it.
pub const SLEEP_TAG: (&str, &str) = ("hatch.sleep", "idle");

/// Is `snap` one idle sleep took?
pub fn is_sleep_snapshot(snap: &crate::store::Snapshot) -> bool {
    snap.tags.get(SLEEP_TAG.0).map(String::as_str) == Some(SLEEP_TAG.1)
}

/// What the proxy and the monitor know about one VM's traffic.
#[derive(Debug)]
struct VmActivity {
    /// Proxied requests (and upgraded connections) open now.
    inflight: u32,
    /// The last time the VM was seen busy (or started running).
    last: Instant,
    /// Capture in progress: requests must wait for a wake instead of
    /// reaching a guest that is about to be paused and stopped.
    pausing: u32,
}

impl VmActivity {
    fn new() -> VmActivity {
        VmActivity {
            inflight: 0,
            last: Instant::now(),
            pausing: 0,
        }
    }
}

/// Activity of every VM, shared by the proxy (which counts requests) and the
/// idle monitor (which reads it). Kept in memory: after a daemon restart
/// every running VM's idle clock starts again.
#[derive(Debug, Default)]
pub struct ActivityTable {
    vms: Mutex<HashMap<String, VmActivity>>,
    /// Told the id of a VM whose last `Pausing` ended (the SSH gateway
    /// gives its port back to the forward if the VM runs on).
    pause_ended: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<String>>,
}

/// An open proxied request; the VM counts as busy until it is dropped.
pub struct Busy {
    table: Arc<ActivityTable>,
    vm_id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut vms = self.table.vms.lock().unwrap();
        if let Some(a) = vms.get_mut(&self.vm_id) {
            a.inflight = a.inflight.saturating_sub(1);
            a.last = Instant::now();
        }
    }
}

/// While held, requests for the VM wait for a wake (see `VmActivity::pausing`).
pub struct Pausing {
    table: Arc<ActivityTable>,
    vm_id: String,
}

impl Drop for Pausing {
    fn drop(&mut self) {
        let mut vms = self.table.vms.lock().unwrap();
        if let Some(a) = vms.get_mut(&self.vm_id) {
            a.pausing = a.pausing.saturating_sub(1);
            if a.pausing == 0 {
                if let Some(tx) = self.table.pause_ended.get() {
                    let _ = tx.send(self.vm_id.clone());
                }
            }
        }
    }
}

impl ActivityTable {
    /// Counts a request for a VM whose guest runs; None while it is being paused.
    pub fn enter(self: &Arc<Self>, vm_id: &str) -> Option<Busy> {
        let mut vms = self.vms.lock().unwrap();
        let a = vms.entry(vm_id.to_string()).or_insert_with(VmActivity::new);
        if a.pausing > 0 {
            return None;
        }
        a.inflight += 1;
        a.last = Instant::now();
        Some(Busy {
            table: Arc::clone(self),
            vm_id: vm_id.to_string(),
        })
    }

    /// The VM was busy just now (it started running, or has an SSH session).
    pub fn touch(&self, vm_id: &str) {
        let mut vms = self.vms.lock().unwrap();
        vms.entry(vm_id.to_string())
            .or_insert_with(VmActivity::new)
            .last = Instant::now();
    }

    /// Marks the VM as being paused, unconditionally (a snapshot was asked for).
    pub fn pause(self: &Arc<Self>, vm_id: &str) -> Pausing {
        let mut vms = self.vms.lock().unwrap();
        vms.entry(vm_id.to_string())
            .or_insert_with(VmActivity::new)
            .pausing += 1;
        Pausing {
            table: Arc::clone(self),
            vm_id: vm_id.to_string(),
        }
    }

    /// Marks the VM as being paused if it has been idle for `timeout` with no
    /// request open: checked and marked at once, so no request slips in between.
    fn pause_if_idle(self: &Arc<Self>, vm_id: &str, timeout: Duration) -> Option<Pausing> {
        let mut vms = self.vms.lock().unwrap();
        let a = vms.entry(vm_id.to_string()).or_insert_with(VmActivity::new);
        if a.inflight > 0 || a.last.elapsed() < timeout {
            return None;
        }
        a.pausing += 1;
        Some(Pausing {
            table: Arc::clone(self),
            vm_id: vm_id.to_string(),
        })
    }

    /// How long the VM has been idle (zero while a request is open).
    fn idle_for(&self, vm_id: &str) -> Duration {
        let mut vms = self.vms.lock().unwrap();
        let a = vms.entry(vm_id.to_string()).or_insert_with(VmActivity::new);
        if a.inflight > 0 {
            Duration::ZERO
        } else {
            a.last.elapsed()
        }
    }

    /// Is the VM being paused for a capture now?
    pub fn is_pausing(&self, vm_id: &str) -> bool {
        let vms = self.vms.lock().unwrap();
        vms.get(vm_id).is_some_and(|a| a.pausing > 0)
    }

    /// Where to say that a VM's last `Pausing` ended (set once).
    pub fn on_pause_end(&self, tx: tokio::sync::mpsc::UnboundedSender<String>) {
        let _ = self.pause_ended.set(tx);
    }

    pub fn forget(&self, vm_id: &str) {
        self.vms.lock().unwrap().remove(vm_id);
    }
}

/// The idle timeout that applies to `vm`, if any: none when it opted out,
/// else its own, else the server's.
pub fn idle_timeout_of(
    auto_sleep: bool,
    own_seconds: Option<i64>,
    server: Option<Duration>,
) -> Option<Duration> {
    if !auto_sleep {
        return None;
    }
    match own_seconds {
        Some(s) if s > 0 => Some(Duration::from_secs(s as u64)),
        _ => server,
    }
}

/// Guest addresses with an established TCP connection to their port 22, from
/// the connection tracking table of the daemon's network namespace (the SSH
/// port forwards are DNAT rules, so every forwarded session is tracked there,
/// as is a direct connection from the host). None when the table cannot be read.
fn ssh_sessions() -> Option<Vec<Ipv4Addr>> {
    let text = std::fs::read_to_string("/proc/net/nf_conntrack").ok()?;
    Some(parse_ssh_sessions(&text))
}

/// Parses `/proc/net/nf_conntrack`: for established TCP entries, the reply
/// direction's source is the server; port 22 there is an SSH session.
fn parse_ssh_sessions(text: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if !fields.contains(&"tcp") || !fields.contains(&"ESTABLISHED") {
            continue;
        }
        // Original direction first, reply second: the second src=/sport= pair.
        let srcs: Vec<&str> = fields
            .iter()
            .filter_map(|f| f.strip_prefix("src="))
            .collect();
        let sports: Vec<&str> = fields
            .iter()
            .filter_map(|f| f.strip_prefix("sport="))
            .collect();
        if let (Some(src), Some(&"22")) = (srcs.get(1), sports.get(1)) {
            if let Ok(ip) = src.parse() {
                out.push(ip);
            }
        }
    }
    out
}

impl Manager {
    /// Runs forever: every HATCH_IDLE_CHECK_INTERVAL, puts to standby each
    /// running VM that has had no proxied request and no SSH session for its
    /// idle timeout.
    pub async fn idle_monitor(self: Arc<Self>) {
        let interval = self.config.idle.check_interval;
        let mut warned = false;
        loop {
            tokio::time::sleep(interval).await;
            let vms = match self.store.all_vms().await {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!("idle check: reading VMs: {e}");
                    continue;
                }
            };
            let candidates: Vec<(Vm, Duration)> = vms
                .into_iter()
                .filter(|v| v.state == VmState::Running)
                .filter_map(|v| {
                    let t = idle_timeout_of(
                        v.auto_sleep,
                        v.idle_timeout_seconds,
                        self.config.idle.timeout,
                    )?;
                    Some((v, t))
                })
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let sessions = ssh_sessions();
            if sessions.is_none() && !warned {
                warned = true;
                tracing::warn!(
                    "idle check: /proc/net/nf_conntrack is not readable; open SSH sessions cannot keep VMs awake"
                );
            }
            for (vm, timeout) in candidates {
                if let (Some(ip), Some(sessions)) = (vm.guest_ip, &sessions) {
                    if sessions.contains(&ip) {
                        self.activity.touch(&vm.id);
                        continue;
                    }
                }
                if self.activity.idle_for(&vm.id) < timeout {
                    continue;
                }
                let mgr = Arc::clone(&self);
                // One task per VM: a slow capture does not hold up the others.
                tokio::spawn(async move { mgr.sleep_if_idle(&vm.id, timeout).await });
            }
        }
    }

    /// Puts `vm_id` to standby if it is still running and idle once its lock is held.
    async fn sleep_if_idle(self: &Arc<Self>, vm_id: &str, timeout: Duration) {
        let _guard = self.lock_vm(vm_id).await;
        let Ok(Some(mut vm)) = self.store.get_vm(vm_id).await else {
            return;
        };
        if vm.state != VmState::Running {
            return;
        }
        let Some(_pausing) = self.activity.pause_if_idle(vm_id, timeout) else {
            return;
        };
        let idle = self.activity.idle_for(vm_id);
        let req = CreateSnapshot {
            kind: Some("Standby".into()),
            tags: Some([(SLEEP_TAG.0.to_string(), SLEEP_TAG.1.to_string())].into()),
            ..Default::default()
        };
        let sleep = self.snapshot_locked(
            &mut vm,
            SnapshotKind::Standby,
            &req,
            super::quotas::SnapshotQuota::Sleep,
        );
        let slept = self.telemetry.time(Operation::Snapshot, sleep).await;
        self.telemetry.slept(slept.is_ok());
        match slept {
            Ok(snap) => {
                let at = self.store.mark_vm_sleep_or_wake(vm_id, true).await;
                tracing::info!(
                    vm = vm_id,
                    snapshot = %snap.id,
                    idle_secs = idle.as_secs(),
                    at = at.as_deref().unwrap_or("?"),
                    "vm put to sleep: idle"
                );
            }
            Err(e) => {
                // Tried again after a full timeout, not at every check.
                self.activity.touch(vm_id);
                tracing::error!(vm = vm_id, "idle sleep failed, the VM keeps running: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_sessions_come_from_established_entries_to_port_22() {
        let table = "\
ipv4     2 tcp      6 431999 ESTABLISHED src=10.77.0.2 dst=10.77.0.1 sport=40000 dport=16000 src=172.16.0.10 dst=10.77.0.2 sport=22 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 117 TIME_WAIT src=10.77.0.2 dst=10.77.0.1 sport=40002 dport=16001 src=172.16.0.11 dst=10.77.0.2 sport=22 dport=40002 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=172.16.0.12 sport=50000 dport=80 src=172.16.0.12 dst=127.0.0.1 sport=80 dport=50000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 20 src=172.16.0.13 dst=172.16.0.1 sport=22 dport=53 src=172.16.0.1 dst=172.16.0.13 sport=53 dport=22 mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=172.16.0.1 dst=172.16.0.14 sport=41000 dport=22 src=172.16.0.14 dst=172.16.0.1 sport=22 dport=41000 [ASSURED] mark=0 zone=0 use=2
";
        let ips: Vec<String> = parse_ssh_sessions(table)
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ips, ["172.16.0.10", "172.16.0.14"]);
    }

    #[test]
    fn idle_timeout_precedence() {
        let server = Some(Duration::from_secs(600));
        assert_eq!(idle_timeout_of(true, None, server), server);
        assert_eq!(idle_timeout_of(true, None, None), None);
        assert_eq!(
            idle_timeout_of(true, Some(5), None),
            Some(Duration::from_secs(5))
        );
        assert_eq!(idle_timeout_of(false, Some(5), server), None);
    }

    #[test]
    fn the_end_of_the_last_pause_is_told_once() {
        let t = Arc::new(ActivityTable::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        t.on_pause_end(tx);
        // A checkpoint's pause around its capture's own.
        let outer = t.pause("vm_a");
        let inner = t.pause("vm_a");
        assert!(t.is_pausing("vm_a") && !t.is_pausing("vm_b"));
        drop(inner);
        assert!(rx.try_recv().is_err(), "still paused");
        drop(outer);
        assert_eq!(rx.try_recv().ok().as_deref(), Some("vm_a"));
        assert!(rx.try_recv().is_err());
        assert!(!t.is_pausing("vm_a"));
    }

    #[test]
    fn a_request_keeps_a_vm_awake_and_a_pause_turns_requests_away() {
        let t = Arc::new(ActivityTable::default());
        let busy = t.enter("vm_a").unwrap();
        assert!(t.pause_if_idle("vm_a", Duration::ZERO).is_none());
        drop(busy);
        let pausing = t.pause_if_idle("vm_a", Duration::ZERO).unwrap();
        assert!(t.enter("vm_a").is_none(), "no request reaches a pausing VM");
        drop(pausing);
        assert!(t.enter("vm_a").is_some());
        assert!(t.pause_if_idle("vm_a", Duration::from_secs(60)).is_none());
    }
}
