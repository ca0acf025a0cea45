#!/usr/bin/env python3
"""bench/snapshot: hatch snapshot/restore against the same QEMU driven by hand,
stored bytes per compression algorithm, the daemon's memory while it stores
a large guest, VMM confinement on vs off, what the store keeps for repeated and
for look-alike snapshots, and restore from s3s-fs against the local store.

Run through `bench/snapshot` (it builds, makes the network namespace and the
temp dir, and passes them in HATCH_BENCH_*); this script runs inside that
namespace and talks to the daemon on 127.0.0.1. Standard library only.

For each guest size (default 256 and 1024 MiB; 1 vCPU, no NIC), a user-data
`#!` script in the default busybox image first fills HALF of the guest's RAM
in a tmpfs: a quarter of RAM from /dev/urandom (incompressible) and a quarter
of one repeating text line (very compressible). It then starts a ticking loop
that prints `bench-tick N` on the console every 20 ms without forking (a shell
`read -t` on a fifo), which is how both sides tell that a restored guest runs
again. Two such guests run: one made by hatch (`POST /vms`) and a raw QEMU with
the command line hatch used for it (read from /proc), only the per-VM paths
moved, on a fresh qcow2 overlay of the same rootfs and a copy of its seed.

Measured in one run, each `--runs` times (median, min-max), hatch and raw
interleaved, alternating which goes first:

  1. snapshot: hatch `POST /vms/{id}/snapshot` (201 = stored) against QMP
     `stop`, `migrate-set-parameters max-bandwidth` (the value hatch sets),
     `migrate` to `exec:cat > FILE`, `query-migrate` every 2 ms until
     `completed`, the `cat` QEMU forked has exited, and fsync of FILE and its
     directory.
  2. restore: hatch `POST /vms/{id}/restore` -> the first new `bench-tick`
     line in console.log, against spawning QEMU with the same command line
     plus `-incoming "exec:cat FILE"`, QMP `query-status` every 2 ms until
     `paused`, `cont` -> the same.
  3. compression: the VM's `snapshot_compression` set with `PATCH /vms/{id}`
     to none, lz4 level 0 and zstd level 1, then `POST /vms/{id}/snapshot`,
     `GET /snapshots/{id}` every 10 ms until `compression_state` is
     no longer `compressing`; sizes from that record; then `POST
     /vms/{id}/restore` (timed the same way as in 2) and `DELETE
     /snapshots/{id}`.
  4. the daemon's peak RSS: VmHWM of `hatch serve`, reset before each
     operation (`/proc/PID/clear_refs` = 5), and VmRSS sampled every 2 ms.
  5. VMM confinement on vs off (issue 10): hatch snapshot and restore, timed
     as in 1. and 2., of the same guest by a daemon with HATCH_VMM_CONFINE=on
     and one with off. The guest sleeps on a snapshot while the daemon is
     restarted on the same data dir with the other setting; blocks of
     --confine-runs alternate on/off, the order swapping every round
     (--confine-rounds; 0 skips the part, --confine-only runs only it). Each
     block wakes the guest first (uncounted), and /proc/PID/status of every
     restored QEMU is checked against the setting.
  6. repeated sleep (issue 13): a new guest of a new owner, half filled, is
     snapshotted (`POST /vms/{id}/snapshot`) and restored (-> first new tick)
     --sleeps times in a row, every snapshot kept until the VM is deleted. For
     each snapshot, what it added to the store: bytes and number of the regular
     files of the store's directory (staging names with `#` left out) that are
     new or rewritten between a walk right before the request and one right
     after the 201, as a fraction of RAM. Also what the store holds after the
     last one that was not there before the first, and what is left right after
     the VM is deleted. The store is only looked at from outside, so this works
     whether it keeps whole objects or content-defined chunks.
  7. fresh VMs of one image: --fresh-vms VMs of a new owner made one after
     another from the default image, without the fill (booted, ticking, idle),
     each snapshotted once and left asleep; what the store holds for all of them
     against the first alone. Again with the fill, as a second row (a quarter
     of each guest's RAM is its own random bytes, so that row cannot share).
  8. s3s-fs against the local store: a second daemon on its own data dir with
     `HATCH_S3_*` pointing at s3s-fs (started here on 127.0.0.1, its bucket in
     the temp dir, stopped at the end whatever happens); one daemon runs at a
     time, restarted for each block of one snapshot + restore per size (timed as
     in 1. and 2.), blocks alternating between the stores for --runs rounds.
     Skipped, saying why, when bench/snapshot finds no s3s-fs.

Parts 6-8 run before part 5 (which leaves the daemon with HATCH_VMM_CONFINE
set); each selectable with --sleeps-only, --fresh-only, --s3-only (combinable
with each other and with --confine-only), skipped with --sleeps 0, --fresh-vms
0, --no-s3.

While hatch works, the work dir and the object store are polled every 2 ms, so
each phase (migration done, each object stored, QEMU gone or started) gets a
time, with the daemon's CPU time at each; the daemon's own log lines are timed
too. After each hatch snapshot every stored object (with chunked snapshots: every
file it added to the store) is fsynced (timed apart): it shows whether hatch's
201 came before the data was on disk. Every timed
operation starts after a `sync`, so none pays for the writeback of the one
before. Before measuring, the script waits (bounded) until no QEMU but its own
runs on the host, and records how many it saw while measuring.

Output: plain tables on stdout; with --markdown the `## Snapshots` section for
docs/BENCHMARKS.md instead, also written there unless --no-docs (with any
--*-only: the selected parts' tables under their command and date, never
written to the docs).
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    git_state,
    add_heading, add_table, DOCS, READY, REPO, BenchError, CpuBusy, Daemon, Qmp, arg_after, cpu_model, kill_leftovers,
    log,
    ms, one_request, other_qemu_pids, pid_alive, qemu_version, run_guarded,
    stats, write_docs,
)

MiB = 1 << 20
POLL_S = 0.002
TICK_S = 0.02
FILL_TIMEOUT_S = 900.0
OP_TIMEOUT_S = 900.0
COMPRESS_POLL_S = 0.01
# What hatch sets before saving (src/vmm/qemu/mod.rs): QEMU's default cap (128 MiB/s) is
# meant for live migration over a network; the raw side gets the same setting.
MAX_BANDWIDTH = 64 << 30
FILLED = b"bench-fill: done"
TICK_RE = re.compile(rb"bench-tick (\d+)\r?\n")
ALGORITHMS = (
    ("none", {"enabled": False}),
    ("lz4 (level 0)", {"enabled": True, "algorithm": "lz4", "level": 0}),
    ("zstd (level 1)", {"enabled": True, "algorithm": "zstd", "level": 1}),
)
DOC_SECTION = "Snapshots"


def now():
    return time.monotonic()


def user_data(mem_mib, fill=True):
    """The bench's user-data script; without `fill` only the ticks (part 7's idle guests)."""
    rand = mem_mib // 4
    text = mem_mib // 2 - rand
    fill_lines = f"""mkdir -p /run/bench-fill
mount -t tmpfs -o size={rand + text + 4}m bench-fill /run/bench-fill
dd if=/dev/urandom of=/run/bench-fill/random bs=1M count={rand} 2>/dev/null
yes 'hatch bench/snapshot: one line of text repeated, 0123456789 abcdefghijklmnopqrstuvwxyz' |
    head -c {text * MiB} >/run/bench-fill/text
echo "{FILLED.decode()} random_kib=$(du -k /run/bench-fill/random | cut -f1) text_kib=$(du -k /run/bench-fill/text | cut -f1) $(grep -E '^(MemFree|Shmem):' /proc/meminfo | tr -s ' ' | tr '\\n' ' ')"
""" if fill else ""
    what = (f"fill half of RAM in a tmpfs ({rand} MiB random + {text} MiB of one\n# repeating text line), then "
            if fill else "")
    return f"""#!/bin/sh
# bench/snapshot: {what}print a tick every {int(TICK_S * 1000)} ms without forking.
set -e
{fill_lines}mkfifo /run/bench-tick
(
    exec 3<>/run/bench-tick
    i=0
    while :; do
        i=$((i + 1))
        echo "bench-tick $i"
        read -t {TICK_S} -u 3 _ || :
    done
) </dev/null >/dev/console 2>&1 &
"""


# ---------------------------------------------------------------- small helpers


def proc_status(pid, field):
    """A `kB` field of /proc/PID/status in bytes, or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """(user + system, children's user + system) CPU seconds of a process; (0, 0) if it is gone."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0, 0.0
    return (int(f[11]) + int(f[12])) / CLK_TCK, (int(f[13]) + int(f[14])) / CLK_TCK


def reset_hwm(pid):
    """Resets VmHWM to the current RSS (Linux >= 4.0, needs ptrace rights: root)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def children(pid):
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        for c in children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settle():
    """Before each timed operation: no dirty data left from the one before (sync), a moment of quiet."""
    os.sync()
    time.sleep(0.2)


def copy_and_hash(src, dst):
    """Reference for hatch's fetch: copy `src` to `dst` with SHA-256, 1 MiB reads; seconds (dst removed)."""
    t0 = now()
    h = hashlib.sha256()
    with open(src, "rb", buffering=0) as fi, open(dst, "wb", buffering=0) as fo:
        while True:
            chunk = fi.read(MiB)
            if not chunk:
                break
            h.update(chunk)
            fo.write(chunk)
    h.hexdigest()
    t = now() - t0
    os.unlink(dst)
    return t


def du(path):
    """Bytes allocated under path (files only)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def store_walk(root):
    """The regular files of a store's directory, staging files (`#` in the name) left out:
    {path: (size, (dev, inode), mtime_ns)}. It looks only from outside, so it reads whole objects
    and content-addressed chunks alike, in the local store or in s3s-fs's bucket directory."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if "#" in name:
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # removed while we walked
                continue
            if stat.S_ISREG(st.st_mode):
                out[os.path.relpath(path, root)] = (st.st_size, (st.st_dev, st.st_ino), st.st_mtime_ns)
    return out


def store_total(walk):
    """(bytes, files) a walk holds; a file with several names (a hard-linked copy) counts once."""
    seen = {}
    for size, inode, _ in walk.values():
        seen[inode] = size
    return sum(seen.values()), len(seen)


def new_files(before, after):
    """The files of walk `after` that were not in walk `before`, new or written since: {inode: (path, size)}."""
    old = {v[1] for v in before.values()}
    seen = {}
    for path, (size, inode, mtime) in after.items():
        was = before.get(path)
        if was == (size, inode, mtime):
            continue  # untouched
        if was is None and inode in old:
            continue  # a new name for bytes that were already there
        seen[inode] = (path, size)
    return seen


def store_new(before, after):
    """(bytes, files) in `after` that were not in `before`: new files, or ones written since. Unlike
    the change of the total, a removal in between (another snapshot's data collected) hides none."""
    seen = new_files(before, after)
    return sum(size for _, size in seen.values()), len(seen)


class S3sFs:
    """Part 8's S3-compatible server, run as src/snapshot/testing.rs runs it for the tests: one bucket
    in the run's temp dir, on 127.0.0.1 of the bench's namespace with a port the kernel picks."""

    BUCKET = "hatch-bench"
    ACCESS_KEY = "hatch-bench-access"
    SECRET_KEY = "hatch-bench-secret"

    def __init__(self, binary, workdir):
        self.bin = binary
        self.dir = Path(workdir)
        self.root = self.dir / "root"
        self.bucket_dir = self.root / self.BUCKET  # s3s-fs serves each directory of its root as a bucket
        self.log_path = self.dir / "s3s-fs.log"
        self.proc = None
        self.endpoint = None
        self.version = None

    def start(self):
        self.bucket_dir.mkdir(parents=True)
        try:
            out = subprocess.run([self.bin, "--version"], capture_output=True, text=True, timeout=20)
            self.version = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
        logf = open(self.log_path, "ab")
        # Own process group, like the daemon: a Ctrl-C reaches only the script, which stops it.
        self.proc = subprocess.Popen(
            [self.bin, "--host", "127.0.0.1", "--port", "0", "--access-key", self.ACCESS_KEY,
             "--secret-key", self.SECRET_KEY, str(self.root)],
            env={**os.environ, "RUST_LOG": "s3s_fs=info"}, stdin=subprocess.DEVNULL, stdout=logf,
            stderr=logf, process_group=0,
        )
        logf.close()
        deadline = now() + 20
        while True:
            text = ANSI.sub("", self.log_path.read_text(errors="replace"))
            # Its start-up line is how we learn the port it was given.
            m = re.search(r"server is running at http://(\S+)", text)
            if m:
                if not m.group(1).startswith("127.0.0.1:"):
                    raise BenchError(f"s3s-fs bound {m.group(1)}, not loopback")
                self.endpoint = f"http://{m.group(1)}"
                log(f"s3s-fs pid {self.proc.pid} at {self.endpoint}, bucket in {self.bucket_dir}")
                return
            if self.proc.poll() is not None:
                raise BenchError(f"s3s-fs exited ({self.proc.returncode}) before listening:\n{text[-2000:]}")
            if now() > deadline:
                raise BenchError(f"s3s-fs did not report its address within 20 s:\n{text[-2000:]}")
            time.sleep(0.02)

    def env(self):
        """The daemon's settings for this server (src/config.rs)."""
        return {"HATCH_S3_BUCKET": self.BUCKET, "HATCH_S3_ENDPOINT": self.endpoint,
                "HATCH_S3_ACCESS_KEY": self.ACCESS_KEY, "HATCH_S3_SECRET_KEY": self.SECRET_KEY}

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                log(f"s3s-fs {self.proc.pid} did not exit after SIGKILL")


ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z\s+(\w+)\s+([\w:]+): (.*)$")


