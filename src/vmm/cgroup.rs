//! One cgroup per VMM (CPU, memory and pids limits), made below the daemon's own cgroup.
//!
//! The daemon manages only the subtree it was started in (as under systemd
//! delegation): VM cgroups are `<own cgroup>/hatch-<tag>/<vm id>` in each
//! hierarchy, `<tag>` naming the data directory, so daemons sharing a cgroup
//! never touch each other's VMs. cgroup v2 is used when the daemon's v2
//! cgroup offers cpu, memory and pids; otherwise the v1 hierarchies of those
//! controllers (these machines).

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The CFS period; a VM gets `vcpu_count` periods of CPU time per period.
const CPU_PERIOD_US: u64 = 100_000;

/// The limits of one VMM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    pub memory_bytes: u64,
    pub pids: u64,
}

impl Limits {
    /// CPU: one core per vCPU thread plus one for QEMU's own threads (main
    /// loop, device emulation, I/O): a guest can never use more than its
    /// vCPUs anyway, the limit is for the rest; a quota of only the vCPUs
    /// throttled a booting guest (bench/boot: 1.39x slower at the median).
    /// Memory: guest RAM plus the VMM's own overhead. Pids: QEMU's threads
    /// (one per vCPU, its I/O worker pool of up to 64, RCU and main loop)
    /// with room to spare; it cannot fork (seccomp).
    pub fn for_vm(vcpu_count: u32, mem_mib: u32, overhead_mib: u32) -> Limits {
        Limits {
            cpu_quota_us: (u64::from(vcpu_count.max(1)) + 1) * CPU_PERIOD_US,
            cpu_period_us: CPU_PERIOD_US,
            memory_bytes: (u64::from(mem_mib) + u64::from(overhead_mib)) << 20,
            pids: 128 + 2 * u64::from(vcpu_count),
        }
    }
}

#[derive(Debug, Clone)]
enum Layout {
    /// `hatch-<tag>` directories, one in each of the cpu, memory and pids hierarchies.
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
        pids: PathBuf,
    },
    /// The `hatch-<tag>` directory in the unified hierarchy.
    V2(PathBuf),
}

/// Where this daemon's VM cgroups live.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
}

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> String {
    format!("{what}: {e}")
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|e| io_err(format!("writing {value:?} to {}", path.display()), e))
}

/// The cgroup of this process in the v1 hierarchy holding `controller`, or
/// in the unified one (`controller` empty), from /proc/self/cgroup text.
pub fn own_cgroup(proc_self_cgroup: &str, controller: &str) -> Option<String> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut f = line.splitn(3, ':');
        let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let wanted = if controller.is_empty() {
            id == "0" && controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        wanted.then(|| path.to_string())
    })
}

/// Mount points of cgroup filesystems from /proc/self/mountinfo text:
/// (mount point, `None` for v2 or `Some(super options)` for v1).
fn cgroup_mounts(mountinfo: &str) -> Vec<(PathBuf, Option<String>)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let _source = r.next()?;
            let options = r.next().unwrap_or("");
            match fstype {
                "cgroup2" => Some((PathBuf::from(mount_point), None)),
                "cgroup" => Some((PathBuf::from(mount_point), Some(options.to_string()))),
                _ => None,
            }
        })
        .collect()
}

/// A daemon in a mount namespace of its own without the cgroup filesystems
/// (`ip netns exec` mounts a fresh /sys) mounts the hierarchies it is in at
/// /sys/fs/cgroup, as systemd does. Only ever in a private namespace: the
/// host's mounts are never touched.
fn mount_hierarchies(own: &str) -> Result<(), String> {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    if ns("self").is_none() || ns("self") == ns("1") {
        return Err("no cgroup filesystem is mounted".into());
    }
    let c = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let mount = |fstype: &str, dir: &str, options: &str| -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(format!("creating {dir}"), e))?;
        let (fs, target, opts) = (c(fstype)?, c(dir)?, c(options)?);
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                fs.as_ptr(),
                target.as_ptr(),
                fs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(io_err(
                format!("mounting {fstype} {options} at {dir}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    };
    mount("tmpfs", "/sys/fs/cgroup", "mode=0755")?;
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(controllers)) = (f.next(), f.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            mount("cgroup2", "/sys/fs/cgroup/unified", "")?;
        } else if !controllers.is_empty() && !controllers.starts_with("name=") {
            mount(
                "cgroup",
                &format!("/sys/fs/cgroup/{controllers}"),
                controllers,
            )?;
        }
    }
    Ok(())
}

