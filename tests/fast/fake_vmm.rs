//! FakeVmm: a fake standing in for a hypervisor, so the manager's flows run without QEMU.
//!
//! It is a fake, not a VMM: no guest runs. What it does is real enough for
//! the manager's code to be exercised as it is in production:
//!
//! - `boot` starts a real, harmless child (`sleep 3600`) in its own process
//!   group, whose command line names the VM's work directory (its argv[0] is
//!   `<work_dir>/fake-vmm`), so supervision, `kill_all_under` and start-up
//!   recovery find and end it as they would a real VMM; it appends to
//!   `console.log` and writes `vmm.pid` as a backend does.
//! - `pause`/`resume` record whether the "guest" runs.
//! - `snapshot` writes a state file and streams `MEMORY_BYTES` of memory into
//!   the memory FIFO, bytes that are a pure function of the VM id and a
//!   generation (one per save), so a restore can tell exactly what it got.
//!   The second half of every 4 KiB page is zeros: like a real guest's
//!   memory it compresses, yet no two chunks of it are alike.
//! - `restore` starts the child first (a real VMM exists while it loads), then
//!   reads the memory stream to its end and compares it with what the saved
//!   generation wrote. Like a real VMM it does not refuse memory that differs
//!   (a flipped byte in a page is not something QEMU notices): it records it,
//!   so a test can see whether the manager resumed a guest from bad memory.
//! - Per-VM fault injection, each fault used once: a boot that fails, a child
//!   that exits at once, a VMM that dies or hangs part way through a
//!   snapshot, a restore that is refused or never finishes loading, a resume
//!   that is refused.
//! - Two ways memory moves, as a backend declares: `FakeVmm::new()` streams
//!   it through the FIFO (as QEMU does); `FakeVmm::mapped_file()` stands in
//!   for a backend that writes a regular memory file whole and maps it on
//!   restore (as Firecracker does, which cannot run in CI). In that mode the
//!   fake refuses a FIFO or a missing file where it expects the memory file,
//!   and reads the whole file at load as a VMM mapping it would.
//!
//! Everything about the fake lives in this file; the manager sees only the
//! `hatch::vmm::Vmm` trait.

use async_trait::async_trait;
use hatch::vmm::{
    self, Capabilities, DiskFormat, KernelFormat, MemoryTransport, SnapshotFiles, VmProcess,
    VmSpec, Vmm, VmmError,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const BOTH_KERNELS: &[KernelFormat] = &[KernelFormat::BzImage, KernelFormat::Elf];

/// The memory a snapshot holds: several MiB, more than one 8 MiB upload part.
pub const MEMORY_BYTES: u64 = 20 << 20;
const CHUNK: usize = 1 << 20;

/// Whose memory, saved when: what a snapshot's memory stream is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Memory {
    pub vm: String,
    pub generation: u64,
}

/// What the fake was asked to do, per VM, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Booted {
        pid: u32,
    },
    ShutdownRequested,
    Paused,
    Resumed,
    /// A whole memory image went into the FIFO.
    Saved(Memory),
    /// The fake VMM died (injected) after writing this many memory bytes.
    DiedSaving {
        bytes: u64,
    },
    /// A restore read the memory stream to its end; `intact` says whether it
    /// was byte for byte what `from` was when saved.
    Loaded {
        from: Memory,
        intact: bool,
    },
    RestoreRefused,
    /// `resume` failed (injected): the "guest" stays paused.
    ResumeRefused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootFault {
    /// `boot` returns an error (the VMM did not come up).
    Error,
    /// `boot` succeeds but the child exits at once (status 1): the VMM died
    /// right after the daemon saw it start.
    ChildExits,
}

#[derive(Debug, Clone)]
pub enum SnapshotFault {
    /// The VMM is killed after writing this many bytes of memory.
    DieAfter(u64),
    /// The VMM writes this many bytes, tells the test through the sender,
    /// and never finishes (a daemon crash is simulated meanwhile).
    HangAfter(u64, Arc<tokio::sync::Notify>),
}

