//! A "daemon" for fast tests: a Manager on a temporary data dir (SQLite file,
//! local snapshot store, image files), networking off, FakeVmms as its hypervisors.

use super::fake_vmm::{memory_bytes, FakeVmm, Memory};
use hatch::config::Config;
use hatch::manager::requests::CreateVm;
use hatch::manager::Manager;
use hatch::snapshot::{ChunkHash, ChunkSizes, Objects, StoredChunk};
use hatch::store::{Owner, Snapshot, Store, Vm};
use hatch::vmm::{Backends, Vmm};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A temporary directory that ends every process started under it and is removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "hatch-fast-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Fake VMMs name their work dir on their command line: none outlives the test.
        hatch::vmm::process::kill_all_under(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Host {
    pub manager: Arc<Manager>,
    /// The default backend (the first of `fakes`).
    pub fake: Arc<FakeVmm>,
    /// Every backend this host has, the default first.
    pub fakes: Vec<Arc<FakeVmm>>,
    pub owner: Owner,
    pub config: Config,
    vars: HashMap<String, String>,
    // Last: dropped after the manager, so its processes are ended at the very end.
    pub tmp: Arc<TempDir>,
}

impl Host {
    pub async fn new() -> Host {
        Host::with(&[]).await
    }

    /// A host with these `HATCH_*` settings on top of the test's own.
    pub async fn with(extra: &[(&str, &str)]) -> Host {
        Host::with_fakes(extra, vec![FakeVmm::new()]).await
    }

    /// A host whose backends are `fakes` (the first is the server default).
    pub async fn with_fakes(extra: &[(&str, &str)], fakes: Vec<Arc<FakeVmm>>) -> Host {
        let tmp = Arc::new(TempDir::new());
        let src = tmp.0.join("image-src");
        std::fs::create_dir_all(&src).unwrap();
        // Never booted: the fake only needs files to import and a raw
        // rootfs to lay the VM's disk over.
        std::fs::write(
            src.join("vmlinuz"),
            b"not a kernel: the fake VMM never boots it",
        )
        .unwrap();
        let rootfs = std::fs::File::create(src.join("rootfs.raw")).unwrap();
        rootfs.set_len(4 << 20).unwrap();
        let mut vars: HashMap<String, String> = [
            ("HATCH_DATA_DIR", tmp.0.join("data").display().to_string()),
            (
                "HATCH_DEFAULT_KERNEL_PATH",
                src.join("vmlinuz").display().to_string(),
            ),
            (
                "HATCH_DEFAULT_ROOTFS_PATH",
                src.join("rootfs.raw").display().to_string(),
            ),
            ("HATCH_PROXY_ADDR", "off".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        let (manager, config) = start(&vars, &fakes).await;
        // As the daemon does before it serves: among others, this starts the
        // collector of chunks no snapshot references.
        manager.recover().await.unwrap();
        let owner = manager
            .store()
            .create_owner("own_fast", "fast")
            .await
            .unwrap();
        Host {
            manager,
            fake: Arc::clone(&fakes[0]),
            fakes,
            owner,
            config,
            vars,
            tmp,
        }
    }

    /// The daemon dies: its Manager is dropped (the caller shuts its runtime
    /// down too); its files, the fake and the fake's processes stay.
    pub fn crash(self) -> Crashed {
        drop(self.manager);
        Crashed {
            fake: self.fake,
            fakes: self.fakes,
            owner: self.owner,
            vars: self.vars,
            tmp: self.tmp,
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    pub fn work_dir(&self, vm: &str) -> PathBuf {
        self.config.vms_dir().join(vm)
    }

    /// The local snapshot store's files of one VM (staging files included).
    pub fn object_files(&self, vm: &str) -> Vec<PathBuf> {
        files_under(&self.data_dir().join("objects/snapshots").join(vm))
    }

    /// The chunk objects in the local store, of every owner, as keys
    /// (`chunks/{owner}/{2 hex}/{64 hex}[.zst|.lz4]`), staging files included.
    pub fn chunk_keys(&self) -> BTreeSet<String> {
        let objects = self.data_dir().join("objects");
        files_under(&objects.join("chunks"))
            .into_iter()
            .map(|p| p.strip_prefix(&objects).unwrap().display().to_string())
            .collect()
    }

    /// The keys of the chunks the database has a row for (orphans included):
    /// what the store should hold once no flow is under way.
    pub async fn chunk_rows(&self) -> BTreeSet<String> {
        let rows = self.manager.store().all_chunks().await.unwrap();
        rows.into_iter()
            .map(|(owner, hash, encoding)| Objects::chunk_key(&owner, &hash, encoding).unwrap())
            .collect()
    }

    /// The chunks of `part` (`store::MEMORY` or `store::DISK`) of `snap`, in
    /// order, as its manifest in the database lists them.
    pub async fn manifest(&self, snap: &Snapshot, part: &str) -> Vec<PartChunk> {
        let chunks = self
            .manager
            .store()
            .snapshot_manifest(snap, part)
            .await
            .unwrap();
        let mut offset = 0;
        chunks
            .into_iter()
            .map(|chunk| {
                let key = Objects::chunk_key(&snap.owner_id, &chunk.hash, chunk.encoding).unwrap();
                let c = PartChunk {
                    offset,
                    path: self.data_dir().join("objects").join(key),
                    chunk,
                };
                offset += u64::from(chunk.raw_size);
                c
            })
            .collect()
    }

    /// The chunk of `part` of `snap` that holds the part's byte `offset`.
    pub async fn chunk_at(&self, snap: &Snapshot, part: &str, offset: u64) -> PartChunk {
        self.manifest(snap, part)
            .await
            .into_iter()
            .find(|c| (c.offset..c.offset + u64::from(c.chunk.raw_size)).contains(&offset))
            .unwrap_or_else(|| panic!("{part} of {} has no byte {offset}", snap.id))
    }

    /// Asserts that `snap`'s memory is stored as exactly the memory `m` the
    /// fake saved: its manifest is the chunks the store cuts `m` into, and
    /// every raw chunk's file holds those bytes. Returns the manifest.
    pub async fn assert_memory_stored(&self, snap: &Snapshot, m: &Memory) -> Vec<PartChunk> {
        let manifest = self.manifest(snap, hatch::store::MEMORY).await;
        let bytes = memory_bytes(m);
        // A memory file is chunked at fixed offsets, a memory stream at cut points.
        let want = if self.fake.capabilities().memory == hatch::vmm::MemoryTransport::MappedFile {
            split_fixed(&bytes)
        } else {
            cut(&bytes)
        };
        let got: Vec<_> = manifest
            .iter()
            .map(|c| (c.offset, c.chunk.raw_size as usize, c.chunk.hash))
            .collect();
        assert!(
            got == want,
            "the memory manifest of {} is not {m:?}",
            snap.id
        );
        for c in manifest.iter().filter(|c| c.chunk.encoding.is_none()) {
            let start = c.offset as usize;
            let stored = std::fs::read(&c.path).unwrap();
            assert!(
                stored == bytes[start..start + c.chunk.raw_size as usize],
                "{} does not hold the memory at {start}",
                c.path.display()
            );
        }
        manifest
    }

    /// Waits (bounded) until `holds` says yes, as a client polling would.
    pub async fn eventually<F: std::future::Future<Output = bool>>(
        &self,
        what: &str,
        holds: impl Fn() -> F,
    ) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !holds().await {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Snapshot rows of a VM in any status (listings show only `ready` ones).
    pub async fn snapshot_rows(&self, vm: &str) -> i64 {
        self.manager.store().vm_snapshot_count(vm).await.unwrap()
    }

    pub async fn create(&self, mem_mib: i64) -> hatch::manager::Result<Vm> {
        self.manager
            .create_vm(
                &self.owner,
                CreateVm {
                    enable_network: Some(false),
                    mem_mib: Some(mem_mib),
                    ..Default::default()
                },
            )
            .await
    }

    pub async fn vm(&self, id: &str) -> Vm {
        self.manager.get_vm(&self.owner, id).await.unwrap()
    }

    /// Waits (bounded) until the VM is in `state`, as a client polling GET would.
    pub async fn wait_for_state(&self, id: &str, state: &str) -> Vm {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let vm = self.vm(id).await;
            // to_string: the same text whether the state is a string or an enum.
            let now = vm.state.to_string();
            if now == state {
                return vm;
            }
            assert!(
                Instant::now() < deadline,
                "vm {id} never became {state}: {vm:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Processes whose command line names the VM's work directory: its VMM.
    pub fn processes_of(&self, vm: &str) -> Vec<u32> {
        let needle = format!("{}/", self.work_dir(vm).display());
        hatch::vmm::process::pids_mentioning(&needle)
            .into_iter()
            .filter(|p| hatch::vmm::process::is_alive(*p))
            .collect()
    }
}

/// One chunk of a snapshot's memory or disk: where its bytes sit in the
/// part, how it is stored, and its file in the local store.
pub struct PartChunk {
    pub offset: u64,
    pub chunk: StoredChunk,
    pub path: PathBuf,
}

/// The chunks the store cuts `bytes` into (FastCDC with the store's default
/// sizes, as src/snapshot/chunks.rs cuts a stream): (offset, length, BLAKE3
/// hash) each, in order. Known content gives known chunk keys before any upload.
pub fn cut(bytes: &[u8]) -> Vec<(u64, usize, ChunkHash)> {
    use fastcdc::v2020::{FastCDC, Normalization};
    let s = ChunkSizes::DEFAULT;
    FastCDC::with_level(
        bytes,
        s.min as usize,
        s.avg as usize,
        s.max as usize,
        Normalization::Level1,
    )
    .map(|c| {
        let raw = &bytes[c.offset..c.offset + c.length];
        (c.offset as u64, c.length, ChunkHash::of(raw))
    })
    .collect()
}

/// The chunks the store splits a file's `bytes` into (`FILE_CHUNK` each at
/// fixed offsets, as src/snapshot/chunks.rs splits a file), as `cut` gives them.
pub fn split_fixed(bytes: &[u8]) -> Vec<(u64, usize, ChunkHash)> {
    let size = hatch::snapshot::FILE_CHUNK as usize;
    bytes
        .chunks(size)
        .enumerate()
        .map(|(i, raw)| ((i * size) as u64, raw.len(), ChunkHash::of(raw)))
        .collect()
}

/// What a crashed daemon leaves: its files and its (fake) VMMs.
pub struct Crashed {
    pub fake: Arc<FakeVmm>,
    fakes: Vec<Arc<FakeVmm>>,
    pub owner: Owner,
    vars: HashMap<String, String>,
    tmp: Arc<TempDir>,
}

impl Crashed {
    /// A new Manager on the same files and the same fake, as a restarted
    /// daemon would be (recovery is the caller's to run).
    pub async fn restart(&self) -> Host {
        let (manager, config) = start(&self.vars, &self.fakes).await;
        Host {
            manager,
            fake: Arc::clone(&self.fake),
            fakes: self.fakes.clone(),
            owner: self.owner.clone(),
            config,
            vars: self.vars.clone(),
            tmp: Arc::clone(&self.tmp),
        }
    }
}

/// The one place a Manager is made: the FakeVmms are its backends, the first the default.
async fn start(vars: &HashMap<String, String>, fakes: &[Arc<FakeVmm>]) -> (Arc<Manager>, Config) {
    let config = Config::from_lookup(|k| vars.get(k).cloned()).unwrap();
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let store = Store::open(&config.db_path()).await.unwrap();
    let objects = Objects::from_config(&config).unwrap();
    let mut backends = Backends::new(fakes[0].clone());
    for fake in &fakes[1..] {
        backends = backends.with(fake.clone());
    }
    let manager = Manager::new(store, objects, backends, config.clone());
    manager.seed_default_image().await.unwrap();
    (manager, config)
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}
