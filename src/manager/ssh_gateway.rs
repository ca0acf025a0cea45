//! SSH that wakes: while a networked VM sleeps, the daemon listens on its
//! `ssh_port` itself, wakes the VM for a connection and splices it to the guest's sshd.

use super::idle::Busy;
use super::routes::WakeError;
use super::state::VmState;
use super::Manager;
use crate::net::ipam::BridgeNet;
use crate::store::Vm;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long a woken guest's sshd gets to take the spliced connection: it
/// resumes listening, so this only covers its network coming back.
const GUEST_CONNECT: Duration = Duration::from_secs(20);

/// The listeners of sleeping VMs and the connections spliced through them.
pub(super) struct SshGateway {
    /// The manager, for the connections' wakes (weak: the manager owns this).
    me: Weak<Manager>,
    gates: Mutex<HashMap<String, Gate>>,
    /// One firewall sync with its listener changes at a time, so the last
    /// one to run reads the newest state and both end up matching it.
    sync: tokio::sync::Mutex<()>,
}

/// One VM's listener (while it sleeps) and its spliced connections.
struct Gate {
    listening: Option<Listening>,
    /// Ends the spliced connections once the guest is gone for good
    /// (deleted, stopped, error); a sleep keeps them for the wake.
    conns: CancellationToken,
}

