//! SSH into a VM with the daemon's CA: `connect` signs a caller's key for
//! one VM, waking it first if it sleeps.

use super::routes::WakeError;
use super::state::VmState;
use super::{Manager, ManagerError, Result};
use crate::ssh::client::{ChannelSpec, ClientError, ExitStatus, GuestSession, Output};
use crate::ssh::{Ca, GUEST_USER};
use crate::store::{Owner, Snapshot, Vm};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long telling a fork's guest its own id may take (login included)
/// before the fork or wake goes on without it; the next daemon session
/// tries again.
const OWN_PRINCIPAL_TIMEOUT: Duration = Duration::from_secs(15);

/// What `POST /vms/{id}/connect` answers, minus the host (an HTTP matter).
#[derive(Debug, Clone)]
pub struct Connect {
    /// The OpenSSH certificate line, for `ssh -o CertificateFile=`.
    pub certificate: String,
    /// The VM's forwarded SSH port on the host.
    pub port: u16,
    pub username: &'static str,
    /// Unix seconds: the certificate's `valid_before`.
    pub valid_until: u64,
}

impl Manager {
    /// Installs the CA (once, at start-up, before VMs boot: their seeds carry it).
    pub fn set_ssh_ca(&self, ca: Arc<Ca>) {
        if self.ssh_ca.set(ca).is_err() {
            tracing::warn!("the SSH CA was already set; keeping the first one");
        }
    }

    /// The CA, for anything that signs a certificate for a VM.
    pub fn ssh_ca(&self) -> Option<&Arc<Ca>> {
        self.ssh_ca.get()
    }

    pub fn ssh_config(&self) -> &crate::config::SshConfig {
        &self.config.ssh
    }

    /// The owner's VM `id` running, and the CA, for a call that reaches
    /// into it over SSH (`what` names the call in messages): 404 for a VM
    /// the owner cannot see, 409 without networking or when it is stopped
    /// (or in error), 503 without a CA; a sleeping VM is woken first (the
    /// proxy's shared wake).
    pub(super) async fn awake_for_ssh(
        self: &Arc<Self>,
        owner: &Owner,
        id: &str,
        what: &str,
    ) -> Result<(crate::store::Vm, Arc<Ca>)> {
        let vm = self.visible_vm(owner, id).await?;
        if !vm.enable_network || vm.guest_ip.is_none() {
            return Err(ManagerError::Conflict(format!(
                "vm {id} has no network (enable_network is false), so {what} cannot reach it"
            )));
        }
        let ca = self
            .ssh_ca()
            .cloned()
            .ok_or_else(|| ManagerError::Unavailable("the SSH CA is not set up".into()))?;
        let mut vm = vm;
        match vm.state {
            VmState::Running => {}
            VmState::Snapshotted => {
                self.wake(id).await.map_err(|e| match e {
                    WakeError::NotAsleep(why) => ManagerError::Conflict(why),
                    WakeError::Failed(e) => {
                        ManagerError::Internal(format!("waking vm {id} for {what}: {e}"))
                    }
                })?;
                // The wake may have changed the principal its guest trusts.
                vm = self.visible_vm(owner, id).await?;
            }
            other => {
                return Err(ManagerError::Conflict(format!(
                "vm {id} is {other}; {what} needs it running (start it with POST /vms/{id}/start)"
            )))
            }
        }
        if vm.guest_principal.is_some() {
            // Told before (fork, wake) without success: try again now.
            let _guard = self.lock_vm(id).await;
            vm = self.visible_vm(owner, id).await?;
            if vm.state == VmState::Running {
                self.tell_guest_its_id(&mut vm).await;
            }
        }
        Ok((vm, ca))
    }

    /// The principal `vm`'s guest trusts: its own id, or for a fork not yet
    /// told its own, the id whose memory it resumed. Only the daemon's own
    /// sessions sign for it; `connect` always signs for the VM's own id.
    pub(super) fn trusted_principal(vm: &Vm) -> &str {
        vm.guest_principal.as_deref().unwrap_or(&vm.id)
    }

    /// The principal the guest in `snap`'s memory trusts: the one recorded
    /// with it, or (rows from before it was recorded) the snapshot's VM id.
    pub(super) fn memory_principal(snap: &Snapshot) -> &str {
        snap.vm_config
            .guest_principal
            .as_deref()
            .unwrap_or(&snap.vm_id)
    }

    /// A VM whose memory comes from `snap` trusts the principal the
    /// snapshot's guest trusted (`vm_config.guest_principal`; rows from
    /// before it was recorded: the snapshot's VM). When that is not its own
    /// id (a fork), it is recorded until the guest is told otherwise.
    pub(super) async fn adopt_memory_principal(&self, vm: &mut Vm, snap: &Snapshot) -> Result<()> {
        let trusted = Self::memory_principal(snap);
        let principal = (trusted != vm.id).then(|| trusted.to_string());
        if principal == vm.guest_principal {
            return Ok(());
        }
        self.store
            .set_vm_guest_principal(&vm.id, principal.as_deref())
            .await?;
        vm.guest_principal = principal;
        Ok(())
    }

