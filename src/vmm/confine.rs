//! Confining a child process between fork and exec: its cgroup, a mount
//! namespace showing only the files it needs, its own uid/gid, no capabilities.
//!
//! Everything is prepared in the parent (paths as C strings, files opened);
//! the child only makes system calls, which is all that is safe after a fork
//! in a multi-threaded process (no allocation, no locks).

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// One uid per running VM, from `[base, base + count)`; gid = uid. Nothing
/// on the host needs to know them (no /etc/passwd entry).
pub struct UidPool {
    base: u32,
    count: u32,
    taken: Mutex<HashMap<String, u32>>,
}

impl UidPool {
    pub fn new(base: u32, count: u32) -> UidPool {
        UidPool {
            base,
            count,
            taken: Mutex::new(HashMap::new()),
        }
    }

    /// The VM's uid: the one it holds, else a free one (starting at a place
    /// its id picks, so uids differ between VMs without a search most times).
    pub fn take(&self, vm_id: &str) -> Option<u32> {
        let mut taken = self.taken.lock().unwrap();
        if let Some(uid) = taken.get(vm_id) {
            return Some(*uid);
        }
        let start = vm_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let used: std::collections::HashSet<u32> = taken.values().copied().collect();
        let uid = (0..u64::from(self.count))
            .map(|i| self.base + ((start + i) % u64::from(self.count)) as u32)
            .find(|uid| !used.contains(uid))?;
        taken.insert(vm_id.to_string(), uid);
        Some(uid)
    }

    pub fn give_back(&self, vm_id: &str) {
        self.taken.lock().unwrap().remove(vm_id);
    }
}

/// A directory to show inside the mount namespace, at its own path.
struct Bind {
    path: CString,
    /// `/proc/self/fd/N`, N being where the child keeps the directory open
    /// (from before the tmpfs hides it): a bind mount's source must be a
    /// mount of the child's new namespace, so the child opens it itself.
    source: CString,
    fd: RawFd,
    read_only: bool,
}

/// Where the child keeps the directories it binds back open (above the
/// fds a VMM inherits, which are in place by then).
const BIND_FD_BASE: RawFd = 10;

/// A mount namespace in which `hide` (e.g. the data directory) is an empty
/// tmpfs, and only some directories under it are bound back.
pub struct MountPlan {
    hide: Vec<CString>,
    /// Directories made in the tmpfs to bind onto, parents first.
    dirs: Vec<CString>,
    binds: Vec<Bind>,
}

