//! Hypeman's Standby snapshot is a checkpoint: the instance goes on as it
//! was (running in the same VMM, or in standby on its own snapshot), and the
//! snapshot is independent of it. Hatch's own snapshot still puts the VM to
//! sleep. With the FakeVmm (a fake standing in for a hypervisor).

use super::fake_vmm::{Event, Memory, MEMORY_BYTES};
use super::host::Host;
use super::{events_after, state, MEM_MIB};
use hatch::manager::requests::{CreateSnapshot, FromSnapshot};
use hatch::manager::ErrorKind;
use hatch::snapshot::{Algorithm, CompressionConfig};
use hatch::store::{self, OwnerLimits};
use hatch::vmm::process::is_alive;
use std::time::Duration;

fn standby(name: &str) -> CreateSnapshot {
    CreateSnapshot {
        kind: Some("Standby".into()),
        name: Some(name.into()),
        tags: Some([("stage".to_string(), name.to_string())].into()),
        ..Default::default()
    }
}

fn saved(vm: &str, generation: u64) -> Memory {
    Memory {
        vm: vm.to_string(),
        generation,
    }
}

fn loaded(vm: &str, generation: u64) -> Event {
    Event::Loaded {
        from: saved(vm, generation),
        intact: true,
    }
}

fn running_to(target: &str) -> FromSnapshot {
    FromSnapshot {
        target_state: Some(target.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_running_instance_is_checkpointed_and_runs_on_in_the_same_vmm() {
    let h = Host::new().await;
    let id = h.create(MEM_MIB).await.unwrap().id;
    let pid = h.fake.pid(&id).unwrap();

    let mut checkpoints = vec![];
    for (n, name) in ["first", "second"].into_iter().enumerate() {
        let before = h.fake.events(&id).len();
        let snap = h
            .manager
            .create_snapshot(&h.owner, &id, standby(name))
            .await
            .unwrap();
        assert_eq!(snap.status.to_string(), "ready");
        assert_eq!(snap.name.as_deref(), Some(name));
        assert_eq!(snap.tags.get("stage").map(String::as_str), Some(name));
        // Paused, saved, resumed: by the VMM that was running, which still is.
        let since = h.fake.events(&id)[before..].to_vec();
        let generation = n as u64 + 1;
        assert_eq!(
            since,
            [
                Event::Paused,
                Event::Saved(saved(&id, generation)),
                Event::Resumed
            ]
        );
        assert!(!h.fake.is_paused(&id));
        let vm = h.vm(&id).await;
        assert_eq!(state(&vm), "running");
        assert_eq!(
            vm.standby_snapshot_id, None,
            "the checkpoint is not its standby"
        );
        assert!(is_alive(pid));
        assert_eq!(h.processes_of(&id), [pid]);
        assert!(h.manager.is_running(&id));
        checkpoints.push(snap);
    }
    let booted = h
        .fake
        .events(&id)
        .iter()
        .filter(|e| matches!(e, Event::Booted { .. }))
        .count();
    assert_eq!(booted, 1, "no second VMM");

    // Independent: the first goes at once, objects and all, while the instance runs.
    let first = &checkpoints[0];
    h.manager
        .delete_snapshot(&h.owner, &first.id)
        .await
        .unwrap();
    let listed = h.manager.list_vm_snapshots(&h.owner, &id).await.unwrap();
    assert_eq!(
        listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        [checkpoints[1].id.as_str()]
    );
    let left = h.object_files(&id);
    assert!(
        left.iter()
            .all(|p| p.to_string_lossy().contains(&checkpoints[1].id)),
        "{left:?}"
    );
    assert_eq!(state(&h.vm(&id).await), "running");

    // The second restores into the instance once it sleeps (Hatch's
    // snapshot, generation 3): the memory loaded is the checkpoint's.
    let asleep = h.manager.snapshot_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&h.vm(&id).await), "snapshotted");
    assert!(h.processes_of(&id).is_empty());
    let vm = h
        .manager
        .restore_snapshot(&h.owner, &id, &checkpoints[1].id, running_to("Running"))
        .await
        .unwrap();
    assert_eq!(state(&vm), "running");
    assert_eq!(
        h.fake.events(&id).last_chunk::<2>().unwrap(),
        &[loaded(&id, 2), Event::Resumed]
    );
    // The sleep snapshot it left is an ordinary one now.
    h.manager
        .delete_snapshot(&h.owner, &asleep.id)
        .await
        .unwrap();
}

#[tokio::test]
async fn hatch_snapshots_still_put_the_vm_to_sleep() {
    let h = Host::new().await;
    let id = h.create(MEM_MIB).await.unwrap().id;
    let pid = h.fake.pid(&id).unwrap();
    let snap = h.manager.snapshot_vm(&h.owner, &id).await.unwrap();
    let vm = h.vm(&id).await;
    assert_eq!(state(&vm), "snapshotted");
    assert_eq!(vm.standby_snapshot_id.as_deref(), Some(snap.id.as_str()));
    assert!(!is_alive(pid), "the VMM ends");
    let err = h
        .manager
        .delete_snapshot(&h.owner, &snap.id)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    let vm = h.manager.restore_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&vm), "running");
}

