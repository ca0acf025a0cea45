//! Firecracker backend: one `firecracker` per VM, always launched through its `jailer`, driven over its REST API.

mod api;
mod config;
mod jail;
mod metrics;
#[cfg(test)]
mod tests;

pub use config::{find_executable, Binaries, FirecrackerConfig};

use super::confine::{self, Confinement};
use super::{
    Capabilities, DiskFormat, KernelFormat, MemoryTransport, Result, SnapshotFiles, VmProcess,
    VmSpec, Vmm, VmmError,
};
use api::{Api, ApiError, InstanceState};
use async_trait::async_trait;
use jail::Jails;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Names inside the chroot (what Firecracker is told), each a hard link
/// to the VM's own file.
const KERNEL: &str = "vmlinux";
const INITRD: &str = "initrd";
const DISK: &str = "disk.raw";
const SEED: &str = "seed";
const SOCKET: &str = "api.sock";
const LOG: &str = "firecracker.log";
const METRICS: &str = "metrics.json";
const STATE: &str = "vmstate";
const MEMORY: &str = "memory";

/// The VMM's own log in the work directory: Firecracker writes it from its
/// start (no append), so each launch gets it afresh.
pub fn log_path(work_dir: &Path) -> PathBuf {
    work_dir.join(LOG)
}

/// Firecracker up and answering on its socket.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(20);
/// Writing or loading a snapshot: generous, a large guest on a slow disk takes a while.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// A snapshot's device state is small (KiB); anything bigger is not Firecracker's.
const MAX_STATE_BYTES: u64 = 64 << 20;
/// What Firecracker may write beyond the larger of its disk and guest memory
/// (`--resource-limit fsize`): logs, metrics and the console log, whose
/// write offset is its size (it is appended to across runs).
const FSIZE_SLACK: u64 = 1 << 30;

pub struct Firecracker {
    bins: Binaries,
    /// The ELF interpreter and libraries of a dynamically linked build.
    libs: Vec<PathBuf>,
    jails: Jails,
    /// `None`: Firecracker runs as root, without cgroup (HATCH_VMM_CONFINE=off);
    /// the jailer's chroot, mount namespace and rlimits stay.
    confine: Option<Arc<Confinement>>,
    /// One metrics fold at a time: Firecracker's counters are deltas.
    metrics_lock: tokio::sync::Mutex<()>,
}