fn join(mount: &Path, cgroup: &str) -> PathBuf {
    mount.join(cgroup.trim_start_matches('/'))
}

impl Cgroups {
    /// Finds the hierarchies and makes this daemon's `hatch-<tag>` cgroups.
    pub fn setup(tag: &str) -> Result<Cgroups, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| io_err("/proc/self/cgroup", e))?;
        let read_mounts = || {
            std::fs::read_to_string("/proc/self/mountinfo")
                .map(|m| cgroup_mounts(&m))
                .map_err(|e| io_err("/proc/self/mountinfo", e))
        };
        let mut mounts = read_mounts()?;
        if mounts.is_empty() {
            mount_hierarchies(&own)?;
            mounts = read_mounts()?;
        }
        let name = format!("hatch-{tag}");
        if let Some(layout) = Self::v2(&own, &mounts, &name)? {
            return Ok(Cgroups { layout });
        }
        let dir_for = |controller: &str| -> Result<PathBuf, String> {
            let (mount, _) = mounts
                .iter()
                .find(|(_, o)| {
                    o.as_deref()
                        .is_some_and(|o| o.split(',').any(|x| x == controller))
                })
                .ok_or_else(|| format!("no cgroup hierarchy has the {controller} controller"))?;
            let path = own_cgroup(&own, controller)
                .ok_or_else(|| format!("/proc/self/cgroup names no {controller} cgroup"))?;
            let dir = join(mount, &path).join(&name);
            std::fs::create_dir_all(&dir)
                .map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
            Ok(dir)
        };
        Ok(Cgroups {
            layout: Layout::V1 {
                cpu: dir_for("cpu")?,
                memory: dir_for("memory")?,
                pids: dir_for("pids")?,
            },
        })
    }

    /// The unified hierarchy, when the daemon's cgroup there offers cpu, memory and pids.
    fn v2(
        own: &str,
        mounts: &[(PathBuf, Option<String>)],
        name: &str,
    ) -> Result<Option<Layout>, String> {
        let Some((mount, _)) = mounts.iter().find(|(_, o)| o.is_none()) else {
            return Ok(None);
        };
        let Some(path) = own_cgroup(own, "") else {
            return Ok(None);
        };
        let mine = join(mount, &path);
        let offered = std::fs::read_to_string(mine.join("cgroup.controllers")).unwrap_or_default();
        let offered: Vec<&str> = offered.split_whitespace().collect();
        if !["cpu", "memory", "pids"]
            .iter()
            .all(|c| offered.contains(c))
        {
            return Ok(None);
        }
        let enable = "+cpu +memory +pids";
        if write(&mine.join("cgroup.subtree_control"), enable).is_err() {
            // v2 allows no processes in a cgroup that hands controllers down:
            // the daemon moves itself into a leaf of its own cgroup first, as
            // systemd's delegation rules ask.
            let leaf = mine.join("hatch-daemon");
            std::fs::create_dir_all(&leaf)
                .map_err(|e| io_err(format!("creating {}", leaf.display()), e))?;
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
            write(&mine.join("cgroup.subtree_control"), enable)?;
        }
        let base = mine.join(name);
        std::fs::create_dir_all(&base)
            .map_err(|e| io_err(format!("creating {}", base.display()), e))?;
        write(&base.join("cgroup.subtree_control"), enable)?;
        Ok(Some(Layout::V2(base)))
    }

    pub fn version(&self) -> u8 {
        match self.layout {
            Layout::V1 { .. } => 1,
            Layout::V2(_) => 2,
        }
    }

    fn bases(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::V1 { cpu, memory, pids } => vec![cpu, memory, pids],
            Layout::V2(base) => vec![base],
        }
    }

    /// The VM's cgroup directories (one per hierarchy).
    pub fn dirs_of(&self, vm_id: &str) -> Vec<PathBuf> {
        self.bases().into_iter().map(|b| b.join(vm_id)).collect()
    }

    /// Makes (or reuses) the VM's cgroup with `limits`; returns the
    /// `cgroup.procs` files the VMM writes itself into before it execs.
    pub fn create(&self, vm_id: &str, limits: &Limits) -> Result<Vec<CString>, String> {
        let made = self.create_inner(vm_id, limits);
        if made.is_err() {
            self.remove(vm_id);
        }
        made
    }

    fn create_inner(&self, vm_id: &str, l: &Limits) -> Result<Vec<CString>, String> {
        let dirs = self.dirs_of(vm_id);
        for d in &dirs {
            std::fs::create_dir_all(d)
                .map_err(|e| io_err(format!("creating cgroup {}", d.display()), e))?;
        }
        match &self.layout {
            Layout::V1 { .. } => {
                write(
                    &dirs[0].join("cpu.cfs_period_us"),
                    &l.cpu_period_us.to_string(),
                )?;
                write(
                    &dirs[0].join("cpu.cfs_quota_us"),
                    &l.cpu_quota_us.to_string(),
                )?;
                write(
                    &dirs[1].join("memory.limit_in_bytes"),
                    &l.memory_bytes.to_string(),
                )?;
                write(&dirs[2].join("pids.max"), &l.pids.to_string())?;
            }
            Layout::V2(_) => {
                let d = &dirs[0];
                write(
                    &d.join("cpu.max"),
                    &format!("{} {}", l.cpu_quota_us, l.cpu_period_us),
                )?;
                write(&d.join("memory.max"), &l.memory_bytes.to_string())?;
                write(&d.join("pids.max"), &l.pids.to_string())?;
            }
        }
        dirs.iter()
            .map(|d| {
                use std::os::unix::ffi::OsStrExt;
                CString::new(d.join("cgroup.procs").as_os_str().as_bytes())
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    /// Removes the VM's cgroup: whatever still runs in it is killed first.
    /// Blocking (it waits, bounded, for the kernel to let go of exited tasks).
    pub fn remove(&self, vm_id: &str) {
        for d in self.dirs_of(vm_id) {
            remove_dir(&d);
        }
    }

    /// Start-up: removes every VM cgroup an earlier daemon on this data dir left.
    pub fn remove_all(&self) -> usize {
        let mut removed = 0;
        for base in self.bases() {
            let Ok(entries) = std::fs::read_dir(base) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_dir(&e.path());
                    removed += 1;
                }
            }
        }
        removed
    }
}

