//! The fast tier: manager flows, their failure and rollback paths included,
//! on a temporary SQLite file and data dir with the FakeVmm (a fake standing
//! in for a hypervisor), networking off: no root, QEMU or network namespace.

#[path = "fast/backends.rs"]
mod backends;
#[path = "fast/checkpoint.rs"]
mod checkpoint;
#[path = "fast/fake_vmm.rs"]
mod fake_vmm;
#[path = "fast/host.rs"]
mod host;
#[path = "fast/mapped.rs"]
mod mapped;
#[path = "fast/moves.rs"]
mod moves;

use fake_vmm::{memory_bytes, BootFault, Event, Memory, RestoreFault, SnapshotFault, MEMORY_BYTES};
use hatch::manager::ErrorKind;
use hatch::snapshot::Objects;
use hatch::store::MEMORY;
use hatch::vmm::process::is_alive;
use hatch::vmm::DiskFormat;
use host::Host;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

const MEM_MIB: i64 = 128;

fn state(vm: &hatch::store::Vm) -> String {
    vm.state.to_string()
}

/// The VM's events after the last one `since` matches.
fn events_after(events: &[Event], since: impl Fn(&Event) -> bool) -> Vec<Event> {
    let start = events.iter().rposition(since).expect("no such event");
    events[start + 1..].to_vec()
}

#[tokio::test]
async fn create_stop_start_delete_as_the_api_reports_them() {
    let h = Host::new().await;
    let vm = h.create(MEM_MIB).await.unwrap();
    let id = vm.id.clone();
    assert_eq!(state(&vm), "running");
    assert_eq!(vm.last_error, None);
    assert_eq!(h.vm(&id).await.state.to_string(), "running");
    let listed: Vec<_> = h.manager.list_vms(&h.owner).await.unwrap();
    assert_eq!(
        listed.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    let work = h.work_dir(&id);
    assert!(DiskFormat::Raw.path_in(&work).is_file(), "the VM's disk");
    let pid = h.fake.pid(&id).unwrap();
    assert!(is_alive(pid));
    assert_eq!(h.processes_of(&id), [pid]);
    assert_eq!(
        std::fs::read_to_string(work.join("vmm.pid"))
            .unwrap()
            .trim(),
        pid.to_string()
    );
    let (log, growing) = h.manager.console_log(&h.owner, &id).await.unwrap();
    assert!(growing, "a running VM's console may still grow");
    let console = std::fs::read_to_string(log).unwrap();
    assert!(console.contains(&format!("booting {id}")), "{console}");

    let vm = h.manager.stop_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&vm), "stopped");
    assert_eq!(h.vm(&id).await.state.to_string(), "stopped");
    assert!(h.fake.events(&id).contains(&Event::ShutdownRequested));
    assert!(!is_alive(pid), "the VMM is gone after stop");
    assert!(h.processes_of(&id).is_empty());
    assert!(
        DiskFormat::Raw.path_in(&work).is_file(),
        "stop keeps the disk"
    );
    // Only a running VM can be stopped (409).
    let again = h.manager.stop_vm(&h.owner, &id).await.unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Conflict, "{again:?}");

    let vm = h.manager.start_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&vm), "running");
    let pid2 = h.fake.pid(&id).unwrap();
    assert_ne!(pid, pid2, "a fresh boot");
    assert_eq!(h.processes_of(&id), [pid2]);

    h.manager.delete_vm(&h.owner, &id).await.unwrap();
    let gone = h.manager.get_vm(&h.owner, &id).await.unwrap_err();
    assert_eq!(gone.kind(), ErrorKind::NotFound, "{gone:?}");
    assert!(!is_alive(pid2), "delete ends the VMM");
    assert!(!work.exists(), "delete removes the work dir");
    assert!(h.manager.list_vms(&h.owner).await.unwrap().is_empty());
}

/// A reserve that leaves room for exactly one VM of MEM_MIB (with the default 256 MiB overhead).
fn room_for_one_vm() -> String {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    (kib / 1024 - 600).to_string()
}

