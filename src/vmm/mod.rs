//! The hypervisor boundary: one `Vmm` trait, one module per backend.
//!
//! Nothing outside this module names a hypervisor. A backend runs one VMM
//! process per VM and keeps everything it needs (control socket, pid file,
//! console log) in the VM's work directory, so any operation can be done
//! again from the directory alone, also after a daemon restart.

pub mod cgroup;
pub mod confine;
pub mod disk;
pub mod fifo;
pub mod firecracker;
pub mod metrics;
pub mod process;
pub mod qemu;
pub mod ram;
mod registry;
#[cfg(test)]
pub mod testing;

pub use crate::image::content::{KernelKind as KernelFormat, RootfsFormat};
pub use registry::{Backends, BackendsConfig, DefaultHypervisor};

use async_trait::async_trait;
use std::path::{Path, PathBuf};

/// Every hypervisor name the API accepts (the Hypeman API's vocabulary), whether
/// or not this daemon has a backend for it: `Backends::names` says which it has.
pub const HYPERVISORS: [&str; 4] = ["cloud-hypervisor", "firecracker", "qemu", "vz"];

/// The disk format a hypervisor's VMs (and so its snapshots) keep their root
/// disk in, known by name, so a snapshot's disk can be read (and converted for
/// another backend) also where this daemon lacks the backend that wrote it.
/// The format is never guessed from a file's content: a guest writes its own
/// disk, and a raw disk can hold anything, a qcow2 header included.
pub fn disk_format_of(hypervisor: &str) -> Option<DiskFormat> {
    match hypervisor {
        "qemu" => Some(DiskFormat::Qcow2Overlay),
        "firecracker" | "cloud-hypervisor" => Some(DiskFormat::Raw),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Launch(String),
    #[error("hypervisor control channel: {0}")]
    Control(String),
    #[error("{0} is not supported by the {1} backend")]
    Unsupported(&'static str, &'static str),
    /// A VM (or a request) names a hypervisor this daemon has no backend for.
    #[error("hypervisor {name} is not available on this host (it has {available})")]
    Unavailable { name: String, available: String },
    /// Making the VM's disk failed (the tool's own words).
    #[error("{0}")]
    Disk(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, VmmError>;

/// The disk format a backend boots from: a qcow2 overlay over the image's
/// rootfs (no copy), or a raw file of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2Overlay,
    Raw,
}

impl DiskFormat {
    /// The VM's disk in its work directory. The name says the format, so a
    /// file is never opened as the other one.
    pub fn path_in(self, work_dir: &Path) -> PathBuf {
        work_dir.join(match self {
            DiskFormat::Qcow2Overlay => "disk.qcow2",
            DiskFormat::Raw => "disk.raw",
        })
    }
}

/// How guest memory moves between a VMM and the snapshot store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryTransport {
    /// One byte stream through a FIFO (`SnapshotFiles::memory`): the daemon
    /// uploads what the VMM writes, and feeds what it reads on restore.
    Stream,
    /// A memory file the VMM writes whole and maps on restore.
    MappedFile,
    /// A directory of files the VMM writes and reads itself.
    Directory,
}

impl std::fmt::Display for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemoryTransport::Stream => "a memory stream",
            MemoryTransport::MappedFile => "a mapped memory file",
            MemoryTransport::Directory => "a snapshot directory",
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// Standby snapshots (memory and device state) can be taken and loaded.
    pub snapshot: bool,
    pub graceful_shutdown: bool,
    pub disk_format: DiskFormat,
    /// The kernel formats it boots, preferred first.
    pub kernels: &'static [KernelFormat],
    pub memory: MemoryTransport,
    /// With `MemoryTransport::MappedFile`: the VMM maps a restore's memory
    /// image shared, as the guest's RAM itself. The caller then best hands
    /// the image over in anonymous shared memory (a memfd, named as
    /// `/proc/self/fd/N`), which becomes the guest's RAM with no copy; an
    /// image in a file on disk is copied into new RAM first. `false`: the
    /// VMM maps the file privately (copy on write), so a file on disk is best.
    pub shared_ram: bool,
}

impl Capabilities {
    pub fn boots(&self, kernel: KernelFormat) -> bool {
        self.kernels.contains(&kernel)
    }
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
    /// Device and CPU state (a backend whose memory stream carries that
    /// state too writes a description of the stream here).
    pub state: PathBuf,
    /// Guest memory, moved as `Capabilities::memory` says.
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
    /// The kernel command line the guest gets: the VM's own arguments plus
    /// whatever this backend's machine needs (nothing, by default).
    fn boot_args(&self, vm_args: &str) -> String {
        vm_args.to_string()
    }
    /// Where the VM's disk is in `work_dir`.
    fn disk_path(&self, work_dir: &Path) -> PathBuf {
        self.capabilities().disk_format.path_in(work_dir)
    }
    /// Makes the VM's disk in `work_dir` from the image's `rootfs` (stored
    /// as `stored`); returns `disk_path(work_dir)`.
    async fn prepare_disk(
        &self,
        rootfs: &Path,
        stored: RootfsFormat,
        work_dir: &Path,
    ) -> Result<PathBuf> {
        disk::create(self.capabilities().disk_format, rootfs, stored, work_dir).await
    }
    /// The files a snapshot made in (or restored from) `dir` consists of.
    fn snapshot_files(&self, dir: &Path) -> SnapshotFiles {
        SnapshotFiles {
            state: dir.join("vmstate"),
            memory: dir.join("memory"),
        }
    }
    /// Starts the VMM and the guest; returns once the guest is running.
    async fn boot(&self, spec: &VmSpec) -> Result<VmProcess>;
    /// Asks the guest to power off (ACPI); does not wait.
    async fn request_shutdown(&self, spec: &VmSpec) -> Result<()>;
    async fn pause(&self, spec: &VmSpec) -> Result<()>;
    async fn resume(&self, spec: &VmSpec) -> Result<()>;
    /// Writes memory + CPU/device state of a paused guest to `out`. With
    /// `MemoryTransport::Stream`, `out.memory` is a FIFO the caller reads
    /// while this runs.
    async fn snapshot(&self, spec: &VmSpec, out: &SnapshotFiles) -> Result<()>;
    /// Starts a VMM from `from` instead of booting; the guest comes back
    /// paused. With `MemoryTransport::Stream`, `from.memory` is a FIFO the
    /// caller feeds while this runs.
    async fn restore(&self, spec: &VmSpec, from: &SnapshotFiles) -> Result<VmProcess>;
    /// The running VMM's counters (`pid` is its process). The default is
    /// what the host knows of the process; backends add block and network
    /// counters and their own raw figures.
    async fn metrics(&self, _spec: &VmSpec, pid: u32) -> Result<metrics::VmmMetrics> {
        metrics::process_metrics(pid)
            .ok_or_else(|| VmmError::Control(format!("the VMM (pid {pid}) is not running")))
    }
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

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::BzImage => "a bzImage",
            KernelFormat::Elf => "an ELF vmlinux",
        })
    }
}
