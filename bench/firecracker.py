#!/usr/bin/env python3
"""bench/firecracker: hatch's Firecracker backend against the same Firecracker driven by hand.

Run through `bench/firecracker` (it builds, makes the network namespace and
the temp dir, and passes them in HATCH_BENCH_*); this script runs inside that
namespace and talks to the daemon on 127.0.0.1. Standard library only.

Both sides use the same `firecracker` and `jailer` binaries (--firecracker-dir,
default $HATCH_TEST_FIRECRACKER_DIR), the same ELF kernel (the image's `vmlinux`,
or one this script extracts from its bzImage into the temp dir), initrd and
root filesystem, 1 vCPU, a NIC on a TAP in a bridge, a raw root disk and a
read-only second drive. For each guest size (default 128 and 1024 MiB), each
of --runs runs makes a VM, snapshots it, restores it and deletes it, hatch and
raw interleaved, alternating which goes first:

  hatch (through its API):
    create:   `POST /vms {"hypervisor": "firecracker", ...}` until the 201
              (hatch answers once Firecracker reports the instance running)
    snapshot: `POST /vms/{id}/snapshot` until the 201: pause, Full snapshot,
              the files stored in the object store with checksums, VMM ended
    restore:  `POST /vms/{id}/restore` until the 200: memory, state and disk fetched
              from the store and verified, a new jail, `snapshot/load` with the
              memory file mapped, resume
  raw (curl over the API socket, as a person would do it):
    create:   sparse copy of the root filesystem, a TAP in the bridge (owned by
              the VM's uid), a cgroup with hatch's limits, the chroot with hard
              links (kernel, initrd, disks, Firecracker's shared libraries),
              the jailer (uid/gid, chroot, fsize limit) exec'ing firecracker,
              the socket, PUT boot-source, machine-config, drives x2,
              network-interfaces, PUT actions InstanceStart, GET / `Running`
    snapshot: PATCH /vm Paused + PUT snapshot/create Full (then, reported
              apart: SIGKILL, the files moved out, the jail removed)
    restore:  a fresh jail with hard links of the state and memory files,
              the jailer, the socket, PUT snapshot/load (File backend,
              resume_vm false, network_overrides) + PATCH /vm Resumed

While hatch works, its data dir is polled every 2 ms (work dir, jail, pid
file, capture/restore dirs, objects in the store), so each step gets a time;
the daemon's own log lines are timed too. That is how hatch's restore is split
into the fetch + verify of the files from the store (before the new jail
appears), which grows with guest RAM, and the jail + load + resume after it.

Under this machine's software KVM a Firecracker guest does not get far into
boot: every figure is VMM-level (API calls, jail, snapshot files, load), not
a guest's boot or a guest running after the restore.

--vmm-confine on (default) runs every Firecracker under a uid of its own and
in a cgroup with hatch's limits on both sides; off starts the daemon with
HATCH_VMM_CONFINE=off (Firecracker still jailed, as root, without a cgroup)
and runs the raw side the same way.

Without --raw-only the script first checks that the daemon has a firecracker
backend (a warm-up VM made with `"hypervisor": "firecracker"` must run a
firecracker process) and stops with an error saying so (exit 1) when it has
not. --raw-only measures the raw side alone, with no daemon.

Output: plain tables on stdout; with --markdown the `## bench/firecracker`
section for docs/BENCHMARKS.md instead, also written there unless --no-docs
(a --raw-only run only prints).
"""

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    DOCS, BenchError, CpuBusy, Daemon, add_heading, add_table, cpu_model, git_state, kill_leftovers,
    kill_namespace_leftovers, log, ms, one_request, pid_alive, proc_cmdline, run_guarded,
    write_docs,
)
from snapshot import (  # noqa: E402  (the same helpers, one copy)
    Watcher, fmt_ms, fmt_s, fsync_path, log_events, log_size, med, mib, settle, verdict,
)

MiB = 1 << 20
POLL_S = 0.002
OP_TIMEOUT_S = 900.0
SOCKET_TIMEOUT_S = 30.0
TARGET = 1.1
DOC_SECTION = "bench/firecracker"
# The raw side's VMs run as uids well away from hatch's pool (HATCH_VMM_UID_BASE, 1_500_000_000).
RAW_UID_BASE = 1_450_000_000
# hatch's cgroup limits for a VMM (src/vmm/cgroup.rs Limits::for_vm with the default
# HATCH_VM_MEMORY_OVERHEAD_MIB): the raw side's cgroup gets the same.
CPU_PERIOD_US = 100_000
OVERHEAD_MIB = 256
BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
SEED_BYTES = 1 * MiB


def now():
    return time.monotonic()


# ---------------------------------------------------------------- the kernel


def extract_vmlinux(bzimage, out):
    """The ELF vmlinux inside a bzImage whose payload is LZ4 (the Debian cloud kernel's).

    The setup header gives where the payload is (setup_sects at 0x1f1, payload_offset and
    payload_length at 0x248); the kernel's LZ4 payload is the legacy frame `lz4 -d` reads,
    followed by the 4-byte decompressed size, which the result must match."""
    b = Path(bzimage).read_bytes()
    if len(b) < 0x250 or b[0x202:0x206] != b"HdrS":
        raise BenchError(f"{bzimage} is not a bzImage")
    setup_sects = b[0x1f1] or 4
    off, length = struct.unpack_from("<II", b, 0x248)
    start = (setup_sects + 1) * 512 + off
    payload = b[start:start + length]
    if len(payload) != length or payload[:4] != b"\x02\x21\x4c\x18":
        raise BenchError(f"{bzimage}: the payload is not an LZ4 legacy frame (magic {payload[:4].hex()})")
    (size,) = struct.unpack("<I", payload[-4:])
    # lz4 exits 1 on the size trailer after the last block; the output is whole and checked below.
    r = subprocess.run(["lz4", "-dc"], input=payload, capture_output=True, timeout=120)
    elf = r.stdout
    if len(elf) != size or elf[:4] != b"\x7fELF" or elf[4] != 2 or struct.unpack_from("<H", elf, 18)[0] != 62:
        raise BenchError(f"{bzimage}: lz4 gave {len(elf)} bytes (expected {size}), not an x86-64 ELF: "
                         f"{r.stderr[:300]!r}")
    Path(out).write_bytes(elf)


def is_elf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


# ---------------------------------------------------------------- by hand: curl, cgroups, chroots


class FcError(BenchError):
    pass


def curl(sock, method, path, body=None, timeout=OP_TIMEOUT_S):
    """One request with curl over Firecracker's API socket; the decoded body (or None); raises unless 2xx."""
    cmd = ["curl", "-sS", "--unix-socket", str(sock), "-X", method, "-w", "\n%{http_code}",
           "--max-time", str(int(timeout)), f"http://localhost{path}"]
    if body is not None:
        cmd[1:1] = ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)
    text, _, code = r.stdout.rpartition("\n")
    if r.returncode != 0 or not code.isdigit() or not 200 <= int(code) < 300:
        raise FcError(f"curl {method} {path}: exit {r.returncode}, HTTP {code or '?'}: {text[:500]} "
                      f"{r.stderr.strip()[:300]}")
    return json.loads(text) if text.strip() else None