impl Firecracker {
    /// The backend for `bins`, with jails under `<data_dir>/jail`.
    pub fn new(bins: Binaries, data_dir: &Path) -> std::result::Result<Firecracker, String> {
        use sha2::Digest;
        let libs = jail::shared_libraries(&bins.firecracker)?;
        let exec_name = bins
            .firecracker
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("{} has no file name", bins.firecracker.display()))?
            .to_string();
        let tag = hex::encode(&sha2::Sha256::digest(data_dir.as_os_str().as_encoded_bytes())[..4]);
        Ok(Firecracker {
            bins,
            libs,
            jails: Jails {
                base: data_dir.join("jail"),
                exec_name,
                tag,
            },
            confine: None,
            metrics_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Every VMM from now on gets its own uid and cgroup (src/vmm/README.md).
    pub fn confined(mut self, confinement: Arc<Confinement>) -> Firecracker {
        self.confine = Some(confinement);
        self
    }

    fn jail_id(&self, vm_id: &str) -> Result<String> {
        jail::jail_id(&self.jails.tag, vm_id).map_err(VmmError::Launch)
    }

    fn root(&self, vm_id: &str) -> Result<PathBuf> {
        Ok(self.jails.root(&self.jail_id(vm_id)?))
    }

    /// The running VMM's API. The socket must belong to the uid the chroot
    /// was given (the jailer chowns it; its parent is root's, so the VMM
    /// cannot swap the chroot itself).
    fn api(&self, vm_id: &str) -> Result<Api> {
        use std::os::unix::fs::MetadataExt;
        let root = self.root(vm_id)?;
        let owner = std::fs::symlink_metadata(&root)
            .map_err(|e| VmmError::Control(format!("{}: {e}", root.display())))?
            .uid();
        Ok(Api::new(root.join(SOCKET), owner))
    }

    /// The jailer's command line for `spec`.
    fn command_line(&self, id: &str, spec: &VmSpec, uid: u32, fsize: u64) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![];
        let mut push = |s: &dyn AsRef<std::ffi::OsStr>| args.push(s.as_ref().to_os_string());
        push(&"--id");
        push(&id);
        push(&"--exec-file");
        push(&self.bins.firecracker);
        push(&"--uid");
        push(&uid.to_string());
        push(&"--gid");
        push(&uid.to_string());
        push(&"--chroot-base-dir");
        push(&self.jails.base);
        if let Some(ns) = &spec.netns {
            push(&"--netns");
            push(&super::process::netns_path(ns));
        }
        push(&"--resource-limit");
        push(&format!("fsize={fsize}"));
        push(&"--");
        push(&"--api-sock");
        push(&format!("/{SOCKET}"));
        push(&"--log-path");
        push(&format!("/{LOG}"));
        push(&"--level");
        push(&"Warning");
        push(&"--metrics-path");
        push(&format!("/{METRICS}"));
        args
    }

    /// Starts a jailed Firecracker for `spec` and boots it (`from: None`) or
    /// loads the snapshot `from`; whatever fails, nothing is left: no
    /// process, chroot, cgroup or uid.
    async fn launch(&self, spec: &VmSpec, from: Option<&SnapshotFiles>) -> Result<VmProcess> {
        let launched = self.launch_inner(spec, from).await;
        if launched.is_err() {
            self.release(&spec.vm_id).await;
        }
        launched
    }

    async fn launch_inner(&self, spec: &VmSpec, from: Option<&SnapshotFiles>) -> Result<VmProcess> {
        let id = self.jail_id(&spec.vm_id)?;
        let uid = match &self.confine {
            Some(c) => c.uids.take(&spec.vm_id).ok_or_else(|| {
                VmmError::Launch("no free uid left for a VMM (HATCH_VMM_UID_COUNT)".into())
            })?,
            None => 0,
        };
        let t0 = Instant::now();
        let prepared = {
            let (this, spec, from, id) = (self.prep(), spec.clone(), from.cloned(), id.clone());
            tokio::task::spawn_blocking(move || this.prepare(&spec, from.as_ref(), &id, uid))
                .await
                .map_err(|e| VmmError::Launch(e.to_string()))?
                .map_err(VmmError::Launch)?
        };
        let mut child = self.spawn(spec, &id, uid, prepared)?;
        let pid = child.id().unwrap_or(0);
        // Without --daemonize and --new-pid-ns the jailer execs into
        // Firecracker: the jailer's pid is the VMM's.
        if let Err(e) = std::fs::write(spec.pid_file(), format!("{pid}\n")) {
            tracing::warn!(vm = %spec.vm_id, "writing {}: {e}", spec.pid_file().display());
        }
        let api = Api::new(self.jails.root(&id).join(SOCKET), uid);
        let t1 = Instant::now();
        let ready = self.wait_for_api(spec, &api, &mut child).await;
        let t2 = Instant::now();
        let started = match ready {
            Ok(()) => match from {
                None => self.configure_and_start(spec, &api).await,
                Some(_) => self.load(spec, &api).await,
            },
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
        // Where a launch's time goes (bench/firecracker compares the last
        // part with the same API calls made by hand).
        tracing::debug!(
            vm = %spec.vm_id,
            jail_ms = (t1 - t0).as_secs_f64() * 1e3,
            api_ready_ms = (t2 - t1).as_secs_f64() * 1e3,
            api_calls_ms = t2.elapsed().as_secs_f64() * 1e3,
            restore = from.is_some(),
            "firecracker launched"
        );
        Ok(VmProcess { pid, child })
    }

    /// A copy of what `prepare` needs, for a blocking thread.
    fn prep(&self) -> Prep {
        Prep {
            jails: self.jails.clone(),
            libs: self.libs.clone(),
            confine: self.confine.clone(),
        }
    }

    fn spawn(
        &self,
        spec: &VmSpec,
        id: &str,
        uid: u32,
        prepared: Prepared,
    ) -> Result<tokio::process::Child> {
        use std::os::unix::fs::OpenOptionsExt;
        let open_append = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(p)
                .map_err(|e| VmmError::Launch(format!("{}: {e}", p.display())))
        };
        // The serial console goes to Firecracker's stdout, which the jailer
        // keeps: the daemon opens console.log for appending, so a restore
        // goes on where the log ended (`serial_out_path` would write from
        // offset 0 over it).
        let console = open_append(&spec.console_log())?;
        let log = open_append(&spec.vmm_log())?;
        let mut cmd = tokio::process::Command::new(&self.bins.jailer);
        cmd.args(self.command_line(id, spec, uid, prepared.fsize))
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(log)
            .env_clear()
            // Own process group: a Ctrl-C aimed at the daemon must not reach the guests.
            .process_group(0)
            .kill_on_drop(false);
        let procs = prepared.cgroup_procs;
        // SAFETY: the hook runs in the forked child before exec and makes
        // system calls only (join_cgroups says so; prctl takes integers).
        unsafe {
            cmd.pre_exec(move || {
                // The jailer does nothing with cgroups v1 unless given
                // --cgroup: it stays in (and Firecracker inherits) this one.
                confine::join_cgroups(&procs)?;
                // The daemon's umask (077) would make the jailer's copy of
                // the firecracker binary 0700 root's: the VM's uid could not
                // exec it. What the jailer makes is for that uid to use.
                libc::umask(0o022);
                // The jailer needs its root privileges (mknod, mount, chroot,
                // setuid) but never gains any through exec: neither may Firecracker.
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().map_err(|e| {
            VmmError::Launch(format!("cannot run {}: {e}", self.bins.jailer.display()))
        })
    }

    async fn wait_for_api(
        &self,
        spec: &VmSpec,
        api: &Api,
        child: &mut tokio::process::Child,
    ) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(VmmError::Launch(format!(
                    "the jailer or firecracker exited during start-up ({status}): {}",
                    failure_tail(spec)
                )));
            }
            if api.ready() && api.state().await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > LAUNCH_TIMEOUT {
                return Err(VmmError::Launch(format!(
                    "firecracker did not answer on its socket within {}s: {}",
                    LAUNCH_TIMEOUT.as_secs(),
                    failure_tail(spec)
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Boot source, machine, drives, NIC, then InstanceStart.
    async fn configure_and_start(&self, spec: &VmSpec, api: &Api) -> Result<()> {
        let e = |err: ApiError| VmmError::Launch(format!("configuring firecracker: {err}"));
        api.put(
            "/boot-source",
            &api::BootSource {
                kernel_image_path: format!("/{KERNEL}"),
                initrd_path: spec.initrd.as_ref().map(|_| format!("/{INITRD}")),
                boot_args: spec.boot_args.clone(),
            },
        )
        .await
        .map_err(e)?;
        api.put(
            "/machine-config",
            &api::MachineConfig {
                vcpu_count: spec.vcpu_count,
                mem_size_mib: spec.mem_mib,
            },
        )
        .await
        .map_err(e)?;
        // The root disk first, so the guest sees it as /dev/vda.
        api.put(
            "/drives/rootfs",
            &api::Drive {
                drive_id: "rootfs".into(),
                path_on_host: format!("/{DISK}"),
                is_root_device: true,
                is_read_only: false,
            },
        )
        .await
        .map_err(e)?;
        if spec.seed.is_some() {
            api.put(
                "/drives/seed",
                &api::Drive {
                    drive_id: "seed".into(),
                    path_on_host: format!("/{SEED}"),
                    is_root_device: false,
                    is_read_only: true,
                },
            )
            .await
            .map_err(e)?;
        }
        if let Some(nic) = &spec.nic {
            api.put(
                "/network-interfaces/eth0",
                &api::NetworkInterface {
                    iface_id: "eth0".into(),
                    host_dev_name: nic.tap.clone(),
                    guest_mac: nic.mac.clone(),
                },
            )
            .await
            .map_err(e)?;
        }
        api.action(api::ActionType::InstanceStart)
            .await
            .map_err(e)?;
        match api.state().await.map_err(e)? {
            InstanceState::Running => Ok(()),
            other => Err(VmmError::Launch(format!(
                "firecracker reports {other:?} after InstanceStart"
            ))),
        }
    }

    /// snapshot/load of the files `prepare` linked in, the guest left paused.
    async fn load(&self, spec: &VmSpec, api: &Api) -> Result<()> {
        let e = |err: ApiError| VmmError::Launch(format!("loading the snapshot: {err}"));
        let body = api::SnapshotLoad {
            snapshot_path: format!("/{STATE}"),
            mem_backend: api::MemBackend {
                backend_type: api::MemBackendType::File,
                backend_path: format!("/{MEMORY}"),
            },
            resume_vm: false,
            // A fork runs on a TAP of its own, not the one its source had.
            network_overrides: spec
                .nic
                .iter()
                .map(|n| api::NetworkOverride {
                    iface_id: "eth0".into(),
                    host_dev_name: n.tap.clone(),
                })
                .collect(),
        };
        api.call("PUT", "/snapshot/load", Some(&body), SNAPSHOT_TIMEOUT)
            .await
            .map_err(e)?;
        match api.state().await.map_err(e)? {
            InstanceState::Paused => Ok(()),
            other => Err(VmmError::Launch(format!(
                "firecracker reports {other:?} after loading the snapshot"
            ))),
        }
    }

    async fn set_state(&self, spec: &VmSpec, state: api::VmState) -> Result<()> {
        self.api(&spec.vm_id)?
            .patch("/vm", &api::VmStateChange { state })
            .await
            .map_err(control)
    }
}

fn control(e: ApiError) -> VmmError {
    VmmError::Control(e.to_string())
}

/// The jailer's own errors (stderr, vmm.log) and Firecracker's log.
fn failure_tail(spec: &VmSpec) -> String {
    let jailer = super::process::tail_of(&spec.vmm_log(), 400);
    let fc = super::process::tail_of(&log_path(&spec.work_dir), 400);
    [jailer, fc]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// What a blocking thread needs to lay out a jail.
struct Prep {
    jails: Jails,
    libs: Vec<PathBuf>,
    confine: Option<Arc<Confinement>>,
}

/// A jail laid out, ready for the jailer.
struct Prepared {
    cgroup_procs: Vec<std::ffi::CString>,
    fsize: u64,
}

impl Prep {
    /// Lays out the VM's jail: an empty chroot holding hard links to the
    /// VM's files only, those files the VM uid's, its cgroup made and its
    /// TAP given to its uid. Blocking.
    fn prepare(
        &self,
        spec: &VmSpec,
        from: Option<&SnapshotFiles>,
        id: &str,
        uid: u32,
    ) -> std::result::Result<Prepared, String> {
        use std::os::unix::fs::PermissionsExt;
        let e = |what: &Path, err: std::io::Error| format!("{}: {err}", what.display());
        // Whatever an earlier VMM of this VM left goes first. Its jail is
        // made before its jailer starts and goes only after it was killed,
        // so without a jail there is no VMM to look for (a search of every
        // process's command line costs more than the rest of the jail).
        if self.jails.jail_dir(id).exists() {
            jail::remove(&self.jails, id);
        }
        std::fs::create_dir_all(&self.jails.base).map_err(|err| e(&self.jails.base, err))?;
        std::fs::set_permissions(&self.jails.base, std::fs::Permissions::from_mode(0o700))
            .map_err(|err| e(&self.jails.base, err))?;
        let root = self.jails.root(id);
        std::fs::create_dir_all(&root).map_err(|err| e(&root, err))?;
        let gid = uid;
        let own =
            |p: &Path, mode: u32| confine::own_file(p, uid, gid, mode).map_err(|err| e(p, err));
        // Only the files the VMM writes become its own; the kernel and
        // initrd stay root's, readable (an image directory's files are
        // 0644 for QEMU's confined VMMs too).
        own(&spec.disk, 0o600)?;
        jail::link_in(&spec.disk, &root.join(DISK), false)?;
        if let Some(seed) = &spec.seed {
            own(seed, 0o400)?;
            jail::link_in(seed, &root.join(SEED), false)?;
        }
        if from.is_none() {
            for (src, name) in std::iter::once((&spec.kernel, KERNEL))
                .chain(spec.initrd.as_ref().map(|i| (i, INITRD)))
            {
                let dst = root.join(name);
                jail::link_in(src, &dst, true)?;
                confine::own_file(&dst, 0, 0, 0o644).map_err(|err| e(&dst, err))?;
            }
        }
        // Copies, not links: the host's libc must never share an inode with
        // a file in the data directory, whose files `make_private` sets to
        // 0600 at start-up (a jail an earlier daemon left included).
        for lib in &self.libs {
            let dst = root.join(lib.strip_prefix("/").unwrap_or(lib));
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent).map_err(|err| e(parent, err))?;
                // The daemon's umask (077) made them root's alone: the VM's
                // uid must traverse them to load the libraries.
                for dir in parent.ancestors().take_while(|a| *a != root) {
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                        .map_err(|err| e(dir, err))?;
                }
            }
            std::fs::copy(lib, &dst).map_err(|err| e(lib, err))?;
        }
        // Firecracker's log and metrics files are written from offset 0 by
        // each process: fresh ones per launch (metrics.rs keeps the totals).
        for name in [LOG, METRICS] {
            let p = spec.work_dir.join(name);
            let _ = std::fs::remove_file(&p);
            std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&p)
                .map_err(|err| e(&p, err))?;
            own(&p, 0o600)?;
            jail::link_in(&p, &root.join(name), false)?;
        }
        metrics::reset(&spec.work_dir);
        if let Some(from) = from {
            // Firecracker maps the memory file (MAP_PRIVATE) and reads the state.
            for (src, name) in [(&from.state, STATE), (&from.memory, MEMORY)] {
                own(src, 0o400)?;
                if let Err(err) = jail::link_in(src, &root.join(name), false) {
                    // Another filesystem: a copy works, only slower.
                    tracing::warn!(vm = %spec.vm_id, "{err}; copying");
                    jail::link_in(src, &root.join(name), true)?;
                    own(&root.join(name), 0o400)?;
                }
            }
        }
        let disk_bytes = std::fs::metadata(&spec.disk)
            .map_err(|err| e(&spec.disk, err))?
            .len();
        let fsize = disk_bytes.max(u64::from(spec.mem_mib) << 20) + FSIZE_SLACK;
        let cgroup_procs = match self
            .confine
            .as_ref()
            .and_then(|c| c.cgroups.as_ref().map(|g| (c, g)))
        {
            Some((c, g)) => g.create(
                &spec.vm_id,
                &super::cgroup::Limits::for_vm(spec.vcpu_count, spec.mem_mib, c.mem_overhead_mib),
            )?,
            None => vec![],
        };
        if let Some(nic) = &spec.nic {
            jail::give_tap(&nic.tap, spec.netns.as_deref(), uid, gid)?;
        }
        Ok(Prepared {
            cgroup_procs,
            fsize,
        })
    }
}

/// The kernel arguments Firecracker's machine needs, each only when the VM's
/// own arguments do not set it: `reboot=k` (a guest reboot is a keyboard-
/// controller reset, which Firecracker turns into the VMM's exit: there is
/// no ACPI), `panic=1` (a panicked guest reboots, so exits, instead of
/// hanging), `pci=off` (the machine has virtio-mmio devices and no PCI bus:
/// probing for one only costs boot time).
pub fn boot_args(vm_args: &str) -> String {
    let mut args = vm_args.trim().to_string();
    for extra in ["reboot=k", "panic=1", "pci=off"] {
        let key = extra.split('=').next().unwrap_or(extra);
        let present = vm_args
            .split_whitespace()
            .any(|a| a.split('=').next() == Some(key));
        if !present {
            if !args.is_empty() {
                args.push(' ');
            }
            args.push_str(extra);
        }
    }
    args
}

#[async_trait]
impl Vmm for Firecracker {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            snapshot: true,
            graceful_shutdown: true,
            disk_format: DiskFormat::Raw,
            kernels: &[KernelFormat::Elf],
            memory: MemoryTransport::MappedFile,
            shared_ram: false,
        }
    }

    fn boot_args(&self, vm_args: &str) -> String {
        boot_args(vm_args)
    }

    async fn boot(&self, spec: &VmSpec) -> Result<VmProcess> {
        self.launch(spec, None).await
    }

    async fn restore(&self, spec: &VmSpec, from: &SnapshotFiles) -> Result<VmProcess> {
        self.launch(spec, Some(from)).await
    }

    async fn request_shutdown(&self, spec: &VmSpec) -> Result<()> {
        self.api(&spec.vm_id)?
            .action(api::ActionType::SendCtrlAltDel)
            .await
            .map_err(control)
    }

    async fn pause(&self, spec: &VmSpec) -> Result<()> {
        self.set_state(spec, api::VmState::Paused).await
    }

    async fn resume(&self, spec: &VmSpec) -> Result<()> {
        self.set_state(spec, api::VmState::Resumed).await
    }

    async fn snapshot(&self, spec: &VmSpec, out: &SnapshotFiles) -> Result<()> {
        let api = self.api(&spec.vm_id)?;
        if api.state().await.map_err(control)? != InstanceState::Paused {
            self.pause(spec).await?;
        }
        let root = self.root(&spec.vm_id)?;
        let (state, memory) = (root.join(STATE), root.join(MEMORY));
        let _ = std::fs::remove_file(&state);
        let _ = std::fs::remove_file(&memory);
        api.call(
            "PUT",
            "/snapshot/create",
            Some(&api::SnapshotCreate {
                snapshot_type: api::SnapshotType::Full,
                snapshot_path: format!("/{STATE}"),
                mem_file_path: format!("/{MEMORY}"),
            }),
            SNAPSHOT_TIMEOUT,
        )
        .await
        .map_err(control)?;
        let mem_bytes = u64::from(spec.mem_mib) << 20;
        let out = out.clone();
        tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
            // Checked through the fd that is then given its new name: what
            // the VMM renames into place after the check is never taken.
            let s = jail::open_written(&state, MAX_STATE_BYTES)?;
            let m = jail::open_written(&memory, mem_bytes)?;
            jail::adopt(&s, &out.state)?;
            jail::adopt(&m, &out.memory)?;
            let _ = std::fs::remove_file(&state);
            let _ = std::fs::remove_file(&memory);
            Ok(())
        })
        .await
        .map_err(|e| VmmError::Control(e.to_string()))?
        .map_err(VmmError::Control)
    }

    async fn metrics(&self, spec: &VmSpec, pid: u32) -> Result<super::metrics::VmmMetrics> {
        let mut m = super::metrics::process_metrics(pid)
            .ok_or_else(|| VmmError::Control(format!("the VMM (pid {pid}) is not running")))?;
        let _one = self.metrics_lock.lock().await;
        self.api(&spec.vm_id)?
            .action(api::ActionType::FlushMetrics)
            .await
            .map_err(control)?;
        let work = spec.work_dir.clone();
        let totals = tokio::task::spawn_blocking(move || metrics::fold(&work))
            .await
            .map_err(|e| VmmError::Control(e.to_string()))?
            .map_err(VmmError::Control)?;
        m.block = totals.block;
        m.net = totals.net;
        m.raw = totals.raw;
        Ok(m)
    }

    async fn release(&self, vm_id: &str) {
        let Ok(id) = self.jail_id(vm_id) else { return };
        let (jails, confine, vm) = (self.jails.clone(), self.confine.clone(), vm_id.to_string());
        let _ = tokio::task::spawn_blocking(move || {
            jail::remove(&jails, &id);
            if let Some(c) = confine {
                c.release(&vm);
            }
        })
        .await;
    }

    async fn recover(&self) {
        let jails = self.jails.clone();
        let cgroups = self.confine.as_ref().and_then(|c| c.cgroups.clone());
        let (jailed, cgs) = tokio::task::spawn_blocking(move || {
            (
                jail::remove_all(&jails),
                cgroups.map(|c| c.remove_all()).unwrap_or(0),
            )
        })
        .await
        .unwrap_or((0, 0));
        if jailed + cgs > 0 {
            tracing::warn!(
                jails = jailed,
                cgroups = cgs,
                "removed Firecracker jails left from a previous daemon"
            );
        }
    }

    async fn shutdown(&self) {
        let jails = self.jails.clone();
        let cgroups = self.confine.as_ref().and_then(|c| c.cgroups.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(c) = cgroups {
                c.remove_bases();
            }
            // Only when empty: a VM's jail is removed when its VMM ends.
            let _ = std::fs::remove_dir(jails.dir());
            let _ = std::fs::remove_dir(&jails.base);
        })
        .await;
    }
}
