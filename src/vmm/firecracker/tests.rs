//! The Firecracker backend against the real jailer and firecracker
//! (HATCH_TEST_FIRECRACKER_DIR; skipped without it). Under this project's
//! software KVM a Linux guest does not get far, so the guest here is a tiny
//! ELF of our own that writes a line to the serial port and halts: every
//! VMM-level behaviour (jail, API calls, snapshots) is real.

use super::*;
use crate::net::isolate::testing::{block_on_in, Netns, TestDir};
use crate::vmm::cgroup::Cgroups;
use crate::vmm::confine::UidPool;
use crate::vmm::Nic;
use std::os::unix::fs::MetadataExt;

/// What the tiny guest writes to its serial port.
const SERIAL_LINE: &str = "hatch-fc-serial-ok\n";

/// The binaries under test, or `None` (with a printed reason) to skip.
fn binaries() -> Option<Binaries> {
    let Some(dir) = std::env::var_os("HATCH_TEST_FIRECRACKER_DIR") else {
        println!("skipped: HATCH_TEST_FIRECRACKER_DIR is not set (a directory with firecracker and jailer)");
        return None;
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: the jailer needs root");
        return None;
    }
    let dir = PathBuf::from(dir);
    let b = Binaries {
        firecracker: dir.join("firecracker"),
        jailer: dir.join("jailer"),
    };
    assert!(b.firecracker.is_file() && b.jailer.is_file(), "{b:?}");
    Some(b)
}