impl Cgroups {
    /// Daemon shutdown: this daemon's `hatch-<tag>` directories go when no
    /// VM cgroup is left in them (rmdir fails on a non-empty cgroup).
    pub fn remove_bases(&self) {
        for base in self.bases() {
            let _ = std::fs::remove_dir(base);
        }
    }
}

fn pids_in(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn remove_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for pid in pids_in(dir) {
            // SAFETY: kill(2) with a pid and a signal number; no memory involved.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            // Tasks that just died stay members until they are reaped.
            Err(e) if Instant::now() > deadline => {
                tracing::error!(cgroup = %dir.display(), "removing cgroup: {e}");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cgroup_per_controller() {
        let text =
            "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/svc\n0::/unified/x\n";
        assert_eq!(
            own_cgroup(text, "memory").as_deref(),
            Some("/process_api/abc")
        );
        assert_eq!(own_cgroup(text, "cpu").as_deref(), Some("/svc"));
        assert_eq!(own_cgroup(text, "cpuacct").as_deref(), Some("/svc"));
        assert_eq!(own_cgroup(text, "").as_deref(), Some("/unified/x"));
        assert_eq!(own_cgroup(text, "pids"), None);
    }

    #[test]
    fn finds_cgroup_mounts() {
        let text = "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n\
                    33 25 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:13 - cgroup cgroup rw,memory\n\
                    21 1 8:1 / / rw - ext4 /dev/sda1 rw\n";
        let m = cgroup_mounts(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0], (PathBuf::from("/sys/fs/cgroup/unified"), None));
        assert_eq!(
            m[1],
            (
                PathBuf::from("/sys/fs/cgroup/memory"),
                Some("rw,memory".into())
            )
        );
    }

    #[test]
    fn limits_follow_the_vm_size() {
        let l = Limits::for_vm(2, 512, 256);
        assert_eq!(l.cpu_quota_us, 300_000);
        assert_eq!(l.cpu_period_us, 100_000);
        assert_eq!(l.memory_bytes, 768 << 20);
        assert_eq!(l.pids, 132);
    }
}