#[tokio::test]
async fn an_instance_in_standby_is_checkpointed_from_its_stored_state() {
    let h = Host::new().await;
    let id = h.create(MEM_MIB).await.unwrap().id;
    let asleep = h.manager.snapshot_vm(&h.owner, &id).await.unwrap();
    let events = h.fake.events(&id);

    let req = CreateSnapshot {
        compression: Some(CompressionConfig {
            enabled: true,
            algorithm: Some(Algorithm::Lz4),
            level: None,
        }),
        ..standby("copy")
    };
    let copy = h.manager.create_snapshot(&h.owner, &id, req).await.unwrap();
    assert_ne!(copy.id, asleep.id);
    assert_eq!(copy.status.to_string(), "ready");
    assert_eq!(copy.name.as_deref(), Some("copy"));
    assert_eq!(copy.tags.get("stage").map(String::as_str), Some("copy"));
    assert_eq!(copy.compression_state.to_string(), "compressing");
    assert_eq!(copy.memory_size, Some(MEMORY_BYTES as i64));
    let hashes =
        |m: Vec<super::host::PartChunk>| m.into_iter().map(|c| c.chunk.hash).collect::<Vec<_>>();
    assert_eq!(
        hashes(h.manifest(&copy, hatch::store::MEMORY).await),
        hashes(h.manifest(&asleep, hatch::store::MEMORY).await),
        "the copy lists the same memory chunks"
    );
    // Nothing ran: no VMM, no event; the instance sleeps on its own snapshot.
    assert_eq!(h.fake.events(&id), events);
    assert!(h.processes_of(&id).is_empty());
    let vm = h.vm(&id).await;
    assert_eq!(state(&vm), "snapshotted");
    assert_eq!(vm.standby_snapshot_id.as_deref(), Some(asleep.id.as_str()));
    // Its own device state object, the same bytes; the same chunks, shared
    // (none copied). Compression asked for has nothing of its own to
    // compress: every chunk is shared, and stays as the standby reads it.
    let chunks_before = h.chunk_keys();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let copy = loop {
        let s = h.manager.get_snapshot(&h.owner, &copy.id).await.unwrap();
        if s.compression_state.to_string() != "compressing" {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(copy.compression_state.to_string(), "compressed", "{copy:?}");
    let objects = h.data_dir().join("objects");
    assert_ne!(copy.state_key, asleep.state_key);
    assert_eq!(
        std::fs::read(objects.join(&copy.state_key)).unwrap(),
        std::fs::read(objects.join(&asleep.state_key)).unwrap()
    );
    for part in [store::MEMORY, store::DISK] {
        let (ours, theirs) = (
            h.manifest(&copy, part).await,
            h.manifest(&asleep, part).await,
        );
        assert_eq!(
            ours.iter().map(|c| c.chunk).collect::<Vec<_>>(),
            theirs.iter().map(|c| c.chunk).collect::<Vec<_>>(),
            "{part}"
        );
    }
    assert_eq!(
        h.chunk_keys(),
        chunks_before,
        "no chunk was copied or recoded"
    );
    assert_eq!(copy.size_bytes, asleep.size_bytes);

    // The copy forks and runs: the memory the fork loads is what the instance saved.
    let fork = h
        .manager
        .fork_snapshot(
            &h.owner,
            &copy.id,
            FromSnapshot {
                name: Some("from-copy".into()),
                ..running_to("Running")
            },
        )
        .await
        .unwrap();
    assert_eq!(state(&fork), "running");
    assert_eq!(
        h.fake.events(&fork.id).last_chunk::<2>().unwrap(),
        &[loaded(&id, 1), Event::Resumed]
    );
    h.manager.delete_vm(&h.owner, &fork.id).await.unwrap();
    // Deleted, it takes nothing of the instance's: that still restores from its own.
    h.manager.delete_snapshot(&h.owner, &copy.id).await.unwrap();
    assert!(objects.join(&asleep.state_key).is_file());
    assert_eq!(h.chunk_keys(), chunks_before, "the shared chunks stay");
    let vm = h.manager.restore_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&vm), "running");
    assert_eq!(
        h.fake.events(&id).last_chunk::<2>().unwrap(),
        &[loaded(&id, 1), Event::Resumed]
    );
}

