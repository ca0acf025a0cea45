//! A running VM's counters (`GET /vms/{id}/metrics`), read from its VMM without touching its state.

use super::state::VmState;
use super::{Manager, ManagerError, Result};
use crate::store::{Owner, Vm};
use crate::vmm::metrics::{self, VmmMetrics};
use std::sync::Arc;

/// A VM and its VMM's counters at one moment.
#[derive(Debug)]
pub struct VmMetrics {
    pub vm: Vm,
    pub vmm: VmmMetrics,
    /// The vCPUs' average load since the VMM started (`metrics::utilization_percent`).
    pub utilization_percent: f64,
}

/// Why a VM in `state` has no metrics to read: only a running VM has a VMM.
fn refusal(vm_id: &str, state: VmState) -> Option<String> {
    (state != VmState::Running).then(|| {
        format!("vm {vm_id} is {state}: metrics come from its running VMM, and it has none")
    })
}

impl Manager {
    /// The owner's VM's counters. A read only: it takes no VM lock (a long
    /// snapshot must not hold it up), changes no state, and is not activity,
    /// so it neither keeps a VM from idle sleep nor wakes a sleeping one.
    pub async fn vm_metrics(&self, owner: &Owner, id: &str) -> Result<VmMetrics> {
        let vm = self.visible_vm(owner, id).await?;
        if let Some(why) = refusal(id, vm.state) {
            return Err(ManagerError::Conflict(why));
        }
        let entry = {
            let running = self.running.lock().unwrap();
            running.get(id).map(|r| (r.pid, Arc::clone(&r.backend)))
        };
        // Recorded running, but its VMM has just ended (a stop or crash is
        // being recorded) or was not started by this daemon.
        let Some((pid, backend)) = entry else {
            return Err(ManagerError::Conflict(format!(
                "vm {id} has no VMM running right now"
            )));
        };
        let spec = self.spec_for(&vm, backend.as_ref());
        let vmm = match backend.metrics(&spec, pid).await {
            Ok(m) => m,
            // The VMM ended while we asked it: the VM is no longer running.
            Err(_) if !self.still_running(id, pid).await => {
                return Err(ManagerError::Conflict(format!(
                    "vm {id} stopped running while its metrics were read"
                )))
            }
            Err(e) => {
                return Err(ManagerError::from(e).context(format!("reading metrics of vm {id}")))
            }
        };
        let utilization_percent =
            metrics::utilization_percent(vmm.cpu_time_micros, vmm.uptime_seconds, spec.vcpu_count);
        Ok(VmMetrics {
            vm,
            vmm,
            utilization_percent,
        })
    }

    /// Is `pid` still the VM's VMM, alive, and the VM running? A VMM that
    /// is being ended (a stop, or an idle sleep killing it after its
    /// snapshot) closes its control socket a moment before it is a zombie,
    /// so a failed read waits up to a second for that to show.
    async fn still_running(&self, id: &str, pid: u32) -> bool {
        for _ in 0..20 {
            let current = self.running.lock().unwrap().get(id).map(|r| r.pid) == Some(pid);
            if !current || !crate::vmm::process::is_alive(pid) {
                return false;
            }
            match self.store.get_vm(id).await {
                Ok(Some(vm)) if vm.state == VmState::Running => {}
                _ => return false,
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_running_vm_has_metrics() {
        assert_eq!(refusal("vm_a", VmState::Running), None);
        for state in VmState::all() {
            if *state == VmState::Running {
                continue;
            }
            let why = refusal("vm_a", *state).unwrap();
            assert_eq!(
                why,
                format!("vm vm_a is {state}: metrics come from its running VMM, and it has none")
            );
        }
    }
}
