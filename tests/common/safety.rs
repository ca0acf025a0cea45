//! Helpers that let end-to-end checks see a behaviour happen, not only its end:
//! a console stream read line by line, the daemon's own database and log read
//! behind its back, the local store's files.

use super::{Daemon, BASE};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// `GET /vms/{id}/logs?follow=true` held open by curl, its lines handed over
/// one by one as they arrive (a reader thread forwards them).
pub struct FollowedLogs {
    child: Child,
    lines: Receiver<String>,
    /// Every line received so far, in order.
    pub seen: Vec<String>,
}

impl FollowedLogs {
    pub fn open(d: &Daemon, vm_id: &str) -> FollowedLogs {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &d.ns, "curl", "-sSN", "--max-time", "300"])
            .arg("-H")
            .arg(format!("X-API-Key: {}", d.key))
            .arg(format!("{BASE}/vms/{vm_id}/logs?follow=true"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("start curl");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        FollowedLogs {
            child,
            lines,
            seen: vec![],
        }
    }

    /// Waits for the next line that satisfies `want` and returns it; panics
    /// if none comes within `timeout` or the stream ends first.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "the followed log showed no {what} in {timeout:?}: {:?}",
                        self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the followed log ended before {what}: {:?}", self.seen)
                }
            }
        }
    }

    /// True while curl still holds the request open.
    pub fn is_open(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the stream to end by itself; returns curl's success and
    /// every line received over the whole request.
    pub fn finish(mut self, timeout: Duration) -> (bool, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "the followed log did not end within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        // The reader thread ends with curl's stdout; collect what it still holds.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        (status.success(), std::mem::take(&mut self.seen))
    }
}

impl Drop for FollowedLogs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// One value from the daemon's SQLite file, read with the sqlite3 CLI
    /// (for what the database held when the daemon was killed).
    pub fn db_value(&self, sql: &str) -> String {
        let out = Command::new("sqlite3")
            .arg(self.data_dir.join("hatch.db"))
            .arg(sql)
            .output()
            .expect("run sqlite3");
        assert!(
            out.status.success(),
            "sqlite3 {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The daemon's log without the terminal colour codes tracing puts
    /// around field names, so `key=value` can be matched as printed.
    pub fn daemon_log_plain(&self) -> String {
        let log = self.daemon_log();
        let mut out = String::with_capacity(log.len());
        let mut chars = log.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ parameters, ended by a letter.
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    /// The store keys of the chunks of `part` (`memory` or `disk`) of
    /// `snap`, each once, in the order its manifest first lists them.
    pub fn chunk_keys(&self, snap: &str, part: &str) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.manifest_keys(snap, part)
            .into_iter()
            .filter(|k| seen.insert(k.clone()))
            .collect()
    }

    /// The store key of every entry of the manifest of `part` (`memory` or
    /// `disk`) of `snap`, in order (a chunk listed twice is there twice),
    /// from the daemon's database.
    pub fn manifest_keys(&self, snap: &str, part: &str) -> Vec<String> {
        let owner = self.db_value(&format!(
            "SELECT owner_id FROM snapshots WHERE id = '{snap}'"
        ));
        let suffixes: std::collections::HashMap<String, &str> = self
            .db_value(&format!(
                "SELECT lower(hex(hash)) || ' ' || COALESCE(encoding, '') FROM chunks WHERE owner_id = '{owner}'"
            ))
            .lines()
            .map(|l| {
                let (h, e) = l.split_once(' ').unwrap_or((l, ""));
                let suffix = match e.trim() {
                    "zstd" => ".zst",
                    "lz4" => ".lz4",
                    _ => "",
                };
                (h.to_string(), suffix)
            })
            .collect();
        let blob = self
            .db_value(&format!(
                "SELECT hex(entries) FROM manifests WHERE snapshot_id = '{snap}' AND part = '{part}'"
            ))
            .to_lowercase();
        // Entries of 36 bytes: the 32-byte hash, then the raw size.
        blob.as_bytes()
            .chunks(72)
            .map(|e| {
                let h = std::str::from_utf8(&e[..64]).unwrap();
                format!("chunks/{owner}/{}/{h}{}", &h[..2], suffixes[h])
            })
            .collect()
    }

    /// `chunk_keys` without the chunk of a file chunk's worth of zeros (a
    /// hole of a memory image or disk): a restore never reads that one, it
    /// knows what it holds. A test that corrupts a chunk to watch a restore
    /// catch it picks one of these.
    pub fn read_chunk_keys(&self, snap: &str, part: &str) -> Vec<String> {
        let zeros =
            hatch::snapshot::ChunkHash::of(&vec![0u8; hatch::snapshot::FILE_CHUNK as usize])
                .to_string();
        self.chunk_keys(snap, part)
            .into_iter()
            .filter(|k| !k.contains(&zeros))
            .collect()
    }

    /// The local store's directory of one snapshot's objects.
    pub fn snapshot_dir(&self, vm_id: &str, snap_id: &str) -> PathBuf {
        self.data_dir
            .join("objects/snapshots")
            .join(vm_id)
            .join(snap_id)
    }
}

/// Names of the files in `dir` (empty when it does not exist), sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The size of a file in `dir` whose name starts with `prefix`, if any
/// (the local store writes `KEY#PID` and renames it to `KEY` when complete).
pub fn staged_size(dir: &Path, prefix: &str) -> Option<u64> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .and_then(|e| e.metadata().ok())
        .map(|m| m.len())
}
