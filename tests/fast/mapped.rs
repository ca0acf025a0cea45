//! Standby snapshots through a backend whose VMM writes a regular memory file
//! and maps it on restore (`MemoryTransport::MappedFile`), with the FakeVmm in
//! its mapped-file mode (a fake: Firecracker cannot run in CI).

use super::fake_vmm::{
    memory_at, Event, FakeVmm, Memory, RestoreFault, SnapshotFault, MEMORY_BYTES,
};
use super::host::Host;
use super::{events_after, flip_byte, state, FILE_LIMIT, MEM_MIB};
use hatch::manager::requests::{CreateSnapshot, FromSnapshot};
use hatch::snapshot::{Algorithm, CompressionConfig};
use hatch::vmm::process::is_alive;
use hatch::vmm::DiskFormat;
use sha2::Digest;
use std::sync::Arc;
use std::time::Duration;

async fn mapped_host() -> Host {
    Host::with_fakes(&[], vec![FakeVmm::mapped_file()]).await
}

/// Scratch directories a snapshot flow left in the VM's work directory.
fn scratch(h: &Host, vm: &str) -> Vec<String> {
    std::fs::read_dir(h.work_dir(vm))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("capture-") || n.starts_with("restore-"))
        .collect()
}

/// The SHA-256 of the memory `m` the fake saves.
fn memory_sha256(m: &Memory) -> String {
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < MEMORY_BYTES {
        memory_at(m, offset, &mut buf);
        sha.update(&buf);
        offset += buf.len() as u64;
    }
    hex::encode(sha.finalize())
}

fn loaded(vm: &str, generation: u64) -> Event {
    Event::Loaded {
        from: Memory {
            vm: vm.to_string(),
            generation,
        },
        intact: true,
    }
}

#[tokio::test]
async fn a_mapped_memory_file_is_stored_whole_and_restored_verified_before_the_vmm_starts() {
    let _shared = FILE_LIMIT.read().await;
    let h = mapped_host().await;
    let vm = h.create(MEM_MIB).await.unwrap();
    let id = vm.id.clone();
    let pid = h.fake.pid(&id).unwrap();

    let snap = h.manager.snapshot_vm(&h.owner, &id).await.unwrap();
    assert_eq!(snap.status.to_string(), "ready");
    let saved = Memory {
        vm: id.clone(),
        generation: 1,
    };
    // What the VMM wrote, stored byte for byte, its size and checksum recorded truthfully.
    assert_eq!(snap.memory_size, Some(MEMORY_BYTES as i64));
    assert_eq!(
        snap.memory_sha256.as_deref(),
        Some(memory_sha256(&saved).as_str())
    );
    let memory = h.data_dir().join("objects").join(&snap.memory_key);
    assert_eq!(std::fs::metadata(&memory).unwrap().len(), MEMORY_BYTES);
    let disk = DiskFormat::Raw.path_in(&h.work_dir(&id));
    let disk_size = std::fs::metadata(&disk).unwrap().len();
    let state_size = snap.state_size.unwrap();
    assert!(state_size > 0);
    assert_eq!(
        snap.size_bytes,
        MEMORY_BYTES as i64 + state_size + disk_size as i64
    );
    assert_eq!(state(&h.vm(&id).await), "snapshotted");
    assert!(!is_alive(pid), "standby ends the VMM");
    assert!(scratch(&h, &id).is_empty(), "{:?}", scratch(&h, &id));

    let vm = h.manager.restore_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&vm), "running");
    assert_eq!(
        h.fake.events(&id).last_chunk::<2>().unwrap(),
        &[loaded(&id, 1), Event::Resumed]
    );
    assert!(!h.fake.is_paused(&id));
    assert_eq!(h.processes_of(&id), [h.fake.pid(&id).unwrap()]);
    // The fetched memory file goes once the VMM has it.
    assert!(scratch(&h, &id).is_empty(), "{:?}", scratch(&h, &id));

    // A second sleep saves the memory the restored guest has now.
    let again = h.manager.snapshot_vm(&h.owner, &id).await.unwrap();
    let vm = h.manager.restore_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&vm), "running");
    assert_eq!(
        h.fake.events(&id).last_chunk::<2>().unwrap(),
        &[loaded(&id, 2), Event::Resumed]
    );
    assert_ne!(again.memory_sha256, snap.memory_sha256);
}