#[derive(Debug, Clone)]
pub enum RestoreFault {
    /// `restore` fails at once (the VMM would not load the snapshot).
    Refuse,
    /// The VMM starts, tells the test, and never reads its memory (a daemon
    /// crash is simulated meanwhile).
    HangLoading(Arc<tokio::sync::Notify>),
}

#[derive(Default)]
struct VmRecord {
    pid: Option<u32>,
    paused: bool,
    generation: u64,
    events: Vec<Event>,
}

#[derive(Default)]
struct Faults {
    next_boot: Option<BootFault>,
    boot: HashMap<String, BootFault>,
    snapshot: HashMap<String, SnapshotFault>,
    restore: HashMap<String, RestoreFault>,
    resume: std::collections::HashSet<String>,
}

/// A fake `Vmm` (see the module doc). Clone the `Arc` to observe it from a test.
pub struct FakeVmm {
    name: &'static str,
    memory: MemoryTransport,
    kernels: &'static [KernelFormat],
    disk_format: DiskFormat,
    vms: Mutex<HashMap<String, VmRecord>>,
    faults: Mutex<Faults>,
}

fn control(msg: impl Into<String>) -> VmmError {
    VmmError::Control(msg.into())
}

impl FakeVmm {
    /// The fake named `fake`, its memory streamed through a FIFO.
    pub fn new() -> Arc<FakeVmm> {
        FakeVmm::named("fake", MemoryTransport::Stream, BOTH_KERNELS)
    }

    /// The fake named `fake-mapped`, its memory a regular file written whole
    /// and read back whole (a fake standing in for a backend that maps it).
    pub fn mapped_file() -> Arc<FakeVmm> {
        FakeVmm::named("fake-mapped", MemoryTransport::MappedFile, BOTH_KERNELS)
    }

    /// A fake registered as `name` (a name the API accepts, where a test
    /// needs one), moving memory as `memory` says, booting only `kernels`,
    /// its disks raw.
    pub fn named(
        name: &'static str,
        memory: MemoryTransport,
        kernels: &'static [KernelFormat],
    ) -> Arc<FakeVmm> {
        FakeVmm::with_disks(name, memory, kernels, DiskFormat::Raw)
    }

    /// `named`, its disks in `disk_format` (a qcow2 overlay is made by the
    /// same disk code as a real backend's, with `qemu-img`).
    pub fn with_disks(
        name: &'static str,
        memory: MemoryTransport,
        kernels: &'static [KernelFormat],
        disk_format: DiskFormat,
    ) -> Arc<FakeVmm> {
        Arc::new(FakeVmm {
            name,
            memory,
            kernels,
            disk_format,
            vms: Default::default(),
            faults: Default::default(),
        })
    }

    // ---- fault injection (each used once) ----

    /// The next boot of any VM (for `create`, whose VM id is not known yet).
    pub fn fail_next_boot(&self, fault: BootFault) {
        self.faults.lock().unwrap().next_boot = Some(fault);
    }

    pub fn fail_boot(&self, vm: &str, fault: BootFault) {
        self.faults.lock().unwrap().boot.insert(vm.into(), fault);
    }

    pub fn fail_snapshot(&self, vm: &str, fault: SnapshotFault) {
        self.faults
            .lock()
            .unwrap()
            .snapshot
            .insert(vm.into(), fault);
    }

    pub fn fail_restore(&self, vm: &str, fault: RestoreFault) {
        self.faults.lock().unwrap().restore.insert(vm.into(), fault);
    }

    /// The VM's next `resume` fails (its VMM keeps running, the guest paused).
    pub fn fail_resume(&self, vm: &str) {
        self.faults.lock().unwrap().resume.insert(vm.into());
    }

    // ---- observation ----

    pub fn events(&self, vm: &str) -> Vec<Event> {
        self.vms
            .lock()
            .unwrap()
            .get(vm)
            .map(|r| r.events.clone())
            .unwrap_or_default()
    }

