//! QEMU backend: one `qemu-system-x86_64` per VM, driven over QMP.

mod config;
mod qmp;

pub use config::{Accel, QemuConfig};

use super::confine::{self, Confinement, Jail};
use super::metrics::{self, VmmMetrics};
use super::{
    Capabilities, DiskFormat, KernelFormat, MemoryTransport, Result, SnapshotFiles, VmProcess,
    VmSpec, Vmm, VmmError,
};
use async_trait::async_trait;
use qmp::Qmp;
use serde_json::json;
use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The accelerator QEMU really runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedAccel {
    Kvm,
    Tcg,
}

impl ResolvedAccel {
    pub fn as_str(self) -> &'static str {
        match self {
            ResolvedAccel::Kvm => "kvm",
            ResolvedAccel::Tcg => "tcg",
        }
    }
}

/// Picks the accelerator. `auto` takes KVM only when /dev/kvm opens *and* the
/// CPU has hardware virtualization: a software KVM (no vmx/svm) is far slower
/// than TCG, so it is never chosen on its own.
pub fn choose_accel(
    requested: Accel,
    kvm_device_usable: bool,
    cpu_has_hw_virt: bool,
) -> ResolvedAccel {
    match requested {
        Accel::Kvm => ResolvedAccel::Kvm,
        Accel::Tcg => ResolvedAccel::Tcg,
        Accel::Auto if kvm_device_usable && cpu_has_hw_virt => ResolvedAccel::Kvm,
        Accel::Auto => ResolvedAccel::Tcg,
    }
}

/// Looks at this host and resolves `requested`.
pub fn detect_accel(requested: Accel) -> ResolvedAccel {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let hw = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| cpu_flags_have_hw_virt(&s))
        .unwrap_or(false);
    choose_accel(requested, kvm, hw)
}

fn cpu_flags_have_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

pub struct Qemu {
    binary: String,
    accel: ResolvedAccel,
    /// `None`: QEMU runs as root without a sandbox (HATCH_VMM_CONFINE=off).
    confine: Option<Arc<Confinement>>,
}

/// The TCG translation cache, capped (QEMU's default reserves 1 GiB) so a
/// VMM's memory stays within its guest's RAM plus a known overhead.
const TCG_TB_SIZE_MIB: u32 = 64;
/// QEMU's own seccomp filter: no obsolete calls, no setuid, no fork/exec, no
/// scheduler or affinity changes.
const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// Fds a QEMU inherits: the listening QMP socket and the TAP queue, both
/// opened by the daemon (INCOMING_FD, below, is the third).
const QMP_FD: i32 = 4;
const TAP_FD: i32 = 5;
/// A restoring QEMU's guest RAM, filled by the daemon (`Qemu::restore`).
const RAM_FD: i32 = 6;

impl Qemu {
    pub fn new(binary: String, accel: ResolvedAccel) -> Qemu {
        Qemu {
            binary,
            accel,
            confine: None,
        }
    }

    /// The backend `cfg` describes, with the accelerator this host gives.
    pub fn from_config(cfg: &QemuConfig) -> Qemu {
        let accel = detect_accel(cfg.accel);
        tracing::info!(requested = ?cfg.accel, chosen = accel.as_str(), "QEMU accelerator");
        Qemu::new(cfg.binary.clone(), accel)
    }

    /// Every VMM from now on runs confined (src/vmm/README.md, "Confinement").
    pub fn confined(mut self, confinement: Arc<Confinement>) -> Qemu {
        self.confine = Some(confinement);
        self
    }

    /// The full command line for `spec` (without the binary), guest RAM a
    /// new memfd.
    pub fn command_line(&self, spec: &VmSpec) -> Vec<OsString> {
        self.command_line_with(spec, false)
    }

