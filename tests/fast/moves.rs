//! Stopped snapshots moving between backends with `target_hypervisor`:
//! restore and fork convert the disk (a qcow2 overlay <-> raw) and the VM
//! runs on the backend it moved to. Standby snapshots never move.
//!
//! The two backends are FakeVmms registered as `qemu` (disks: qcow2
//! overlays, made with `qemu-img` as the real backend does) and `firecracker`
//! (raw disks, a mapped memory file): `vmm::disk_format_of` knows a
//! snapshot's disk format by its backend's name, so the fakes carry those
//! names. No QEMU or Firecracker runs; the conversion is the real one.

use super::fake_vmm::{FakeVmm, BOTH_KERNELS};
use super::host::Host;
use super::{flip_byte, state, MEM_MIB};
use hatch::manager::requests::{CreateSnapshot, FromSnapshot};
use hatch::manager::ErrorKind;
use hatch::store::{Snapshot, DISK};
use hatch::vmm::{DiskFormat, KernelFormat, MemoryTransport};
use std::path::{Path, PathBuf};
use std::process::Command;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

async fn two_backends() -> (Host, std::sync::Arc<FakeVmm>, std::sync::Arc<FakeVmm>) {
    let qemu = FakeVmm::with_disks(
        "qemu",
        MemoryTransport::Stream,
        BOTH_KERNELS,
        DiskFormat::Qcow2Overlay,
    );
    let fc = FakeVmm::with_disks(
        "firecracker",
        MemoryTransport::MappedFile,
        BOTH_KERNELS,
        DiskFormat::Raw,
    );
    let h = Host::with_fakes(&[], vec![qemu.clone(), fc.clone()]).await;
    (h, qemu, fc)
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// What a guest writes: `byte` over 64 KiB at `offset`, into the disk as its format has it.
fn guest_writes(disk: &Path, offset: u64, byte: u8) {
    let format = match disk.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => "qcow2",
        _ => "raw",
    };
    run_ok(
        Command::new("qemu-io")
            .args(["-f", format, "-c"])
            .arg(format!("write -P {byte} {offset} 64k"))
            .arg(disk),
    );
}

/// The guest-visible bytes of a disk, whatever its format.
fn disk_bytes(disk: &Path) -> Vec<u8> {
    let format = match disk.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => "qcow2",
        _ => "raw",
    };
    let out = disk.with_extension("seen");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", format, "-O", "raw"])
            .arg(disk)
            .arg(&out),
    );
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// The default image's rootfs.
fn rootfs(h: &Host) -> PathBuf {
    let dir = h.data_dir().join("images/img_default");
    let version = std::fs::read_dir(&dir).unwrap().flatten().next().unwrap();
    hatch::image::rootfs_in(&version.path())
}

/// The image's rootfs with the guest's writes over it.
fn expected(h: &Host, writes: &[(u64, u8)]) -> Vec<u8> {
    let mut bytes = std::fs::read(rootfs(h)).unwrap();
    for (offset, byte) in writes {
        bytes[*offset as usize..*offset as usize + (64 << 10)].fill(*byte);
    }
    bytes
}

/// The disk files and scratch directories in a VM's work directory.
fn disk_files(h: &Host, vm: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(h.work_dir(vm))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("disk") || n.starts_with("restore-"))
        .collect();
    names.sort();
    names
}

async fn stopped_snapshot(h: &Host, vm: &str) -> Snapshot {
    let req = CreateSnapshot {
        kind: Some("Stopped".into()),
        ..Default::default()
    };
    h.manager.create_snapshot(&h.owner, vm, req).await.unwrap()
}

fn onto(hypervisor: &str, target_state: &str) -> FromSnapshot {
    FromSnapshot {
        name: None,
        target_state: Some(target_state.into()),
        target_hypervisor: Some(hypervisor.into()),
    }
}

fn disk_of(h: &Host, vm: &str, format: DiskFormat) -> PathBuf {
    format.path_in(&h.work_dir(vm))
}

