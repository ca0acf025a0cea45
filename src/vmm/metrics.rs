//! A running VMM's counters in one shape for every backend (`GET /vms/{id}/metrics`).
//!
//! What every backend has comes from the host (`/proc/PID`: the VMM's CPU
//! time, resident memory, start time); block and network counters come
//! from the backend itself (QEMU: QMP and the TAP; Firecracker: its metrics
//! file). Network directions are the guest's: `rx` is what the guest received.

use serde::Serialize;

/// Block device counters, summed over the VM's disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BlockCounters {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

/// Network counters of the VM's NIC, as the guest sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
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

/// A TAP's counters as the host sees them (its `rx` is what the guest sent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TapCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

impl TapCounters {
    /// The same counters from the guest's side of the wire: what the host
    /// sent into the TAP, the guest received.
    pub fn guest_view(&self) -> NetCounters {
        NetCounters {
            rx_bytes: self.tx_bytes,
            tx_bytes: self.rx_bytes,
            rx_packets: self.tx_packets,
            tx_packets: self.rx_packets,
        }
    }
}

/// The counters of network device `iface` in the network namespace process
/// `pid` runs in. The VMM's own `/proc/PID/net/dev` sees its namespace, so
/// a TAP inside a VM's namespace is read without entering it. `None` when
/// the process or the device is gone.
pub fn tap_counters(pid: u32, iface: &str) -> Option<TapCounters> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    parse_net_dev(&text, iface)
}

/// `iface`'s line of a `/proc/net/dev` table: after `NAME:`, eight receive
/// columns (bytes, packets, errs, drop, fifo, frame, compressed, multicast)
/// then eight transmit ones (bytes, packets, errs, drop, ...).
fn parse_net_dev(text: &str, iface: &str) -> Option<TapCounters> {
    let line = text.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        (name.trim() == iface).then_some(rest)
    })?;
    let cols: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    if cols.len() < 16 {
        return None;
    }
    Some(TapCounters {
        rx_bytes: cols[0],
        rx_packets: cols[1],
        rx_dropped: cols[3],
        tx_bytes: cols[8],
        tx_packets: cols[9],
        tx_dropped: cols[11],
    })
}

/// How busy the vCPUs were on average since the VMM started, in percent:
/// its CPU time over `uptime_seconds x vcpus` (at least one second, so a
/// VMM in its first second is not divided by zero), clamped to 0..=100
/// (the VMM's own threads can add to the vCPUs' time), one decimal.
pub fn utilization_percent(cpu_time_micros: u64, uptime_seconds: u64, vcpus: u32) -> f64 {
    let available = uptime_seconds.max(1) as f64 * f64::from(vcpus.max(1)) * 1e6;
    let percent = (cpu_time_micros as f64 / available * 100.0).clamp(0.0, 100.0);
    (percent * 10.0).round() / 10.0
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
        // A shared machine may give the loop little CPU: wait for some, boundedly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let busy = |least: u64| loop {
            let m = process_metrics(child.id()).unwrap();
            if m.cpu_time_micros > least || std::time::Instant::now() > deadline {
                return m;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let first = busy(100_000);
        let second = busy(first.cpu_time_micros);
        let _ = child.kill();
        let _ = child.wait();
        assert!(first.cpu_time_micros > 100_000, "{first:?}");
        assert!(second.cpu_time_micros > first.cpu_time_micros);
        assert!(first.rss_bytes > 100 * 1024, "{first:?}");
        assert!(first.uptime_seconds < 60);
        assert!(process_metrics(child.id()).is_none());
    }

    /// Two devices in a real-shaped table (the header included): the one
    /// asked for is read column by column, and the guest's view swaps them.
    #[test]
    fn a_taps_line_of_proc_net_dev_is_read_and_seen_from_the_guest() {
        let table = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0
htabc:    5000      40    1    2    0     0          0         0    90000      70    0    3    0     0       0          0
";
        let tap = parse_net_dev(table, "htabc").unwrap();
        assert_eq!(
            tap,
            TapCounters {
                rx_bytes: 5000,
                rx_packets: 40,
                rx_dropped: 2,
                tx_bytes: 90000,
                tx_packets: 70,
                tx_dropped: 3,
            }
        );
        assert_eq!(
            tap.guest_view(),
            NetCounters {
                rx_bytes: 90000,
                tx_bytes: 5000,
                rx_packets: 70,
                tx_packets: 40,
            }
        );
        assert_eq!(parse_net_dev(table, "htab"), None);
        assert_eq!(parse_net_dev(table, "face |bytes"), None);
        // This process's own namespace has a loopback device.
        assert!(tap_counters(std::process::id(), "lo").is_some());
        assert!(tap_counters(std::process::id(), "no-such-device").is_none());
    }

    #[test]
    fn utilization_is_cpu_time_over_uptime_and_vcpus_clamped() {
        // 3 s of CPU in 10 s on 2 vCPUs: 15 %.
        assert_eq!(utilization_percent(3_000_000, 10, 2), 15.0);
        assert_eq!(utilization_percent(1_234_567, 10, 1), 12.3);
        // More CPU than the vCPUs had (the VMM's own threads): at most 100.
        assert_eq!(utilization_percent(50_000_000, 10, 2), 100.0);
        // The first second counts as one second.
        assert_eq!(utilization_percent(500_000, 0, 1), 50.0);
        assert_eq!(utilization_percent(0, 0, 0), 0.0);
    }
}