#[tokio::test]
async fn a_vmm_failing_to_boot_ends_in_error_and_frees_the_host_memory() {
    let reserve = room_for_one_vm();
    let h = Host::with(&[("HATCH_HOST_MEMORY_RESERVE_MIB", &reserve)]).await;

    h.fake.fail_next_boot(BootFault::Error);
    let err = h.create(MEM_MIB).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Internal,
        "expected a 500, got {err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("the guest did not come up"), "{msg}");
    let vms = h.manager.list_vms(&h.owner).await.unwrap();
    assert_eq!(vms.len(), 1, "the VM exists, in error");
    let failed = &vms[0];
    assert_eq!(state(failed), "error");
    assert_eq!(failed.last_error.as_deref(), Some(msg.as_str()));
    assert!(h.fake.pid(&failed.id).is_none(), "no VMM was started");
    assert!(h.processes_of(&failed.id).is_empty());
    assert!(!h.manager.is_running(&failed.id));

    // Its memory is free again: a VM that needs the host's only room starts...
    let ok = h.create(MEM_MIB).await.unwrap();
    assert_eq!(state(&ok), "running");
    // ...and that room is real: a second one is refused while the first runs.
    let full = h.create(MEM_MIB).await.unwrap_err();
    assert_eq!(full.kind(), ErrorKind::Unavailable, "{full:?}");
    h.manager.stop_vm(&h.owner, &ok.id).await.unwrap();

    // A failed start of an existing VM ends the same way.
    h.fake.fail_boot(&failed.id, BootFault::Error);
    let err = h.manager.start_vm(&h.owner, &failed.id).await.unwrap_err();
    assert!(
        err.to_string().contains("the guest did not come up"),
        "{err}"
    );
    let vm = h.vm(&failed.id).await;
    assert_eq!(state(&vm), "error");
    assert_eq!(vm.last_error.as_deref(), Some(err.to_string().as_str()));
}

#[tokio::test]
async fn a_vmm_exiting_right_after_boot_is_recorded_as_error() {
    let reserve = room_for_one_vm();
    let h = Host::with(&[("HATCH_HOST_MEMORY_RESERVE_MIB", &reserve)]).await;
    h.fake.fail_next_boot(BootFault::ChildExits);
    // The VMM started, so the create succeeds; supervision sees it die.
    let vm = h.create(MEM_MIB).await.unwrap();
    let pid = h.fake.pid(&vm.id).unwrap();
    let vm = h.wait_for_state(&vm.id, "error").await;
    assert_eq!(
        vm.last_error.as_deref(),
        Some("the VMM process exited unexpectedly (exit status: 1)")
    );
    assert!(!is_alive(pid));
    assert!(h.processes_of(&vm.id).is_empty());
    assert!(!h.manager.is_running(&vm.id));
    // Its memory is free again.
    let other = h.create(MEM_MIB).await.unwrap();
    assert_eq!(state(&other), "running");
    // And the VM in error can be started again.
    let vm = h.manager.stop_vm(&h.owner, &other.id).await.unwrap();
    assert_eq!(state(&vm), "stopped");
    let again = h.manager.start_vm(&h.owner, &vm.id).await.unwrap();
    assert_eq!(state(&again), "running");
}