#[tokio::test]
async fn a_checkpoint_whose_guest_does_not_resume_leaves_the_vm_in_standby_on_it() {
    let h = Host::new().await;
    let id = h.create(MEM_MIB).await.unwrap().id;
    let pid = h.fake.pid(&id).unwrap();
    h.fake.fail_resume(&id);
    let err = h
        .manager
        .create_snapshot(&h.owner, &id, standby("stuck"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.to_string().contains("did not resume"), "{err}");
    assert!(err.to_string().contains("refused to resume"), "{err}");
    // The snapshot is kept and the VM stands by on it; its VMM is gone.
    let listed = h.manager.list_vm_snapshots(&h.owner, &id).await.unwrap();
    assert_eq!(listed.len(), 1);
    let snap = &listed[0];
    assert_eq!(snap.name.as_deref(), Some("stuck"));
    assert_eq!(snap.status.to_string(), "ready");
    assert!(err.to_string().contains(&snap.id), "{err}");
    let vm = h.vm(&id).await;
    assert_eq!(state(&vm), "snapshotted");
    assert_eq!(vm.standby_snapshot_id.as_deref(), Some(snap.id.as_str()));
    assert!(!is_alive(pid));
    assert!(h.processes_of(&id).is_empty());
    assert!(!h.manager.is_running(&id));
    // It holds the VM's memory now: not deletable until the VM resumes from it.
    let refused = h
        .manager
        .delete_snapshot(&h.owner, &snap.id)
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Conflict, "{refused}");
    let vm = h.manager.restore_vm(&h.owner, &id).await.unwrap();
    assert_eq!(state(&vm), "running");
    assert_eq!(
        h.fake.events(&id).last_chunk::<2>().unwrap(),
        &[loaded(&id, 1), Event::Resumed]
    );
    h.manager.delete_snapshot(&h.owner, &snap.id).await.unwrap();
}

#[tokio::test]
async fn a_checkpoint_over_the_stored_bytes_quota_keeps_nothing_and_the_guest_runs() {
    let h = Host::new().await;
    let id = h.create(MEM_MIB).await.unwrap().id;
    let pid = h.fake.pid(&id).unwrap();
    // Room for the disk, not for the memory: refused after the capture.
    let disk = std::fs::metadata(hatch::vmm::DiskFormat::Raw.path_in(&h.work_dir(&id)))
        .unwrap()
        .len();
    let limits = OwnerLimits {
        stored_bytes: Some((disk + (1 << 20)) as i64),
        ..Default::default()
    };
    h.manager
        .store()
        .set_owner_limits(&h.owner.id, &limits)
        .await
        .unwrap();
    let err = h
        .manager
        .create_snapshot(&h.owner, &id, standby("big"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Forbidden, "{err}");
    assert!(err.to_string().contains("stored bytes limit"), "{err}");
    let since = events_after(&h.fake.events(&id), |e| matches!(e, Event::Booted { .. }));
    assert_eq!(
        since,
        [Event::Paused, Event::Saved(saved(&id, 1)), Event::Resumed]
    );
    assert_eq!(state(&h.vm(&id).await), "running");
    assert_eq!(h.processes_of(&id), [pid]);
    assert_eq!(h.snapshot_rows(&id).await, 0);
    assert_eq!(h.object_files(&id), Vec::<std::path::PathBuf>::new());

    // In standby, a copy is refused up front (its size is known): nothing is copied.
    h.manager
        .store()
        .set_owner_limits(&h.owner.id, &OwnerLimits::default())
        .await
        .unwrap();
    let asleep = h.manager.snapshot_vm(&h.owner, &id).await.unwrap();
    let limits = OwnerLimits {
        stored_bytes: Some(asleep.size_bytes + 1),
        ..Default::default()
    };
    h.manager
        .store()
        .set_owner_limits(&h.owner.id, &limits)
        .await
        .unwrap();
    let objects = h.object_files(&id);
    let err = h
        .manager
        .create_snapshot(&h.owner, &id, standby("copy"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Forbidden, "{err}");
    assert_eq!(h.snapshot_rows(&id).await, 1);
    assert_eq!(h.object_files(&id), objects);
    assert_eq!(state(&h.vm(&id).await), "snapshotted");
}

#[tokio::test]
async fn another_owner_cannot_checkpoint_and_other_states_are_refused() {
    let h = Host::new().await;
    let id = h.create(MEM_MIB).await.unwrap().id;
    let bob = h
        .manager
        .store()
        .create_owner("own_bob", "bob")
        .await
        .unwrap();
    let err = h
        .manager
        .create_snapshot(&bob, &id, standby("theirs"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(h.snapshot_rows(&id).await, 0);
    assert!(!h.fake.events(&id).contains(&Event::Paused));

    h.manager.stop_vm(&h.owner, &id).await.unwrap();
    let err = h
        .manager
        .create_snapshot(&h.owner, &id, standby("cold"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert_eq!(h.snapshot_rows(&id).await, 0);
}
