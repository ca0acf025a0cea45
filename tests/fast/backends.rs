//! Which backend a VM runs on: the `hypervisor` its create asked for (one
//! this daemon has, booting the image's kernel), else the server's default.

use super::fake_vmm::FakeVmm;
use super::host::Host;
use super::{state, MEM_MIB};
use hatch::manager::requests::CreateVm;
use hatch::manager::ErrorKind;
use hatch::vmm::{KernelFormat, MemoryTransport};
use std::path::Path;

/// The first bytes of an x86 bzImage: the boot sector signature and `HdrS`.
fn bzimage_head() -> Vec<u8> {
    let mut head = vec![0u8; 0x400];
    head[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    head[0x202..0x206].copy_from_slice(b"HdrS");
    head
}

/// The first bytes of a 64-bit x86 ELF file.
fn elf_head() -> Vec<u8> {
    let mut head = vec![0u8; 0x400];
    head[..4].copy_from_slice(b"\x7fELF");
    head[4] = 2; // 64-bit
    head[5] = 1; // little-endian
    head[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    head
}

#[tokio::test]
async fn a_vm_runs_on_the_hypervisor_it_asks_for_which_must_boot_its_kernel() {
    // A second fake registered as `vz`: a name the API accepts that this
    // daemon never has a backend of its own for. It boots ELF kernels only.
    let vz = FakeVmm::named("vz", MemoryTransport::Stream, &[KernelFormat::Elf]);
    let h = Host::with_fakes(&[], vec![FakeVmm::new(), vz.clone()]).await;
    let image = h.manager.get_image(&h.owner, "img_default").await.unwrap();
    let kernel = hatch::image::kernel_in(Path::new(&image.dir));
    std::fs::write(&kernel, bzimage_head()).unwrap();
    let create = |hypervisor: Option<&str>| {
        h.manager.create_vm(
            &h.owner,
            CreateVm {
                enable_network: Some(false),
                mem_mib: Some(MEM_MIB),
                hypervisor: hypervisor.map(str::to_string),
                ..Default::default()
            },
        )
    };

    // No hypervisor: the server's default.
    let vm = create(None).await.unwrap();
    assert_eq!(vm.hypervisor, "fake");
    assert!(h.fake.pid(&vm.id).is_some());
    assert!(vz.pid(&vm.id).is_none());

    // Refused, each with its reason, and nothing made.
    for (hypervisor, reason) in [
        (
            "vz",
            "image_id: the image's kernel is a bzImage, and the vz backend boots only an ELF vmlinux",
        ),
        (
            "cloud-hypervisor",
            "hypervisor: hypervisor cloud-hypervisor is not available on this host (it has fake, vz)",
        ),
        (
            "fake",
            "hypervisor must be one of cloud-hypervisor, firecracker, qemu, vz, got \"fake\"",
        ),
    ] {
        let err = create(Some(hypervisor)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadRequest, "{hypervisor}: {err:?}");
        assert_eq!(err.to_string(), reason);
    }
    assert_eq!(h.manager.list_vms(&h.owner).await.unwrap().len(), 1);

    // An image whose kernel it boots: the VM runs on it, also after a stop and start.
    std::fs::write(&kernel, elf_head()).unwrap();
    let on_vz = create(Some("vz")).await.unwrap();
    assert_eq!(
        (on_vz.hypervisor.as_str(), state(&on_vz).as_str()),
        ("vz", "running")
    );
    let first = vz.pid(&on_vz.id).unwrap();
    assert!(h.fake.pid(&on_vz.id).is_none());
    assert_eq!(h.processes_of(&on_vz.id), [first]);
    h.manager.stop_vm(&h.owner, &on_vz.id).await.unwrap();
    let again = h.manager.start_vm(&h.owner, &on_vz.id).await.unwrap();
    assert_eq!(again.hypervisor, "vz");
    let second = vz.pid(&on_vz.id).unwrap();
    assert_ne!(first, second);
    assert!(h.fake.pid(&on_vz.id).is_none());
}