def log_events(path, offset, wall0):
    """The daemon's log lines written after byte `offset`: [(label, seconds after wall0)].

    The label is the message, plus `-> STATE` for a state change."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        m = LOG_LINE.match(ANSI.sub("", line))
        if not m:
            continue
        frac = (m.group(2) or ".0")[:7]
        ts = datetime.datetime.fromisoformat(m.group(1) + frac + "+00:00").timestamp()
        rest = m.group(5)
        msg = re.split(r" \w+=", rest, maxsplit=1)[0].strip()
        to = re.search(r"\bto=(\w+)", rest)
        out.append((f"{msg} -> {to.group(1)}" if to else msg, ts - wall0))
    return out


def log_size(path):
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


class Console:
    """Follows a console.log from an offset, looking for a pattern in what is new."""

    def __init__(self, path, offset=0):
        self.path = path
        self.offset = offset
        self.f = None
        self.buf = bytearray()

    def read(self):
        if self.f is None:
            try:
                self.f = open(self.path, "rb", buffering=0)
            except FileNotFoundError:
                return
            self.f.seek(self.offset)
        chunk = self.f.readall()
        if chunk:
            self.buf += chunk

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None

    def tick(self):
        """The first complete tick line in the new bytes, or None."""
        m = TICK_RE.search(self.buf)
        return int(m.group(1)) if m else None

    def last_tick(self):
        ticks = TICK_RE.findall(self.buf)
        return int(ticks[-1]) if ticks else None

    def tail(self, n=1500):
        return bytes(self.buf[-n:]).decode(errors="replace")


def console_size(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


class Watcher(threading.Thread):
    """Polls `checks` (name -> callable, true once) every 2 ms and samples processes' VmRSS.

    marks[name] = seconds after t0 at which the check first held; cpu[name] = the CPU time
    (user + system, seconds) the first of `rss_pids` had used by then.
    """

    def __init__(self, t0, checks, rss_pids=None):
        super().__init__(daemon=True)
        self.t0 = t0
        self.checks = dict(checks)
        self.rss_pids = dict(rss_pids or {})
        self.cpu_pid = next(iter(self.rss_pids.values()), None)
        self.cpu0 = cpu_seconds(self.cpu_pid)[0] if self.cpu_pid else None
        self.cpu = {}
        self.marks = {}
        self.rss_max = {k: 0 for k in self.rss_pids}
        self.samples = 0
        self.error = None
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def run(self):
        try:
            while not self.halt.is_set():
                t = now() - self.t0
                for name, fn in list(self.checks.items()):
                    if name not in self.marks and fn():
                        with self.lock:
                            self.marks[name] = t
                        if self.cpu_pid:
                            self.cpu[name] = cpu_seconds(self.cpu_pid)[0] - self.cpu0
                for k, pid in self.rss_pids.items():
                    r = proc_status(pid, "VmRSS")
                    if r is not None and r > self.rss_max[k]:
                        self.rss_max[k] = r
                self.samples += 1
                time.sleep(POLL_S)
        except Exception as e:  # reported by the caller
            self.error = e

    def wait_for(self, name, deadline, alive=None):
        while True:
            if self.error is not None:
                raise BenchError(f"watcher failed: {self.error!r}")
            with self.lock:
                if name in self.marks:
                    return self.marks[name]
            if alive is not None:
                alive()
            if now() > deadline:
                raise BenchError(f"timed out waiting for {name}")
            time.sleep(POLL_S)

    def stop(self):
        self.halt.set()
        self.join(5)
        if self.error is not None:
            raise BenchError(f"watcher failed: {self.error!r}")


# ---------------------------------------------------------------- the benchmark


class Guest:
    """Per size: the hatch VM, the raw QEMU running the same command line, what was seen of both."""

    def __init__(self, mem_mib):
        self.mem = mem_mib
        self.vm_id = None
        self.work = None  # the hatch VM's work dir
        self.cmdline = None
        self.raw_dir = None
        self.raw_proc = None
        self.raw_args = None
        self.facts = {}
        self.hatch_snap, self.hatch_restore = [], []
        self.raw_snap, self.raw_restore = [], []
        self.compress = {name: [] for name, _ in ALGORITHMS}
        self.key = None  # its owner's API key; None: the daemon's first owner
        self.standby = None  # the snapshot the hatch VM stands by on while it sleeps (part 5)
        self.confine = {"on": [], "off": []}  # part 5: {"round", "snapshot", "restore"} per run
        self.confine_proc = {}  # mode -> what /proc showed of its QEMU


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(os.environ["HATCH_BENCH_TMP"])
        self.hatch = os.environ["HATCH_BENCH_BIN"]
        self.image = Path(os.environ["HATCH_BENCH_IMAGE"])
        self.hatchd = Daemon(self.tmp, self.hatch, self.image)  # the one running (part 8 switches)
        # Hot copies (issue 16) only with --hot: every other hatch restore reads the store.
        self.daemon_env = {"HATCH_HOT_SLEEP_SECONDS": "600" if args.hot else "0"}
        self.daemons = [self.hatchd]  # every daemon this run made, for the clean-up
        self.s3 = None  # part 8's s3s-fs
        self.raw_procs = {}  # pid -> Popen
        self.cmdline = None  # the first hatch VM's QEMU command line (for the QEMU facts)
        self.part_busy = {}  # part 6-8 name -> host cores busy while it ran
        self.part_others = {}  # part 6-8 name -> [other QEMU pids seen, most at once]
        self.current_part = None
        self.sleeps = []  # part 6: one dict per size
        self.fresh = []  # part 7: one dict per size and fill
        self.stores = {}  # part 8: mode -> [Guest]; each Guest's runs in g.store_runs
        self.store_skipped = None  # part 8: why it did not run
        self.guests = []
        self.others_seen = set()
        self.others_max = 0
        self.quiet = {}
        self.load_before = None
        self.busy = None
        self.confine_busy = None
        self.confine_others = set()
        self.confine_others_max = 0

    @property
    def key(self):
        return self.hatchd.key

    @property
    def data(self):
        return self.hatchd.data

    @property
    def vms_dir(self):
        return self.hatchd.vms_dir

    @property
    def objects(self):
        """The running daemon's local object store (empty when it stores to S3)."""
        return self.hatchd.data / "objects"

    @property
    def dpid(self):
        return self.hatchd.proc.pid

    def api(self, method, path, body=None, expect=(200,), timeout=OP_TIMEOUT_S, key=None):
        status, raw = one_request(key or self.key, method, path, body, timeout=timeout)
        if status not in expect:
            raise BenchError(f"{method} {path}: {status} {raw[:500]!r}\n{self.hatchd.tail()}")
        return json.loads(raw) if raw else None

    def sample_others(self):
        pids = other_qemu_pids(self.tmp)
        self.others_seen |= pids
        self.others_max = max(self.others_max, len(pids))
        if self.current_part:
            seen = self.part_others.setdefault(self.current_part, [set(), 0])
            seen[0] |= pids
            seen[1] = max(seen[1], len(pids))

    def wait_quiet(self):
        """Waits (bounded, polling) until no QEMU but ours runs on the host."""
        limit = self.args.wait_quiet
        t0 = now()
        others = other_qemu_pids(self.tmp)
        last_log = -30.0
        while others and now() - t0 < limit:
            if now() - t0 - last_log >= 30:
                last_log = now() - t0
                log(f"waiting for {len(others)} other QEMU(s) to finish (pids {sorted(others)}), "
                    f"{limit - last_log:.0f}s left")
            time.sleep(5)
            others = other_qemu_pids(self.tmp)
        self.quiet = {"waited": now() - t0, "left": len(others), "limit": limit}
        if others:
            log(f"still {len(others)} other QEMU(s) after {limit}s; measuring anyway (recorded)")
        else:
            log(f"no other QEMU running (waited {self.quiet['waited']:.0f}s)")

    # ------------------------------------------------------------ guests

    def wait_console(self, path, offset, what, pred, timeout, alive):
        con = Console(path, offset)
        deadline = now() + timeout
        try:
            while True:
                con.read()
                if pred(con):
                    return con
                alive()
                if now() > deadline:
                    raise BenchError(f"no {what} within {timeout:.0f}s; console tail:\n{con.tail()}")
                time.sleep(0.05)
        finally:
            con.close()

    def wait_filled(self, path, alive, who, fill=True):
        t0 = now()
        con = self.wait_console(path, 0, "fill line, ready line and ticks" if fill else "ready line and ticks",
                                lambda c: READY in c.buf and (FILLED in c.buf or not fill)
                                and (c.last_tick() or 0) >= 3,
                                FILL_TIMEOUT_S, alive)
        text = con.buf.decode(errors="replace")
        fill_line = next(line for line in text.splitlines() if FILLED.decode() in line).strip() if fill else "no fill"
        ready = next(line for line in text.splitlines() if READY.decode() in line).strip()
        log(f"  {who}: {'filled and ' if fill else ''}ticking after {now() - t0:.1f}s: {fill_line}")
        return fill_line, ready

    def create_hatch_guest(self, g, fill=True):
        body = {"mem_mib": g.mem, "vcpu_count": 1, "enable_network": False, "user_data": user_data(g.mem, fill)}
        vm = self.api("POST", "/vms", body, expect=(201,), key=g.key)
        g.vm_id = vm["id"]
        self.hatchd.live_vms.add(g.vm_id)
        if g.key:
            self.hatchd.vm_keys[g.vm_id] = g.key
        g.work = self.vms_dir / g.vm_id

        def alive():
            if self.hatchd.vmm_pid(g.vm_id) is None:
                raise BenchError(f"hatch's QEMU for {g.vm_id} is gone:\n{self.hatchd.tail()}")

        g.facts["fill"], g.facts["ready"] = self.wait_filled(g.work / "console.log", alive, f"hatch {g.vm_id}",
                                                             fill)
        g.cmdline = self.hatchd.vmm_cmdline(g.vm_id)
        if not g.cmdline:
            raise BenchError(f"cannot read the QEMU command line of {g.vm_id}")
        if self.cmdline is None:
            self.cmdline = g.cmdline

    def raw_alive(self, g):
        p = g.raw_proc
        if p is None or p.poll() is not None:
            raise BenchError(f"raw QEMU exited: {(g.raw_dir / 'vmm.log').read_text(errors='replace')[-800:]}")

    def image_rootfs(self):
        db = sqlite3.connect(self.data / "hatch.db", timeout=30)
        try:
            (d,) = db.execute("SELECT dir FROM images WHERE id = 'img_default'").fetchone()
        finally:
            db.close()
        return Path(d) / "rootfs.ext4"

    def create_raw_guest(self, g):
        g.raw_dir = self.tmp / "raw" / f"m{g.mem}"
        g.raw_dir.mkdir(parents=True)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.image_rootfs()),
             str(g.raw_dir / "disk.qcow2")],
            check=True, timeout=60,
        )
        shutil.copyfile(g.work / "seed.iso", g.raw_dir / "seed.iso")
        g.raw_args = raw_command_line(g.cmdline, str(g.work), str(g.raw_dir))
        leftover = [a for a in g.raw_args if str(self.vms_dir) in a]
        if leftover:
            raise BenchError(f"per-VM paths left in the raw command line: {leftover}")
        g.facts["rewritten"] = [a for a in g.cmdline if str(g.work) in a]
        self.spawn_raw(g, [])
        g.facts["raw_fill"], g.facts["raw_ready"] = self.wait_filled(
            g.raw_dir / "console.log", lambda: self.raw_alive(g), f"raw m{g.mem}")

    def spawn_raw(self, g, extra):
        for name in ("vmm.sock", "vmm.pid"):
            try:
                (g.raw_dir / name).unlink()
            except FileNotFoundError:
                pass
        logf = open(g.raw_dir / "vmm.log", "ab")
        p = subprocess.Popen(g.raw_args + extra, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                             process_group=0)
        logf.close()
        self.raw_procs[p.pid] = p
        g.raw_proc = p
        return p

    def kill_raw(self, p):
        if p.poll() is None:
            p.kill()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            log(f"raw QEMU {p.pid} did not exit after SIGKILL")
            return
        self.raw_procs.pop(p.pid, None)

    def raw_qmp(self, g, deadline):
        sock = g.raw_dir / "vmm.sock"
        while True:
            self.raw_alive(g)
            if sock.exists():
                try:
                    return Qmp(sock, OP_TIMEOUT_S)
                except (OSError, BenchError):
                    pass
            if now() > deadline:
                raise BenchError("raw QEMU's QMP socket did not answer")
            time.sleep(POLL_S)

    # ------------------------------------------------------------ hatch: snapshot and restore

    def hatch_snapshot(self, g, path="/vms/{id}/snapshot", body=None, fsync_after=True, store=None):
        """One snapshot through the API with the work dir and the store watched; returns (record, marks).

        marks["t_response"] is the monotonic time of the response; with `fsync_after`, every stored
        object is fsynced after it (timed separately). With `store` (a store's directory), that
        directory is walked right before the request and right after the 201: marks["store_new"]
        is (bytes, files) new or changed between the two, marks["store_growth"] the change of its total."""
        work = g.work
        qemu = self.hatchd.vmm_pid(g.vm_id)
        if qemu is None:
            raise BenchError(f"{g.vm_id} has no running QEMU before the snapshot")
        found = {}

        def capture_dir():
            for e in os.scandir(work):
                if e.name.startswith("capture-"):
                    found["dir"] = Path(e.path)
                    found["snap"] = e.name[len("capture-"):]
                    return True
            return False

        def obj(part):
            return lambda: "snap" in found and (
                self.objects / "snapshots" / g.vm_id / found["snap"] / part).exists()

        def memory_in_capture_dir():
            # A FIFO when hatch streams the migration into the store, a file when QEMU writes one first.
            try:
                st = os.stat(found["dir"] / "memory") if "dir" in found else None
            except FileNotFoundError:
                return False
            if st is None:
                return False
            found["fifo"] = stat.S_ISFIFO(st.st_mode)
            return True

        checks = {
            "capture dir": capture_dir,
            "memory in capture dir": memory_in_capture_dir,
            "saved (vmstate written)": lambda: "dir" in found and (found["dir"] / "vmstate").exists(),
            "vmstate stored": obj("vmstate"),
            "memory stored": obj("memory"),
            "disk stored": obj("disk"),
            "capture dir removed": lambda: "dir" in found and not found["dir"].exists(),
            "QEMU gone": lambda: not pid_alive(qemu),
        }
        settle()
        reset_hwm(self.dpid)
        hwm0 = proc_status(self.dpid, "VmHWM")
        log_off = log_size(self.hatchd.log_path)
        # With `fsync_after` the store is walked too: a chunked snapshot has no directory of its own to fsync.
        watched = store if store is not None else self.objects if fsync_after else None
        walk0 = store_walk(watched) if watched is not None else None
        t0, wall0 = now(), time.time()
        w = Watcher(t0, checks, {"daemon": self.dpid})
        w.start()
        try:
            snap = self.api("POST", path.format(id=g.vm_id), body, expect=(201,), key=g.key)
            t_response = now()
        finally:
            w.stop()
        marks = dict(w.marks)
        if walk0 is not None:
            walk1 = store_walk(watched)
            marks["store_new"] = store_new(walk0, walk1)
            marks["store_growth"] = store_total(walk1)[0] - store_total(walk0)[0]
        marks["response"] = t_response - t0
        marks["t_response"] = t_response
        marks["rss_max"] = w.rss_max["daemon"]
        marks["hwm"] = proc_status(self.dpid, "VmHWM")
        marks["hwm_before"] = hwm0
        marks["log"] = log_events(self.hatchd.log_path, log_off, wall0)
        marks["fifo"] = found.get("fifo")
        marks["daemon_cpu"] = dict(w.cpu)
        marks["daemon_cpu"]["end"] = cpu_seconds(self.dpid)[0] - w.cpu0
        # How far from durable the store was when the 201 came: fsync every object now.
        sdir = self.objects / "snapshots" / g.vm_id / snap["id"]
        marks["objects"] = {}
        # Not there when the daemon stores to S3 (part 8); other layouts may keep none per snapshot.
        for f in sorted(sdir.iterdir()) if sdir.is_dir() else []:
            try:
                marks["objects"][f.name] = f.stat().st_size
            except FileNotFoundError:  # the raw memory object goes once compressed
                pass
        if fsync_after:
            if sdir.is_dir():
                files = sorted(sdir.iterdir())
            else:  # chunks: the files the snapshot added to the store
                files = sorted(watched / path for path, _ in new_files(walk0, walk1).values())
            t1 = now()
            for f in files:
                fsync_path(f)
            for d in sorted({f.parent for f in files} | ({sdir} if sdir.is_dir() else set())):
                fsync_path(d)
            marks["fsync_after"] = now() - t1
            # The reference copy needs one whole memory object.
            marks["ref_copy"] = (copy_and_hash(sdir / "memory", self.tmp / "ref-copy")
                                 if (sdir / "memory").is_file() else None)
        return snap, marks

    def hatch_restore(self, g):
        """POST /vms/{id}/restore -> first new tick line; returns marks."""
        work = g.work
        con_path = work / "console.log"
        con = Console(con_path, console_size(con_path))
        disk_ino = os.stat(work / "disk.qcow2").st_ino
        def sock_id():
            st = os.stat(work / "vmm.sock")
            return st.st_ino, st.st_ctime_ns

        try:
            sock_before = sock_id()
        except FileNotFoundError:
            sock_before = None
        old_pid = (work / "vmm.pid").read_text().strip() if (work / "vmm.pid").exists() else None
        found = {}

        def restore_dir():
            for e in os.scandir(work):
                if e.name.startswith("restore-"):
                    found["dir"] = Path(e.path)
                    return True
            return False

        def new_pid():
            try:
                pid = (work / "vmm.pid").read_text().strip()
            except OSError:
                return False
            return bool(pid) and pid != old_pid and pid_alive(pid)

        def disk_replaced():
            try:
                return os.stat(work / "disk.qcow2").st_ino != disk_ino
            except FileNotFoundError:
                return False

        def new_socket():
            try:
                return sock_id() != sock_before
            except FileNotFoundError:
                return False

        def memory_in_restore_dir():
            # A FIFO the daemon feeds from the store, or a file fetched whole (it appears once complete).
            try:
                st = os.stat(found["dir"] / "memory") if "dir" in found else None
            except FileNotFoundError:
                return False
            if st is None:
                return False
            found["fifo"] = stat.S_ISFIFO(st.st_mode)
            return True

        def tick():
            con.read()
            return con.tick() is not None

        checks = {
            "restore dir": restore_dir,
            "QMP socket made": new_socket,
            "vmstate fetched": lambda: "dir" in found and (found["dir"] / "vmstate").exists(),
            "memory in restore dir": memory_in_restore_dir,
            "disk in place": disk_replaced,
            "QEMU started (pid file)": new_pid,
            "restore dir removed (resumed)": lambda: "dir" in found and not found["dir"].exists(),
            "tick": tick,
        }
        settle()
        reset_hwm(self.dpid)
        log_off = log_size(self.hatchd.log_path)
        t0, wall0 = now(), time.time()
        w = Watcher(t0, checks, {"daemon": self.dpid})
        w.start()
        try:
            self.api("POST", f"/vms/{g.vm_id}/restore", None, expect=(200,), key=g.key)
            t = now() - t0
            w.wait_for("tick", now() + 60)
        finally:
            w.stop()
            con.close()
        marks = dict(w.marks)
        marks["response"] = t
        marks["rss_max"] = w.rss_max["daemon"]
        marks["hwm"] = proc_status(self.dpid, "VmHWM")
        marks["first_tick"] = con.tick()
        marks["log"] = log_events(self.hatchd.log_path, log_off, wall0)
        marks["daemon_cpu"] = dict(w.cpu)
        marks["daemon_cpu"]["end"] = cpu_seconds(self.dpid)[0] - w.cpu0
        marks["qemu_cpu"] = cpu_seconds(self.hatchd.vmm_pid(g.vm_id) or 0)
        marks["fifo"] = found.get("fifo")
        return marks

    # ------------------------------------------------------------ raw QEMU: snapshot and restore

    def raw_snapshot(self, g, i):
        out = g.raw_dir / f"snap-{i:03d}.mig"
        p = g.raw_proc
        q = self.raw_qmp(g, now() + 30)  # connected before the clock, as a script driving QEMU would be
        marks = {}
        try:
            settle()
            t0 = now()
            q.execute("stop")
            marks["stopped"] = now() - t0
            q.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
            q.execute("migrate", {"uri": f"exec:cat > '{out}'"})
            while True:
                st = q.execute("query-migrate")
                status = st.get("status", "")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise BenchError(f"raw migrate {status}: {st.get('error-desc')}")
                if now() - t0 > OP_TIMEOUT_S:
                    raise BenchError("raw migrate did not complete")
                time.sleep(POLL_S)
            marks["completed"] = now() - t0
            # query-migrate says completed before QEMU's cleanup closed the pipe to `cat`:
            # the file is whole only once that child is gone.
            while descendants(p.pid):
                if now() - t0 > OP_TIMEOUT_S:
                    raise BenchError("the migration's cat did not exit")
                time.sleep(POLL_S)
            marks["writer exited"] = now() - t0
            fsync_path(out)
            fsync_path(out.parent)
            marks["response"] = now() - t0
            marks["stats"] = {k: st.get("ram", {}).get(k) for k in ("transferred", "normal", "duplicate",
                                                                      "total", "mbps")}
            marks["total-time"] = st.get("total-time")
        finally:
            q.close()
        marks["file"] = out.stat().st_size
        self.kill_raw(p)
        return out, marks

    def raw_restore(self, g, snap_file):
        con_path = g.raw_dir / "console.log"
        con = Console(con_path, console_size(con_path))
        marks = {}
        settle()
        t0 = now()
        try:
            self.spawn_raw(g, ["-incoming", f"exec:cat '{snap_file}'"])
            q = self.raw_qmp(g, t0 + 60)
            marks["QMP up"] = now() - t0
            try:
                while True:
                    status = q.execute("query-status").get("status")
                    if status == "paused":
                        break
                    if status not in ("inmigrate", "prelaunch"):
                        raise BenchError(f"raw restore: QEMU is {status!r}, expected paused")
                    if now() - t0 > OP_TIMEOUT_S:
                        raise BenchError("raw restore did not load")
                    time.sleep(POLL_S)
                marks["loaded (paused)"] = now() - t0
                q.execute("cont")
                marks["cont"] = now() - t0
            finally:
                q.close()
            deadline = now() + 60
            while True:
                con.read()
                if con.tick() is not None:
                    marks["tick"] = now() - t0
                    marks["qemu_cpu"] = cpu_seconds(g.raw_proc.pid)
                    break
                self.raw_alive(g)
                if now() > deadline:
                    raise BenchError(f"raw guest did not tick after restore:\n{con.tail()}")
                time.sleep(POLL_S)
        finally:
            con.close()
        marks["first_tick"] = con.tick()
        snap_file.unlink()
        return marks

    # ------------------------------------------------------------ runs

    def snapshot_runs(self, g):
        for i in range(self.args.runs):
            self.sample_others()
            order = ("hatch", "raw") if i % 2 == 0 else ("raw", "hatch")
            for which in order:
                if which == "hatch":
                    snap, s = self.hatch_snapshot(g)
                    # The guest is saved and its QEMU gone: the console ends where it stopped.
                    last = Console(g.work / "console.log")
                    last.read()
                    last.close()
                    s["last_tick"] = last.last_tick()
                    r = self.hatch_restore(g)
                    s["size_bytes"] = snap["size_bytes"]
                    self.api("DELETE", f"/snapshots/{snap['id']}")
                    g.hatch_snap.append(s)
                    g.hatch_restore.append(r)
                    log(f"  m{g.mem} run {i + 1}/{self.args.runs} hatch: snapshot {s['response']:.3f}s "
                        f"(+{ms(s['fsync_after']):.0f} ms fsync after), {snap['size_bytes'] / MiB:.0f} MiB stored, "
                        f"daemon HWM {s['hwm'] / MiB:.1f} MiB; restore {r['response']:.3f}s, tick "
                        f"{r['tick']:.3f}s (tick {s['last_tick']} -> {r['first_tick']})")
                else:
                    f, s = self.raw_snapshot(g, i)
                    r = self.raw_restore(g, f)
                    g.raw_snap.append(s)
                    g.raw_restore.append(r)
                    log(f"  m{g.mem} run {i + 1}/{self.args.runs} raw:   snapshot {s['response']:.3f}s "
                        f"({s['file'] / MiB:.0f} MiB file); restore {r['tick']:.3f}s")

    def compression_runs(self, g):
        for name, comp in ALGORITHMS:
            for i in range(self.args.runs):
                self.sample_others()
                # A Hypeman Standby snapshot is a checkpoint (the VM runs on): the
                # VM's own default with the Hatch snapshot puts it to sleep instead,
                # so the restore below has something to wake.
                self.api("PATCH", f"/vms/{g.vm_id}", {"snapshot_compression": comp})
                snap, s = self.hatch_snapshot(g, fsync_after=False)
                sid = snap["id"]
                rec = snap
                # Compression starts in the background when the 201 is sent: the clock starts there.
                t0 = s["t_response"]
                reset_hwm(self.dpid)
                w = Watcher(t0, {}, {"daemon": self.dpid})
                w.start()
                try:
                    while rec.get("compression_state") == "compressing":
                        if now() - t0 > OP_TIMEOUT_S:
                            raise BenchError(f"{sid} still compressing after {OP_TIMEOUT_S:.0f}s")
                        time.sleep(COMPRESS_POLL_S)
                        rec = self.api("GET", f"/snapshots/{sid}")
                finally:
                    w.stop()
                compress_s = now() - t0 if snap.get("compression_state") == "compressing" else None
                if rec.get("compression_state") not in ("none", "compressed"):
                    raise BenchError(f"{sid}: compression ended {rec.get('compression_state')}: "
                                     f"{rec.get('compression_error')}")
                r = self.hatch_restore(g)
                self.api("DELETE", f"/snapshots/{sid}")
                self.api("PATCH", f"/vms/{g.vm_id}", {"snapshot_compression": None})
                row = {
                    "snapshot": s["response"],
                    "compress": compress_s,
                    "state": rec.get("compression_state"),
                    "size_bytes": rec.get("size_bytes"),
                    "uncompressed": rec.get("uncompressed_size_bytes"),
                    "compressed": rec.get("compressed_size_bytes"),
                    "initial_size": snap.get("size_bytes"),
                    "hwm_snapshot": s["hwm"],
                    "hwm_compress": proc_status(self.dpid, "VmHWM") if compress_s else None,
                    "rss_compress": w.rss_max["daemon"] if compress_s else None,
                    "restore": r["tick"],
                    "restore_cpu": r["daemon_cpu"]["end"],
                    "restore_response": r["response"],
                    "hwm_restore": r["hwm"],
                    "objects": s["objects"],
                }
                g.compress[name].append(row)
                log(f"  m{g.mem} {name} run {i + 1}/{self.args.runs}: snapshot {s['response']:.3f}s, "
                    + (f"compressed in {compress_s:.3f}s, " if compress_s else "")
                    + f"stored {row['size_bytes'] / MiB:.1f} MiB (memory {row['uncompressed'] / MiB:.1f}"
                    + (f" -> {row['compressed'] / MiB:.1f}" if row["compressed"] else "")
                    + f" MiB); restore -> tick {r['tick']:.3f}s")

    # ------------------------------------------------------------ 5. VMM confinement on vs off

    def sleep_guest(self, g):
        """An uncounted snapshot: the hatch VM stands by on it, its QEMU gone (survives a daemon restart)."""
        g.standby = self.api("POST", f"/vms/{g.vm_id}/snapshot", None, expect=(201,), key=g.key)["id"]

    def wake_guest(self, g):
        """An uncounted restore from the standby snapshot, which is then deleted."""
        self.api("POST", f"/vms/{g.vm_id}/restore", None, expect=(200,), key=g.key)
        self.api("DELETE", f"/snapshots/{g.standby}", key=g.key)
        g.standby = None

    def vmm_proc(self, g, mode):
        """What /proc shows of the VM's QEMU; raises unless it matches HATCH_VMM_CONFINE=`mode`
        (on: a non-zero uid, no effective capabilities, a seccomp filter; off: root, no filter)."""
        pid = self.hatchd.vmm_pid(g.vm_id)
        if pid is None:
            raise BenchError(f"{g.vm_id} has no running QEMU")
        fields = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            fields[k] = v.split()
        seen = {"uid": int(fields["Uid"][1]), "seccomp": int(fields["Seccomp"][0]),
                "cap_eff": fields["CapEff"][0]}
        confined = seen["uid"] != 0 and seen["seccomp"] == 2 and int(seen["cap_eff"], 16) == 0
        if confined != (mode == "on"):
            raise BenchError(f"HATCH_VMM_CONFINE={mode}, but QEMU {pid} shows {seen}")
        return seen

    def confine_runs(self, g):
        """hatch snapshot + restore of the same sleeping guest under a daemon with HATCH_VMM_CONFINE=on
        and one with off: the daemon restarted on the same data dir for every block of runs, blocks
        alternating on/off (the order swapping every round) so drift in host load hits both alike.
        Each block wakes the guest first (uncounted, as bench/boot leaves each daemon's first boot out)
        and puts it back to sleep at the end, for the next daemon to wake."""
        rounds, per = self.args.confine_rounds, self.args.confine_runs
        for r in range(rounds):
            for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                pids = other_qemu_pids(self.tmp)
                self.confine_others |= pids
                self.confine_others_max = max(self.confine_others_max, len(pids))
                self.hatchd.restart({**self.daemon_env, "HATCH_VMM_CONFINE": mode})
                self.wake_guest(g)
                g.confine_proc[mode] = self.vmm_proc(g, mode)
                for i in range(per):
                    snap, s = self.hatch_snapshot(g, fsync_after=False)
                    s["size_bytes"] = snap["size_bytes"]
                    rs = self.hatch_restore(g)
                    self.api("DELETE", f"/snapshots/{snap['id']}")
                    self.vmm_proc(g, mode)  # the restored QEMU is confined (or not) like the first
                    g.confine[mode].append({"round": r, "snapshot": s, "restore": rs})
                    log(f"  m{g.mem} confinement {mode:3} round {r + 1}/{rounds} run {i + 1}/{per}: snapshot "
                        f"{s['response']:.3f}s, restore {rs['response']:.3f}s (QEMU started "
                        f"{f0(rs.get('QEMU started (pid file)'))} ms, resumed "
                        f"{f0(rs.get('restore dir removed (resumed)'))} ms), tick {rs['tick']:.3f}s")
                self.sleep_guest(g)

    # ------------------------------------------------------------ 6-8. what the store holds

    def part(self, name, body):
        """Runs one of parts 6-8 with the host's CPU use and other QEMUs recorded for it."""
        self.current_part = name
        busy = CpuBusy().start()
        try:
            body()
        finally:
            busy.stop()
            self.part_busy[name] = busy.cores
            self.sample_others()
            self.current_part = None

    def sleeps_part(self, mem):
        """Part 6: one guest, half filled, snapshotted and restored --sleeps times in a row, every
        snapshot kept until the end; what each snapshot added to the store. The guest belongs to an
        owner of its own so that nothing stored before (the store may share data within an owner)
        makes its first snapshot look cheaper."""
        n = self.args.sleeps
        g = Guest(mem)
        g.key = self.hatchd.add_owner(f"bench-sleeps-{mem}")
        log(f"guest {mem} MiB: repeated sleep, booting a new owner's VM and filling {mem // 2} MiB")
        self.create_hatch_guest(g)
        store = self.objects
        before = store_walk(store)
        runs = []
        for k in range(n):
            self.sample_others()
            snap, s = self.hatch_snapshot(g, fsync_after=False, store=store)
            r = self.hatch_restore(g)
            runs.append({"snapshot": s["response"], "new": s["store_new"], "growth": s["store_growth"],
                         "size_bytes": snap["size_bytes"], "tick": r["tick"]})
            log(f"  m{mem} sleep {k + 1}/{n}: snapshot {s['response']:.3f}s stored "
                f"{s['store_new'][0] / MiB:.1f} MiB in {s['store_new'][1]} new file(s) "
                f"({s['store_new'][0] / (mem * MiB):.3f} of RAM); restore -> tick {r['tick']:.3f}s")
        held = store_new(before, store_walk(store))
        self.hatchd.delete_vm(g.vm_id)  # with its snapshots
        left = store_new(before, store_walk(store))
        self.sleeps.append({"mem": mem, "fill": g.facts["fill"], "runs": runs, "held": held, "left": left})

    def fresh_part(self, mem, fill):
        """Part 7: --fresh-vms VMs of the default image, one after another (one QEMU at a time), each
        snapshotted once when it ticks and left asleep; what the store holds for all against the
        first alone. An owner of their own per size and fill, as in part 6."""
        n = self.args.fresh_vms
        what = "half filled" if fill else "idle"
        key = self.hatchd.add_owner(f"bench-fresh-{mem}-{'filled' if fill else 'idle'}")
        log(f"guest {mem} MiB: {n} fresh VMs, {what}, one snapshot each")
        store = self.objects
        before = store_walk(store)
        row = {"mem": mem, "fill": fill, "vms": [], "fills": []}
        guests = []
        for i in range(n):
            self.sample_others()
            g = Guest(mem)
            g.key = key
            self.create_hatch_guest(g, fill=fill)
            guests.append(g)
            snap, s = self.hatch_snapshot(g, fsync_after=False, store=store)
            row["vms"].append({"snapshot": s["response"], "new": s["store_new"], "size_bytes": snap["size_bytes"]})
            row["fills"].append(g.facts["fill"])
            log(f"  m{mem} {what} VM {i + 1}/{n}: snapshot {s['response']:.3f}s stored "
                f"{s['store_new'][0] / MiB:.1f} MiB in {s['store_new'][1]} new file(s)")
        row["total"] = store_new(before, store_walk(store))
        for g in guests:
            self.hatchd.delete_vm(g.vm_id)
        row["left"] = store_new(before, store_walk(store))
        self.fresh.append(row)

    def switch_daemon(self, d, extra_env=None):
        """Makes `d` the running daemon (one at a time: they share 127.0.0.1:8080); the one running
        before ends gracefully, its guests asleep."""
        if self.hatchd is d and d.proc is not None and d.proc.poll() is None:
            return
        self.hatchd.terminate()
        self.hatchd = d
        extra_env = {**self.daemon_env, **(extra_env or {})}
        if d.proc is None:
            d.start("bench-store", extra_env)
        else:
            d.spawn(d.env(extra_env))

    def store_part(self):
        """Part 8: hatch snapshot and restore of the same kind of guest with the local store and
        with s3s-fs. Each store has a daemon on its own data dir; one runs at a time, restarted for
        every block, blocks alternating between the stores with the order swapping every round."""
        self.s3 = S3sFs(os.environ["HATCH_BENCH_S3S_FS"], self.tmp / "s3s-fs")
        self.s3.start()
        main = self.hatchd
        remote = Daemon(self.tmp / "s3", self.hatch, self.image)
        self.daemons.append(remote)
        modes = {
            "local": {"daemon": main, "env": None, "store": main.data / "objects"},
            "s3s-fs": {"daemon": remote, "env": self.s3.env(), "store": self.s3.bucket_dir},
        }
        key = main.add_owner("bench-store-local")
        for mode, m in modes.items():
            self.switch_daemon(m["daemon"], m["env"])
            self.stores[mode] = []
            for mem in self.args.sizes:
                g = Guest(mem)
                g.key = key if mode == "local" else self.hatchd.key
                g.store_runs = []
                log(f"guest {mem} MiB for the {mode} store: booting, filling {mem // 2} MiB")
                self.create_hatch_guest(g)
                self.sleep_guest(g)  # one running guest at a time
                self.stores[mode].append(g)
        if not store_total(store_walk(self.s3.bucket_dir))[1]:
            raise BenchError("s3s-fs holds nothing after the guests' first snapshots: the daemon stored elsewhere")
        for r in range(self.args.runs):
            for mode in (("s3s-fs", "local") if r % 2 == 0 else ("local", "s3s-fs")):
                m = modes[mode]
                self.sample_others()
                self.switch_daemon(m["daemon"], m["env"])
                for g in self.stores[mode]:
                    self.wake_guest(g)
                    snap, s = self.hatch_snapshot(g, fsync_after=False, store=m["store"])
                    stray = store_total(store_walk(remote.data / "objects"))[1]
                    if stray:
                        raise BenchError(f"the daemon meant to store to s3s-fs has {stray} file(s) in its local "
                                         f"store ({remote.data / 'objects'})")
                    rs = self.hatch_restore(g)
                    self.api("DELETE", f"/snapshots/{snap['id']}", key=g.key)
                    g.store_runs.append({"round": r, "snapshot": s, "restore": rs})
                    log(f"  m{g.mem} {mode:7} round {r + 1}/{self.args.runs}: snapshot {s['response']:.3f}s "
                        f"({s['store_new'][0] / MiB:.1f} MiB in {s['store_new'][1]} file(s)), restore -> tick "
                        f"{rs['tick']:.3f}s")
                    self.sleep_guest(g)
        # Each daemon deletes its own VMs (s3s-fs still up for the remote one's); the main one runs last.
        order = ["local", "s3s-fs"] if self.hatchd is main else ["s3s-fs", "local"]
        for mode in order + ["local"]:
            m = modes[mode]
            self.switch_daemon(m["daemon"], m["env"])
            for g in self.stores[mode]:
                if g.vm_id in self.hatchd.live_vms:
                    self.hatchd.delete_vm(g.vm_id)
        self.s3.stop()

    def run(self):
        self.hatchd.start("bench", self.daemon_env)
        parts = self.args.parts
        only = "compare" not in parts  # parts 1-4 not measured: no raw QEMU
        confine = "confine" in parts
        for mem in self.args.sizes if not only or confine else []:
            g = Guest(mem)
            self.guests.append(g)
            if only:
                log(f"guest {mem} MiB: booting the hatch VM, filling {mem // 2} MiB")
                self.create_hatch_guest(g)
                # Asleep until its turn: one running guest at a time.
                self.sleep_guest(g)
            else:
                log(f"guest {mem} MiB: booting the hatch VM and the raw QEMU, each filling {mem // 2} MiB")
                self.create_hatch_guest(g)
                self.create_raw_guest(g)
        self.wait_quiet()
        self.load_before = os.getloadavg()[0]
        if not only:
            busy = CpuBusy().start()
            for g in self.guests:
                log(f"guest {g.mem} MiB: snapshot + restore, hatch and raw interleaved, {self.args.runs} runs each")
                self.snapshot_runs(g)
                self.kill_raw(g.raw_proc)  # not needed any more: one fewer busy guest for the rest
                if not self.args.no_compression:
                    log(f"guest {g.mem} MiB: compression none / lz4 / zstd through the Hypeman API")
                    self.compression_runs(g)
                g.facts["data_dir_bytes"] = du(self.data)
                if confine:
                    self.sleep_guest(g)  # kept for part 5, not running meanwhile
                else:
                    self.hatchd.delete_vm(g.vm_id)
            busy.stop()
            self.busy = busy.cores
        # Parts 6-8 before part 5, which leaves the daemon with HATCH_VMM_CONFINE set.
        if "sleeps" in parts:
            self.part("sleeps", lambda: [self.sleeps_part(mem) for mem in self.args.sizes])
        if "fresh" in parts:
            self.part("fresh", lambda: [self.fresh_part(mem, fill) for mem in self.args.sizes
                                        for fill in (False, True)])
        if "s3" in parts:
            self.part("s3", self.store_part)
        if confine:
            busy = CpuBusy().start()
            for g in self.guests:
                log(f"guest {g.mem} MiB: VMM confinement on vs off, {self.args.confine_rounds} round(s) of "
                    f"{self.args.confine_runs} snapshot + restore per daemon")
                self.confine_runs(g)
                self.hatchd.delete_vm(g.vm_id)  # its standby snapshot goes with it
            busy.stop()
            self.confine_busy = busy.cores
        self.sample_others()

    def cleanup(self):
        for p in list(self.raw_procs.values()):
            self.kill_raw(p)
        # Daemons before s3s-fs: the one storing there deletes its VMs' snapshots from it.
        for d in self.daemons:
            d.stop()
        if self.s3 is not None:
            self.s3.stop()
        kill_leftovers(self.tmp)


