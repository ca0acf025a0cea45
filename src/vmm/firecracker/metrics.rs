//! Firecracker's metrics file folded into running totals: each line it writes holds the counts since the line before.

use crate::vmm::metrics::{BlockCounters, NetCounters};
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek};
use std::path::Path;

/// What the daemon keeps in the work directory (root's, not the VMM's):
/// the sums of every line read so far, how far the file was read, and the
/// latest line as it came.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    pub consumed: u64,
    pub block: Counts<4>,
    pub net: Counts<4>,
    #[serde(skip)]
    pub raw_line: Option<serde_json::Value>,
}

/// Four counters in a fixed order (see `BLOCK_KEYS`, `NET_KEYS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts<const N: usize>(pub [u64; N]);

impl<const N: usize> Default for Counts<N> {
    fn default() -> Self {
        Counts([0; N])
    }
}

impl<const N: usize> Serialize for Counts<N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.as_slice().serialize(s)
    }
}

impl<'de, const N: usize> Deserialize<'de> for Counts<N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<u64>::deserialize(d)?;
        v.try_into()
            .map(Counts)
            .map_err(|_| serde::de::Error::custom("wrong number of counters"))
    }
}

/// The aggregate `block` object's counters (over every drive), in `BlockCounters` order.
const BLOCK_KEYS: [&str; 4] = ["read_bytes", "write_bytes", "read_count", "write_count"];
/// The aggregate `net` object's (directions are the guest's: rx reached it).
const NET_KEYS: [&str; 4] = [
    "rx_bytes_count",
    "tx_bytes_count",
    "rx_packets_count",
    "tx_packets_count",
];

/// At most this much of the file is read per call: Firecracker writes a few
/// KiB per flush; more is not Firecracker's doing.
const MAX_READ: u64 = 16 << 20;

const TOTALS: &str = "metrics-total.json";
const RAW: &str = "metrics-latest.json";

/// The totals since this VMM started, with the latest line under `raw`.
pub struct Folded {
    pub block: BlockCounters,
    pub net: NetCounters,
    pub raw: serde_json::Value,
}

/// A new VMM starts counting from zero (its metrics file is new too).
pub fn reset(work_dir: &Path) {
    let _ = std::fs::remove_file(work_dir.join(TOTALS));
    let _ = std::fs::remove_file(work_dir.join(RAW));
}

fn add_line(t: &mut Totals, line: &serde_json::Value) {
    for (counts, object, keys) in [
        (&mut t.block, "block", BLOCK_KEYS),
        (&mut t.net, "net", NET_KEYS),
    ] {
        for (i, k) in keys.iter().enumerate() {
            let delta = line
                .get(object)
                .and_then(|o| o.get(k))
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            counts.0[i] = counts.0[i].saturating_add(delta);
        }
    }
}

/// Adds every complete line of `text` to `t`; returns the bytes used (up
/// to the last newline: a line being written is left for the next call).
pub fn fold_text(t: &mut Totals, text: &[u8]) -> u64 {
    let Some(end) = text.iter().rposition(|b| *b == b'\n') else {
        return 0;
    };
    for line in text[..end].split(|b| *b == b'\n') {
        let line: Vec<u8> = line.iter().copied().filter(|b| *b != 0).collect();
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        match serde_json::from_slice::<serde_json::Value>(&line) {
            Ok(v) => {
                add_line(t, &v);
                t.raw_line = Some(v);
            }
            Err(e) => tracing::warn!("skipping a metrics line that is not JSON: {e}"),
        }
    }
    end as u64 + 1
}

/// Reads what Firecracker wrote since the last call into the totals kept in
/// `work_dir`, and frees the disk blocks of what was read (a hole punched
/// over it: Firecracker keeps writing at its own offset, so the file's size
/// grows but the space it takes does not). Blocking.
pub fn fold(work_dir: &Path) -> Result<Folded, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let totals_path = work_dir.join(TOTALS);
    let mut t: Totals = std::fs::read(&totals_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let path = work_dir.join(super::METRICS);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len < t.consumed {
        t.consumed = 0;
    }
    f.seek(std::io::SeekFrom::Start(t.consumed))
        .map_err(|e| e.to_string())?;
    let mut text = vec![];
    (&mut f)
        .take(MAX_READ)
        .read_to_end(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    t.consumed += fold_text(&mut t, &text);
    let page = 4096;
    let punch = t.consumed / page * page;
    if punch > 0 {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate on an fd we own, with a range inside the file.
        unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                punch as libc::off_t,
            );
        }
    }
    let raw = match t.raw_line.take() {
        Some(v) => {
            let _ = std::fs::write(work_dir.join(RAW), v.to_string());
            v
        }
        None => std::fs::read(work_dir.join(RAW))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null),
    };
    let tmp = work_dir.join(format!("{TOTALS}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&t).map_err(|e| e.to_string())?)
        .and_then(|()| std::fs::rename(&tmp, &totals_path))
        .map_err(|e| format!("{}: {e}", totals_path.display()))?;
    let [read_bytes, write_bytes, read_ops, write_ops] = t.block.0;
    let [rx_bytes, tx_bytes, rx_packets, tx_packets] = t.net.0;
    Ok(Folded {
        block: BlockCounters {
            read_bytes,
            write_bytes,
            read_ops,
            write_ops,
        },
        net: NetCounters {
            rx_bytes,
            tx_bytes,
            rx_packets,
            tx_packets,
        },
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each line holds deltas: the totals are their sum; a half-written
    /// line waits for the next call, and the file's blocks are given back.
    #[test]
    fn totals_are_the_sum_of_every_line_read_once() {
        let dir = std::env::temp_dir().join(format!("hatch-fc-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(super::super::METRICS);
        let line = |r: u64, rx: u64| {
            format!(
                "{{\"block\":{{\"read_bytes\":{r},\"write_bytes\":1,\"read_count\":2,\"write_count\":3}},\"net\":{{\"rx_bytes_count\":{rx},\"tx_bytes_count\":5,\"rx_packets_count\":6,\"tx_packets_count\":7}},\"pad\":\"{}\"}}\n",
                "x".repeat(3000)
            )
        };
        reset(&dir);
        std::fs::write(&file, line(100, 10) + &line(50, 1)).unwrap();
        let a = fold(&dir).unwrap();
        assert_eq!(a.block.read_bytes, 150);
        assert_eq!(a.block.write_ops, 6);
        assert_eq!(a.net.rx_bytes, 11);
        assert_eq!(a.net.tx_packets, 14);
        assert_eq!(a.raw["block"]["read_bytes"], 50);
        // Nothing new: the same totals, not counted twice.
        let b = fold(&dir).unwrap();
        assert_eq!((b.block, b.net), (a.block, a.net));
        // A line and a half more.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        let next = line(7, 0);
        f.write_all(next.as_bytes()).unwrap();
        f.write_all(&next.as_bytes()[..100]).unwrap();
        let c = fold(&dir).unwrap();
        assert_eq!(c.block.read_bytes, 157);
        f.write_all(&next.as_bytes()[100..]).unwrap();
        let d = fold(&dir).unwrap();
        assert_eq!(d.block.read_bytes, 164);
        // Blocks before what was read are freed.
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&file).unwrap();
        assert!(
            m.blocks() * 512 < m.len(),
            "{} blocks for {} bytes",
            m.blocks(),
            m.len()
        );
        // A new VMM starts from zero.
        reset(&dir);
        std::fs::write(&file, line(1, 1)).unwrap();
        assert_eq!(fold(&dir).unwrap().block.read_bytes, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