    /// The pid of the VM's last started child, if any was started.
    pub fn pid(&self, vm: &str) -> Option<u32> {
        self.vms.lock().unwrap().get(vm).and_then(|r| r.pid)
    }

    /// Whether the "guest" is paused (saved or loaded and not resumed).
    pub fn is_paused(&self, vm: &str) -> bool {
        self.vms.lock().unwrap().get(vm).is_some_and(|r| r.paused)
    }

    // ---- internals ----

    fn record(&self, vm: &str, event: Event) {
        let mut vms = self.vms.lock().unwrap();
        vms.entry(vm.to_string()).or_default().events.push(event);
    }

    fn live_pid(&self, spec: &VmSpec) -> vmm::Result<u32> {
        match self.pid(&spec.vm_id) {
            Some(pid) if vmm::process::is_alive(pid) => Ok(pid),
            _ => Err(control(format!(
                "fake VMM of {} is not running",
                spec.vm_id
            ))),
        }
    }

    fn set_paused(&self, vm: &str, paused: bool) {
        let mut vms = self.vms.lock().unwrap();
        vms.entry(vm.to_string()).or_default().paused = paused;
    }

    /// Starts the child a VMM would be: `sleep 3600` (or `false`, which exits
    /// at once) whose argv[0] names the work directory.
    async fn spawn(&self, spec: &VmSpec, exits_at_once: bool) -> vmm::Result<VmProcess> {
        let mut cmd = tokio::process::Command::new(if exits_at_once { "false" } else { "sleep" });
        if !exits_at_once {
            cmd.arg("3600");
        }
        cmd.arg0(spec.work_dir.join("fake-vmm"))
            // As a real backend does: a Ctrl-C aimed at the daemon does not reach it.
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| VmmError::Launch(format!("starting the fake VMM: {e}")))?;
        let pid = child
            .id()
            .ok_or_else(|| VmmError::Launch("the fake VMM exited before it had a pid".into()))?;
        tokio::fs::write(spec.pid_file(), format!("{pid}\n")).await?;
        {
            let mut vms = self.vms.lock().unwrap();
            let r = vms.entry(spec.vm_id.clone()).or_default();
            r.pid = Some(pid);
            r.paused = false;
        }
        Ok(VmProcess { pid, child })
    }

    async fn console(&self, spec: &VmSpec, line: &str) -> vmm::Result<()> {
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.console_log())
            .await?;
        f.write_all(format!("fake-vmm: {line}\n").as_bytes())
            .await?;
        Ok(())
    }
}