#[tokio::test]
async fn a_stopped_snapshot_moves_between_backends_with_its_disk() {
    if !is_root() {
        println!("skipped: converting a disk runs the tool as nobody, which needs root");
        return;
    }
    let (h, qemu, fc) = two_backends().await;
    let id = h.create(MEM_MIB).await.unwrap().id;
    assert_eq!(h.vm(&id).await.hypervisor, "qemu");
    h.manager.stop_vm(&h.owner, &id).await.unwrap();
    guest_writes(&disk_of(&h, &id, DiskFormat::Qcow2Overlay), 512 << 10, 0xab);
    let on_qemu = stopped_snapshot(&h, &id).await;
    assert_eq!(on_qemu.source_hypervisor, "qemu");

    // Restored onto firecracker: the VM moves there, its disk raw, the qcow2 gone.
    let vm = h
        .manager
        .restore_snapshot(&h.owner, &id, &on_qemu.id, onto("firecracker", "Stopped"))
        .await
        .unwrap();
    assert_eq!(
        (vm.hypervisor.as_str(), state(&vm).as_str()),
        ("firecracker", "stopped")
    );
    assert_eq!(h.vm(&id).await.hypervisor, "firecracker");
    assert_eq!(disk_files(&h, &id), ["disk.raw"]);
    let raw = disk_of(&h, &id, DiskFormat::Raw);
    assert!(disk_bytes(&raw) == expected(&h, &[(512 << 10, 0xab)]));
    let meta = std::fs::metadata(&raw).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    // It boots there.
    let vm = h.manager.start_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&vm), "running");
    assert!(fc.pid(&id).is_some());
    h.manager.stop_vm(&h.owner, &id).await.unwrap();

    // What the guest writes on firecracker, forked back onto qemu and running.
    guest_writes(&raw, 1 << 20, 0xcd);
    let on_fc = stopped_snapshot(&h, &id).await;
    assert_eq!(on_fc.source_hypervisor, "firecracker");
    let fork = h
        .manager
        .fork_snapshot(
            &h.owner,
            &on_fc.id,
            FromSnapshot {
                name: Some("back-on-qemu".into()),
                ..onto("qemu", "Running")
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (fork.hypervisor.as_str(), state(&fork).as_str()),
        ("qemu", "running")
    );
    assert!(qemu.pid(&fork.id).is_some());
    assert!(fc.pid(&fork.id).is_none());
    assert_eq!(disk_files(&h, &fork.id), ["disk.qcow2"]);
    let both = expected(&h, &[(512 << 10, 0xab), (1 << 20, 0xcd)]);
    assert!(disk_bytes(&disk_of(&h, &fork.id, DiskFormat::Qcow2Overlay)) == both);
    // A fork without target_hypervisor stays where its snapshot was taken.
    let stays = h
        .manager
        .fork_snapshot(
            &h.owner,
            &on_fc.id,
            FromSnapshot {
                name: Some("stays".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(stays.hypervisor, "firecracker");
    assert_eq!(disk_files(&h, &stays.id), ["disk.raw"]);

    // And the VM itself back onto qemu, booted.
    let vm = h
        .manager
        .restore_snapshot(&h.owner, &id, &on_fc.id, onto("qemu", "Running"))
        .await
        .unwrap();
    assert_eq!(
        (vm.hypervisor.as_str(), state(&vm).as_str()),
        ("qemu", "running")
    );
    assert_eq!(disk_files(&h, &id), ["disk.qcow2"]);
    assert!(disk_bytes(&disk_of(&h, &id, DiskFormat::Qcow2Overlay)) == both);
    assert_eq!(h.processes_of(&id), [qemu.pid(&id).unwrap()]);
}

#[tokio::test]
async fn moves_that_cannot_be_made_change_nothing() {
    if !is_root() {
        println!("skipped: converting a disk runs the tool as nobody, which needs root");
        return;
    }
    let (h, _qemu, _fc) = two_backends().await;
    let id = h.create(MEM_MIB).await.unwrap().id;
    h.manager.stop_vm(&h.owner, &id).await.unwrap();
    guest_writes(&disk_of(&h, &id, DiskFormat::Qcow2Overlay), 0, 0x11);
    let stopped = stopped_snapshot(&h, &id).await;
    h.manager.start_vm(&h.owner, &id).await.unwrap();
    let standby = h.manager.snapshot_vm(&h.owner, &id).await.unwrap();
    let other = h
        .manager
        .store()
        .create_owner("own_other", "other")
        .await
        .unwrap();
    let disk = disk_of(&h, &id, DiskFormat::Qcow2Overlay);
    let disk_before = disk_bytes(&disk);
    let unchanged = |what: &'static str| {
        let (h, id, disk, disk_before) = (&h, &id, &disk, &disk_before);
        async move {
            let vm = h.vm(id).await;
            assert_eq!(
                (vm.hypervisor.as_str(), state(&vm).as_str()),
                ("qemu", "snapshotted"),
                "{what}"
            );
            assert_eq!(disk_files(h, id), ["disk.qcow2"], "{what}");
            assert!(&disk_bytes(disk) == disk_before, "{what}: the disk changed");
        }
    };

    // A Standby snapshot's memory loads only where it was saved.
    for target_state in ["Running", "Stopped"] {
        let err = h
            .manager
            .restore_snapshot(
                &h.owner,
                &id,
                &standby.id,
                onto("firecracker", target_state),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadRequest, "{err}");
        assert!(
            err.to_string()
                .contains("only be given for a Stopped snapshot"),
            "{err}"
        );
    }
    let err = h
        .manager
        .fork_snapshot(
            &h.owner,
            &standby.id,
            FromSnapshot {
                name: Some("nope".into()),
                ..onto("firecracker", "Running")
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadRequest, "{err}");
    unchanged("standby").await;

    // Names the API does not know, or this host does not run.
    for (hv, words) in [
        ("xen", "target_hypervisor must be one of"),
        ("cloud-hypervisor", "not available on this host"),
    ] {
        let err = h
            .manager
            .restore_snapshot(&h.owner, &id, &stopped.id, onto(hv, "Stopped"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadRequest, "{err}");
        assert!(err.to_string().contains(words), "{err}");
    }
    unchanged("bad names").await;

    // Another owner's instance or snapshot: not found, whatever the body says.
    let err = h
        .manager
        .restore_snapshot(&other, &id, &stopped.id, onto("firecracker", "Stopped"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let err = h
        .manager
        .fork_snapshot(
            &other,
            &stopped.id,
            FromSnapshot {
                name: Some("theirs".into()),
                ..onto("firecracker", "Stopped")
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(h.manager.list_vms(&other).await.unwrap().is_empty());
    unchanged("another owner").await;

    // A corrupt disk chunk: refused before anything changes.
    let chunk = h.chunk_at(&stopped, DISK, 4096).await;
    let (object, at) = (&chunk.path, 4096 - chunk.offset);
    flip_byte(object, at);
    let err = h
        .manager
        .restore_snapshot(&h.owner, &id, &stopped.id, onto("firecracker", "Stopped"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is corrupt"), "{err}");
    assert!(err.to_string().contains("it is unchanged"), "{err}");
    unchanged("corrupt").await;
    flip_byte(object, at);

    // The conversion fails (the image's rootfs it lies over is gone): no
    // half-converted disk is left, the VM keeps its backend and disk.
    let rootfs = rootfs(&h);
    let aside = rootfs.with_extension("aside");
    std::fs::rename(&rootfs, &aside).unwrap();
    let err = h
        .manager
        .restore_snapshot(&h.owner, &id, &stopped.id, onto("firecracker", "Stopped"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("converting the disk"), "{err}");
    std::fs::rename(&aside, &rootfs).unwrap();
    unchanged("conversion").await;
    let forks_before = h.manager.list_vms(&h.owner).await.unwrap().len();
    std::fs::rename(&rootfs, &aside).unwrap();
    let err = h
        .manager
        .fork_snapshot(
            &h.owner,
            &stopped.id,
            FromSnapshot {
                name: Some("half".into()),
                ..onto("firecracker", "Stopped")
            },
        )
        .await
        .unwrap_err();
    std::fs::rename(&aside, &rootfs).unwrap();
    assert!(err.to_string().contains("converting the disk"), "{err}");
    // The fork exists, truthfully in error, with no disk and no scratch.
    let vms = h.manager.list_vms(&h.owner).await.unwrap();
    assert_eq!(vms.len(), forks_before + 1);
    let half = vms
        .iter()
        .find(|v| v.name.as_deref() == Some("half"))
        .unwrap();
    assert_eq!(
        (half.hypervisor.as_str(), state(half).as_str()),
        ("firecracker", "error")
    );
    assert!(
        disk_files(&h, &half.id).is_empty(),
        "{:?}",
        disk_files(&h, &half.id)
    );

    // Mended, the same restore works.
    let vm = h
        .manager
        .restore_snapshot(&h.owner, &id, &stopped.id, onto("firecracker", "Stopped"))
        .await
        .unwrap();
    assert_eq!(vm.hypervisor, "firecracker");
    assert_eq!(disk_files(&h, &id), ["disk.raw"]);
    assert!(disk_bytes(&disk_of(&h, &id, DiskFormat::Raw)) == expected(&h, &[(0, 0x11)]));
}

#[tokio::test]
async fn a_move_to_a_backend_that_cannot_boot_the_image_is_refused() {
    let qemu = FakeVmm::with_disks(
        "qemu",
        MemoryTransport::Stream,
        BOTH_KERNELS,
        DiskFormat::Qcow2Overlay,
    );
    let fc = FakeVmm::with_disks(
        "firecracker",
        MemoryTransport::MappedFile,
        &[KernelFormat::Elf],
        DiskFormat::Raw,
    );
    let h = Host::with_fakes(&[], vec![qemu, fc]).await;
    let image = h.manager.get_image(&h.owner, "img_default").await.unwrap();
    // A bzImage: the boot sector signature and `HdrS`.
    let mut head = vec![0u8; 0x400];
    head[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    head[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(hatch::image::kernel_in(Path::new(&image.dir)), head).unwrap();
    let id = h.create(MEM_MIB).await.unwrap().id;
    let snap = stopped_snapshot(&h, &id).await;
    let reason = "target_hypervisor: the image's kernel is a bzImage, and the firecracker backend boots only an ELF vmlinux";
    let err = h
        .manager
        .restore_snapshot(&h.owner, &id, &snap.id, onto("firecracker", "Stopped"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadRequest, "{err}");
    assert_eq!(err.to_string(), reason);
    let err = h
        .manager
        .fork_snapshot(
            &h.owner,
            &snap.id,
            FromSnapshot {
                name: Some("cannot-boot".into()),
                ..onto("firecracker", "Stopped")
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadRequest, "{err}");
    assert_eq!(err.to_string(), reason);
    let vms = h.manager.list_vms(&h.owner).await.unwrap();
    assert_eq!(vms.len(), 1, "no fork was made");
    assert_eq!(
        (vms[0].hypervisor.as_str(), state(&vms[0]).as_str()),
        ("qemu", "stopped")
    );
    assert_eq!(disk_files(&h, &id), ["disk.qcow2"]);
}
