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
//! A checkpoint (the guest runs on) keeps a copy of the RAM made while the
//! guest was paused instead (capture.rs, `KeepHot::Copy`), with no disk stamp.
//!
//! Hot copies live only in this process: a daemon that exits or crashes
//! leaves no file behind, and its VMs wake from the store. Deep sleep drops
//! one after `HATCH_HOT_SLEEP_SECONDS`, when all of them would exceed
//! `HATCH_HOT_MEMORY_MAX`, when the host needs the memory for a VM, and
//! under memory pressure from anything on the host: MemAvailable below
//! `HATCH_HOT_MIN_AVAILABLE`, or the kernel's pressure stall figure above
//! `HATCH_HOT_PRESSURE_PSI`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One VM's hot copy.
pub(super) struct HotCopy {
    /// The snapshot whose memory and device state this is.
    pub snapshot_id: String,
    /// Guest RAM (a memfd only this process holds), or the kept memory file
    /// (`file`) open.
    pub ram: File,
    /// For a backend that maps its memory file privately (MappedFile without shared_ram):
    /// that file, kept in the VM's work directory, which the restore moves
    /// into place. None: `ram` is shared memory the VMM maps as its RAM.
    pub file: Option<HotFile>,
    /// The device state the VMM saved with it.
    pub state: Vec<u8>,
    /// The VM's disk file as it was when its VMM had exited.
    pub disk: Option<DiskStamp>,
    pub bytes: u64,
    pub since: Instant,
}

/// A memory file kept as a hot copy (`hot-memory-<snapshot id>` in the VM's
/// work directory), removed when dropped unless a restore moved it away.
/// Files of a daemon that crashed are removed at its next start
/// (`remove_stale_files`). They live on the data dir's filesystem, so
/// they take page cache, not RAM: they do not count in the host's memory.
pub(super) struct HotFile(Option<PathBuf>);

/// The prefix of a kept memory file's name.
const HOT_FILE_PREFIX: &str = "hot-memory-";

impl HotFile {
    /// Moves the memory file `from` (a capture's) to its kept name in `work_dir`.
    pub fn keep(from: &Path, work_dir: &Path, snapshot_id: &str) -> std::io::Result<HotFile> {
        let to = work_dir.join(format!("{HOT_FILE_PREFIX}{snapshot_id}"));
        std::fs::rename(from, &to)?;
        Ok(HotFile(Some(to)))
    }

    pub fn path(&self) -> &Path {
        self.0
            .as_deref()
            .expect("a HotFile has its path until moved")
    }

    /// Moves the file to `dest` (a restore's memory file); it is the
    /// restore's from then on.
    pub fn move_to(mut self, dest: &Path) -> std::io::Result<()> {
        let from = self.0.take().expect("a HotFile has its path until moved");
        std::fs::rename(&from, dest).inspect_err(|_| {
            let _ = std::fs::remove_file(&from);
        })
    }

    /// Removes the kept memory files in `work_dir` (a daemon that stopped
    /// or crashed holds no hot copy); how many went.
    pub fn remove_stale(work_dir: &Path) -> usize {
        let Ok(dir) = std::fs::read_dir(work_dir) else {
            return 0;
        };
        dir.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(HOT_FILE_PREFIX))
            .filter(|e| std::fs::remove_file(e.path()).is_ok())
            .count()
    }
}