    /// The command line; with `inherited_ram`, guest RAM is the shared
    /// memory QEMU inherits as `RAM_FD` instead of a new memfd.
    fn command_line_with(&self, spec: &VmSpec, inherited_ram: bool) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |s: &str| args.push(s.into());
        push("-name");
        push(&format!("hatch-{}", spec.vm_id));
        // Guest RAM is shared memory (a memfd), so a snapshot saves device
        // state only (`x-ignore-shared`) and the daemon reads the RAM itself
        // (`Qemu::snapshot`). Its id is the one QEMU gives `-m` RAM on `pc`:
        // a migration stream saved with RAM inside still loads into it.
        push("-object");
        push(&if inherited_ram {
            // A restore's RAM, filled by the daemon before QEMU starts: QEMU
            // opens its own fd of it through the magic link (a memfd's
            // mode lets any uid do that; only holders of an fd can).
            format!(
                "memory-backend-file,id={RAM_ID},size={}M,mem-path=/proc/self/fd/{RAM_FD},share=on",
                spec.mem_mib
            )
        } else {
            format!("memory-backend-memfd,id={RAM_ID},size={}M", spec.mem_mib)
        });
        push("-M");
        push(&format!("pc,memory-backend={RAM_ID}"));
        push("-accel");
        match (self.accel, &self.confine) {
            (ResolvedAccel::Tcg, Some(_)) => push(&format!("tcg,tb-size={TCG_TB_SIZE_MIB}")),
            (accel, _) => push(accel.as_str()),
        }
        if self.confine.is_some() {
            push("-sandbox");
            push(SANDBOX);
        }
        if self.accel == ResolvedAccel::Kvm {
            push("-cpu");
            push("host");
        }
        push("-smp");
        push(&spec.vcpu_count.to_string());
        push("-m");
        push(&spec.mem_mib.to_string());
        for a in ["-nodefaults", "-no-user-config", "-display", "none"] {
            push(a);
        }
        push("-chardev");
        push(&format!(
            "file,id=console,path={},append=on",
            qemu_path(&spec.console_log())
        ));
        push("-serial");
        push("chardev:console");
        push("-kernel");
        push(&qemu_path(&spec.kernel));
        if let Some(initrd) = &spec.initrd {
            push("-initrd");
            push(&qemu_path(initrd));
        }
        push("-append");
        push(&spec.boot_args);
        push("-drive");
        push(&format!(
            "file={},if=none,id=vda,format=qcow2,discard=unmap",
            qemu_path(&spec.disk)
        ));
        push("-device");
        push("virtio-blk-pci,drive=vda");
        if let Some(seed) = &spec.seed {
            push("-drive");
            push(&format!(
                "file={},if=none,id=seed,format=raw,readonly=on",
                qemu_path(seed)
            ));
            push("-device");
            push("virtio-blk-pci,drive=seed");
        }
        if let Some(nic) = &spec.nic {
            push("-netdev");
            // The daemon opens the TAP and passes the queue: QEMU needs
            // neither /dev/net/tun nor CAP_NET_ADMIN.
            push(&format!("tap,id=net0,fd={TAP_FD}"));
            push("-device");
            push(&format!("virtio-net-pci,netdev=net0,mac={}", nic.mac));
        }
        // The daemon binds the control socket (in a directory the VMM cannot
        // write) and passes the listening fd.
        push("-chardev");
        push(&format!("socket,id=qmp,fd={QMP_FD},server=on,wait=off"));
        push("-mon");
        push("chardev=qmp,mode=control");
        args
    }
}

/// QEMU option values are comma-separated: a literal comma is written twice.
fn qemu_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

async fn qmp(spec: &VmSpec) -> Result<Qmp> {
    Qmp::connect(&spec.control_socket())
        .await
        .map_err(VmmError::Control)
}

async fn qmp_run(spec: &VmSpec, command: &str) -> Result<()> {
    qmp(spec)
        .await?
        .execute(command, None)
        .await
        .map_err(VmmError::Control)?;
    Ok(())
}

const LAUNCH_TIMEOUT: Duration = Duration::from_secs(20);
/// The fd a restoring QEMU reads its incoming migration stream from.
const INCOMING_FD: i32 = 3;
/// Saving or loading guest memory: generous, a large guest on a slow disk takes a while.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The name a snapshot's output fd has in QEMU (QMP `getfd`).
const MIGRATION_FD_NAME: &str = "snapshot";
/// The guest RAM backend's id (`command_line`).
const RAM_ID: &str = "pc.ram";
/// What a migration stream starts with (QEMU_VM_FILE_MAGIC): a state object
/// that starts otherwise is the description a snapshot from before guest RAM
/// was a memfd wrote, whose memory object is the whole stream.
const STREAM_MAGIC: &[u8; 4] = b"QEVM";

/// The guest RAM of the QEMU whose pid the VM's pid file holds: a path
/// under /proc/PID/fd that opens its memfd.
fn guest_ram(spec: &VmSpec) -> Result<std::path::PathBuf> {
    let pid = std::fs::read_to_string(spec.pid_file())
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or_else(|| VmmError::Control(format!("no VMM pid for vm {}", spec.vm_id)))?;
    guest_ram_of(pid)
}