def shared_libraries(binary):
    """Absolute paths of the shared libraries `binary` loads (a gnu build is not static)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30).stdout
    if "not a dynamic executable" in out or "statically linked" in out:
        return []
    return re.findall(r"(/\S+) \(0x[0-9a-f]+\)", out)


def mount_cgroups():
    """`ip netns exec` gave this script a fresh /sys without the cgroup filesystems: mount the
    hierarchies this process is in at /sys/fs/cgroup, as hatch's daemon does in the same case
    (src/vmm/cgroup.rs), so both sides (and the daemon, which then finds them) use the same ones.
    Only ever in a private mount namespace: the host's mounts are never touched."""
    if any(" - cgroup" in line for line in Path("/proc/self/mountinfo").read_text().splitlines()):
        return
    try:
        host_ns = os.readlink("/proc/1/ns/mnt")
    except OSError:  # not readable in some sandboxes: then it is not ours either
        host_ns = None
    if os.readlink("/proc/self/ns/mnt") == host_ns:
        raise BenchError("no cgroup filesystem is mounted, and this is the host's mount namespace")

    def mount(fstype, target, options):
        os.makedirs(target, exist_ok=True)
        r = subprocess.run(["mount", "-t", fstype, "-o", options, fstype, target], capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            raise BenchError(f"mount -t {fstype} -o {options} {target}: {r.stderr.strip()}")

    mount("tmpfs", "/sys/fs/cgroup", "mode=0755,nosuid,nodev,noexec")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, ctrls, _ = line.split(":", 2)
        if hid == "0" and not ctrls:
            mount("cgroup2", "/sys/fs/cgroup/unified", "nosuid,nodev,noexec")
        elif ctrls and not ctrls.startswith("name="):
            mount("cgroup", f"/sys/fs/cgroup/{ctrls}", f"{ctrls},nosuid,nodev,noexec")


class RawCgroup:
    """The raw VM's cgroup v1 directories (cpu, memory, pids) below this process's own cgroups."""

    def __init__(self, parent_name):
        self.bases = {}
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for c in ctrls.split(","):
                own[c] = path
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            fs = post.split()
            if not fs or fs[0] != "cgroup":
                continue
            opts = fs[2].split(",")
            for c in ("cpu", "memory", "pids"):
                if c in opts and c in own and c not in self.bases:
                    self.bases[c] = Path(pre.split()[4] + own[c]) / parent_name
        self.version = "v1 (cpu, memory, pids)" if len(self.bases) == 3 else None

    def create(self, name, mem_mib, vcpus=1):
        """Makes the cgroup with hatch's limits; the cgroup.procs files to join."""
        if self.version is None:
            return []
        d = {c: b / name for c, b in self.bases.items()}
        for p in d.values():
            p.mkdir(parents=True, exist_ok=True)
        (d["cpu"] / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
        (d["cpu"] / "cpu.cfs_quota_us").write_text(str((vcpus + 1) * CPU_PERIOD_US))
        (d["memory"] / "memory.limit_in_bytes").write_text(str((mem_mib + OVERHEAD_MIB) * MiB))
        (d["pids"] / "pids.max").write_text(str(128 + 2 * vcpus))
        return [p / "cgroup.procs" for p in d.values()]

    def remove(self, name):
        for b in self.bases.values():
            try:
                (b / name).rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                log(f"cleanup: rmdir {b / name}: {e}")

    def remove_all(self):
        for b in self.bases.values():
            if b.exists():
                for d in b.iterdir():
                    if d.is_dir():
                        self.remove(d.name)
                try:
                    b.rmdir()
                except OSError as e:
                    log(f"cleanup: rmdir {b}: {e}")


FC_TOOK = re.compile(r"'([^']+)' API request took (\d+) us")


def fc_request_times(log_path):
    """Firecracker's own time for each API request, from its log: {request: [seconds, ...]}."""
    out = {}
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return out
    for name, us in FC_TOOK.findall(text):
        out.setdefault(name, []).append(int(us) / 1e6)
    return out


LAUNCH_PART = re.compile(r"\b(jail_ms|api_ready_ms|api_calls_ms)=([\d.]+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def launch_parts(log_path, offset):
    """The backend's own account of its last launch after byte `offset` of the daemon log (its
    `firecracker launched` debug line): {"jail_ms": ..., "api_ready_ms": ..., "api_calls_ms": ...}."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = ANSI.sub("", f.read().decode(errors="replace"))
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        if "firecracker launched" in line:
            found = {k: float(v) / 1000 for k, v in LAUNCH_PART.findall(line)}
    return found


def ip(*args):
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise BenchError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class RawVm:
    """One Firecracker VM driven by hand: its files in `dir`, its jail, its TAP and cgroup."""

    def __init__(self, bench, mem, run):
        self.b = bench
        self.mem = mem
        self.name = f"fcb-m{mem}-r{run}"
        self.dir = bench.tmp / "raw" / self.name
        self.tap = f"fcb{mem}r{run}"[:15]
        self.mac = "06:00:ac:10:%02x:%02x" % (run % 256, (mem // 128) % 256)
        self.jail = bench.raw_jail_base / "firecracker" / self.name
        self.root = self.jail / "root"
        self.proc = None
        self.has_tap = False
        self.fc_log = {}  # Firecracker's own request times, read from the last jail before it went

    @property
    def sock(self):
        return self.root / "api.sock"

    def alive(self):
        if self.proc is None or self.proc.poll() is not None:
            out = (self.dir / "console.log").read_text(errors="replace")[-1500:] if self.dir.exists() else ""
            raise BenchError(f"raw firecracker {self.name} exited ({self.proc and self.proc.returncode}): {out}")

    def make_jail(self, links):
        """The chroot with only this VM's files (hard links), its log and metrics files."""
        b = self.b
        self.root.mkdir(parents=True)
        # Copies, as hatch makes them (a hard link would share the host's libc inode with the jail).
        for lib in b.libs:
            dst = self.root / lib.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.realpath(lib), dst)
        for name, src in links.items():
            os.link(src, self.root / name)
        for name in ("fc.log", "metrics.json"):
            (self.root / name).touch()
            os.chown(self.root / name, b.uid, b.uid)

    def launch(self, marks, t0):
        """cgroup, then the jailer exec'ing firecracker (the same pid: no --daemonize, no
        --new-pid-ns), stdout/stderr (the serial console) into console.log; waits for the socket."""
        b = self.b
        procs = b.cgroup.create(self.name, self.mem)
        marks["cgroup made"] = now() - t0
        fsize = max(b.disk_bytes, self.mem * MiB) + 64 * MiB
        jailer = [str(b.jailer), "--id", self.name, "--exec-file", str(b.firecracker),
                  "--uid", str(b.uid), "--gid", str(b.uid), "--chroot-base-dir", str(b.raw_jail_base),
                  "--resource-limit", f"fsize={fsize}",
                  "--", "--api-sock", "/api.sock", "--log-path", "/fc.log", "--level", "Info",
                  "--metrics-path", "/metrics.json"]
        # The shell joins the cgroup, then execs the jailer: the VMM is in it from its first instruction.
        join = "".join(f"echo $$ > '{p}' && " for p in procs)
        con = open(self.dir / "console.log", "ab")
        self.proc = subprocess.Popen(["sh", "-c", join + 'exec "$@"', "sh", *jailer], stdin=subprocess.DEVNULL,
                                     stdout=con, stderr=con, process_group=0)
        con.close()
        b.raw_vms[self.name] = self
        marks["jailer spawned"] = now() - t0
        deadline = now() + SOCKET_TIMEOUT_S
        while not self.sock.exists():
            self.alive()
            if now() > deadline:
                raise BenchError(f"raw {self.name}: no API socket after {SOCKET_TIMEOUT_S:.0f}s")
            time.sleep(POLL_S)
        marks["API socket"] = now() - t0

    def create(self):
        """The timed create; returns marks (seconds from the start)."""
        b = self.b
        self.dir.mkdir(parents=True)
        seed = self.dir / "seed.img"
        with open(seed, "wb") as f:  # stands in for hatch's cloud-init seed: a small read-only drive
            f.truncate(SEED_BYTES)
        os.chmod(seed, 0o644)
        marks = {}
        settle()
        t0 = now()
        disk = self.dir / "disk.raw"
        subprocess.run(["cp", "--sparse=always", str(b.rootfs), str(disk)], check=True, timeout=OP_TIMEOUT_S)
        os.chown(disk, b.uid, b.uid)
        marks["disk copied"] = now() - t0
        ip("tuntap", "add", "dev", self.tap, "mode", "tap", "user", str(b.uid), "group", str(b.uid))
        self.has_tap = True
        ip("link", "set", self.tap, "master", b.bridge, "up")
        marks["TAP up"] = now() - t0
        self.make_jail({"vmlinux": b.vmlinux, "initrd.img": b.initrd, "rootfs.raw": disk, "seed.img": seed})
        marks["jail made"] = now() - t0
        self.launch(marks, t0)
        s = self.sock
        curl(s, "PUT", "/boot-source", {"kernel_image_path": "/vmlinux", "initrd_path": "/initrd.img",
                                        "boot_args": BOOT_ARGS})
        curl(s, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": self.mem})
        curl(s, "PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/rootfs.raw",
                                          "is_root_device": True, "is_read_only": False})
        curl(s, "PUT", "/drives/seed", {"drive_id": "seed", "path_on_host": "/seed.img",
                                        "is_root_device": False, "is_read_only": True})
        curl(s, "PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": self.tap,
                                                    "guest_mac": self.mac})
        marks["configured"] = now() - t0
        curl(s, "PUT", "/actions", {"action_type": "InstanceStart"})
        marks["InstanceStart returned"] = now() - t0
        state = curl(s, "GET", "/").get("state")
        if state != "Running":
            raise BenchError(f"raw {self.name}: state {state!r} after InstanceStart")
        marks["response"] = now() - t0
        # The parts hatch's backend logs for a launch, measured the same way here.
        marks["jail_ms"] = marks["jailer spawned"] - marks["TAP up"]
        marks["api_ready_ms"] = marks["API socket"] - marks["jailer spawned"]
        marks["api_calls_ms"] = marks["response"] - marks["API socket"]
        return marks

    def snapshot(self):
        """The timed pause + Full snapshot; then (timed apart) the VMM killed and its jail removed."""
        marks = {}
        settle()
        t0 = now()
        curl(self.sock, "PATCH", "/vm", {"state": "Paused"})
        marks["paused"] = now() - t0
        curl(self.sock, "PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": "/vm.state",
                                                    "mem_file_path": "/vm.mem"})
        marks["response"] = now() - t0
        mem, state = self.root / "vm.mem", self.root / "vm.state"
        marks["mem_size"] = mem.stat().st_size
        marks["mem_alloc"] = mem.stat().st_blocks * 512
        marks["state_size"] = state.stat().st_size
        t1 = now()
        self.kill()
        marks["fc"] = fc_request_times(self.root / "fc.log")
        os.rename(mem, self.dir / "vm.mem")
        os.rename(state, self.dir / "vm.state")
        shutil.rmtree(self.jail)
        self.b.cgroup.remove(self.name)
        marks["ended"] = now() - t1
        # For the durable figure: what fsync of both files costs once they are written.
        t1 = now()
        fsync_path(self.dir / "vm.mem")
        fsync_path(self.dir / "vm.state")
        fsync_path(self.dir)
        marks["fsync"] = now() - t1
        return marks

    def restore(self):
        marks = {}
        settle()
        t0 = now()
        self.make_jail({"rootfs.raw": self.dir / "disk.raw", "seed.img": self.dir / "seed.img",
                        "vm.state": self.dir / "vm.state", "vm.mem": self.dir / "vm.mem"})
        marks["jail made"] = now() - t0
        self.launch(marks, t0)
        t1 = now()
        curl(self.sock, "PUT", "/snapshot/load", {
            "snapshot_path": "/vm.state", "mem_backend": {"backend_type": "File", "backend_path": "/vm.mem"},
            "resume_vm": False, "network_overrides": [{"iface_id": "eth0", "host_dev_name": self.tap}]})
        marks["loaded"] = now() - t0
        curl(self.sock, "PATCH", "/vm", {"state": "Resumed"})
        marks["response"] = now() - t0
        marks["load + resume"] = now() - t1
        marks["from spawn"] = marks["response"] - marks["jailer spawned"]
        marks["jail_ms"] = marks["jailer spawned"]
        marks["api_ready_ms"] = marks["API socket"] - marks["jailer spawned"]
        marks["api_calls_ms"] = marks["loaded"] - marks["API socket"]
        state = curl(self.sock, "GET", "/").get("state")
        if state != "Running":
            raise BenchError(f"raw {self.name}: state {state!r} after the resume")
        # Firecracker keeps the memory mapped; the names outside the jail can go.
        (self.dir / "vm.mem").unlink()
        (self.dir / "vm.state").unlink()
        return marks

    def kill(self):
        p = self.proc
        if p is not None and p.poll() is None:
            p.kill()
        if p is not None:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                log(f"raw firecracker {p.pid} did not exit after SIGKILL")
                return
        self.proc = None

    def delete(self):
        """Everything of this VM gone: process, jail, cgroup, TAP, files. Returns seconds."""
        t0 = now()
        self.kill()
        self.fc_log = fc_request_times(self.root / "fc.log")
        shutil.rmtree(self.jail, ignore_errors=True)
        self.b.cgroup.remove(self.name)
        if self.has_tap:
            ip("link", "del", self.tap)
            self.has_tap = False
        shutil.rmtree(self.dir, ignore_errors=True)
        self.b.raw_vms.pop(self.name, None)
        return now() - t0