struct Listening {
    port: u16,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Why a connection to a sleeping VM's port was closed.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("source {0} is not in HATCH_SSH_ALLOWED_CIDRS")]
    Source(IpAddr),
    #[error("source {0} is a guest (guests reach no host service)")]
    Guest(IpAddr),
    #[error("{0}")]
    Wake(WakeError),
    #[error("the VM did not wake within {0:?} (HATCH_PROXY_WAKE_TIMEOUT)")]
    Late(Duration),
    #[error("the VM went back to sleep while waking")]
    Asleep,
    #[error("the VM has no guest address any more")]
    NoAddress,
    #[error("connecting to the guest's sshd at {addr}: {source}")]
    Guest22 {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the daemon is shutting down")]
    Gone,
}

/// Is `ip` in `cidr` (`a.b.c.d/p`, as `ipam::parse_cidr_list` writes it)?
fn cidr_contains(cidr: &str, ip: Ipv4Addr) -> bool {
    let Some((net, prefix)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(prefix)) = (net.parse::<Ipv4Addr>(), prefix.parse::<u32>()) else {
        return false;
    };
    let mask = u32::MAX.checked_shl(32 - prefix.min(32)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// What the firewall would do with a connection from `peer`: the forwards
/// take only `allowed` sources and never a guest's (the bridge address is
/// the host's own). `Ok` when it may go on.
fn check_source(peer: IpAddr, allowed: &[String], guests: BridgeNet) -> Result<(), Closed> {
    let IpAddr::V4(ip) = peer else {
        return Err(Closed::Source(peer));
    };
    if guests.contains(ip) && ip != guests.bridge_ip {
        return Err(Closed::Guest(peer));
    }
    if !allowed.iter().any(|c| cidr_contains(c, ip)) {
        return Err(Closed::Source(peer));
    }
    Ok(())
}

impl SshGateway {
    pub(super) fn new(me: Weak<Manager>) -> SshGateway {
        SshGateway {
            me,
            gates: Mutex::new(HashMap::new()),
            sync: tokio::sync::Mutex::new(()),
        }
    }

    /// Listens on `port` for `vm_id` unless it already does.
    fn listen(&self, vm_id: &str, port: u16) {
        let mut gates = self.gates.lock().unwrap();
        let gate = gates.entry(vm_id.to_string()).or_insert_with(|| Gate {
            listening: None,
            conns: CancellationToken::new(),
        });
        if let Some(l) = &gate.listening {
            if l.port == port && !l.task.is_finished() {
                return;
            }
            l.stop.cancel();
        }
        // SO_REUSEADDR (std sets it): spliced connections of an earlier
        // sleep may still be in TIME_WAIT on this port.
        let bound = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(TcpListener::from_std);
        let listener = match bound {
            Ok(l) => l,
            Err(e) => {
                gate.listening = None;
                tracing::error!(vm = vm_id, port, "SSH gateway: cannot listen on the VM's SSH port, a connection will not wake it: {e}");
                return;
            }
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            self.me.clone(),
            vm_id.to_string(),
            listener,
            stop.clone(),
            gate.conns.clone(),
        ));
        gate.listening = Some(Listening { port, stop, task });
        tracing::info!(
            vm = vm_id,
            port,
            "SSH gateway listening for the sleeping VM"
        );
    }

    /// Closes `vm_id`'s listener (and, when `end_conns`, its spliced
    /// connections and its entry); returns once the port is free.
    async fn close(&self, vm_id: &str, end_conns: bool) {
        let listening = {
            let mut gates = self.gates.lock().unwrap();
            let Some(gate) = gates.get_mut(vm_id) else {
                return;
            };
            let l = gate.listening.take();
            if end_conns {
                gate.conns.cancel();
                gates.remove(vm_id);
            }
            l
        };
        if let Some(l) = listening {
            l.stop.cancel();
            // The task owns the socket: when it ends, the port is closed.
            let _ = l.task.await;
            tracing::info!(vm = vm_id, port = l.port, "SSH gateway closed");
        }
    }

    fn is_listening(&self, vm_id: &str) -> bool {
        let gates = self.gates.lock().unwrap();
        gates.get(vm_id).is_some_and(|g| g.listening.is_some())
    }

    /// The ports listened on now, by VM (for tests of the bookkeeping).
    #[cfg(test)]
    fn listening(&self) -> Vec<(String, u16)> {
        let gates = self.gates.lock().unwrap();
        let mut out: Vec<_> = gates
            .iter()
            .filter_map(|(id, g)| Some((id.clone(), g.listening.as_ref()?.port)))
            .collect();
        out.sort();
        out
    }
}

/// Accepts until stopped; then takes what the kernel had already accepted
/// into the backlog (those clients' SYNs met no forward yet) and lets the
/// socket go.
async fn accept_loop(
    me: Weak<Manager>,
    vm_id: String,
    listener: TcpListener,
    stop: CancellationToken,
    conns: CancellationToken,
) {
    let serve = |stream: TcpStream, peer: SocketAddr| {
        let (me, vm_id, conns) = (me.clone(), vm_id.clone(), conns.clone());
        tokio::spawn(async move {
            let served = tokio::select! {
                r = serve(me, &vm_id, stream, peer) => r,
                () = conns.cancelled() => Ok(()),
            };
            match served {
                Ok(()) => {}
                Err(e @ (Closed::Source(_) | Closed::Guest(_))) => {
                    tracing::warn!(vm = %vm_id, %peer, "SSH gateway refused a connection: {e}")
                }
                Err(e) => {
                    tracing::warn!(vm = %vm_id, %peer, "SSH gateway closed a connection: {e}")
                }
            }
        });
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => serve(stream, peer),
                Err(e) => {
                    // Out of descriptors, say: do not spin on it.
                    tracing::warn!(vm = %vm_id, "SSH gateway accept: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    if let Ok(std) = listener.into_std() {
        while let Ok((s, peer)) = std.accept() {
            match s
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(s))
            {
                Ok(stream) => serve(stream, peer),
                Err(e) => tracing::warn!(vm = %vm_id, "SSH gateway: a queued connection: {e}"),
            }
        }
    }
}

/// One connection: its source checked, the VM woken (one wake shared by
/// all), then spliced to the guest's port 22, counted as activity until it ends.
async fn serve(
    me: Weak<Manager>,
    vm_id: &str,
    mut client: TcpStream,
    peer: SocketAddr,
) -> Result<(), Closed> {
    let mgr = me.upgrade().ok_or(Closed::Gone)?;
    let guests = mgr.config.net.net;
    if let Err(e) = check_source(peer.ip(), &mgr.config.net.ssh_allowed_sources, guests) {
        // A reset, as a port nothing listens on gives.
        let _ = client.set_zero_linger();
        return Err(e);
    }
    let _busy = wake_for(&mgr, vm_id).await?;
    let ip = match mgr.store.get_vm(vm_id).await {
        Ok(Some(vm)) => vm.guest_ip.ok_or(Closed::NoAddress)?,
        _ => return Err(Closed::NoAddress),
    };
    drop(mgr);
    let addr = SocketAddr::from((ip, 22));
    let mut guest = connect_guest(addr).await?;
    let _ = client.set_nodelay(true);
    let _ = guest.set_nodelay(true);
    // Either side closing ends it; an error is the connection's end too.
    let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
    Ok(())
}

/// Wakes the VM (or finds it running) and counts the connection on it.
async fn wake_for(mgr: &Arc<Manager>, vm_id: &str) -> Result<Busy, Closed> {
    let limit = mgr.config.proxy.wake_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    // A second try covers a VM put to sleep again right after it woke.
    for _ in 0..2 {
        if let Some(busy) = mgr.enter_vm(vm_id) {
            return Ok(busy);
        }
        match tokio::time::timeout_at(deadline, mgr.wake(vm_id)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Closed::Wake(e)),
            Err(_) => return Err(Closed::Late(limit)),
        }
    }
    Err(Closed::Asleep)
}

/// Connects to the woken guest's sshd, retrying while its network comes back.
async fn connect_guest(addr: SocketAddr) -> Result<TcpStream, Closed> {
    let deadline = tokio::time::Instant::now() + GUEST_CONNECT;
    loop {
        let tried = tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await;
        let e = match tried {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => e,
            Err(_) => std::io::Error::from(std::io::ErrorKind::TimedOut),
        };
        if tokio::time::Instant::now() + Duration::from_millis(250) >= deadline {
            return Err(Closed::Guest22 { addr, source: e });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

impl Manager {
    /// `vm` went to sleep: the daemon answers its SSH port from now on
    /// (before its forward goes, so some one always answers).
    /// Returns whether the daemon listens for it now.
    pub(super) fn listen_while_asleep(&self, vm: &Vm) -> bool {
        if self.network.get().is_none() || !vm.enable_network || vm.guest_ip.is_none() {
            return false;
        }
        if let Some(port) = vm.ssh_port.and_then(|p| u16::try_from(p).ok()) {
            self.ssh_gateway.listen(&vm.id, port);
        }
        self.ssh_gateway.is_listening(&vm.id)
    }

    /// Taken by `sync_firewall` for the whole of its read and apply.
    pub(super) async fn gateway_sync_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.ssh_gateway.sync.lock().await
    }

    /// A running VM is about to be paused for a capture: the daemon answers
    /// its port from now on (a connection waits for the capture, then wakes
    /// the VM or finds it running), instead of a forward to a guest that
    /// may never answer again. Given back when the last `Pausing` ends.
    pub(super) async fn gateway_take_over(&self, vm: &Vm) {
        if self.listen_while_asleep(vm) {
            self.refresh_forwards().await;
        }
    }

    /// At start-up: gives a VM's port back to its forward whenever a
    /// capture ends with the VM still running (refused, failed, a checkpoint).
    pub(super) fn spawn_ssh_gateway(self: &Arc<Self>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        self.activity.on_pause_end(tx);
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(vm_id) = rx.recv().await {
                let Some(mgr) = me.upgrade() else { return };
                if mgr.ssh_gateway.is_listening(&vm_id) {
                    mgr.refresh_forwards().await;
                }
            }
        });
    }

    /// After the firewall matches `states`: a VM that runs has its forward
    /// now, so its listener goes (spliced connections go on); one that is
    /// gone, stopped or in error loses its connections too. A VM starting
    /// from its sleep, or `pausing` for a capture, keeps its listener.
    pub(super) async fn settle_ssh_gateway(
        &self,
        states: &HashMap<String, VmState>,
        pausing: &std::collections::HashSet<String>,
    ) {
        let ids: Vec<String> = self
            .ssh_gateway
            .gates
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        for id in ids {
            if pausing.contains(&id) {
                continue;
            }
            match states.get(&id) {
                None | Some(VmState::Stopped | VmState::Error) => {
                    self.ssh_gateway.close(&id, true).await
                }
                Some(VmState::Running) => self.ssh_gateway.close(&id, false).await,
                Some(VmState::Snapshotted | VmState::Starting | VmState::Stopping) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_checked_as_the_forwards_check_them() {
        let guests = BridgeNet::parse("172.16.0.1/24").unwrap();
        let any = vec!["0.0.0.0/0".to_string()];
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert!(check_source(ip("127.0.0.1"), &any, guests).is_ok());
        assert!(check_source(ip("10.77.0.2"), &any, guests).is_ok());
        // The host's own bridge address is a client; a guest's is not.
        assert!(check_source(ip("172.16.0.1"), &any, guests).is_ok());
        assert!(matches!(
            check_source(ip("172.16.0.10"), &any, guests),
            Err(Closed::Guest(_))
        ));
        assert!(check_source(ip("::1"), &any, guests).is_err());
        let some = vec!["10.77.0.0/30".to_string(), "192.168.1.7/32".to_string()];
        assert!(check_source(ip("10.77.0.2"), &some, guests).is_ok());
        assert!(check_source(ip("10.77.0.3"), &some, guests).is_ok());
        assert!(check_source(ip("192.168.1.7"), &some, guests).is_ok());
        for refused in ["10.77.0.4", "127.0.0.1", "192.168.1.8"] {
            assert!(
                matches!(
                    check_source(ip(refused), &some, guests),
                    Err(Closed::Source(_))
                ),
                "{refused}"
            );
        }
    }

    #[tokio::test]
    async fn a_closed_listener_frees_its_port_at_once() {
        let gw = SshGateway::new(Weak::new());
        // A free port, found by binding and letting go.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        gw.listen("vm_a", port);
        gw.listen("vm_a", port);
        assert_eq!(gw.listening(), [("vm_a".to_string(), port)]);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        gw.close("vm_a", false).await;
        assert!(gw.listening().is_empty());
        let refused = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        // Kept for its connections until the VM is gone.
        assert!(gw.gates.lock().unwrap().contains_key("vm_a"));
        gw.listen("vm_a", port);
        gw.close("vm_a", true).await;
        assert!(gw.gates.lock().unwrap().is_empty());
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
