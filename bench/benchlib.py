"""Shared by the bench/*.py scripts: statistics, /proc helpers, the daemon, the docs file.

Standard library only. The scripts run inside a network namespace their
wrapper made and talk to the daemon on 127.0.0.1; every process they start
is stopped again by them (and, as a last resort, by the wrapper).
"""

import datetime
import http.client
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"
PORT = 8080
READY = b"hatch-guest: ready"
DAEMON_START_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "BENCHMARKS.md"


class BenchError(Exception):
    pass


class Qmp:
    """A minimal QMP client on a Unix socket; events are skipped."""

    def __init__(self, path, timeout):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
            self.buf = b""
            self.recv_msg()  # greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def recv_msg(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command, arguments=None):
        msg = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self.recv_msg()
            if "event" in r:
                continue
            if "error" in r:
                raise BenchError(f"QMP {command}: {r['error']}")
            return r.get("return")

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def ms(x):
    return x * 1000.0


def nearest_rank(xs, p):
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100.0 * len(s)) - 1)]


def stats(xs):
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "min": min(xs),
        "max": max(xs),
        "p50": nearest_rank(xs, 50),
        "p99": nearest_rank(xs, 99),
    }


# ---------------------------------------------------------------- /proc


def proc_cmdline(pid):
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def pid_alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pids_mentioning(needle):
    """Live processes (not us) whose command line contains `needle`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        cmd = proc_cmdline(entry)
        if cmd and needle in " ".join(cmd) and pid_alive(entry):
            out.append(int(entry))
    return out


def other_qemu_pids(tmp):
    """QEMUs on this host that this run did not start (noise from concurrent tests)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            cmd = proc_cmdline(entry)
            if cmd and "qemu-system" in cmd[0] and f"{tmp}/" not in " ".join(cmd):
                out.add(int(entry))
    return out


def other_qemus(tmp):
    return len(other_qemu_pids(tmp))


def cpu_jiffies():
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(f[:8])  # guest time is already counted in user
    return total - f[3] - f[4], total


class CpuBusy:
    """How many cores the whole host kept busy between start() and stop()."""

    def __init__(self):
        self.cores = None
        self.b0 = self.t0 = 0

    def start(self):
        self.b0, self.t0 = cpu_jiffies()
        return self

    def stop(self):
        b1, t1 = cpu_jiffies()
        if t1 > self.t0:
            self.cores = (b1 - self.b0) / (t1 - self.t0) * (os.cpu_count() or 1)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------- API client


class Http:
    """One keep-alive connection to the daemon; GETs are retried once on a dropped connection."""

    def __init__(self, key, timeout=60):
        self.key = key
        self.timeout = timeout
        self.conn = None

    def headers(self, body):
        h = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        if body is not None:
            h["Content-Type"] = "application/json"
        return h

    def request(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        attempts = 2 if method == "GET" else 1
        for attempt in range(attempts):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, PORT, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=data, headers=self.headers(body))
                resp = self.conn.getresponse()
                raw = resp.read()
                return resp.status, raw
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == attempts - 1:
                    raise

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def one_request(key, method, path, body=None, timeout=300):
    """A request on a fresh connection (as a CLI client would make it)."""
    h = Http(key, timeout)
    try:
        return h.request(method, path, body)
    finally:
        h.close()


def check_ranges(ap, args, ranges):
    """`ap.error` unless each `(name, lo, hi)` of `ranges` has lo <= args.name <= hi."""
    for name, lo, hi in ranges:
        if not lo <= getattr(args, name) <= hi:
            ap.error(f"--{name.replace('_', '-')} must be between {lo} and {hi}")


def run_meta(default_command, runs):
    """What every report says about its run: the command, date, host and source."""
    meta = {
        "command": os.environ.get("HATCH_BENCH_COMMAND", default_command),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": os.uname().release,
        "runs": runs,
        "source": git_state(),
    }
    if os.environ.get("SUDO_USER"):
        meta["command"] = "sudo " + meta["command"]
    return meta


class DaemonBench:
    """What a bench that drives one `Daemon` (`self.hatchd`) shares: its key,
    API calls that must succeed, and a count of other QEMUs on the host
    (`self.tmp`, `self.others_seen`, `self.others_max`)."""

    @property
    def key(self):
        return self.hatchd.key

    def api(self, method, path, body=None, expect=(200,), timeout=300):
        status, raw = one_request(self.key, method, path, body, timeout=timeout)
        if status not in expect:
            raise BenchError(f"{method} {path}: {status} {raw[:500]!r}\n{self.hatchd.tail()}")
        return json.loads(raw) if raw else None

    def sample_others(self):
        pids = other_qemu_pids(self.tmp)
        self.others_seen |= pids
        self.others_max = max(self.others_max, len(pids))

    def wait_ready(self, vm_id, timeout):
        """Polls the VM's console.log until the guest's ready line; (its text, seconds waited)."""
        return wait_ready(self.hatchd, vm_id, timeout)


