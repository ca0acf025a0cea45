//! A bounded console.log: the VMM appends to it as always; while the VMM runs,
//! a daemon task punches holes in the head so only the last bytes stay on disk.
//!
//! Offsets never move (the file keeps its apparent size, FALLOC_FL_KEEP_SIZE),
//! so a reader following the log never has to re-sync: it skips holes with
//! `SEEK_DATA`. Nothing changes in how any backend writes the file.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

/// Holes are punched in whole blocks (a partial block would stay allocated).
const BLOCK: u64 = 4096;
/// How often the size is looked at: what a guest writes in this time may
/// exceed the cap until the next look.
const INTERVAL: Duration = Duration::from_millis(250);
/// A hole is punched once this much more can go (not for every few bytes).
const MIN_PUNCH: u64 = 64 * 1024;

/// Where the head hole of a log of `size` bytes keeping `keep` should end:
/// the last block boundary at or before `size - keep`.
pub fn hole_end(size: u64, keep: u64) -> u64 {
    size.saturating_sub(keep) / BLOCK * BLOCK
}

/// Deallocates `[0, end)` of the file at `path`; the file keeps its size and
/// reads zeros there.
fn punch_head(path: &Path, end: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            end as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Trims the log at `path` to about its last `keep` bytes if at least
/// `MIN_PUNCH` more than `punched` can go; returns where the head hole ends now.
pub fn trim(path: &Path, keep: u64, punched: u64) -> std::io::Result<u64> {
    let size = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(punched),
        Err(e) => return Err(e),
    };
    let end = hole_end(size, keep);
    // A log that starts again smaller (a new file) starts a new count.
    let punched = punched.min(size);
    if end < punched + MIN_PUNCH {
        return Ok(punched);
    }
    punch_head(path, end)?;
    Ok(end)
}

/// Keeps `path` to its last `keep` bytes until the VMM exits (`exited`),
/// then trims a last time.
pub async fn keep_tail(path: PathBuf, keep: u64, mut exited: watch::Receiver<bool>) {
    let mut punched = 0;
    let mut warned = false;
    loop {
        let done = *exited.borrow_and_update();
        match trim(&path, keep, punched) {
            Ok(p) => punched = p,
            Err(e) if !warned => {
                // A filesystem without hole punching keeps the whole log.
                tracing::warn!(path = %path.display(), "cannot trim the console log: {e}");
                warned = true;
            }
            Err(_) => {}
        }
        if done {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            changed = exited.changed() => {
                if changed.is_err() {
                    // The watcher is gone with its VMM: one last trim above, then stop.
                    let _ = trim(&path, keep, punched);
                    return;
                }
            }
        }
    }
}

/// The first offset at or after `offset` that holds data, skipping punched
/// holes; None when no data follows `offset`. A filesystem without
/// `SEEK_DATA` reports everything as data.
pub fn next_data(file: &impl AsRawFd, offset: u64) -> Option<u64> {
    // SAFETY: lseek on a file descriptor the caller owns; it moves only the
    // file position, which every read sets again explicitly.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if r >= 0 {
        return Some(r as u64);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => None,
        _ => Some(offset),
    }
}

/// Where a reader of a log of `size` bytes starts: within its last `keep`
/// bytes and past any hole.
pub fn tail_start(file: &impl AsRawFd, size: u64, keep: u64) -> u64 {
    next_data(file, size.saturating_sub(keep)).unwrap_or(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn hole_ends_on_a_block_boundary_before_the_kept_tail() {
        assert_eq!(hole_end(1000, 4096), 0);
        assert_eq!(hole_end(10 * 4096 + 5, 4096), 9 * 4096);
        assert_eq!(hole_end(10 * 4096, 4096), 9 * 4096);
    }

    #[test]
    fn trimming_frees_the_head_and_keeps_offsets() {
        let dir = std::env::temp_dir().join(format!("hatch-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let _ = std::fs::remove_file(&path);
        // Appending, as the VMM does.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let line = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
        for _ in 0..(4 << 20) / line.len() {
            f.write_all(line).unwrap();
        }
        f.sync_all().unwrap();
        let keep = 256 << 10;
        let end = trim(&path, keep, 0).unwrap();
        assert_eq!(end, hole_end(4 << 20, keep));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 4 << 20, "the size (and every offset) stays");
        assert!(
            meta.blocks() * 512 <= keep + 2 * BLOCK,
            "{} bytes still allocated",
            meta.blocks() * 512
        );
        // Appending goes on after the hole, and readers skip it.
        f.write_all(b"after the cut\n").unwrap();
        let r = std::fs::File::open(&path).unwrap();
        assert_eq!(next_data(&r, 0), Some(end));
        assert_eq!(tail_start(&r, 4 << 20, keep), (4 << 20) - keep);
        assert_eq!(next_data(&r, (4 << 20) + 14), None);
        // Nothing more to cut: no new punch.
        assert_eq!(trim(&path, keep, end).unwrap(), end);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