# ---------------------------------------------------------------- report


def raw_command_line(cmdline, work, raw_dir):
    """hatch's QEMU command line for a run by hand: per-VM paths moved to `raw_dir`, the QMP
    socket bound by QEMU itself (hatch passes a listening fd 4), no `-sandbox` (its
    spawn=deny would stop the `exec:cat` migration the raw side uses; hatch passes an fd),
    and plain `-m` RAM instead of hatch's memfd backend: the raw side is QEMU as a user
    would run it, saving and loading RAM inside the migration stream."""
    args = [a.replace(work, raw_dir) for a in cmdline]
    args = [a.replace("socket,id=qmp,fd=4,", f"socket,id=qmp,path={raw_dir}/vmm.sock,") for a in args]
    for flag in ("-sandbox", "-object"):
        while flag in args:
            i = args.index(flag)
            if flag == "-object" and not args[i + 1].startswith("memory-backend-"):
                raise BenchError(f"unexpected -object in hatch's command line: {args[i + 1]}")
            del args[i:i + 2]
    args = [a.replace(",memory-backend=pc.ram", "") for a in args]
    return args


def med(xs):
    xs = [x for x in xs if x is not None]
    return stats(xs)["median"] if xs else None


def fmt_s(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    st = stats(xs)
    return f"{st['median']:.3f} s ({st['min']:.3f}-{st['max']:.3f})"


def fmt_ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    st = stats(xs)
    return f"{ms(st['median']):.0f} ms ({ms(st['min']):.0f}-{ms(st['max']):.0f})"


def mib(b):
    return "-" if b is None else f"{b / MiB:.1f} MiB"


def f0(x, sign=False):
    """Seconds as whole milliseconds, `?` when there is no figure."""
    if x is None:
        return "?"
    return f"{ms(x):+.0f}" if sign else f"{ms(x):.0f}"


def rate(nbytes, secs):
    return "?" if not nbytes or not secs or secs <= 0 else f"{nbytes / secs / 1e6:.0f} MB/s"


def verdict(ratio, target):
    return f"{'within' if ratio <= target else 'MISSES'} {target}x"


def render(meta, bench, markdown):
    """The section text (markdown) or the plain tables for stdout."""
    lines = []
    add = lines.append
    gs = bench.guests

    def table(header, rows):
        add_table(add, markdown, header, rows)

    def head(text):
        add_heading(add, markdown, text)

    q = bench.quiet
    add(f"Command: `{meta['command']}` (from the repository root, as root)  ")
    add(f"Date: {meta['date']}  ")
    add(f"Host: {meta['cpus']} cores ({meta['cpu']}), kernel {meta['kernel']}, load average "
        f"{meta['load_before']:.2f} before / {meta['load_after']:.2f} after the measurements; host CPU busy "
        f"(all processes, /proc/stat) {bench.busy:.2f} of {meta['cpus']} cores while measuring  ")
    add(f"Other QEMUs: waited {q['waited']:.0f} s (limit {q['limit']} s) until none other than ours ran; "
        f"while measuring, {len(bench.others_seen)} other QEMU process(es) seen, at most {bench.others_max} "
        f"at once (sampled between runs)  ")
    add(f"hatch: {meta['build']} of {meta['source']}  ")
    add(f"QEMU: {meta['qemu']}, accelerator `{meta['accel']}`, machine `{meta['machine']}`, {meta['smp']} vCPU, "
        f"no NIC (`enable_network: false`), root disk qcow2 overlay + cloud-init seed; snapshot store: the "
        f"local directory `$HATCH_DATA_DIR/objects` on the same ext4 disk as the raw side's files  ")
    add(f"Guests: {', '.join(str(g.mem) for g in gs)} MiB; a user-data script fills half of RAM in a tmpfs "
        f"(a quarter of RAM from `/dev/urandom`, a quarter of one repeating text line), then prints "
        f"`bench-tick N` every {int(TICK_S * 1000)} ms; " +
        "; ".join(f"{g.mem} MiB guest: `{g.facts['fill']}`" for g in gs) + "  ")
    add("Hot copies: " + ("on (`HATCH_HOT_SLEEP_SECONDS=600`): hatch's restore of a guest it put to sleep maps "
                          "the RAM it kept (no read of the store); the raw side loads the whole stream as always  "
                          if bench.args.hot else
                          "off (`HATCH_HOT_SLEEP_SECONDS=0`): every hatch restore reads the snapshot store  "))
    add(f"Runs: {meta['runs']} of each measurement per size (median, min-max), hatch and raw interleaved, "
        f"alternating which goes first")
    add("")

    head("Snapshot and restore: hatch vs the same QEMU driven by hand")
    add("hatch snapshot: `POST /vms/{id}/snapshot` until the 201 (memory, device state and disk stored). "
        "raw: QMP `stop`, `migrate-set-parameters max-bandwidth` (hatch's value), `migrate` to "
        "`exec:cat > FILE`, `query-migrate` until `completed`, `cat` exited, fsync of FILE and its directory. "
        "restore: from `POST /vms/{id}/restore` / from spawning QEMU with `-incoming \"exec:cat FILE\"` "
        "(then `cont` once `paused`) to the first new `bench-tick` line in console.log.")
    add("")
    rows = []
    for g in gs:
        hs = med([m["response"] for m in g.hatch_snap])
        rs = med([m["response"] for m in g.raw_snap])
        hr = med([m["tick"] for m in g.hatch_restore])
        rr = med([m["tick"] for m in g.raw_restore])
        rows.append([f"{g.mem} MiB", "snapshot", fmt_s([m["response"] for m in g.hatch_snap]),
                     fmt_s([m["response"] for m in g.raw_snap]), f"{hs / rs:.2f}", verdict(hs / rs, 1.5)])
        hd = med([m["response"] + m["fsync_after"] for m in g.hatch_snap])
        rows.append([f"{g.mem} MiB", "snapshot, then fsync of hatch's stored objects (both sides durable)",
                     fmt_s([m["response"] + m["fsync_after"] for m in g.hatch_snap]),
                     fmt_s([m["response"] for m in g.raw_snap]), f"{hd / rs:.2f}", verdict(hd / rs, 1.5)])
        rows.append([f"{g.mem} MiB", "restore -> guest ticks", fmt_s([m["tick"] for m in g.hatch_restore]),
                     fmt_s([m["tick"] for m in g.raw_restore]), f"{hr / rr:.2f}", verdict(hr / rr, 1.3)])
    table(["guest", "operation", "hatch", "raw QEMU", "hatch / raw", "target"], rows)

    head("Where the time goes")
    add("Milliseconds (median, min-max) from the request (hatch) or from `stop` / the spawn (raw) to each "
        "step. hatch's steps are seen from outside: its work dir and the object store polled every 2 ms.")
    add("")

    def mm(runs, k):
        return fmt_ms([m.get(k) for m in runs])

    def dur(runs, a, b):
        return med([m[b] - (m[a] if a else 0) for m in runs if m.get(b) is not None and (not a or m.get(a) is not None)])

    def cpu(runs, a, b):
        """Median daemon CPU seconds between marks a and b (a None: from the request)."""
        return med([m["daemon_cpu"][b] - (m["daemon_cpu"][a] if a else 0) for m in runs
                    if b in m.get("daemon_cpu", {}) and (not a or a in m["daemon_cpu"])])

    rows = []
    for g in gs:
        H, R = g.hatch_snap, g.raw_snap
        rows += [
            [f"{g.mem} MiB", "hatch: capture dir made (key checked, snapshot row inserted)", mm(H, "capture dir"), "-"],
            [f"{g.mem} MiB", "hatch: `memory` in the capture dir (FIFO or file) made", mm(H, "memory in capture dir"), "-"],
            [f"{g.mem} MiB", "guest saved (hatch: its `vmstate` note written after `completed`; raw: `completed`)",
             mm(H, "saved (vmstate written)"), mm(R, "completed")],
            [f"{g.mem} MiB", "raw: the migration's `cat` exited", "-", mm(R, "writer exited")],
            [f"{g.mem} MiB", "hatch: memory object complete in the store / raw: fsync of the file done",
             mm(H, "memory stored"), mm(R, "response")],
            [f"{g.mem} MiB", "hatch: vmstate object stored", mm(H, "vmstate stored"), "-"],
            [f"{g.mem} MiB", "hatch: disk object stored", mm(H, "disk stored"), "-"],
            [f"{g.mem} MiB", "hatch: capture dir removed", mm(H, "capture dir removed"), "-"],
            [f"{g.mem} MiB", "hatch: QEMU gone", mm(H, "QEMU gone"), "-"],
            [f"{g.mem} MiB", "**snapshot done** (hatch: 201; raw: fsync done)", mm(H, "response"), mm(R, "response")],
            [f"{g.mem} MiB", "hatch, not in the figure above: fsync of the stored objects after the 201",
             f"+{mm(H, 'fsync_after')}", "-"],
        ]
    table(["guest", "snapshot step", "hatch", "raw QEMU"], rows)
    rows = []
    for g in gs:
        H, R = g.hatch_restore, g.raw_restore
        rows += [
            [f"{g.mem} MiB", "hatch: restore dir made", mm(H, "restore dir"), "-"],
            [f"{g.mem} MiB", "hatch: `memory` in the restore dir (a FIFO it feeds, or the fetched file)",
             mm(H, "memory in restore dir"), "-"],
            [f"{g.mem} MiB", "hatch: snapshot's disk in place", mm(H, "disk in place"), "-"],
            [f"{g.mem} MiB", "QEMU started (hatch: new pid file; raw: QMP answers)",
             mm(H, "QEMU started (pid file)"), mm(R, "QMP up")],
            [f"{g.mem} MiB", "hatch: QEMU's QMP socket made", mm(H, "QMP socket made"), "-"],
            [f"{g.mem} MiB", "raw: migration stream loaded (`paused`)", "-", mm(R, "loaded (paused)")],
            [f"{g.mem} MiB", "resumed (hatch: restore dir removed, after `cont`; raw: `cont` returned)",
             mm(H, "restore dir removed (resumed)"), mm(R, "cont")],
            [f"{g.mem} MiB", "hatch: 200 returned", mm(H, "response"), "-"],
            [f"{g.mem} MiB", "**first new tick**", mm(H, "tick"), mm(R, "tick")],
        ]
    table(["guest", "restore step", "hatch", "raw QEMU"], rows)
    for g in gs:
        H, R, HR, RR = g.hatch_snap, g.raw_snap, g.hatch_restore, g.raw_restore
        mem_bytes = med([m["objects"].get("memory") for m in H])
        raw_bytes = med([m["file"] for m in R])
        fifo = any(m.get("fifo") for m in H)
        save = dur(H, "capture dir", "memory stored")
        hs, rs = med([m["response"] for m in H]), med([m["response"] for m in R])
        hr, rr = med([m["tick"] for m in HR]), med([m["tick"] for m in RR])
        fs = med([m["fsync_after"] for m in H])
        how = ("QEMU's migration stream goes through a FIFO in the capture dir straight into the store, hashed on "
               "the way" if fifo else "QEMU writes the migration stream to a file in the capture dir, which is "
               "then copied into the store, hashed on the way")
        add(f"- {g.mem} MiB, snapshot (medians of per-run durations): {how}. hatch: {f0(dur(H, None, 'capture dir'))} ms "
            f"before the capture starts, {f0(save)} ms from there until the {mib(mem_bytes)} memory object is "
            f"complete in the store ({rate(mem_bytes, save)}; the daemon used {f0(cpu(H, 'capture dir', 'memory stored'))} "
            f"ms of CPU meanwhile), {f0(dur(H, 'memory stored', 'disk stored'))} ms more for the vmstate and disk "
            f"objects, {f0(dur(H, 'disk stored', 'response'))} ms to end QEMU and answer. raw: "
            f"{f0(dur(R, None, 'completed'))} ms until `completed` ({rate(raw_bytes, dur(R, None, 'completed'))} into "
            f"the page cache through `cat`), then {f0(dur(R, 'writer exited', 'response'))} ms of fsync. hatch - raw = "
            f"{ms(hs - rs):+.0f} ms; hatch with the fsync it leaves out would be {hs + fs:.3f} s "
            f"({(hs + fs) / rs:.2f}x raw).")
        ref = med([m.get("ref_copy") for m in H])
        qemu_h = med([sum(m["qemu_cpu"]) for m in HR if m.get("qemu_cpu")])
        qemu_r = med([sum(m["qemu_cpu"]) for m in RR if m.get("qemu_cpu")])
        load_h = dur(HR, "QEMU started (pid file)", "restore dir removed (resumed)")
        if any(m.get("fifo") for m in HR):
            how = (f"the daemon streams the memory object from the store through a FIFO in the restore dir "
                   f"into QEMU's `exec:cat`, checking its SHA-256 on the way: QEMU from its start to the resumed "
                   f"guest {f0(load_h)} ms ({rate(mem_bytes, load_h)}), the daemon using "
                   f"{f0(cpu(HR, 'QEMU started (pid file)', 'restore dir removed (resumed)'))} ms of CPU meanwhile")
        else:
            fetch = dur(HR, "vmstate fetched", "memory in restore dir")
            how = (f"hatch {f0(fetch)} ms to fetch the memory object into the restore dir "
                   f"({rate(mem_bytes, fetch)}, the daemon using "
                   f"{f0(cpu(HR, 'vmstate fetched', 'memory in restore dir'))} ms of CPU), then QEMU from its start "
                   f"to the resumed guest {f0(load_h)} ms")
        add(f"- {g.mem} MiB, restore: {f0(dur(HR, None, 'QEMU started (pid file)'))} ms before QEMU starts, then "
            f"{how} (raw: spawn to `cont` {f0(dur(RR, None, 'cont'))} ms, {rate(raw_bytes, dur(RR, None, 'cont'))}; "
            f"for reference, this script reads, hashes and writes the same object, 1 MiB at a time, in "
            f"{f0(ref)} ms, {rate(mem_bytes, ref)}). CPU time of QEMU and its `cat` by the first tick: hatch "
            f"{f0(qemu_h)} ms, raw {f0(qemu_r)} ms. Resumed -> tick: hatch "
            f"{f0(dur(HR, 'restore dir removed (resumed)', 'tick'), True)} ms, raw {f0(dur(RR, 'cont', 'tick'))} ms "
            f"(a tick every {int(TICK_S * 1000)} ms of guest time). hatch - raw = {ms(hr - rr):+.0f} ms.")
    add("")

    add("Daemon log (`HATCH_LOG=info`), median ms from the request to each line:")
    add("")
    for g in gs:
        for label, runs in (("snapshot", g.hatch_snap), ("restore", g.hatch_restore)):
            firsts = []
            for m in runs:
                d = {}
                for name, t in m.get("log", []):
                    d.setdefault(name, t)
                firsts.append(d)
            names = list(dict.fromkeys(n for d in firsts for n in d))
            add(f"- {g.mem} MiB {label}: " + ", ".join(
                f"`{n}` {ms(med([d.get(n) for d in firsts])):.0f}" for n in names))
    add("")

    head("Stored bytes per compression (the VM's `snapshot_compression`, then `POST /vms/{id}/snapshot`)")
    add("`size_bytes`, `uncompressed_size_bytes` (the memory object: QEMU's migration stream) and "
        "`compressed_size_bytes` from `GET /snapshots/{id}` once `compression_state` left `compressing` "
        "(polled every 10 ms from the 201; that time is \"compression\"). stored / RAM = `size_bytes` / "
        "guest RAM. Restore: `POST /vms/{id}/restore` -> first new tick, from the compressed object (read, "
        "decompressed and both checksums checked by the daemon, whose CPU time over the whole restore is the "
        "last column).")
    add("")
    rows = []
    for g in gs:
        ram = g.mem * MiB
        for name, _ in ALGORITHMS:
            runs = g.compress.get(name) or []
            if not runs:
                continue
            size = med([r["size_bytes"] for r in runs])
            unc = med([r["uncompressed"] for r in runs])
            comp = med([r["compressed"] for r in runs])
            rows.append([
                f"{g.mem} MiB", name, mib(size), mib(unc), mib(comp),
                f"{size / ram:.3f}",
                "-" if comp is None else f"{comp / unc:.3f}",
                fmt_s([r["snapshot"] for r in runs]),
                fmt_s([r["compress"] for r in runs]),
                "-" if comp is None else f"{unc / med([r['compress'] for r in runs]) / 1e6:.0f} MB/s",
                fmt_s([r["restore"] for r in runs]),
                fmt_ms([r["restore_cpu"] for r in runs]),
            ])
    table(["guest", "compression", "size_bytes", "uncompressed", "compressed", "stored / RAM",
           "memory ratio", "snapshot (201)", "compression", "compression speed", "restore -> tick",
           "daemon CPU during the restore"], rows)

    head("hatch's memory while it stores a guest (daemon VmHWM, reset before each operation)")
    rows = []
    for g in gs:
        ram = g.mem * MiB
        hwm = max(m["hwm"] for m in g.hatch_snap)
        rss = max(m["rss_max"] for m in g.hatch_snap)
        before = max(m["hwm_before"] for m in g.hatch_snap)
        rows.append([f"{g.mem} MiB", "`POST /vms/{id}/snapshot`", mib(before), mib(hwm), mib(rss),
                     f"{hwm / ram:.3f}"])
        hwm = max(m["hwm"] for m in g.hatch_restore)
        rows.append([f"{g.mem} MiB", "`POST /vms/{id}/restore`", "-", mib(hwm),
                     mib(max(m["rss_max"] for m in g.hatch_restore)), f"{hwm / ram:.3f}"])
        for name, _ in ALGORITHMS[1:]:
            runs = g.compress.get(name) or []
            vals = [r["hwm_compress"] for r in runs if r["hwm_compress"]]
            if vals:
                rows.append([f"{g.mem} MiB", f"compression {name} (after the 201)", "-", mib(max(vals)),
                             mib(max(r["rss_compress"] for r in runs if r["rss_compress"])),
                             f"{max(vals) / ram:.3f}"])
    table(["guest", "operation", "RSS before", "peak (VmHWM, max of runs)", "peak VmRSS sampled", "peak / guest RAM"],
          rows)

    head("Details")
    for g in gs:
        add(f"- {g.mem} MiB guest, hatch VM `{g.vm_id}`: ready line `{g.facts['ready']}`. Raw QEMU: hatch's "
            f"command line with {len(g.facts['rewritten'])} per-VM argument(s) moved to the temp dir.")
        add(f"  - snapshot, every run (s): hatch " + ", ".join(f"{m['response']:.3f}" for m in g.hatch_snap)
            + "; raw " + ", ".join(f"{m['response']:.3f}" for m in g.raw_snap)
            + "; raw `stop` alone: " + fmt_ms([m["stopped"] for m in g.raw_snap])
            + f". hatch stored `size_bytes` {mib(med([m['size_bytes'] for m in g.hatch_snap]))} (objects: "
            + ", ".join(f"{k} {mib(v)}" for k, v in sorted(g.hatch_snap[0]["objects"].items()))
            + f"); raw migration file {mib(med([m['file'] for m in g.raw_snap]))}; QEMU's own `total-time` "
            + fmt_ms([m["total-time"] / 1000 if m["total-time"] else None for m in g.raw_snap]) + ", pages: "
            + ", ".join(f"{k} {v}" for k, v in g.raw_snap[0]["stats"].items()) + " (raw, first run).")
        add(f"  - restore -> tick, every run (s): hatch " + ", ".join(f"{m['tick']:.3f}" for m in g.hatch_restore)
            + "; raw " + ", ".join(f"{m['tick']:.3f}" for m in g.raw_restore)
            + ". Ticks continued from the snapshot (last tick before -> first after, hatch): "
            + ", ".join(f"{m['last_tick']} -> {r['first_tick']}" for m, r in zip(g.hatch_snap, g.hatch_restore))
            + ".")
    add("- \"fsync of the stored objects after the 201\": this script fsyncs every object of the snapshot "
        "(and their directory) right after hatch answered; it takes long only if what hatch stored was not on "
        "disk yet. The raw side's figure includes its own fsync. Before every timed operation the script runs "
        "`sync` and waits 0.2 s, so no operation pays for the writeback of the one before.")
    return "\n".join(lines)



CONFINE_TARGET = 1.05


def per_round_ratio(runs_on, runs_off, value):
    """The median over rounds of (median confined / median not confined) within each round."""
    ratios = []
    for r in sorted({x["round"] for x in runs_on} & {x["round"] for x in runs_off}):
        a = med([value(x) for x in runs_on if x["round"] == r])
        b = med([value(x) for x in runs_off if x["round"] == r])
        if a is not None and b:
            ratios.append(a / b)
    return med(ratios)


def render_confinement(meta, bench, markdown, standalone=False):
    """Part 5's table: hatch snapshot and restore with VMM confinement on against off."""
    lines = []
    add = lines.append
    gs = bench.guests
    args = bench.args
    if standalone:
        add(f"Command: `{meta['command']}` (from the repository root, as root)  ")
        add(f"Date: {meta['date']}  ")
        add(f"Host: {meta['cpus']} cores ({meta['cpu']}), kernel {meta['kernel']}, load average "
            f"{meta['load_before']:.2f} before / {meta['load_after']:.2f} after the measurements; host CPU busy "
            f"(all processes, /proc/stat) {bench.confine_busy:.2f} of {meta['cpus']} cores while measuring  ")
        add(f"hatch: {meta['build']} of {meta['source']}  ")
        add(f"QEMU: {meta['qemu']}, accelerator `{meta['accel']}`, machine `{meta['machine']}`, {meta['smp']} vCPU, "
            f"no NIC; snapshot store: the local directory `$HATCH_DATA_DIR/objects`  ")
        add(f"Guests: {', '.join(str(g.mem) for g in gs)} MiB, filled as in the full run (half of RAM in a tmpfs, "
            f"half of that random), ticking every {int(TICK_S * 1000)} ms; "
            + "; ".join(f"{g.mem} MiB guest: `{g.facts['fill']}`" for g in gs))
        add("")
    else:
        add("")
    add_heading(add, markdown, "Snapshot and restore with VMM confinement on vs off (issue 10)")
    add(f"The same guest (asleep between parts), snapshotted with `POST /vms/{{id}}/snapshot` (until the 201) "
        f"and restored with `POST /vms/{{id}}/restore` (until the first new `bench-tick` line) by a daemon with "
        f"`HATCH_VMM_CONFINE=on` and by one with `off`, in the same run: the daemon restarted on the same data "
        f"dir for each block of {args.confine_runs} snapshot + restore, blocks alternating on/off with the order "
        f"swapping every round ({args.confine_rounds} round(s), so {args.confine_rounds} block(s) of each); each "
        f"block first wakes the guest (uncounted, like each daemon's first boot in bench/boot) and puts it back "
        f"to sleep at the end for the next daemon. On: QEMU under its own uid with no capabilities, `-sandbox "
        f"on,...,spawn=deny`, `-accel tcg,tb-size=64`, a cgroup (CPU, memory, pids limits), a mount namespace; "
        f"checked in `/proc/PID/status` after every restore. Off: QEMU as root without these (TAP, QMP and "
        f"migration fds passed the same way). Median (min-max); ratio = confined / not confined, of the "
        f"medians and the median of each round's own ratio (less sensitive to drift in host load). "
        f"Target: <= {CONFINE_TARGET}x.")
    add("")
    rows = []
    steps = (
        ("snapshot (201)", lambda x: x["snapshot"]["response"], fmt_s, True),
        ("restore: QEMU started (new pid file)", lambda x: x["restore"].get("QEMU started (pid file)"), fmt_ms, False),
        ("restore: 200 returned", lambda x: x["restore"]["response"], fmt_s, False),
        ("restore -> guest ticks", lambda x: x["restore"]["tick"], fmt_s, True),
    )
    for g in gs:
        on, off = g.confine["on"], g.confine["off"]
        if not on or not off:
            continue
        for label, value, fmt, target in steps:
            a, b = med([value(x) for x in on]), med([value(x) for x in off])
            ratio = a / b if a is not None and b else None
            per = per_round_ratio(on, off, value)
            rows.append([f"{g.mem} MiB", label, fmt([value(x) for x in on]), fmt([value(x) for x in off]),
                         "-" if ratio is None else f"{ratio:.3f}", "-" if per is None else f"{per:.3f}",
                         verdict(ratio, CONFINE_TARGET) if target and ratio is not None else "-"])
    add_table(add, markdown, ["guest", "operation", "confined", "not confined", "confined / not",
                              "median of per-round ratios", "target"], rows)
    for g in gs:
        on, off = g.confine["on"], g.confine["off"]
        if not on or not off:
            continue

        def every(runs, key):
            return ", ".join(f"{key(x):.3f}" for x in runs)

        proc = "; ".join(f"{m}: uid {p['uid']}, Seccomp {p['seccomp']}, CapEff {p['cap_eff']}"
                         for m, p in sorted(g.confine_proc.items(), reverse=True))
        add(f"- {g.mem} MiB, every run in order (s), snapshot: confined "
            f"{every(on, lambda x: x['snapshot']['response'])}; not {every(off, lambda x: x['snapshot']['response'])}. "
            f"Restore -> tick: confined {every(on, lambda x: x['restore']['tick'])}; not "
            f"{every(off, lambda x: x['restore']['tick'])}. Stored `size_bytes` (median): confined "
            f"{mib(med([x['snapshot']['size_bytes'] for x in on]))}, not "
            f"{mib(med([x['snapshot']['size_bytes'] for x in off]))}. QEMU's `/proc/PID/status`: {proc}.")
    add(f"- While measuring: {len(bench.confine_others)} other QEMU process(es) seen on the host, at most "
        f"{bench.confine_others_max} at once (sampled before each block).")
    return "\n".join(lines)


SLEEP_TARGET = 0.05
FRESH_TARGET = 1.5


def ordinal(n):
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def of_ram(b, ram):
    return "-" if b is None else f"{b / ram:.3f} ({mib(b)})"


def part_footer(add, meta, bench, name):
    busy = bench.part_busy.get(name)
    seen, most = bench.part_others.get(name, [set(), 0])
    add(f"- While measuring: host CPU busy (all processes, /proc/stat) "
        f"{'?' if busy is None else f'{busy:.2f}'} of {meta['cpus']} cores; {len(seen)} other QEMU process(es) "
        f"seen on the host, at most {most} at once (sampled between runs).")


STORE_WALK_TEXT = (
    "Stored by a snapshot: the bytes of the regular files in the object store's directory that are new or "
    "rewritten between a walk of it right before the request and one right after the 201 (staging files, "
    "`#` in the name, left out; a file with several names counted once). Only the directory is looked at, "
    "so this reads whole objects and content-addressed chunks alike, and another snapshot's data removed "
    "meanwhile hides nothing. Each part's guests belong to an owner of their own (`hatch keys create`), so "
    "nothing another part stored can make them look cheaper.")


def render_sleeps(meta, bench, markdown):
    """Part 6's block: what each of N snapshots of one idle guest adds to the store."""
    lines = []
    add = lines.append
    n = bench.args.sleeps
    last = ordinal(n)
    add("")
    add_heading(add, markdown, f"Repeated sleep of an idle guest: what each of {n} snapshots adds to the store")
    add(f"One guest per size, half filled as above and ticking, otherwise idle: `POST /vms/{{id}}/snapshot` (until "
        f"the 201), then `POST /vms/{{id}}/restore` (until the first new `bench-tick` line), {n} times in a row; "
        f"every snapshot is kept until the end, then the VM is deleted with them. Local store "
        f"(`$HATCH_DATA_DIR/objects`). {STORE_WALK_TEXT} Figures are fractions of guest RAM (bytes in brackets). "
        f"Target: the 2nd and the {last} <= {SLEEP_TARGET}. \"store after the {last}\": what the store holds that "
        f"was not there before the 1st snapshot.")
    add("")
    rows = []
    for p in bench.sleeps:
        ram = p["mem"] * MiB
        new = [r["new"][0] for r in p["runs"]]
        worst = max(new[1], new[-1]) / ram
        held, files = p["held"]
        rows.append([f"{p['mem']} MiB", of_ram(new[0], ram), of_ram(new[1], ram), of_ram(new[-1], ram),
                     of_ram(med(new[1:]), ram),
                     f"{'within' if worst <= SLEEP_TARGET else 'MISSES'} {SLEEP_TARGET}",
                     f"{mib(held)} ({held / ram:.3f} of RAM), {files} object file(s)"])
    add_table(add, markdown, ["guest", "1st snapshot", "2nd", last, f"median of 2nd-{last}",
                              f"target (2nd and {last})", f"store after the {last}"], rows)
    for p in bench.sleeps:
        ram = p["mem"] * MiB
        runs = p["runs"]
        left, left_files = p["left"]
        add(f"- {p['mem']} MiB (`{p['fill']}`), every snapshot in order, stored / RAM: "
            + ", ".join(f"{r['new'][0] / ram:.3f}" for r in runs)
            + "; new object files: " + ", ".join(str(r["new"][1]) for r in runs)
            + "; snapshot (201, s): " + ", ".join(f"{r['snapshot']:.3f}" for r in runs)
            + "; restore -> tick (s): " + ", ".join(f"{r['tick']:.3f}" for r in runs)
            + f"; `size_bytes` as the API reports it: {mib(runs[0]['size_bytes'])} for the 1st, "
            f"{mib(runs[-1]['size_bytes'])} for the {last}. Right after deleting the VM (and so its {n} "
            f"snapshots), the store still held {mib(left)} in {left_files} file(s) that the part had added.")
        moved = [(i, r) for i, r in enumerate(runs) if r["growth"] != r["new"][0]]
        if moved:
            add("  - The store's total changed by another amount than was stored (something was also removed or "
                "shrunk meanwhile), change of the total: " + ", ".join(
                    f"snapshot {i + 1} {r['growth'] / MiB:+.1f} MiB" for i, r in moved) + ".")
    part_footer(add, meta, bench, "sleeps")
    return "\n".join(lines)


def render_fresh(meta, bench, markdown):
    """Part 7's block: what N fresh VMs of one image cost in the store against one."""
    lines = []
    add = lines.append
    n = bench.args.fresh_vms
    add("")
    add_heading(add, markdown, f"Fresh VMs of one image: what the store holds for {n} against one")
    add(f"{n} VMs made one after another from the default image (`POST /vms`, the bench's user data, an owner "
        f"of their own per row), each snapshotted once with `POST /vms/{{id}}/snapshot` once it ticks and left "
        f"asleep (one QEMU running at a time). Idle: the user data without the fill (booted, ticking, nothing "
        f"else). Half filled: the fill as above, for contrast: a quarter of each guest's RAM comes from its own "
        f"`/dev/urandom`, which no other guest shares, so at best only the kernel, the image's pages and the "
        f"text quarter can be stored once; that row has no target. Local store. {STORE_WALK_TEXT} \"all\": "
        f"what the store holds after the {ordinal(n)} snapshot that was not there before the 1st. Target (idle): "
        f"all <= {FRESH_TARGET}x the first alone.")
    add("")
    rows = []
    for row in bench.fresh:
        ram = row["mem"] * MiB
        first = row["vms"][0]["new"][0]
        total, files = row["total"]
        ratio = total / first if first else None
        target = ("- (each guest's random quarter is its own)" if row["fill"] else
                  "-" if ratio is None else verdict(ratio, FRESH_TARGET))
        rows.append([f"{row['mem']} MiB", "half filled" if row["fill"] else "idle (no fill)", str(len(row["vms"])),
                     f"{mib(first)} ({first / ram:.3f} of RAM)", f"{mib(total)} in {files} object file(s)",
                     "-" if ratio is None else f"{ratio:.2f}x", target])
    add_table(add, markdown, ["guest", "kind", "VMs", "first alone", "all", "all / first", "target"], rows)
    for row in bench.fresh:
        left, left_files = row["left"]
        add(f"- {row['mem']} MiB {'half filled' if row['fill'] else 'idle'}, each VM's snapshot in order, stored: "
            + ", ".join(f"{mib(v['new'][0])} ({v['new'][1]} file(s))" for v in row["vms"])
            + "; snapshot (201, s): " + ", ".join(f"{v['snapshot']:.3f}" for v in row["vms"])
            + f"; `size_bytes` as the API reports it (1st): {mib(row['vms'][0]['size_bytes'])}. Right after "
            f"deleting the VMs the store still held {mib(left)} in {left_files} file(s) that the row had added."
            + (f" Fill of the 1st: `{row['fills'][0]}`." if row["fill"] else ""))
    part_footer(add, meta, bench, "fresh")
    return "\n".join(lines)


def render_stores(meta, bench, markdown):
    """Part 8's block: hatch snapshot and restore with s3s-fs against the local store."""
    lines = []
    add = lines.append
    add("")
    add_heading(add, markdown, "Snapshot and restore: s3s-fs against the local store")
    if bench.store_skipped:
        add(f"Skipped in this run: {bench.store_skipped}")
        add("")
        return "\n".join(lines)
    runs = bench.args.runs
    s3 = bench.s3
    add(f"The same kind of guest (half filled, ticking) stored in the local directory (`$HATCH_DATA_DIR/objects`) "
        f"and in s3s-fs ({s3.version or 'version unknown'}) on 127.0.0.1 in the bench's namespace, its bucket "
        f"a directory on the same disk (`HATCH_S3_BUCKET`, `HATCH_S3_ENDPOINT`, `HATCH_S3_ACCESS_KEY`, "
        f"`HATCH_S3_SECRET_KEY`). One daemon per store, each on its own data dir and only one running at a time: "
        f"restarted for every block (one snapshot + restore of each size), blocks alternating between the "
        f"stores with the order swapping every round ({runs} round(s)); each block first wakes its guests "
        f"(uncounted) and puts them back to sleep at the end. Timed as in the first table: snapshot until the "
        f"201, restore until the first new `bench-tick` line. Median (min-max); ratio = s3s-fs / local, of the "
        f"medians and the median of each round's own ratio.")
    add("")
    steps = (
        ("snapshot (201)", lambda x: x["snapshot"]["response"], fmt_s),
        ("restore: QEMU started (new pid file)", lambda x: x["restore"].get("QEMU started (pid file)"), fmt_ms),
        ("restore: 200 returned", lambda x: x["restore"]["response"], fmt_s),
        ("restore -> guest ticks", lambda x: x["restore"]["tick"], fmt_s),
    )
    rows = []
    for loc, rem in zip(bench.stores.get("local", []), bench.stores.get("s3s-fs", [])):
        a_runs, b_runs = loc.store_runs, rem.store_runs
        for label, value, fmt in steps:
            a, b = med([value(x) for x in a_runs]), med([value(x) for x in b_runs])
            ratio = b / a if a and b is not None else None
            per = per_round_ratio(b_runs, a_runs, value)
            rows.append([f"{loc.mem} MiB", label, fmt([value(x) for x in a_runs]), fmt([value(x) for x in b_runs]),
                         "-" if ratio is None else f"{ratio:.3f}", "-" if per is None else f"{per:.3f}"])
    add_table(add, markdown, ["guest", "operation", "local", "s3s-fs", "s3s-fs / local",
                              "median of per-round ratios"], rows)
    for loc, rem in zip(bench.stores.get("local", []), bench.stores.get("s3s-fs", [])):
        def every(g, key):
            return ", ".join(f"{key(x):.3f}" for x in g.store_runs)

        def stored(g):
            return (f"{mib(med([x['snapshot']['store_new'][0] for x in g.store_runs]))} in "
                    f"{med([x['snapshot']['store_new'][1] for x in g.store_runs]):.0f} file(s)")

        add(f"- {loc.mem} MiB, every run in order (s), snapshot: local {every(loc, lambda x: x['snapshot']['response'])}; "
            f"s3s-fs {every(rem, lambda x: x['snapshot']['response'])}. Restore -> tick: local "
            f"{every(loc, lambda x: x['restore']['tick'])}; s3s-fs {every(rem, lambda x: x['restore']['tick'])}. "
            f"Stored per snapshot (median, walked as in the parts above; s3s-fs: its bucket directory): local "
            f"{stored(loc)}, s3s-fs {stored(rem)}. Fill: local `{loc.facts['fill']}`; s3s-fs `{rem.facts['fill']}`.")
    part_footer(add, meta, bench, "s3")
    return "\n".join(lines)


def render_partial_header(meta, bench):
    """The lines above the blocks of a partial run (the `--*-only` options), for pasting under the section."""
    lines = []
    add = lines.append
    add(f"Command: `{meta['command']}` (from the repository root, as root)  ")
    add(f"Date: {meta['date']}  ")
    add(f"Host: {meta['cpus']} cores ({meta['cpu']}), kernel {meta['kernel']}, load average "
        f"{meta['load_before']:.2f} before / {meta['load_after']:.2f} after the measurements"
        + (f"; host CPU busy (all processes, /proc/stat) {bench.confine_busy:.2f} of {meta['cpus']} cores while "
           f"measuring confinement on vs off" if bench.confine_busy is not None else "") + "  ")
    add(f"hatch: {meta['build']} of {meta['source']}  ")
    add(f"QEMU: {meta['qemu']}, accelerator `{meta['accel']}`, machine `{meta['machine']}`, {meta['smp']} vCPU, "
        f"no NIC; snapshot store: the local directory `$HATCH_DATA_DIR/objects` unless a block says otherwise  ")
    add(f"Guests: {', '.join(str(s) for s in bench.args.sizes)} MiB, unless a block says otherwise filled as in the "
        f"full run (half of RAM in a tmpfs, half of that random), ticking every {int(TICK_S * 1000)} ms"
        + ("; " + "; ".join(f"{g.mem} MiB guest: `{g.facts['fill']}`" for g in bench.guests) if bench.guests else ""))
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs of each timed measurement (default 3)")
    ap.add_argument("--sizes", default="256,1024", help="guest RAM sizes in MiB, comma-separated (default 256,1024)")
    ap.add_argument("--no-compression", action="store_true", help="skip part 3 (Hypeman API compression)")
    ap.add_argument("--wait-quiet", type=int, default=600,
                    help="seconds to wait for other QEMUs to finish before measuring (default 600, 0: no wait)")
    ap.add_argument("--markdown", action="store_true",
                    help=f"print the `## {DOC_SECTION}` section for docs/BENCHMARKS.md instead of plain tables, "
                         "and write it there (unless --no-docs)")
    ap.add_argument("--no-docs", action="store_true", help="with --markdown: only print, do not update the docs")
    ap.add_argument("--confine-rounds", type=int, default=2,
                    help="part 5: on/off block pairs comparing VMM confinement on and off (default 2, 0: skip it)")
    ap.add_argument("--confine-runs", type=int, default=2,
                    help="part 5: snapshot + restore runs per block, i.e. per daemon (default 2)")
    ap.add_argument("--confine-only", action="store_true",
                    help="measure only part 5 (no raw QEMU, no compression); prints its table, never updates the docs")
    ap.add_argument("--sleeps", type=int, default=10,
                    help="part 6: snapshot + restore rounds of one idle guest (default 10, 0: skip it)")
    ap.add_argument("--fresh-vms", type=int, default=5,
                    help="part 7: fresh VMs of one image, one snapshot each (default 5, 0: skip it)")
    ap.add_argument("--no-s3", action="store_true", help="skip part 8 (s3s-fs against the local store)")
    ap.add_argument("--hot", action="store_true",
                    help="the daemon keeps hot copies (HATCH_HOT_SLEEP_SECONDS=600), so hatch's restores map the "
                         "sleeping guest's RAM (issue 16); printed only, never into the docs. Without it, every "
                         "hatch restore reads the store (HATCH_HOT_SLEEP_SECONDS=0)")
    ap.add_argument("--sleeps-only", action="store_true", help="measure part 6 (with any other --*-only)")
    ap.add_argument("--fresh-only", action="store_true", help="measure part 7 (with any other --*-only)")
    ap.add_argument("--s3-only", action="store_true", help="measure part 8 (with any other --*-only)")
    args = ap.parse_args()
    if not 1 <= args.runs <= 100:
        ap.error("--runs must be between 1 and 100")
    if not 0 <= args.wait_quiet <= 3600:
        ap.error("--wait-quiet must be between 0 and 3600")
    if not 0 <= args.confine_rounds <= 100:
        ap.error("--confine-rounds must be between 0 and 100")
    if not 1 <= args.confine_runs <= 100:
        ap.error("--confine-runs must be between 1 and 100")
    if args.confine_only and args.confine_rounds == 0:
        ap.error("--confine-only needs --confine-rounds of at least 1")
    if not (args.sleeps == 0 or 2 <= args.sleeps <= 100):
        ap.error("--sleeps must be 0 or between 2 and 100")
    if not (args.fresh_vms == 0 or 2 <= args.fresh_vms <= 20):
        ap.error("--fresh-vms must be 0 or between 2 and 20")
    if args.sleeps_only and args.sleeps == 0:
        ap.error("--sleeps-only needs --sleeps of at least 2")
    if args.fresh_only and args.fresh_vms == 0:
        ap.error("--fresh-only needs --fresh-vms of at least 2")
    if args.s3_only and args.no_s3:
        ap.error("--s3-only and --no-s3 contradict each other")
    selected = {name for name, on in (("confine", args.confine_only), ("sleeps", args.sleeps_only),
                                      ("fresh", args.fresh_only), ("s3", args.s3_only)) if on}
    # Parts: compare (1-4, with compression unless --no-compression), sleeps (6), fresh (7), s3 (8), confine (5).
    args.parts = selected or {name for name, on in (
        ("compare", True), ("sleeps", args.sleeps), ("fresh", args.fresh_vms), ("s3", not args.no_s3),
        ("confine", args.confine_rounds)) if on}
    # bench/snapshot looks for s3s-fs and says why when it finds none.
    s3_missing = None if os.environ.get("HATCH_BENCH_S3S_FS") else (
        os.environ.get("HATCH_BENCH_S3S_FS_MISSING") or "no s3s-fs binary given (HATCH_BENCH_S3S_FS)")
    if "s3" in selected and s3_missing:
        ap.error(f"--s3-only: {s3_missing}")
    try:
        args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        ap.error("--sizes must be numbers separated by commas")
    if not args.sizes or not all(128 <= s <= 16384 for s in args.sizes):
        ap.error("--sizes must be between 128 and 16384 MiB each")
    if "HATCH_BENCH_TMP" not in os.environ:
        ap.error("run this through bench/snapshot (it makes the namespace and the temp dir)")

    bench = Bench(args)
    if "s3" in args.parts and s3_missing:
        args.parts.discard("s3")
        bench.store_skipped = s3_missing
        log(f"part 8 (s3s-fs against the local store) skipped: {s3_missing}")
    meta = {
        "command": os.environ.get("HATCH_BENCH_COMMAND", "bench/snapshot"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": os.uname().release,
        "runs": args.runs,
        "source": git_state(),
        "build": "debug build" if "/debug/" in os.environ.get("HATCH_BENCH_BIN", "") else "release build",
    }
    if os.environ.get("SUDO_USER"):
        meta["command"] = "sudo " + meta["command"]
    status, _ = run_guarded(bench.run, bench.cleanup)
    if status != 0:
        return status
    cmd = bench.cmdline
    meta.update(
        load_before=bench.load_before,
        load_after=os.getloadavg()[0],
        qemu=qemu_version(cmd[0]),
        accel=arg_after(cmd, "-accel"),
        machine=arg_after(cmd, "-M"),
        smp=arg_after(cmd, "-smp"),
    )
    blocks = [render_block(meta, bench, args.markdown) for name, render_block in (
        ("sleeps", render_sleeps), ("fresh", render_fresh), ("s3", render_stores))
        if name in args.parts or (name == "s3" and bench.store_skipped)]
    if selected:
        # A partial run prints its blocks with their command and date, never into the docs.
        print()
        if selected == {"confine"}:
            print(render_confinement(meta, bench, args.markdown, standalone=True))
            return 0
        if "confine" in selected:
            blocks.append(render_confinement(meta, bench, args.markdown))
        print("\n".join(render_partial_header(meta, bench) + blocks))
        return 0
    section = render(meta, bench, args.markdown)
    for block in blocks:
        section += "\n" + block
    if args.confine_rounds:
        section += "\n" + render_confinement(meta, bench, args.markdown)
    if args.markdown:
        print(f"\n## {DOC_SECTION}\n")
        print(section)
        if not args.no_docs and not args.hot:
            write_docs(DOCS, DOC_SECTION, section)
            log(f"updated {DOCS}")
    else:
        print()
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