def wait_ready(hatchd, vm_id, timeout):
    """Polls `vm_id`'s console.log under daemon `hatchd` until the guest's ready
    line; (its text, seconds waited). A BenchError after `timeout` seconds, or
    once the VM's QEMU is gone."""
    con = hatchd.vms_dir / vm_id / "console.log"
    t0 = time.monotonic()
    while True:
        try:
            text = con.read_bytes()
        except FileNotFoundError:
            text = b""
        if READY in text:
            return text, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"no ready line within {timeout:.0f}s:\n"
                             f"{text[-1500:].decode(errors='replace')}")
        if time.monotonic() - t0 > 5 and hatchd.vmm_pid(vm_id) is None:
            raise BenchError(f"the VM's QEMU is gone:\n{text[-1500:].decode(errors='replace')}")
        time.sleep(0.1)


def check_own_namespace(ns, bench):
    """The sweep at the end kills every process in namespace `ns`: make sure it
    is the one `bench/<bench>` made, and that this process runs in it."""
    if not ns.startswith(f"hatch-bench{bench}-"):
        raise BenchError(f"HATCH_BENCH_NS={ns!r} is not a bench/{bench} namespace")
    mine, named = os.stat("/proc/self/ns/net"), os.stat(f"/run/netns/{ns}")
    if (mine.st_dev, mine.st_ino) != (named.st_dev, named.st_ino):
        raise BenchError(f"not running inside the network namespace {ns}")


# ---------------------------------------------------------------- the daemon