# ---------------------------------------------------------------- the benchmark


class FcDaemon(Daemon):
    """`hatch serve` whose default image also carries the ELF kernel both sides boot (Firecracker
    boots no bzImage), with the Firecracker backend's binaries named."""

    def __init__(self, tmp, binary, image, vmlinux, fc_dir):
        super().__init__(tmp, binary, image)
        self.vmlinux = vmlinux
        self.fc_dir = fc_dir

    def env(self, extra_env=None):
        env = super().env(extra_env)
        env.update(
            # The default image carries both kernels: QEMU's bzImage and this ELF.
            HATCH_DEFAULT_KERNEL_ELF_PATH=str(self.vmlinux),
            HATCH_FIRECRACKER_BINARY=str(self.fc_dir / "firecracker"),
            HATCH_JAILER_BINARY=str(self.fc_dir / "jailer"),
            # The backend logs where each launch's time went (jail, API ready, API calls) at debug level.
            HATCH_LOG="info,sqlx=warn,hatch::vmm::firecracker=debug",
        )
        return env


class Guest:
    def __init__(self, mem):
        self.mem = mem
        self.hatch = {"create": [], "snapshot": [], "restore": [], "delete": []}
        self.raw = {"create": [], "snapshot": [], "restore": [], "delete": []}


