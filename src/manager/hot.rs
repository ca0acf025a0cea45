//! Hot copies: a sleeping VM's guest RAM and device state kept in host
//! memory, so that its wake maps the RAM instead of fetching it.
//!
//! A Standby capture that ends its VMM (Hatch's snapshot, idle sleep) of a
//! backend whose guest RAM is shared memory (`Capabilities::shared_ram`)
//! keeps the RAM's memfd open once the VMM has exited, with the device state
//! it saved and a stamp of the disk file. Only the daemon holds the memfd
//! then, so nothing else can write to it. A restore of that VM from that
//! very snapshot (wake, `POST /vms/{id}/restore`) takes it: the RAM becomes
//! the new VMM's RAM with no copy, the disk is used in place if its stamp is
//! unchanged, and nothing is read from the store. Any other restore of the
//! VM drops it (stale). The durable copy in the store is written before the
//! snapshot is reported stored, as without a hot copy.
//!
//! Hot copies live only in this process: a daemon that exits or crashes
//! leaves no file behind, and its VMs wake from the store. Deep sleep drops
//! one after `HATCH_HOT_SLEEP_SECONDS`, when all of them would exceed
//! `HATCH_HOT_MEMORY_MAX`, or when the host needs the memory for a VM.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One VM's hot copy.
pub(super) struct HotCopy {
    /// The snapshot whose memory and device state this is.
    pub snapshot_id: String,
    /// Guest RAM (a memfd only this process holds).
    pub ram: File,
    /// The device state the VMM saved with it.
    pub state: Vec<u8>,
    /// The VM's disk file as it was when its VMM had exited.
    pub disk: Option<DiskStamp>,
    pub bytes: u64,
    pub since: Instant,
}