fn guest_ram_of(pid: u32) -> Result<std::path::PathBuf> {
    let dir = std::path::PathBuf::from(format!("/proc/{pid}/fd"));
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| VmmError::Control(format!("reading {}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        // QEMU's own memfd after a boot, the daemon's after a restore.
        if super::ram::is_guest_ram_link(&target) {
            return Ok(entry.path());
        }
    }
    Err(VmmError::Control(format!(
        "QEMU (pid {pid}) holds no guest RAM memfd"
    )))
}

/// The guest RAM a restore of a `mem_mib` guest maps from the memory image
/// at `memory`: the image itself when it is a guest-RAM memfd the caller
/// filled (`ram::path_of`), with no copy; otherwise a new memfd the image is
/// copied into.
fn ram_for_restore(memory: &Path, mem_mib: u32) -> std::io::Result<std::fs::File> {
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(memory)?;
    let len = u64::from(mem_mib) << 20;
    let size = image.metadata()?.len();
    if size != len {
        return Err(std::io::Error::other(format!(
            "the memory image is {size} bytes, the guest's RAM {len}"
        )));
    }
    if super::ram::is_guest_ram(&image) {
        return Ok(image);
    }
    let ram = super::ram::create(len)?;
    fill_ram(&image, &ram)?;
    Ok(ram)
}

/// Copies the memory image `src` into the guest RAM `dst` (same size),
/// writing only data: holes and blocks of zeros stay unallocated in the memfd.
fn fill_ram(src: &std::fs::File, dst: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let (len, ram) = (src.metadata()?.len(), dst.metadata()?.len());
    if len != ram {
        return Err(std::io::Error::other(format!(
            "the memory image is {len} bytes, the guest's RAM {ram}"
        )));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        // SAFETY: lseek on an fd we own; we read with pread, so the offset it moves is unused.
        let data = unsafe { libc::lseek(src.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            len
        } else {
            (hole as u64).min(len)
        };
        at = data as u64;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|&b| b != 0) {
                dst.write_all_at(&buf[..n], at)?;
            }
            at += n as u64;
        }
    }
    Ok(())
}

/// Creates the file a snapshot's device state goes to, for writing; a
/// symlink is never followed.
fn create_state_file(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| VmmError::Control(format!("opening {}: {e}", path.display())))
}

/// Leaves shared RAM (the guest's memfd) out of a migration stream, on
/// both ends: the saving QEMU's stream then says so, and the loading one
/// must expect it.
async fn ignore_shared_ram(q: &mut Qmp) -> Result<()> {
    q.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })),
    )
    .await
    .map_err(VmmError::Control)?;
    Ok(())
}

/// Files a starting QEMU inherits beside its QMP socket and TAP.
#[derive(Default, Clone, Copy)]
struct Inherit<'a> {
    /// An incoming migration stream, as `INCOMING_FD`.
    incoming: Option<&'a std::fs::File>,
    /// Guest RAM (shared memory the daemon filled), as `RAM_FD`.
    ram: Option<&'a std::fs::File>,
}

impl Qemu {
    /// Starts QEMU for `spec` (see `launch_inner`); whatever fails, the VM's
    /// cgroup and uid are given back.
    async fn launch(
        &self,
        spec: &VmSpec,
        extra: &[OsString],
        inherit: Inherit<'_>,
        timeout: Duration,
        ready: &[&str],
    ) -> Result<VmProcess> {
        let jail = match &self.confine {
            Some(c) => Some(c.prepare(spec).map_err(VmmError::Launch)?),
            None => None,
        };
        let launched = self
            .launch_inner(spec, extra, inherit, timeout, jail, ready)
            .await;
        if launched.is_err() {
            self.release(&spec.vm_id).await;
        }
        launched
    }

