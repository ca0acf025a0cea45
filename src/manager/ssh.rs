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

    /// Signs `key` into a short-lived certificate for the owner's VM `id`
    /// (principal: the VM id, user `agent`). A VM without networking has no
    /// SSH port (409); a sleeping one is woken first, like the proxy does.
    pub async fn connect(
        self: &Arc<Self>,
        owner: &Owner,
        id: &str,
        key: &ssh_key::PublicKey,
    ) -> Result<Connect> {
        let vm = self.visible_vm(owner, id).await?;
        let port = vm
            .ssh_port
            .filter(|_| vm.enable_network)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| {
                ManagerError::Conflict(format!(
                    "vm {id} has no network (enable_network is false), so no SSH port"
                ))
            })?;
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
                        ManagerError::Internal(format!("waking vm {id} for SSH: {e}"))
                    }
                })?;
            }
            other => {
                return Err(ManagerError::Conflict(format!(
                    "vm {id} is {other}; SSH needs it running (start it with POST /vms/{id}/start)"
                )))
            }
        }
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