impl Drop for HotFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
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

    /// Drops the hot copy of `snapshot_id` (a deleted snapshot), if any; true if there was one.
    pub fn drop_snapshot(&self, snapshot_id: &str) -> bool {
        let mut map = self.by_vm.lock().unwrap();
        let before = map.len();
        map.retain(|_, c| c.snapshot_id != snapshot_id);
        map.len() != before
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

    /// Bytes held by all hot copies (in RAM or kept files).
    pub fn total(&self) -> u64 {
        self.by_vm.lock().unwrap().values().map(|c| c.bytes).sum()
    }

    /// Bytes of host RAM held by every hot copy but `vm_id`'s (kept files
    /// are page cache, which the kernel reclaims by itself).
    pub fn bytes_except(&self, vm_id: &str) -> u64 {
        let map = self.by_vm.lock().unwrap();
        map.iter()
            .filter(|(id, c)| id.as_str() != vm_id && c.file.is_none())
            .map(|(_, c)| c.bytes)
            .sum()
    }

    /// Drops the oldest hot copy in RAM that is not `vm_id`'s; its VM id, if any.
    pub fn evict_oldest_except(&self, vm_id: &str) -> Option<String> {
        let mut map = self.by_vm.lock().unwrap();
        let oldest = map
            .iter()
            .filter(|(id, c)| id.as_str() != vm_id && c.file.is_none())
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

/// How often deep sleep looks at the host's memory while hot copies exist.
const PRESSURE_CHECK: Duration = Duration::from_secs(1);

/// The host's memory as the kernel reports it now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct HostMemory {
    pub total: u64,
    pub available: u64,
    /// `some avg10` of /proc/pressure/memory: the share of the last 10 s in
    /// which some task waited for memory (None without PSI).
    pub stall_pct: Option<f64>,
}

impl HostMemory {
    pub fn read() -> Option<HostMemory> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let psi = std::fs::read_to_string("/proc/pressure/memory").ok();
        HostMemory::parse(&meminfo, psi.as_deref())
    }

    fn parse(meminfo: &str, psi: Option<&str>) -> Option<HostMemory> {
        let kib = |key: &str| -> Option<u64> {
            let line = meminfo.lines().find(|l| l.starts_with(key))?;
            line[key.len()..]
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        };
        let stall_pct = psi.and_then(|text| {
            let some = text.lines().find(|l| l.starts_with("some "))?;
            some.split_whitespace()
                .find_map(|f| f.strip_prefix("avg10="))?
                .parse()
                .ok()
        });
        Some(HostMemory {
            total: kib("MemTotal:")? * 1024,
            available: kib("MemAvailable:")? * 1024,
            stall_pct,
        })
    }

    /// The floor of MemAvailable: the configured one, else a tenth of the
    /// host's memory and at least 256 MiB.
    pub fn floor(&self, configured: Option<u64>) -> u64 {
        configured.unwrap_or((self.total / 10).max(256 << 20))
    }
}

/// What deep sleep should drop now, given the host's memory and the hot
/// copies' sizes, oldest first: enough to bring MemAvailable back to its
/// floor (dropping a copy frees its bytes), or one copy while the stall
/// figure is above its limit.
pub(super) fn to_drop_under_pressure(
    mem: &HostMemory,
    min_available: Option<u64>,
    max_stall_pct: Option<f64>,
    oldest_first: &[u64],
) -> usize {
    let floor = mem.floor(min_available);
    let mut available = mem.available;
    let mut n = 0;
    while available < floor && n < oldest_first.len() {
        available += oldest_first[n];
        n += 1;
    }
    let stalled = matches!((mem.stall_pct, max_stall_pct), (Some(s), Some(max)) if s > max);
    if stalled && n == 0 && !oldest_first.is_empty() {
        n = 1;
    }
    n
}

impl HotCopies {
    /// The sizes of the hot copies in RAM, oldest first.
    fn sizes_oldest_first(&self) -> Vec<u64> {
        let map = self.by_vm.lock().unwrap();
        let mut v: Vec<(Instant, u64)> = map
            .values()
            .filter(|c| c.file.is_none())
            .map(|c| (c.since, c.bytes))
            .collect();
        v.sort();
        v.into_iter().map(|(_, b)| b).collect()
    }
}