#[tokio::test]
async fn a_snapshot_whose_upload_fails_halfway_leaves_the_vm_running() {
    let h = Host::new().await;
    let vm = h.create(MEM_MIB).await.unwrap();
    let id = vm.id.clone();
    let pid = h.fake.pid(&id).unwrap();

    // The memory the VMM will save is known, so are its chunks: the first
    // one past 4 MiB of the 20 whose fan-out directory no earlier chunk
    // needs is made impossible to store (a plain file is where its
    // directory goes), a real write error half way through the upload.
    let chunks = host::cut(&memory_bytes(&Memory {
        vm: id.clone(),
        generation: 1,
    }));
    let fans: Vec<(u64, String)> = chunks
        .iter()
        .map(|(offset, _, hash)| (*offset, hash.to_string()[..2].to_string()))
        .collect();
    let (before, after): (Vec<_>, Vec<_>) = fans.iter().partition(|(o, _)| *o < 4 << 20);
    let blocked = after
        .iter()
        .map(|(_, fan)| fan.clone())
        .find(|f| !before.iter().any(|(_, b)| b == f))
        .unwrap();
    let blocker = h
        .data_dir()
        .join("objects/chunks")
        .join(&h.owner.id)
        .join(&blocked);
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"in the way").unwrap();
    let blocker_key = format!("chunks/{}/{blocked}", h.owner.id);
    let failed = h.manager.snapshot_vm(&h.owner, &id).await;
    let err = failed.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err:?}");
    assert!(err.to_string().contains("the VM keeps running"), "{err}");
    // capture.rs: any failure before every object is stored resumes the guest.
    let vm = h.vm(&id).await;
    assert_eq!(state(&vm), "running");
    assert_eq!(vm.standby_snapshot_id, None);
    assert!(!h.fake.is_paused(&id), "the guest runs again");
    let since_pause = events_after(&h.fake.events(&id), |e| *e == Event::Paused);
    assert_eq!(since_pause, [Event::Resumed]);
    assert!(is_alive(pid), "the same VMM goes on");
    assert_eq!(h.processes_of(&id), [pid]);
    // Nothing of it is listed, stored, or left in the work dir; no row of
    // any status is left either (it would count against the snapshot quota).
    assert!(h
        .manager
        .list_vm_snapshots(&h.owner, &id)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(h.snapshot_rows(&id).await, 0);
    assert_eq!(h.object_files(&id), Vec::<std::path::PathBuf>::new());
    // The chunks uploaded before the failure go too, rows and objects.
    h.eventually("the failed capture's chunks are removed", || async {
        h.chunk_keys() == BTreeSet::from([blocker_key.clone()])
    })
    .await;
    assert!(h.chunk_rows().await.is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(h.work_dir(&id))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("capture-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // With the way clear again, the same VM snapshots and restores.
    std::fs::remove_file(&blocker).unwrap();
    let snap = h.manager.snapshot_vm(&h.owner, &id).await.unwrap();
    assert_eq!(snap.status.to_string(), "ready");
    assert_eq!(state(&h.vm(&id).await), "snapshotted");
    let vm = h.manager.restore_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&vm), "running");
}

#[tokio::test]
async fn a_vmm_dying_mid_snapshot_leaves_no_snapshot_and_the_vm_in_error() {
    let h = Host::new().await;
    let vm = h.create(MEM_MIB).await.unwrap();
    let id = vm.id.clone();
    h.fake.fail_snapshot(&id, SnapshotFault::DieAfter(5 << 20));
    let err = h.manager.snapshot_vm(&h.owner, &id).await.unwrap_err();
    assert!(err.to_string().contains("died while saving"), "{err}");
    assert!(h
        .fake
        .events(&id)
        .contains(&Event::DiedSaving { bytes: 5 << 20 }));
    // Its VMM is gone, so the VM cannot be running: supervision records it.
    let vm = h.wait_for_state(&id, "error").await;
    assert!(
        vm.last_error
            .as_deref()
            .unwrap_or("")
            .contains("exited unexpectedly"),
        "{vm:?}"
    );
    assert!(h
        .manager
        .list_vm_snapshots(&h.owner, &id)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(h.snapshot_rows(&id).await, 0);
    // The stream ended early but cleanly (the writer went away), so the
    // store holds the chunks of a short memory until the manager removes them.
    assert!(h.object_files(&id).is_empty(), "{:?}", h.object_files(&id));
    h.eventually("the chunks of the short memory are removed", || async {
        h.chunk_keys().is_empty()
    })
    .await;
    assert!(h.chunk_rows().await.is_empty());
    assert!(h.processes_of(&id).is_empty());
}

fn flip_byte(path: &std::path::Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], offset).unwrap();
}

