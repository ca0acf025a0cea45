//! Admission: per-owner quotas and the host's memory capacity, checked under
//! one lock together with the row insert or state change they admit.
//!
//! The lock is `Manager::alloc_lock` (it already serializes a new VM's
//! network allocation and insert): every check reads the store and the
//! admitted change is written before the lock is released, so two requests
//! racing at a limit cannot both pass. Only store reads and writes happen
//! under it, never a boot or an upload.

use super::{Manager, ManagerError, Result};
use crate::config::{LimitsConfig, Quota};
use crate::store::{OwnerLimits, OwnerUsage, Vm};
use std::sync::OnceLock;

/// The limits that apply to an owner: its own where set, else the server's.
pub fn effective(defaults: &Quota, own: &OwnerLimits) -> Quota {
    let pick = |o: Option<i64>, d: u64| o.map(|v| v.max(0) as u64).unwrap_or(d);
    Quota {
        vms: pick(own.vms, defaults.vms),
        vcpus: pick(own.vcpus, defaults.vcpus),
        mem_mib: pick(own.mem_mib, defaults.mem_mib),
        snapshots_per_vm: pick(own.snapshots_per_vm, defaults.snapshots_per_vm),
        stored_bytes: pick(own.stored_bytes, defaults.stored_bytes),
    }
}

fn used(v: i64) -> u64 {
    v.max(0) as u64
}

/// May an owner holding `usage` add a VM of `vcpus` and `mem_mib`?
pub fn check_new_vm(
    q: &Quota,
    usage: &OwnerUsage,
    vcpus: i64,
    mem_mib: i64,
) -> std::result::Result<(), String> {
    let (vms, cpus, mem) = (used(usage.vms), used(usage.vcpus), used(usage.mem_mib));
    if vms >= q.vms {
        return Err(format!("vm limit reached ({vms}/{})", q.vms));
    }
    if cpus + used(vcpus) > q.vcpus {
        return Err(format!(
            "vcpu limit reached ({cpus}/{}, this VM needs {vcpus})",
            q.vcpus
        ));
    }
    if mem + used(mem_mib) > q.mem_mib {
        return Err(format!(
            "memory limit reached ({mem}/{} MiB, this VM needs {mem_mib})",
            q.mem_mib
        ));
    }
    Ok(())
}

/// May a VM that has `count` snapshots get another one?
pub fn check_snapshot_count(q: &Quota, count: i64) -> std::result::Result<(), String> {
    let count = used(count);
    if count >= q.snapshots_per_vm {
        return Err(format!(
            "snapshot limit reached ({count}/{})",
            q.snapshots_per_vm
        ));
    }
    Ok(())
}

/// May an owner storing `stored` bytes store `adding` more? At the limit
/// nothing more fits, not even an object of unknown size.
pub fn check_stored(q: &Quota, stored: i64, adding: u64) -> std::result::Result<(), String> {
    let stored = used(stored);
    if stored >= q.stored_bytes || stored + adding > q.stored_bytes {
        let needs = if adding > 0 {
            format!(", this needs {adding} more")
        } else {
            String::new()
        };
        return Err(format!(
            "stored bytes limit reached ({stored}/{}{needs})",
            q.stored_bytes
        ));
    }
    Ok(())
}

/// The guest memory the host may hand out, in MiB: MemTotal times the
/// overcommit ratio, minus the host's reserve.
pub fn host_capacity_mib(total_mib: u64, limits: &LimitsConfig) -> u64 {
    ((total_mib as f64 * limits.memory_overcommit) as u64).saturating_sub(limits.host_reserve_mib)
}

/// Does a VM of `mem_mib` fit beside VMs holding `held` MiB (overhead included)?
pub fn fits_host(capacity_mib: u64, held_mib: u64, mem_mib: i64, overhead_mib: u64) -> bool {
    held_mib + used(mem_mib) + overhead_mib <= capacity_mib
}

