//! SSH into a VM with the daemon's CA: `connect` signs a caller's key for
//! one VM, waking it first if it sleeps.

use super::routes::WakeError;
use super::state::VmState;
use super::{Manager, ManagerError, Result};
use crate::ssh::{Ca, GUEST_USER};
use crate::store::Owner;
use std::sync::Arc;

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
        match vm.state {
            VmState::Running => {}
            VmState::Snapshotted => {
                self.wake(id).await.map_err(|e| match e {
                    WakeError::NotAsleep(why) => ManagerError::Conflict(why),
                    WakeError::Failed(e) => {
                        ManagerError::Internal(format!("waking vm {id} for {what}: {e}"))
                    }
                })?;
            }
            other => {
                return Err(ManagerError::Conflict(format!(
                "vm {id} is {other}; {what} needs it running (start it with POST /vms/{id}/start)"
            )))
            }
        }
        Ok((vm, ca))
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
