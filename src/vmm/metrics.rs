//! A running VMM's counters in one shape for every backend (`GET /vms/{id}/metrics`).
//!
//! What every backend has comes from the host (`/proc/PID`: the VMM's CPU
//! time, resident memory, start time); block and network counters come
//! from the backend itself (QEMU: QMP and the TAP; Firecracker: its metrics
//! file). Network directions are the guest's: `rx` is what the guest received.

use serde::Serialize;

/// Block device counters, summed over the VM's disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BlockCounters {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

/// Network counters of the VM's NIC, as the guest sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NetCounters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// One VMM's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VmmMetrics {
    /// CPU time the VMM process used (all its threads, user + system), in µs.
    pub cpu_time_micros: u64,
    /// The VMM's resident memory (guest RAM it touched plus its own).
    pub rss_bytes: u64,
    /// Seconds since this VMM process started (a restore starts a new one).
    pub uptime_seconds: u64,
    pub block: BlockCounters,
    pub net: NetCounters,
    /// The backend's own counters, as it reports them.
    pub raw: serde_json::Value,
}

/// CPU time, RSS and uptime of process `pid`, from /proc. `None` when it is gone.
pub fn process_metrics(pid: u32) -> Option<VmmMetrics> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime 15, starttime 22.
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    // SAFETY: sysconf with a valid name has no preconditions.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|t| *t > 0)?;
    let page = u64::try_from(unsafe {
        // SAFETY: as above.
        libc::sysconf(libc::_SC_PAGESIZE)
    })
    .ok()?;
    let cpu_ticks = field(14)? + field(15)?;
    let started = field(22)?;
    let rss_pages = f.get(24 - 3).and_then(|v| v.parse::<u64>().ok())?;
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()?;
    Some(VmmMetrics {
        cpu_time_micros: cpu_ticks * 1_000_000 / ticks,
        rss_bytes: rss_pages * page,
        uptime_seconds: (uptime - started as f64 / ticks as f64).max(0.0) as u64,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that burns CPU and holds memory shows both, and more of
    /// the first as it runs on.
    #[test]
    fn a_busy_process_shows_its_cpu_time_and_memory() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(600));
        let first = process_metrics(child.id()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(600));
        let second = process_metrics(child.id()).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(first.cpu_time_micros > 100_000, "{first:?}");
        assert!(second.cpu_time_micros > first.cpu_time_micros);
        assert!(first.rss_bytes > 100 * 1024, "{first:?}");
        assert!(first.uptime_seconds < 60);
        assert!(process_metrics(child.id()).is_none());
    }
}
