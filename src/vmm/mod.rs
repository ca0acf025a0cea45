//! The hypervisor boundary: one `Vmm` trait, one module per backend.
//!
//! Nothing outside this module names a hypervisor. A backend runs one VMM
//! process per VM and keeps everything it needs (control socket, pid file,
//! console log) in the VM's work directory, so any operation can be done
//! again from the directory alone, also after a daemon restart.

pub mod cgroup;
pub mod confine;
pub mod process;
pub mod qemu;
mod qmp;

use async_trait::async_trait;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Launch(String),
    #[error("hypervisor control channel: {0}")]
    Control(String),
    #[error("{0} is not supported by the {1} backend")]
    Unsupported(&'static str, &'static str),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, VmmError>;

/// The disk format a backend boots from: QEMU takes a qcow2 overlay over the
/// image's rootfs; Firecracker and Cloud Hypervisor need a raw file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2Overlay,
    Raw,
}

#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    pub snapshot: bool,
    pub graceful_shutdown: bool,
    pub disk_format: DiskFormat,
}

/// Everything a backend needs to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub vm_id: String,
    pub work_dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub disk: PathBuf,
    pub boot_args: String,
    pub vcpu_count: u32,
    pub mem_mib: u32,
    /// The guest's network card, on a TAP the caller created.
    pub nic: Option<Nic>,
    /// A read-only second disk: the cloud-init NoCloud seed.
    pub seed: Option<PathBuf>,
    /// The network namespace (a name under /run/netns, as `ip netns` keeps
    /// them) the VMM runs in; `None` runs it in the daemon's own. The NIC's
    /// TAP is looked up by name in this namespace.
    pub netns: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Nic {
    pub tap: String,
    pub mac: String,
}

impl VmSpec {
    pub fn console_log(&self) -> PathBuf {
        console_log_path(&self.work_dir)
    }
    pub fn pid_file(&self) -> PathBuf {
        self.work_dir.join("vmm.pid")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.work_dir.join("vmm.sock")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.work_dir.join("vmm.log")
    }
}

/// The guest's serial console is written here by every backend.
pub fn console_log_path(work_dir: &Path) -> PathBuf {
    work_dir.join("console.log")
}

/// Files a snapshot is written to and restored from.
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    /// Device and CPU state (for QEMU, the migration stream holds both state and RAM).
    pub state: PathBuf,
    pub memory: PathBuf,
}

/// A started VMM process. The caller owns it and waits for it to exit.
pub struct VmProcess {
    pub pid: u32,
    pub child: tokio::process::Child,
}

#[async_trait]
pub trait Vmm: Send + Sync {
    /// The name the API reports (`qemu`, `firecracker`, `cloud-hypervisor`).
    fn name(&self) -> &'static str;
    fn capabilities(&self) -> Capabilities;
    /// Starts the VMM and the guest; returns once the guest is running.
    async fn boot(&self, spec: &VmSpec) -> Result<VmProcess>;
    /// Asks the guest to power off (ACPI); does not wait.
    async fn request_shutdown(&self, spec: &VmSpec) -> Result<()>;
    async fn pause(&self, spec: &VmSpec) -> Result<()>;
    async fn resume(&self, spec: &VmSpec) -> Result<()>;
    /// Writes memory + CPU/device state of a paused guest to `out`.
    /// `out.memory` may be a FIFO the caller reads while this runs.
    async fn snapshot(&self, spec: &VmSpec, out: &SnapshotFiles) -> Result<()>;
    /// Starts a VMM from `from` instead of booting; the guest comes back paused.
    async fn restore(&self, spec: &VmSpec, from: &SnapshotFiles) -> Result<VmProcess>;
    /// The VM's VMM has exited: gives back what the backend held for it
    /// (its cgroup, its uid). Harmless when there is nothing to give back.
    async fn release(&self, _vm_id: &str) {}
    /// Start-up, after the VMMs of an earlier daemon were killed: removes
    /// what they left (their cgroups).
    async fn recover(&self) {}
    /// Daemon shutdown, after every VMM ended: removes what the backend
    /// made for this daemon as a whole (its cgroup directories, if empty).
    async fn shutdown(&self) {}
}