impl MountPlan {
    /// `show`: (directory, read-only). A directory outside every `hide`d
    /// one is visible anyway and is left as it is.
    pub fn new(hide: &[PathBuf], show: &[(PathBuf, bool)]) -> std::io::Result<MountPlan> {
        let mut dirs: Vec<PathBuf> = vec![];
        let mut binds = vec![];
        for (dir, read_only) in show {
            let Some(root) = hide.iter().find(|h| dir.starts_with(h)) else {
                continue;
            };
            if dir == root {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{} would show the whole hidden directory", dir.display()),
                ));
            }
            for a in dir.ancestors().take_while(|a| a != root) {
                if !dirs.iter().any(|d| d == a) {
                    dirs.push(a.to_path_buf());
                }
            }
            let fd = BIND_FD_BASE + binds.len() as RawFd;
            binds.push(Bind {
                path: cstring(dir)?,
                source: cstring(Path::new(&format!("/proc/self/fd/{fd}")))?,
                fd,
                read_only: *read_only,
            });
        }
        dirs.sort_by_key(|d| d.components().count());
        Ok(MountPlan {
            hide: hide.iter().map(|h| cstring(h)).collect::<Result<_, _>>()?,
            dirs: dirs.iter().map(|d| cstring(d)).collect::<Result<_, _>>()?,
            binds,
        })
    }

    /// In the child: a private mount namespace laid out as planned.
    ///
    /// # Safety
    /// Call only between fork and exec; it makes only system calls.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        let none = std::ptr::null();
        // SAFETY: (all calls below) every pointer is a NUL-terminated string
        // owned by `self`, alive for the call, or null where the call allows it.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing done here may reach the daemon's namespace.
            check(libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                none.cast(),
            ))?;
            for b in &self.binds {
                let fd = libc::open(
                    b.path.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                );
                check(fd)?;
                if fd != b.fd {
                    check(libc::dup3(fd, b.fd, libc::O_CLOEXEC))?;
                    libc::close(fd);
                }
            }
            for h in &self.hide {
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    h.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"mode=0755,size=64k".as_ptr().cast(),
                ))?;
            }
            for d in &self.dirs {
                if libc::mkdir(d.as_ptr(), 0o755) != 0 && *libc::__errno_location() != libc::EEXIST
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The daemon's umask (077) applied to mkdir: the VMM must traverse these.
                check(libc::chmod(d.as_ptr(), 0o755))?;
            }
            for b in &self.binds {
                check(libc::mount(
                    b.source.as_ptr(),
                    b.path.as_ptr(),
                    none,
                    libc::MS_BIND,
                    none.cast(),
                ))?;
                let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
                let flags = if b.read_only {
                    flags | libc::MS_RDONLY
                } else {
                    flags
                };
                check(libc::mount(none, b.path.as_ptr(), none, flags, none.cast()))?;
            }
        }
        Ok(())
    }
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes "0" (the writer itself) into each `cgroup.procs` file.
///
/// # Safety
/// Call only between fork and exec; it makes only system calls.
pub unsafe fn join_cgroups(procs: &[CString]) -> std::io::Result<()> {
    for p in procs {
        // SAFETY: `p` is a NUL-terminated path; the buffer is a static byte.
        unsafe {
            let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Puts each `(fd, at)` at fd number `at`, inherited across exec. The
/// sources are first copied above every target so no move overwrites a
/// source still to be moved.
///
/// # Safety
/// Call only between fork and exec; it makes only system calls.
pub unsafe fn place_fds(fds: &[(RawFd, RawFd)]) -> std::io::Result<()> {
    let mut high = [0 as RawFd; 8];
    assert!(fds.len() <= high.len());
    for (i, (fd, _)) in fds.iter().enumerate() {
        // SAFETY: fcntl on an fd open in this process.
        let h = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100) };
        check(h)?;
        high[i] = h;
    }
    for (i, (_, at)) in fds.iter().enumerate() {
        // SAFETY: dup2 between fds of this process; the copy at `at` is not close-on-exec.
        check(unsafe { libc::dup2(high[i], *at) })?;
        // SAFETY: closes our own temporary copy.
        unsafe { libc::close(high[i]) };
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// Becomes `uid`/`gid` with no supplementary groups and no capabilities
/// (effective, permitted, inheritable, ambient and bounding sets empty),
/// and sets no_new_privs so nothing exec'd can gain any back.
///
/// # Safety
/// Call only between fork and exec; it makes only system calls.
pub unsafe fn drop_privileges(uid: u32, gid: u32) -> std::io::Result<()> {
    // SAFETY: (all calls below) prctl/setgroups/setres*id/capset take plain
    // integers or pointers to locals that outlive the call.
    unsafe {
        // The bounding set can only be cleared while we still have CAP_SETPCAP.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setresgid(gid, gid, gid))?;
        check(libc::setresuid(uid, uid, uid))?;
        // Leaving uid 0 emptied the effective and permitted sets; the inheritable one is ours to clear.
        let header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    Ok(())
}

/// Gives `path` to `uid`/`gid` with mode `mode`, never through a symlink.
pub fn own_file(path: &Path, uid: u32, gid: u32, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// What every confined VMM of this daemon gets: a uid from the pool, a
/// cgroup (when the host has the controllers) and a view without `hidden`.
pub struct Confinement {
    pub uids: UidPool,
    pub cgroups: Option<super::cgroup::Cgroups>,
    /// Directories no VMM may see, except its own VM's parts of them (the data directory).
    pub hidden: Vec<PathBuf>,
    pub mem_overhead_mib: u32,
}

/// One VMM's confinement, ready to be entered by its child.
pub struct Jail {
    pub uid: u32,
    pub gid: u32,
    pub cgroup_procs: Vec<CString>,
    pub mounts: MountPlan,
}

impl Jail {
    /// In the child, once the fds it passes on are in place (the mount plan
    /// uses fd numbers from BIND_FD_BASE): cgroup, mount namespace.
    /// `drop_privileges` comes last.
    ///
    /// # Safety
    /// Call only between fork and exec; it makes only system calls.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        // SAFETY: the caller is between fork and exec.
        unsafe {
            join_cgroups(&self.cgroup_procs)?;
            self.mounts.enter()
        }
    }
}

impl Confinement {
    /// Gets a VM's files and cgroup ready for a VMM running as the VM's own
    /// uid. The work directory stays root's (mode 0711: the VMM can open
    /// the files it knows, never create, rename or replace one); only the
    /// files the VMM writes or reads become its own.
    pub fn prepare(&self, spec: &super::VmSpec) -> Result<Jail, String> {
        let uid = self
            .uids
            .take(&spec.vm_id)
            .ok_or_else(|| "no free uid left for a VMM (HATCH_VMM_UID_COUNT)".to_string())?;
        let jail = self.prepare_as(spec, uid);
        if jail.is_err() {
            self.release(&spec.vm_id);
        }
        jail
    }

    fn prepare_as(&self, spec: &super::VmSpec, uid: u32) -> Result<Jail, String> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let e = |what: &Path, err: std::io::Error| format!("{}: {err}", what.display());
        let gid = uid;
        std::fs::set_permissions(&spec.work_dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|err| e(&spec.work_dir, err))?;
        let console = spec.console_log();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&console)
            .map_err(|err| e(&console, err))?;
        own_file(&console, uid, gid, 0o600).map_err(|err| e(&console, err))?;
        own_file(&spec.disk, uid, gid, 0o600).map_err(|err| e(&spec.disk, err))?;
        if let Some(seed) = &spec.seed {
            own_file(seed, uid, gid, 0o400).map_err(|err| e(seed, err))?;
        }
        // An image is one directory (kernel, initrd, rootfs that the disk's
        // qcow2 overlay names by absolute path), shown read-only.
        let mut show = vec![(spec.work_dir.clone(), false)];
        for file in std::iter::once(&spec.kernel).chain(spec.initrd.as_ref()) {
            let Some(dir) = file.parent() else { continue };
            if show.iter().any(|(d, _)| d == dir) {
                continue;
            }
            if self.hidden.iter().any(|h| dir.starts_with(h)) {
                open_image_dir(dir).map_err(|err| e(dir, err))?;
            }
            show.push((dir.to_path_buf(), true));
        }
        let cgroup_procs = match &self.cgroups {
            Some(c) => c.create(
                &spec.vm_id,
                &super::cgroup::Limits::for_vm(
                    spec.vcpu_count,
                    spec.mem_mib,
                    self.mem_overhead_mib,
                ),
            )?,
            None => vec![],
        };
        let mounts = MountPlan::new(&self.hidden, &show).map_err(|err| err.to_string())?;
        Ok(Jail {
            uid,
            gid,
            cgroup_procs,
            mounts,
        })
    }

    /// After the VM's VMM exited: its cgroup goes and its uid is free again. Blocking.
    pub fn release(&self, vm_id: &str) {
        if let Some(c) = &self.cgroups {
            c.remove(vm_id);
        }
        self.uids.give_back(vm_id);
    }
}

/// An image directory inside the data directory, readable by any VMM that
/// is shown it: traversable (0711) and its files world-readable (0644).
/// Only root reaches it on the host (the data directory is 0700), and a VMM
/// sees only its own VM's image through its mount namespace.
pub fn open_image_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let mode = entry.metadata()?.permissions().mode() & 0o7777;
            if mode != 0o644 {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644))?;
            }
        }
    }
    Ok(())
}