    /// Starts QEMU for `spec` with `extra` arguments and waits until QMP
    /// answers with a status in `ready`: `running` (a boot), `paused` (an
    /// `-incoming` load done) or `inmigrate` (waiting, `-incoming defer`).
    async fn launch_inner(
        &self,
        spec: &VmSpec,
        extra: &[OsString],
        inherit: Inherit<'_>,
        timeout: Duration,
        jail: Option<Jail>,
        ready: &[&str],
    ) -> Result<VmProcess> {
        let sock = spec.control_socket();
        // sun_path holds 108 bytes; a longer path would fail later with a confusing error.
        if sock.as_os_str().len() >= 108 {
            return Err(VmmError::Launch(format!(
                "control socket path {} is too long for a Unix socket; use a shorter HATCH_DATA_DIR",
                sock.display()
            )));
        }
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(spec.pid_file());
        let listener = std::os::unix::net::UnixListener::bind(&sock)
            .map_err(|e| VmmError::Launch(format!("binding {}: {e}", sock.display())))?;
        let tap = match &spec.nic {
            Some(nic) => {
                Some(crate::net::link::TapRequest::new(&nic.tap).map_err(VmmError::Launch)?)
            }
            None => None,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.vmm_log())?;
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(self.command_line_with(spec, inherit.ram.is_some()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group: a Ctrl-C aimed at the daemon must not reach the guests.
            .process_group(0)
            .kill_on_drop(false);
        // QEMU opens the TAP by name, so it must run where the TAP is. Only
        // the network namespace changes: the control socket, pid file and
        // disks are paths in the daemon's own filesystem view.
        let _netns = match &spec.netns {
            Some(ns) => Some(
                super::process::join_netns_on_exec(&mut cmd, ns)
                    .map_err(|e| VmmError::Launch(e.to_string()))?,
            ),
            None => None,
        };
        use std::os::fd::AsRawFd;
        let qmp_fd = listener.as_raw_fd();
        let incoming_fd = inherit.incoming.map(|f| f.as_raw_fd());
        let ram_fd = inherit.ram.map(|f| f.as_raw_fd());
        // SAFETY: the hook runs in the forked child before exec and makes
        // system calls only (TapRequest, Jail and the fd helpers say so), on
        // fds the parent keeps open until spawn returns. It runs after the
        // namespace hook, so the TAP is opened in the VM's network namespace.
        unsafe {
            cmd.pre_exec(move || {
                let mut fds = [(qmp_fd, QMP_FD); 4];
                let mut n = 1;
                if let Some(t) = &tap {
                    fds[n] = (t.open_raw()?, TAP_FD);
                    n += 1;
                }
                if let Some(fd) = incoming_fd {
                    fds[n] = (fd, INCOMING_FD);
                    n += 1;
                }
                if let Some(fd) = ram_fd {
                    fds[n] = (fd, RAM_FD);
                    n += 1;
                }
                confine::place_fds(&fds[..n])?;
                if let Some(j) = &jail {
                    j.enter()?;
                    confine::drop_privileges(j.uid, j.gid)?;
                }
                Ok(())
            });
        }
        let spawned = cmd.spawn();
        // QEMU has its copies; ours go so that QEMU's exit closes the socket.
        drop(cmd);
        drop(listener);
        let mut child = spawned.map_err(|e| {
            let place = match &spec.netns {
                Some(ns) => format!(" in network namespace {ns}"),
                None => String::new(),
            };
            VmmError::Launch(format!("cannot run {}{place}: {e}", self.binary))
        })?;
        let pid = child.id().unwrap_or(0);
        // Written by the daemon (QEMU cannot write in the work dir), for
        // operators and tools that look for a VM's VMM there.
        if let Err(e) = std::fs::write(spec.pid_file(), format!("{pid}\n")) {
            tracing::warn!(vm = %spec.vm_id, "writing {}: {e}", spec.pid_file().display());
        }
        let started = Instant::now();
        let mut control: Option<Qmp> = None;
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(VmmError::Launch(format!(
                    "qemu exited during start-up ({status}): {}",
                    super::process::tail_of(&spec.vmm_log(), 600)
                )));
            }
            // One connection for the whole wait: a new QMP session every poll
            // costs QEMU's main loop work while it loads an incoming snapshot.
            if control.is_none() && sock.exists() {
                control = Qmp::connect(&sock).await.ok();
            }
            if let Some(q) = control.as_mut() {
                match q.execute("query-status", None).await {
                    // `inmigrate` while an incoming snapshot loads; `paused` once it has.
                    Ok(status)
                        if status
                            .get("status")
                            .and_then(|s| s.as_str())
                            .is_some_and(|s| ready.contains(&s)) =>
                    {
                        return Ok(VmProcess { pid, child });
                    }
                    Ok(_) => {}
                    Err(_) => control = None,
                }
            }
            if started.elapsed() > timeout {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(VmmError::Launch(format!(
                    "qemu did not come up within {}s: {}",
                    timeout.as_secs(),
                    super::process::tail_of(&spec.vmm_log(), 600)
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[async_trait]
impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            snapshot: true,
            graceful_shutdown: true,
            disk_format: DiskFormat::Qcow2Overlay,
            // `-kernel` takes a bzImage, and an ELF vmlinux with a PVH note.
            kernels: &[KernelFormat::BzImage, KernelFormat::Elf],
            // Guest RAM is a memfd the daemon reads and fills; the
            // migration stream carries device state only.
            memory: MemoryTransport::MappedFile,
            shared_ram: true,
        }
    }

    async fn boot(&self, spec: &VmSpec) -> Result<VmProcess> {
        self.launch(
            spec,
            &[],
            Inherit::default(),
            LAUNCH_TIMEOUT,
            &["running", "paused"],
        )
        .await
    }

    async fn release(&self, vm_id: &str) {
        if let Some(c) = &self.confine {
            let c = Arc::clone(c);
            let id = vm_id.to_string();
            let _ = tokio::task::spawn_blocking(move || c.release(&id)).await;
        }
    }

    async fn shutdown(&self) {
        if let Some(cgroups) = self.confine.as_ref().and_then(|c| c.cgroups.clone()) {
            let _ = tokio::task::spawn_blocking(move || cgroups.remove_bases()).await;
        }
    }

    async fn recover(&self) {
        if let Some(cgroups) = self.confine.as_ref().and_then(|c| c.cgroups.clone()) {
            let removed = tokio::task::spawn_blocking(move || cgroups.remove_all())
                .await
                .unwrap_or(0);
            if removed > 0 {
                tracing::warn!(removed, "removed VM cgroups left from a previous daemon");
            }
        }
    }

    async fn request_shutdown(&self, spec: &VmSpec) -> Result<()> {
        qmp_run(spec, "system_powerdown").await
    }

    async fn pause(&self, spec: &VmSpec) -> Result<()> {
        qmp_run(spec, "stop").await
    }

    async fn resume(&self, spec: &VmSpec) -> Result<()> {
        qmp_run(spec, "cont").await
    }

    /// Pauses the guest and saves its device state to `out.state` (guest
    /// RAM left out: `x-ignore-shared`); `out.memory` becomes a link to the
    /// guest's RAM memfd, which the caller reads while the guest stays paused.
    async fn snapshot(&self, spec: &VmSpec, out: &SnapshotFiles) -> Result<()> {
        let mut q = qmp(spec).await?;
        q.execute("stop", None).await.map_err(VmmError::Control)?;
        // The default bandwidth cap is meant for live migration over a
        // network; a snapshot to a local file should go as fast as it can.
        q.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 64u64 << 30 })),
        )
        .await
        .map_err(VmmError::Control)?;
        ignore_shared_ram(&mut q).await?;
        // QEMU may not spawn `cat` (seccomp spawn=deny) and need not see the
        // file: the daemon opens it and hands QEMU the fd over QMP.
        let state = create_state_file(&out.state)?;
        q.execute_with_fd(
            "getfd",
            Some(json!({ "fdname": MIGRATION_FD_NAME })),
            std::os::fd::AsRawFd::as_raw_fd(&state),
        )
        .await
        .map_err(VmmError::Control)?;
        drop(state);
        let uri = format!("fd:{MIGRATION_FD_NAME}");
        if let Err(e) = q.execute("migrate", Some(json!({ "uri": uri }))).await {
            let _ = q
                .execute("closefd", Some(json!({ "fdname": MIGRATION_FD_NAME })))
                .await;
            return Err(VmmError::Control(e));
        }
        let started = Instant::now();
        loop {
            let st = q
                .execute("query-migrate", None)
                .await
                .map_err(VmmError::Control)?;
            match st.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => {
                    let why = st
                        .get("error-desc")
                        .and_then(|s| s.as_str())
                        .unwrap_or("no reason given");
                    return Err(VmmError::Control(format!("saving the guest failed: {why}")));
                }
                _ if started.elapsed() > SNAPSHOT_TIMEOUT => {
                    let _ = q.execute("migrate_cancel", None).await;
                    return Err(VmmError::Control("saving the guest timed out".into()));
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        std::os::unix::fs::symlink(guest_ram(spec)?, &out.memory)?;
        Ok(())
    }

    /// The process's figures from /proc, block counters from QMP
    /// `query-blockstats` and network counters from the VM's TAP; both
    /// answers go under `raw` as they came.
    async fn metrics(&self, spec: &VmSpec, pid: u32) -> Result<VmmMetrics> {
        let gone = || VmmError::Control(format!("the VMM (pid {pid}) is not running"));
        let mut m = metrics::process_metrics(pid).ok_or_else(gone)?;
        let blockstats = qmp(spec)
            .await?
            .execute("query-blockstats", None)
            .await
            .map_err(VmmError::Control)?;
        m.block = block_counters(&blockstats);
        // QEMU runs in the namespace its TAP is in, so its /proc entry sees the TAP.
        let tap = match &spec.nic {
            Some(nic) => {
                let counters = metrics::tap_counters(pid, &nic.tap).ok_or_else(|| {
                    VmmError::Control(format!("no counters for TAP {} of pid {pid}", nic.tap))
                })?;
                m.net = counters.guest_view();
                json!({ "name": nic.tap, "host_view": counters })
            }
            None => serde_json::Value::Null,
        };
        m.raw = json!({ "query-blockstats": blockstats, "tap": tap });
        Ok(m)
    }

    /// A new QEMU for `spec`, loaded from `from` and paused. From a state
    /// object that is a migration stream (device state only): the memory
    /// image becomes the guest's RAM (a guest-RAM memfd as it is, anything
    /// else copied into a new one), QEMU starts on it waiting (`-incoming
    /// defer`), then the stream loads. From one written before guest RAM was a memfd
    /// (a JSON description): the memory object is the whole stream, loaded
    /// as it is.
    async fn restore(&self, spec: &VmSpec, from: &SnapshotFiles) -> Result<VmProcess> {
        use std::io::Read;
        let mut state = std::fs::File::open(&from.state)?;
        let mut magic = [0u8; 4];
        let device_state_only = state.read_exact(&mut magic).is_ok() && &magic == STREAM_MAGIC;
        if !device_state_only {
            let memory = std::fs::File::open(&from.memory)?;
            let inherit = Inherit {
                incoming: Some(&memory),
                ram: None,
            };
            return self
                .launch(
                    spec,
                    &["-incoming".into(), format!("fd:{INCOMING_FD}").into()],
                    inherit,
                    SNAPSHOT_TIMEOUT,
                    &["running", "paused"],
                )
                .await;
        }
        // The RAM is complete before QEMU starts: it loads only device state.
        let (memory, mem_mib) = (from.memory.clone(), spec.mem_mib);
        let ram = tokio::task::spawn_blocking(move || ram_for_restore(&memory, mem_mib))
            .await
            .map_err(|e| VmmError::Control(format!("preparing guest RAM: {e}")))?
            .map_err(|e| VmmError::Control(format!("preparing guest RAM: {e}")))?;
        let state = std::fs::File::open(&from.state)?;
        let inherit = Inherit {
            incoming: Some(&state),
            ram: Some(&ram),
        };
        let mut process = self
            .launch(
                spec,
                &["-incoming".into(), "defer".into()],
                inherit,
                LAUNCH_TIMEOUT,
                &["inmigrate"],
            )
            .await?;
        drop((state, ram));
        match self.load_deferred(spec).await {
            Ok(()) => Ok(process),
            Err(e) => {
                // QEMU exits by itself when a load fails (its log says why);
                // one still waiting is killed.
                let exited =
                    tokio::time::timeout(Duration::from_secs(1), process.child.wait()).await;
                let e = match exited {
                    Ok(Ok(status)) => VmmError::Control(format!(
                        "loading the device state failed: QEMU exited ({status}): {}",
                        super::process::tail_of(&spec.vmm_log(), 600)
                    )),
                    _ => {
                        let _ = process.child.start_kill();
                        let _ = process.child.wait().await;
                        e
                    }
                };
                self.release(&spec.vm_id).await;
                Err(e)
            }
        }
    }
}

impl Qemu {
    /// The waiting QEMU, its RAM already filled, loads the device state it
    /// inherited as `INCOMING_FD`; returns once the guest is paused.
    async fn load_deferred(&self, spec: &VmSpec) -> Result<()> {
        let mut q = qmp(spec).await?;
        ignore_shared_ram(&mut q).await?;
        q.execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("fd:{INCOMING_FD}") })),
        )
        .await
        .map_err(VmmError::Control)?;
        let started = Instant::now();
        loop {
            let status = q
                .execute("query-status", None)
                .await
                .map_err(VmmError::Control)?;
            match status.get("status").and_then(|s| s.as_str()) {
                Some("paused") => return Ok(()),
                Some("inmigrate") if started.elapsed() < SNAPSHOT_TIMEOUT => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                other => {
                    let why = q
                        .execute("query-migrate", None)
                        .await
                        .ok()
                        .and_then(|m| {
                            m.get("error-desc")
                                .and_then(|d| d.as_str())
                                .map(String::from)
                        })
                        .unwrap_or_else(|| format!("status {other:?}"));
                    return Err(VmmError::Control(format!(
                        "loading the device state failed: {why}"
                    )));
                }
            }
        }
    }
}