#[tokio::test]
async fn a_corrupt_or_missing_mapped_memory_file_changes_nothing_and_starts_no_vmm() {
    let _shared = FILE_LIMIT.read().await;
    let h = mapped_host().await;
    let id = h.create(MEM_MIB).await.unwrap().id;
    let snap = h.manager.snapshot_vm(&h.owner, &id).await.unwrap();
    let memory = h.data_dir().join("objects").join(&snap.memory_key);
    let disk = DiskFormat::Raw.path_in(&h.work_dir(&id));
    let disk_before = std::fs::read(&disk).unwrap();
    let pid_before = h.fake.pid(&id);

    let unchanged = |what: &str| {
        let what = what.to_string();
        let (h, id, snap, disk, disk_before) = (&h, &id, &snap, &disk, &disk_before);
        async move {
            let vm = h.vm(id).await;
            assert_eq!(state(&vm), "snapshotted", "{what}");
            assert_eq!(vm.last_error, None, "{what}");
            assert_eq!(vm.standby_snapshot_id.as_deref(), Some(snap.id.as_str()));
            let since_save = events_after(&h.fake.events(id), |e| matches!(e, Event::Saved(_)));
            assert!(
                since_save.is_empty(),
                "{what}: the VMM was asked for {since_save:?}"
            );
            assert_eq!(h.fake.pid(id), pid_before, "{what}: a VMM was started");
            assert!(h.processes_of(id).is_empty(), "{what}");
            assert_eq!(
                &std::fs::read(disk).unwrap(),
                disk_before,
                "{what}: the disk"
            );
            assert!(scratch(h, id).is_empty(), "{what}: {:?}", scratch(h, id));
        }
    };

    flip_byte(&memory, 12 << 20);
    let err = h.manager.restore_vm(&h.owner, &id).await.unwrap_err();
    assert!(err.to_string().contains("is corrupt"), "{err}");
    assert!(err.to_string().contains("stays snapshotted"), "{err}");
    unchanged("corrupt").await;
    flip_byte(&memory, 12 << 20);

    let aside = memory.with_extension("aside");
    std::fs::rename(&memory, &aside).unwrap();
    let err = h.manager.restore_vm(&h.owner, &id).await.unwrap_err();
    assert!(err.to_string().contains("is missing"), "{err}");
    unchanged("missing").await;
    std::fs::rename(&aside, &memory).unwrap();

    // Mended, the same snapshot restores.
    let vm = h.manager.restore_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&vm), "running");
    assert_eq!(
        h.fake.events(&id).last_chunk::<2>().unwrap(),
        &[loaded(&id, 1), Event::Resumed]
    );
}