    /// A fresh boot runs the seed's script, which writes the VM's own id.
    pub(super) async fn forget_memory_principal(&self, vm: &mut Vm) -> Result<()> {
        if vm.guest_principal.is_some() {
            self.store.set_vm_guest_principal(&vm.id, None).await?;
            vm.guest_principal = None;
        }
        Ok(())
    }

    /// Tells a running fork's guest its own id: logs in with the principal
    /// it still trusts and replaces its principals file (src/image/seed.rs,
    /// `own_principal_command`), then forgets that principal. Bounded by
    /// `OWN_PRINCIPAL_TIMEOUT`; a failure is logged and never fails the
    /// caller (the next daemon session tries again, still signing for the
    /// old principal meanwhile). Called with the VM's lock held.
    pub(super) async fn tell_guest_its_id(&self, vm: &mut Vm) {
        let Some(trusted) = vm.guest_principal.clone() else {
            return;
        };
        let (Some(ca), Some(ip), true) = (self.ssh_ca(), vm.guest_ip, vm.enable_network) else {
            return;
        };
        let addr = SocketAddr::new(ip.into(), 22);
        let command = crate::image::seed::own_principal_command(&vm.id);
        let told = tokio::time::timeout(
            OWN_PRINCIPAL_TIMEOUT,
            run_once(ca, &vm.id, &trusted, addr, command),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {} s",
                OWN_PRINCIPAL_TIMEOUT.as_secs()
            ))
        });
        if let Err(e) = told {
            tracing::warn!(vm = %vm.id, trusted = %trusted, "could not tell the guest its own id (exec and files still work; connect's certificates do not yet): {e}");
            return;
        }
        match self.store.set_vm_guest_principal(&vm.id, None).await {
            Ok(()) => {
                tracing::info!(vm = %vm.id, was = %trusted, "the guest now trusts certificates for its own id");
                vm.guest_principal = None;
            }
            Err(e) => tracing::warn!(vm = %vm.id, "recording the guest's principal: {e}"),
        }
    }

    /// As `awake_for_ssh`, with the VM counted busy (no idle sleep) until
    /// the returned `Busy` is dropped. Idle sleep may take the VM between
    /// the wake and the count, so this tries a few times.
    pub(super) async fn busy_for_ssh(
        self: &Arc<Self>,
        owner: &Owner,
        id: &str,
        what: &str,
    ) -> Result<(crate::store::Vm, Arc<Ca>, super::idle::Busy)> {
        for _ in 0..3 {
            let (vm, ca) = self.awake_for_ssh(owner, id, what).await?;
            if let Some(busy) = self.enter_vm(id) {
                return Ok((vm, ca, busy));
            }
        }
        Err(ManagerError::Conflict(format!(
            "vm {id} kept going to sleep while {what} tried to reach it; try again"
        )))
    }

    /// Signs `key` into a short-lived certificate for the owner's VM `id`
    /// (principal: the VM id, user `agent`). A VM without networking has no
    /// SSH port (409); a sleeping one is woken first, like the proxy does.
    pub async fn connect(
        self: &Arc<Self>,
        owner: &Owner,
        id: &str,
        key: &ssh_key::PublicKey,
    ) -> Result<Connect> {
        let (vm, ca) = self.awake_for_ssh(owner, id, "SSH").await?;
        let port = vm
            .ssh_port
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| ManagerError::Conflict(format!("vm {id} has no SSH port")))?;
        // A login is coming: idle sleep should not take the VM right now.
        self.activity.touch(id);
        let signed = ca
            .sign(key, id, self.config.ssh.cert_ttl)
            .map_err(|e| ManagerError::Internal(e.to_string()))?;
        tracing::info!(vm = id, owner = %owner.id, valid_until = signed.valid_before, "SSH certificate signed");
        Ok(Connect {
            certificate: signed.openssh,
            port,
            username: GUEST_USER,
            valid_until: signed.valid_before,
        })
    }
}

/// Logs in to the guest at `addr` with a certificate for `principal` and
/// runs `command`, retrying while its SSH port is not reachable yet (a
/// guest just resumed); the caller bounds the whole. Ok when it exits 0.
async fn run_once(
    ca: &Ca,
    vm_id: &str,
    principal: &str,
    addr: SocketAddr,
    command: String,
) -> std::result::Result<(), String> {
    let started = Instant::now();
    let session = loop {
        match GuestSession::connect_as(ca, vm_id, principal, addr, OWN_PRINCIPAL_TIMEOUT).await {
            Ok(s) => break s,
            Err(ClientError::Connect { .. }) if started.elapsed() < OWN_PRINCIPAL_TIMEOUT => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let spec = ChannelSpec {
        command: Some(command),
        pty: None,
    };
    let ran = async {
        let mut process = session.open(&spec).await.map_err(|e| e.to_string())?;
        let (mut status, mut stderr) = (None, Vec::new());
        while let Some(out) = process.output.next().await {
            match out {
                Output::Exit(s) => status = Some(s),
                // Small: a shell's error message at most.
                Output::Stderr(b) if stderr.len() < 4096 => stderr.extend_from_slice(&b),
                _ => {}
            }
        }
        match status {
            Some(ExitStatus::Code(0)) => Ok(()),
            other => Err(format!(
                "the guest's command ended with {other:?}: {}",
                String::from_utf8_lossy(&stderr).trim()
            )),
        }
    }
    .await;
    session.close().await;
    ran
}