/// Block counters summed over every disk in a `query-blockstats` answer
/// (each device's own figures: what its guest asked for, not the
/// format layer's reads of the image files below it).
fn block_counters(blockstats: &serde_json::Value) -> metrics::BlockCounters {
    let mut sum = metrics::BlockCounters::default();
    for stats in blockstats
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.get("stats"))
    {
        let n = |k: &str| stats.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        sum.read_bytes += n("rd_bytes");
        sum.write_bytes += n("wr_bytes");
        sum.read_ops += n("rd_operations");
        sum.write_ops += n("wr_operations");
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_never_picks_a_software_kvm() {
        assert_eq!(choose_accel(Accel::Auto, true, false), ResolvedAccel::Tcg);
        assert_eq!(choose_accel(Accel::Auto, false, true), ResolvedAccel::Tcg);
        assert_eq!(choose_accel(Accel::Auto, true, true), ResolvedAccel::Kvm);
        assert_eq!(choose_accel(Accel::Kvm, false, false), ResolvedAccel::Kvm);
        assert_eq!(choose_accel(Accel::Tcg, true, true), ResolvedAccel::Tcg);
    }

    /// Two disks as QEMU 7.2 reports them (the qcow2 overlay with its file
    /// node as `parent` and the image as `backing`): the devices' own
    /// counters are summed, the nodes below them are not counted again.
    #[test]
    fn block_counters_sum_the_devices_of_query_blockstats() {
        let answer = json!([
            {
                "device": "vda",
                "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
                "stats": { "rd_bytes": 1000, "wr_bytes": 200, "rd_operations": 10,
                           "wr_operations": 2, "flush_operations": 1 },
                "parent": { "stats": { "rd_bytes": 999999, "wr_bytes": 999999,
                                       "rd_operations": 999, "wr_operations": 999 } },
                "backing": { "stats": { "rd_bytes": 888888, "rd_operations": 888 } }
            },
            {
                "device": "seed",
                "stats": { "rd_bytes": 24, "wr_bytes": 0, "rd_operations": 3,
                           "wr_operations": 0 }
            }
        ]);
        assert_eq!(
            block_counters(&answer),
            metrics::BlockCounters {
                read_bytes: 1024,
                write_bytes: 200,
                read_ops: 13,
                write_ops: 2,
            }
        );
        assert_eq!(block_counters(&json!([])), Default::default());
    }

    #[test]
    fn reads_vmx_and_svm_flags() {
        assert!(cpu_flags_have_hw_virt("flags\t\t: fpu vme vmx sse\n"));
        assert!(cpu_flags_have_hw_virt("flags\t\t: fpu svm\n"));
        assert!(!cpu_flags_have_hw_virt(
            "flags\t\t: fpu vme sse hypervisor\nvmx flags\t: ept\n"
        ));
    }

    #[test]
    fn command_line_escapes_commas_and_uses_tcg() {
        let q = Qemu::new("qemu-system-x86_64".into(), ResolvedAccel::Tcg);
        let spec = VmSpec {
            vm_id: "vm_x".into(),
            work_dir: "/d/a,b".into(),
            kernel: "/i/vmlinuz".into(),
            initrd: None,
            disk: "/d/a,b/disk.qcow2".into(),
            boot_args: "console=ttyS0".into(),
            vcpu_count: 2,
            mem_mib: 256,
            nic: Some(super::super::Nic {
                tap: "htx".into(),
                mac: "02:fc:00:00:00:01".into(),
            }),
            seed: Some("/d/a,b/seed.iso".into()),
            netns: None,
        };
        let args: Vec<String> = q
            .command_line(&spec)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg"));
        assert!(!joined.contains("-cpu host"));
        assert!(joined.contains("file=/d/a,,b/disk.qcow2,"));
        assert!(!args.contains(&"-initrd".to_string()));
        assert!(joined.contains("-smp 2 -m 256"));
        assert!(joined.contains("tap,id=net0,fd=5"));
        assert!(joined.contains("socket,id=qmp,fd=4,server=on,wait=off"));
        assert!(!joined.contains("-sandbox"), "not confined: {joined}");
        assert!(joined.contains("virtio-net-pci,netdev=net0,mac=02:fc:00:00:00:01"));
        assert!(joined.contains("file=/d/a,,b/seed.iso,if=none,id=seed,format=raw,readonly=on"));
        // The root disk comes first so the guest sees it as /dev/vda.
        assert!(joined.find("drive=vda").unwrap() < joined.find("drive=seed").unwrap());
    }

    /// A VM with `netns` gets a QEMU that runs in that namespace and opens
    /// the VM's TAP there (its metrics read the TAP there too), and whose
    /// pid and command line are QEMU's own (the pid the manager watches, the
    /// command line `kill_all_under` matches).
    /// The caller runs in a namespace of its own too, so a QEMU started in
    /// the wrong place would make its TAP there, not on the host. The guest
    /// "kernel" is zeros: QEMU starts, and the vCPU runs harmlessly.
    #[test]
    fn qemu_runs_in_the_vms_network_namespace_and_opens_its_tap_there() {
        use crate::net::isolate::testing::{block_on_in, Netns, TestDir};
        use crate::vmm::process;
        use std::os::unix::fs::MetadataExt;

        let caller = Netns::new("qemu-caller");
        let vm_ns = Netns::new("qemu-vm");
        vm_ns.ip(&["tuntap", "add", "dev", "htq", "mode", "tap"]);
        vm_ns.ip(&["link", "set", "htq", "up"]);
        let dir = TestDir::new("qemu-netns");
        let spec = VmSpec {
            nic: Some(super::super::Nic {
                tap: "htq".into(),
                mac: "02:fc:00:00:00:01".into(),
            }),
            netns: Some(vm_ns.0.clone()),
            ..zero_kernel_spec(&dir.0, "vm_q")
        };
        block_on_in(&caller.0, || async {
            let q = Qemu::new("qemu-system-x86_64".into(), ResolvedAccel::Tcg);
            let mut p = q.boot(&spec).await.unwrap();
            let ns = std::fs::read_link(format!("/proc/{}/ns/net", p.pid)).unwrap();
            let want = std::fs::metadata(process::netns_path(&vm_ns.0))
                .unwrap()
                .ino();
            assert_eq!(ns.to_string_lossy(), format!("net:[{want}]"));
            let cmdline = std::fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap();
            assert!(String::from_utf8_lossy(&cmdline).starts_with("qemu-system-x86_64\0"));
            // A TAP has carrier once a queue is attached: QEMU holds it.
            assert!(vm_ns.ip(&["link", "show", "htq"]).contains("LOWER_UP"));
            assert!(!caller.try_ip(&["link", "show", "htq"]).status.success());
            // Its metrics read the TAP in QEMU's namespace, not the caller's.
            let m = q.metrics(&spec, p.pid).await.unwrap();
            assert_eq!(m.raw["tap"]["name"], "htq");
            assert_eq!(m.raw["query-blockstats"].as_array().map(Vec::len), Some(1));
            assert!(m.rss_bytes > 0, "{m:?}");
            assert_eq!(process::kill_all_under(&dir.0), 1);
            let _ = p.child.wait().await;
            assert!(!vm_ns.ip(&["link", "show", "htq"]).contains("LOWER_UP"));
        });
    }

    /// A 64 MiB VM in `dir` whose "kernel" is zeros (QEMU starts and the
    /// vCPU runs harmlessly) on a fresh 16 MiB qcow2 disk; no NIC.
    fn zero_kernel_spec(dir: &Path, vm_id: &str) -> VmSpec {
        let kernel = dir.join("vmlinuz");
        std::fs::write(&kernel, vec![0u8; 64 * 1024]).unwrap();
        let disk = dir.join("disk.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("16M")
            .status()
            .expect("qemu-img (apt-get install qemu-utils)");
        assert!(made.success());
        VmSpec {
            vm_id: vm_id.into(),
            work_dir: dir.to_path_buf(),
            kernel,
            initrd: None,
            disk,
            boot_args: "console=ttyS0".into(),
            vcpu_count: 1,
            mem_mib: 64,
            nic: None,
            seed: None,
            netns: None,
        }
    }

    /// Guest RAM in a memfd: a snapshot writes device state only and links
    /// the RAM; a restore from an image on disk copies it into new RAM, one
    /// from a guest-RAM memfd maps that very memfd (no copy), and both come
    /// up paused with the saved bytes as RAM. A restore that cannot load (device state QEMU rejects, a memory image
    /// of the wrong size) fails and leaves no QEMU. The guest "kernel" is
    /// zeros, as above; no NIC, and the caller runs in a namespace of its own.
    #[test]
    fn guest_ram_is_a_memfd_saved_apart_and_a_failed_load_leaves_no_qemu() {
        use crate::net::isolate::testing::{block_on_in, Netns, TestDir};
        use crate::vmm::process;

        let caller = Netns::new("qemu-memfd");
        let dir = TestDir::new("qemu-memfd");
        let spec = zero_kernel_spec(&dir.0, "vm_m");
        block_on_in(&caller.0, || async {
            let q = Qemu::new("qemu-system-x86_64".into(), ResolvedAccel::Tcg);
            let mut p = q.boot(&spec).await.unwrap();
            let out_dir = dir.0.join("capture");
            std::fs::create_dir(&out_dir).unwrap();
            let out = q.snapshot_files(&out_dir);
            q.snapshot(&spec, &out).await.unwrap();
            let state = std::fs::read(&out.state).unwrap();
            assert!(state.starts_with(STREAM_MAGIC), "a migration stream");
            assert!(
                state.len() < 4 << 20,
                "device state only: {} bytes",
                state.len()
            );
            // The memory is the guest's RAM itself, whole.
            let ram = std::fs::read(&out.memory).unwrap();
            assert_eq!(ram.len(), 64 << 20);
            let image = dir.0.join("memory.img");
            std::fs::write(&image, &ram).unwrap();
            assert_eq!(process::kill_all_under(&dir.0), 1);
            let _ = p.child.wait().await;

            let from = SnapshotFiles {
                state: out.state.clone(),
                memory: image.clone(),
            };
            let mut back = q.restore(&spec, &from).await.unwrap();
            let status = qmp(&spec)
                .await
                .unwrap()
                .execute("query-status", None)
                .await
                .unwrap();
            assert_eq!(status["status"], "paused", "{status}");
            let restored = guest_ram_of(back.pid).unwrap();
            assert!(std::fs::read(&restored).unwrap() == ram, "RAM is the image");
            assert_eq!(process::kill_all_under(&dir.0), 1);
            let _ = back.child.wait().await;

            // From a guest-RAM memfd: QEMU maps it as it is.
            let memfd = crate::vmm::ram::create(64 << 20).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&memfd, &ram, 0).unwrap();
            let from = SnapshotFiles {
                state: out.state.clone(),
                memory: crate::vmm::ram::path_of(&memfd),
            };
            let mut back = q.restore(&spec, &from).await.unwrap();
            use std::os::unix::fs::MetadataExt;
            let mapped = std::fs::metadata(guest_ram_of(back.pid).unwrap()).unwrap();
            assert_eq!(
                mapped.ino(),
                memfd.metadata().unwrap().ino(),
                "the guest's RAM is the caller's memfd, not a copy"
            );
            assert_eq!(process::kill_all_under(&dir.0), 1);
            let _ = back.child.wait().await;

            // Device state QEMU cannot load, and a memory image of another size.
            let bad_state = dir.0.join("bad-state");
            let mut junk = STREAM_MAGIC.to_vec();
            junk.extend_from_slice(&[0xa5; 4096]);
            std::fs::write(&bad_state, junk).unwrap();
            let short = dir.0.join("short.img");
            std::fs::write(&short, &ram[..1 << 20]).unwrap();
            for (state, memory) in [(&bad_state, &image), (&out.state, &short)] {
                let from = SnapshotFiles {
                    state: state.clone(),
                    memory: memory.clone(),
                };
                let e = q.restore(&spec, &from).await.err().expect("a failed load");
                assert!(
                    e.to_string().contains("loading the device state")
                        || e.to_string().contains("preparing guest RAM"),
                    "{e}"
                );
                assert_eq!(process::kill_all_under(&dir.0), 0, "no QEMU is left");
            }
        });
    }
}