class Daemon:
    """`hatch serve` with its data dir in the run's temp dir, on 127.0.0.1:8080 of the namespace."""

    def __init__(self, tmp, binary, image):
        self.tmp = Path(tmp)
        self.bin = binary
        self.image = Path(image)
        self.data = self.tmp / "data"
        self.vms_dir = self.data / "vms"
        self.log_path = self.tmp / "daemon.log"
        self.proc = None
        self.key = None
        self.live_vms = set()  # VMs created and not yet deleted
        self.vm_keys = {}  # vm id -> key, for live VMs of an owner other than the first (add_owner)

    def tail(self, n=3000):
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def env(self, extra_env=None):
        env = dict(os.environ)
        env.update(extra_env or {})
        env.update(
            HATCH_DATA_DIR=str(self.data),
            HATCH_HTTP_ADDR=f"{HOST}:{PORT}",
            HATCH_DEFAULT_KERNEL_PATH=str(self.image / "vmlinuz"),
            HATCH_DEFAULT_INITRD_PATH=str(self.image / "initrd.img"),
            HATCH_DEFAULT_ROOTFS_PATH=str(self.image / "rootfs.ext4"),
            HATCH_LOG="info,sqlx=warn",
            HATCH_STOP_TIMEOUT="5s",
        )
        for k in list(env):
            if k.startswith("HATCH_BENCH_"):
                del env[k]
        return env

    def start(self, owner="bench", extra_env=None):
        self.data.mkdir(parents=True)
        env = self.env(extra_env)
        self.key = self.add_owner(owner, env)
        self.spawn(env)

    def add_owner(self, owner, env=None):
        """A new owner with a key (returned) and no limits in the way; works while the daemon runs
        (the CLI writes the database, which the daemon reads at each request). bench/snapshot
        gives each part an owner of its own, since snapshot storage may be shared within an owner."""
        env = env or self.env()
        out = subprocess.run(
            [self.bin, "keys", "create", "--name", owner],
            env=env, capture_output=True, text=True, timeout=60,
        )
        if out.returncode != 0:
            raise BenchError(f"hatch keys create failed: {out.stderr}")
        key = out.stdout.strip().splitlines()[-1].strip()
        # Benchmarks measure speed, not quotas: the bench owner may hold what
        # they create (bench/boot fills the store with stopped VMs), as an operator would allow.
        out = subprocess.run(
            [self.bin, "owners", "limits", owner, "--vms", "100000", "--vcpus", "1000000",
             "--mem-mib", "1000000000", "--snapshots-per-vm", "10000", "--stored-bytes", "1024T"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        if out.returncode != 0:
            raise BenchError(f"hatch owners limits failed: {out.stderr}")
        return key

    def restart(self, extra_env=None):
        """`hatch serve` ended gracefully and started again on the same data dir and key, with
        `extra_env` this time (bench/snapshot switches HATCH_VMM_CONFINE this way). The store
        keeps every VM; the daemon's shutdown stops a running one, so callers snapshot first."""
        self.terminate()
        self.spawn(self.env(extra_env))

    def spawn(self, env):
        logf = open(self.log_path, "ab")
        # Own process group: a Ctrl-C reaches only the script, which then stops things in order.
        self.proc = subprocess.Popen(
            [self.bin, "serve"], env=env, stdin=subprocess.DEVNULL,
            stdout=logf, stderr=logf, process_group=0,
        )
        logf.close()
        (self.tmp / "daemon.pid").write_text(str(self.proc.pid))
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"hatch serve exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if one_request(None, "GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"daemon did not answer /health:\n{self.tail()}")
            time.sleep(0.05)
        log(f"daemon pid {self.proc.pid} up, data dir {self.data}")

    def delete_vm(self, vm_id):
        status, raw = one_request(self.vm_keys.get(vm_id, self.key), "DELETE", f"/vms/{vm_id}", timeout=60)
        if status != 200:
            raise BenchError(f"DELETE /vms/{vm_id}: {status} {raw[:300]!r}")
        self.live_vms.discard(vm_id)
        self.vm_keys.pop(vm_id, None)

    def vmm_pid(self, vm_id):
        try:
            pid = int((self.vms_dir / vm_id / "vmm.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def vmm_cmdline(self, vm_id):
        pid = self.vmm_pid(vm_id)
        return proc_cmdline(pid) if pid is not None else None

    def stop(self):
        """Deletes the VMs it still has, then SIGTERM (graceful: nft table, dnsmasq), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for vm_id in list(self.live_vms):
            try:
                self.delete_vm(vm_id)
            except Exception as e:
                log(f"cleanup: DELETE {vm_id}: {e}")
        self.terminate()

    def terminate(self):
        """SIGTERM (graceful: nft table, dnsmasq, cgroups), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            log("cleanup: daemon ignored SIGTERM for 30 s, killing it")
            self.proc.kill()
            self.proc.wait(10)


def kill_leftovers(tmp):
    """Anything still naming our temp dir (a QEMU the daemon lost track of) is ours."""
    for pid in pids_mentioning(f"{tmp}/"):
        log(f"cleanup: killing leftover {pid}: {' '.join(proc_cmdline(pid) or [])[:120]}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_guarded(body, cleanup):
    """Runs body() with SIGTERM/SIGHUP as Ctrl-C; cleanup() always runs, once, with signals ignored.

    Returns (exit status, body's result or None).
    """

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    def quiet():
        # A second Ctrl-C must not cut the cleanup short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)

    try:
        result = body()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        quiet()
        cleanup()
        return 130, None
    except BenchError as e:
        log(f"FAILED: {e}")
        quiet()
        cleanup()
        return 1, None
    except BaseException:
        quiet()
        cleanup()
        raise
    quiet()
    cleanup()
    return 0, result


# ---------------------------------------------------------------- report


def qemu_version(binary):
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20).stdout
        return out.splitlines()[0].replace("QEMU emulator version ", "")
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def arg_after(cmd, flag):
    return cmd[cmd.index(flag) + 1] if flag in cmd and cmd.index(flag) + 1 < len(cmd) else "?"


DOC_INTRO = """# Benchmarks

Figures from the scripts in `bench/`, each run for real on a development
machine of this project: 2 cores, Debian 12, QEMU 7.2 with the TCG
accelerator (the host's KVM is a software one that is far slower than TCG,
see `ENVIRONMENT.md`), so boot times are those of an emulated CPU; production
hosts with hardware KVM boot much faster, while hatch's own overhead stays.

How this page is kept:

- Every figure on it is part of a block a bench script printed, pasted as
  printed, with the command and the date of that run above it. No figure,
  ratio or conclusion is typed by hand; the prose between blocks only says
  where a block comes from.
- A full run rewrites its script's `##` section itself (`bench/boot`,
  `bench/net` and `bench/exec` unless `--no-docs`; `bench/snapshot`,
  `bench/proxy` and `bench/firecracker` with `--markdown`). A partial run (`bench/net --filter-only`, `bench/snapshot
  --confine-only`) prints its block with its command and date, to be pasted
  under its section.
- When the code that measures or prints a block changes, the block gives way
  to a "(to be re-run)" placeholder until a run on a quiet machine replaces
  it.
- Blocks come from different runs unless they say otherwise: compare figures
  within a block, not across blocks.

How the figures are measured:

- Every script runs as root, builds `cargo build --release`, makes a network
  namespace of its own with only `lo` up, runs the daemon (`hatch serve`) and
  itself inside it and sends requests to 127.0.0.1 only. The daemon, every
  QEMU, the namespace and the temp data dir are removed at the end.
- Boot times are wall-clock (monotonic clock) from the request or the process
  spawn to the moment a line shows up in the VM's `console.log`, which is
  polled every 2 ms, so figures are good to about 2-3 ms.
"""


def write_docs(path, name, section):
    """Replaces (or appends) the `## NAME` section of the docs file; other sections stay as they are."""
    text = path.read_text() if path.exists() else DOC_INTRO
    block = f"## {name}\n\n" + section.rstrip() + "\n"
    m = re.search(rf"^## {re.escape(name)}\s*$", text, flags=re.M)
    if m:
        nxt = re.search(r"^## ", text[m.end():], flags=re.M)
        end = m.end() + nxt.start() if nxt else len(text)
        text = text[: m.start()] + block + ("\n" + text[end:] if nxt else "")
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)


def namespace_pids():
    """Processes in this process's network namespace, this one excepted."""
    mine = os.stat("/proc/self/ns/net")
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) and pid_alive(entry):
            out.append(int(entry))
    return out


def kill_namespace_leftovers(check_namespace):
    """Every process still in our namespace but us was started by this run (`check_namespace` raises
    unless this is the bench's own namespace). Children of the daemon (dnsmasq, QEMU) get 3 s to
    finish exiting after its shutdown; whatever is left then is killed."""
    try:
        check_namespace()
    except (BenchError, OSError):
        return
    deadline = time.monotonic() + 3
    while namespace_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in namespace_pids():
        log(f"cleanup: killing leftover {pid}: {' '.join(proc_cmdline(pid) or [])[:120]}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def add_table(add, markdown, header, rows):
    """A table through `add` (one line per call): markdown, or aligned plain text; then a blank line."""
    if markdown:
        add("| " + " | ".join(header) + " |")
        add("|" + "---|" * len(header))
        for r in rows:
            add("| " + " | ".join(str(c) for c in r) + " |")
    else:
        w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        add("  ".join(str(h).ljust(n) for h, n in zip(header, w)))
        add("  ".join("-" * n for n in w))
        for r in rows:
            add("  ".join(str(c).ljust(n) for c, n in zip(r, w)))
    add("")


def add_heading(add, markdown, text):
    """A third-level heading (markdown) or `== text` (plain), then a blank line."""
    add(f"### {text}" if markdown else f"== {text}")
    add("")


def parse_dur_ms(s):
    """A wrk duration (`812.00us`, `5.82ms`, `1.10s`, `2.00m`) in ms; NaN if it is none."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", s)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]


def parse_wrk(text):
    """`wrk --latency` output: rps, p50-p99 (`lat`), avg/max latency, requests, socket errors, non-2xx."""
    r = {"lat": {}, "errors": 0, "error_text": "", "non2xx": 0, "requests": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise BenchError(f"no Requests/sec in wrk's output:\n{text}")
    r["rps"] = float(m.group(1))
    for pct, val in re.findall(r"^\s+(50%|75%|90%|99%)\s+(\S+)\s*$", text, flags=re.M):
        r["lat"][pct] = parse_dur_ms(val)
    m = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", text, flags=re.M)
    if m:
        r["avg"], r["max"] = parse_dur_ms(m.group(1)), parse_dur_ms(m.group(3))
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", text)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r["errors"] = sum(int(x) for x in m.groups())
        r["error_text"] = m.group(0)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        r["non2xx"] = int(m.group(1))
    return r


def git_state():
    """Which source the release binary was built from (the wrapper builds just before this runs)."""
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=30).stdout
    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = [line[3:] for line in git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock",
                                          "migrations").splitlines()]
    except (OSError, subprocess.SubprocessError):
        return "unknown source state (git failed)"
    if not head:
        return "unknown source state (not a git checkout)"
    if not dirty:
        return f"commit `{head}`, no uncommitted changes to the daemon's sources"
    return (f"commit `{head}` plus uncommitted changes to {', '.join(f'`{d}`' for d in dirty)} "
            f"(the work tree at the time of the build)")