def other_vmms():
    """Firecracker and QEMU processes on the host outside this run's namespace (noise from others)."""
    mine = os.stat("/proc/self/ns/net")
    out = set()
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        cmd = proc_cmdline(e)
        if not cmd or not (os.path.basename(cmd[0]).startswith("qemu-system")
                           or os.path.basename(cmd[0]) == "firecracker"):
            continue
        try:
            st = os.stat(f"/proc/{e}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
            out.add(int(e))
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(os.environ["HATCH_BENCH_TMP"])
        self.image = Path(os.environ["HATCH_BENCH_IMAGE"])
        self.ns = os.environ["HATCH_BENCH_NS"]
        self.fc_dir = Path(args.firecracker_dir)
        self.firecracker = self.fc_dir / "firecracker"
        self.jailer = self.fc_dir / "jailer"
        self.rootfs = self.image / "rootfs.ext4"
        self.initrd = self.tmp / "initrd.img"
        self.vmlinux = self.tmp / "vmlinux"
        self.kernel_from = None
        self.disk_bytes = self.rootfs.stat().st_size
        # --vmm-confine off: hatch runs Firecracker jailed as root without a cgroup (HATCH_VMM_CONFINE=off);
        # the raw side then does the same.
        self.confine = args.vmm_confine == "on"
        self.uid = RAW_UID_BASE + os.getpid() % 100_000 if self.confine else 0
        self.raw_jail_base = self.tmp / "raw-jail"
        self.bridge = "fcbraw0"
        self.cgroup = None
        self.libs = []
        self.raw_vms = {}
        self.hatchd = None
        if not args.raw_only:
            self.hatchd = FcDaemon(self.tmp, os.environ["HATCH_BENCH_BIN"], self.image, self.vmlinux, self.fc_dir)
        self.guests = []
        self.others = set()
        self.others_max = 0
        self.facts = {}
        self.busy = None
        self.load_before = None

    # ------------------------------------------------------------ set-up

    def prepare(self):
        for b in (self.firecracker, self.jailer):
            if not os.access(b, os.X_OK):
                raise BenchError(f"{b} is missing or not executable (--firecracker-dir {self.fc_dir})")
        self.facts["firecracker"] = subprocess.run(
            [str(self.firecracker), "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[0].strip()
        self.libs = shared_libraries(self.firecracker)
        own = self.image / "vmlinux"
        if is_elf(own):
            shutil.copyfile(own, self.vmlinux)
            self.kernel_from = f"the image's `vmlinux` ({own.stat().st_size} bytes)"
        else:
            extract_vmlinux(self.image / "vmlinuz", self.vmlinux)
            self.kernel_from = (f"`vmlinux` extracted by this script from the image's bzImage "
                                f"({self.vmlinux.stat().st_size} bytes; the image has no `vmlinux` of its own)")
        shutil.copyfile(self.image / "initrd.img", self.initrd)
        os.chmod(self.vmlinux, 0o644)
        os.chmod(self.initrd, 0o644)
        mount_cgroups()
        self.cgroup = RawCgroup(os.environ.get("HATCH_BENCH_CGROUP", f"hatch-benchfc-{os.getpid()}"))
        if not self.confine:
            self.cgroup.version = None  # no cgroup, as hatch with HATCH_VMM_CONFINE=off
        ip("link", "add", self.bridge, "type", "bridge")
        ip("link", "set", self.bridge, "up")
        if self.confine and self.cgroup.version is None:
            log("no cgroup v1 cpu/memory/pids hierarchies here: the raw VMs run without a cgroup (recorded)")

    def sample_others(self):
        o = other_vmms()
        self.others |= o
        self.others_max = max(self.others_max, len(o))

    # ------------------------------------------------------------ hatch

    def api(self, method, path, body=None, expect=(200,), timeout=OP_TIMEOUT_S):
        status, raw = one_request(self.hatchd.key, method, path, body, timeout=timeout)
        if status not in expect:
            raise BenchError(f"{method} {path}: {status} {raw[:500]!r}\n{self.hatchd.tail()}")
        return json.loads(raw) if raw else None

    def create_body(self, mem):
        return {"hypervisor": "firecracker", "mem_mib": mem, "vcpu_count": 1, "enable_network": True}

    def jail_roots(self):
        """Jail roots of hatch's VMs, wherever in its data dir the backend keeps its chroot base."""
        d = self.hatchd.data
        return glob.glob(f"{d}/*/firecracker/*/root") + glob.glob(f"{d}/*/*/firecracker/*/root")

    def jail_ids(self):
        """(device, inode) of each jail root: a jail made again at the same path is a new one."""
        out = set()
        for r in self.jail_roots():
            try:
                st = os.stat(r)
            except FileNotFoundError:
                continue
            out.add((st.st_dev, st.st_ino))
        return out

    def new_jail(self):
        before = self.jail_ids()
        return lambda: bool(self.jail_ids() - before)

    def jail_gone(self):
        """True once every jail there is now has gone (never, if there is none now)."""
        before = self.jail_ids()
        return lambda: bool(before) and not (before & self.jail_ids())

    def check_backend(self):
        """The warm-up VM (uncounted): the daemon must have a firecracker backend and run firecracker."""
        status, raw = one_request(self.hatchd.key, "POST", "/vms", self.create_body(self.args.sizes[0]),
                                  timeout=OP_TIMEOUT_S)
        if status != 201:
            raise BenchError(
                f"this daemon has no usable firecracker backend: `POST /vms {{\"hypervisor\": \"firecracker\"}}` "
                f"answered {status}: {raw[:400].decode(errors='replace')}\n(started with HATCH_FIRECRACKER_BINARY="
                f"{self.firecracker} HATCH_JAILER_BINARY={self.jailer}; a hatch built before issue 12's backend "
                f"has none; --raw-only measures the raw side alone)\n{self.hatchd.tail(1500)}")
        vm = json.loads(raw)
        self.hatchd.live_vms.add(vm["id"])
        pid = self.hatchd.vmm_pid(vm["id"])
        cmd = proc_cmdline(pid) if pid else None
        if vm.get("hypervisor") != "firecracker" or not cmd or os.path.basename(cmd[0]) != "firecracker":
            raise BenchError(f"this daemon has no usable firecracker backend: asked for a firecracker VM, got "
                             f"hypervisor {vm.get('hypervisor')!r} running {cmd!r}")
        self.facts["hatch_cmdline"] = " ".join(cmd)
        self.facts["hatch_jail"] = [str(Path(r).relative_to(self.hatchd.data)) for r in self.jail_roots()]
        self.facts["hatch_config"] = self.hatch_vm_config(vm["id"])
        self.facts["hatch_uid"] = self.proc_ids(pid)
        self.hatchd.delete_vm(vm["id"])
        log(f"daemon has a firecracker backend: warm-up VM {vm['id']} ran {cmd[0]} as {self.facts['hatch_uid']}")

    def proc_ids(self, pid):
        f = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            f[k] = v.split()
        return f"uid {f['Uid'][1]}, gid {f['Gid'][1]}, CapEff {f['CapEff'][0]}"

    def hatch_vm_config(self, vm_id):
        """What Firecracker itself says of hatch's VM (GET /vm/config on its socket): for the details."""
        socks = [p for r in self.jail_roots() for p in glob.glob(f"{r}/**", recursive=True)
                 if os.path.exists(p) and Path(p).is_socket()]
        if len(socks) != 1:
            return f"not read ({len(socks)} sockets in hatch's jails)"
        try:
            c = curl(socks[0], "GET", "/vm/config", timeout=30)
        except BenchError as e:
            return f"not read: {e}"
        bs, mc = c.get("boot-source", {}), c.get("machine-config", {})
        drives = ", ".join(f"{d.get('drive_id')} ({'ro' if d.get('is_read_only') else 'rw'})"
                           for d in c.get("drives", []))
        nics = ", ".join(n.get("iface_id", "?") for n in c.get("network-interfaces", []))
        return (f"boot args `{bs.get('boot_args')}`, initrd {'yes' if bs.get('initrd_path') else 'no'}, "
                f"{mc.get('vcpu_count')} vCPU, {mc.get('mem_size_mib')} MiB, drives: {drives}; NICs: {nics}; "
                f"metrics file {'yes' if c.get('metrics') else 'no'}")

    def hatch_create(self, mem):
        work = {}
        vms = self.hatchd.vms_dir

        def work_dir():
            for e in os.scandir(vms) if vms.exists() else ():
                if e.is_dir() and e.name not in self.hatchd.live_vms:
                    work["dir"] = Path(e.path)
                    return True
            return False

        checks = {
            "work dir": work_dir,
            "jail root": self.new_jail(),
            "vmm.pid": lambda: "dir" in work and (work["dir"] / "vmm.pid").exists(),
        }
        settle()
        log_off = log_size(self.hatchd.log_path)
        t0, wall0 = now(), time.time()
        w = Watcher(t0, checks)
        w.start()
        try:
            vm = self.api("POST", "/vms", self.create_body(mem), expect=(201,))
            t = now() - t0
        finally:
            w.stop()
        self.hatchd.live_vms.add(vm["id"])
        marks = dict(w.marks, response=t, log=log_events(self.hatchd.log_path, log_off, wall0))
        marks.update(launch_parts(self.hatchd.log_path, log_off))
        got = self.api("GET", f"/vms/{vm['id']}")
        if got.get("hypervisor") != "firecracker" or got.get("state") != "running":
            raise BenchError(f"{vm['id']} after the 201: hypervisor {got.get('hypervisor')!r}, state "
                             f"{got.get('state')!r}")
        return vm["id"], marks

    def hatch_snapshot(self, vm_id):
        work = self.hatchd.vms_dir / vm_id
        objects = self.hatchd.data / "objects" / "snapshots" / vm_id
        pid = self.hatchd.vmm_pid(vm_id)
        if pid is None:
            raise BenchError(f"{vm_id} has no running VMM before the snapshot")
        found = {}

        def capture_dir():
            for e in os.scandir(work):
                if e.name.startswith("capture-"):
                    found["dir"] = Path(e.path)
                    found["snap"] = e.name[len("capture-"):]
                    return True
            return False

        def stored(part):
            def check():
                if "snap" in found:
                    return (objects / found["snap"] / part).exists()
                # A capture dir named otherwise: the object of any snapshot of this VM.
                return bool(glob.glob(f"{objects}/*/{part}"))
            return check

        def in_capture_dir(*names):
            return lambda: "dir" in found and all((found["dir"] / n).exists() for n in names)

        checks = {
            "capture dir": capture_dir,
            "memory file in the jail (Firecracker writing it)":
                lambda: any(os.path.exists(f"{r}/memory") for r in self.jail_roots()),
            "snapshot files in the capture dir": in_capture_dir("vmstate", "memory"),
            "state object stored": stored("vmstate"),
            "memory object stored": stored("memory"),
            "disk object stored": stored("disk"),
            "VMM gone": lambda: not pid_alive(pid),
            "jail removed": self.jail_gone(),
            "capture dir removed": lambda: "dir" in found and not found["dir"].exists(),
        }
        settle()
        log_off = log_size(self.hatchd.log_path)
        t0, wall0 = now(), time.time()
        w = Watcher(t0, checks)
        w.start()
        try:
            snap = self.api("POST", f"/vms/{vm_id}/snapshot", None, expect=(201,))
            t = now() - t0
        finally:
            w.stop()
        marks = dict(w.marks, response=t, log=log_events(self.hatchd.log_path, log_off, wall0))
        marks["size_bytes"] = snap.get("size_bytes")
        # Read after the operation, not polled during it: the work dir keeps Firecracker's log after its
        # jail went (hatch runs it at Warning level, which leaves out the request times: then none).
        marks["fc"] = self.hatch_fc_log(vm_id)
        # hatch's pause + Full snapshot ends when the backend has checked the files and linked them into
        # the capture dir (src/vmm/firecracker).
        if "snapshot files in the capture dir" in marks:
            marks["pause + snapshot"] = marks["snapshot files in the capture dir"]
        marks["objects"] = {}
        for f in sorted((objects / snap["id"]).glob("*")):
            marks["objects"][f.name] = f.stat().st_size
        return snap["id"], marks

    def hatch_restore(self, vm_id):
        work = self.hatchd.vms_dir / vm_id
        found = {}

        def restore_dir():
            for e in os.scandir(work):
                if e.name.startswith("restore-"):
                    found["dir"] = Path(e.path)
                    return True
            return False

        def new_pid():
            return self.hatchd.vmm_pid(vm_id) is not None

        def in_restore_dir(name):
            return lambda: "dir" in found and (found["dir"] / name).exists()

        checks = {
            "restore dir": restore_dir,
            # The manager names the memory file only once all of it was fetched and verified.
            "memory fetched and verified": in_restore_dir("memory"),
            "state fetched": in_restore_dir("vmstate"),
            "jail root": self.new_jail(),
            "VMM started (vmm.pid)": new_pid,
            "restore dir removed": lambda: "dir" in found and not found["dir"].exists(),
        }
        settle()
        log_off = log_size(self.hatchd.log_path)
        t0, wall0 = now(), time.time()
        w = Watcher(t0, checks)
        w.start()
        try:
            self.api("POST", f"/vms/{vm_id}/restore", None, expect=(200,))
            t = now() - t0
        finally:
            w.stop()
        marks = dict(w.marks, response=t, log=log_events(self.hatchd.log_path, log_off, wall0))
        marks.update(launch_parts(self.hatchd.log_path, log_off))
        # The manager fetches and verifies the files before it starts the VMM: the new VMM's pid
        # file splits the restore into the fetch (and all else before it) and the VMM's part.
        split = marks.get("VMM started (vmm.pid)", marks.get("jail root"))
        if split is not None:
            marks["before VMM"] = split
            marks["VMM -> 200"] = t - split
        got = self.api("GET", f"/vms/{vm_id}")
        if got.get("state") != "running":
            raise BenchError(f"{vm_id} after the restore: state {got.get('state')!r}")
        marks["fc"] = self.hatch_fc_log(vm_id)
        return marks

    def hatch_log_files(self, vm_id):
        """Files that may hold Firecracker's log for hatch's VM: `*log*` files in its jail and work dir."""
        candidates = [p for r in self.jail_roots() for p in glob.glob(f"{r}/**", recursive=True)]
        candidates += glob.glob(f"{self.hatchd.vms_dir / vm_id}/**", recursive=True)
        out = []
        for p in candidates:
            try:
                if ("log" in Path(p).name and Path(p).is_file() and not Path(p).is_symlink()
                        and os.stat(p).st_size <= 16 * MiB):
                    out.append(p)
            except OSError:
                continue
        return out

    def hatch_fc_log(self, vm_id):
        """Firecracker's own request times for hatch's VM, from whichever log file (in its jail or its
        work dir) has them. Empty if hatch keeps no Firecracker log or logs below Info."""
        out = {}
        for p in self.hatch_log_files(vm_id):
            for name, times in fc_request_times(p).items():
                out.setdefault(name, []).extend(times)
        return out

    def hatch_run(self, g):
        vm_id, c = self.hatch_create(g.mem)
        sid, s = self.hatch_snapshot(vm_id)
        r = self.hatch_restore(vm_id)
        t0 = now()
        self.hatchd.delete_vm(vm_id)
        g.hatch["delete"].append(now() - t0)
        self.api("DELETE", f"/snapshots/{sid}", expect=(200, 204, 404))
        g.hatch["create"].append(c)
        g.hatch["snapshot"].append(s)
        g.hatch["restore"].append(r)
        log(f"  m{g.mem} hatch: create {c['response']:.3f}s, snapshot {s['response']:.3f}s "
            f"({(s.get('size_bytes') or 0) / MiB:.0f} MiB stored), restore {r['response']:.3f}s "
            f"(VMM start -> 200 {r.get('VMM -> 200', float('nan')):.3f}s)")

    # ------------------------------------------------------------ raw

    def curl_cost(self, vm):
        """What one `curl` call costs here (GET `/` on a running VM, 10 times), for reading the raw figures."""
        t = []
        for _ in range(10):
            t0 = now()
            curl(vm.sock, "GET", "/")
            t.append(now() - t0)
        return f"GET `/` alone {fmt_ms(t)} here, 10 calls on the warm-up VM"

    def raw_run(self, g, i):
        vm = RawVm(self, g.mem, i)
        c = vm.create()
        s = vm.snapshot()
        r = vm.restore()
        g.raw["delete"].append(vm.delete())
        c["fc"] = s["fc"]
        r["fc"] = vm.fc_log
        g.raw["create"].append(c)
        g.raw["snapshot"].append(s)
        g.raw["restore"].append(r)
        log(f"  m{g.mem} raw:   create {c['response']:.3f}s, snapshot {s['response']:.3f}s "
            f"({s['mem_size'] / MiB:.0f} MiB memory file), restore {r['response']:.3f}s "
            f"(load + resume {r['load + resume']:.3f}s)")

    def run(self):
        self.prepare()
        if self.hatchd:
            self.hatchd.start("bench", {"HATCH_VMM_CONFINE": self.args.vmm_confine})
            self.check_backend()
        # The raw side's warm-up (uncounted), as the daemon's is the check above.
        w = RawVm(self, self.args.sizes[0], 999)
        w.create()
        self.facts["curl"] = self.curl_cost(w)
        w.delete()
        self.load_before = os.getloadavg()[0]
        busy = CpuBusy().start()
        for mem in self.args.sizes:
            g = Guest(mem)
            self.guests.append(g)
            log(f"guest {mem} MiB: create, snapshot, restore, delete; {self.args.runs} run(s)"
                + ("" if self.hatchd else " (raw only)"))
            for i in range(self.args.runs):
                self.sample_others()
                order = ("hatch", "raw") if i % 2 == 0 else ("raw", "hatch")
                for which in order:
                    if which == "raw":
                        self.raw_run(g, i)
                    elif self.hatchd:
                        self.hatch_run(g)
        busy.stop()
        self.busy = busy.cores
        self.sample_others()

    def cleanup(self):
        for vm in list(self.raw_vms.values()):
            try:
                vm.delete()
            except Exception as e:
                log(f"cleanup: raw {vm.name}: {e}")
        if self.hatchd:
            self.hatchd.stop()
        kill_leftovers(self.tmp)

        def ours():
            if os.environ.get("HATCH_BENCH_NS") != self.ns:
                raise BenchError("not the bench's namespace")

        kill_namespace_leftovers(ours)
        if self.cgroup is not None:
            self.cgroup.remove_all()
        shutil.rmtree(self.raw_jail_base, ignore_errors=True)


# ---------------------------------------------------------------- report


def render(meta, bench, markdown):
    lines = []
    add = lines.append
    gs = bench.guests
    hatch = bench.hatchd is not None

    def table(header, rows):
        add_table(add, markdown, header, rows)

    def vals(runs, key):
        return [m.get(key) for m in runs]

    def ratio_row(label, h, r, apart=None, fmt=fmt_s):
        """`apart`: what hatch does here that the raw side does not (then no verdict on the ratio)."""
        a, b = med(h), med(r)
        q = a / b if a is not None and b else None
        return [label, fmt(h), fmt(r), "-" if q is None else f"{q:.2f}",
                f"none: hatch also {apart}" if apart else verdict(q, TARGET) if q is not None else "-"]

    add(f"Command: `{meta['command']}` (from the repository root, as root)  ")
    add(f"Date: {meta['date']}  ")
    add(f"Host: {meta['cpus']} cores ({meta['cpu']}), kernel {meta['kernel']}, `/dev/kvm` {meta['kvm']}; load average "
        f"{bench.load_before:.2f} before / {meta['load_after']:.2f} after the measurements; host CPU busy (all "
        f"processes, /proc/stat) {bench.busy:.2f} of {meta['cpus']} cores while measuring; "
        f"{len(bench.others)} other VMM process(es) (QEMU or Firecracker, not this run's) seen on the host, at "
        f"most {bench.others_max} at once (sampled between runs)  ")
    add(f"hatch: {meta['build'] if hatch else 'not measured (`--raw-only`)'}  ")
    add(f"Firecracker: {bench.facts['firecracker']} and its jailer, both sides the same binaries; gnu build "
        f"(its shared libraries copied into each chroot, as hatch does: "
        f"{', '.join(f'`{x}`' for x in bench.libs) or 'none'})  ")
    add("VMM confinement: " + ("on (`--vmm-confine on`): each Firecracker under a uid of its own with no "
                               "capabilities, in a cgroup with hatch's limits, on both sides  " if bench.confine else
                               "off (`--vmm-confine off`): hatch with `HATCH_VMM_CONFINE=off`, which still jails "
                               "Firecracker but as root and without a cgroup; the raw side the same  "))
    add(f"Kernel: {bench.kernel_from}; the image's initrd and root filesystem "
        f"({bench.disk_bytes / MiB:.0f} MiB, raw: a sparse copy per VM)  ")
    seed = (f"hatch: the cloud-init seed; raw: a {SEED_BYTES // MiB} MiB file" if hatch
            else f"a {SEED_BYTES // MiB} MiB file standing in for hatch's cloud-init seed")
    add(f"Guests: {', '.join(str(g.mem) for g in gs)} MiB, 1 vCPU, a NIC on a TAP in a bridge, root disk + a "
        f"read-only second drive ({seed}). Under this host's software KVM the guest does not get far into boot: "
        f"every figure is the VMM's, not a guest's  ")
    add(f"Runs: {meta['runs']} per size (median, min-max); each run makes a VM, snapshots it, restores it and "
        f"deletes it; " + ("hatch and raw interleaved, alternating which goes first; one uncounted warm-up VM per "
                           "side" if hatch else "one uncounted warm-up VM first"))
    add("")

    add_heading(add, markdown, "hatch vs the same Firecracker driven by hand" if hatch
                else "The same Firecracker driven by hand (hatch not measured: `--raw-only`)")
    raw_text = {
        "create": "sparse copy of the root filesystem, TAP, cgroup when confined, jail of hard links, jailer, "
                  "socket, PUT boot-source, machine-config, two drives, network-interfaces, InstanceStart, "
                  "GET `/` = `Running`",
        "snapshot": "PATCH `/vm` Paused + PUT `/snapshot/create` Full only (nothing stored, the VMM still there)",
        "restore": "jail with hard links of the snapshot files, jailer, socket, PUT `/snapshot/load` (File "
                   "backend), PATCH `/vm` Resumed",
        "from start": "from spawning the jailer to `Resumed`",
    }
    curl_cost = (f"every API call is one `curl` process ({bench.facts['curl']}); "
                 if bench.facts.get("curl") else "every API call is one `curl` process; ")
    if hatch:
        add("What each figure includes. **create**: hatch `POST /vms {\"hypervisor\": \"firecracker\"}` until "
            "the 201 (API, SQLite row, work dir, raw root disk, seed, TAP and firewall, cgroup and uid when "
            f"confined, jail of hard links, jailer, the API calls, InstanceStart, `Running`); raw: "
            f"{raw_text['create']}. **snapshot**: "
            "hatch `POST /vms/{id}/snapshot` until the 201 (pause, Full snapshot, the memory, state and disk "
            f"stored in the object store with checksums, the VMM ended); raw: {raw_text['snapshot']}. "
            "**pause + Full snapshot** (hatch): from its request until `vmstate` and `memory` are in its capture "
            "dir (the backend links them there once Firecracker wrote them and they passed its checks). "
            "**restore**: hatch `POST /vms/{id}/restore` until the 200 (memory, state and disk fetched from the "
            "store and verified, then jail, jailer, `snapshot/load` with the File backend, resume); raw: "
            f"{raw_text['restore']}. **restore from the VMM's start**: hatch from its new VMM's pid file (written "
            f"once the fetch is done) to the 200; raw {raw_text['from start']}. Raw side: {curl_cost}hatch uses "
            "an HTTP client inside the daemon.")
    else:
        add(f"What each figure includes. **create**: {raw_text['create']}. **snapshot**: {raw_text['snapshot']}. "
            f"**restore**: {raw_text['restore']}. **restore from the VMM's start**: {raw_text['from start']}. "
            f"{curl_cost[0].upper() + curl_cost[1:-2]}.")
    add("")
    rows = []
    for g in gs:
        H, R = g.hatch, g.raw
        rc, rs, rr = vals(R["create"], "response"), vals(R["snapshot"], "response"), vals(R["restore"], "response")
        m = f"{g.mem} MiB"
        if hatch:
            rows += [[m] + ratio_row("create -> running", vals(H["create"], "response"), rc),
                     [m] + ratio_row("pause + Full snapshot (hatch: until the files are in its capture dir)",
                                     vals(H["snapshot"], "pause + snapshot"), rs),
                     [m] + ratio_row("snapshot (hatch: + stored, VMM ended)", vals(H["snapshot"], "response"), rs,
                                     "stores the files and ends the VMM"),
                     [m] + ratio_row("restore (hatch: + fetch and verify of memory, state, disk)",
                                     vals(H["restore"], "response"), rr, "fetches and verifies the files"),
                     [m] + ratio_row("restore from the VMM's start", vals(H["restore"], "VMM -> 200"),
                                     vals(R["restore"], "from spawn"))]
        else:
            rows += [[m, "create -> running", fmt_s(rc)], [m, "snapshot", fmt_s(rs)], [m, "restore", fmt_s(rr)],
                     [m, "restore from the VMM's start", fmt_s(vals(R["restore"], "from spawn"))]]
    table(["guest", "operation", "hatch", "raw (curl)", "hatch / raw", "target"] if hatch
          else ["guest", "operation", "raw (curl)"], rows)

    if hatch:
        add_heading(add, markdown, "A launch step by step: hatch's backend against the same steps by hand")
        add("hatch's figures are its backend's own (`firecracker launched`, a debug line of the daemon log with "
            "`hatch::vmm::firecracker=debug`), the raw ones this script's clock around the same steps. **jail**: "
            "hatch prepares the chroot (links, copies of the libraries, log and metrics files, cgroup when "
            "confined) and spawns the jailer; raw the same (create: after its disk and TAP, like hatch's). "
            "**API ready**: from the spawn "
            "to an answering socket. **API calls**: create: PUT boot-source, machine-config, drives, "
            "network-interfaces, InstanceStart, state check; restore: PUT snapshot/load (the resume is a later "
            "call in both). Raw: one `curl` per call.")
        add("")
        rows = []
        for g in gs:
            for op in ("create", "restore"):
                for key, label in (("jail_ms", "jail"), ("api_ready_ms", "API ready"),
                                   ("api_calls_ms", "API calls")):
                    rows.append([f"{g.mem} MiB"] + ratio_row(f"{op}: {label}", vals(g.hatch[op], key),
                                                               vals(g.raw[op], key), fmt=fmt_ms))
        table(["guest", "step", "hatch (its log)", "raw (curl)", "hatch / raw", "target"], rows)

    add_heading(add, markdown, "Load + resume against guest RAM")
    big, small = max(gs, key=lambda g: g.mem), min(gs, key=lambda g: g.mem)

    def fc_sum(runs, *names):
        """Firecracker's own time for these requests in each run (from its log), None where one is missing."""
        out = []
        for m in runs:
            fc = m.get("fc") or {}
            out.append(sum(fc[n][-1] for n in names) if all(n in fc for n in names) else None)
        return out

    add(f"Median (min-max) at each size, and the {big.mem} MiB / {small.mem} MiB ratio of the medians (flat = "
        f"1.00). \"Firecracker's own\" is what Firecracker logs for its `load snapshot` and `resume vm` requests "
        f"(no client, no process start); \"two API calls\" adds `curl`."
        + (" hatch's \"fetch + verify\" runs from its request to the new VMM's pid file: the memory file, the "
           "state and the raw disk copied from the store and their checksums checked, which grows with RAM (and "
           "disk) by design." if hatch else ""))
    add("")
    series = [("raw: Firecracker's own `load snapshot` + `resume vm`",
               lambda g: fc_sum(g.raw["restore"], "load snapshot", "resume vm")),
              ("raw: load + resume (two API calls with curl)", lambda g: vals(g.raw["restore"], "load + resume")),
              ("raw: restore from the VMM's start (jailer, socket, load, resume)",
               lambda g: vals(g.raw["restore"], "from spawn")),
              ("raw: whole restore (jail too)", lambda g: vals(g.raw["restore"], "response"))]
    if hatch:
        series += [("hatch: Firecracker's own `load snapshot` + `resume vm`",
                    lambda g: fc_sum(g.hatch["restore"], "load snapshot", "resume vm")),
                   ("hatch: fetch + verify of memory, state, disk (request -> new VMM)",
                    lambda g: vals(g.hatch["restore"], "before VMM")),
                   ("hatch: restore from the VMM's start (-> 200)", lambda g: vals(g.hatch["restore"], "VMM -> 200")),
                   ("hatch: whole restore (request -> 200)", lambda g: vals(g.hatch["restore"], "response"))]
    rows = []
    for label, f in series:
        if all(x is None for g in gs for x in f(g)):
            # hatch runs Firecracker at Warning level, which leaves its request times out of the log.
            add(f"(No figures for \"{label}\": no Firecracker log with request times was found.)")
            add("")
            continue
        a, b = med(f(big)), med(f(small))
        rows.append([label] + [fmt_ms(f(g)) for g in gs] + ["-" if a is None or not b else f"{a / b:.2f}"])
    table(["figure"] + [f"{g.mem} MiB" for g in gs] + [f"{big.mem} / {small.mem} MiB"], rows)

    add_heading(add, markdown, "Where the time goes")
    add("Milliseconds from the start of each operation (median, min-max)."
        + (" hatch's steps are seen from outside: its data dir polled every 2 ms." if hatch else ""))
    add("")
    rows = []
    for g in gs:
        H, R = g.hatch, g.raw
        m = f"{g.mem} MiB"
        rows += [[m, "raw create: root disk copied (`cp --sparse=always`)", fmt_ms(vals(R["create"], "disk copied"))],
                 [m, "raw create: TAP in the bridge, up", fmt_ms(vals(R["create"], "TAP up"))],
                 [m, "raw create: jail of hard links made", fmt_ms(vals(R["create"], "jail made"))],
                 [m, "raw create: cgroup made", fmt_ms(vals(R["create"], "cgroup made"))],
                 [m, "raw create: API socket there", fmt_ms(vals(R["create"], "API socket"))],
                 [m, "raw create: configured (5 PUTs)", fmt_ms(vals(R["create"], "configured"))],
                 [m, "raw create: InstanceStart returned", fmt_ms(vals(R["create"], "InstanceStart returned"))],
                 [m, "raw create: `Running`", fmt_ms(vals(R["create"], "response"))],
                 [m, "raw snapshot: paused", fmt_ms(vals(R["snapshot"], "paused"))],
                 [m, "raw snapshot: snapshot/create returned", fmt_ms(vals(R["snapshot"], "response"))],
                 [m, "raw, after the snapshot (not in it): SIGKILL, files out, jail removed",
                  fmt_ms(vals(R["snapshot"], "ended"))],
                 [m, "raw, after the snapshot (not in it): fsync of both files", fmt_ms(vals(R["snapshot"], "fsync"))],
                 [m, "raw restore: jail made", fmt_ms(vals(R["restore"], "jail made"))],
                 [m, "raw restore: jailer spawned", fmt_ms(vals(R["restore"], "jailer spawned"))],
                 [m, "raw restore: API socket there", fmt_ms(vals(R["restore"], "API socket"))],
                 [m, "raw restore: snapshot/load returned", fmt_ms(vals(R["restore"], "loaded"))],
                 [m, "raw restore: resumed", fmt_ms(vals(R["restore"], "response"))],
                 [m, "raw delete (kill, jail, cgroup, TAP, files)", fmt_ms(R["delete"])]]
        if hatch:
            rows += [[m, "hatch create: work dir", fmt_ms(vals(H["create"], "work dir"))],
                     [m, "hatch create: jail root", fmt_ms(vals(H["create"], "jail root"))],
                     [m, "hatch create: vmm.pid", fmt_ms(vals(H["create"], "vmm.pid"))],
                     [m, "hatch create: 201", fmt_ms(vals(H["create"], "response"))],
                     [m, "hatch snapshot: capture dir", fmt_ms(vals(H["snapshot"], "capture dir"))],
                     [m, "hatch snapshot: `memory` in the jail (Firecracker writing it)",
                      fmt_ms(vals(H["snapshot"], "memory file in the jail (Firecracker writing it)"))],
                     [m, "hatch snapshot: `vmstate` and `memory` in the capture dir (checked, linked)",
                      fmt_ms(vals(H["snapshot"], "snapshot files in the capture dir"))],
                     [m, "hatch snapshot: memory object in the store",
                      fmt_ms(vals(H["snapshot"], "memory object stored"))],
                     [m, "hatch snapshot: state object in the store",
                      fmt_ms(vals(H["snapshot"], "state object stored"))],
                     [m, "hatch snapshot: disk object in the store", fmt_ms(vals(H["snapshot"], "disk object stored"))],
                     [m, "hatch snapshot: VMM gone", fmt_ms(vals(H["snapshot"], "VMM gone"))],
                     [m, "hatch snapshot: jail removed", fmt_ms(vals(H["snapshot"], "jail removed"))],
                     [m, "hatch snapshot: 201", fmt_ms(vals(H["snapshot"], "response"))],
                     [m, "hatch restore: restore dir", fmt_ms(vals(H["restore"], "restore dir"))],
                     [m, "hatch restore: `memory` in the restore dir (fetched, verified)",
                      fmt_ms(vals(H["restore"], "memory fetched and verified"))],
                     [m, "hatch restore: `vmstate` in the restore dir", fmt_ms(vals(H["restore"], "state fetched"))],
                     [m, "hatch restore: new jail root", fmt_ms(vals(H["restore"], "jail root"))],
                     [m, "hatch restore: VMM started (vmm.pid)", fmt_ms(vals(H["restore"], "VMM started (vmm.pid)"))],
                     [m, "hatch restore: restore dir removed", fmt_ms(vals(H["restore"], "restore dir removed"))],
                     [m, "hatch restore: 200", fmt_ms(vals(H["restore"], "response"))],
                     [m, "hatch delete (`DELETE /vms/{id}`)", fmt_ms(H["delete"])]]
    table(["guest", "step", "median (min-max)"], rows)

    add_heading(add, markdown, "Details")

    def fc_own(side, who):
        runs = side["snapshot"] + side["restore"]
        names = list(dict.fromkeys(n for m in runs for n in (m.get("fc") or {})))

        def own(n):
            return med([(m.get("fc") or {}).get(n, [None])[-1] for m in runs])
        add(f"  - Firecracker's own time per API request ({who}, from its log; median ms): "
            + (", ".join(f"`{n}` {ms(own(n)):.1f}" for n in names) if names else "no log found"))
    for g in gs:
        R = g.raw
        add(f"- {g.mem} MiB, raw, every run (s): create " + ", ".join(f"{m['response']:.3f}" for m in R["create"])
            + "; snapshot " + ", ".join(f"{m['response']:.3f}" for m in R["snapshot"])
            + "; restore " + ", ".join(f"{m['response']:.3f}" for m in R["restore"])
            + f". Snapshot files: memory {mib(med(vals(R['snapshot'], 'mem_size')))} "
            f"({mib(med(vals(R['snapshot'], 'mem_alloc')))} allocated on disk), state "
            f"{med(vals(R['snapshot'], 'state_size')):.0f} bytes.")
        fc_own(R, "raw")
        if hatch:
            H = g.hatch
            objs = H["snapshot"][0]["objects"] if H["snapshot"] else {}
            add(f"- {g.mem} MiB, hatch, every run (s): create "
                + ", ".join(f"{m['response']:.3f}" for m in H["create"])
                + "; snapshot " + ", ".join(f"{m['response']:.3f}" for m in H["snapshot"])
                + "; restore " + ", ".join(f"{m['response']:.3f}" for m in H["restore"])
                + f". Stored `size_bytes` {mib(med(vals(H['snapshot'], 'size_bytes')))} (objects, first run: "
                + (", ".join(f"{k} {mib(v)}" for k, v in objs.items()) or "none seen") + ").")
            fc_own(H, "hatch")
            for op in ("create", "snapshot", "restore"):
                firsts = []
                for m in H[op]:
                    d = {}
                    for name, t in m.get("log", []):
                        d.setdefault(name, t)
                    firsts.append(d)
                names = list(dict.fromkeys(n for d in firsts for n in d))
                if names:
                    add(f"  - daemon log during {op}, median ms from the request to each line's first "
                        f"appearance: " + ", ".join(f"`{n}` {ms(med([d.get(n) for d in firsts])):.0f}"
                                                    for n in names))
    as_root = "" if bench.confine else " (`--vmm-confine off`: root, as hatch with HATCH_VMM_CONFINE=off)"
    add(f"- raw VMs: jailer `--uid`/`--gid` {bench.uid}{as_root}, `--chroot-base-dir` in the run's temp dir, "
        f"`--resource-limit fsize=` (larger of disk and RAM + 64 MiB), firecracker `--api-sock --log-path --level "
        f"Info --metrics-path` (Info, not hatch's Warning, for Firecracker's own request times above), serial "
        f"console (stdout) into a `console.log`; boot args `{BOOT_ARGS}`; "
        + (f"cgroup {bench.cgroup.version} with hatch's limits (CPU: vCPUs + 1 periods of {CPU_PERIOD_US // 1000} "
           f"ms per period; memory: RAM + {OVERHEAD_MIB} MiB; 130 pids), joined before the jailer runs."
           if bench.cgroup and bench.cgroup.version
           else "no cgroup (`--vmm-confine off`)." if not bench.confine
           else "no cgroup (no cgroup v1 cpu/memory/pids here)."))
    if hatch:
        add(f"- hatch's VMs (warm-up VM): `{bench.facts.get('hatch_cmdline', '?')}`, "
            f"{bench.facts.get('hatch_uid', '?')}, jail "
            + ", ".join(f"`{j}`" for j in bench.facts.get("hatch_jail", [])) + "; Firecracker's `GET /vm/config`: "
            + bench.facts.get("hatch_config", "?") + ".")
    return "\n".join(lines)


def kvm_kind():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    hw = re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, flags=re.M)
    return "with hardware virtualization (vmx/svm)" if hw else "without vmx/svm (a software KVM)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per size (default 3)")
    ap.add_argument("--sizes", default="128,1024", help="guest RAM sizes in MiB, comma-separated (default 128,1024)")
    ap.add_argument("--firecracker-dir", default=os.environ.get("HATCH_TEST_FIRECRACKER_DIR"),
                    help="directory holding `firecracker` and `jailer` (default $HATCH_TEST_FIRECRACKER_DIR)")
    ap.add_argument("--vmm-confine", choices=("on", "off"), default="on",
                    help="on (default): each VMM under its own uid and cgroup on both sides; off: the daemon with "
                         "HATCH_VMM_CONFINE=off (Firecracker still jailed, as root, no cgroup) and the raw side alike")
    ap.add_argument("--raw-only", action="store_true",
                    help="measure only the Firecracker driven by hand (no daemon); prints, never updates the docs")
    ap.add_argument("--markdown", action="store_true",
                    help=f"print the `## {DOC_SECTION}` section for docs/BENCHMARKS.md instead of plain tables, "
                         "and write it there (unless --no-docs or --raw-only)")
    ap.add_argument("--no-docs", action="store_true", help="with --markdown: only print, do not update the docs")
    args = ap.parse_args()
    if not 1 <= args.runs <= 100:
        ap.error("--runs must be between 1 and 100")
    try:
        args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        ap.error("--sizes must be numbers separated by commas")
    if not args.sizes or not all(128 <= s <= 16384 for s in args.sizes):
        ap.error("--sizes must be between 128 and 16384 MiB each")
    if not args.firecracker_dir:
        ap.error("give --firecracker-dir DIR (or set HATCH_TEST_FIRECRACKER_DIR): where `firecracker` and "
                 "`jailer` are")
    if "HATCH_BENCH_TMP" not in os.environ:
        ap.error("run this through bench/firecracker (it makes the namespace and the temp dir)")

    bench = Bench(args)
    meta = {
        "command": os.environ.get("HATCH_BENCH_COMMAND", "bench/firecracker"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": os.uname().release,
        "kvm": kvm_kind(),
        "runs": args.runs,
        "build": ("debug build" if "/debug/" in os.environ.get("HATCH_BENCH_BIN", "") else "release build")
        + f" of {git_state()}",
    }
    if os.environ.get("SUDO_USER"):
        meta["command"] = "sudo " + meta["command"]
    status, _ = run_guarded(bench.run, bench.cleanup)
    if status != 0:
        return status
    meta["load_after"] = os.getloadavg()[0]
    section = render(meta, bench, args.markdown)
    if args.markdown:
        print(f"\n## {DOC_SECTION}\n")
        print(section)
        if not args.no_docs and not args.raw_only:
            write_docs(DOCS, DOC_SECTION, section)
            log(f"updated {DOCS}")
    else:
        print()
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