/// Start-up: the data directory and everything in it is root's alone
/// (directories 0700, files 0600), also what an older daemon made before it
/// set its umask. Symlinks are left alone; a VMM's work directory and image
/// are opened up again, as far as it needs, when it starts.
pub fn make_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(dir)?;
    let want = if meta.is_dir() {
        0o700
    } else if meta.is_file() {
        0o600
    } else {
        return Ok(());
    };
    if meta.permissions().mode() & 0o7777 != want {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(want))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            make_private(&entry?.path())?;
        }
    }
    Ok(())
}

/// What to cover with the tmpfs to hide `dir` from an unprivileged process:
/// `dir` itself, or its highest ancestor that others cannot traverse (a
/// data directory in a 0700 temp dir): the directories down to what is
/// shown are then made anew, traversable, in the tmpfs.
pub fn hiding_root(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let mut root = dir.to_path_buf();
    for a in dir.ancestors().skip(1) {
        let traversable = std::fs::metadata(a).is_ok_and(|m| m.permissions().mode() & 0o001 != 0);
        if !traversable && a.parent().is_some() {
            root = a.to_path_buf();
        }
    }
    root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tmpfs_covers_the_highest_ancestor_others_cannot_traverse() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("hatch-hiding-{}", std::process::id()));
        let data = base.join("a/b/data");
        std::fs::create_dir_all(&data).unwrap();
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        for p in [&base, &base.join("a"), &base.join("a/b"), &data] {
            mode(p, 0o755);
        }
        assert_eq!(hiding_root(&data), data);
        mode(&base.join("a/b"), 0o700);
        assert_eq!(hiding_root(&data), base.join("a/b"));
        mode(&base.join("a"), 0o700);
        assert_eq!(hiding_root(&data), base.join("a"));
        mode(&base.join("a/b"), 0o755);
        assert_eq!(hiding_root(&data), base.join("a"));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn uids_are_distinct_per_running_vm_and_reused_after() {
        let pool = UidPool::new(1000, 3);
        let a = pool.take("vm_a").unwrap();
        assert_eq!(pool.take("vm_a"), Some(a), "a VM keeps its uid");
        let b = pool.take("vm_b").unwrap();
        let c = pool.take("vm_c").unwrap();
        let mut all = vec![a, b, c];
        all.sort();
        assert_eq!(all, vec![1000, 1001, 1002]);
        assert_eq!(pool.take("vm_d"), None, "the range is used up");
        pool.give_back("vm_b");
        assert_eq!(pool.take("vm_d"), Some(b));
    }
}