/// The memory bytes of `m` at `offset..offset + buf.len()` (offset a multiple
/// of 8): SplitMix64 of the word index, seeded by the VM id and generation,
/// in the first half of each 4 KiB page; zeros in the second.
pub fn memory_at(m: &Memory, offset: u64, buf: &mut [u8]) {
    // FNV-1a of the VM id, mixed with the generation.
    let mut seed: u64 = 0xcbf2_9ce4_8422_2325;
    for b in m.vm.bytes() {
        seed = (seed ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    seed ^= m.generation.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (i, word) in buf.chunks_mut(8).enumerate() {
        if (offset + 8 * i as u64) % 4096 >= 2048 {
            word.fill(0);
            continue;
        }
        let mut z = seed.wrapping_add((offset / 8 + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        word.copy_from_slice(&z.to_le_bytes()[..word.len()]);
    }
}

/// The whole memory `m` (MEMORY_BYTES), for a test to cut into the chunks the store makes of it.
pub fn memory_bytes(m: &Memory) -> Vec<u8> {
    let mut bytes = vec![0u8; MEMORY_BYTES as usize];
    memory_at(m, 0, &mut bytes);
    bytes
}

fn state_text(m: &Memory) -> String {
    format!(
        "fake-vmm state\nvm={}\ngeneration={}\nmemory_bytes={MEMORY_BYTES}\n",
        m.vm, m.generation
    )
}

fn parse_state(text: &str) -> Option<Memory> {
    let mut lines = text.lines();
    if lines.next()? != "fake-vmm state" {
        return None;
    }
    let vm = lines.next()?.strip_prefix("vm=")?.to_string();
    let generation = lines.next()?.strip_prefix("generation=")?.parse().ok()?;
    Some(Memory { vm, generation })
}

#[async_trait]
impl Vmm for FakeVmm {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            snapshot: true,
            graceful_shutdown: true,
            // Raw by default: a copy of the image's rootfs, no disk tool needed.
            disk_format: self.disk_format,
            kernels: self.kernels,
            memory: self.memory,
            shared_ram: false,
        }
    }

    async fn boot(&self, spec: &VmSpec) -> vmm::Result<VmProcess> {
        let fault = {
            let mut f = self.faults.lock().unwrap();
            f.boot.remove(&spec.vm_id).or(f.next_boot.take())
        };
        self.console(
            spec,
            &format!(
                "booting {} ({} vCPUs, {} MiB)",
                spec.vm_id, spec.vcpu_count, spec.mem_mib
            ),
        )
        .await?;
        if fault == Some(BootFault::Error) {
            self.console(spec, "the guest did not come up (injected fault)")
                .await?;
            return Err(VmmError::Launch(
                "fake VMM: the guest did not come up (injected fault)".into(),
            ));
        }
        let p = self
            .spawn(spec, fault == Some(BootFault::ChildExits))
            .await?;
        self.record(&spec.vm_id, Event::Booted { pid: p.pid });
        self.console(spec, "guest running").await?;
        Ok(p)
    }

    async fn request_shutdown(&self, spec: &VmSpec) -> vmm::Result<()> {
        let pid = self.live_pid(spec)?;
        self.record(&spec.vm_id, Event::ShutdownRequested);
        // The "guest" powers off at once.
        // SAFETY: kill(2) with a pid and a signal number has no memory-safety preconditions.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        Ok(())
    }

    async fn pause(&self, spec: &VmSpec) -> vmm::Result<()> {
        self.live_pid(spec)?;
        self.set_paused(&spec.vm_id, true);
        self.record(&spec.vm_id, Event::Paused);
        Ok(())
    }

    async fn resume(&self, spec: &VmSpec) -> vmm::Result<()> {
        self.live_pid(spec)?;
        if self.faults.lock().unwrap().resume.remove(&spec.vm_id) {
            self.record(&spec.vm_id, Event::ResumeRefused);
            return Err(control("fake VMM refused to resume (injected fault)"));
        }
        self.set_paused(&spec.vm_id, false);
        self.record(&spec.vm_id, Event::Resumed);
        Ok(())
    }

    async fn snapshot(&self, spec: &VmSpec, out: &SnapshotFiles) -> vmm::Result<()> {
        let pid = self.live_pid(spec)?;
        // Like QEMU's `stop` before `migrate`: saving pauses the guest.
        self.set_paused(&spec.vm_id, true);
        self.record(&spec.vm_id, Event::Paused);
        let memory = {
            let mut vms = self.vms.lock().unwrap();
            let r = vms.entry(spec.vm_id.clone()).or_default();
            r.generation += 1;
            Memory {
                vm: spec.vm_id.clone(),
                generation: r.generation,
            }
        };
        let fault = self.faults.lock().unwrap().snapshot.remove(&spec.vm_id);
        tokio::fs::write(&out.state, state_text(&memory)).await?;
        let stop_at = match &fault {
            Some(SnapshotFault::DieAfter(n)) | Some(SnapshotFault::HangAfter(n, _)) => *n,
            None => MEMORY_BYTES,
        };
        let mut fifo = match self.memory {
            // Opened for writing only: the manager has the reading end open.
            MemoryTransport::Stream => {
                tokio::fs::OpenOptions::new()
                    .write(true)
                    .open(&out.memory)
                    .await?
            }
            // A new regular file: the manager must have left nothing (no FIFO) there.
            _ => tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&out.memory)
                .await
                .map_err(|e| control(format!("fake VMM: creating the memory file: {e}")))?,
        };
        let mut buf = vec![0u8; CHUNK];
        let mut written = 0u64;
        while written < stop_at {
            let n = (stop_at - written).min(CHUNK as u64) as usize;
            memory_at(&memory, written, &mut buf[..n]);
            fifo.write_all(&buf[..n]).await?;
            written += n as u64;
        }
        fifo.flush().await?;
        match fault {
            None => {
                drop(fifo);
                self.record(&spec.vm_id, Event::Saved(memory));
                Ok(())
            }
            Some(SnapshotFault::DieAfter(_)) => {
                vmm::process::kill_and_wait(pid, std::time::Duration::from_secs(10));
                self.record(&spec.vm_id, Event::DiedSaving { bytes: written });
                Err(control("fake VMM died while saving (injected fault)"))
            }
            Some(SnapshotFault::HangAfter(_, reached)) => {
                reached.notify_one();
                std::future::pending().await
            }
        }
    }

    async fn restore(&self, spec: &VmSpec, from: &SnapshotFiles) -> vmm::Result<VmProcess> {
        let fault = self.faults.lock().unwrap().restore.remove(&spec.vm_id);
        if let Some(RestoreFault::Refuse) = fault {
            self.record(&spec.vm_id, Event::RestoreRefused);
            return Err(VmmError::Launch(
                "fake VMM refused to load the snapshot (injected fault)".into(),
            ));
        }
        let saved = parse_state(&tokio::fs::read_to_string(&from.state).await?)
            .ok_or_else(|| control("fake VMM: the device state file is not one it wrote"))?;
        // The process exists while it loads, as QEMU's `-incoming` does.
        let mut p = self.spawn(spec, false).await?;
        self.set_paused(&spec.vm_id, true);
        if let Some(RestoreFault::HangLoading(started)) = fault {
            started.notify_one();
            std::future::pending::<()>().await;
        }
        let loaded = match self.memory {
            MemoryTransport::Stream => read_and_compare(&from.memory, &saved).await,
            // Mapped: the whole file must be there, a regular file, before the VMM loads.
            _ => match tokio::fs::symlink_metadata(&from.memory).await {
                Ok(m) if m.file_type().is_file() => read_and_compare(&from.memory, &saved).await,
                Ok(_) => Err(std::io::Error::other(
                    "fake VMM: the memory to map is not a regular file",
                )),
                Err(e) => Err(e),
            },
        };
        let intact = match loaded {
            Ok(intact) => intact,
            Err(e) => {
                let _ = p.child.start_kill();
                let _ = p.child.wait().await;
                return Err(e.into());
            }
        };
        {
            let mut vms = self.vms.lock().unwrap();
            let r = vms.entry(spec.vm_id.clone()).or_default();
            // Later saves of this VM must differ from what it loaded.
            r.generation = r.generation.max(saved.generation);
        }
        self.record(
            &spec.vm_id,
            Event::Loaded {
                from: saved.clone(),
                intact,
            },
        );
        self.console(
            spec,
            &format!(
                "loaded memory of {} generation {} ({})",
                saved.vm,
                saved.generation,
                if intact {
                    "intact"
                } else {
                    "NOT what was saved"
                }
            ),
        )
        .await?;
        Ok(p)
    }
}

/// Reads `path` to its end; true when it is exactly the memory `m` saved.
async fn read_and_compare(path: &Path, m: &Memory) -> std::io::Result<bool> {
    let mut src = tokio::fs::File::open(path).await?;
    let mut got = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let mut same = true;
    loop {
        let mut filled = 0;
        while filled < CHUNK {
            match src.read(&mut got[filled..]).await? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            break;
        }
        if offset + filled as u64 <= MEMORY_BYTES {
            memory_at(m, offset, &mut want[..filled]);
            same &= got[..filled] == want[..filled];
        } else {
            same = false;
        }
        offset += filled as u64;
    }
    Ok(same && offset == MEMORY_BYTES)
}
