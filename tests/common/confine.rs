//! Reading a process's confinement from the host: /proc status fields, its
//! cgroups (v1 hierarchies under /sys/fs/cgroup) and what its mount namespace shows.

use std::path::{Path, PathBuf};

/// `Name:\tvalue` fields of /proc/PID/status.
pub fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The cgroup of `pid` (or "self") in the v1 hierarchy holding `controller`.
pub fn cgroup_of(pid: &str, controller: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, c, path) = (f.next()?, f.next()?, f.next()?);
            c.split(',')
                .any(|x| x == controller)
                .then(|| path.to_string())
        })
        .unwrap_or_else(|| panic!("no {controller} cgroup for {pid}: {text}"))
}

/// The directory of a cgroup path in `controller`'s hierarchy, as the host mounts it.
pub fn cgroup_dir(controller: &str, path: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(path.trim_start_matches('/'))
}

pub fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// Names in `dir` as the process `pid` sees it (through /proc/PID/root).
pub fn seen_by(pid: u32, dir: &Path) -> Vec<String> {
    let inside = Path::new(&format!("/proc/{pid}/root")).join(dir.strip_prefix("/").unwrap());
    let mut names: Vec<String> = std::fs::read_dir(&inside)
        .unwrap_or_else(|e| panic!("{}: {e}", inside.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}