#[tokio::test]
async fn a_restore_whose_memory_checksum_fails_changes_nothing() {
    let h = Host::new().await;
    let vm = h.create(MEM_MIB).await.unwrap();
    let id = vm.id.clone();
    let snap = h.manager.snapshot_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&h.vm(&id).await), "snapshotted");
    assert!(h.processes_of(&id).is_empty(), "standby ends the VMM");
    // The memory is chunks of exactly what the VMM saved, MEMORY_BYTES of them.
    let saved = Memory {
        vm: id.clone(),
        generation: 1,
    };
    h.assert_memory_stored(&snap, &saved).await;
    assert_eq!(snap.memory_size, Some(MEMORY_BYTES as i64));
    let chunk = h.chunk_at(&snap, MEMORY, 12 << 20).await;
    let (memory, at) = (&chunk.path, (12 << 20) - chunk.offset);
    let disk = DiskFormat::Raw.path_in(&h.work_dir(&id));
    let disk_before = std::fs::read(&disk).unwrap();

    flip_byte(memory, at);
    let err = h.manager.restore_vm(&h.owner, &id).await.unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(err.to_string().contains("stays snapshotted"), "{err}");
    // restore.rs: a corrupt chunk fails the restore before anything changes.
    let vm = h.vm(&id).await;
    assert_eq!(state(&vm), "snapshotted");
    assert_eq!(vm.last_error, None);
    assert_eq!(vm.standby_snapshot_id.as_deref(), Some(snap.id.as_str()));
    let listed = h.manager.list_vm_snapshots(&h.owner, &id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status.to_string(), "ready");
    let since_save = events_after(&h.fake.events(&id), |e| matches!(e, Event::Saved(_)));
    assert!(
        !since_save.contains(&Event::Resumed),
        "a guest was resumed from unverified memory: {since_save:?}"
    );
    assert!(h.processes_of(&id).is_empty(), "the loading VMM is ended");
    assert!(!h.manager.is_running(&id));
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        disk_before,
        "the disk is as it was"
    );

    // Mended, the same snapshot restores, and the VMM got exactly what was saved.
    flip_byte(memory, at);
    let vm = h.manager.restore_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&vm), "running");
    let since_save = events_after(&h.fake.events(&id), |e| matches!(e, Event::Saved(_)));
    assert_eq!(
        since_save.last_chunk::<2>().unwrap(),
        &[
            Event::Loaded {
                from: saved,
                intact: true
            },
            Event::Resumed
        ]
    );
}

#[tokio::test]
async fn a_refused_restore_leaves_the_vm_snapshotted() {
    let h = Host::new().await;
    let vm = h.create(MEM_MIB).await.unwrap();
    let id = vm.id.clone();
    h.manager.snapshot_vm(&h.owner, &id).await.unwrap();
    h.fake.fail_restore(&id, RestoreFault::Refuse);
    let err = h.manager.restore_vm(&h.owner, &id).await.unwrap_err();
    assert!(err.to_string().contains("refused to load"), "{err}");
    assert_eq!(state(&h.vm(&id).await), "snapshotted");
    assert!(h.processes_of(&id).is_empty());
    let vm = h.manager.restore_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&vm), "running");
}