impl super::Manager {
    /// Deep sleep: hot copies older than `HATCH_HOT_SLEEP_SECONDS` go, so
    /// VMs that sleep long hold no host memory, and under memory pressure
    /// the oldest go first (checked every second while any exists).
    pub(super) fn spawn_deep_sleep(self: &std::sync::Arc<Self>) {
        let ttl = self.config.idle.hot_sleep;
        if ttl.is_zero() {
            return;
        }
        let every = (ttl / 4).clamp(Duration::from_millis(100), PRESSURE_CHECK);
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
                mgr.relieve_memory_pressure();
            }
        });
    }

    /// Drops hot copies, oldest first, while the host is short of memory.
    fn relieve_memory_pressure(&self) {
        let sizes = self.hot.sizes_oldest_first();
        if sizes.is_empty() {
            return;
        }
        let Some(mem) = HostMemory::read() else {
            return;
        };
        let idle = &self.config.idle;
        let n = to_drop_under_pressure(&mem, idle.hot_min_available, idle.hot_max_psi, &sizes);
        let mut gone = vec![];
        for _ in 0..n {
            match self.hot.evict_oldest_except("") {
                Some(id) => gone.push(id),
                None => break,
            }
        }
        if !gone.is_empty() {
            self.telemetry.hot_copies(self.hot.total());
            tracing::info!(
                vms = ?gone,
                available_mib = mem.available >> 20,
                floor_mib = mem.floor(idle.hot_min_available) >> 20,
                stall_pct = ?mem.stall_pct,
                "deep sleep: the host is short of memory; hot copies dropped"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(snapshot: &str, bytes: u64) -> HotCopy {
        HotCopy {
            snapshot_id: snapshot.into(),
            ram: crate::vmm::ram::create(bytes).unwrap(),
            file: None,
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

    const MEMINFO: &str = "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:    4096000 kB\nBuffers:  1 kB\n";
    const PSI: &str = "some avg10=12.50 avg60=3.00 avg300=0.50 total=1234\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=5\n";

    #[test]
    fn host_memory_reads_meminfo_and_psi() {
        let m = HostMemory::parse(MEMINFO, Some(PSI)).unwrap();
        assert_eq!(m.total, 24576000 * 1024);
        assert_eq!(m.available, 4096000 * 1024);
        assert_eq!(m.stall_pct, Some(12.5));
        assert_eq!(HostMemory::parse(MEMINFO, None).unwrap().stall_pct, None);
        assert!(HostMemory::parse("MemTotal: 1 kB\n", None).is_none());
        // A tenth of MemTotal, at least 256 MiB, unless configured.
        assert_eq!(m.floor(None), 24576000 * 1024 / 10);
        let small = HostMemory {
            total: 1 << 30,
            available: 0,
            stall_pct: None,
        };
        assert_eq!(small.floor(None), 256 << 20);
        assert_eq!(m.floor(Some(5)), 5);
    }

    #[test]
    fn pressure_drops_the_oldest_until_available_is_back_or_one_per_stall() {
        let gib = 1u64 << 30;
        let mem = |available: u64, stall: Option<f64>| HostMemory {
            total: 16 * gib,
            available,
            stall_pct: stall,
        };
        let sizes = [gib / 2, gib, 2 * gib];
        // Floor 1.6 GiB (a tenth): 1 GiB available needs the first (0.5) and second (1).
        assert_eq!(
            to_drop_under_pressure(&mem(gib, None), None, Some(10.0), &sizes),
            2
        );
        assert_eq!(
            to_drop_under_pressure(&mem(8 * gib, None), None, Some(10.0), &sizes),
            0
        );
        // Not enough hot copies to get there: all of them.
        assert_eq!(
            to_drop_under_pressure(&mem(0, None), Some(100 * gib), None, &sizes),
            3
        );
        // Stalls above the limit: one per check; below or off: none.
        assert_eq!(
            to_drop_under_pressure(&mem(8 * gib, Some(12.5)), None, Some(10.0), &sizes),
            1
        );
        assert_eq!(
            to_drop_under_pressure(&mem(8 * gib, Some(9.0)), None, Some(10.0), &sizes),
            0
        );
        assert_eq!(
            to_drop_under_pressure(&mem(8 * gib, Some(99.0)), None, None, &sizes),
            0
        );
        assert_eq!(
            to_drop_under_pressure(&mem(0, Some(99.0)), None, Some(1.0), &[]),
            0
        );
    }
}