#[tokio::test]
async fn a_compressed_mapped_memory_is_decompressed_into_the_file_and_forks_load_it() {
    let _shared = FILE_LIMIT.read().await;
    let h = mapped_host().await;
    let id = h.create(MEM_MIB).await.unwrap().id;
    for (algorithm, name) in [(Algorithm::Zstd, "zstd"), (Algorithm::Lz4, "lz4")] {
        let req = CreateSnapshot {
            kind: Some("Standby".into()),
            compression: Some(CompressionConfig {
                enabled: true,
                algorithm: Some(algorithm),
                level: None,
            }),
            ..Default::default()
        };
        // A checkpoint (Hypeman's Standby): the VM runs on.
        let snap = h.manager.create_snapshot(&h.owner, &id, req).await.unwrap();
        assert_eq!(state(&h.vm(&id).await), "running");
        let checkpointed = match h.fake.events(&id).as_slice() {
            [.., Event::Saved(m), Event::Resumed] => m.clone(),
            other => panic!("{other:?}"),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let snap = loop {
            let s = h.manager.get_snapshot(&h.owner, &snap.id).await.unwrap();
            if s.compression_state.to_string() == "compressed" {
                break s;
            }
            assert!(std::time::Instant::now() < deadline, "{s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Only the compressed object is left to restore from.
        let objects = h.data_dir().join("objects");
        assert!(!objects.join(&snap.memory_key).exists());
        assert!(objects
            .join(snap.compressed_key.as_ref().unwrap())
            .is_file());

        // A fork resumed as Running loads the source's memory in a VMM of its own.
        let fork = h
            .manager
            .fork_snapshot(
                &h.owner,
                &snap.id,
                FromSnapshot {
                    name: Some(format!("fork-{name}")),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(state(&fork), "running");
        let since = h.fake.events(&fork.id);
        assert!(
            matches!(
                since.last_chunk::<2>().unwrap(),
                [Event::Loaded { from, intact: true }, Event::Resumed] if from.vm == id
            ),
            "{since:?}"
        );
        assert!(scratch(&h, &fork.id).is_empty());
        h.manager.delete_vm(&h.owner, &fork.id).await.unwrap();

        // Asleep (Hatch's snapshot), the VM restores the checkpoint's memory.
        let asleep = h.manager.snapshot_vm(&h.owner, &id).await.unwrap();
        let running = FromSnapshot {
            target_state: Some("Running".into()),
            ..Default::default()
        };
        let vm = h
            .manager
            .restore_snapshot(&h.owner, &id, &snap.id, running)
            .await
            .unwrap();
        assert_eq!(state(&vm), "running");
        assert_eq!(
            h.fake.events(&id).last_chunk::<2>().unwrap(),
            &[
                Event::Loaded {
                    from: checkpointed,
                    intact: true
                },
                Event::Resumed
            ],
        );
        assert!(scratch(&h, &id).is_empty());
        h.manager
            .delete_snapshot(&h.owner, &asleep.id)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_mapped_capture_that_fails_resumes_the_guest_and_leaves_no_file() {
    let _shared = FILE_LIMIT.read().await;
    let h = mapped_host().await;
    let id = h.create(MEM_MIB).await.unwrap().id;
    let pid = h.fake.pid(&id).unwrap();

    // The upload fails after the VMM wrote its files: the VM's object
    // prefix is a plain file, so no object can be made under it.
    let prefix = h.data_dir().join("objects/snapshots").join(&id);
    std::fs::create_dir_all(prefix.parent().unwrap()).unwrap();
    std::fs::write(&prefix, b"in the way").unwrap();
    let err = h.manager.snapshot_vm(&h.owner, &id).await.unwrap_err();
    assert!(err.to_string().contains("the VM keeps running"), "{err}");
    assert!(h
        .fake
        .events(&id)
        .iter()
        .any(|e| matches!(e, Event::Saved(_))));
    assert_eq!(
        events_after(&h.fake.events(&id), |e| matches!(e, Event::Saved(_))),
        [Event::Resumed]
    );
    let vm = h.vm(&id).await;
    assert_eq!(
        (state(&vm), vm.standby_snapshot_id),
        ("running".into(), None)
    );
    assert!(is_alive(pid), "the same VMM goes on");
    assert_eq!(h.snapshot_rows(&id).await, 0);
    assert!(scratch(&h, &id).is_empty(), "{:?}", scratch(&h, &id));
    std::fs::remove_file(&prefix).unwrap();

    // The VMM dies writing its memory file: no snapshot, the VM in error.
    h.fake.fail_snapshot(&id, SnapshotFault::DieAfter(5 << 20));
    let err = h.manager.snapshot_vm(&h.owner, &id).await.unwrap_err();
    assert!(err.to_string().contains("died while saving"), "{err}");
    let vm = h.wait_for_state(&id, "error").await;
    assert!(vm.last_error.unwrap().contains("exited unexpectedly"));
    assert_eq!(h.snapshot_rows(&id).await, 0);
    assert!(h.object_files(&id).is_empty(), "{:?}", h.object_files(&id));
    assert!(scratch(&h, &id).is_empty(), "{:?}", scratch(&h, &id));
    assert!(h.processes_of(&id).is_empty());
}

/// A daemon killed while a VMM writes its memory file, and while another
/// VM's memory file waits for its VMM: a restarted daemon removes both files.
#[test]
fn recovery_removes_the_memory_files_a_crash_left() {
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    let first = rt();
    let _shared = first.block_on(FILE_LIMIT.read());
    let h = first.block_on(mapped_host());
    let [capturing, restoring] = first.block_on(async {
        let a = h.create(MEM_MIB).await.unwrap().id;
        let b = h.create(MEM_MIB).await.unwrap().id;
        h.manager.snapshot_vm(&h.owner, &b).await.unwrap();
        [a, b]
    });
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
    {
        let (m, o, id) = (Arc::clone(&h.manager), h.owner.clone(), capturing.clone());
        first.spawn(async move { m.snapshot_vm(&o, &id).await.map(drop) });
        let (m, o, id) = (Arc::clone(&h.manager), h.owner.clone(), restoring.clone());
        first.spawn(async move { m.restore_vm(&o, &id).await.map(drop) });
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
    // The half-written memory file, and the fetched one the VMM is loading.
    let memory_files = |h: &Host, vm: &str| -> Vec<u64> {
        scratch(h, vm)
            .iter()
            .filter_map(|d| std::fs::metadata(h.work_dir(vm).join(d).join("memory")).ok())
            .map(|m| m.len())
            .collect()
    };
    assert_eq!(memory_files(&h, &capturing), [9 << 20]);
    assert_eq!(memory_files(&h, &restoring), [MEMORY_BYTES]);
    let crashed = h.crash();
    first.shutdown_background();

    let second = rt();
    second.block_on(async {
        let h = crashed.restart().await;
        h.manager.recover().await.unwrap();
        for id in [&capturing, &restoring] {
            assert!(scratch(&h, id).is_empty(), "{id}: {:?}", scratch(&h, id));
            assert!(h.processes_of(id).is_empty(), "{id}");
        }
        assert_eq!(state(&h.vm(&capturing).await), "error");
        assert_eq!(h.snapshot_rows(&capturing).await, 0);
        // Still asleep on its snapshot, and it resumes from exactly what it saved.
        assert_eq!(state(&h.vm(&restoring).await), "snapshotted");
        let vm = h.manager.restore_vm(&h.owner, &restoring).await.unwrap();
        assert_eq!(state(&vm), "running");
        assert_eq!(
            h.fake.events(&restoring).last_chunk::<2>().unwrap(),
            &[loaded(&restoring, 1), Event::Resumed]
        );
    });
}