/// A daemon killed mid-flow: its runtime (every task, the manager) goes at
/// once, the fake VMMs live on, and a new manager recovers on the same files.
#[test]
fn recovery_after_a_crash_mid_snapshot_and_mid_restore() {
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    let first = rt();
    let h = first.block_on(Host::new());
    let [running, stopped, standby, capturing, restoring] = first.block_on(async {
        let mut ids = vec![];
        for _ in 0..5 {
            ids.push(h.create(MEM_MIB).await.unwrap().id);
        }
        h.manager.stop_vm(&h.owner, &ids[1]).await.unwrap();
        h.manager.snapshot_vm(&h.owner, &ids[2]).await.unwrap();
        h.manager.snapshot_vm(&h.owner, &ids[4]).await.unwrap();
        <[String; 5]>::try_from(ids).unwrap()
    });
    // Two flows cut short: a capture with 9 MiB of memory stored, and a
    // restore whose VMM started but never finished loading.
    let capture_reached = Arc::new(tokio::sync::Notify::new());
    h.fake.fail_snapshot(
        &capturing,
        SnapshotFault::HangAfter(9 << 20, capture_reached.clone()),
    );
    let restore_reached = Arc::new(tokio::sync::Notify::new());
    h.fake.fail_restore(
        &restoring,
        RestoreFault::HangLoading(restore_reached.clone()),
    );
    for (id, snapshot) in [(&capturing, true), (&restoring, false)] {
        let (manager, owner, id) = (Arc::clone(&h.manager), h.owner.clone(), id.clone());
        first.spawn(async move {
            match snapshot {
                true => manager.snapshot_vm(&owner, &id).await.map(drop),
                false => manager.restore_vm(&owner, &id).await.map(drop),
            }
        });
    }
    first.block_on(async {
        let both = async {
            capture_reached.notified().await;
            restore_reached.notified().await;
        };
        tokio::time::timeout(Duration::from_secs(60), both)
            .await
            .expect("the flows never got going")
    });
    // Mid-capture: a snapshot row, and chunks of the memory it streams are
    // stored (none has a row yet: rows come with the manifest's commit).
    let capturing_chunks: BTreeSet<String> = host::cut(&memory_bytes(&Memory {
        vm: capturing.clone(),
        generation: 1,
    }))
    .iter()
    .map(|(_, _, hash)| Objects::chunk_key(&h.owner.id, hash, None).unwrap())
    .collect();
    let stored_of_capture = |h: &Host| -> BTreeSet<String> {
        h.chunk_keys()
            .intersection(&capturing_chunks)
            .cloned()
            .collect()
    };
    first.block_on(h.eventually("chunks of the capture are stored", || async {
        !stored_of_capture(&h).is_empty()
    }));
    let rows = first.block_on(h.chunk_rows());
    assert!(stored_of_capture(&h).is_disjoint(&rows), "{rows:?}");
    assert_eq!(first.block_on(h.snapshot_rows(&capturing)), 1);
    // Mid-restore: the VM is starting.
    assert_eq!(state(&first.block_on(h.vm(&restoring))), "starting");
    let pids = [&running, &capturing, &restoring].map(|id| h.fake.pid(id).unwrap());

    // The crash.
    let crashed = h.crash();
    first.shutdown_background();
    assert!(
        pids.iter().all(|p| is_alive(*p)),
        "VMMs outlive their daemon"
    );

    let second = rt();
    second.block_on(async {
        let h = crashed.restart().await;
        let (fake, owner) = (&h.fake, &h.owner);
        h.manager.recover().await.unwrap();
        assert!(pids.iter().all(|p| !is_alive(*p)), "recovery kills them");

        let vm = h.vm(&running).await;
        assert_eq!(state(&vm), "error");
        assert_eq!(
            vm.last_error.as_deref(),
            Some("the hatch daemon restarted while this VM was running; its VMM process is gone")
        );
        let vm = h.vm(&stopped).await;
        assert_eq!((state(&vm), vm.last_error), ("stopped".into(), None));
        // The interrupted capture never became a snapshot; its VM was running.
        let vm = h.vm(&capturing).await;
        assert_eq!(state(&vm), "error");
        assert!(h
            .manager
            .list_vm_snapshots(owner, &capturing)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(h.snapshot_rows(&capturing).await, 0);
        assert_eq!(h.object_files(&capturing), Vec::<std::path::PathBuf>::new());
        // The start-up sweep removes its chunks (they have no row); the store
        // then holds exactly the chunks the database knows.
        h.eventually("the sweep removes the capture's chunks", || async {
            stored_of_capture(&h).is_empty()
        })
        .await;
        assert_eq!(h.chunk_keys(), h.chunk_rows().await);
        // A VM in standby still is, also one whose restore was cut short, and
        // each resumes from exactly what it saved.
        for id in [&standby, &restoring] {
            let vm = h.vm(id).await;
            assert_eq!((state(&vm), vm.last_error), ("snapshotted".into(), None));
            let vm = h.manager.restore_vm(owner, id).await.unwrap();
            assert_eq!(state(&vm), "running");
            let loaded = Event::Loaded {
                from: Memory {
                    vm: id.clone(),
                    generation: 1,
                },
                intact: true,
            };
            assert_eq!(
                fake.events(id).last_chunk::<2>().unwrap(),
                &[loaded, Event::Resumed]
            );
            h.manager.stop_vm(owner, id).await.unwrap();
        }
        for id in [&running, &stopped, &standby, &capturing, &restoring] {
            assert!(h.processes_of(id).is_empty(), "{id}");
        }
    });
}