/// A 64-bit ELF "kernel" loaded at 1 MiB: Firecracker enters it in long
/// mode; it writes SERIAL_LINE to COM1 (port 0x3f8) and halts for ever.
pub fn tiny_kernel() -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in SERIAL_LINE.bytes() {
        code.extend([0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    code.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp back to hlt
    let load: u64 = 0x10_0000;
    let mut elf = vec![0u8; 0x1000];
    elf[..16].copy_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    let put16 = |e: &mut Vec<u8>, o: usize, v: u16| e[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |e: &mut Vec<u8>, o: usize, v: u32| e[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |e: &mut Vec<u8>, o: usize, v: u64| e[o..o + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut elf, 16, 2); // ET_EXEC
    put16(&mut elf, 18, 0x3e); // x86-64
    put32(&mut elf, 20, 1);
    put64(&mut elf, 24, load); // entry
    put64(&mut elf, 32, 64); // program headers right after this header
    put16(&mut elf, 52, 64);
    put16(&mut elf, 54, 56);
    put16(&mut elf, 56, 1);
    let ph = 64;
    put32(&mut elf, ph, 1); // PT_LOAD
    put32(&mut elf, ph + 4, 5); // R X
    put64(&mut elf, ph + 8, 0x1000); // file offset
    put64(&mut elf, ph + 16, load);
    put64(&mut elf, ph + 24, load);
    put64(&mut elf, ph + 32, code.len() as u64);
    put64(&mut elf, ph + 40, code.len() as u64);
    put64(&mut elf, ph + 48, 0x1000);
    elf.extend(code);
    elf
}

fn status_field(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// Every file (not directory) under `root`, relative to it.
fn files_under(root: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

struct Setup {
    _dir: TestDir,
    data: PathBuf,
    spec: VmSpec,
    conf: Arc<Confinement>,
    fc: Firecracker,
}

/// A VM of `mem_mib` in `dir`: its image (the tiny kernel), a raw disk and a
/// seed, on TAP `tap` in network namespace `netns`; one uid in the pool.
fn setup(bins: Binaries, name: &str, netns: &str, tap: &str, mem_mib: u32) -> Setup {
    let dir = TestDir::new(name);
    let data = dir.0.join("data");
    let work = data.join("vms").join("vm_fctest");
    let image = data.join("images").join("img_fctest");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&image).unwrap();
    let kernel = image.join("vmlinux");
    std::fs::write(&kernel, tiny_kernel()).unwrap();
    let disk = work.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let seed = work.join("seed.iso");
    std::fs::write(&seed, vec![0u8; 64 << 10]).unwrap();
    let tag = format!("fct{}", std::process::id());
    let uid_base = 1_600_000_000 + std::process::id() % 100_000 * 10;
    let conf = Arc::new(Confinement {
        uids: UidPool::new(uid_base, 1),
        cgroups: Some(Cgroups::setup(&tag).expect("cgroups")),
        hidden: vec![],
        mem_overhead_mib: 64,
    });
    let fc = Firecracker::new(bins, &data)
        .unwrap()
        .confined(Arc::clone(&conf));
    let spec = VmSpec {
        vm_id: "vm_fctest".into(),
        work_dir: work,
        kernel,
        initrd: None,
        disk,
        boot_args: fc.boot_args("console=ttyS0"),
        vcpu_count: 1,
        mem_mib,
        nic: Some(Nic {
            tap: tap.into(),
            mac: "02:fc:00:00:00:07".into(),
        }),
        seed: Some(seed),
        netns: Some(netns.into()),
    };
    Setup {
        _dir: dir,
        data,
        spec,
        conf,
        fc,
    }
}

/// Whatever a test leaves (it failed half-way), goes: Firecracker's command
/// line names no test directory, so `TestDir` alone would not find it.
impl Drop for Setup {
    fn drop(&mut self) {
        jail::remove_all(&self.fc.jails);
        if let Some(c) = &self.conf.cgroups {
            c.remove_all();
            c.remove_bases();
        }
    }
}

async fn state_of(fc: &Firecracker, vm: &str) -> InstanceState {
    fc.api(vm).unwrap().state().await.unwrap()
}

/// Nothing of the VM is left: no process of its jail, no jail directory,
/// no cgroup, and its uid is free again (the pool holds one).
fn assert_nothing_left(s: &Setup, pid: u32) {
    let id = s.fc.jail_id(&s.spec.vm_id).unwrap();
    assert!(!crate::vmm::process::is_alive(pid), "pid {pid} still runs");
    assert!(jail::pids_of(&id).is_empty(), "{:?}", jail::pids_of(&id));
    assert!(!s.fc.jails.jail_dir(&id).exists(), "the jail is left");
    for d in s.conf.cgroups.as_ref().unwrap().dirs_of(&s.spec.vm_id) {
        assert!(!d.exists(), "{} is left", d.display());
    }
    let other = s.conf.uids.take("vm_other");
    assert!(other.is_some(), "the VM's uid was not given back");
    s.conf.uids.give_back("vm_other");
}

#[test]
fn a_jailed_firecracker_boots_pauses_snapshots_restores_and_leaves_nothing() {
    let Some(bins) = binaries() else { return };
    let mem_mib: u32 = std::env::var("HATCH_TEST_FC_MEM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let caller = Netns::new("fc-caller");
    let vm_ns = Netns::new("fc-vm");
    vm_ns.ip(&["tuntap", "add", "dev", "htfc", "mode", "tap"]);
    vm_ns.ip(&["link", "set", "htfc", "up"]);
    let s = setup(bins, "fc-backend", &vm_ns.0, "htfc", mem_mib);
    let (fc, spec) = (&s.fc, &s.spec);
    let id = fc.jail_id(&spec.vm_id).unwrap();
    let root = fc.jails.root(&id);
    block_on_in(&caller.0, || async {
        let t = Instant::now();
        let mut p = fc.boot(spec).await.expect("boot");
        println!(
            "timing: boot (jail, configure, InstanceStart) {:?}",
            t.elapsed()
        );
        assert_eq!(state_of(fc, &spec.vm_id).await, InstanceState::Running);
        assert_eq!(spec.work_dir.join("vmm.pid"), spec.pid_file(),);
        let pid = p.pid;
        // vmm.pid, the jailer's own pid file and the process are one: Firecracker.
        assert_eq!(
            std::fs::read_to_string(spec.pid_file()).unwrap().trim(),
            pid.to_string()
        );
        assert_eq!(
            std::fs::read_to_string(root.join("firecracker.pid"))
                .unwrap()
                .trim(),
            pid.to_string()
        );
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            cmdline.starts_with(format!("/firecracker\0--id\0{id}\0").as_bytes()),
            "{}",
            String::from_utf8_lossy(&cmdline)
        );
        // Its own uid and gid, no groups, no capabilities, no new privileges.
        let uid = std::fs::metadata(&root).unwrap().uid();
        assert_eq!(Some(uid), s.conf.uids.take(&spec.vm_id));
        assert_ne!(uid, 0);
        assert_eq!(
            status_field(pid, "Uid"),
            format!("{uid}\t{uid}\t{uid}\t{uid}")
        );
        assert_eq!(
            status_field(pid, "Gid"),
            format!("{uid}\t{uid}\t{uid}\t{uid}")
        );
        assert_eq!(status_field(pid, "Groups"), "");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(status_field(pid, cap), "0000000000000000", "{cap}");
        }
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        // In the VM's cgroup (every hierarchy), with the VM's limits.
        let cgroups = s.conf.cgroups.as_ref().unwrap();
        for d in cgroups.dirs_of(&spec.vm_id) {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|l| l == pid.to_string()),
                "{}: {procs}",
                d.display()
            );
        }
        // In the VM's network namespace, attached to its TAP there.
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        let want = std::fs::metadata(crate::vmm::process::netns_path(&vm_ns.0))
            .unwrap()
            .ino();
        assert_eq!(ns.to_string_lossy(), format!("net:[{want}]"));
        assert!(vm_ns.ip(&["link", "show", "htfc"]).contains("LOWER_UP"));
        // The chroot holds that VM's files only, as hard links to its own.
        let mut allowed: Vec<String> = [
            "api.sock",
            "dev/kvm",
            "dev/net/tun",
            "dev/urandom",
            "dev/userfaultfd",
            "disk.raw",
            "seed",
            "vmlinux",
            "firecracker",
            "firecracker.pid",
            "firecracker.log",
            "metrics.json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        allowed.extend(
            fc.libs
                .iter()
                .map(|l| l.strip_prefix("/").unwrap().display().to_string()),
        );
        for f in files_under(&root) {
            assert!(allowed.contains(&f), "{f} is in the chroot");
        }
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        // The host's libraries are copied in, never linked (make_private).
        for lib in &fc.libs {
            assert_ne!(
                ino(&root.join(lib.strip_prefix("/").unwrap())),
                ino(lib),
                "{}",
                lib.display()
            );
        }
        assert_eq!(ino(&root.join("disk.raw")), ino(&spec.disk));
        assert_eq!(ino(&root.join("seed")), ino(spec.seed.as_ref().unwrap()));
        assert_eq!(ino(&root.join("vmlinux")), ino(&spec.kernel));
        assert_eq!(
            ino(&root.join("metrics.json")),
            ino(&spec.work_dir.join("metrics.json"))
        );
        assert_eq!(
            ino(&root.join("firecracker.log")),
            ino(&log_path(&spec.work_dir))
        );
        // The guest's serial output lands in console.log.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(spec.console_log())
            .unwrap_or_default()
            .contains(SERIAL_LINE)
        {
            assert!(
                Instant::now() < deadline,
                "console.log: {:?}",
                std::fs::read_to_string(spec.console_log())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Metrics: the process's figures and Firecracker's block and net counters.
        let m = fc.metrics(spec, pid).await.expect("metrics");
        assert!(m.rss_bytes > 0 && m.uptime_seconds < 60, "{m:?}");
        assert!(
            m.raw["block"].is_object() && m.raw["net"].is_object(),
            "{}",
            m.raw
        );
        assert!(m.raw["block_rootfs"].is_object(), "{}", m.raw);
        // Each call asks Firecracker for a new line (it flushes by itself
        // only every 60 s), and reads it once.
        let consumed = || {
            let t: metrics::Totals = serde_json::from_slice(
                &std::fs::read(spec.work_dir.join("metrics-total.json")).unwrap(),
            )
            .unwrap();
            t.consumed
        };
        let before = consumed();
        fc.metrics(spec, pid).await.expect("metrics");
        assert!(consumed() > before, "no new metrics line");
        // Pause and resume change what Firecracker reports.
        fc.pause(spec).await.unwrap();
        assert_eq!(state_of(fc, &spec.vm_id).await, InstanceState::Paused);
        fc.resume(spec).await.unwrap();
        assert_eq!(state_of(fc, &spec.vm_id).await, InstanceState::Running);
        // A snapshot of the running guest: paused, two files of sane size, root's.
        let out_dir = spec.work_dir.join("snap");
        std::fs::create_dir(&out_dir).unwrap();
        let files = fc.snapshot_files(&out_dir);
        let t = Instant::now();
        fc.snapshot(spec, &files).await.expect("snapshot");
        println!("timing: pause + snapshot ({mem_mib} MiB) {:?}", t.elapsed());
        assert_eq!(state_of(fc, &spec.vm_id).await, InstanceState::Paused);
        let (sm, mm) = (
            std::fs::symlink_metadata(&files.state).unwrap(),
            std::fs::symlink_metadata(&files.memory).unwrap(),
        );
        assert!(sm.is_file() && mm.is_file());
        assert_eq!(mm.len(), u64::from(mem_mib) << 20);
        assert!(sm.len() > 0 && sm.len() < MAX_STATE_BYTES, "{}", sm.len());
        for m in [&sm, &mm] {
            assert_eq!((m.uid(), m.mode() & 0o777, m.nlink()), (0, 0o600, 1));
        }
        assert!(!root.join("vmstate").exists() && !root.join("memory").exists());
        // Writing the memory file took the VMM CPU time of its own (a boot of
        // this guest may take less than a clock tick).
        let m = fc.metrics(spec, pid).await.expect("metrics");
        assert!(m.cpu_time_micros > 0, "{m:?}");
        // The VMM ends (as the manager ends it), and is released.
        let _ = p.child.start_kill();
        let _ = p.child.wait().await;
        fc.release(&spec.vm_id).await;
        assert_nothing_left(&s, pid);
        // A restore in a fresh jail comes back paused, then resumes; on a
        // TAP of its own, as a fork gets (network_overrides).
        vm_ns.ip(&["tuntap", "add", "dev", "htfd", "mode", "tap"]);
        vm_ns.ip(&["link", "set", "htfd", "up"]);
        let mut moved = spec.clone();
        moved.nic.as_mut().unwrap().tap = "htfd".into();
        let console_before = std::fs::read(spec.console_log()).unwrap();
        let t = Instant::now();
        let mut r = fc.restore(&moved, &files).await.expect("restore");
        let loaded = t.elapsed();
        assert_eq!(state_of(fc, &spec.vm_id).await, InstanceState::Paused);
        fc.resume(spec).await.unwrap();
        println!(
            "timing: load + resume ({mem_mib} MiB) {:?} (load {loaded:?})",
            t.elapsed()
        );
        assert_eq!(state_of(fc, &spec.vm_id).await, InstanceState::Running);
        assert_ne!(r.pid, pid);
        assert_eq!(
            std::fs::read_to_string(spec.pid_file()).unwrap().trim(),
            r.pid.to_string()
        );
        assert!(vm_ns.ip(&["link", "show", "htfd"]).contains("LOWER_UP"));
        assert!(!vm_ns.ip(&["link", "show", "htfc"]).contains("LOWER_UP"));
        // The console log was appended to, never overwritten.
        assert!(std::fs::read(spec.console_log())
            .unwrap()
            .starts_with(&console_before));
        // Stop: the graceful request is accepted; this guest ignores it, so
        // the VMM is still there to be killed (the manager does that after
        // HATCH_STOP_TIMEOUT).
        fc.request_shutdown(spec).await.expect("SendCtrlAltDel");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(crate::vmm::process::is_alive(r.pid));
        assert!(crate::vmm::process::kill_and_wait(
            r.pid,
            Duration::from_secs(10)
        ));
        let _ = r.child.wait().await;
        fc.release(&spec.vm_id).await;
        assert_nothing_left(&s, r.pid);
        fc.shutdown().await;
    });
    s.conf.cgroups.as_ref().unwrap().remove_bases();
    assert!(
        !s.data.join("jail").exists(),
        "shutdown leaves the empty jail base"
    );
}

/// A restore that Firecracker refuses (a state file that is not one) fails
/// with Firecracker's own reason and leaves nothing behind.
#[test]
fn a_failed_restore_leaves_no_process_jail_cgroup_or_uid() {
    let Some(bins) = binaries() else { return };
    let vm_ns = Netns::new("fc-bad");
    vm_ns.ip(&["tuntap", "add", "dev", "htfb", "mode", "tap"]);
    let s = setup(bins, "fc-bad-restore", &vm_ns.0, "htfb", 64);
    let bad = s.spec.work_dir.join("bad");
    std::fs::create_dir(&bad).unwrap();
    let files = s.fc.snapshot_files(&bad);
    std::fs::write(&files.state, b"not a snapshot").unwrap();
    std::fs::File::create(&files.memory)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt
        .block_on(s.fc.restore(&s.spec, &files))
        .err()
        .expect("a bad snapshot loads");
    let e = e.to_string();
    assert!(
        e.contains("loading the snapshot") && e.contains("/snapshot/load"),
        "{e}"
    );
    let pid: u32 = std::fs::read_to_string(s.spec.pid_file())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_nothing_left(&s, pid);
    s.conf.cgroups.as_ref().unwrap().remove_bases();
}

/// HATCH_VMM_CONFINE=off: still the jailer's chroot (of hard links), but
/// Firecracker runs as root and in the daemon's own cgroup.
#[test]
fn unconfined_firecracker_is_still_jailed_but_runs_as_root() {
    let Some(bins) = binaries() else { return };
    let vm_ns = Netns::new("fc-open");
    vm_ns.ip(&["tuntap", "add", "dev", "htfo", "mode", "tap"]);
    let s = setup(bins.clone(), "fc-unconfined", &vm_ns.0, "htfo", 64);
    let fc = Firecracker::new(bins, &s.data).unwrap();
    let spec = &s.spec;
    let root = fc.root(&spec.vm_id).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut p = fc.boot(spec).await.expect("boot");
        assert_eq!(state_of(&fc, &spec.vm_id).await, InstanceState::Running);
        assert_eq!(status_field(p.pid, "Uid"), "0\t0\t0\t0");
        assert_eq!(std::fs::metadata(&root).unwrap().uid(), 0);
        assert_eq!(
            std::fs::metadata(root.join("disk.raw")).unwrap().ino(),
            std::fs::metadata(&spec.disk).unwrap().ino()
        );
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let its = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid)).unwrap();
        assert_eq!(its, own);
        let _ = p.child.start_kill();
        let _ = p.child.wait().await;
        fc.release(&spec.vm_id).await;
        assert!(!root.exists());
    });
}

/// A daemon killed with -9 leaves its Firecracker running in its jail and
/// cgroup: the next daemon's `recover` removes all three.
#[test]
fn recover_removes_the_vmms_jails_and_cgroups_an_earlier_daemon_left() {
    let Some(bins) = binaries() else { return };
    let vm_ns = Netns::new("fc-left");
    vm_ns.ip(&["tuntap", "add", "dev", "htfl", "mode", "tap"]);
    let s = setup(bins.clone(), "fc-recover", &vm_ns.0, "htfl", 64);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let p = rt.block_on(s.fc.boot(&s.spec)).expect("boot");
    // The earlier daemon is gone without a word: nothing waits for the VMM.
    let pid = p.pid;
    std::mem::forget(p);
    assert!(crate::vmm::process::is_alive(pid));
    let next = Firecracker::new(bins, &s.data)
        .unwrap()
        .confined(Arc::clone(&s.conf));
    rt.block_on(next.recover());
    // Reap it (this test process is its parent), then nothing is left.
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid status pointer.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    s.conf.uids.give_back(&s.spec.vm_id);
    assert_nothing_left(&s, pid);
}