/// What tells a file unchanged: the same inode, size and times. Any write,
/// truncation, rename over it or metadata change moves one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DiskStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl DiskStamp {
    pub fn of(path: &Path) -> Option<DiskStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).ok()?;
        m.is_file().then(|| DiskStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

#[derive(Default)]
pub(super) struct HotCopies {
    by_vm: Mutex<HashMap<String, HotCopy>>,
}

impl HotCopies {
    /// Keeps `copy` as `vm_id`'s (one a VM had before goes).
    pub fn keep(&self, vm_id: &str, copy: HotCopy) {
        self.by_vm.lock().unwrap().insert(vm_id.to_string(), copy);
    }

    /// `vm_id`'s hot copy if it is `snapshot_id`'s; one of another snapshot
    /// is stale and dropped. Either way the VM has none afterwards: a
    /// restore consumes it (the new VMM writes to that RAM).
    pub fn take(&self, vm_id: &str, snapshot_id: &str) -> Option<HotCopy> {
        let copy = self.by_vm.lock().unwrap().remove(vm_id)?;
        if copy.snapshot_id == snapshot_id {
            return Some(copy);
        }
        tracing::info!(vm = %vm_id, hot = %copy.snapshot_id, wanted = %snapshot_id, "stale hot copy dropped");
        None
    }

    /// Drops `vm_id`'s hot copy, if any; true if there was one.
    pub fn drop_vm(&self, vm_id: &str) -> bool {
        self.by_vm.lock().unwrap().remove(vm_id).is_some()
    }

    #[cfg(test)]
    pub fn snapshot_of(&self, vm_id: &str) -> Option<String> {
        let map = self.by_vm.lock().unwrap();
        map.get(vm_id).map(|c| c.snapshot_id.clone())
    }

    /// Bytes held by all hot copies.
    pub fn total(&self) -> u64 {
        self.by_vm.lock().unwrap().values().map(|c| c.bytes).sum()
    }

    /// Bytes held by every hot copy but `vm_id`'s.
    pub fn bytes_except(&self, vm_id: &str) -> u64 {
        let map = self.by_vm.lock().unwrap();
        map.iter()
            .filter(|(id, _)| id.as_str() != vm_id)
            .map(|(_, c)| c.bytes)
            .sum()
    }

    /// Drops the oldest hot copy that is not `vm_id`'s; its VM id, if any.
    pub fn evict_oldest_except(&self, vm_id: &str) -> Option<String> {
        let mut map = self.by_vm.lock().unwrap();
        let oldest = map
            .iter()
            .filter(|(id, _)| id.as_str() != vm_id)
            .min_by_key(|(_, c)| c.since)
            .map(|(id, _)| id.clone())?;
        map.remove(&oldest);
        Some(oldest)
    }

    /// Drops every hot copy kept longer than `ttl`; their VM ids.
    pub fn expire(&self, ttl: Duration) -> Vec<String> {
        let mut map = self.by_vm.lock().unwrap();
        let old: Vec<String> = map
            .iter()
            .filter(|(_, c)| c.since.elapsed() >= ttl)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &old {
            map.remove(id);
        }
        old
    }
}

impl super::Manager {
    /// Deep sleep on a timer: hot copies older than `HATCH_HOT_SLEEP_SECONDS`
    /// go, so VMs that sleep long hold no host memory.
    pub(super) fn spawn_deep_sleep(self: &std::sync::Arc<Self>) {
        let ttl = self.config.idle.hot_sleep;
        if ttl.is_zero() {
            return;
        }
        let every = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        let mgr = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(mgr) = mgr.upgrade() else { return };
                let gone = mgr.hot.expire(ttl);
                if !gone.is_empty() {
                    mgr.telemetry.hot_copies(mgr.hot.total());
                    tracing::info!(vms = ?gone, "deep sleep: hot copies past HATCH_HOT_SLEEP_SECONDS dropped");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(snapshot: &str, bytes: u64) -> HotCopy {
        HotCopy {
            snapshot_id: snapshot.into(),
            ram: crate::vmm::ram::create(bytes).unwrap(),
            state: vec![],
            disk: None,
            bytes,
            since: Instant::now(),
        }
    }

    #[test]
    fn a_hot_copy_serves_only_its_own_snapshot_once() {
        let hot = HotCopies::default();
        hot.keep("vm_a", copy("snap_1", 4096));
        assert!(hot.take("vm_a", "snap_2").is_none(), "another snapshot's");
        assert!(
            hot.take("vm_a", "snap_1").is_none(),
            "the stale one is gone"
        );
        hot.keep("vm_a", copy("snap_1", 4096));
        assert_eq!(hot.take("vm_a", "snap_1").unwrap().snapshot_id, "snap_1");
        assert!(
            hot.take("vm_a", "snap_1").is_none(),
            "a restore consumes it"
        );
    }

    #[test]
    fn eviction_takes_the_oldest_other_and_expiry_the_old_ones() {
        let hot = HotCopies::default();
        hot.keep("vm_a", copy("s_a", 1 << 20));
        std::thread::sleep(Duration::from_millis(300));
        hot.keep("vm_b", copy("s_b", 2 << 20));
        std::thread::sleep(Duration::from_millis(5));
        hot.keep("vm_c", copy("s_c", 4 << 20));
        assert_eq!(hot.bytes_except("vm_c"), 3 << 20);
        assert_eq!(hot.evict_oldest_except("vm_a").as_deref(), Some("vm_b"));
        assert!(hot.snapshot_of("vm_a").is_some(), "the excepted one stays");
        assert_eq!(
            hot.expire(Duration::from_millis(250)),
            vec!["vm_a".to_string()]
        );
        assert!(hot.snapshot_of("vm_a").is_none());
    }

    #[test]
    fn a_disk_stamp_moves_with_any_write() {
        let path = std::env::temp_dir().join(format!("hatch-stamp-{}", std::process::id()));
        std::fs::write(&path, b"disk").unwrap();
        let before = DiskStamp::of(&path).unwrap();
        assert_eq!(DiskStamp::of(&path), Some(before));
        std::thread::sleep(Duration::from_millis(10));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"D", 0))
            .unwrap();
        assert_ne!(DiskStamp::of(&path), Some(before), "same size, new bytes");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(DiskStamp::of(&path), None);
    }
}
