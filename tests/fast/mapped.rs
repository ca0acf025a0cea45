//! Standby snapshots through a backend whose VMM writes a regular memory file
//! and maps it on restore (`MemoryTransport::MappedFile`), with the FakeVmm in
//! its mapped-file mode (a fake: Firecracker cannot run in CI).

use super::fake_vmm::{Event, FakeVmm, Memory, RestoreFault, SnapshotFault, MEMORY_BYTES};
use super::host::Host;
use super::{events_after, flip_byte, state, MEM_MIB};
use hatch::manager::requests::{CreateSnapshot, FromSnapshot};
use hatch::snapshot::{Algorithm, CompressionConfig};
use hatch::store::{DISK, MEMORY};
use hatch::vmm::process::is_alive;
use hatch::vmm::DiskFormat;
use std::collections::BTreeMap;
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
    // What the VMM wrote, stored byte for byte as chunks (each chunk's
    // BLAKE3 vouches for it: no whole-stream checksum), its size truthful.
    assert_eq!(snap.memory_size, Some(MEMORY_BYTES as i64));
    assert_eq!(snap.memory_sha256, None);
    let memory = h.assert_memory_stored(&snap, &saved).await;
    // The device state is the one whole object; memory and disk are chunks.
    let state_object = h.data_dir().join("objects").join(&snap.state_key);
    assert_eq!(h.object_files(&id), [state_object]);
    let disk = DiskFormat::Raw.path_in(&h.work_dir(&id));
    let disk_size = std::fs::metadata(&disk).unwrap().len();
    let disk_chunks = h.manifest(&snap, DISK).await;
    let disk_raw: u64 = disk_chunks
        .iter()
        .map(|c| u64::from(c.chunk.raw_size))
        .sum();
    assert_eq!(disk_raw, disk_size);
    assert_eq!(snap.disk_size, Some(disk_size as i64));
    let state_size = snap.state_size.unwrap();
    assert!(state_size > 0);
    // size_bytes: the device state and every chunk the snapshot references, each once.
    let referenced: BTreeMap<_, _> = memory
        .iter()
        .chain(&disk_chunks)
        .map(|c| (c.path.clone(), std::fs::metadata(&c.path).unwrap().len()))
        .collect();
    assert_eq!(
        snap.size_bytes,
        state_size + referenced.values().sum::<u64>() as i64
    );
    assert_eq!(
        h.chunk_keys().len(),
        referenced.len(),
        "the store holds these chunks, nothing else"
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
    h.assert_memory_stored(
        &again,
        &Memory {
            vm: id.clone(),
            generation: 2,
        },
    )
    .await;
}

#[tokio::test]
async fn a_corrupt_or_missing_mapped_memory_file_changes_nothing_and_starts_no_vmm() {
    let h = mapped_host().await;
    let id = h.create(MEM_MIB).await.unwrap().id;
    let snap = h.manager.snapshot_vm(&h.owner, &id).await.unwrap();
    // A chunk of the memory, in the middle of it.
    let chunk = h.chunk_at(&snap, MEMORY, 12 << 20).await;
    let (memory, at) = (&chunk.path, (12 << 20) - chunk.offset);
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

    flip_byte(memory, at);
    let err = h.manager.restore_vm(&h.owner, &id).await.unwrap_err();
    assert!(err.to_string().contains("is corrupt"), "{err}");
    assert!(err.to_string().contains("stays snapshotted"), "{err}");
    unchanged("corrupt").await;
    flip_byte(memory, at);

    let aside = memory.with_extension("aside");
    std::fs::rename(memory, &aside).unwrap();
    let err = h.manager.restore_vm(&h.owner, &id).await.unwrap_err();
    assert!(err.to_string().contains("is missing"), "{err}");
    unchanged("missing").await;
    std::fs::rename(&aside, memory).unwrap();

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
        // The memory's chunks (only this snapshot references them) are
        // stored compressed, `.zst` or `.lz4`, and only so; no whole memory
        // object exists. The sizes say so truthfully.
        let suffix = match algorithm {
            Algorithm::Zstd => ".zst",
            Algorithm::Lz4 => ".lz4",
        };
        let memory = h.manifest(&snap, MEMORY).await;
        let mut compressed = 0;
        for c in &memory {
            assert_eq!(c.chunk.encoding, Some(algorithm), "{}", c.path.display());
            assert!(c.path.to_string_lossy().ends_with(suffix));
            let stored = std::fs::metadata(&c.path).unwrap().len();
            assert_eq!(stored, u64::from(c.chunk.stored_size));
            assert!(stored < u64::from(c.chunk.raw_size));
            let raw = c.path.with_file_name(c.chunk.hash.to_string());
            assert!(!raw.exists(), "{} is also stored raw", c.path.display());
            compressed += stored;
        }
        assert!(!h.data_dir().join("objects").join(&snap.memory_key).exists());
        assert_eq!(snap.compressed_size_bytes, Some(compressed as i64));
        assert_eq!(snap.memory_size, Some(MEMORY_BYTES as i64));
        let disk: BTreeMap<_, _> = h
            .manifest(&snap, DISK)
            .await
            .into_iter()
            .map(|c| (c.path, i64::from(c.chunk.stored_size)))
            .collect();
        assert_eq!(
            snap.size_bytes,
            snap.state_size.unwrap() + compressed as i64 + disk.values().sum::<i64>()
        );
        assert!(compressed < MEMORY_BYTES * 3 / 4, "{compressed}");

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
