//! A fake backend for unit tests: a name and capabilities, no VMM behind it.

use super::{
    Capabilities, DiskFormat, KernelFormat, MemoryTransport, Result, SnapshotFiles, VmProcess,
    VmSpec, Vmm, VmmError,
};
use async_trait::async_trait;

/// Declares what a backend could be; every operation that would need a
/// VMM process fails.
pub struct FakeBackend {
    name: &'static str,
    caps: Capabilities,
}

impl FakeBackend {
    /// Snapshots through a stream, a qcow2 overlay, both kernel formats.
    pub fn new(name: &'static str) -> FakeBackend {
        FakeBackend {
            name,
            caps: Capabilities {
                snapshot: true,
                graceful_shutdown: true,
                disk_format: DiskFormat::Qcow2Overlay,
                kernels: &[KernelFormat::BzImage, KernelFormat::Elf],
                memory: MemoryTransport::Stream,
                shared_ram: false,
            },
        }
    }
    pub fn kernels(mut self, kernels: &'static [KernelFormat]) -> Self {
        self.caps.kernels = kernels;
        self
    }
    pub fn memory(mut self, memory: MemoryTransport) -> Self {
        self.caps.memory = memory;
        self
    }
    pub fn disk(mut self, disk_format: DiskFormat) -> Self {
        self.caps.disk_format = disk_format;
        self
    }
    pub fn without_snapshots(mut self) -> Self {
        self.caps.snapshot = false;
        self
    }
}

fn no_vmm<T>() -> Result<T> {
    Err(VmmError::Unsupported("running a VMM", "fake"))
}

#[async_trait]
impl Vmm for FakeBackend {
    fn name(&self) -> &'static str {
        self.name
    }
    fn capabilities(&self) -> Capabilities {
        self.caps
    }
    async fn boot(&self, _: &VmSpec) -> Result<VmProcess> {
        no_vmm()
    }
    async fn request_shutdown(&self, _: &VmSpec) -> Result<()> {
        no_vmm()
    }
    async fn pause(&self, _: &VmSpec) -> Result<()> {
        no_vmm()
    }
    async fn resume(&self, _: &VmSpec) -> Result<()> {
        no_vmm()
    }
    async fn snapshot(&self, _: &VmSpec, _: &SnapshotFiles) -> Result<()> {
        no_vmm()
    }
    async fn restore(&self, _: &VmSpec, _: &SnapshotFiles) -> Result<VmProcess> {
        no_vmm()
    }
}
