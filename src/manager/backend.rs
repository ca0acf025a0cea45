//! What the manager asks of a VM's backend before it acts: which backend,
//! and whether it can do what the flow needs (boot this kernel, save memory
//! the way this daemon stores it, take this snapshot back).

use super::{Manager, ManagerError, Result};
use crate::image;
use crate::store::{Snapshot, Vm};
use crate::vmm::{self, MemoryTransport, Vmm};
use std::path::Path;
use std::sync::Arc;

/// How a Standby snapshot's memory moves between a VMM and the store, as
/// far as the manager implements it (`check_standby_support`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SavedMemory {
    /// Uploaded from a FIFO while the VMM writes it; fed back the same way.
    Stream,
    /// A regular file the VMM writes whole, uploaded afterwards; fetched and
    /// verified whole before the VMM that maps it starts.
    File,
}

impl Manager {
    /// The backend `vm` runs on: the one its `hypervisor` names, or an
    /// error saying this daemon has none by that name (never another one).
    pub(super) fn backend_for(&self, vm: &Vm) -> std::result::Result<Arc<dyn Vmm>, vmm::VmmError> {
        self.backends.get(&vm.hypervisor)
    }

    /// `backend_for`, as the API's error: asking for a backend this daemon
    /// lacks is the caller's to change.
    pub(super) fn backend_or_reject(&self, vm: &Vm) -> Result<Arc<dyn Vmm>> {
        self.backend_for(vm)
            .map_err(|e| ManagerError::BadRequest(format!("vm {}: {e}", vm.id)))
    }

    /// Refuses an image none of whose kernels `backend` can boot, with the
    /// reason. A kernel whose format cannot be read is left for the VMM to report.
    pub(super) fn check_kernel(
        backend: &dyn Vmm,
        image_dir: &Path,
    ) -> std::result::Result<(), String> {
        let caps = backend.capabilities();
        let kernels = image::kernels_in(image_dir);
        if kernels.is_empty() || kernels.iter().any(|(k, _)| caps.boots(*k)) {
            return Ok(());
        }
        let has: Vec<String> = kernels.iter().map(|(k, _)| k.to_string()).collect();
        let bootable: Vec<String> = caps.kernels.iter().map(|k| k.to_string()).collect();
        Err(format!(
            "the image's kernel is {}, and the {} backend boots only {}",
            has.join(" and "),
            backend.name(),
            bootable.join(" or ")
        ))
    }

    /// Whether `backend` can save a guest's memory in a way this daemon can
    /// store, and how that memory moves: through a stream, or as a file the
    /// VMM writes whole (and maps on restore).
    pub(super) fn check_standby_support(
        backend: &dyn Vmm,
    ) -> std::result::Result<SavedMemory, String> {
        let caps = backend.capabilities();
        if !caps.snapshot {
            return Err(format!(
                "the {} backend cannot save a guest's memory: take a Stopped snapshot",
                backend.name()
            ));
        }
        match caps.memory {
            MemoryTransport::Stream => Ok(SavedMemory::Stream),
            MemoryTransport::MappedFile => Ok(SavedMemory::File),
            other => Err(format!(
                "snapshots through {other} (the {} backend's) are not supported yet",
                backend.name()
            )),
        }
    }

    /// A snapshot's disk (and memory) is in its own backend's format: it
    /// goes back only into a VM (`vm_id`) on that backend (`hypervisor`).
    pub(super) fn check_same_backend(
        snap: &Snapshot,
        vm_id: &str,
        hypervisor: &str,
    ) -> std::result::Result<(), String> {
        if snap.source_hypervisor == hypervisor {
            return Ok(());
        }
        Err(format!(
            "snapshot {} was taken on {}, instance {vm_id} runs on {hypervisor}: moving a snapshot between hypervisors is not supported yet",
            snap.id, snap.source_hypervisor
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::content::samples::{bzimage_head, elf_head};
    use crate::vmm::testing::FakeBackend;
    use crate::vmm::KernelFormat;

    #[test]
    fn an_image_whose_kernel_the_backend_cannot_boot_is_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("hatch-kernel-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let elf_only = FakeBackend::new("elf-only").kernels(&[KernelFormat::Elf]);
        let both = FakeBackend::new("both").kernels(&[KernelFormat::BzImage, KernelFormat::Elf]);
        // No kernel file, or one of no known format: the VMM will say.
        assert_eq!(Manager::check_kernel(&elf_only, &dir), Ok(()));
        std::fs::write(image::kernel_in(&dir), b"not a kernel").unwrap();
        assert_eq!(Manager::check_kernel(&elf_only, &dir), Ok(()));

        std::fs::write(image::kernel_in(&dir), bzimage_head()).unwrap();
        assert_eq!(Manager::check_kernel(&both, &dir), Ok(()));
        assert_eq!(
            Manager::check_kernel(&elf_only, &dir),
            Err("the image's kernel is a bzImage, and the elf-only backend boots only an ELF vmlinux".into())
        );
        // With its ELF beside it, the image suits both backends.
        std::fs::write(dir.join(image::VMLINUX_FILE), elf_head()).unwrap();
        assert_eq!(Manager::check_kernel(&elf_only, &dir), Ok(()));
        assert_eq!(Manager::check_kernel(&both, &dir), Ok(()));
        let bz_only = FakeBackend::new("bz-only").kernels(&[KernelFormat::BzImage]);
        std::fs::remove_file(image::kernel_in(&dir)).unwrap();
        // A backend that prefers a bzImage boots the ELF it also takes.
        assert_eq!(Manager::check_kernel(&both, &dir), Ok(()));
        assert_eq!(
            Manager::check_kernel(&bz_only, &dir),
            Err("the image's kernel is an ELF vmlinux, and the bz-only backend boots only a bzImage".into())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn memory_moves_as_a_stream_or_a_mapped_file_and_nothing_else_yet() {
        let stream = FakeBackend::new("streams");
        assert_eq!(
            Manager::check_standby_support(&stream),
            Ok(SavedMemory::Stream)
        );
        let mapped = FakeBackend::new("maps").memory(MemoryTransport::MappedFile);
        assert_eq!(
            Manager::check_standby_support(&mapped),
            Ok(SavedMemory::File)
        );
        let other = FakeBackend::new("dirs").memory(MemoryTransport::Directory);
        let e = Manager::check_standby_support(&other).unwrap_err();
        assert_eq!(
            e,
            "snapshots through a snapshot directory (the dirs backend's) are not supported yet"
        );
        let none = FakeBackend::new("plain")
            .memory(MemoryTransport::MappedFile)
            .without_snapshots();
        assert!(Manager::check_standby_support(&none)
            .unwrap_err()
            .contains("cannot save a guest's memory"));
    }

    #[test]
    fn a_snapshot_goes_back_only_onto_the_backend_that_took_it() {
        let snap = crate::snapshot::capturing_record(
            "snap_a",
            "vm_a",
            "o",
            crate::domain::SnapshotKind::Stopped,
            "one",
            Default::default(),
        );
        assert_eq!(Manager::check_same_backend(&snap, "vm_b", "one"), Ok(()));
        assert!(Manager::check_same_backend(&snap, "vm_b", "two")
            .unwrap_err()
            .contains("was taken on one, instance vm_b runs on two"));
    }
}
