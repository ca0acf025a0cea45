//! Finding and killing VMM processes by what their command line names, and
//! starting them in a network namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Pids of processes (other than ourselves) whose command line contains `needle`.
pub fn pids_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| {
                    let text: Vec<u8> = raw
                        .iter()
                        .map(|b| if *b == 0 { b' ' } else { *b })
                        .collect();
                    String::from_utf8_lossy(&text).contains(needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The last `max` bytes (at most) of a log file, trimmed: what a VMM said
/// before it failed, for the error the caller gets.
pub fn tail_of(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].trim().to_string()
}

pub fn is_alive(pid: u32) -> bool {
    // A zombie has exited already; only its parent's wait is missing.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z"),
        Err(_) => false,
    }
}

/// SIGKILLs `pid` and waits (bounded) until it is gone.
pub fn kill_and_wait(pid: u32, limit: Duration) -> bool {
    // SAFETY: kill(2) with a pid and signal number has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !is_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !is_alive(pid)
}

/// Kills every process that mentions `dir` on its command line: the VMMs of
/// VMs under it. Returns how many were killed.
pub fn kill_all_under(dir: &Path) -> usize {
    let needle = format!("{}/", dir.display());
    let pids = pids_mentioning(&needle);
    for pid in &pids {
        kill_and_wait(*pid, Duration::from_secs(5));
    }
    pids.len()
}

/// Where `ip netns` keeps named network namespaces (bind mounts of nsfs files).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Makes `cmd`'s child join the network namespace `name` between fork and
/// exec, so the program itself (not a wrapper) is the child: the pid the
/// caller gets is the VMM's, and its command line is the VMM's, which
/// `kill_all_under` relies on. The returned file must stay open until the
/// child is spawned; it is close-on-exec, so the child does not keep it.
pub fn join_netns_on_exec(cmd: &mut tokio::process::Command, name: &str) -> std::io::Result<File> {
    let ns = File::open(netns_path(name))
        .map_err(|e| std::io::Error::new(e.kind(), format!("network namespace {name}: {e}")))?;
    let fd = ns.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setns(2), which is async-signal-safe; `fd` stays open in the child
    // because the parent keeps `ns` open until after spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(ns)
}