/// MemTotal of this host, in MiB (None when /proc/meminfo cannot be read).
fn mem_total_mib() -> Option<u64> {
    static TOTAL: OnceLock<Option<u64>> = OnceLock::new();
    *TOTAL.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024)
    })
}

/// How a snapshot is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotQuota {
    /// Asked for by the owner: counted and refused at a limit.
    Enforced,
    /// Taken by idle sleep: counted (it is stored) but never refused, so a
    /// VM at its limits can still sleep and free the host's memory.
    Sleep,
}

impl Manager {
    /// The limits that apply to `owner_id`.
    pub(super) async fn quota_of(&self, owner_id: &str) -> Result<Quota> {
        let own = self.store.owner_limits(owner_id).await?;
        Ok(effective(&self.config.limits.quota, &own))
    }

    /// Admits a new VM (create or fork), `alloc_lock` held: its owner's VM,
    /// vCPU and memory quotas, `copies` more stored bytes (a fork that gets
    /// its own copy of a snapshot), and the host's memory when it `boots`.
    pub(super) async fn admit_vm(&self, vm: &Vm, boots: bool, copies: u64) -> Result<()> {
        let quota = self.quota_of(&vm.owner_id).await?;
        let usage = self.store.owner_usage(&vm.owner_id).await?;
        check_new_vm(&quota, &usage, vm.vcpu_count, vm.mem_mib).map_err(ManagerError::Forbidden)?;
        if copies > 0 {
            check_stored(&quota, usage.stored_bytes, copies).map_err(ManagerError::Forbidden)?;
        }
        if boots {
            self.check_host_memory(vm).await?;
        }
        Ok(())
    }

    /// Refuses (503) a VM whose memory the host cannot hold beside the VMs
    /// that hold memory now (starting, running, stopping). Called with
    /// `alloc_lock` held, right before the VM's row says `starting`.
    pub(super) async fn check_host_memory(&self, vm: &Vm) -> Result<()> {
        let Some(total) = mem_total_mib() else {
            tracing::warn!("/proc/meminfo is unreadable: the host memory check is skipped");
            return Ok(());
        };
        let limits = &self.config.limits;
        let capacity = host_capacity_mib(total, limits);
        // The states that hold memory are VmState::is_transient's; sleeping
        // VMs' hot copies hold theirs too (the VM's own becomes its RAM).
        let (count, mem) = self.store.memory_holders(&vm.id).await?;
        let held = used(mem) + used(count) * limits.vm_overhead_mib;
        loop {
            let hot = self.hot.bytes_except(&vm.id) >> 20;
            if fits_host(capacity, held + hot, vm.mem_mib, limits.vm_overhead_mib) {
                return Ok(());
            }
            // Deep sleep for the oldest other hot copy: the host needs its memory.
            match self.hot.evict_oldest_except(&vm.id) {
                Some(id) => {
                    self.telemetry.hot_copies(self.hot.total());
                    tracing::info!(vm = %id, for_vm = %vm.id, "deep sleep: the host needs the memory");
                }
                None => break,
            }
        }
        tracing::warn!(
            vm = %vm.id, mem_mib = vm.mem_mib, held_mib = held, capacity_mib = capacity,
            total_mib = total, overcommit = limits.memory_overcommit,
            "refused: the host's memory is fully given out"
        );
        // The figures stay in the log: other owners' use is not the caller's business.
        Err(ManagerError::Unavailable(format!(
            "the host has no memory left for a {} MiB VM now; try again later or ask for less mem_mib",
            vm.mem_mib
        )))
    }

    /// Admits a snapshot of `vm` before anything is written, `alloc_lock`
    /// held: the VM's snapshot count, and the owner's stored bytes with
    /// `at_least` (what the snapshot will surely store: its disk).
    pub(super) async fn admit_snapshot(
        &self,
        vm: &Vm,
        quota_mode: SnapshotQuota,
        at_least: u64,
    ) -> Result<()> {
        if quota_mode == SnapshotQuota::Sleep {
            return Ok(());
        }
        let quota = self.quota_of(&vm.owner_id).await?;
        let count = self.store.vm_snapshot_count(&vm.id).await?;
        check_snapshot_count(&quota, count).map_err(ManagerError::Forbidden)?;
        let usage = self.store.owner_usage(&vm.owner_id).await?;
        check_stored(&quota, usage.stored_bytes, at_least).map_err(ManagerError::Forbidden)
    }

    /// Once a snapshot's objects are stored and its size known, `alloc_lock`
    /// held: does it still fit in the owner's stored bytes? (Its own row
    /// still counts 0 while capturing.)
    pub(super) async fn admit_stored(
        &self,
        owner_id: &str,
        quota_mode: SnapshotQuota,
        adding: u64,
    ) -> Result<()> {
        if quota_mode == SnapshotQuota::Sleep {
            return Ok(());
        }
        let quota = self.quota_of(owner_id).await?;
        let usage = self.store.owner_usage(owner_id).await?;
        check_stored(&quota, usage.stored_bytes, adding).map_err(ManagerError::Forbidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(vms: i64, vcpus: i64, mem_mib: i64) -> OwnerUsage {
        OwnerUsage {
            vms,
            vcpus,
            mem_mib,
            stored_bytes: 0,
        }
    }

    #[test]
    fn vm_limits_answer_like_the_hatch_product() {
        let q = Quota::default();
        assert_eq!(
            check_new_vm(&q, &usage(5, 5, 2560), 1, 512).unwrap_err(),
            "vm limit reached (5/5)"
        );
        assert!(check_new_vm(&q, &usage(4, 4, 2048), 1, 512).is_ok());
        assert_eq!(
            check_new_vm(&q, &usage(1, 15, 512), 2, 512).unwrap_err(),
            "vcpu limit reached (15/16, this VM needs 2)"
        );
        assert!(check_new_vm(&q, &usage(1, 15, 512), 1, 512).is_ok());
        assert_eq!(
            check_new_vm(&q, &usage(1, 1, 16000), 1, 512).unwrap_err(),
            "memory limit reached (16000/16384 MiB, this VM needs 512)"
        );
    }

    #[test]
    fn snapshot_and_stored_limits() {
        let q = Quota::default();
        assert_eq!(
            check_snapshot_count(&q, 10).unwrap_err(),
            "snapshot limit reached (10/10)"
        );
        assert!(check_snapshot_count(&q, 9).is_ok());
        let q = Quota {
            stored_bytes: 1000,
            ..q
        };
        assert!(check_stored(&q, 999, 0).is_ok());
        assert!(check_stored(&q, 1000, 0).is_err(), "full: nothing more");
        assert_eq!(
            check_stored(&q, 600, 500).unwrap_err(),
            "stored bytes limit reached (600/1000, this needs 500 more)"
        );
        assert!(check_stored(&q, 500, 500).is_ok());
    }

    #[test]
    fn own_limits_override_the_defaults_one_by_one() {
        let own = OwnerLimits {
            vms: Some(50),
            snapshots_per_vm: Some(0),
            ..Default::default()
        };
        let q = effective(&Quota::default(), &own);
        assert_eq!(q.vms, 50);
        assert_eq!(q.snapshots_per_vm, 0);
        assert_eq!(q.vcpus, Quota::default().vcpus);
    }

    #[test]
    fn host_capacity() {
        let mut l = crate::config::Config::from_lookup(|_| None).unwrap().limits;
        l.host_reserve_mib = 1024;
        l.memory_overcommit = 1.0;
        // This machine: 24 GiB, two 16 GiB VMs do not fit.
        let cap = host_capacity_mib(24 * 1024, &l);
        assert_eq!(cap, 23 * 1024);
        assert!(fits_host(cap, 0, 16384, 128));
        assert!(!fits_host(cap, 16384 + 128, 16384, 128));
        l.memory_overcommit = 2.0;
        let cap = host_capacity_mib(24 * 1024, &l);
        assert!(fits_host(cap, 16384 + 128, 16384, 128));
    }
}
